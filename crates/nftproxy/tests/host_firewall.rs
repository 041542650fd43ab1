//! A host firewall beside nftproxy, as the README's recipe writes it. A filter chain at
//! priority 0 in `forward` or `input` sees a NodePort connection after nftproxy's DNAT:
//! matched by `tcp dport` it is never caught (shown here), matched by the connection's
//! original tuple (`ct original ip saddr`, `ct original proto-dst`) it is. The recipe's
//! table drops one source's connections to one NodePort while nftproxy serves everyone
//! else; the daemon's drift check sees the firewall's commits and leaves its table as it
//! is, also when it repairs nftproxy's own.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nftproxy_testkit::{SEED_NODE_FLAGS, kernel_available, run_ok};

mod common;
use common::{Daemon, Outcome, Topology, addr, from, http_get, serve, tcp, within};

/// What the README tells an admin to load: the client's connections to NodePort 31000
/// dropped, by their original destination port and source, in both filter hooks (an
/// endpoint on this node is reached through `input`, any other through `forward`).
const RECIPE: &str = "table inet host-firewall {
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct original ip saddr 192.168.50.100 meta l4proto tcp ct original proto-dst 31000 drop
    }
    chain input {
        type filter hook input priority filter; policy accept;
        ct original ip saddr 192.168.50.100 meta l4proto tcp ct original proto-dst 31000 drop
    }
}
";

/// The rule that looks right and is not: after DNAT the destination port is the pod's.
const NAIVE: &str = "table inet naive-firewall {
    chain forward {
        type filter hook forward priority filter; policy accept;
        ip saddr 192.168.50.100 tcp dport 31000 drop
    }
}
";

const NODEPORT: &str = "192.168.50.10:31000";
const LOAD_BALANCER: &str = "192.168.50.200:30000";
const METRICS: &str = "127.0.0.1:10249";

fn nft(ns: &str, args: &[&str], input: &str) -> String {
    run_ok(
        Command::new("ip")
            .args(["netns", "exec", ns, "nft"])
            .args(args),
        input,
    )
}

fn answered(outcomes: &[Outcome]) -> bool {
    outcomes.iter().all(|o| matches!(o, Outcome::Answered(..)))
}

#[test]
fn a_host_firewall_matching_the_original_tuple_filters_one_nodeport_client() {
    if !kernel_available("a_host_firewall_matching_the_original_tuple_filters_one_nodeport_client")
    {
        return;
    }
    let topology = Topology::new("fw");
    topology.program("");
    let node = topology.ns("node");
    let log = std::env::temp_dir().join(format!("{}daemon.log", topology.ns("")));
    let daemon = Daemon::spawn(
        Command::new("ip")
            .args(["netns", "exec", &node, env!("CARGO_BIN_EXE_nftproxy"), "-v"])
            .args(SEED_NODE_FLAGS)
            .args(["--metrics-bind-address", METRICS, "--manifests"])
            .arg(&topology.dir),
        log,
    );
    within(Duration::from_secs(30), "the first sync", || {
        daemon.log().contains("synced")
    });
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [
        serve(topology.ns("be1"), "be1", stop.clone()),
        serve(topology.ns("be2"), "be2", stop.clone()),
    ];
    let (client, pod) = (topology.ns("client"), topology.ns("pod"));
    let nodeport_from = |ns: &str, count| from(ns.to_owned(), count, || tcp(addr(NODEPORT)));
    assert!(answered(&nodeport_from(&client, 5)), "before any firewall");

    // Matched by the destination port it has after DNAT, the client goes through.
    nft(&node, &["-f", "-"], NAIVE);
    let naive = nodeport_from(&client, 5);
    assert!(answered(&naive), "tcp dport never sees 31000: {naive:?}");
    nft(&node, &["delete", "table", "inet", "naive-firewall"], "");

    // Matched by the original tuple: that client's connections to that NodePort go, and
    // nothing else does.
    nft(&node, &["-f", "-"], RECIPE);
    let listed = nft(&node, &["list", "table", "inet", "host-firewall"], "");
    let blocked = nodeport_from(&client, 3);
    assert!(
        blocked.iter().all(|o| *o == Outcome::TimedOut),
        "{blocked:?}"
    );
    let from_pod = nodeport_from(&pod, 10);
    assert!(answered(&from_pod), "another source: {from_pod:?}");
    let other_service = from(client.clone(), 10, || tcp(addr(LOAD_BALANCER)));
    assert!(
        answered(&other_service),
        "another Service: {other_service:?}"
    );

    // The drift check saw the firewall's commits and found nftproxy's tables intact.
    within(Duration::from_secs(30), "a drift check", || {
        daemon
            .log()
            .contains("another program committed to other tables; nftproxy's are intact")
    });
    // A repair of nftproxy's own tables leaves the firewall's as it is, and the recipe
    // goes on working.
    nft(&node, &["delete", "table", "ip", "nftproxy"], "");
    within(Duration::from_secs(30), "the repair", || {
        daemon.log().contains("repaired")
    });
    assert_eq!(
        nft(&node, &["list", "table", "inet", "host-firewall"], ""),
        listed
    );
    let metrics = http_get(&node, METRICS, "/metrics").expect("metrics").1;
    assert!(
        metrics
            .lines()
            .any(|l| l == "nftproxy_sync_repairs_total 1"),
        "{metrics}"
    );
    let blocked = nodeport_from(&client, 2);
    assert!(
        blocked.iter().all(|o| *o == Outcome::TimedOut),
        "{blocked:?}"
    );
    assert!(answered(&nodeport_from(&pod, 5)));

    stop.store(true, Ordering::Relaxed);
    for server in servers {
        let _ = server.join();
    }
}
