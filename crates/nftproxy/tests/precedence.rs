//! nftproxy's rules decide every new connection to a Service while kube-proxy's are still
//! on the node, whichever of the two registered its hooks last; connections kube-proxy
//! set up keep their NAT.
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
    // A connection kube-proxy set up, held open across the takeover.
    let pod = topology.ns("pod");
    let (opened, held) = std::sync::mpsc::channel();
    let (done, finish) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        netns::enter(&pod).expect("enter pod namespace");
        let mut connection = LongLived::open(addr(REDIS));
        opened.send(()).expect("main thread waits");
        let mut alive = Vec::new();
        while finish.recv_timeout(Duration::from_millis(50)).is_err() {
            alive.push(connection.alive());
        }
        alive.push(connection.alive());
        alive
    });
    held.recv().expect("long-lived connection open");

    // nftproxy registers after kube-proxy: its rules decide.
    topology.program("");
    let after = new_connections(&topology, 100);
    assert_split("nftproxy after kube-proxy", &after, NFTPROXY_ENDPOINTS);

    // kube-proxy registers again, after nftproxy (a restart re-creates its table): still
    // nftproxy's.
    nft_in(&node, &["delete", "table", "ip", "kube-proxy"], "");
    nft_in(&node, &["-f", "-"], KUBE_PROXY);
    let again = new_connections(&topology, 100);
    assert_split("kube-proxy after nftproxy", &again, NFTPROXY_ENDPOINTS);

    done.send(()).expect("holder waits");
    let alive = holder.join().expect("holder");
    assert!(
        alive.iter().all(|a| *a),
        "the connection kube-proxy set up broke: {alive:?}"
    );

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
