//! Statements more than one part of the layout writes: how local pod traffic is told
//! apart, the request to masquerade, and counters.
//!
//! Invariant: a leaf of the crate (it uses no other module of it but the root's helpers),
//! so the skeleton and the balancers can both use it without depending on each other.

use nftproxy_model::{LocalTraffic, ProxyState};
use nftproxy_nft::{Expr, MarkOp, Rhs, Stmt};

use crate::family;

/// The statement that matches (or, negated, excludes) traffic from local pods; `None`
/// when the state has no way to tell.
pub(crate) fn local_traffic_match(state: &ProxyState, local: bool) -> Option<Stmt> {
    let (left, right) = match &state.local_traffic {
        LocalTraffic::Unknown => return None,
        LocalTraffic::Cidr(cidr) => (Expr::saddr(family(state)), Rhs::Prefix(*cidr)),
        LocalTraffic::Interface(name) => (Expr::Iifname, Rhs::Ifname(name.clone())),
        LocalTraffic::InterfacePrefix(prefix) => (Expr::Iifname, Rhs::Ifname(format!("{prefix}*"))),
    };
    Some(if local {
        Stmt::eq(left, right)
    } else {
        Stmt::neq(left, right)
    })
}

/// `meta mark set meta mark | MARK`: ask `masquerading` to SNAT this connection.
pub(crate) fn mark_for_masquerade(state: &ProxyState) -> Stmt {
    Stmt::SetMark(MarkOp::Or(state.masquerade_mark))
}

/// `counter`, in a rule whose matches decide an outcome nftproxy reports, when the
/// state counts connections.
pub(crate) fn counter(state: &ProxyState) -> Option<Stmt> {
    state.service_counters.then_some(Stmt::Counter)
}
