//! The daemon's open ports as anyone on the node's network reaches them: with 1,024 open
//! files allowed (as containerd gives a container), 1,000 idle and 200 slow connections
//! (a header line every 5 s) to each of `/healthz` and a health-check node port, from
//! the client namespace. While they are held, `/healthz` and the health check answer
//! within a second, an EndpointSlice change reaches the kernel within 3 s and the daemon
//! uses under half a core; every idle and slow connection is closed within 60 s; then
//! its descriptors and memory come back. With a limit too low for the servers' caps,
//! failed accepts are counted and back off instead of spinning.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nftproxy_netlink::netns;
use nftproxy_testkit::fake_api::FakeApi;
use nftproxy_testkit::{SEED_NODE_FLAGS, kernel_available, seed_manifests};

mod common;
use common::{Daemon, Topology, within};

const HEALTHZ: &str = "192.168.50.10:10256";
const HEALTH_CHECK: &str = "192.168.50.10:32100";
/// The metrics port, on the node's loopback (read from the node namespace).
const METRICS: &str = "127.0.0.1:10249";
const IDLE: usize = 1_000;
const SLOW: usize = 200;

const NODE_A: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n\
                      status: {addresses: [{type: InternalIP, address: 192.168.50.10}]}\n";

/// The seed cluster with counter-lb's `externalTrafficPolicy: Local` and health-check
/// node port 32100, served from the node namespace's loopback.
fn api(topology: &Topology) -> FakeApi {
    let api = netns::in_named_netns(&topology.ns("node"), FakeApi::start).expect("node ns");
    api.apply_yaml(&seed_manifests());
    api.apply_yaml(NODE_A);
    let mut service = object("counter-lb");
    service["spec"]["externalTrafficPolicy"] = serde_json::json!("Local");
    service["spec"]["healthCheckNodePort"] = serde_json::json!(32100);
    api.apply(service);
    api
}

/// The seed examples' object named `name`.
fn object(name: &str) -> serde_json::Value {
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&seed_manifests()).expect("yaml");
    documents
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .expect("object in the seed")
}

/// The daemon in the node namespace, allowed `open_files` (soft and hard).
fn daemon(topology: &Topology, api: &FakeApi, open_files: u64) -> Daemon {
    let log = std::env::temp_dir().join(format!(
        "nftproxy-exposure-{}-{open_files}.log",
        std::process::id()
    ));
    // `ip netns exec` and `prlimit` both exec: the child is nftproxy itself.
    Daemon::spawn(
        Command::new("ip")
            .args(["netns", "exec", &topology.ns("node")])
            .arg("prlimit")
            .arg(format!("--nofile={open_files}:{open_files}"))
            .arg(env!("CARGO_BIN_EXE_nftproxy"))
            .args(["--master", &api.url()])
            .args(SEED_NODE_FLAGS)
            .args(["--healthz-bind-address", "0.0.0.0:10256"])
            .args(["--metrics-bind-address", METRICS])
            .args(["--min-sync-period", "100ms"]),
        log,
    )
}

/// A GET from the calling thread's namespace: the status code, or why there is none.
fn get(address: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let address: SocketAddr = address.parse().map_err(|e| format!("{e}"))?;
    let mut stream = TcpStream::connect_timeout(&address, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line: {response:?}"))?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    Ok((code, body.unwrap_or_default()))
}

/// What the daemon process holds: descriptors, resident memory (KiB), CPU time.
#[derive(Debug, Clone, Copy)]
struct Usage {
    descriptors: usize,
    rss_kib: u64,
    cpu: Duration,
}

fn usage(pid: u32) -> Usage {
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    let hertz: u64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100);
    Usage {
        descriptors,
        rss_kib,
        cpu: Duration::from_millis(ticks * 1000 / hertz),
    }
}

/// One attacking connection: when it was opened and, once seen, when it was closed.
struct Held {
    stream: TcpStream,
    slow: bool,
    opened: Instant,
    closed: Option<Instant>,
}

/// The attack, from a thread in the client namespace: opens every connection, then
/// keeps the slow ones sending a header line every 5 s and notes when each is closed,
/// until every one is or `stop` is raised.
fn attack(
    ns: &str,
    targets: &'static [&'static str],
    (idle, slow): (usize, usize),
    stop: Arc<AtomicBool>,
) -> (JoinHandle<Vec<Held>>, std::sync::mpsc::Receiver<usize>) {
    let (opened, all_open) = std::sync::mpsc::channel();
    let thread = netns::spawn_in_named_netns(ns, move || {
        let mut held = Vec::new();
        let mut failed = 0;
        for target in targets {
            let address: SocketAddr = target.parse().expect("address");
            for n in 0..idle + slow {
                let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_secs(2))
                else {
                    failed += 1;
                    continue;
                };
                let slow = n >= idle;
                if slow {
                    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\n");
                }
                stream.set_nonblocking(true).expect("nonblocking");
                held.push(Held {
                    stream,
                    slow,
                    opened: Instant::now(),
                    closed: None,
                });
            }
        }
        opened.send(failed).expect("the test waits");
        let mut last_line = Instant::now();
        let mut buffer = [0u8; 1024];
        while !stop.load(Ordering::Relaxed) && held.iter().any(|h| h.closed.is_none()) {
            let send = last_line.elapsed() >= Duration::from_secs(5);
            if send {
                last_line = Instant::now();
            }
            for h in held.iter_mut().filter(|h| h.closed.is_none()) {
                let gone = match h.stream.read(&mut buffer) {
                    Ok(0) => true,
                    // An answer (408, 431): what matters is that the connection ends.
                    Ok(_) => false,
                    Err(e) => e.kind() != ErrorKind::WouldBlock,
                };
                let gone =
                    gone || (send && h.slow && h.stream.write_all(b"X-Slow: 1\r\n").is_err());
                if gone {
                    h.closed = Some(Instant::now());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        held
    })
    .expect("client namespace");
    (thread, all_open)
}

/// Probes `address` from the client namespace every 200 ms until `stop`: the slowest
/// answer and the failures.
fn prober(
    ns: &str,
    address: &'static str,
    path: &'static str,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(Duration, Vec<String>, usize)> {
    netns::spawn_in_named_netns(ns, move || {
        let (mut slowest, mut failures, mut answered) = (Duration::ZERO, Vec::new(), 0);
        while !stop.load(Ordering::Relaxed) {
            let start = Instant::now();
            match get(address, path, Duration::from_secs(5)) {
                Ok((code, _)) if code == 200 || code == 503 => answered += 1,
                Ok((code, body)) => failures.push(format!("{code} {body}")),
                Err(error) => failures.push(error),
            }
            slowest = slowest.max(start.elapsed());
            std::thread::sleep(Duration::from_millis(200));
        }
        (slowest, failures, answered)
    })
    .expect("client namespace")
}

fn listing(topology: &Topology) -> String {
    let output = Command::new("ip")
        .args(["netns", "exec", &topology.ns("node")])
        .args(["nft", "list", "table", "ip", "nftproxy"])
        .output()
        .expect("nft runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn metrics(topology: &Topology) -> String {
    netns::in_named_netns(&topology.ns("node"), || {
        get(METRICS, "/metrics", Duration::from_secs(5))
            .map(|(_, body)| body)
            .unwrap_or_default()
    })
    .expect("node namespace")
}

/// The value of each sample line of `metrics` whose series starts with `prefix`.
fn samples(metrics: &str, prefix: &str) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Sets this process's open-files limit.
fn allow_open_files(n: u64) {
    let status = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string()])
        .arg(format!("--nofile={n}:{n}"))
        .status()
        .expect("prlimit runs");
    assert!(status.success(), "prlimit");
}

#[test]
fn idle_and_slow_connections_cannot_take_the_daemon_down() {
    if !kernel_available("idle_and_slow_connections_cannot_take_the_daemon_down") {
        return;
    }
    let node = Node::start("expo", 1024, true);
    let (pid, client) = (node.pid(), node.client.clone());
    let log = node.daemon.log();
    assert!(
        log.contains("open files limit"),
        "the limit is logged:\n{log}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let before = usage(pid);

    let stop_attack = Arc::new(AtomicBool::new(false));
    let (attacker, all_open) = attack(
        &client,
        &[HEALTHZ, HEALTH_CHECK],
        (IDLE, SLOW),
        stop_attack.clone(),
    );
    let refused = all_open.recv().expect("the attack opened its connections");
    let attack_start = Instant::now();
    let cpu_start = usage(pid).cpu;
    let stop_probes = Arc::new(AtomicBool::new(false));
    let healthz = prober(&client, HEALTHZ, "/healthz", stop_probes.clone());
    let health_check = prober(&client, HEALTH_CHECK, "/", stop_probes.clone());
    let during = usage(pid);

    // An EndpointSlice change: redis gains an endpoint.
    std::thread::sleep(Duration::from_secs(3));
    let programmed = node.endpoint_change("10.244.1.30");
    std::thread::sleep(Duration::from_secs(8));
    let cpu = usage(pid).cpu.saturating_sub(cpu_start);
    let window = attack_start.elapsed();
    stop_probes.store(true, Ordering::Relaxed);
    let (healthz_slowest, healthz_failures, healthz_answered) = healthz.join().expect("prober");
    let (check_slowest, check_failures, check_answered) = health_check.join().expect("prober");

    // Every attacking connection ends on its own within 60 s of being opened.
    let (open, longest) = ended(attacker, &stop_attack);
    // Then the descriptors come back, and the memory to the allocator: a second attack
    // reuses it.
    within(Duration::from_secs(10), "the descriptors back", || {
        usage(pid).descriptors <= before.descriptors + 2
    });
    let after = usage(pid);
    let again = Arc::new(AtomicBool::new(false));
    let (attacker, all_open) = attack(
        &client,
        &[HEALTHZ, HEALTH_CHECK],
        (IDLE, SLOW),
        again.clone(),
    );
    all_open
        .recv()
        .expect("the second attack opened its connections");
    let (open_again, _) = ended(attacker, &again);
    within(
        Duration::from_secs(10),
        "the descriptors back again",
        || usage(pid).descriptors <= before.descriptors + 2,
    );
    let after_again = usage(pid);
    let shed = samples(
        &metrics(&node.topology),
        "nftproxy_http_connections_closed_total",
    );
    let core_share = cpu.as_secs_f64() / window.as_secs_f64();
    eprintln!(
        "attack: {} connections opened ({refused} refused); before {before:?}, during {during:?}, after {after:?}\n\
         /healthz: {healthz_answered} answered, slowest {healthz_slowest:?}; health check: {check_answered} answered, slowest {check_slowest:?}\n\
         endpoint change programmed after {programmed:?}; CPU {cpu:?} over {window:?} ({core_share:.3} of a core)\n\
         attacking connections never closed: {open}, longest lived {longest:?}; closed by the daemon: {shed:?}\n\
         after a second attack: {after_again:?}",
        2 * (IDLE + SLOW) - refused
    );
    assert!(
        healthz_failures.is_empty(),
        "/healthz failed: {healthz_failures:?}"
    );
    assert!(
        check_failures.is_empty(),
        "the health check failed: {check_failures:?}"
    );
    assert!(healthz_answered > 10 && check_answered > 10);
    assert!(
        healthz_slowest < Duration::from_secs(1),
        "/healthz took {healthz_slowest:?}"
    );
    assert!(
        check_slowest < Duration::from_secs(1),
        "the health check took {check_slowest:?}"
    );
    assert!(
        programmed < Duration::from_secs(3),
        "the change took {programmed:?}"
    );
    assert!(
        core_share < 0.5,
        "the daemon used {core_share:.2} of a core"
    );
    assert_eq!(open + open_again, 0, "attacking connections never closed");
    assert!(
        longest <= Duration::from_secs(60),
        "a connection lived {longest:?}"
    );
    // What the caps admit at once takes a few MiB; the allocator keeps the pages it got
    // back for the next use instead of returning them.
    assert!(
        after.rss_kib <= before.rss_kib + 8 * 1024,
        "memory: {} KiB before, {} KiB after",
        before.rss_kib,
        after.rss_kib
    );
    assert!(
        after_again.rss_kib <= after.rss_kib + 4 * 1024,
        "memory grows with each attack: {after:?}, then {after_again:?}"
    );
    assert!(
        shed.values().sum::<f64>() >= (2 * (IDLE + SLOW)) as f64 * 0.9,
        "{shed:?}"
    );
}

/// Waits (at most 75 s) until the attack saw each of its connections closed: how many
/// were not, and the longest a connection lived.
fn ended(attacker: JoinHandle<Vec<Held>>, stop: &AtomicBool) -> (usize, Duration) {
    let deadline = Instant::now() + Duration::from_secs(75);
    while !attacker.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let held = attacker.join().expect("attacker");
    let open = held.iter().filter(|h| h.closed.is_none()).count();
    let longest = held
        .iter()
        .filter_map(|h| Some(h.closed? - h.opened))
        .max()
        .unwrap_or_default();
    (open, longest)
}

/// A node namespace with the daemon (allowed `open_files`) against an API server there,
/// answering `/healthz` (and the health check, when `health_check`) to the client
/// namespace.
struct Node {
    topology: Topology,
    api: FakeApi,
    daemon: Daemon,
    client: String,
}

impl Node {
    fn start(name: &str, open_files: u64, health_check: bool) -> Node {
        // This process opens thousands of connections: its own limit must allow them.
        allow_open_files(16_384);
        let topology = Topology::new(name);
        let api = api(&topology);
        let daemon = daemon(&topology, &api, open_files);
        let client = topology.ns("client");
        in_client(&client, move || {
            within(
                Duration::from_secs(30),
                "/healthz and the health check",
                || {
                    get(HEALTHZ, "/healthz", Duration::from_secs(1)).is_ok_and(|(c, _)| c == 200)
                        && (!health_check
                            || get(HEALTH_CHECK, "/", Duration::from_secs(1))
                                .is_ok_and(|(c, _)| c == 200))
                },
            );
        });
        Node {
            topology,
            api,
            daemon,
            client,
        }
    }

    fn pid(&self) -> u32 {
        self.daemon.0.id()
    }

    /// An EndpointSlice change (redis gains endpoint `address`): how long it took to
    /// reach the kernel.
    fn endpoint_change(&self, address: &str) -> Duration {
        let mut slice = object("redis-7xk2p");
        slice["endpoints"]
            .as_array_mut()
            .expect("endpoints")
            .push(serde_json::json!({
                "addresses": [address], "conditions": {"ready": true}, "nodeName": "node-a",
            }));
        self.api.apply(slice);
        within(
            Duration::from_secs(10),
            "the new endpoint in the kernel",
            || listing(&self.topology).contains(address),
        )
    }
}

/// Runs `work` in namespace `ns`.
fn in_client<T: Send + 'static>(ns: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    netns::in_named_netns(ns, work).expect("client namespace")
}

#[test]
fn out_of_descriptors_accepts_back_off_and_are_counted() {
    if !kernel_available("out_of_descriptors_accepts_back_off_and_are_counted") {
        return;
    }
    // Too few for the caps (half of 40): the process runs out before they are reached.
    let node = Node::start("emfile", 40, false);
    let (pid, client) = (node.pid(), node.client.clone());
    let stop = Arc::new(AtomicBool::new(false));
    // Fewer than the listener's backlog, which holds those the daemon cannot accept.
    let (attacker, all_open) = attack(&client, &[HEALTHZ], (200, 0), stop.clone());
    all_open.recv().expect("the attack opened its connections");
    let (start, cpu_start) = (Instant::now(), usage(pid).cpu);
    std::thread::sleep(Duration::from_secs(5));
    let programmed = node.endpoint_change("10.244.1.31");
    let core_share =
        usage(pid).cpu.saturating_sub(cpu_start).as_secs_f64() / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    drop(attacker.join().expect("attacker"));
    in_client(&client, || {
        within(Duration::from_secs(20), "/healthz after the attack", || {
            get(HEALTHZ, "/healthz", Duration::from_secs(1)).is_ok_and(|(c, _)| c == 200)
        });
    });
    let errors = samples(
        &metrics(&node.topology),
        "nftproxy_http_accept_errors_total",
    );
    eprintln!(
        "out of descriptors: accept errors {errors:?}, {core_share:.3} of a core, change programmed after {programmed:?}"
    );
    assert!(
        errors
            .iter()
            .any(|(series, n)| series.contains("EMFILE") && *n > 0.0),
        "{errors:?}"
    );
    assert!(
        core_share < 0.5,
        "the daemon used {core_share:.2} of a core"
    );
    assert!(
        programmed < Duration::from_secs(3),
        "the change took {programmed:?}"
    );
}
