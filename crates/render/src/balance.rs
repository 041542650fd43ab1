//! Load balancing by map elements: a destination's endpoints are elements of a map keyed
//! by the destination and an index, and one rule per endpoint count in use draws the
//! index with `numgen random mod COUNT`; destinations enter the balancers through sets
//! named after them, and each balancer sends a packet on by its protocol and the last
//! bits of its destination address (or NodePort) to one of sixteen shards.
//!
//! Invariant: a shard (a balancer's destinations of one protocol whose address or
//! NodePort ends in the same four bits) has a chain and a map while a destination uses
//! it, and its chain holds one rule for every endpoint count its destinations have,
//! largest count first. A rule's draw that names no endpoint of the destination (its
//! count is smaller) finds no map element, so the rule does not match and the next,
//! smaller count draws again; the first draw that names an endpoint picks each endpoint
//! of the destination with the same probability, and the rule of the destination's own
//! count always names one. So the split is equal, and no set says which destination
//! has which count: adding or removing an endpoint changes the destination's map
//! elements only, unless its old count falls out of use or its new count comes into use
//! in its shard, and then one rule goes or comes. (The kernel revalidates the table for
//! every rule it adds, and walks the whole map the rule reads: sharding divides that
//! walk by sixteen. It does neither for map elements, nor for a rule deleted.) The rules
//! are a pure function of the counts in use, so the output stays deterministic. Indices
//! are given in endpoint order; the maps are slot maps
//! ([`nftproxy_nft::Set::is_slot_map`]), so the diff may keep the kernel's endpoints in
//! another order that means the same.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use nftproxy_model::{Endpoint, ProxyState};
use nftproxy_nft::{
    Chain, DataType, Element, Expr, Family, FibInput, L4Proto, PayloadField, Rhs, Rule, Scope, Set,
    Stmt, Table, Value, Verdict,
};

use crate::stmts::{local_traffic_match, mark_for_masquerade};

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

    /// The chain destinations enter by: it sends each to its shard's chain.
    pub(crate) fn chain(self) -> &'static str {
        match self {
            Balancer::Cluster => "load-balance",
            Balancer::Local => "load-balance-local",
            Balancer::NodePort => "load-balance-nodeport",
            Balancer::NodePortLocal => "load-balance-nodeport-local",
        }
    }

    /// The verdict map from protocol and shard bits to a shard's chain.
    fn shards(self) -> &'static str {
        match self {
            Balancer::Cluster => "load-balance-shards",
            Balancer::Local => "load-balance-local-shards",
            Balancer::NodePort => "load-balance-nodeport-shards",
            Balancer::NodePortLocal => "load-balance-nodeport-local-shards",
        }
    }

    /// The start of the names of its maps in one protocol. (One map per protocol: nft
    /// 1.0.6 refuses to add a rule using a map already in the kernel whose value is
    /// declared with `th dport`, and takes `udp dport` only in UDP rules.)
    fn map(self, proto: L4Proto) -> String {
        let infix = match self {
            Balancer::Cluster => "",
            Balancer::Local => "-local",
            Balancer::NodePort => "-nodeport",
            Balancer::NodePortLocal => "-nodeport-local",
        };
        format!("{}{infix}-endpoints", proto.name())
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

    /// What picks a destination's shard: its address, or its NodePort.
    fn sharded_field(self, family: Family) -> PayloadField {
        if self.by_node_port() {
            PayloadField::ThDport
        } else {
            PayloadField::Daddr(family)
        }
    }

    /// `meta l4proto . FIELD & 15 vmap @SHARDS`
    fn dispatch(self, family: Family) -> Rule {
        let key = Expr::Concat(vec![
            Expr::MetaL4proto,
            Expr::PayloadAnd(self.sharded_field(family), SHARD_BITS),
        ]);
        Rule::new(vec![Stmt::Vmap {
            key,
            map: self.shards().to_owned(),
        }])
    }

    fn what(self) -> &'static str {
        match self {
            Balancer::Cluster => "Cluster endpoints by destination",
            Balancer::Local => "node-local endpoints by destination",
            Balancer::NodePort => "Cluster endpoints by NodePort",
            Balancer::NodePortLocal => "node-local endpoints by NodePort",
        }
    }
}

/// The bits of the last byte of a destination's address (or NodePort) that pick its
/// shard: sixteen shards, so that ClusterIPs and NodePorts, allocated at random, spread
/// evenly.
pub const SHARD_BITS: u8 = 0x0f;

/// The address of `family` that is all zeros but for its last byte, `bits`: what
/// `ADDR & SHARD_BITS` reads for an address in shard `bits`, so a shard's key in a
/// verdict map.
pub(crate) fn shard_address(family: Family, bits: u8) -> Value {
    match family {
        Family::Ip6 => Value::Addr(Ipv6Addr::from(u128::from(bits)).into()),
        _ => Value::Addr(Ipv4Addr::from(u32::from(bits)).into()),
    }
}

/// The destinations of one balancer and protocol whose address (or NodePort) ends in
/// the same bits: they share a chain and a map, and a rule added for one of them makes
/// the kernel walk that map only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Shard {
    balancer: Balancer,
    proto: L4Proto,
    /// The last byte of the address (or NodePort) `& SHARD_BITS`.
    bits: u8,
}

/// Every shard's chain and map names, made once: elements name their map for every
/// endpoint rendered.
static SHARD_NAMES: LazyLock<BTreeMap<Shard, (String, String)>> = LazyLock::new(|| {
    let mut names = BTreeMap::new();
    for balancer in Balancer::ALL {
        for proto in L4Proto::ALL {
            for bits in 0..=SHARD_BITS {
                let chain = format!("{}-{}-{bits}", balancer.chain(), proto.name());
                let map = format!("{}-{bits}", balancer.map(proto));
                names.insert(
                    Shard {
                        balancer,
                        proto,
                        bits,
                    },
                    (chain, map),
                );
            }
        }
    }
    names
});

impl Shard {
    fn names(self) -> &'static (String, String) {
        SHARD_NAMES
            .get(&self)
            .expect("every shard is named: its bits are masked with SHARD_BITS")
    }

    /// The chain that draws an endpoint for the shard's destinations.
    pub(crate) fn chain(self) -> &'static str {
        &self.names().0
    }

    /// The map from destination and index to endpoint.
    fn map(self) -> &'static str {
        &self.names().1
    }

    /// The shard's key in its balancer's verdict map: protocol and bits.
    fn key(self, family: Family) -> Vec<Value> {
        let bits = if self.balancer.by_node_port() {
            Value::Port(u16::from(self.bits))
        } else {
            shard_address(family, self.bits)
        };
        vec![Value::Proto(self.proto), bits]
    }

    fn map_declaration(self, family: Family, counted: bool) -> Set {
        let Shard {
            balancer, proto, ..
        } = self;
        let port = PayloadField::Dport(proto);
        let mut key = balancer.destination(family, port);
        key.push(Expr::NumgenRandom(1));
        Set::typeof_map(
            self.map(),
            key,
            vec![Expr::daddr(family), Expr::Payload(port)],
        )
        .expect("addresses, ports and numgen results all have data types")
        .with_comment(format!(
            "{} {} ending in {:#x}, and index",
            proto.name(),
            balancer.what(),
            self.bits
        ))
        .with_counter(counted)
    }

    /// `meta l4proto PROTO dnat to DESTINATION . numgen random mod COUNT map @MAP`: an
    /// endpoint of a destination with `count` endpoints or more, or no match for one
    /// whose endpoints the draw misses. (The shard's chain sees only its protocol, but
    /// nft takes a port mapping only after a protocol match in the same rule.)
    fn rule(self, family: Family, count: usize) -> Rule {
        let mut drawn = self.balancer.destination(family, PayloadField::ThDport);
        drawn.push(Expr::NumgenRandom(u32::try_from(count).unwrap_or(u32::MAX)));
        Rule::new(vec![
            Stmt::eq(Expr::MetaL4proto, Rhs::Proto(self.proto)),
            Stmt::DnatMap {
                family,
                key: Expr::Concat(drawn),
                map: self.map().to_owned(),
            },
        ])
    }
}

/// One destination's endpoints in one balancer.
#[derive(Debug)]
pub(crate) struct Destination {
    shard: Shard,
    /// `[address .] port`
    key: Vec<Value>,
    /// At least one.
    endpoints: Vec<(std::net::IpAddr, u16)>,
    /// Whether its map counts connections per element.
    counted: bool,
}

impl Destination {
    /// `key` is `[address .] port`.
    pub(crate) fn new(
        balancer: Balancer,
        proto: L4Proto,
        key: Vec<Value>,
        endpoints: &[Endpoint],
        counted: bool,
    ) -> Destination {
        let bits = match key.first().and_then(|v| v.last_byte_and(SHARD_BITS)) {
            Some(Value::Addr(IpAddr::V4(addr))) => addr.octets()[3],
            Some(Value::Addr(IpAddr::V6(addr))) => addr.octets()[15],
            Some(Value::Port(port)) => port.to_be_bytes()[1],
            _ => 0,
        };
        Destination {
            shard: Shard {
                balancer,
                proto,
                bits,
            },
            key,
            endpoints: endpoints.iter().map(|e| (e.ip, e.port)).collect(),
            counted,
        }
    }

    /// Whether its shard's map counts connections per element.
    pub(crate) fn counted(&self) -> bool {
        self.counted
    }

    /// The rule this destination needs.
    pub(crate) fn usage(&self) -> Usage {
        (self.shard, self.endpoints.len())
    }

    /// One map element per endpoint.
    pub(crate) fn elements(&self) -> impl Iterator<Item = (Cow<'static, str>, Element)> + '_ {
        let map = self.shard.map();
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

/// (shard, endpoint count): one rule.
pub(crate) type Usage = (Shard, usize);

/// How many destinations each rule serves.
pub(crate) type Usages = BTreeMap<Usage, u32>;

/// The endpoint counts `shard`'s destinations have, ascending.
fn counts(usages: &Usages, shard: Shard) -> impl DoubleEndedIterator<Item = usize> + '_ {
    usages
        .range((shard, 0)..=(shard, usize::MAX))
        .map(|((_, count), _)| *count)
}

/// Creates or removes `shard`'s map, its chain and its element in its balancer's
/// verdict map to match `usages` (after a count came into use or fell out of it),
/// naming them in `scope` when it does. The chain's rules are [`chain`]'s to write.
pub(crate) fn keep_shard(
    table: &mut Table,
    usages: &Usages,
    (shard, counted): (Shard, bool),
    scope: Option<&mut Scope>,
) {
    let used = counts(usages, shard).next().is_some();
    let map = shard.map();
    if used == table.sets.contains_key(map) {
        return;
    }
    let family = table.family;
    let key = shard.key(family);
    let shards = shard.balancer.shards();
    if used {
        table.add_set(shard.map_declaration(family, counted));
        table.add_element(
            shards,
            Element::with_verdict(key.clone(), Verdict::Goto(shard.chain().to_owned())),
        );
    } else {
        table.sets.remove(map);
        table.chains.remove(shard.chain());
        if let Some(set) = table.sets.get_mut(shards) {
            set.elements.remove(&key);
        }
    }
    if let Some(scope) = scope {
        scope.sets.insert(map.to_owned());
        scope.chains.insert(shard.chain().to_owned());
        scope
            .elements
            .entry(shards.to_owned())
            .or_default()
            .insert(key);
    }
}

/// A shard's chain: a rule for each count in use, largest first; `None` when no
/// destination uses the shard.
pub(crate) fn chain(family: Family, shard: Shard, usages: &Usages) -> Option<Chain> {
    let rules: Vec<Rule> = counts(usages, shard)
        .rev()
        .map(|count| shard.rule(family, count))
        .collect();
    (!rules.is_empty()).then(|| Chain::regular(shard.chain(), rules))
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

/// The sets of the shared entries (whose elements are destinations).
pub(crate) fn entry_sets() -> impl Iterator<Item = &'static str> {
    entries().into_iter().map(|(chain, _)| chain)
}

/// Whether `set` is the set of a shared entry.
pub(crate) fn is_entry_set(set: &str) -> bool {
    entry_sets().any(|entry| entry == set)
}

/// The protocol of the endpoints of a shard's map named `map`; `None` for any other set.
pub(crate) fn endpoint_map_protocol(map: &str) -> Option<L4Proto> {
    static PROTOCOLS: LazyLock<HashMap<&'static str, L4Proto>> = LazyLock::new(|| {
        SHARD_NAMES
            .iter()
            .map(|(shard, (_, map))| (map.as_str(), shard.proto))
            .collect()
    });
    PROTOCOLS.get(map).copied()
}

/// `KEY @CHAIN goto CHAIN` for each shared entry by address (or by NodePort).
pub(crate) fn entry_rules(key: &Expr, by_address: bool) -> Vec<Rule> {
    entries()
        .into_iter()
        .filter(|(_, address)| *address == by_address)
        .map(|(chain, _)| Rule::new(vec![Stmt::lookup(key.clone(), chain), Stmt::goto(chain)]))
        .collect()
}

/// The balancers' chains and (still empty) shard maps, the shared external entry
/// chains, and the (still empty) sets of destinations entering each.
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
        let bits = if balancer.by_node_port() {
            DataType::InetService
        } else {
            addr
        };
        table.add_set(
            Set::verdict_map(balancer.shards(), vec![DataType::InetProto, bits]).with_comment(
                format!(
                    "{} chains by protocol and the last four bits of the {}",
                    balancer.chain(),
                    if balancer.by_node_port() {
                        "NodePort"
                    } else {
                        "address"
                    }
                ),
            ),
        );
        table.add_chain(Chain::regular(
            balancer.chain(),
            vec![balancer.dispatch(table.family)],
        ));
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
