//! nftproxy's rules decide every new connection to a Service while kube-proxy's are still
//! on the node, whichever of the two registered its hooks last; connections kube-proxy
//! set up keep their NAT. `--cleanup-kube-proxy` then removes kube-proxy's rules (its
//! nftables table, or its iptables-nft chains) and nothing else, with traffic running
//! and no connection dropped; `--cleanup` hands back the same way.
//!
//! kube-proxy is played by a table shaped like its nftables mode: `ip kube-proxy` with
//! nat chains at priority `dstnat` sending redis's ClusterIP to an endpoint nftproxy does
//! not use (10.244.2.20), so every answer says whose rules decided.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{LongLived, Outcome, Topology, addr, assert_split, from, serve, tcp};
use nftproxy_netlink::netns;
use nftproxy_testkit::{kernel_available, run_ok};

const REDIS: &str = "10.103.50.102:6379";
const NFTPROXY_ENDPOINTS: &[&str] = &["10.244.1.10:6379", "10.244.2.10:6379"];
const KUBE_PROXY_ENDPOINT: &str = "10.244.2.20:6379";

/// kube-proxy's table as its nftables mode hooks it: DNAT at `dstnat` in prerouting and
/// output.
const KUBE_PROXY: &str = "
table ip kube-proxy {
    chain nat-prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 10.103.50.102 tcp dport 6379 dnat to 10.244.2.20:6379
    }
    chain nat-output {
        type nat hook output priority -100; policy accept;
        ip daddr 10.103.50.102 tcp dport 6379 dnat to 10.244.2.20:6379
    }
}
";

fn nft_in(ns: &str, args: &[&str], input: &str) {
    run_ok(
        Command::new("ip")
            .args(["netns", "exec", ns, "nft"])
            .args(args),
        input,
    );
}

/// The endpoints that answered `count` new connections from the pod namespace.
fn new_connections(topology: &Topology, count: usize) -> Vec<Outcome> {
    from(topology.ns("pod"), count, || tcp(addr(REDIS)))
}

fn all_to(outcomes: &[Outcome], endpoint: &str) -> bool {
    outcomes
        .iter()
        .all(|o| matches!(o, Outcome::Answered(_, _, e) if e == endpoint))
}

#[test]
fn nftproxy_decides_new_connections_whoever_registered_last() {
    if !kernel_available("nftproxy_decides_new_connections_whoever_registered_last") {
        return;
    }
    let topology = Topology::new("precedence");
    let node = topology.ns("node");
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [
        serve(topology.ns("be1"), "be1", stop.clone()),
        serve(topology.ns("be2"), "be2", stop.clone()),
    ];
    std::thread::sleep(Duration::from_millis(200));

    // kube-proxy alone: its endpoint answers (the control: the test can tell them apart).
    nft_in(&node, &["-f", "-"], KUBE_PROXY);
    let before = new_connections(&topology, 20);
    assert!(all_to(&before, KUBE_PROXY_ENDPOINT), "{before:?}");
    // nftproxy registers after kube-proxy, with traffic running and connections kube-proxy
    // set up held open: its rules decide, and none of them breaks.
    under_traffic(&topology, || topology.program(""));
    let after = new_connections(&topology, 100);
    assert_split("nftproxy after kube-proxy", &after, NFTPROXY_ENDPOINTS);

    // kube-proxy registers again, after nftproxy (a restart re-creates its table): still
    // nftproxy's.
    nft_in(&node, &["delete", "table", "ip", "kube-proxy"], "");
    nft_in(&node, &["-f", "-"], KUBE_PROXY);
    let again = new_connections(&topology, 100);
    assert_split("kube-proxy after nftproxy", &again, NFTPROXY_ENDPOINTS);

    // nftproxy gone: kube-proxy's rules decide again.
    run_ok(
        Command::new("ip").args([
            "netns",
            "exec",
            &node,
            env!("CARGO_BIN_EXE_nftproxy"),
            "--cleanup",
        ]),
        "",
    );
    let without = new_connections(&topology, 20);
    assert!(all_to(&without, KUBE_PROXY_ENDPOINT), "{without:?}");
    stop.store(true, Ordering::Relaxed);
    for server in servers {
        server.join().expect("server");
    }
}

/// kube-proxy's iptables mode as iptables-nft writes it: `KUBE-SERVICES` from
/// `PREROUTING` and `OUTPUT`, a service chain that DNATs redis to 10.244.2.20, and a
/// filter chain from `INPUT`.
const KUBE_PROXY_IPTABLES: [&[&str]; 9] = [
    &["-t", "nat", "-N", "KUBE-SERVICES"],
    &["-t", "nat", "-N", "KUBE-SVC-REDIS"],
    &[
        "-t",
        "nat",
        "-A",
        "KUBE-SVC-REDIS",
        "-p",
        "tcp",
        "-j",
        "DNAT",
        "--to-destination",
        "10.244.2.20:6379",
    ],
    &[
        "-t",
        "nat",
        "-A",
        "KUBE-SERVICES",
        "-d",
        "10.103.50.102/32",
        "-p",
        "tcp",
        "--dport",
        "6379",
        "-j",
        "KUBE-SVC-REDIS",
    ],
    &["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
    &["-t", "nat", "-A", "OUTPUT", "-j", "KUBE-SERVICES"],
    &["-t", "filter", "-N", "KUBE-FIREWALL"],
    &[
        "-t",
        "filter",
        "-A",
        "KUBE-FIREWALL",
        "-m",
        "mark",
        "--mark",
        "0x8000/0x8000",
        "-j",
        "DROP",
    ],
    &["-t", "filter", "-A", "INPUT", "-j", "KUBE-FIREWALL"],
];

/// Another program's rules, which must come through unchanged.
const FOREIGN_IPTABLES: [&[&str]; 3] = [
    &["-t", "nat", "-N", "OTHER"],
    &[
        "-t", "nat", "-A", "OTHER", "-p", "tcp", "--dport", "9999", "-j", "RETURN",
    ],
    &["-t", "nat", "-A", "PREROUTING", "-j", "OTHER"],
];

fn iptables(ns: &str, rules: &[&[&str]]) {
    for rule in rules {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", ns, "iptables-nft", "-w"])
                .args(*rule),
            "",
        );
    }
}

fn in_node(ns: &str, program: &str, args: &[&str]) -> String {
    run_ok(
        Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args),
        "",
    )
}

/// What another program owns: the foreign table and the foreign iptables chain.
fn foreign_state(ns: &str) -> String {
    let table = in_node(ns, "nft", &["list", "table", "inet", "other"]);
    let chain = in_node(ns, "iptables-nft-save", &["-t", "nat"])
        .lines()
        .filter(|l| l.contains("OTHER"))
        .collect::<Vec<_>>()
        .join("\n");
    format!("{table}\n{chain}")
}

/// Runs `event` while a client in the pod namespace opens a connection to redis every
/// 20 ms and holds three long-lived ones; every connection must be answered and every
/// long-lived one must survive.
fn under_traffic(topology: &Topology, event: impl FnOnce()) {
    let pod = topology.ns("pod");
    let running = Arc::new(AtomicBool::new(true));
    let keep = running.clone();
    let (opened, held_open) = std::sync::mpsc::channel();
    let client = netns::spawn_in_named_netns(&pod, move || {
        let mut held: Vec<LongLived> = (0..3).map(|_| LongLived::open(addr(REDIS))).collect();
        opened.send(()).expect("main thread waits");
        let (mut answered, mut failed) = (0, Vec::new());
        while keep.load(Ordering::Relaxed) {
            match tcp(addr(REDIS)) {
                Outcome::Answered(..) => answered += 1,
                other => failed.push(other),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let alive = held.iter_mut().all(LongLived::alive);
        (answered, failed, alive)
    })
    .expect("pod namespace");
    held_open.recv().expect("long-lived connections open");
    std::thread::sleep(Duration::from_millis(300));
    event();
    std::thread::sleep(Duration::from_millis(300));
    running.store(false, Ordering::Relaxed);
    let (answered, failed, alive) = client.join().expect("client");
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(answered > 10, "{answered}");
    assert!(alive, "a long-lived connection broke");
}

/// kube-proxy's two ways of writing its rules.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Its nftables mode: one table.
    Nftables,
    /// Its iptables mode through iptables-nft: chains in `nat` and `filter`.
    Iptables,
}

/// kube-proxy's rules as `mode` writes them.
fn kube_proxy_rules(ns: &str, mode: Mode) {
    match mode {
        Mode::Nftables => nft_in(ns, &["-f", "-"], KUBE_PROXY),
        Mode::Iptables => iptables(ns, &KUBE_PROXY_IPTABLES),
    }
}

#[test]
fn cleanup_kube_proxy_takes_over_from_its_nftables_mode_without_dropping_a_connection() {
    if !kernel_available("cleanup_kube_proxy_takes_over_from_its_nftables_mode") {
        return;
    }
    takeover(
        Mode::Nftables,
        "takeover-nft",
        &["remove table ip kube-proxy"],
    );
}

#[test]
fn cleanup_kube_proxy_takes_over_from_its_iptables_mode_without_dropping_a_connection() {
    if !kernel_available("cleanup_kube_proxy_takes_over_from_its_iptables_mode") {
        return;
    }
    takeover(
        Mode::Iptables,
        "takeover-ipt",
        &[
            "remove chain ip nat KUBE-SERVICES",
            "remove chain ip nat KUBE-SVC-REDIS",
            "remove chain ip filter KUBE-FIREWALL",
        ],
    );
}

/// kube-proxy's rules in `mode` on the node, another program's table and iptables chain
/// beside them; `nftproxy --once --cleanup-kube-proxy` with traffic running. `removed`:
/// the tables and chains the plan must name (besides the jumps to them).
fn takeover(mode: Mode, name: &str, removed: &[&str]) {
    let topology = Topology::new(name);
    let node = topology.ns("node");
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [
        serve(topology.ns("be1"), "be1", stop.clone()),
        serve(topology.ns("be2"), "be2", stop.clone()),
    ];
    kube_proxy_rules(&node, mode);
    iptables(&node, &FOREIGN_IPTABLES);
    nft_in(
        &node,
        &["-f", "-"],
        "table inet other {\n chain c {\n type filter hook input priority 10;\n tcp dport 22 accept\n }\n}\n",
    );
    let foreign = foreign_state(&node);
    std::thread::sleep(Duration::from_millis(200));
    assert!(all_to(&new_connections(&topology, 5), KUBE_PROXY_ENDPOINT));

    // What would go, and nothing else.
    let nftproxy = env!("CARGO_BIN_EXE_nftproxy");
    let planned = in_node(&node, nftproxy, &["--dry-run", "--cleanup-kube-proxy"]);
    eprintln!("{planned}");
    let lines: Vec<&str> = planned.lines().filter(|l| !l.starts_with('#')).collect();
    for wanted in removed {
        assert!(lines.contains(wanted), "{wanted}:\n{planned}");
    }
    let jumps = |chain: &str| {
        lines
            .iter()
            .filter(|l| l.starts_with(&format!("remove rule ip {chain} ")))
            .count()
    };
    // In iptables mode, the jumps from the built-in chains to kube-proxy's (and to
    // nothing else: OTHER's stays).
    let expected = usize::from(mode == Mode::Iptables);
    assert_eq!(jumps("nat PREROUTING"), expected, "{planned}");
    assert_eq!(jumps("nat OUTPUT"), expected, "{planned}");
    assert_eq!(jumps("filter INPUT"), expected, "{planned}");
    assert_eq!(lines.len(), removed.len() + 3 * expected, "{planned}");
    assert_eq!(foreign_state(&node), foreign, "--dry-run changed something");

    // Traffic while nftproxy takes over.
    let mut log = String::new();
    under_traffic(&topology, || {
        log = topology.program_with("", &["--cleanup-kube-proxy"]);
    });
    eprintln!("{log}");

    // Each removal logged; kube-proxy's objects gone, the others unchanged.
    for object in removed {
        let logged = object.replacen("remove ", "removed ", 1);
        assert!(log.contains(&logged), "{logged}:\n{log}");
    }
    let after = in_node(&node, nftproxy, &["--dry-run", "--cleanup-kube-proxy"]);
    assert!(after.contains("nothing of kube-proxy's"), "{after}");
    assert_eq!(foreign_state(&node), foreign);
    assert!(!in_node(&node, "iptables-nft-save", &[]).contains("KUBE-"));
    let later = new_connections(&topology, 100);
    assert_split("after the takeover", &later, NFTPROXY_ENDPOINTS);

    // kube-proxy's rules back (a kube-proxy still running re-creates them): nftproxy
    // still decides new connections.
    kube_proxy_rules(&node, mode);
    let back = new_connections(&topology, 100);
    assert_split("kube-proxy's rules re-created", &back, NFTPROXY_ENDPOINTS);

    // The way back: `nftproxy --cleanup` hands over to kube-proxy's rules, no connection
    // dropped, and kube-proxy decides again.
    under_traffic(&topology, || {
        in_node(&node, nftproxy, &["--cleanup"]);
    });
    assert!(all_to(&new_connections(&topology, 20), KUBE_PROXY_ENDPOINT));
    stop.store(true, Ordering::Relaxed);
    for server in servers {
        server.join().expect("server");
    }
}
