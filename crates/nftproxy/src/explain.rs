//! `nftproxy explain`: the packet tracer over the rules nftproxy would program (from
//! manifests) or has programmed (`--live`), printed for people or as JSON.
//!
//! Invariant: explain never changes the kernel; `--live` only reads nftproxy's own table.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use nftproxy_model::Build;
use nftproxy_netlink::{NetlinkBackend, netns};
use nftproxy_nft::trace::{Fate, Origin, Outcome, Packet, describe, summarise, trace};
use nftproxy_nft::{Backend, Family, Table, Value};
use nftproxy_render::{TABLE_NAME, parse_port_name};
use serde_json::json;

use crate::cli::{ExplainArgs, OutputFormat};
use crate::counters::{self, Counters};

/// The Service a per-service chain belongs to: `service-HASH-ns/name/proto/port`
/// → `ns/name:port (proto)`.
fn service_of_chain(chain: &str) -> Option<String> {
    let parsed = parse_port_name(chain)?;
    let service = format!("{}/{}", parsed.namespace, parsed.name);
    Some(if parsed.port.is_empty() {
        format!("{service} ({})", parsed.protocol)
    } else {
        format!("{service}:{} ({})", parsed.port, parsed.protocol)
    })
}

/// The Services an outcome went through: named by their chains (ports with affinity),
/// else by the comments of the elements for the packet's destination (every one names
/// its Service port), addresses before NodePorts as the rules look.
fn services(table: &Table, packet: &Packet, outcome: &Outcome) -> Vec<String> {
    let mut names: Vec<String> = outcome
        .steps
        .iter()
        .filter(|s| s.chain.contains('/'))
        .filter_map(|s| service_of_chain(&s.chain))
        .collect();
    names.dedup();
    if !names.is_empty() {
        return names;
    }
    let suffix = if outcome.dnat.is_some() {
        packet.proto.name()
    } else if outcome.fate != Fate::Accepted {
        "no usable endpoints"
    } else {
        return names;
    };
    let proto = Value::Proto(packet.proto);
    let by_address = vec![Value::Addr(packet.daddr), proto, Value::Port(packet.dport)];
    let by_port = vec![proto, Value::Port(packet.dport)];
    let comment = [by_address, by_port].iter().find_map(|key| {
        table
            .sets
            .values()
            .find_map(|set| Some(set.elements.get(key)?.comment()?.to_owned()))
    });
    names.extend(comment.map(|c| format!("{c} ({suffix})")));
    names
}

/// Runs `explain` on rendered tables (`build`) or, with `--live`, on the kernel's.
/// Returns the text to print.
pub fn run(
    explain: &ExplainArgs,
    build: Option<&Build>,
    node_ips: &[IpAddr],
) -> Result<String, String> {
    let family = Family::of(&explain.to.addr);
    let (table, mut local) = if explain.live {
        let mut backend = NetlinkBackend::reader().map_err(|e| e.to_string())?;
        let table = backend
            .list(family, TABLE_NAME)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("this network namespace has no table {family} {TABLE_NAME}"))?;
        let local =
            netns::local_addresses().map_err(|e| format!("reading local addresses: {e}"))?;
        (table, local)
    } else {
        let build = build.ok_or("explain needs --manifests PATH... or --live")?;
        let state = if family == Family::Ip {
            &build.ipv4
        } else {
            &build.ipv6
        };
        let mut local: Vec<IpAddr> = build.ipv4.node_ips.clone();
        local.extend(build.ipv6.node_ips.iter().copied());
        local.extend([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]);
        (nftproxy_render::render(state), local)
    };
    local.extend(node_ips.iter().copied());
    local.sort();
    local.dedup();

    let origin = if local.contains(&explain.from) {
        Origin::Local
    } else {
        Origin::Arriving
    };
    let packet = Packet {
        saddr: explain.from,
        daddr: explain.to.addr,
        proto: explain.to.proto,
        dport: explain.to.port,
        iifname: if origin == Origin::Local {
            String::new()
        } else {
            explain.iif.clone()
        },
    };
    let mut outcomes = trace(&table, &packet, origin, &local);
    outcomes.sort_by(|a, b| {
        b.probability
            .total_cmp(&a.probability)
            .then_with(|| a.dnat.cmp(&b.dnat))
    });
    let destination = match packet.daddr {
        IpAddr::V4(ip) => format!("{ip}:{}/{}", packet.dport, packet.proto.name()),
        IpAddr::V6(ip) => format!("[{ip}]:{}/{}", packet.dport, packet.proto.name()),
    };
    let origin_text = match origin {
        Origin::Local => "sent by the node",
        Origin::Arriving => "arriving on an interface",
    };
    // With --live, the kernel's counters of every Service an outcome reached.
    let counted = if explain.live {
        let mut named: Vec<String> = outcomes
            .iter()
            .flat_map(|o| services(&table, &packet, o))
            .filter_map(|s| {
                let end = s.find([':', ' ']).unwrap_or(s.len());
                Some(s.get(..end)?.to_owned())
            })
            .collect();
        named.sort();
        named.dedup();
        let connections = Counters::default().read()?;
        counters::rows(&connections)
            .into_iter()
            .filter(|(label, _)| named.contains(&label.service_name()))
            .collect()
    } else {
        Vec::new()
    };
    let mut out = String::new();
    match explain.output {
        OutputFormat::Json => {
            let value = json!({
                "packet": {"from": packet.saddr.to_string(), "to": destination, "origin": origin_text, "iif": packet.iifname},
                "result": describe(&outcomes),
                "effects": summarise(&outcomes).iter().map(|(effect, probability)| json!({
                    "fate": format!("{:?}", effect.fate).to_lowercase(),
                    "dnat": effect.dnat.map(|(ip, port)| json!({"address": ip.to_string(), "port": port})),
                    "masquerade": effect.masquerade,
                    "probability": probability,
                })).collect::<Vec<_>>(),
                "outcomes": outcomes.iter().map(|o| json!({
                    "probability": o.probability,
                    "fate": format!("{:?}", o.fate).to_lowercase(),
                    "dnat": o.dnat.map(|(ip, port)| json!({"address": ip.to_string(), "port": port})),
                    "masquerade": o.masquerade,
                    "services": services(&table, &packet, o),
                    "rules": o.steps.iter().map(|s| json!({"hook": s.hook, "chain": s.chain, "index": s.index, "rule": s.rule})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "counters": counted.iter().map(|(label, row)| json!({
                    "namespace": label.namespace,
                    "service": label.service,
                    "port": label.port,
                    "protocol": label.protocol,
                    "forwarded": row.forwarded,
                    "rejected": row.rejected,
                    "dropped": row.dropped,
                    "endpoints": row.endpoints.iter().map(|(e, n)| (e.to_string(), *n)).collect::<BTreeMap<_, _>>(),
                })).collect::<Vec<_>>(),
            });
            let _ = writeln!(out, "{value:#}");
        }
        OutputFormat::Human => {
            let _ = writeln!(
                out,
                "packet: {} -> {destination}, {origin_text}",
                packet.saddr
            );
            let _ = writeln!(out, "result: {}", describe(&outcomes));
            for outcome in &outcomes {
                let _ = writeln!(out);
                let effect = describe(std::slice::from_ref(outcome));
                let _ = writeln!(out, "{:5.1}%  {effect}", outcome.probability * 100.0);
                let services = services(&table, &packet, outcome);
                if !services.is_empty() {
                    let _ = writeln!(out, "        service: {}", services.join(", "));
                }
                for step in &outcome.steps {
                    let _ = writeln!(
                        out,
                        "        {} > {} #{}: {}",
                        step.hook, step.chain, step.index, step.rule
                    );
                }
            }
            if explain.live {
                let _ = writeln!(out, "\nnew connections counted in the kernel:");
                if counted.is_empty() {
                    let _ = writeln!(
                        out,
                        "        none (no Service reached, or nftproxy runs without --service-counters)"
                    );
                }
                for (label, row) in &counted {
                    out.push_str(&counters::row_text(label, row));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_name_their_service() {
        assert_eq!(
            service_of_chain("service-7ZS4P2AJ-default/redis/tcp/").as_deref(),
            Some("default/redis (tcp)")
        );
        assert_eq!(
            service_of_chain("external-5OJB2KTY-kube-system/dns/udp/dns").as_deref(),
            Some("kube-system/dns:dns (udp)")
        );
        assert_eq!(service_of_chain("services"), None);
    }
}
