//! The daemon never disturbs traffic: a restart whose Node list comes late sends nothing
//! and drops no connection, and what another program does to nftproxy's tables is
//! repaired within one `syncPeriod`, with traffic working again. Real TCP through a node
//! namespace (`common`), the daemon run as users run it.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nftproxy_netlink::netns;
use nftproxy_testkit::fake_api::{FakeApi, Resource};
use nftproxy_testkit::{SEED_NODE_FLAGS, kernel_available};

mod common;
use common::{Daemon, LongLived, Outcome, Topology, addr, serve, tcp, within};

const NODE_PORT: &str = "192.168.50.10:31000";

/// `nftproxy ARGS` in the node namespace.
fn daemon(topology: &Topology, name: &str, args: &[&str]) -> Daemon {
    let log = std::env::temp_dir().join(format!("nftproxy-{}-{name}.log", std::process::id()));
    Daemon::spawn(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &topology.ns("node"),
                env!("CARGO_BIN_EXE_nftproxy"),
            ])
            .args(args),
        log,
    )
}

/// Runs `work` in namespace `ns`.
fn in_ns<T: Send + 'static>(ns: String, work: impl FnOnce() -> T + Send + 'static) -> T {
    netns::in_named_netns(&ns, work).expect("thread")
}

/// One sample of the daemon's `/metrics` (on the node's loopback).
fn metric(topology: &Topology, series: &'static str) -> Option<f64> {
    in_ns(topology.ns("node"), move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect("127.0.0.1:10249").ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    })
}

/// A client in the client namespace connecting to the NodePort every 20 ms until
/// stopped: (answered, failed).
struct Client {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Client {
    fn start(topology: &Topology) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (s, a, f) = (stop.clone(), answered.clone(), failed.clone());
        let ns = topology.ns("client");
        let thread = netns::spawn_in_named_netns(&ns, move || {
            while !s.load(Ordering::Relaxed) {
                match tcp(addr(NODE_PORT)) {
                    Outcome::Answered(..) => a.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("connection failed: {other:?}");
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .expect("client namespace");
        Client {
            stop,
            answered,
            failed,
            thread,
        }
    }

    fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("client thread");
        (
            self.answered.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// The echo servers of both backends, stopped when dropped.
struct Backends(Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>);

impl Backends {
    fn start(topology: &Topology) -> Backends {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = vec![
            serve(topology.ns("be1"), "be1", stop.clone()),
            serve(topology.ns("be2"), "be2", stop.clone()),
        ];
        Backends(stop, threads)
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        for thread in self.1.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The seed examples as the API server holds them, and this node's Node, which alone
/// says the node's address (the daemons here get no --node-ip).
fn seed_cluster(api: &FakeApi) {
    api.apply_yaml(&nftproxy_testkit::seed_manifests());
    api.apply(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-a"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.10"}]},
    }));
}

/// Long-lived connections to the NodePort, opened from the client namespace.
fn long_lived(topology: &Topology, count: usize) -> Vec<LongLived> {
    in_ns(topology.ns("client"), move || {
        (0..count)
            .map(|_| LongLived::open(addr(NODE_PORT)))
            .collect()
    })
}

#[test]
fn a_restart_with_a_late_node_list_sends_nothing_and_drops_no_connection() {
    if !kernel_available("a_restart_with_a_late_node_list_sends_nothing_and_drops_no_connection") {
        return;
    }
    let topology = Topology::new("late");
    let _backends = Backends::start(&topology);
    let api = in_ns(topology.ns("node"), FakeApi::start);
    seed_cluster(&api);
    let url = api.url();
    let args = [
        "--master",
        &url,
        "--node-name",
        "node-a",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--min-sync-period",
        "100ms",
    ];
    let first = daemon(&topology, "late-1", &args);
    let ns = topology.ns("client");
    within(Duration::from_secs(20), "the NodePort", || {
        let ns = ns.clone();
        in_ns(ns, || matches!(tcp(addr(NODE_PORT)), Outcome::Answered(..)))
    });
    let mut held = long_lived(&topology, 3);
    let client = Client::start(&topology);
    std::thread::sleep(Duration::from_millis(300));

    // The restart: the old process dies, and the API server answers the new one's Node
    // list 1.5 s after its Service and EndpointSlice lists.
    drop(first);
    api.delay_lists(Resource::Nodes, Duration::from_millis(1_500));
    let second = daemon(&topology, "late-2", &args);
    let started = Instant::now();
    within(Duration::from_secs(20), "the first sync", || {
        metric(
            &topology,
            r#"kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}"#,
        )
        .is_some_and(|t| t > 0.0)
    });
    let first_sync = started.elapsed();
    // Past the Node's arrival and a few syncs' worth of time.
    std::thread::sleep(Duration::from_millis(2_500));
    let (answered, failed) = client.stop();
    let operations = metric(&topology, "nftproxy_sync_operations_total");
    let log = second.log();
    eprintln!(
        "first sync after {first_sync:?}; {answered} connections answered, {failed} failed; \
         operations {operations:?}"
    );
    assert!(
        first_sync >= Duration::from_millis(1_500),
        "the first sync waited for the Node: {first_sync:?}\n{log}"
    );
    assert!(log.contains("waiting for the initial lists"), "{log}");
    assert_eq!(failed, 0, "no connection failed\n{log}");
    assert!(answered >= 100, "{answered} connections");
    assert_eq!(operations, Some(0.0), "the restart sent nothing\n{log}");
    for (i, connection) in held.iter_mut().enumerate() {
        assert!(connection.alive(), "long-lived connection {i} survived");
    }
}

/// `nft ARGS` in the node namespace.
fn nft(topology: &Topology, args: &str) -> String {
    let output = Command::new("ip")
        .args(["netns", "exec", &topology.ns("node"), "nft"])
        .args(args.split_whitespace())
        .output()
        .expect("nft runs");
    assert!(
        output.status.success() || args.contains("list "),
        "nft {args}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn what_another_program_changes_is_repaired_within_the_sync_period() {
    if !kernel_available("what_another_program_changes_is_repaired_within_the_sync_period") {
        return;
    }
    let topology = Topology::new("drift");
    let _backends = Backends::start(&topology);
    topology.program("");
    let dir = topology.dir.to_string_lossy().into_owned();
    let mut args = vec!["--manifests", &dir, "--sync-period", "5s"];
    args.extend(SEED_NODE_FLAGS);
    let daemon = daemon(&topology, "drift", &args);
    within(Duration::from_secs(20), "the first sync", || {
        metric(
            &topology,
            r#"kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}"#,
        )
        .is_some_and(|t| t > 0.0)
    });
    // `-s`: without the counters' numbers, which the traffic below changes.
    let intact = nft(&topology, "-s list table ip nftproxy");
    let tampers = [
        "delete element ip nftproxy nodeport-ips { 192.168.50.10 }",
        "add element ip nftproxy nodeport-cluster { tcp . 31999 }",
        "flush chain ip nftproxy nat-prerouting",
        "add rule ip nftproxy filter-input ip daddr 192.168.50.10 tcp dport 31000 drop",
        "delete table ip nftproxy",
    ];
    for (n, tamper) in tampers.iter().enumerate() {
        nft(&topology, tamper);
        assert_ne!(
            nft(&topology, "-s list table ip nftproxy"),
            intact,
            "{tamper}"
        );
        let took = within(Duration::from_secs(5), tamper, || {
            nft(&topology, "-s list table ip nftproxy") == intact
        });
        eprintln!("`{tamper}` repaired after {took:?}");
        let outcomes: Vec<Outcome> = in_ns(topology.ns("client"), || {
            (0..20).map(|_| tcp(addr(NODE_PORT))).collect()
        });
        assert!(
            outcomes.iter().all(|o| matches!(o, Outcome::Answered(..))),
            "traffic after `{tamper}`: {outcomes:?}"
        );
        assert_eq!(
            metric(&topology, "nftproxy_sync_repairs_total"),
            Some((n + 1) as f64),
            "{}",
            daemon.log()
        );
    }
    let log = daemon.log();
    assert!(
        log.contains("another program changed nftproxy's tables; repaired"),
        "{log}"
    );
}

/// Whether the table declares counters (a line `counter` of its own, in `nft -s` text).
fn counts(topology: &Topology) -> bool {
    nft(topology, "-s list table ip nftproxy")
        .lines()
        .any(|l| l.trim() == "counter")
}

#[test]
fn turning_the_counters_off_and_on_drops_no_connection() {
    if !kernel_available("turning_the_counters_off_and_on_drops_no_connection") {
        return;
    }
    let topology = Topology::new("toggle");
    topology.program_with("", &["--service-counters"]);
    assert!(counts(&topology));
    let _backends = Backends::start(&topology);
    let mut held = long_lived(&topology, 3);
    let client = Client::start(&topology);
    std::thread::sleep(Duration::from_millis(300));
    // Every counted set is declared anew, with the rules that read it, in one
    // transaction each way.
    topology.program_with("", &["--service-counters=false"]);
    assert!(!counts(&topology));
    std::thread::sleep(Duration::from_millis(300));
    topology.program_with("", &["--service-counters=true"]);
    assert!(counts(&topology));
    std::thread::sleep(Duration::from_millis(300));
    let (answered, failed) = client.stop();
    eprintln!("counters off and on: {answered} connections answered, {failed} failed");
    assert_eq!(failed, 0);
    assert!(answered >= 20, "{answered}");
    assert!(held.iter_mut().all(LongLived::alive));
}
