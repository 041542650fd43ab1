//! The static part of a table: base chains, their jumps, dispatch and check chains,
//! masquerading, and the (initially empty) sets and maps.
//!
//! Invariant: nothing here depends on which Services exist, only on node-level settings;
//! this is the only place base chain names, hooks and priorities appear.

use nftproxy_model::{NodePortAddresses, ProxyState};
use nftproxy_nft::{
    BaseChain, Chain, ChainType, DataType, Element, Expr, FibInput, Hook, MarkOp, Priority, Rhs,
    Rule, Set, Stmt, Table, Value, Verdict,
};

use crate::family;
use crate::stmts::{counter, local_traffic_match, mark_for_masquerade};

pub(crate) const SERVICES: &str = "services";
pub(crate) const NODEPORTS: &str = "nodeports";
pub(crate) const MASQUERADING: &str = "masquerading";
pub(crate) const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
pub(crate) const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
pub(crate) const FIREWALL_CHECK: &str = "firewall-check";
pub(crate) const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
pub(crate) const REJECT_CHAIN: &str = "reject-chain";

pub(crate) const CLUSTER_IPS: &str = "cluster-ips";
const MASQUERADE_CLUSTER_IPS: &str = "masquerade-cluster-ips";

/// The set of ClusterIPs the masquerade rule of `services` looks up: `cluster-ips`, or,
/// when that set counts connections to ports its addresses do not define, a set of its
/// own (a lookup in `cluster-ips` would count every connection to a ClusterIP); `None`
/// when `services` marks no ClusterIP traffic.
pub(crate) fn masquerade_cluster_ips(state: &ProxyState) -> Option<&'static str> {
    if !state.masquerade_all && local_traffic_match(state, false).is_none() {
        None
    } else if state.service_counters {
        Some(MASQUERADE_CLUSTER_IPS)
    } else {
        Some(CLUSTER_IPS)
    }
}
pub(crate) const NODEPORT_IPS: &str = "nodeport-ips";
pub(crate) const SERVICE_IPS: &str = "service-ips";
pub(crate) const SERVICE_NODEPORTS: &str = "service-nodeports";
pub(crate) const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub(crate) const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub(crate) const FIREWALL_IPS: &str = "firewall-ips";

/// The comment of the rules that drop traffic to addresses of a Service CIDR no Service
/// holds (their counters count it).
pub(crate) const UNALLOCATED_COMMENT: &str = "Drop traffic to unallocated ClusterIPs";

fn base(name: &str, chain_type: ChainType, hook: Hook, priority: i32, rules: Vec<Rule>) -> Chain {
    Chain::base(
        name,
        BaseChain {
            chain_type,
            hook,
            priority: Priority(priority),
        },
        rules,
    )
}

fn new_then(chain: &str) -> Rule {
    Rule::new(vec![Stmt::ct_state_new(), Stmt::jump(chain)])
}

fn jump(chain: &str) -> Rule {
    Rule::new(vec![Stmt::jump(chain)])
}

/// `daddr . meta l4proto . th dport` (or without the address).
fn port_key(state: &ProxyState, with_address: bool) -> Expr {
    let mut parts = Vec::with_capacity(3);
    if with_address {
        parts.push(Expr::daddr(family(state)));
    }
    parts.push(Expr::MetaL4proto);
    parts.push(Expr::th_dport());
    Expr::Concat(parts)
}

fn vmap(key: Expr, map: &str) -> Stmt {
    Stmt::Vmap {
        key,
        map: map.to_owned(),
    }
}

pub(crate) fn table(state: &ProxyState) -> Table {
    let family = family(state);
    let addr = family.addr_type();
    let daddr = || Expr::daddr(family);
    let not_loopback = || Stmt::neq(daddr(), Rhs::Prefix(family.loopback()));
    let mark = state.masquerade_mark;
    let mut table = Table::new(family, crate::TABLE_NAME);
    table.comment = Some("rules for nftproxy".to_owned());

    let dstnat = Priority::DSTNAT.0;
    let pre_dnat = dstnat - 10;
    // One before `dstnat`, where kube-proxy (its nftables table, and iptables-nft's
    // `nat` chains) and every other DNAT user registers: the kernel runs a hook's nat
    // chains by priority, and the first that maps a new connection decides it, the later
    // ones being skipped. So while kube-proxy's rules are still on the node, nftproxy's
    // decide every new connection to a Service, whichever of the two registered last.
    let service_dnat = dstnat - 1;
    for chain in [
        base(
            "filter-prerouting-pre-dnat",
            ChainType::Filter,
            Hook::Prerouting,
            pre_dnat,
            vec![new_then(FIREWALL_CHECK)],
        ),
        base(
            "filter-output-pre-dnat",
            ChainType::Filter,
            Hook::Output,
            pre_dnat,
            vec![new_then(FIREWALL_CHECK)],
        ),
        base(
            "filter-input",
            ChainType::Filter,
            Hook::Input,
            Priority::FILTER.0,
            vec![
                new_then(NODEPORT_ENDPOINTS_CHECK),
                new_then(SERVICE_ENDPOINTS_CHECK),
            ],
        ),
        base(
            "filter-forward",
            ChainType::Filter,
            Hook::Forward,
            Priority::FILTER.0,
            vec![
                new_then(SERVICE_ENDPOINTS_CHECK),
                new_then(CLUSTER_IPS_CHECK),
            ],
        ),
        base(
            "filter-output",
            ChainType::Filter,
            Hook::Output,
            Priority::FILTER.0,
            vec![
                new_then(SERVICE_ENDPOINTS_CHECK),
                new_then(CLUSTER_IPS_CHECK),
            ],
        ),
        base(
            "nat-prerouting",
            ChainType::Nat,
            Hook::Prerouting,
            service_dnat,
            vec![jump(SERVICES)],
        ),
        base(
            "nat-output",
            ChainType::Nat,
            Hook::Output,
            service_dnat,
            vec![jump(SERVICES)],
        ),
        base(
            "nat-postrouting",
            ChainType::Nat,
            Hook::Postrouting,
            Priority::SRCNAT.0,
            vec![jump(MASQUERADING)],
        ),
    ] {
        table.add_chain(chain);
    }

    // services: mark ClusterIP traffic that must be masqueraded, then dispatch.
    let mut services = Vec::new();
    let cluster_ip = Stmt::lookup(
        daddr(),
        masquerade_cluster_ips(state).unwrap_or(CLUSTER_IPS),
    );
    if state.masquerade_all {
        services.push(
            Rule::new(vec![cluster_ip, mark_for_masquerade(state)])
                .with_comment("masquerade all clusterIP traffic"),
        );
    } else if let Some(not_local) = local_traffic_match(state, false) {
        services.push(
            Rule::new(vec![cluster_ip, not_local, mark_for_masquerade(state)])
                .with_comment("masquerade clusterIP traffic from outside cluster"),
        );
    }
    services.extend(crate::balance::entry_rules(&port_key(state, true), true));
    services.push(Rule::new(vec![vmap(port_key(state, true), SERVICE_IPS)]));
    let (nodeport_dispatch, nodeport_check) = match &state.node_port_addresses {
        NodePortAddresses::Addresses(_) => (
            vec![Stmt::lookup(daddr(), NODEPORT_IPS), Stmt::goto(NODEPORTS)],
            vec![
                Stmt::lookup(daddr(), NODEPORT_IPS),
                vmap(port_key(state, false), NO_ENDPOINT_NODEPORTS),
            ],
        ),
        NodePortAddresses::All => (
            vec![
                Stmt::eq(Expr::FibType(FibInput::Daddr), Rhs::FibLocal),
                not_loopback(),
                Stmt::goto(NODEPORTS),
            ],
            vec![
                not_loopback(),
                vmap(port_key(state, false), NO_ENDPOINT_NODEPORTS),
            ],
        ),
    };
    services.push(Rule::new(nodeport_dispatch));
    table.add_chain(Chain::regular(SERVICES, services));
    let mut nodeports = crate::balance::entry_rules(&port_key(state, false), false);
    nodeports.push(Rule::new(vec![vmap(
        port_key(state, false),
        SERVICE_NODEPORTS,
    )]));
    table.add_chain(Chain::regular(NODEPORTS, nodeports));

    table.add_chain(Chain::regular(
        MASQUERADING,
        vec![
            Rule::new(vec![
                Stmt::neq(Expr::MetaMarkAnd(mark), Rhs::Mark(0)),
                Stmt::SetMark(MarkOp::Xor(mark)),
                Stmt::MasqueradeFullyRandom,
            ]),
            crate::hairpin::dispatch(family),
        ],
    ));
    table.add_chain(Chain::regular(
        SERVICE_ENDPOINTS_CHECK,
        vec![Rule::new(vec![vmap(
            port_key(state, true),
            NO_ENDPOINT_SERVICES,
        )])],
    ));
    table.add_chain(Chain::regular(
        NODEPORT_ENDPOINTS_CHECK,
        vec![Rule::new(nodeport_check)],
    ));
    table.add_chain(Chain::regular(
        FIREWALL_CHECK,
        vec![Rule::new(vec![vmap(port_key(state, true), FIREWALL_IPS)])],
    ));
    let mut cluster_ips_check = vec![
        Rule::new(vec![Stmt::lookup(daddr(), CLUSTER_IPS), Stmt::Reject])
            .with_comment("Reject traffic to invalid ports of ClusterIPs"),
    ];
    for cidr in &state.service_cidrs {
        let mut stmts = vec![Stmt::eq(daddr(), Rhs::Prefix(*cidr))];
        stmts.extend(counter(state));
        stmts.push(Stmt::Verdict(Verdict::Drop));
        cluster_ips_check.push(Rule::new(stmts).with_comment(UNALLOCATED_COMMENT));
    }
    table.add_chain(Chain::regular(CLUSTER_IPS_CHECK, cluster_ips_check));
    table.add_chain(Chain::regular(
        REJECT_CHAIN,
        vec![
            Rule::new(vec![Stmt::Reject])
                .with_comment("helper for @no-endpoint-services / @no-endpoint-nodeports"),
        ],
    ));

    let address_key = vec![addr, DataType::InetProto, DataType::InetService];
    let port_key_type = vec![DataType::InetProto, DataType::InetService];
    let counted = state.service_counters;
    table.add_set(
        Set::new(CLUSTER_IPS, vec![addr])
            .with_comment("Active ClusterIPs")
            .with_counter(counted),
    );
    if masquerade_cluster_ips(state) == Some(MASQUERADE_CLUSTER_IPS) {
        table.add_set(
            Set::new(MASQUERADE_CLUSTER_IPS, vec![addr])
                .with_comment("ClusterIPs, for the masquerade rule"),
        );
    }
    if let NodePortAddresses::Addresses(addresses) = &state.node_port_addresses {
        table.add_set(
            Set::new(NODEPORT_IPS, vec![addr]).with_comment("IPs that accept NodePort traffic"),
        );
        for ip in addresses {
            table.add_element(NODEPORT_IPS, Element::new(vec![Value::Addr(*ip)]));
        }
    }
    table.add_set(
        Set::verdict_map(SERVICE_IPS, address_key.clone())
            .with_comment("ClusterIP, ExternalIP and LoadBalancer IP traffic"),
    );
    table.add_set(
        Set::verdict_map(SERVICE_NODEPORTS, port_key_type.clone()).with_comment("NodePort traffic"),
    );
    table.add_set(
        Set::verdict_map(NO_ENDPOINT_SERVICES, address_key.clone())
            .with_comment("vmap to drop or reject packets to services with no endpoints")
            .with_counter(counted),
    );
    table.add_set(
        Set::verdict_map(NO_ENDPOINT_NODEPORTS, port_key_type)
            .with_comment("vmap to drop or reject packets to service nodeports with no endpoints")
            .with_counter(counted),
    );
    table.add_set(
        Set::verdict_map(FIREWALL_IPS, address_key)
            .with_comment("destinations that are subject to LoadBalancerSourceRanges"),
    );
    table.add_set(crate::hairpin::shards_map(family));
    crate::balance::add_shared(&mut table, state);
    table
}
