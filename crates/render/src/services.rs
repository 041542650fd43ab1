//! Per-service-port map elements and chains: ClusterIP, NodePort, externalIPs and load
//! balancer IPs, traffic policies, affinity, source ranges and no-endpoint verdicts,
//! gathered as the port's [`Fragment`] (which the renderer puts into and takes out of a
//! table).
//!
//! Invariant: a chain is only referenced (by an element or a rule) when it is written in
//! the same table, and the decisions follow the elements kube-proxy's nftables mode
//! writes for each kind of destination exactly.
//!
//! Without affinity a service port has no chains of its own: its destinations go to the
//! shared entry and load-balancing chains, and its endpoints are elements of the
//! balancers' maps (`balance`). With ClientIP affinity it keeps upstream's per-port
//! chains, whose rules DNAT to an endpoint themselves: first to the endpoint a client
//! used within the timeout, else by a cascade where rule k of N matches with
//! probability 1/(N−k), so each endpoint gets exactly 1/N of new connections. (No chain
//! per endpoint: the kernel revalidates every chain reachable from the base chains
//! whenever a transaction adds a rule, and endpoint chains, each reached twice, held
//! two thirds of the rules it walked.) Its affinity set is one per port, not per
//! endpoint: a client is kept with a tag naming its endpoint (the kernel looks sets up
//! by name in a list, so thousands of sets make every set and rule added cost
//! milliseconds).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use nftproxy_model::{Endpoint, ProxyState, ServicePortName, ServicePortState};
use nftproxy_nft::{Chain, Element, Expr, L4Proto, Rhs, Rule, Set, Stmt, Value, Verdict};

use crate::balance::{self, Balancer, Destination};
use crate::skeleton::{
    CLUSTER_IPS, FIREWALL_IPS, NO_ENDPOINT_NODEPORTS, NO_ENDPOINT_SERVICES, REJECT_CHAIN,
    SERVICE_IPS, SERVICE_NODEPORTS, masquerade_cluster_ips,
};
use crate::stmts::counter;
use crate::{address_key, comment, family, l4proto, names};

/// How the comment of a firewall chain's drop rule ends, after the Service port's name.
pub(crate) const FIREWALL_SUFFIX: &str = " loadBalancerSourceRanges";

/// What one service port adds to its family's table.
#[derive(Debug, Default)]
pub(crate) struct Fragment {
    pub(crate) sets: Vec<Set>,
    pub(crate) chains: Vec<Chain>,
    pub(crate) elements: Vec<(Cow<'static, str>, Element)>,
    pub(crate) destinations: Vec<Destination>,
    /// Hairpin elements, by shard (see [`crate::hairpin`]).
    pub(crate) hairpin: Vec<(u8, Element)>,
}

impl Fragment {
    pub(crate) fn add_set(&mut self, set: Set) {
        self.sets.push(set);
    }

    pub(crate) fn add_chain(&mut self, chain: Chain) {
        self.chains.push(chain);
    }

    /// An element of one of the skeleton's shared sets or maps.
    pub(crate) fn add_element(&mut self, set: &'static str, element: Element) {
        self.elements.push((Cow::Borrowed(set), element));
    }

    /// An endpoint that may reach itself through the Service.
    pub(crate) fn add_hairpin(&mut self, ip: IpAddr, proto: L4Proto, port: u16) {
        let element = crate::hairpin::element(ip, proto, port);
        self.hairpin.push((crate::hairpin::shard(ip), element));
    }

    /// A destination's endpoints, for the shared load-balancing chains.
    pub(crate) fn add_destination(&mut self, destination: Destination) {
        self.destinations.push(destination);
    }
}

pub(crate) fn add_service_port(fragment: &mut Fragment, state: &ProxyState, sp: &ServicePortState) {
    let name = &sp.name;
    let proto = l4proto(name.protocol);
    let endpoints = &sp.endpoints;
    let affinity = sp.affinity_timeout.is_some();

    let uses_cluster_chain = !endpoints.cluster.is_empty() && sp.uses_cluster_endpoints();
    let uses_local_chain = !endpoints.local.is_empty() && sp.uses_local_endpoints();
    let uses_external_chain = endpoints.has_any && sp.externally_accessible() && uses_cluster_chain;

    // Where traffic without usable endpoints goes: reject when there are none at all,
    // drop when a Local policy finds none on this node.
    let no_endpoints = if endpoints.has_any {
        Verdict::Drop
    } else {
        Verdict::Goto(REJECT_CHAIN.to_owned())
    };
    // Elements name their Service port: no chain name does without affinity.
    let named = |element: Element| element.with_comment(comment(name.to_string()));
    let no_endpoint_element =
        |key: Vec<Value>| named(Element::with_verdict(key, no_endpoints.clone()));
    // The shared balancers need the destination's endpoints (ports with affinity choose
    // in their own chains).
    let balance = |fragment: &mut Fragment, node_port: bool, local: bool, key: &[Value]| {
        if !affinity {
            let endpoints = if local {
                &endpoints.local
            } else {
                &endpoints.cluster
            };
            let balancer = Balancer::of(node_port, local);
            fragment.add_destination(Destination::new(
                balancer,
                proto,
                port_key(key),
                endpoints,
                state.service_counters,
            ));
        }
    };
    // Where a destination enters: with affinity a verdict-map element going to the port's
    // own chain (`own` makes its name, a hash, so only when needed); without, an element
    // of the set named after the shared chain it goes to (a set element costs the kernel
    // no revalidation of the table, a goto element does).
    let dispatch = |fragment: &mut Fragment,
                    node_port: bool,
                    key: Vec<Value>,
                    own: fn(&ServicePortName) -> String,
                    shared: &'static str| {
        if affinity {
            let map = if node_port {
                SERVICE_NODEPORTS
            } else {
                SERVICE_IPS
            };
            let goto = Verdict::Goto(own(name));
            fragment.add_element(map, named(Element::with_verdict(key, goto)));
        } else {
            fragment.add_element(shared, named(Element::new(key)));
        }
    };

    // ClusterIP: its element in `cluster-ips` counts connections to ports it does not
    // define.
    fragment.add_element(CLUSTER_IPS, Element::new(vec![Value::Addr(sp.cluster_ip)]));
    if let Some(set) = masquerade_cluster_ips(state).filter(|set| *set != CLUSTER_IPS) {
        fragment.add_element(set, Element::new(vec![Value::Addr(sp.cluster_ip)]));
    }
    let cluster_key = address_key(sp.cluster_ip, name.protocol, sp.port);
    let internal_chain_used = if sp.internal_policy_local {
        uses_local_chain
    } else {
        uses_cluster_chain
    };
    if internal_chain_used && sp.has_internal_endpoints() {
        let local = sp.internal_policy_local;
        balance(fragment, false, local, &cluster_key);
        let own = if local {
            names::local_chain
        } else {
            names::service_chain
        };
        let shared = Balancer::of(false, local).chain();
        dispatch(fragment, false, cluster_key, own, shared);
    } else {
        fragment.add_element(NO_ENDPOINT_SERVICES, no_endpoint_element(cluster_key));
    }

    // externalIPs, load balancer IPs and the NodePort enter through an external chain.
    // With Local policy and only remote endpoints the destination also gets a drop
    // element: pod and host traffic is short-circuited by the external chain, everything
    // else falls through it and is dropped after DNAT.
    let external_local = sp.external_policy_local;
    let add_external = |fragment: &mut Fragment, node_port: bool, key: Vec<Value>| {
        let no_endpoint_map = if node_port {
            NO_ENDPOINT_NODEPORTS
        } else {
            NO_ENDPOINT_SERVICES
        };
        if uses_external_chain {
            // Pod and host traffic uses the Cluster endpoints whatever the policy.
            balance(fragment, node_port, false, &key);
            if external_local && uses_local_chain {
                balance(fragment, node_port, true, &key);
            }
            let shared = balance::external_chain(node_port, external_local);
            dispatch(
                fragment,
                node_port,
                key.clone(),
                names::external_chain,
                shared,
            );
        }
        if !uses_external_chain || !sp.has_external_endpoints() {
            fragment.add_element(no_endpoint_map, no_endpoint_element(key));
        }
    };
    for ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
        add_external(fragment, false, address_key(*ip, name.protocol, sp.port));
    }
    if let Some(node_port) = sp.node_port {
        add_external(
            fragment,
            true,
            vec![Value::Proto(proto), Value::Port(node_port)],
        );
    }

    // loadBalancerSourceRanges guard the load balancer IPs only.
    if !sp.load_balancer_ips.is_empty() && !sp.load_balancer_source_ranges.is_empty() {
        let firewall_chain = names::firewall_chain(name);
        for ip in &sp.load_balancer_ips {
            fragment.add_element(
                FIREWALL_IPS,
                Element::with_verdict(
                    address_key(*ip, name.protocol, sp.port),
                    Verdict::Goto(firewall_chain.clone()),
                ),
            );
        }
        fragment.add_chain(Chain::regular(firewall_chain, firewall_rules(state, sp)));
    }

    for endpoint in endpoints.all_reachable().iter() {
        fragment.add_hairpin(endpoint.ip, proto, endpoint.port);
    }
    if let Some(timeout) = sp.affinity_timeout {
        add_affinity_chains(
            fragment,
            state,
            sp,
            timeout,
            [uses_cluster_chain, uses_local_chain, uses_external_chain],
        );
    }
}

/// A destination's `[address .] port`, from its `[address .] protocol . port` key: the
/// balancers keep one map per protocol.
fn port_key(key: &[Value]) -> Vec<Value> {
    key.iter()
        .filter(|v| !matches!(v, Value::Proto(_)))
        .copied()
        .collect()
}

/// A port with ClientIP affinity: its Cluster, Local and external chains (those in use,
/// in that order), and its affinity set.
fn add_affinity_chains(
    fragment: &mut Fragment,
    state: &ProxyState,
    sp: &ServicePortState,
    timeout: u32,
    [cluster, local, external]: [bool; 3],
) {
    let name = &sp.name;
    let cluster_chain = names::service_chain(name);
    let local_chain = names::local_chain(name);
    let set = names::affinity_set(name);
    let reachable = sp.endpoints.all_reachable();
    let tags = affinity_tags(&reachable, names::affinity_tag);
    let affinity = Affinity {
        state,
        proto: l4proto(name.protocol),
        set: &set,
        tags: &tags,
    };
    if cluster {
        fragment.add_chain(Chain::regular(
            cluster_chain.clone(),
            affinity.rules(&sp.endpoints.cluster),
        ));
    }
    if local {
        fragment.add_chain(Chain::regular(
            local_chain.clone(),
            affinity.rules(&sp.endpoints.local),
        ));
    }
    if external {
        fragment.add_chain(Chain::regular(
            names::external_chain(name),
            balance::external_rules(
                state,
                sp.external_policy_local,
                &cluster_chain,
                local.then_some(local_chain.as_str()),
            ),
        ));
    }
    let typeof_key = vec![Expr::saddr(family(state)), Expr::NumgenRandom(1)];
    let declaration = Set::typeof_set(set.clone(), typeof_key)
        .expect("addresses and numgen results have data types");
    fragment.add_set(Set {
        dynamic: true,
        timeout: Some(timeout),
        // No `size`: the kernel sizes the hash table for it up front (a 65,535 hint
        // zeroes about a megabyte per set); upstream states none either.
        size: None,
        ..declaration.with_comment("clients, by the tag of the endpoint they last used")
    });
}

/// The tags of a port's endpoints (by [`names::affinity_tag`]). Two endpoints whose
/// tags collide are told apart by moving the later one (in address order) up to the
/// next free tag, so a tag changes only when a colliding endpoint comes or goes.
fn affinity_tags(
    endpoints: &[Endpoint],
    tag_of: impl Fn(&Endpoint) -> u32,
) -> BTreeMap<(IpAddr, u16), u32> {
    let mut taken = BTreeSet::new();
    endpoints
        .iter()
        .map(|endpoint| {
            let mut tag = tag_of(endpoint);
            while !taken.insert(tag) {
                tag = tag.wrapping_add(1);
            }
            ((endpoint.ip, endpoint.port), tag)
        })
        .collect()
}

/// What an affinity port's chains choose with: its affinity set, and its endpoints'
/// tags in it.
struct Affinity<'a> {
    state: &'a ProxyState,
    proto: L4Proto,
    set: &'a str,
    tags: &'a BTreeMap<(IpAddr, u16), u32>,
}

impl Affinity<'_> {
    /// The rules of a service or local chain for `endpoints`: one per endpoint for a
    /// client in the affinity set with its tag, then the equal-probability cascade.
    fn rules(&self, endpoints: &[Endpoint]) -> Vec<Rule> {
        let mut rules = Vec::with_capacity(endpoints.len() * 2);
        for endpoint in endpoints {
            let mut stmts = vec![Stmt::lookup(self.client_and_tag(endpoint), self.set)];
            stmts.extend(self.use_endpoint(endpoint));
            rules.push(Rule::new(stmts));
        }
        let count = endpoints.len();
        for (index, endpoint) in endpoints.iter().enumerate() {
            let mut stmts = Vec::with_capacity(5);
            let remaining = count - index;
            if remaining > 1 {
                let modulus = u32::try_from(remaining).unwrap_or(u32::MAX);
                stmts.push(Stmt::eq(Expr::NumgenRandom(modulus), Rhs::Number(0)));
            }
            stmts.extend(self.use_endpoint(endpoint));
            rules.push(Rule::new(stmts));
        }
        rules
    }

    /// `ip saddr . numgen random mod 1 offset TAG`: the client with the endpoint's tag.
    /// (`all_reachable()` holds every Cluster and Local endpoint, so every one has a
    /// tag.)
    fn client_and_tag(&self, endpoint: &Endpoint) -> Expr {
        let tag = self.tags[&(endpoint.ip, endpoint.port)];
        Expr::Concat(vec![Expr::saddr(family(self.state)), Expr::Tag(tag)])
    }

    /// Record (or refresh) the client with the endpoint's tag, count the connection,
    /// and DNAT to the endpoint.
    fn use_endpoint(&self, endpoint: &Endpoint) -> impl Iterator<Item = Stmt> {
        let update = Stmt::Update {
            set: self.set.to_owned(),
            key: self.client_and_tag(endpoint),
        };
        let dnat = [
            Stmt::eq(Expr::MetaL4proto, Rhs::Proto(self.proto)),
            Stmt::Dnat {
                addr: endpoint.ip,
                port: endpoint.port,
            },
        ];
        std::iter::once(update)
            .chain(counter(self.state))
            .chain(dnat)
    }
}

/// Accept sources inside the ranges (and the load balancer IPs themselves when a range
/// holds the node's IP, for load balancers that loop node traffic back with the VIP as
/// source); drop the rest.
fn firewall_rules(state: &ProxyState, sp: &ServicePortState) -> Vec<Rule> {
    let saddr = || Expr::saddr(family(state));
    let mut rules: Vec<Rule> = sp
        .load_balancer_source_ranges
        .iter()
        .map(|range| {
            Rule::new(vec![
                Stmt::eq(saddr(), Rhs::Prefix(*range)),
                Stmt::Verdict(Verdict::Return),
            ])
        })
        .collect();
    let node_in_range = state.node_ips.first().is_some_and(|ip| {
        sp.load_balancer_source_ranges
            .iter()
            .any(|r| r.contains(ip))
    });
    if node_in_range {
        for ip in &sp.load_balancer_ips {
            rules.push(Rule::new(vec![
                Stmt::eq(saddr(), Rhs::addr(*ip)),
                Stmt::Verdict(Verdict::Return),
            ]));
        }
    }
    let mut drop: Vec<Stmt> = counter(state).into_iter().collect();
    drop.push(Stmt::Verdict(Verdict::Drop));
    rules.push(Rule::new(drop).with_comment(comment(format!("{}{FIREWALL_SUFFIX}", sp.name))));
    rules
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::tests::endpoint;

    #[test]
    fn colliding_affinity_tags_move_up_to_the_next_free_one() {
        let endpoints = [
            endpoint("10.0.0.1"),
            endpoint("10.0.0.2"),
            endpoint("10.0.0.3"),
        ];
        let tags = affinity_tags(&endpoints, |_| u32::MAX);
        let key = |e: &Endpoint| (e.ip, e.port);
        assert_eq!(tags[&key(&endpoints[0])], u32::MAX);
        assert_eq!(tags[&key(&endpoints[1])], 0);
        assert_eq!(tags[&key(&endpoints[2])], 1);
        // Without collisions a tag is the endpoint's own, whatever else is there.
        let alone = affinity_tags(&endpoints[1..2], names::affinity_tag);
        let together = affinity_tags(&endpoints, names::affinity_tag);
        assert_eq!(alone[&key(&endpoints[1])], together[&key(&endpoints[1])]);
    }
}
