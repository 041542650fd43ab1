//! Load balancing by map elements: a destination's endpoints are elements of a map (one
//! per balancer and protocol) keyed by the destination and an index, and one shared rule
//! per endpoint count in use draws the index with `numgen random mod COUNT`;
//! destinations enter the shared chains through sets named after them.
//!
//! Invariant: a balancer's chain sends each protocol to a chain of its own, which holds
//! one rule for every endpoint count a destination of that protocol has, largest count
//! first, and the protocol's map exists while a destination uses it. A rule's draw that
//! names no endpoint of the destination (its count is smaller) finds no map element, so
//! the rule does not match and the next, smaller count draws again; the first draw that
//! names an endpoint picks each endpoint of the destination with the same probability,
//! and the rule of the destination's own count always names one. So the split is equal,
//! and no set says which destination has which count: adding or removing an endpoint
//! changes the destination's map elements only, unless its old count falls out of use
//! or its new count comes into use, and then one rule goes or comes. (The kernel
//! revalidates the table, and walks the whole map, for every rule it adds, but not for
//! map elements; it does neither for a rule deleted.) The rules are a pure function of
//! the counts in use, so the output stays deterministic. Indices are given in endpoint
//! order; the maps are slot maps ([`nftproxy_nft::Set::is_slot_map`]), so the diff may
//! keep the kernel's endpoints in another order that means the same.

use std::borrow::Cow;
use std::collections::BTreeMap;

use nftproxy_model::{Endpoint, ProxyState};
use nftproxy_nft::{
    Chain, DataType, Element, Expr, Family, FibInput, L4Proto, PayloadField, Rhs, Rule, Scope, Set,
    Stmt, Table, Value,
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

    /// `[ip daddr .] PORT`: what identifies a destination of one protocol.
    fn destination(self, family: Family, port: PayloadField) -> Vec<Expr> {
        let mut parts = Vec::with_capacity(2);
        if !matches!(self, Balancer::NodePort | Balancer::NodePortLocal) {
            parts.push(Expr::daddr(family));
        }
        parts.push(Expr::Payload(port));
        parts
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

    /// `meta l4proto PROTO dnat to DESTINATION . numgen random mod COUNT map @MAP`: an
    /// endpoint of a destination with `count` endpoints or more, or no match for one
    /// whose endpoints the draw misses. (The protocol's chain sees only that protocol,
    /// but nft takes a port mapping only after a protocol match in the same rule.)
    fn rule(self, family: Family, proto: L4Proto, count: usize) -> Rule {
        let mut drawn = self.destination(family, PayloadField::ThDport);
        drawn.push(Expr::NumgenRandom(u32::try_from(count).unwrap_or(u32::MAX)));
        Rule::new(vec![
            Stmt::eq(Expr::MetaL4proto, Rhs::Proto(proto)),
            Stmt::DnatMap {
                family,
                key: Expr::Concat(drawn),
                map: self.map(proto).to_owned(),
            },
        ])
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

    /// The rule this destination needs.
    pub(crate) fn usage(&self) -> Usage {
        (self.balancer, self.proto, self.endpoints.len())
    }

    /// One map element per endpoint.
    pub(crate) fn elements(&self) -> impl Iterator<Item = (Cow<'static, str>, Element)> + '_ {
        let map = self.balancer.map(self.proto);
        (0u32..)
            .zip(&self.endpoints)
            .map(move |(index, (ip, port))| {
                let mut key = self.key.clone();
                key.push(Value::Number(index));
                (
                    Cow::Borrowed(map),
                    Element::mapped(key, vec![Value::Addr(*ip), Value::Port(*port)]),
                )
            })
    }
}

/// (balancer, protocol, endpoint count): one rule.
pub(crate) type Usage = (Balancer, L4Proto, usize);

/// How many destinations each rule serves.
pub(crate) type Usages = BTreeMap<Usage, u32>;

/// The endpoint counts `balancer`'s destinations of `proto` have, ascending.
fn counts(
    usages: &Usages,
    balancer: Balancer,
    proto: L4Proto,
) -> impl DoubleEndedIterator<Item = usize> + '_ {
    usages
        .range((balancer, proto, 0)..=(balancer, proto, usize::MAX))
        .map(|((_, _, count), _)| *count)
}

/// Creates or removes `balancer`'s map in `proto` to match `usages` (after a count came
/// into use or fell out of it), naming it in `scope` when it does.
pub(crate) fn keep_map(
    table: &mut Table,
    usages: &Usages,
    (balancer, proto): (Balancer, L4Proto),
    scope: Option<&mut Scope>,
) {
    let used = counts(usages, balancer, proto).next().is_some();
    let name = balancer.map(proto);
    if used == table.sets.contains_key(name) {
        return;
    }
    if used {
        table.add_set(balancer.map_declaration(table.family, proto));
    } else {
        table.sets.remove(name);
    }
    if let Some(scope) = scope {
        scope.sets.insert(name.to_owned());
    }
}

/// A balancer's chain for one protocol: a rule for each count in use, largest first.
pub(crate) fn chain(family: Family, balancer: Balancer, proto: L4Proto, usages: &Usages) -> Chain {
    let rules = counts(usages, balancer, proto)
        .rev()
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
