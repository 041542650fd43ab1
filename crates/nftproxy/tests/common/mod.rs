//! Shared by the tests of the binary: a node namespace with client, pod and backend
//! namespaces over veth, echo servers in the backends, probes, a guard for a running
//! nftproxy, and polling.
//!
//! Topology (all namespaces created here, deleted on drop; no host address is touched):
//!
//! ```text
//!  client 192.168.50.100 ──┐            ┌── be1 10.244.1.10, 10.244.1.20 (node-a: local)
//!                          ├── node ────┼── be2 10.244.2.10, 10.244.2.20 (node-b: remote)
//!  pod    10.244.3.10 ─────┘ 192.168.50.10 (node IP), forwarding, nftproxy rules
//! ```
#![allow(dead_code, reason = "each test binary uses part of it")]

pub mod kustomize;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nftproxy_netlink::netns;
use nftproxy_testkit::SEED_NODE_FLAGS;

pub const TIMEOUT: Duration = Duration::from_secs(2);

pub fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Sets a sysctl (`name=value`) of network namespace `ns`.
pub fn sysctl(ns: &str, setting: &str) {
    let status = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw", setting])
        .status()
        .expect("sysctl runs");
    assert!(status.success(), "sysctl {setting} in {ns}");
}

/// Named namespaces, deleted when dropped (also when a test fails).
pub struct Topology {
    prefix: String,
    pub dir: PathBuf,
}

impl Topology {
    pub fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Namespaces named after the process and `test`, so tests can run side by side.
    pub fn new(test: &str) -> Topology {
        let prefix = format!("nftp{}{test}-", std::process::id());
        let dir = std::env::temp_dir().join(format!("{prefix}manifests"));
        let topology = Topology { prefix, dir };
        for name in ["node", "client", "pod", "be1", "be2"] {
            ip(&["netns", "add", &topology.ns(name)]);
            ip(&["-n", &topology.ns(name), "link", "set", "lo", "up"]);
        }
        let node = topology.ns("node");
        let links: [(&str, &str, &[&str], &str); 4] = [
            (
                "client",
                "192.168.50.10/24",
                &["192.168.50.100/24"],
                "192.168.50.10",
            ),
            ("pod", "10.244.3.1/24", &["10.244.3.10/24"], "10.244.3.1"),
            (
                "be1",
                "10.244.1.1/24",
                &["10.244.1.10/24", "10.244.1.20/24"],
                "10.244.1.1",
            ),
            (
                "be2",
                "10.244.2.1/24",
                &["10.244.2.10/24", "10.244.2.20/24"],
                "10.244.2.1",
            ),
        ];
        for (peer, node_addr, peer_addrs, gateway) in links {
            let peer_ns = topology.ns(peer);
            let (a, b) = (format!("n-{peer}"), format!("eth-{peer}"));
            ip(&[
                "-n", &node, "link", "add", &a, "type", "veth", "peer", "name", &b, "netns",
                &peer_ns,
            ]);
            ip(&["-n", &node, "addr", "add", node_addr, "dev", &a]);
            ip(&["-n", &node, "link", "set", &a, "up"]);
            for addr in peer_addrs {
                ip(&["-n", &peer_ns, "addr", "add", addr, "dev", &b]);
            }
            ip(&["-n", &peer_ns, "link", "set", &b, "up"]);
            ip(&["-n", &peer_ns, "route", "add", "default", "via", gateway]);
        }
        // Like a real node, ours has a default route (the client namespace is its
        // upstream), so traffic to addresses nothing serves reaches the filter hooks.
        ip(&[
            "-n",
            &node,
            "route",
            "add",
            "default",
            "via",
            "192.168.50.100",
        ]);
        // The load balancer delivers its VIPs to this node.
        for vip in ["192.168.50.200/32", "192.168.50.201/32"] {
            ip(&[
                "-n",
                &topology.ns("client"),
                "route",
                "add",
                vip,
                "via",
                "192.168.50.10",
            ]);
        }
        sysctl(&node, "net.ipv4.ip_forward=1");
        topology
    }

    /// Programs the node with `nftproxy --once` on the seed examples plus `extra`.
    pub fn program(&self, extra: &str) {
        self.program_with(extra, &[]);
    }

    /// [`Topology::program`] with more flags; what nftproxy logged.
    pub fn program_with(&self, extra: &str, flags: &[&str]) -> String {
        std::fs::create_dir_all(&self.dir).expect("temp dir");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for entry in std::fs::read_dir(repo.join("hack/examples/seed")).expect("seed examples") {
            let path = entry.expect("entry").path();
            std::fs::copy(&path, self.dir.join(path.file_name().expect("file name")))
                .expect("copy");
        }
        std::fs::write(self.dir.join("extra.yaml"), extra).expect("write");
        let output = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns("node"),
                env!("CARGO_BIN_EXE_nftproxy"),
                "--once",
            ])
            .args(SEED_NODE_FLAGS)
            .args(flags)
            .arg("--manifests")
            .arg(&self.dir)
            .output()
            .expect("nftproxy runs");
        let log = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{log}");
        log
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for name in ["node", "client", "pod", "be1", "be2"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(name)])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Echo servers in a backend namespace: TCP 6379 and 3000, UDP 5353. Each answers one
/// line, "NAME CLIENT-IP ENDPOINT-IP:PORT", the last being the address the connection
/// reached (so that a split is judged per endpoint, not per namespace). Returns once
/// every socket is bound: a connection made right after is answered, not refused.
pub fn serve(ns: String, name: &'static str, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    let (bound, listening) = std::sync::mpsc::channel();
    let server = netns::spawn_in_named_netns(&ns, move || {
        // `::` takes IPv4 connections too (as IPv4-mapped addresses, written back plain).
        let listeners: Vec<TcpListener> = [6379, 3000]
            .iter()
            .map(|port| TcpListener::bind(("::", *port)).expect("bind"))
            .collect();
        // One UDP socket per address: a wildcard socket cannot tell where a datagram went.
        let udp: Vec<UdpSocket> = local_addresses()
            .into_iter()
            .map(|ip| UdpSocket::bind((ip, 5353)).expect("bind udp"))
            .collect();
        for socket in &udp {
            socket.set_nonblocking(true).expect("nonblocking");
        }
        for listener in &listeners {
            listener.set_nonblocking(true).expect("nonblocking");
        }
        let _ = bound.send(());
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) {
            let mut idle = true;
            for listener in &listeners {
                if let Ok((mut stream, peer)) = listener.accept() {
                    idle = false;
                    let _ = stream.set_nonblocking(false);
                    let local = stream
                        .local_addr()
                        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()).to_string())
                        .unwrap_or_default();
                    let _ = writeln!(stream, "{name} {} {local}", peer.ip().to_canonical());
                    // Then it echoes whatever the client sends until it closes, so that
                    // a connection can stay open across a restart or a repair.
                    std::thread::spawn(move || echo(stream));
                }
            }
            for socket in &udp {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    idle = false;
                    let local = socket
                        .local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    let answer = format!("{name} {} {local}\n", peer.ip());
                    let _ = socket.send_to(answer.as_bytes(), peer);
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    })
    .expect("backend namespace");
    // A server that failed to bind drops its sender without a word: its panic shows
    // when the caller joins it.
    let _ = listening.recv();
    server
}

/// The IPv4 addresses of the calling thread's network namespace, loopback left out.
fn local_addresses() -> Vec<std::net::Ipv4Addr> {
    // A child forked from this thread lives in the namespace the thread entered.
    let output = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .expect("ip runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .filter(|ip: &std::net::Ipv4Addr| !ip.is_loopback())
        .collect()
}

#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Backend name, the client address it saw, and the endpoint (`ip:port`) reached.
    Answered(String, String, String),
    Refused,
    TimedOut,
}

pub fn tcp(addr: SocketAddr) -> Outcome {
    match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(stream) => {
            stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
            let mut line = String::new();
            match BufReader::new(stream).read_line(&mut line) {
                Ok(_) => answered(&line),
                Err(_) => Outcome::TimedOut,
            }
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Outcome::Refused,
        Err(_) => Outcome::TimedOut,
    }
}

pub fn udp(addr: SocketAddr) -> Outcome {
    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
    socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    socket.send_to(b"ping", addr).expect("send");
    let mut buf = [0u8; 512];
    match socket.recv_from(&mut buf) {
        Ok((n, _)) => answered(&String::from_utf8_lossy(&buf[..n])),
        Err(_) => Outcome::TimedOut,
    }
}

/// A backend's answer line, "NAME CLIENT-IP ENDPOINT"; an empty line (a connection closed
/// before the answer) is not an answer.
fn answered(line: &str) -> Outcome {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words[..] {
        [name, client, endpoint] => Outcome::Answered(name.into(), client.into(), endpoint.into()),
        _ => Outcome::TimedOut,
    }
}

/// Runs `probe` `count` times from inside namespace `ns`.
pub fn from(
    ns: String,
    count: usize,
    probe: impl Fn() -> Outcome + Send + 'static,
) -> Vec<Outcome> {
    netns::in_named_netns(&ns, move || (0..count).map(|_| probe()).collect())
        .expect("client thread")
}

/// Echoes lines back until the peer closes.
fn echo(stream: TcpStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if writeln!(writer, "{line}").is_err() {
            return;
        }
    }
}

/// A connection held open through a backend's echo server.
pub struct LongLived {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LongLived {
    /// Connects (from the calling thread's namespace) and reads the greeting.
    pub fn open(to: SocketAddr) -> LongLived {
        let stream = TcpStream::connect_timeout(&to, TIMEOUT).expect("long-lived connection");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let writer = stream.try_clone().expect("clone");
        let mut reader = BufReader::new(stream);
        let mut greeting = String::new();
        reader.read_line(&mut greeting).expect("greeting");
        LongLived { reader, writer }
    }

    /// Whether a line sent comes back.
    pub fn alive(&mut self) -> bool {
        let mut line = String::new();
        writeln!(self.writer, "ping").is_ok()
            && self.reader.read_line(&mut line).is_ok()
            && line == "ping\n"
    }
}

/// How many outcomes each backend namespace (or failure) had.
pub fn split(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for outcome in outcomes {
        let key = match outcome {
            Outcome::Answered(name, ..) => name.clone(),
            other => format!("{other:?}"),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// Every connection was answered, each by one of `endpoints` (`ip:port`), and each
/// endpoint's share is what an even split gives: within 4.5 standard deviations of
/// total / n (a correct split fails this about once in 150,000 runs per endpoint).
pub fn assert_split(what: &str, outcomes: &[Outcome], endpoints: &[&str]) {
    let mut counts: BTreeMap<&str, usize> = endpoints.iter().map(|e| (*e, 0)).collect();
    for outcome in outcomes {
        match outcome {
            Outcome::Answered(_, _, endpoint) if counts.contains_key(endpoint.as_str()) => {
                *counts.entry(endpoint.as_str()).or_default() += 1;
            }
            other => panic!("{what}: not every connection answered by an endpoint: {other:?}"),
        }
    }
    let total = outcomes.len() as f64;
    let p = 1.0 / endpoints.len() as f64;
    let sd = (total * p * (1.0 - p)).sqrt();
    for (endpoint, n) in &counts {
        let deviation = (*n as f64 - total * p).abs();
        assert!(
            deviation <= 4.5 * sd,
            "{what}: uneven split at {endpoint}: {counts:?}"
        );
    }
    eprintln!("{what}: {counts:?}");
}

pub fn addr(text: &str) -> SocketAddr {
    text.parse().expect("literal address")
}

/// A running nftproxy and its log file: killed when dropped, so a failing test leaves
/// nothing running, and its log shown when the test fails.
pub struct Daemon(pub Child, pub PathBuf);

impl Daemon {
    /// Starts `command`, its standard error going to the file `log`.
    pub fn spawn(command: &mut Command, log: PathBuf) -> Daemon {
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("nftproxy starts");
        Daemon(child, log)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            eprintln!("--- nftproxy's log ---\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.1);
    }
}

/// Polls `check` every 20 ms until it holds or `limit` passes; how long it took.
pub fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what}: not within {limit:?}");
}

/// `GET path` to `address` from inside network namespace `ns`: the status code and the
/// body (None: no answer within 10 s).
pub fn http_get(ns: &str, address: &'static str, path: &str) -> Option<(u16, String)> {
    let path = path.to_owned();
    netns::in_named_netns(ns, move || {
        let mut stream = TcpStream::connect(address).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
        let mut response = String::new();
        std::io::Read::read_to_string(&mut stream, &mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    })
    .expect("client thread")
}

/// One named network namespace with its loopback up (a node, for tests that need no
/// [`Topology`]), deleted on drop.
pub struct Namespace(pub String);

impl Namespace {
    /// A namespace named after the process and `test`.
    pub fn new(test: &str) -> Namespace {
        let name = format!("nftp{}{test}", std::process::id());
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Namespace(name)
    }

    /// `nft list table ip nftproxy` here (empty when there is none).
    pub fn table(&self) -> String {
        let listed = Command::new("ip")
            .args([
                "netns", "exec", &self.0, "nft", "list", "table", "ip", "nftproxy",
            ])
            .output()
            .expect("nft runs");
        String::from_utf8_lossy(&listed.stdout).into_owned()
    }

    /// `net.netfilter.NAME` as this namespace sees it.
    pub fn netfilter_sysctl(&self, name: &str) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.0, "sysctl", "-n"])
            .arg(format!("net.netfilter.{name}"))
            .output()
            .expect("sysctl runs");
        assert!(output.status.success(), "{name}");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
