//! The daemon as users run it: the `nftproxy` binary against an in-process API server
//! holding a synthetic cluster, timed from its start to the end of its first sync (the
//! lists' JSON decoded included), then restarted with nothing changed, while a client
//! asks `/healthz` every 10 ms throughout.
//!
//! Invariant: the daemon runs in this worker's network namespace and is stopped before
//! the worker returns; every `/healthz` request is counted, answered or not.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nftproxy_testkit::fake_api::FakeApi;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::synth::{self, CLUSTER_CIDR, NODE_IP, NODE_NAME};

/// Where the daemon serves `/healthz`.
const HEALTHZ: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 10256);
/// How often the client asks `/healthz`.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// Longer than any answer may take before it counts as not answered.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest a first sync may take before the run fails.
const PATIENCE: Duration = Duration::from_secs(600);

/// One start of the daemon up to the end of its first sync.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Start {
    /// Process start to the end of the first sync.
    pub seconds: f64,
    /// Operations the first sync sent.
    pub operations: u64,
    /// The daemon's peak RSS at the end of the first sync.
    pub rss_kb: u64,
}

/// How `/healthz` answered while the daemon started, loaded and restarted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Probes {
    /// Requests sent once the server first answered.
    pub requests: usize,
    /// Requests not answered within [`PROBE_TIMEOUT`] (or refused).
    pub unanswered: usize,
    /// Median answer time.
    pub median_seconds: f64,
    /// 99th percentile.
    pub p99_seconds: f64,
    /// The slowest answer.
    pub max_seconds: f64,
}

/// The daemon's cold start and restart against the API server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonReport {
    /// Services.
    pub services: u32,
    /// Endpoints per Service.
    pub endpoints: u32,
    /// Into an empty network namespace.
    pub cold: Start,
    /// Stopped and started again, nothing changed.
    pub restart: Start,
    /// `/healthz` during both.
    pub healthz: Probes,
}

/// The `nftproxy` binary built beside this one.
pub(crate) fn nftproxy_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let binary = exe.with_file_name("nftproxy");
    if binary.exists() {
        Ok(binary)
    } else {
        Err(format!(
            "{} is missing: build it with `cargo build --release -p nftproxy` (hack/bench.sh does)",
            binary.display()
        ))
    }
}

/// A running daemon and the "synced" lines of its log.
pub(crate) struct Daemon {
    child: Child,
    synced: Receiver<u64>,
    started: Instant,
}

impl Daemon {
    pub(crate) fn start(binary: &Path, api: &FakeApi, extra: &[&str]) -> Result<Daemon, String> {
        let started = Instant::now();
        let mut child = Command::new(binary)
            .args(["--master", &api.url(), "--node-name", NODE_NAME])
            .args(extra)
            .args(["--cluster-cidr", CLUSTER_CIDR])
            .args(["--healthz-bind-address", &HEALTHZ.to_string()])
            .args(["--metrics-bind-address", "127.0.0.1:10249"])
            .args(["--logging-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", binary.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, synced) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(event) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let fields = &event["fields"];
                if fields["message"] == "synced" {
                    let _ = tx.send(fields["operations"].as_u64().unwrap_or(0));
                } else if event["level"] == "ERROR" || event["level"] == "WARN" {
                    eprintln!("nftproxy: {line}");
                }
            }
        });
        Ok(Daemon {
            child,
            synced,
            started,
        })
    }

    /// Waits for the end of the first sync.
    pub(crate) fn first_sync(&mut self) -> Result<Start, String> {
        let operations = self
            .synced
            .recv_timeout(PATIENCE)
            .map_err(|_| "the daemon did not complete its first sync".to_owned())?;
        let seconds = self.started.elapsed().as_secs_f64();
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        Ok(Start {
            seconds,
            operations,
            rss_kb: crate::worker::status_field(&status, "VmHWM"),
        })
    }

    /// SIGTERM, as the kubelet stops a pod, and waits for the process to end.
    pub(crate) fn stop(mut self) -> Result<(), String> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().map_err(|e| e.to_string())?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` from the daemon: the whole answer, status line and headers included.
pub(crate) fn get(address: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, PROBE_TIMEOUT)?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// One `GET /healthz`: whether an HTTP answer came back.
fn ask(address: SocketAddr) -> bool {
    get(address, "/healthz").is_ok_and(|text| text.starts_with("HTTP/1.1 "))
}

/// What the client is told by the run.
#[derive(Default)]
struct Control {
    /// The run is over.
    stop: AtomicBool,
    /// Moves on at each daemon stop and start: odd while no daemon is meant to serve.
    epoch: AtomicUsize,
}

impl Control {
    fn next(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

/// Asks `/healthz` every [`PROBE_EVERY`] until told to stop; a request unanswered counts
/// only when the same daemon answered an earlier one and is still meant to serve.
fn probe(control: Arc<Control>) -> JoinHandle<(Vec<Duration>, usize)> {
    std::thread::spawn(move || {
        let mut times = Vec::new();
        let mut unanswered = 0;
        // The epoch in which the daemon answered.
        let mut serving = None;
        while !control.stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let epoch = control.epoch.load(Ordering::SeqCst);
            if epoch.is_multiple_of(2) {
                let answered = ask(HEALTHZ);
                let still = control.epoch.load(Ordering::SeqCst) == epoch;
                if answered {
                    times.push(started.elapsed());
                    serving = Some(epoch);
                } else if still && serving == Some(epoch) {
                    unanswered += 1;
                }
            }
            std::thread::sleep(PROBE_EVERY.saturating_sub(started.elapsed()));
        }
        (times, unanswered)
    })
}

/// The synthetic cluster as API objects, with this node's Node.
pub(crate) fn populate(api: &FakeApi, services: u32, endpoints: u32) -> Result<(), String> {
    api.apply(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE_NAME},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP.to_string()}]},
    }));
    for spec in synth::specs(services, endpoints) {
        let service = serde_json::to_value(synth::service(&spec)).map_err(|e| e.to_string())?;
        let slice =
            serde_json::to_value(synth::endpoint_slice(&spec)).map_err(|e| e.to_string())?;
        api.apply(service);
        api.apply(slice);
    }
    Ok(())
}

/// The daemon's first sync with `services` × `endpoints` in the API server, then a
/// SIGTERM: the yardstick of the manifest path's runs (its tables stay, as always).
pub(crate) fn cold_start(services: u32, endpoints: u32) -> Result<Start, String> {
    let binary = nftproxy_binary()?;
    crate::worker::ip(&["link", "set", "lo", "up"])?;
    let api = FakeApi::start();
    populate(&api, services, endpoints)?;
    let mut daemon = Daemon::start(&binary, &api, &[])?;
    let cold = daemon.first_sync()?;
    daemon.stop()?;
    Ok(cold)
}

/// The daemon's cold start and restart with `services` × `endpoints` in the API server.
pub fn run(services: u32, endpoints: u32) -> Result<DaemonReport, String> {
    let binary = nftproxy_binary()?;
    crate::worker::ip(&["link", "set", "lo", "up"])?;
    let api = FakeApi::start();
    populate(&api, services, endpoints)?;
    let control = Arc::new(Control::default());
    let prober = probe(control.clone());
    let measured = (|| {
        let mut daemon = Daemon::start(&binary, &api, &[])?;
        let cold = daemon.first_sync()?;
        control.next();
        daemon.stop()?;
        let mut daemon = Daemon::start(&binary, &api, &[])?;
        control.next();
        let restart = daemon.first_sync()?;
        // Periodic work after the first sync (drift checks) is served too.
        std::thread::sleep(Duration::from_secs(2));
        control.next();
        daemon.stop()?;
        Ok::<_, String>((cold, restart))
    })();
    control.stop.store(true, Ordering::SeqCst);
    let (mut times, unanswered) = prober.join().map_err(|_| "the prober panicked")?;
    let (cold, restart) = measured?;
    times.sort_unstable();
    let at = |q: f64| {
        let i = ((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1));
        times.get(i).map_or(0.0, Duration::as_secs_f64)
    };
    Ok(DaemonReport {
        services,
        endpoints,
        cold,
        restart,
        healthz: Probes {
            requests: times.len() + unanswered,
            unanswered,
            median_seconds: at(0.5),
            p99_seconds: at(0.99),
            max_seconds: times.last().map_or(0.0, Duration::as_secs_f64),
        },
    })
}
