//! The reference point: the ruleset upstream kube-proxy 1.36 writes for the same
//! synthetic Services (its "squashed" shape: one `numgen … map { … }` DNAT rule per
//! Service without affinity, endpoint chains and affinity sets for ClientIP Services,
//! inline masquerade marks, the `hairpin-connections` set), as `nft -f` text.
//!
//! Invariant: written from the same [`Spec`]s as nftproxy's input, so both sides load
//! the same Services; nothing here is shared with nftproxy's own renderer except the
//! chain-name hash, which upstream defines.

use std::fmt::Write;

use nftproxy_render::hash_and_truncate;

use crate::synth::{CLUSTER_CIDR, Kind, NODE_IP, PORT, Spec, TARGET_PORT};

const MARK: &str = "0x00004000";

/// The whole `table ip kube-proxy` for `specs`.
pub fn ruleset(specs: &[Spec]) -> String {
    let mut chains = String::new();
    let mut sets = String::new();
    let mut cluster_ips = Vec::new();
    let mut hairpin = Vec::new();
    let mut service_ips = Vec::new();
    let mut node_ports = Vec::new();
    for spec in specs {
        let base = format!("{}/{}/tcp/http", spec.namespace, spec.name);
        let service_chain = format!("service-{}", hash_and_truncate(&base));
        cluster_ips.push(spec.cluster_ip.to_string());
        service_ips.push(format!(
            "{} . tcp . {PORT} : goto {service_chain}",
            spec.cluster_ip
        ));
        for ep in &spec.endpoints {
            hairpin.push(format!("{ep} . {ep} . tcp . {TARGET_PORT}"));
        }
        let mut rules = Vec::new();
        if spec.affinity {
            let mut branches = Vec::new();
            for (k, ep) in spec.endpoints.iter().enumerate() {
                let endpoint_base = format!("{base}__{ep}/{TARGET_PORT}");
                let endpoint_chain = format!("endpoint-{}", hash_and_truncate(&endpoint_base));
                let affinity_set = format!("affinity-{}", hash_and_truncate(&endpoint_base));
                let _ = writeln!(
                    sets,
                    "\tset {affinity_set} {{\n\t\ttype ipv4_addr\n\t\tflags dynamic,timeout\n\t\ttimeout 3h\n\t}}\n"
                );
                rules.push(format!("ip saddr @{affinity_set} goto {endpoint_chain}"));
                branches.push(format!("{k} : goto {endpoint_chain}"));
                write_chain(
                    &mut chains,
                    &endpoint_chain,
                    &[
                        format!("ip saddr {ep} meta mark set meta mark | {MARK}"),
                        format!("update @{affinity_set} {{ ip saddr }}"),
                        format!("meta l4proto tcp dnat to {ep}:{TARGET_PORT}"),
                    ],
                );
            }
            rules.push(format!(
                "numgen random mod {} vmap {{ {} }}",
                spec.endpoints.len(),
                branches.join(", ")
            ));
        } else if let [only] = spec.endpoints.as_slice() {
            rules.push(format!("meta l4proto tcp dnat to {only}:{TARGET_PORT}"));
        } else {
            let map: Vec<String> = spec
                .endpoints
                .iter()
                .enumerate()
                .map(|(k, ep)| format!("{k} : {ep} . {TARGET_PORT}"))
                .collect();
            rules.push(format!(
                "meta l4proto tcp dnat ip addr . port to numgen random mod {} map {{ {} }}",
                spec.endpoints.len(),
                map.join(", ")
            ));
        }
        write_chain(&mut chains, &service_chain, &rules);

        if spec.kind != Kind::ClusterIp {
            let external_chain = format!("external-{}", hash_and_truncate(&base));
            write_chain(
                &mut chains,
                &external_chain,
                &[
                    format!("meta mark set meta mark | {MARK}"),
                    format!("goto {service_chain}"),
                ],
            );
            if let Some(node_port) = spec.node_port {
                node_ports.push(format!("tcp . {node_port} : goto {external_chain}"));
            }
            if let Some(ip) = spec.load_balancer_ip {
                service_ips.push(format!("{ip} . tcp . {PORT} : goto {external_chain}"));
            }
        }
    }

    let mut text = String::from("table ip kube-proxy {\n\tcomment \"rules for kube-proxy\"\n");
    write_set(&mut text, "set cluster-ips", "ipv4_addr", &cluster_ips);
    write_set(
        &mut text,
        "map firewall-ips",
        "ipv4_addr . inet_proto . inet_service : verdict",
        &[],
    );
    write_set(
        &mut text,
        "set hairpin-connections",
        "ipv4_addr . ipv4_addr . inet_proto . inet_service",
        &hairpin,
    );
    write_set(
        &mut text,
        "map no-endpoint-nodeports",
        "inet_proto . inet_service : verdict",
        &[],
    );
    write_set(
        &mut text,
        "map no-endpoint-services",
        "ipv4_addr . inet_proto . inet_service : verdict",
        &[],
    );
    write_set(
        &mut text,
        "set nodeport-ips",
        "ipv4_addr",
        &[NODE_IP.to_string()],
    );
    write_set(
        &mut text,
        "map service-ips",
        "ipv4_addr . inet_proto . inet_service : verdict",
        &service_ips,
    );
    write_set(
        &mut text,
        "map service-nodeports",
        "inet_proto . inet_service : verdict",
        &node_ports,
    );
    text.push_str(&sets);
    for (name, hook, rules) in [
        (
            "filter-prerouting-pre-dnat",
            "type filter hook prerouting priority dstnat - 10; policy accept;",
            vec!["ct state new jump firewall-check"],
        ),
        (
            "filter-output-pre-dnat",
            "type filter hook output priority -110; policy accept;",
            vec!["ct state new jump firewall-check"],
        ),
        (
            "filter-input",
            "type filter hook input priority filter; policy accept;",
            vec![
                "ct state new jump nodeport-endpoints-check",
                "ct state new jump service-endpoints-check",
            ],
        ),
        (
            "filter-forward",
            "type filter hook forward priority filter; policy accept;",
            vec![
                "ct state new jump service-endpoints-check",
                "ct state new jump cluster-ips-check",
            ],
        ),
        (
            "filter-output",
            "type filter hook output priority filter; policy accept;",
            vec![
                "ct state new jump service-endpoints-check",
                "ct state new jump cluster-ips-check",
            ],
        ),
        (
            "nat-prerouting",
            "type nat hook prerouting priority dstnat; policy accept;",
            vec!["jump services"],
        ),
        (
            "nat-output",
            "type nat hook output priority -100; policy accept;",
            vec!["jump services"],
        ),
        (
            "nat-postrouting",
            "type nat hook postrouting priority srcnat; policy accept;",
            vec!["jump masquerading"],
        ),
    ] {
        let mut body = vec![hook.to_owned()];
        body.extend(rules.into_iter().map(str::to_owned));
        write_chain(&mut text, name, &body);
    }
    let services_rules = [
        format!(
            "ip daddr @cluster-ips ip saddr != {CLUSTER_CIDR} meta mark set meta mark | {MARK}"
        ),
        "ip daddr . meta l4proto . th dport vmap @service-ips".to_owned(),
        "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports".to_owned(),
    ];
    write_chain(&mut text, "services", &services_rules);
    for (name, rule) in [
        (
            "service-endpoints-check",
            "ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        ),
        (
            "nodeport-endpoints-check",
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
        ),
        (
            "firewall-check",
            "ip daddr . meta l4proto . th dport vmap @firewall-ips",
        ),
        ("cluster-ips-check", "ip daddr @cluster-ips reject"),
        ("reject-chain", "reject"),
    ] {
        write_chain(&mut text, name, &[rule.to_owned()]);
    }
    write_chain(
        &mut text,
        "masquerading",
        &[
            format!("meta mark & {MARK} != 0 meta mark set meta mark ^ {MARK} masquerade fully-random"),
            "ct status dnat ip saddr . ip daddr . meta l4proto . th dport @hairpin-connections masquerade fully-random".to_owned(),
        ],
    );
    text.push_str(&chains);
    text.push_str("}\n");
    text
}

fn write_chain(out: &mut String, name: &str, rules: &[String]) {
    let _ = writeln!(out, "\tchain {name} {{");
    for rule in rules {
        let _ = writeln!(out, "\t\t{rule}");
    }
    out.push_str("\t}\n\n");
}

fn write_set(out: &mut String, declaration: &str, kind: &str, elements: &[String]) {
    let _ = writeln!(out, "\t{declaration} {{\n\t\ttype {kind}");
    if !elements.is_empty() {
        let _ = writeln!(out, "\t\telements = {{ {} }}", elements.join(",\n\t\t\t"));
    }
    out.push_str("\t}\n\n");
}
