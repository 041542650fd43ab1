//! The measurements that run inside a fresh network namespace: a cold load followed by
//! single changes, and connect latency through the loaded rules.
//!
//! Invariant: each timing covers what a real sync does (build the proxy state, render,
//! plan, commit), and the kernel part is timed separately around each commit.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use std::sync::Arc;

use nftproxy_model::config::parse_cidr_list;
use nftproxy_model::{DaemonConfig, ProxyConfig, Snapshot};
use nftproxy_netlink::{ConntrackSocket, NetlinkBackend};
use nftproxy_nft::{Backend, Family, Op, Scopes, Table, Transaction};
use nftproxy_proxier::{Desired, Monitor, Proxier};
use nftproxy_render::counters::{Totals, naming_sets};
use nftproxy_render::{SHARD_BITS, TABLE_NAME};
use serde::{Deserialize, Serialize};

use crate::synth::{self, CLUSTER_CIDR, NODE_IP, NODE_NAME, PORT, Spec, TARGET_PORT};

/// One sync: what changed, how long it took, what it sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncTiming {
    /// What changed.
    pub what: String,
    /// Build + render + plan + commit.
    pub wall_seconds: f64,
    /// Time inside the kernel commits (sendmsg until the replies are read).
    pub commit_seconds: f64,
    /// The longest single commit.
    pub longest_commit_seconds: f64,
    /// Operations (table, chain, rule, set and element changes) sent.
    pub operations: usize,
}

impl SyncTiming {
    /// A step that sent nothing to the kernel, begun at `started`.
    fn without_commits(what: &str, started: Instant) -> SyncTiming {
        SyncTiming {
            what: what.to_owned(),
            wall_seconds: started.elapsed().as_secs_f64(),
            commit_seconds: 0.0,
            longest_commit_seconds: 0.0,
            operations: 0,
        }
    }
}

/// A cold load and the syncs after it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ColdReport {
    /// Services.
    pub services: u32,
    /// Endpoints per Service.
    pub endpoints: u32,
    /// Empty namespace to full ruleset: build + render + plan + commit.
    pub cold_seconds: f64,
    /// Peak RSS of the process after the cold load (it holds the objects, as the
    /// daemon's watch caches do).
    pub rss_kb: u64,
    /// Where the memory of the cold load goes.
    pub memory: Memory,
    /// The cold load, single changes, and a sync with nothing changed.
    pub syncs: Vec<SyncTiming>,
    /// Build + render + plan of the whole cluster from nothing (as after a restart),
    /// without the kernel.
    pub userspace_seconds: f64,
    /// With counters: what reading them costs.
    pub counter_read: Option<CounterRead>,
}

/// Reading the counters of a loaded table, as a `/metrics` scrape does.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CounterRead {
    /// Counted elements read.
    pub elements: usize,
    /// Rules with a counter read.
    pub rules: usize,
    /// Series they make.
    pub series: usize,
    /// The netlink read (best of three).
    pub read_seconds: f64,
    /// Attributing and totalling them.
    pub attribute_seconds: f64,
    /// A read-back of the whole table, for comparison.
    pub list_seconds: f64,
}

/// The process's resident set (VmRSS) after each step of the cold load, in kB: what
/// each step keeps (the allocator rarely returns memory, so each figure includes what
/// the steps before freed).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Memory {
    /// The API objects, as the daemon's watch caches hold them.
    pub objects_kb: u64,
    /// Plus the proxy state built from them.
    pub built_kb: u64,
    /// Plus the rendered tables.
    pub rendered_kb: u64,
    /// Plus the reconciler's copy of what the kernel holds, after the commits.
    pub synced_kb: u64,
}

/// Connect latency through the rules.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencyReport {
    /// Services loaded.
    pub services: u32,
    /// Whether the rules counted connections.
    pub counters: bool,
    /// Connections measured.
    pub connects: usize,
    /// Median time of `connect()` to the ClusterIP.
    pub median_seconds: f64,
    /// 90th percentile.
    pub p90_seconds: f64,
}

/// A backend that times each commit.
struct Timed {
    inner: NetlinkBackend,
    commits: Vec<Duration>,
}

impl Backend for Timed {
    type Error = <NetlinkBackend as Backend>::Error;

    fn list(&mut self, family: Family, table: &str) -> Result<Option<Table>, Self::Error> {
        self.inner.list(family, table)
    }

    fn apply(&mut self, tx: &Transaction) -> Result<(), Self::Error> {
        let started = Instant::now();
        let result = self.inner.apply(tx);
        self.commits.push(started.elapsed());
        result
    }

    fn generation(&mut self) -> Result<Option<u32>, Self::Error> {
        self.inner.generation()
    }

    fn changed_by_others(&mut self, table: &str) -> Result<Option<bool>, Self::Error> {
        self.inner.changed_by_others(table)
    }
}

fn config(counters: bool) -> Result<ProxyConfig, String> {
    let mut config = ProxyConfig::new(NODE_NAME);
    config.service_counters = counters;
    config.node_ips = vec![NODE_IP.into()];
    config.cluster_cidrs =
        parse_cidr_list("clusterCIDR", CLUSTER_CIDR).map_err(|e| e.to_string())?;
    Ok(config)
}

/// nftproxy's `--dry-run` text for `specs`.
pub fn dry_run_text(specs: &[Spec]) -> String {
    let Ok(config) = config(true) else {
        return String::new();
    };
    let mut desired = Desired::new(config);
    desired.update(&synth::snapshot(specs));
    desired.tables().iter().map(ToString::to_string).collect()
}

/// A `/proc/self/status` figure in kB: `VmHWM` (peak) or `VmRSS` (now).
fn status_kb(field: &str) -> u64 {
    status_field(
        &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
        field,
    )
}

/// A figure in kB of a `/proc/PID/status` text; 0 when it is not there.
pub fn status_field(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The daemon's pipeline, over a backend that times its commits (no conntrack cleanup:
/// the synthetic cluster has no UDP Services).
struct Loaded {
    proxier: Proxier<Timed, ConntrackSocket>,
    /// When set, the next sync notes the memory after its build and its render.
    memory: Option<Memory>,
}

impl Loaded {
    fn new(counters: bool) -> Result<Loaded, String> {
        let mut inner = NetlinkBackend::open().map_err(|e| e.to_string())?;
        // As the daemon does: the kernel's behaviour probed, not assumed.
        let options = nftproxy_proxier::probe::chain_deletes(&mut inner).options();
        let backend = Timed {
            inner,
            commits: Vec::new(),
        };
        let monitor = Arc::new(Monitor::new(DaemonConfig::default().sync_period));
        let desired = Desired::new(config(counters)?);
        Ok(Loaded {
            proxier: Proxier::new(desired, backend, monitor).with_options(options),
            memory: None,
        })
    }

    fn commits(&mut self) -> &mut Vec<Duration> {
        &mut self.proxier.reconciler_mut().backend_mut().commits
    }

    /// One sync of `snapshot`, as the daemon does it, timed.
    fn sync(&mut self, what: &str, snapshot: &Snapshot) -> Result<SyncTiming, String> {
        self.commits().clear();
        let started = Instant::now();
        let delta = self.proxier.build(snapshot);
        if let Some(memory) = &mut self.memory {
            memory.built_kb = status_kb("VmRSS");
        }
        let scopes = self.proxier.render(&delta);
        if let Some(memory) = &mut self.memory {
            memory.rendered_kb = status_kb("VmRSS");
        }
        let report = self.proxier.sync(&scopes).map_err(|e| e.to_string())?;
        let wall_seconds = started.elapsed().as_secs_f64();
        let commits = self.commits();
        Ok(SyncTiming {
            what: what.to_owned(),
            wall_seconds,
            commit_seconds: commits.iter().sum::<Duration>().as_secs_f64(),
            longest_commit_seconds: commits
                .iter()
                .max()
                .copied()
                .unwrap_or_default()
                .as_secs_f64(),
            operations: report.operations,
        })
    }

    /// The daemon's drift check between syncs: the generation asked and, when another
    /// program committed something (here, a table of its own: `neighbour`), whose
    /// commits touched our tables. Fails when it finds anything to repair, or when the
    /// neighbour's commit makes it read back.
    fn drift_check(&mut self, what: &str, neighbour: bool) -> Result<SyncTiming, String> {
        if neighbour {
            let mut other = NetlinkBackend::open().map_err(|e| e.to_string())?;
            let mut tx = Transaction::new(Family::Ip, "bench-neighbour");
            tx.ops.push(Op::AddTable { comment: None });
            tx.ops.push(Op::DeleteTable);
            other.apply(&tx).map_err(|e| e.to_string())?;
        }
        let started = Instant::now();
        if self.proxier.reconciler_mut().drifted() {
            return Err(format!(
                "{what}: the drift check wants our tables read back"
            ));
        }
        Ok(SyncTiming::without_commits(what, started))
    }

    /// What a repair costs before it sends anything: our tables read back and compared
    /// whole (here they are intact: 0 operations, or the run fails).
    fn read_back(&mut self, what: &str) -> Result<SyncTiming, String> {
        self.commits().clear();
        let started = Instant::now();
        self.proxier.reconciler_mut().invalidate();
        let report = self
            .proxier
            .sync(&Scopes::nothing())
            .map_err(|e| e.to_string())?;
        if report.operations > 0 {
            return Err(format!(
                "{what}: {} operations to repair",
                report.operations
            ));
        }
        Ok(SyncTiming::without_commits(what, started))
    }
}

/// Adds the next endpoint to Service `changed` and syncs.
fn add_endpoint(
    loaded: &mut Loaded,
    specs: &mut [Spec],
    snapshot: &mut Snapshot,
    changed: usize,
    what: &str,
) -> Result<SyncTiming, String> {
    let spec = &mut specs[changed];
    let next = u32::try_from(spec.endpoints.len()).map_err(|e| e.to_string())?;
    spec.endpoints.push(synth::endpoint_ip(spec.index, next));
    snapshot.endpoint_slices[changed] = (&synth::endpoint_slice(spec)).into();
    loaded.sync(what, snapshot)
}

/// Cold load of `services` × `endpoints`, then one endpoint added, one removed, one
/// Service added, one removed, and a sync with nothing changed.
pub fn cold(services: u32, endpoints: u32, counters: bool) -> Result<ColdReport, String> {
    let mut specs = synth::specs(services, endpoints);
    let mut snapshot = synth::snapshot(&specs);
    let mut loaded = Loaded::new(counters)?;
    loaded.memory = Some(Memory {
        objects_kb: status_kb("VmRSS"),
        ..Memory::default()
    });
    let cold = loaded.sync("cold load", &snapshot)?;
    let mut memory = loaded.memory.take().unwrap_or_default();
    memory.synced_kb = status_kb("VmRSS");
    let cold_seconds = cold.wall_seconds;
    let rss_kb = status_kb("VmHWM");
    let mut syncs = vec![cold];

    // Service 1 is a plain ClusterIP Service (see synth::spec), and so is its peer, the
    // next one whose ClusterIP ends in the same four bits: they share a shard of the
    // balancer. Service 1 gets a count no destination in the shard had: its rule comes.
    // The peer then joins that count, which is in use.
    let peer = specs.iter().skip(2).position(|s| {
        s.kind == synth::Kind::ClusterIp
            && !s.affinity
            && s.cluster_ip.octets()[3] & SHARD_BITS == specs[1].cluster_ip.octets()[3] & SHARD_BITS
    });
    if let Some(peer) = peer.map(|p| p + 2) {
        for (changed, what) in [
            (1, "one endpoint added (a new count: its rule comes)"),
            (peer, "one endpoint added (a count in use)"),
        ] {
            syncs.push(add_endpoint(
                &mut loaded,
                &mut specs,
                &mut snapshot,
                changed,
                what,
            )?);
        }
        // The first endpoint: the last one moves into its slot. The peer then leaves
        // the count it was the last to have: its rule goes too.
        for (changed, what) in [
            (1, "one endpoint removed (the first)"),
            (
                peer,
                "one endpoint removed (the first, the last of its count: its rule goes)",
            ),
        ] {
            let spec = &mut specs[changed];
            spec.endpoints.remove(0);
            snapshot.endpoint_slices[changed] = (&synth::endpoint_slice(spec)).into();
            syncs.push(loaded.sync(what, &snapshot)?);
        }
    }
    let extra = synth::spec(services, endpoints);
    snapshot.services.push((&synth::service(&extra)).into());
    snapshot
        .endpoint_slices
        .push((&synth::endpoint_slice(&extra)).into());
    syncs.push(loaded.sync("one service added", &snapshot)?);
    if !specs.is_empty() {
        snapshot.services.remove(0);
        snapshot.endpoint_slices.remove(0);
        syncs.push(loaded.sync("one service removed", &snapshot)?);
    }
    syncs.push(loaded.sync("nothing changed", &snapshot)?);
    syncs.push(loaded.drift_check("drift check, nothing changed (generation asked)", false)?);
    syncs.push(loaded.drift_check(
        "drift check after another program's commit elsewhere (notifications read)",
        true,
    )?);
    syncs.push(loaded.read_back("read-back and compare, as when our tables were touched")?);
    let counter_read = counters.then(counter_read).transpose()?;

    // From nothing, as after a restart: the whole build, render and diff.
    let started = Instant::now();
    let mut restarted = Desired::new(loaded.proxier.desired().config().clone());
    restarted.update(&snapshot);
    let plans = loaded
        .proxier
        .reconciler_mut()
        .plans(restarted.tables())
        .map_err(|e| e.to_string())?;
    let userspace_seconds = started.elapsed().as_secs_f64();
    if plans.iter().any(|tx| !tx.ops.is_empty()) || restarted.tables() != loaded.proxier.tables() {
        return Err("the kernel does not hold the last sync's ruleset".to_owned());
    }
    Ok(ColdReport {
        services,
        endpoints,
        cold_seconds,
        rss_kb,
        memory,
        syncs,
        userspace_seconds,
        counter_read,
    })
}

/// What a `/metrics` scrape costs with the loaded table's counters: the read (the
/// counted sets' elements and the rules with a counter, no other object) and the
/// attribution, best of three, against a read-back of the whole table.
fn counter_read() -> Result<CounterRead, String> {
    let mut backend = NetlinkBackend::open().map_err(|e| e.to_string())?;
    let mut best = CounterRead {
        read_seconds: f64::MAX,
        attribute_seconds: f64::MAX,
        list_seconds: f64::MAX,
        ..CounterRead::default()
    };
    let mut totals = Totals::default();
    for _ in 0..3 {
        let started = Instant::now();
        let reading = backend
            .counters(Family::Ip, TABLE_NAME, &naming_sets())
            .map_err(|e| e.to_string())?
            .ok_or("no table to read counters from")?;
        best.read_seconds = best.read_seconds.min(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let attributed = totals.update(&reading);
        best.attribute_seconds = best.attribute_seconds.min(started.elapsed().as_secs_f64());
        best.elements = reading.elements.len();
        best.rules = reading.rules.len();
        best.series = attributed.len();
        let started = Instant::now();
        backend
            .list(Family::Ip, TABLE_NAME)
            .map_err(|e| e.to_string())?;
        best.list_seconds = best.list_seconds.min(started.elapsed().as_secs_f64());
    }
    Ok(best)
}

pub fn ip(args: &[&str]) -> Result<(), String> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .map_err(|e| format!("ip: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {status}", args.join(" ")))
    }
}

/// Median and p90 `connect()` time to Service 0's ClusterIP with `services` Services
/// loaded. Service 0's endpoints are addresses of this namespace, so every connection
/// passes the real DNAT path and completes locally.
pub fn latency(services: u32, counters: bool) -> Result<LatencyReport, String> {
    const WARM_UP: usize = 200;
    const CONNECTS: usize = 3_000;
    let specs = synth::specs(services.max(1), 5);
    let client = Ipv4Addr::new(10, 128, 255, 254);
    ip(&["link", "set", "lo", "up"])?;
    // No dummy driver on every kernel: a veth pair whose peer stays here does as well.
    ip(&[
        "link", "add", "bench0", "type", "veth", "peer", "name", "bench1",
    ])?;
    ip(&["link", "set", "bench0", "up"])?;
    ip(&["link", "set", "bench1", "up"])?;
    ip(&["addr", "add", &format!("{client}/32"), "dev", "bench0"])?;
    for endpoint in &specs[0].endpoints {
        ip(&["addr", "add", &format!("{endpoint}/32"), "dev", "bench0"])?;
    }
    ip(&[
        "route",
        "add",
        "10.96.0.0/12",
        "dev",
        "bench0",
        "src",
        &client.to_string(),
    ])?;
    let mut loaded = Loaded::new(counters)?;
    loaded.sync("cold load", &synth::snapshot(&specs))?;

    let listener =
        TcpListener::bind(("0.0.0.0", TARGET_PORT)).map_err(|e| format!("listen: {e}"))?;
    let acceptor = std::thread::spawn(move || {
        for _ in 0..WARM_UP + CONNECTS {
            if listener.accept().is_err() {
                break;
            }
        }
    });
    let target = SocketAddr::from((specs[0].cluster_ip, PORT));
    let mut times = Vec::with_capacity(CONNECTS);
    for attempt in 0..WARM_UP + CONNECTS {
        let started = Instant::now();
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .map_err(|e| format!("connect {target}: {e}"))?;
        if attempt >= WARM_UP {
            times.push(started.elapsed());
        }
        drop(stream);
    }
    let _ = acceptor.join();
    times.sort_unstable();
    Ok(LatencyReport {
        services,
        counters,
        connects: times.len(),
        median_seconds: times[times.len() / 2].as_secs_f64(),
        p90_seconds: times[times.len() * 9 / 10].as_secs_f64(),
    })
}
