//! Hairpin connections (an endpoint reaching itself through its own Service) are
//! masqueraded, so that the reply comes back through the node. The endpoints that can
//! do so are elements `ADDR . ADDR . PROTO . PORT` of sixteen shard sets, picked by the
//! last bits of the endpoint's address: the kernel walks a set from its start again for
//! every message of a dump, so reading one set of every endpoint back costs time
//! quadratic in the cluster's endpoints (1.2 s of a restart at 264,000).
//!
//! Invariant: a shard's set, its chain and its element in `hairpin-shards` exist exactly
//! while at least one of its elements is rendered.

use std::net::IpAddr;
use std::sync::LazyLock;

use nftproxy_nft::{
    Chain, CtStatus, DataType, Element, Expr, Family, L4Proto, PayloadField, Rhs, Rule, Scope, Set,
    Stmt, Table, Value, Verdict,
};

use crate::balance::{SHARD_BITS, shard_address};

/// The verdict map from the endpoint address's last bits to a shard's chain.
pub(crate) const HAIRPIN_SHARDS: &str = "hairpin-shards";

/// Each shard's set and chain names, made once: every endpoint rendered names its set.
static NAMES: LazyLock<Vec<(String, String)>> = LazyLock::new(|| {
    (0..=SHARD_BITS)
        .map(|bits| {
            (
                format!("hairpin-connections-{bits}"),
                format!("hairpin-{bits}"),
            )
        })
        .collect()
});

/// The shard of an endpoint address: the last byte's [`SHARD_BITS`].
pub(crate) fn shard(ip: IpAddr) -> u8 {
    let last = match ip {
        IpAddr::V4(ip) => ip.octets()[3],
        IpAddr::V6(ip) => ip.octets()[15],
    };
    last & SHARD_BITS
}

/// The set of shard `bits`.
pub(crate) fn set(bits: u8) -> &'static str {
    &NAMES[usize::from(bits & SHARD_BITS)].0
}

fn chain(bits: u8) -> &'static str {
    &NAMES[usize::from(bits & SHARD_BITS)].1
}

/// An endpoint's element: the connections it makes to itself on its port.
pub(crate) fn element(ip: IpAddr, proto: L4Proto, port: u16) -> Element {
    Element::new(vec![
        Value::Addr(ip),
        Value::Addr(ip),
        Value::Proto(proto),
        Value::Port(port),
    ])
}

/// `ct status dnat ip daddr & 0.0.0.15 vmap @hairpin-shards`, in the masquerading chain.
pub(crate) fn dispatch(family: Family) -> Rule {
    Rule::new(vec![
        Stmt::eq(Expr::CtStatus, Rhs::CtStatus(CtStatus::Dnat)),
        Stmt::Vmap {
            key: Expr::PayloadAnd(PayloadField::Daddr(family), SHARD_BITS),
            map: HAIRPIN_SHARDS.to_owned(),
        },
    ])
}

/// The (at first empty) verdict map [`dispatch`] reads.
pub(crate) fn shards_map(family: Family) -> Set {
    Set::verdict_map(HAIRPIN_SHARDS, vec![family.addr_type()])
        .with_comment("hairpin chains by the last four bits of the endpoint address")
}

/// Creates (`used`) or removes shard `bits`'s set, chain and verdict-map element,
/// naming them in `scope` when given.
pub(crate) fn keep(table: &mut Table, bits: u8, used: bool, scope: Option<&mut Scope>) {
    let family = table.family;
    let (set_name, chain_name) = (set(bits), chain(bits));
    let key = vec![shard_address(family, bits)];
    if used {
        let addr = family.addr_type();
        table.add_set(
            Set::new(
                set_name,
                vec![addr, addr, DataType::InetProto, DataType::InetService],
            )
            .with_comment(format!(
                "service hairpin connections, endpoint addresses ending in {bits:#x}"
            )),
        );
        table.add_chain(Chain::regular(
            chain_name,
            vec![Rule::new(vec![
                Stmt::lookup(
                    Expr::Concat(vec![
                        Expr::saddr(family),
                        Expr::daddr(family),
                        Expr::MetaL4proto,
                        Expr::th_dport(),
                    ]),
                    set_name,
                ),
                Stmt::MasqueradeFullyRandom,
            ])],
        ));
        table.add_element(
            HAIRPIN_SHARDS,
            Element::with_verdict(key.clone(), Verdict::Goto(chain_name.to_owned())),
        );
    } else {
        table.sets.remove(set_name);
        table.chains.remove(chain_name);
        if let Some(map) = table.sets.get_mut(HAIRPIN_SHARDS) {
            map.elements.remove(&key);
        }
    }
    if let Some(scope) = scope {
        scope.sets.insert(set_name.to_owned());
        scope.chains.insert(chain_name.to_owned());
        scope
            .elements
            .entry(HAIRPIN_SHARDS.to_owned())
            .or_default()
            .insert(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_follow_the_last_bits_of_the_endpoint_address() {
        assert_eq!(shard("10.244.1.17".parse().unwrap()), 1);
        assert_eq!(shard("10.244.1.32".parse().unwrap()), 0);
        assert_eq!(shard("fd00::2f".parse().unwrap()), 15);
        assert_eq!(set(15), "hairpin-connections-15");
    }

    #[test]
    fn a_shard_comes_and_goes_whole() {
        let mut table = Table::new(Family::Ip, "t");
        table.add_set(shards_map(Family::Ip));
        let empty = table.clone();
        let mut scope = Scope::default();
        keep(&mut table, 3, true, Some(&mut scope));
        assert!(table.sets.contains_key("hairpin-connections-3"));
        assert!(table.chains.contains_key("hairpin-3"));
        assert_eq!(table.sets[HAIRPIN_SHARDS].elements.len(), 1);
        assert!(scope.chains.contains("hairpin-3"));
        keep(&mut table, 3, false, None);
        assert_eq!(table, empty);
    }
}
