//! What the golden rules *do*: each `rules-golden/<case>/expect.txt` lists packets and the
//! outcome the behaviour requires, written by hand from the intended semantics, and the
//! tracer must find exactly that in the rendered rules.
//!
//! Line format: `FROM[@IIF] -> ADDR:PORT/PROTO => OUTCOMES`, where OUTCOMES is what
//! `nftproxy_nft::trace::describe` prints (`dnat 10.180.0.1:80 (50.0%), …`, `reject`,
//! `drop`, `accept`). A source that is one of the node's addresses is traced as locally
//! generated; any other as arriving on an interface.

use std::fs;
use std::net::IpAddr;

use nftproxy_nft::trace::{Origin, Packet, describe, trace};
use nftproxy_nft::{Family, L4Proto};
use nftproxy_render::render;
use nftproxy_testkit::{build_case, case_name, golden_cases};

fn parse_destination(text: &str) -> (IpAddr, u16, L4Proto) {
    let (address, proto) = text.rsplit_once('/').expect("ADDR:PORT/PROTO");
    let proto = match proto {
        "tcp" => L4Proto::Tcp,
        "udp" => L4Proto::Udp,
        "sctp" => L4Proto::Sctp,
        other => panic!("protocol {other}"),
    };
    let (ip, port) = address.rsplit_once(':').expect("ADDR:PORT");
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    (
        ip.parse().expect("address"),
        port.parse().expect("port"),
        proto,
    )
}

#[test]
fn golden_rules_do_what_the_cases_expect() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in golden_cases() {
        let expectations = fs::read_to_string(case.join("expect.txt")).unwrap_or_else(|_| {
            panic!(
                "{}: every golden case needs an expect.txt",
                case_name(&case)
            )
        });
        let built = build_case(&case, false).build;
        let mut local: Vec<IpAddr> = built.ipv4.node_ips.clone();
        local.extend(built.ipv6.node_ips.iter().copied());
        local.extend([
            "127.0.0.1".parse::<IpAddr>().expect("literal"),
            "::1".parse().expect("literal"),
        ]);
        let (ip, ip6) = (render(&built.ipv4), render(&built.ipv6));
        for line in expectations
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (probe, expected) = line.split_once(" => ").expect("PROBE => OUTCOME");
            let (from, to) = probe.split_once(" -> ").expect("FROM -> TO");
            let (from, iifname) = from.split_once('@').unwrap_or((from, ""));
            let saddr: IpAddr = from.parse().expect("source address");
            let (daddr, dport, proto) = parse_destination(to);
            let origin = if local.contains(&saddr) {
                Origin::Local
            } else {
                Origin::Arriving
            };
            let iifname = if origin == Origin::Local {
                ""
            } else if iifname.is_empty() {
                "eth0"
            } else {
                iifname
            };
            let packet = Packet {
                saddr,
                daddr,
                proto,
                dport,
                iifname: iifname.to_owned(),
            };
            let table = if Family::of(&daddr) == Family::Ip {
                &ip
            } else {
                &ip6
            };
            let actual = describe(&trace(table, &packet, origin, &local));
            if actual != expected {
                failures.push(format!(
                    "{}: {probe}\n  expected: {expected}\n  traced:   {actual}",
                    case_name(&case)
                ));
            }
            checked += 1;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 100, "only {checked} expectations");
}
