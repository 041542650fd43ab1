//! Per-service-port chains and map elements: ClusterIP, NodePort, externalIPs and load
//! balancer IPs, traffic policies, affinity, source ranges and no-endpoint verdicts.
//!
//! Invariant: a chain is only referenced (by an element or a rule) when it is written in
//! the same table, and the decisions follow kube-proxy's element table exactly
//! (`kube-proxy-nftables.md` §1.7).
//!
//! Load balancing is a cascade rather than upstream's per-service `numgen` map: rule k
//! of N matches with probability 1/(N−k), so each endpoint gets exactly 1/N of new
//! connections, and the table holds no anonymous sets, which the kernel binds at a cost
//! that grows with the size of the transaction.

use nftproxy_model::{Endpoint, ProxyState, ServicePortState};
use nftproxy_nft::{Chain, Element, Expr, FibInput, Rhs, Rule, Set, Stmt, Value, Verdict};

use crate::fragment::Fragment;
use crate::skeleton::{
    CLUSTER_IPS, FIREWALL_IPS, HAIRPIN_CONNECTIONS, NO_ENDPOINT_NODEPORTS, NO_ENDPOINT_SERVICES,
    REJECT_CHAIN, SERVICE_IPS, SERVICE_NODEPORTS, local_traffic_match, mark_for_masquerade,
};
use crate::{address_key, comment, family, l4proto, names};

pub(crate) fn add_service_port(fragment: &mut Fragment, state: &ProxyState, sp: &ServicePortState) {
    let name = &sp.name;
    let proto = l4proto(name.protocol);
    let cluster_chain = names::service_chain(name);
    let local_chain = names::local_chain(name);
    let external_chain = names::external_chain(name);
    let endpoints = &sp.endpoints;

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
    let no_endpoint_element = |key: Vec<Value>| {
        Element::verdict(key, no_endpoints.clone()).with_comment(comment(name.to_string()))
    };

    // ClusterIP.
    fragment.add_element(CLUSTER_IPS, Element::key(vec![Value::Addr(sp.cluster_ip)]));
    let cluster_key = address_key(sp.cluster_ip, name.protocol, sp.port);
    let internal_chain = if sp.internal_policy_local {
        uses_local_chain.then_some(&local_chain)
    } else {
        uses_cluster_chain.then_some(&cluster_chain)
    };
    match internal_chain {
        Some(chain) if sp.has_internal_endpoints() => {
            fragment.add_element(
                SERVICE_IPS,
                Element::verdict(cluster_key, Verdict::Goto(chain.clone())),
            );
        }
        _ => {
            fragment.add_element(NO_ENDPOINT_SERVICES, no_endpoint_element(cluster_key));
        }
    }

    // externalIPs, load balancer IPs and the NodePort enter through the external chain.
    // With Local policy and only remote endpoints the destination also gets a drop
    // element: pod and host traffic is short-circuited by the external chain, everything
    // else falls through it and is dropped after DNAT.
    let mut add_external = |map: &'static str, no_endpoint_map: &'static str, key: Vec<Value>| {
        if uses_external_chain {
            fragment.add_element(
                map,
                Element::verdict(key.clone(), Verdict::Goto(external_chain.clone())),
            );
        }
        if !uses_external_chain || !sp.has_external_endpoints() {
            fragment.add_element(no_endpoint_map, no_endpoint_element(key));
        }
    };
    for ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
        add_external(
            SERVICE_IPS,
            NO_ENDPOINT_SERVICES,
            address_key(*ip, name.protocol, sp.port),
        );
    }
    if let Some(node_port) = sp.node_port {
        add_external(
            SERVICE_NODEPORTS,
            NO_ENDPOINT_NODEPORTS,
            vec![Value::Proto(proto), Value::Port(node_port)],
        );
    }

    // loadBalancerSourceRanges guard the load balancer IPs only.
    if !sp.load_balancer_ips.is_empty() && !sp.load_balancer_source_ranges.is_empty() {
        let firewall_chain = names::firewall_chain(name);
        for ip in &sp.load_balancer_ips {
            fragment.add_element(
                FIREWALL_IPS,
                Element::verdict(
                    address_key(*ip, name.protocol, sp.port),
                    Verdict::Goto(firewall_chain.clone()),
                ),
            );
        }
        fragment.add_chain(Chain::regular(firewall_chain, firewall_rules(state, sp)));
    }

    if uses_cluster_chain {
        fragment.add_chain(Chain::regular(
            cluster_chain.clone(),
            endpoint_rules(state, sp, &endpoints.cluster),
        ));
    }
    if uses_local_chain {
        fragment.add_chain(Chain::regular(
            local_chain.clone(),
            endpoint_rules(state, sp, &endpoints.local),
        ));
    }
    if uses_external_chain {
        let local = uses_local_chain.then_some(local_chain.as_str());
        fragment.add_chain(Chain::regular(
            external_chain,
            external_rules(state, sp, &cluster_chain, local),
        ));
    }

    for endpoint in &endpoints.all_reachable {
        fragment.add_element(
            HAIRPIN_CONNECTIONS,
            Element::key(vec![
                Value::Addr(endpoint.ip),
                Value::Addr(endpoint.ip),
                Value::Proto(proto),
                Value::Port(endpoint.port),
            ]),
        );
        if let Some(timeout) = sp.affinity_timeout {
            let set = names::affinity_set(name, endpoint);
            fragment.add_set(Set {
                dynamic: true,
                timeout: Some(timeout),
                // No `size`: the kernel sizes the hash table for it up front (a 65,535
                // hint zeroes about a megabyte per set, which made 250 affinity sets cost
                // 0.6 s of a cold load); upstream states none either.
                size: None,
                ..Set::new(set.clone(), vec![family(state).addr_type()])
            });
            fragment.add_chain(Chain::regular(
                names::endpoint_chain(name, endpoint),
                vec![
                    Rule::new(vec![Stmt::Update {
                        set,
                        key: Expr::saddr(family(state)),
                    }]),
                    Rule::new(dnat(sp, endpoint)),
                ],
            ));
        }
    }
}

fn dnat(sp: &ServicePortState, endpoint: &Endpoint) -> Vec<Stmt> {
    vec![
        Stmt::eq(Expr::MetaL4proto, Rhs::Proto(l4proto(sp.name.protocol))),
        Stmt::Dnat {
            addr: endpoint.ip,
            port: endpoint.port,
        },
    ]
}

/// The rules of a service or local chain: affinity lookups first, then the
/// equal-probability cascade over `endpoints` (DNAT directly, or into endpoint chains
/// when affinity needs them).
fn endpoint_rules(state: &ProxyState, sp: &ServicePortState, endpoints: &[Endpoint]) -> Vec<Rule> {
    let affinity = sp.affinity_timeout.is_some();
    let mut rules = Vec::with_capacity(endpoints.len() * if affinity { 2 } else { 1 });
    if affinity {
        for endpoint in endpoints {
            rules.push(Rule::new(vec![
                Stmt::lookup(
                    Expr::saddr(family(state)),
                    names::affinity_set(&sp.name, endpoint),
                ),
                Stmt::goto(names::endpoint_chain(&sp.name, endpoint)),
            ]));
        }
    }
    let count = endpoints.len();
    for (index, endpoint) in endpoints.iter().enumerate() {
        let mut stmts = Vec::with_capacity(4);
        let remaining = count - index;
        if remaining > 1 {
            let modulus = u32::try_from(remaining).unwrap_or(u32::MAX);
            stmts.push(Stmt::eq(Expr::NumgenRandom(modulus), Rhs::Number(0)));
        }
        if affinity {
            stmts.push(Stmt::goto(names::endpoint_chain(&sp.name, endpoint)));
        } else {
            stmts.extend(dnat(sp, endpoint));
        }
        rules.push(Rule::new(stmts));
    }
    rules
}

/// The entry chain for external traffic: masquerade and use Cluster endpoints, or with
/// Local policy keep the client address and use local endpoints, except for pod and
/// host traffic, which is short-circuited to the Cluster endpoints.
fn external_rules(
    state: &ProxyState,
    sp: &ServicePortState,
    cluster: &str,
    local: Option<&str>,
) -> Vec<Rule> {
    if !sp.external_policy_local {
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
    rules.push(
        Rule::new(vec![Stmt::Verdict(Verdict::Drop)])
            .with_comment(comment(format!("{} loadBalancerSourceRanges", sp.name))),
    );
    rules
}
