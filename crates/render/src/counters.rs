//! What the kernel's counters in a table of this layout count: each counted element or
//! rule of a [`CounterReading`] attributed to a Service port and outcome, or to an
//! endpoint, and [`Totals`] that stay monotonic while the counters under them come and
//! go.
//!
//! Invariant: attribution reads nothing but the reading, so it works on any table this
//! layout wrote (the running daemon's, or one found by `nftproxy top`): Service ports
//! are named by the comments of their elements and by the names of their chains, and a
//! balancer map's element by the destination its key shares with a named element.
//! Only first packets pass the NAT hooks and the `ct state new` checks, so every count
//! is a count of connections.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use nftproxy_nft::{CounterReading, L4Proto, Stmt, Value, Verdict};

use crate::balance;
use crate::names::{PortName, parse_port_name};
use crate::services::FIREWALL_SUFFIX;
use crate::skeleton::{
    CLUSTER_IPS, CLUSTER_IPS_CHECK, NO_ENDPOINT_NODEPORTS, NO_ENDPOINT_SERVICES, SERVICE_IPS,
    SERVICE_NODEPORTS, UNALLOCATED_COMMENT,
};

/// What became of a counted connection to a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// DNATed to an endpoint.
    Forwarded,
    /// Refused with an ICMP error: no endpoints at all, or a port the ClusterIP does not
    /// define.
    Rejected,
    /// Dropped: a Local traffic policy without local endpoints, or a source outside the
    /// `loadBalancerSourceRanges`.
    Dropped,
}

impl Outcome {
    /// The metric label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Rejected => "rejected",
            Outcome::Dropped => "dropped",
        }
    }
}

/// A Service port as the counters name it. `port` is the port's name, or its number
/// when it has none; both `port` and `protocol` are empty for connections to a port the
/// ClusterIP does not define.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortLabel {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub service: String,
    /// The port's name, or number.
    pub port: String,
    /// `TCP`, `UDP` or `SCTP`, as Kubernetes spells it.
    pub protocol: String,
}

impl ServicePortLabel {
    /// `namespace/service`
    pub fn service_name(&self) -> String {
        format!("{}/{}", self.namespace, self.service)
    }
}

/// What one counter counts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counted {
    /// Connections to a Service port with one outcome.
    Service(Arc<ServicePortLabel>, Outcome),
    /// Connections a Service port sent to one endpoint.
    Endpoint(Arc<ServicePortLabel>, SocketAddr),
    /// Connections to an address of a Service CIDR that no Service holds (dropped).
    Unallocated,
}

/// A counter in the kernel: an element (by set and key) or a rule (by chain and
/// handle), with what it counts. An element whose key comes to mean something else
/// (another endpoint in a balancer's slot) is another counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CounterId {
    Element(Arc<str>, Vec<Value>),
    Rule(Arc<str>, u64),
    /// An endpoint's counter (element or rule) read as its Service port's forwarded
    /// connections.
    Forwarded(Box<CounterId>),
}

/// Every counter of a reading with what it counts and its packets (connections);
/// counters this layout does not know are left out.
fn attributed(reading: &CounterReading) -> Vec<(CounterId, Counted, u64)> {
    let names = Names::of(reading);
    let mut out = Vec::with_capacity(reading.elements.len() + reading.rules.len());
    // Elements come set by set: the set's name and kind are worked out once per set.
    let mut set: (Arc<str>, Option<L4Proto>) = (Arc::from(""), None);
    for counted in &reading.elements {
        if *set.0 != *counted.set {
            set = (
                Arc::from(counted.set.as_str()),
                balance::endpoint_map_protocol(&counted.set),
            );
        }
        let element = &counted.element;
        let mut key = element.key();
        let data = element.data();
        let what = if let Some(proto) = set.1 {
            endpoint_of(&names, proto, &key, &data)
        } else if counted.set == CLUSTER_IPS {
            let service = match key.as_slice() {
                [Value::Addr(addr)] => names.cluster_ips.get(addr),
                _ => None,
            };
            service.map(|(namespace, service)| {
                let label = ServicePortLabel {
                    namespace: namespace.clone(),
                    service: service.clone(),
                    port: String::new(),
                    protocol: String::new(),
                };
                Counted::Service(Arc::new(label), Outcome::Rejected)
            })
        } else {
            let no_endpoints = [NO_ENDPOINT_SERVICES, NO_ENDPOINT_NODEPORTS];
            let outcome = match element.verdict() {
                _ if !no_endpoints.contains(&counted.set.as_str()) => None,
                Some(Verdict::Drop) => Some(Outcome::Dropped),
                Some(Verdict::Goto(_)) => Some(Outcome::Rejected),
                _ => None,
            };
            let label = element
                .comment()
                .and_then(|comment| names.label(comment, &key));
            outcome
                .zip(label)
                .map(|(o, l)| Counted::Service(Arc::new(l), o))
        };
        if let Some(what) = what {
            key.extend(data);
            let id = CounterId::Element(Arc::clone(&set.0), key);
            push(&mut out, id, what, counted.count.packets);
        }
    }
    for counted in &reading.rules {
        let rule = &counted.rule;
        let what = if counted.chain == CLUSTER_IPS_CHECK
            && rule.comment.as_deref() == Some(UNALLOCATED_COMMENT)
        {
            Some(Counted::Unallocated)
        } else if let Some(label) = names.chain_label(&counted.chain) {
            let endpoint = rule.stmts.iter().find_map(|stmt| match stmt {
                Stmt::Dnat { addr, port } => Some(SocketAddr::new(*addr, *port)),
                _ => None,
            });
            let label = Arc::new(label);
            match endpoint {
                Some(endpoint) => Some(Counted::Endpoint(label, endpoint)),
                None if rule
                    .comment
                    .as_deref()
                    .is_some_and(|c| c.ends_with(FIREWALL_SUFFIX)) =>
                {
                    Some(Counted::Service(label, Outcome::Dropped))
                }
                None => None,
            }
        } else {
            None
        };
        if let Some(what) = what {
            let id = CounterId::Rule(Arc::from(counted.chain.as_str()), counted.handle);
            push(&mut out, id, what, counted.count.packets);
        }
    }
    out
}

/// Adds a counter to `out`; an endpoint's also counts as its Service port's forwarded
/// connections: a connection is forwarded exactly when it finds an endpoint (a
/// destination entering a balancer that has none for it, as with a Local policy and no
/// local endpoint, falls through to a `drop`, counted there).
fn push(out: &mut Vec<(CounterId, Counted, u64)>, id: CounterId, what: Counted, packets: u64) {
    if let Counted::Endpoint(label, _) = &what {
        let forwarded = Counted::Service(Arc::clone(label), Outcome::Forwarded);
        out.push((
            CounterId::Forwarded(Box::new(id.clone())),
            forwarded,
            packets,
        ));
    }
    out.push((id, what, packets));
}

/// The uncounted sets whose elements send a destination on to its endpoints (the
/// shared entries' sets, and the verdict maps of ports with affinity): their comments
/// name the destinations, so a reading needs them besides the counted elements.
pub fn naming_sets() -> Vec<&'static str> {
    let mut sets: Vec<&'static str> = balance::entry_sets().collect();
    sets.extend([SERVICE_IPS, SERVICE_NODEPORTS]);
    sets
}

/// `ns/name` of a comment `ns/name[:port]`.
fn service_of(comment: &str) -> Option<(String, String)> {
    let service = comment.split_once(':').map_or(comment, |(s, _)| s);
    let (namespace, name) = service.split_once('/')?;
    Some((namespace.to_owned(), name.to_owned()))
}

/// `TCP`, as Kubernetes spells a protocol.
fn protocol_label(proto: L4Proto) -> String {
    proto.name().to_ascii_uppercase()
}

/// The destination a key names: `[address .] protocol . port`.
type Destination = (Option<IpAddr>, L4Proto, u16);

fn destination(key: &[Value]) -> Option<Destination> {
    match key {
        [Value::Addr(addr), Value::Proto(proto), Value::Port(port)] => {
            Some((Some(*addr), *proto, *port))
        }
        [Value::Proto(proto), Value::Port(port)] => Some((None, *proto, *port)),
        _ => None,
    }
}

/// What the named elements of a reading say: each destination's Service port, the
/// Service of each ClusterIP, and the port number of each Service whose port has no
/// name.
#[derive(Default)]
struct Names {
    destinations: HashMap<Destination, Arc<ServicePortLabel>>,
    /// The Service of each address that some Service port's ClusterIP-keyed element
    /// names (Kubernetes gives each Service its own ClusterIP; were one shared, the
    /// first Service in name order would be named).
    cluster_ips: HashMap<IpAddr, (String, String)>,
    /// `(namespace, name, protocol)` of an unnamed port: its number.
    unnamed: HashMap<(String, String, String), u16>,
}

impl Names {
    fn of(reading: &CounterReading) -> Names {
        let mut names = Names::default();
        // Address keys hold the Service port (NodePort keys the NodePort): a port
        // without a name is named by its number.
        let cluster_ips: BTreeSet<IpAddr> = reading
            .elements
            .iter()
            .filter(|c| c.set == CLUSTER_IPS)
            .filter_map(|c| match c.element.key().as_slice() {
                [Value::Addr(addr)] => Some(*addr),
                _ => None,
            })
            .collect();
        // Only named elements are decoded (the balancers' maps, most of a reading, have
        // no comments).
        let all = reading
            .elements
            .iter()
            .map(|c| (c.set.as_str(), &c.element))
            .chain(
                reading
                    .named
                    .iter()
                    .map(|(set, element)| (set.as_str(), element)),
            );
        for (_, element) in all.clone() {
            let Some(comment) = element.comment() else {
                continue;
            };
            let Some((Some(addr), proto, port)) = destination(&element.key()) else {
                continue;
            };
            let Some((namespace, service)) = service_of(comment) else {
                continue;
            };
            if cluster_ips.contains(&addr) {
                let holder = names
                    .cluster_ips
                    .entry(addr)
                    .or_insert_with(|| (namespace.clone(), service.clone()));
                if (&namespace, &service) < (&holder.0, &holder.1) {
                    *holder = (namespace.clone(), service.clone());
                }
            }
            if !comment.contains(':') {
                names
                    .unnamed
                    .insert((namespace, service, protocol_label(proto)), port);
            }
        }
        // The destinations entering the balancers, by the sets they enter through.
        for (set, element) in &reading.named {
            let Some(comment) = element.comment().filter(|_| balance::is_entry_set(set)) else {
                continue;
            };
            let key = element.key();
            let Some(destination) = destination(&key) else {
                continue;
            };
            if let Some(label) = names.label(comment, &key) {
                names.destinations.insert(destination, Arc::new(label));
            }
        }
        names
    }

    /// The Service port of an element's comment `ns/name[:port]` and key.
    fn label(&self, comment: &str, key: &[Value]) -> Option<ServicePortLabel> {
        let (_, proto, _) = destination(key)?;
        let (namespace, service) = service_of(comment)?;
        let protocol = protocol_label(proto);
        let port = match comment.split_once(':') {
            Some((_, port)) => port.to_owned(),
            None => self
                .unnamed
                .get(&(namespace.clone(), service.clone(), protocol.clone()))?
                .to_string(),
        };
        Some(ServicePortLabel {
            namespace,
            service,
            port,
            protocol,
        })
    }

    /// The Service port of a per-port chain, from its name `KIND-HASH-ns/name/proto/port`
    /// (never cut: the longest valid Kubernetes names leave it under the limit).
    fn chain_label(&self, chain: &str) -> Option<ServicePortLabel> {
        let PortName {
            kind,
            namespace,
            name: service,
            protocol,
            port,
        } = parse_port_name(chain)?;
        if !["service", "local", "firewall"].contains(&kind) {
            return None;
        }
        let protocol = protocol.to_ascii_uppercase();
        let port = if port.is_empty() {
            self.unnamed
                .get(&(namespace.to_owned(), service.to_owned(), protocol.clone()))?
                .to_string()
        } else {
            port.to_owned()
        };
        Some(ServicePortLabel {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            port,
            protocol,
        })
    }
}

/// A balancer map element: the endpoint its destination (`[address .] port . index`
/// in `proto`) is sent to.
fn endpoint_of(names: &Names, proto: L4Proto, key: &[Value], data: &[Value]) -> Option<Counted> {
    let destination = match key {
        [Value::Addr(addr), Value::Port(port), Value::Number(_)] => (Some(*addr), proto, *port),
        [Value::Port(port), Value::Number(_)] => (None, proto, *port),
        _ => return None,
    };
    let [Value::Addr(addr), Value::Port(port)] = data else {
        return None;
    };
    let label = Arc::clone(names.destinations.get(&destination)?);
    Some(Counted::Endpoint(label, SocketAddr::new(*addr, *port)))
}

/// Connection totals over successive readings of one table. The kernel's counters
/// belong to elements and rules, which a change of endpoints may delete (a balancer
/// slot given to another endpoint, an affinity chain written again): what a deleted
/// counter had counted when last read is carried, so a total never goes down while its
/// Service port exists. Once nothing counts for a Service port or endpoint any more
/// (it was deleted), its carry goes too: re-created, it starts from zero.
#[derive(Debug, Default)]
pub struct Totals {
    last: HashMap<CounterId, (Counted, u64)>,
    carried: HashMap<Counted, u64>,
}

impl Totals {
    /// The totals after `reading`, by what they count.
    pub fn update(&mut self, reading: &CounterReading) -> BTreeMap<Counted, u64> {
        let attributed = attributed(reading);
        let mut totals: HashMap<Counted, u64> = HashMap::with_capacity(attributed.len());
        let mut seen = HashMap::with_capacity(attributed.len());
        for (id, counted, packets) in attributed {
            *totals.entry(counted.clone()).or_default() += packets;
            seen.insert(id, (counted, packets));
        }
        for (id, (counted, packets)) in self.last.drain() {
            if !seen.contains_key(&id) {
                *self.carried.entry(counted).or_default() += packets;
            }
        }
        // A Service port exists while anything counts for it: its endpoints, or the
        // element that rejects or drops its connections when it has none. An endpoint
        // exists while its own counter does.
        let ports: HashSet<Arc<ServicePortLabel>> = totals
            .keys()
            .filter_map(|counted| match counted {
                Counted::Service(label, _) | Counted::Endpoint(label, _) => Some(Arc::clone(label)),
                Counted::Unallocated => None,
            })
            .collect();
        self.carried.retain(|counted, _| match counted {
            Counted::Service(label, _) => ports.contains(label),
            Counted::Endpoint(..) | Counted::Unallocated => totals.contains_key(counted),
        });
        for (counted, carried) in &self.carried {
            *totals.entry(counted.clone()).or_default() += carried;
        }
        self.last = seen;
        totals.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nftproxy_nft::{Count, CountedElement, CountedRule, Element, Family, Rule};

    fn element(set: &str, element: Element, packets: u64) -> CountedElement {
        CountedElement {
            set: set.to_owned(),
            element,
            count: Count { packets, bytes: 0 },
        }
    }

    fn addr(s: &str) -> Value {
        Value::Addr(s.parse().expect("test address"))
    }

    fn label(port: &str) -> Arc<ServicePortLabel> {
        Arc::new(ServicePortLabel {
            namespace: "ns".into(),
            service: "web".into(),
            port: port.into(),
            protocol: "TCP".into(),
        })
    }

    /// A ClusterIP with two endpoints in a balancer slot map, a NodePort without
    /// endpoints, and a port of the ClusterIP it does not define.
    fn reading(slot0: (&str, u64), slot1: (&str, u64)) -> CounterReading {
        let tcp = Value::Proto(L4Proto::Tcp);
        let cluster = vec![addr("10.96.0.1"), tcp, Value::Port(80)];
        let slot = |index: u32, (endpoint, packets): (&str, u64)| {
            element(
                "tcp-endpoints-1",
                Element::mapped(
                    vec![addr("10.96.0.1"), Value::Port(80), Value::Number(index)],
                    vec![addr(endpoint), Value::Port(8080)],
                ),
                packets,
            )
        };
        CounterReading {
            family: Some(Family::Ip),
            named: vec![(
                "load-balance".to_owned(),
                Element::new(cluster).with_comment("ns/web:http"),
            )],
            elements: vec![
                slot(0, slot0),
                slot(1, slot1),
                element(
                    NO_ENDPOINT_NODEPORTS,
                    Element::with_verdict(
                        vec![tcp, Value::Port(30080)],
                        Verdict::Goto("reject-chain".into()),
                    )
                    .with_comment("ns/web:http"),
                    2,
                ),
                element(CLUSTER_IPS, Element::new(vec![addr("10.96.0.1")]), 1),
            ],
            rules: Vec::new(),
        }
    }

    fn endpoint(ip: &str) -> Counted {
        Counted::Endpoint(
            label("http"),
            SocketAddr::new(ip.parse().expect("test address"), 8080),
        )
    }

    #[test]
    fn elements_are_attributed_to_their_service_port_outcome_and_endpoint() {
        let totals = Totals::default().update(&reading(("10.0.0.1", 3), ("10.0.0.2", 4)));
        assert_eq!(
            totals[&Counted::Service(label("http"), Outcome::Forwarded)],
            7
        );
        assert_eq!(
            totals[&Counted::Service(label("http"), Outcome::Rejected)],
            2
        );
        let undefined_port = Arc::new(ServicePortLabel {
            port: String::new(),
            protocol: String::new(),
            ..(*label("")).clone()
        });
        assert_eq!(
            totals[&Counted::Service(undefined_port, Outcome::Rejected)],
            1
        );
        assert_eq!(totals[&endpoint("10.0.0.1")], 3);
        assert_eq!(totals[&endpoint("10.0.0.2")], 4);
    }

    #[test]
    fn a_deleted_counter_is_carried_and_a_gone_endpoint_forgotten() {
        let mut totals = Totals::default();
        totals.update(&reading(("10.0.0.1", 3), ("10.0.0.2", 4)));
        // 10.0.0.1 went: its slot now holds 10.0.0.2 with a fresh counter, and the old
        // slot of 10.0.0.2 holds a third endpoint.
        let after = totals.update(&reading(("10.0.0.2", 1), ("10.0.0.3", 0)));
        assert_eq!(after[&endpoint("10.0.0.2")], 5, "4 carried + 1 new");
        assert_eq!(after[&endpoint("10.0.0.3")], 0);
        assert!(!after.contains_key(&endpoint("10.0.0.1")));
        // The Service port's forwarded connections keep what the gone endpoint had.
        let forwarded = Counted::Service(label("http"), Outcome::Forwarded);
        assert_eq!(after[&forwarded], 3 + 4 + 1);
        // Back again later, 10.0.0.1 starts from zero.
        let back = totals.update(&reading(("10.0.0.1", 0), ("10.0.0.2", 1)));
        assert_eq!(back[&endpoint("10.0.0.1")], 0);
    }

    #[test]
    fn unnamed_ports_are_named_by_number_and_rules_by_their_chain() {
        let tcp = Value::Proto(L4Proto::Tcp);
        let mut dnat = Rule::new(vec![Stmt::Dnat {
            addr: "10.0.0.9".parse().expect("test address"),
            port: 8080,
        }]);
        dnat.comment = None;
        let reading = CounterReading {
            family: Some(Family::Ip),
            elements: Vec::new(),
            named: vec![(
                SERVICE_IPS.to_owned(),
                Element::with_verdict(
                    vec![addr("10.96.0.2"), tcp, Value::Port(443)],
                    Verdict::Goto("service-ABCDEFGH-ns/web/tcp/".into()),
                )
                .with_comment("ns/web"),
            )],
            rules: vec![
                CountedRule {
                    chain: "service-ABCDEFGH-ns/web/tcp/".into(),
                    handle: 9,
                    rule: dnat,
                    count: Count {
                        packets: 5,
                        bytes: 0,
                    },
                },
                CountedRule {
                    chain: "firewall-ABCDEFGH-ns/web/tcp/".into(),
                    handle: 10,
                    rule: Rule::new(vec![Stmt::Verdict(Verdict::Drop)])
                        .with_comment(format!("ns/web{FIREWALL_SUFFIX}")),
                    count: Count {
                        packets: 2,
                        bytes: 0,
                    },
                },
                CountedRule {
                    chain: CLUSTER_IPS_CHECK.into(),
                    handle: 11,
                    rule: Rule::new(vec![Stmt::Verdict(Verdict::Drop)])
                        .with_comment(UNALLOCATED_COMMENT),
                    count: Count {
                        packets: 4,
                        bytes: 0,
                    },
                },
            ],
        };
        let totals = Totals::default().update(&reading);
        let port = label("443");
        assert_eq!(
            totals[&Counted::Service(port.clone(), Outcome::Forwarded)],
            5
        );
        assert_eq!(totals[&Counted::Service(port.clone(), Outcome::Dropped)], 2);
        let endpoint = SocketAddr::new("10.0.0.9".parse().expect("test address"), 8080);
        assert_eq!(totals[&Counted::Endpoint(port, endpoint)], 5);
        assert_eq!(totals[&Counted::Unallocated], 4);
    }
}
