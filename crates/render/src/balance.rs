//! Load balancing by map elements: a destination's endpoints are elements of a map (one
//! per balancer and protocol) keyed by the destination and an index, and one shared rule
//! per endpoint count draws the index with `numgen random mod COUNT`; destinations enter
//! the shared chains through sets named after them.
//!
//! Invariant: a balancer's chain sends each protocol to a chain of its own, which holds
//! one rule for every count from 1 to the protocol's span (one above the largest count a
//! destination uses), in that order, each with its set of destinations; the protocol's
//! map exists while a destination uses it. The kernel revalidates the whole table, and
//! walks the whole map, for every rule it adds, but not for elements of a data map or
//! plain set. So adding or removing an endpoint changes elements only, unless it changes
//! the largest count: then one rule and its set are appended (or the last ones go). The
//! span is a pure function of the counts in use, so the output stays deterministic.
//! Indices are given in endpoint order; the maps are slot maps
//! ([`nftproxy_nft::Set::is_slot_map`]), so the diff may keep the kernel's endpoints in
//! another order that means the same.

use std::borrow::Cow;
use std::collections::BTreeMap;

use nftproxy_model::{Endpoint, ProxyState};
use nftproxy_nft::{
    Chain, DataType, Element, Expr, Family, FibInput, L4Proto, PayloadField, Rhs, Rule, Set, Stmt,
    Table, Value,
};

use crate::skeleton::{local_traffic_match, mark_for_masquerade};

/// Which endpoints of which destinations a balancer picks from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Balancer {
    /// Cluster endpoints, by destination address, protocol and port.
    Cluster,
    /// Node-local endpoints, by destination address, protocol and port.
    Local,
    /// Cluster endpoints, by NodePort.
    NodePort,
    /// Node-local endpoints, by NodePort.
    NodePortLocal,
}

impl Balancer {
    const ALL: [Balancer; 4] = [
        Balancer::Cluster,
        Balancer::Local,
        Balancer::NodePort,
        Balancer::NodePortLocal,
    ];

    /// The balancer for a traffic policy, by address or by NodePort.
    pub(crate) fn of(node_port: bool, local: bool) -> Balancer {
        match (node_port, local) {
            (false, false) => Balancer::Cluster,
            (false, true) => Balancer::Local,
            (true, false) => Balancer::NodePort,
            (true, true) => Balancer::NodePortLocal,
        }
    }

    /// The chain destinations enter by: it sends each protocol to its own chain.
    pub(crate) fn chain(self) -> &'static str {
        match self {
            Balancer::Cluster => "load-balance",
            Balancer::Local => "load-balance-local",
            Balancer::NodePort => "load-balance-nodeport",
            Balancer::NodePortLocal => "load-balance-nodeport-local",
        }
    }

    /// The chain that draws an endpoint for one protocol.
    pub(crate) fn proto_chain(self, proto: L4Proto) -> String {
        format!("{}-{}", self.chain(), proto.name())
    }

    /// The map from destination and index to endpoint, for one protocol. (One map per
    /// protocol: nft 1.0.6 refuses to add a rule using a map already in the kernel
    /// whose value is declared with `th dport`, and takes `udp dport` only in UDP rules.)
    pub(crate) fn map(self, proto: L4Proto) -> &'static str {
        use L4Proto::{Sctp, Tcp, Udp};
        match (self, proto) {
            (Balancer::Cluster, Tcp) => "tcp-endpoints",
            (Balancer::Cluster, Udp) => "udp-endpoints",
            (Balancer::Cluster, Sctp) => "sctp-endpoints",
            (Balancer::Local, Tcp) => "tcp-local-endpoints",
            (Balancer::Local, Udp) => "udp-local-endpoints",
            (Balancer::Local, Sctp) => "sctp-local-endpoints",
            (Balancer::NodePort, Tcp) => "tcp-nodeport-endpoints",
            (Balancer::NodePort, Udp) => "udp-nodeport-endpoints",
            (Balancer::NodePort, Sctp) => "sctp-nodeport-endpoints",
            (Balancer::NodePortLocal, Tcp) => "tcp-nodeport-local-endpoints",
            (Balancer::NodePortLocal, Udp) => "udp-nodeport-local-endpoints",
            (Balancer::NodePortLocal, Sctp) => "sctp-nodeport-local-endpoints",
        }
    }

    /// The set of destinations with `count` endpoints.
    pub(crate) fn count_set(self, proto: L4Proto, count: usize) -> String {
        format!("{}-{count}", self.map(proto))
    }

    fn by_node_port(self) -> bool {
        matches!(self, Balancer::NodePort | Balancer::NodePortLocal)
    }

    /// `[ip daddr .] PORT`: what identifies a destination of one protocol.
    fn destination(self, family: Family, port: PayloadField) -> Vec<Expr> {
        let mut parts = Vec::with_capacity(2);
        if !self.by_node_port() {
            parts.push(Expr::daddr(family));
        }
        parts.push(Expr::Payload(port));
        parts
    }

    /// What a count set holds: the destination, with the protocol before a lone port.
    /// A set keyed by a port alone (two bytes) is a bitmap in the kernel, and every
    /// insert into a bitmap walks its elements: its first 3,000 NodePorts took 45 ms of
    /// a cold load, and the time grew with the square of their number.
    fn count_key(self, family: Family, port: PayloadField) -> Vec<Expr> {
        let mut key = self.destination(family, port);
        if self.by_node_port() {
            key.insert(0, Expr::MetaL4proto);
        }
        key
    }

    /// A destination's element in its count set: the values of [`Balancer::count_key`]
    /// for the destination `key` (`[address .] port`).
    fn count_element(self, proto: L4Proto, key: &[Value]) -> Element {
        let mut counted = Vec::with_capacity(key.len() + 1);
        if self.by_node_port() {
            counted.push(Value::Proto(proto));
        }
        counted.extend_from_slice(key);
        Element::new(counted)
    }

    fn what(self) -> &'static str {
        match self {
            Balancer::Cluster => "Cluster endpoints by destination",
            Balancer::Local => "node-local endpoints by destination",
            Balancer::NodePort => "Cluster endpoints by NodePort",
            Balancer::NodePortLocal => "node-local endpoints by NodePort",
        }
    }

    fn map_declaration(self, family: Family, proto: L4Proto) -> Set {
        let port = PayloadField::Dport(proto);
        let mut key = self.destination(family, port);
        key.push(Expr::NumgenRandom(1));
        Set::typeof_map(
            self.map(proto),
            key,
            vec![Expr::daddr(family), Expr::Payload(port)],
        )
        .expect("addresses, ports and numgen results all have data types")
        .with_comment(format!("{} {}, and index", proto.name(), self.what()))
    }

    fn count_set_declaration(self, family: Family, proto: L4Proto, count: usize) -> Set {
        let types = self
            .count_key(family, PayloadField::ThDport)
            .iter()
            .filter_map(Expr::data_type)
            .collect();
        Set::new(self.count_set(proto, count), types).with_comment(format!(
            "{} destinations with {count} {}",
            proto.name(),
            if count == 1 { "endpoint" } else { "endpoints" }
        ))
    }

    /// `meta l4proto PROTO DESTINATION @COUNT-SET dnat to DESTINATION . numgen random mod
    /// COUNT map @MAP`: an equal share for each of the destination's endpoints. (The
    /// protocol's chain sees only that protocol, but nft takes a port mapping only after
    /// a protocol match in the same rule.)
    fn rule(self, family: Family, proto: L4Proto, count: usize) -> Rule {
        let mut drawn = self.destination(family, PayloadField::ThDport);
        drawn.push(Expr::NumgenRandom(u32::try_from(count).unwrap_or(u32::MAX)));
        let counted = self.count_key(family, PayloadField::ThDport);
        Rule::new(vec![
            Stmt::eq(Expr::MetaL4proto, Rhs::Proto(proto)),
            Stmt::lookup(one_or_concat(counted), self.count_set(proto, count)),
            Stmt::DnatMap {
                family,
                key: Expr::Concat(drawn),
                map: self.map(proto).to_owned(),
            },
        ])
    }
}

/// A key of one expression, or the concatenation of several (as nft decompiles them).
fn one_or_concat(mut parts: Vec<Expr>) -> Expr {
    if parts.len() == 1 {
        parts.remove(0)
    } else {
        Expr::Concat(parts)
    }
}

/// One destination's endpoints in one balancer.
#[derive(Debug)]
pub(crate) struct Destination {
    balancer: Balancer,
    proto: L4Proto,
    /// `[address .] port`
    key: Vec<Value>,
    /// At least one.
    endpoints: Vec<(std::net::IpAddr, u16)>,
}

impl Destination {
    /// `key` is `[address .] port`.
    pub(crate) fn new(
        balancer: Balancer,
        proto: L4Proto,
        key: Vec<Value>,
        endpoints: &[Endpoint],
    ) -> Destination {
        Destination {
            balancer,
            proto,
            key,
            endpoints: endpoints.iter().map(|e| (e.ip, e.port)).collect(),
        }
    }

    /// The rule (and count set) this destination needs.
    pub(crate) fn usage(&self) -> Usage {
        (self.balancer, self.proto, self.endpoints.len())
    }

    /// The element in the count set, then one map element per endpoint.
    pub(crate) fn elements(&self) -> impl Iterator<Item = (Cow<'static, str>, Element)> + '_ {
        let count = std::iter::once((
            Cow::Owned(self.balancer.count_set(self.proto, self.endpoints.len())),
            self.balancer.count_element(self.proto, &self.key),
        ));
        let map = self.balancer.map(self.proto);
        let endpoints = (0u32..)
            .zip(&self.endpoints)
            .map(move |(index, (ip, port))| {
                let mut key = self.key.clone();
                key.push(Value::Number(index));
                (
                    Cow::Borrowed(map),
                    Element::mapped(key, vec![Value::Addr(*ip), Value::Port(*port)]),
                )
            });
        count.chain(endpoints)
    }
}

/// (balancer, protocol, endpoint count): one rule, and its count set.
pub(crate) type Usage = (Balancer, L4Proto, usize);

/// How many destinations each rule serves.
pub(crate) type Usages = BTreeMap<Usage, u32>;

/// The span of a balancer whose largest destination has `largest` endpoints: the counts
/// it has rules for, 1 to one above `largest`, so one more endpoint never needs a rule
/// that is not there. The span moves one rule at a time: each rule added walks the
/// whole endpoint map and has the table revalidated (a new largest count took 11 ms of
/// kernel time at 10,000 Services × 5 endpoints, 96 ms at 30,000 × 10), and its set and
/// rule are two operations beside the endpoint's four.
pub(crate) fn span_above(largest: usize) -> usize {
    largest + 1
}

/// The span of `balancer` in `proto`: none when no destination uses the protocol.
pub(crate) fn span(usages: &Usages, balancer: Balancer, proto: L4Proto) -> usize {
    usages
        .range((balancer, proto, 0)..=(balancer, proto, usize::MAX))
        .next_back()
        .map_or(0, |((_, _, largest), _)| span_above(*largest))
}

/// Brings `balancer`'s map and count sets in `proto` from span `before` to its span in
/// `usages`, naming what it creates or removes in `scope`. Whether the span changed (and
/// with it the balancer's rules).
pub(crate) fn respan(
    table: &mut Table,
    usages: &Usages,
    (balancer, proto): (Balancer, L4Proto),
    before: usize,
    scope: Option<&mut nftproxy_nft::Scope>,
) -> bool {
    let after = span(usages, balancer, proto);
    if after == before {
        return false;
    }
    let mut touched = Vec::new();
    if before == 0 || after == 0 {
        touched.push(balancer.map(proto).to_owned());
        if before == 0 {
            table.add_set(balancer.map_declaration(table.family, proto));
        }
    }
    for count in (before.min(after) + 1)..=before.max(after) {
        touched.push(balancer.count_set(proto, count));
        if after > before {
            table.add_set(balancer.count_set_declaration(table.family, proto, count));
        }
    }
    if after < before {
        for name in &touched {
            table.sets.remove(name);
        }
    }
    if let Some(scope) = scope {
        scope.sets.extend(touched);
    }
    true
}

/// A balancer's chain for one protocol, with a rule for each count in its span, in
/// order: the span grows by appending and shrinks by deleting the last rules, and never
/// moves another protocol's rules.
pub(crate) fn chain(family: Family, balancer: Balancer, proto: L4Proto, usages: &Usages) -> Chain {
    let rules = (1..=span(usages, balancer, proto))
        .map(|count| balancer.rule(family, proto, count))
        .collect();
    Chain::regular(balancer.proto_chain(proto), rules)
}

/// The entry chain of externally reached destinations without affinity, for each
/// traffic policy, by address or by NodePort.
pub(crate) fn external_chain(node_port: bool, local: bool) -> &'static str {
    match (node_port, local) {
        (false, false) => "external-cluster",
        (false, true) => "external-local",
        (true, false) => "nodeport-cluster",
        (true, true) => "nodeport-local",
    }
}

/// The entry for external traffic: masquerade and use Cluster endpoints, or with Local
/// policy keep the client address and use node-local endpoints, except for pod and host
/// traffic, which is short-circuited to the Cluster endpoints.
pub(crate) fn external_rules(
    state: &ProxyState,
    policy_local: bool,
    cluster: &str,
    local: Option<&str>,
) -> Vec<Rule> {
    if !policy_local {
        return vec![Rule::new(vec![
            mark_for_masquerade(state),
            Stmt::goto(cluster),
        ])];
    }
    let mut rules = Vec::with_capacity(3);
    if let Some(from_pod) = local_traffic_match(state, true) {
        rules.push(
            Rule::new(vec![from_pod, Stmt::goto(cluster)])
                .with_comment("short-circuit pod traffic"),
        );
    }
    rules.push(
        Rule::new(vec![
            Stmt::eq(Expr::FibType(FibInput::Saddr), Rhs::FibLocal),
            mark_for_masquerade(state),
            Stmt::goto(cluster),
        ])
        .with_comment("masquerade and short-circuit local traffic"),
    );
    if let Some(local) = local {
        rules.push(Rule::new(vec![Stmt::goto(local)]));
    }
    rules
}

/// The shared chains a destination without affinity enters by, with whether they are
/// entered by address (or by NodePort): ClusterIPs go straight to a balancer, the rest
/// through an external chain. A set of the same name holds the destinations that go to
/// each.
fn entries() -> [(&'static str, bool); 6] {
    [
        (Balancer::Cluster.chain(), true),
        (Balancer::Local.chain(), true),
        (external_chain(false, false), true),
        (external_chain(false, true), true),
        (external_chain(true, false), false),
        (external_chain(true, true), false),
    ]
}

/// `KEY @CHAIN goto CHAIN` for each shared entry by address (or by NodePort).
pub(crate) fn entry_rules(key: &Expr, by_address: bool) -> Vec<Rule> {
    entries()
        .into_iter()
        .filter(|(_, address)| *address == by_address)
        .map(|(chain, _)| Rule::new(vec![Stmt::lookup(key.clone(), chain), Stmt::goto(chain)]))
        .collect()
}

/// The balancers' (still empty) chains, the shared external entry chains, and the
/// (still empty) sets of destinations entering each.
pub(crate) fn add_shared(table: &mut Table, state: &ProxyState) {
    let addr = table.family.addr_type();
    for (chain, by_address) in entries() {
        let mut key = vec![DataType::InetProto, DataType::InetService];
        if by_address {
            key.insert(0, addr);
        }
        table.add_set(Set::new(chain, key).with_comment(format!("destinations going to {chain}")));
    }
    for balancer in Balancer::ALL {
        let dispatch = L4Proto::ALL.map(|proto| {
            Rule::new(vec![
                Stmt::eq(Expr::MetaL4proto, Rhs::Proto(proto)),
                Stmt::goto(balancer.proto_chain(proto)),
            ])
        });
        table.add_chain(Chain::regular(balancer.chain(), dispatch.to_vec()));
        for proto in L4Proto::ALL {
            table.add_chain(Chain::regular(balancer.proto_chain(proto), Vec::new()));
        }
    }
    for node_port in [false, true] {
        for local in [false, true] {
            let cluster = Balancer::of(node_port, false).chain();
            let local_chain = Balancer::of(node_port, true).chain();
            table.add_chain(Chain::regular(
                external_chain(node_port, local),
                external_rules(state, local, cluster, Some(local_chain)),
            ));
        }
    }
}
