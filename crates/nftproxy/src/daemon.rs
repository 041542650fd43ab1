//! The long-running modes: the sync loop fed by manifest files or by the API server, with
//! the health and metrics servers beside it, until SIGTERM or SIGINT.
//!
//! Invariant: the rules stay in the kernel when the process ends or its input is
//! unavailable (as kube-proxy leaves them); only a successful build of complete input
//! ever changes them.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nftproxy_kube_source::{KubeSource, NODE_WAIT};
use nftproxy_model::{Build, DaemonConfig, Diagnostic, HealthCheck, IpFamily, Snapshot};
use nftproxy_netlink::{ConntrackSocket, NetlinkBackend};
use nftproxy_nft::Scopes;
use nftproxy_proxier::runner::{self, Input, Source, Timing};
use nftproxy_proxier::{Desired, Monitor, Proxier};

use crate::counters::Counters;
use tracing::{info, warn};

use crate::addresses::LocalAddresses;
use crate::health_check::HealthCheckServers;
use crate::http::Connections;
use crate::{http, log_broken, log_diagnostic, log_diagnostics, source};

/// The pipeline of the long-running modes, on this network namespace's kernel.
pub type KernelProxier = Proxier<NetlinkBackend, ConntrackSocket>;

/// Where the long-running mode reads the cluster from.
pub enum Mode {
    /// Manifest files, polled.
    Files(Files),
    /// The API server, watched.
    Api(Api),
}

/// The runtime of the long-running modes: two workers, so that the HTTP servers answer
/// while a sync holds the other.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Runs the daemon on `runtime` until SIGTERM or SIGINT.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    mut proxier: KernelProxier,
    config: &DaemonConfig,
    counters: Option<Arc<Counters>>,
    connections: Arc<Connections>,
    mode: Mode,
) -> Result<(), String> {
    runtime.block_on(async {
        let monitor = proxier.monitor().clone();
        if let Some(address) = config.healthz_bind_address {
            http::serve(
                connections.server("healthz"),
                connections.clone(),
                address,
                http::health_handler(monitor.clone()),
            );
        }
        if let Some(address) = config.metrics_bind_address {
            http::serve(
                connections.server("metrics"),
                connections.clone(),
                address,
                http::metrics_handler(monitor, counters),
            );
        }
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| e.to_string())?;
        let shutdown = async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            info!("shutting down; the rules stay in place");
        };
        let timing = Timing {
            min_sync_period: config.min_sync_period,
            sync_period: config.sync_period,
        };
        match mode {
            Mode::Files(mut files) => runner::run(&mut proxier, timing, &mut files, shutdown).await,
            Mode::Api(mut api) => runner::run(&mut proxier, timing, &mut api, shutdown).await,
        };
        Ok(())
    })
}

/// What follows a successful sync, for either source: the health-check servers of the
/// build that was programmed, and after the first, the clean-up of what kube-proxy left.
pub struct AfterSync {
    monitor: Arc<Monitor>,
    health_checks: HealthCheckServers,
    /// Of the build handed to the sync loop last, not yet in the kernel: where and what
    /// to serve.
    pending: Option<(Vec<std::net::IpAddr>, Vec<HealthCheck>)>,
    /// kube-proxy's leftovers are still to be removed (once per start, once synced).
    cleanup_kube_proxy: bool,
}

impl AfterSync {
    /// Reporting to `monitor`, serving health checks within `connections`' caps;
    /// removing kube-proxy's leftovers after the first sync when `cleanup_kube_proxy`.
    pub fn new(
        monitor: Arc<Monitor>,
        connections: Arc<Connections>,
        cleanup_kube_proxy: bool,
    ) -> AfterSync {
        AfterSync {
            health_checks: HealthCheckServers::new(monitor.clone(), connections),
            monitor,
            pending: None,
            cleanup_kube_proxy,
        }
    }

    /// `build` is what the next sync programs.
    fn built(&mut self, build: &Build) {
        self.pending = Some((build.node_port_ips(), build.health_checks()));
    }

    /// The last build is in the kernel (said again after every periodic sync, which
    /// retries the health checks that could not be served).
    async fn synced(&mut self) {
        if let Some((addresses, checks)) = self.pending.take() {
            self.health_checks.want(addresses, checks);
        }
        self.health_checks.sync().await;
        if std::mem::take(&mut self.cleanup_kube_proxy) {
            let removed = runner::off_the_workers(|| match NetlinkBackend::open() {
                Ok(mut backend) => crate::kube_proxy::clean(&mut backend),
                Err(e) => {
                    warn!(error = %e, "cannot open netlink to remove kube-proxy's rules");
                    0
                }
            });
            self.monitor.metrics.kube_proxy_cleaned(removed);
        }
    }
}

/// The file source: re-reads the manifests when their fingerprint changes, checked every
/// `minSyncPeriod`, and rebuilds when the interface addresses change.
pub struct Files {
    paths: Vec<PathBuf>,
    period: Duration,
    /// When the next poll is due (kept when the sync loop drops a wait for it).
    next_poll: Option<tokio::time::Instant>,
    fingerprint: Option<u64>,
    /// The objects of the last answer.
    last: Snapshot,
    addresses: LocalAddresses,
    first: bool,
    after: AfterSync,
}

impl Files {
    /// A file source polled every `period`, whose first answer is what the proxier was
    /// built from: `last`, the files as they are.
    pub fn new(
        paths: Vec<PathBuf>,
        period: Duration,
        after: AfterSync,
        last: Snapshot,
        addresses: LocalAddresses,
    ) -> Files {
        Files {
            next_poll: None,
            fingerprint: source::fingerprint(&paths).ok(),
            paths,
            period,
            last,
            addresses,
            first: true,
            after,
        }
    }

    /// `last` built again over the current interface addresses.
    fn rebuild(&mut self, desired: &mut Desired) -> Scopes {
        self.last.local_addresses = self.addresses.addresses();
        let scopes = desired.update(&self.last);
        self.addresses.log_choices(desired.built());
        self.after.built(desired.built());
        scopes
    }
}

impl Source for Files {
    async fn changed(&mut self) {
        let at = *self
            .next_poll
            .get_or_insert_with(|| tokio::time::Instant::now() + self.period);
        tokio::select! {
            () = tokio::time::sleep_until(at) => self.next_poll = None,
            () = self.addresses.changed() => {}
        }
    }

    fn input(&mut self, desired: &mut Desired) -> Input {
        let moved = self.addresses.refresh();
        if std::mem::take(&mut self.first) {
            // The addresses may have moved since the first build read them.
            if moved || self.last.local_addresses != self.addresses.addresses() {
                self.rebuild(desired);
            } else {
                self.after.built(desired.built());
            }
            return Input::Changed(Scopes::everything());
        }
        let now = match source::fingerprint(&self.paths) {
            Ok(now) => now,
            Err(e) => return Input::Unavailable(e.to_string()),
        };
        if self.fingerprint == Some(now) {
            return if moved {
                Input::Changed(self.rebuild(desired))
            } else {
                Input::Unchanged
            };
        }
        self.fingerprint = Some(now);
        info!("manifests changed");
        // A broken document is most likely a file caught half-written: rather than drop
        // its Services, keep the rules as they are until it parses again.
        match source::load(&self.paths) {
            Ok(loaded) if loaded.errors.is_empty() => {
                self.last = loaded.snapshot;
                let scopes = self.rebuild(desired);
                log_diagnostics(loaded.diagnostics, desired.built());
                Input::Changed(scopes)
            }
            Ok(loaded) => {
                loaded.errors.iter().for_each(log_broken);
                if moved {
                    return Input::Changed(self.rebuild(desired));
                }
                Input::Unavailable(format!(
                    "{} manifest document(s) could not be parsed",
                    loaded.errors.len()
                ))
            }
            Err(_) if moved => Input::Changed(self.rebuild(desired)),
            Err(e) => Input::Unavailable(e.to_string()),
        }
    }

    async fn synced(&mut self) {
        self.after.synced().await;
    }
}

/// The API source: rebuilds when a watched object changed, once the initial lists are
/// complete.
pub struct Api {
    source: KubeSource,
    addresses: LocalAddresses,
    after: AfterSync,
    /// The store generation the last answer was built from.
    seen: Option<u64>,
    /// What was reported as left out last time, so that each is logged once.
    diagnostics: BTreeSet<Diagnostic>,
    waiting_logged: bool,
    /// Trigger times of the endpoint changes in the tables not yet in the kernel.
    triggers: Vec<(IpFamily, jiff::Timestamp)>,
}

impl Api {
    /// An API source over running watchers.
    pub fn new(source: KubeSource, after: AfterSync, addresses: LocalAddresses) -> Api {
        Api {
            source,
            addresses,
            after,
            seen: None,
            diagnostics: BTreeSet::new(),
            waiting_logged: false,
            triggers: Vec::new(),
        }
    }

    /// Endpoint changes that are now programmed: their network programming latency.
    fn observe_triggers(&mut self) {
        let monitor = &self.after.monitor;
        let now = jiff::Timestamp::now();
        for (family, time) in self.triggers.drain(..) {
            let latency = now.duration_since(time).unsigned_abs();
            let family = nftproxy_render::nft_family(family);
            monitor.metrics.network_programmed(family, latency);
        }
    }
}

impl Source for Api {
    async fn changed(&mut self) {
        tokio::select! {
            () = self.source.changed() => {}
            () = self.addresses.changed() => {}
        }
    }

    fn input(&mut self, desired: &mut Desired) -> Input {
        let eligible = self.source.node_eligible();
        self.after.monitor.health.set_node_eligible(eligible);
        let moved = self.addresses.refresh();
        let generation = self.source.generation();
        if self.seen == Some(generation) && !moved {
            return Input::Unchanged;
        }
        let Some(mut snapshot) = self.source.snapshot() else {
            if !std::mem::replace(&mut self.waiting_logged, true) {
                info!("waiting for the initial lists of Services, EndpointSlices and this Node");
            }
            return Input::Unchanged;
        };
        self.seen = Some(generation);
        self.triggers.extend(self.source.take_trigger_times());
        let changes = self.source.take_changes();
        let metrics = &self.after.monitor.metrics;
        metrics.changes_seen(changes.services, changes.endpoint_slices);
        snapshot.local_addresses = self.addresses.addresses();
        let scopes = desired.update(&snapshot);
        let built = desired.built();
        self.addresses.log_choices(built);
        self.after.built(built);
        log_new(&mut self.diagnostics, &built.diagnostics);
        Input::Changed(scopes)
    }

    async fn synced(&mut self) {
        self.after.synced().await;
        self.observe_triggers();
    }
}

/// Logs the diagnostics not in `seen` (those of the last build), then keeps them as seen.
fn log_new(seen: &mut BTreeSet<Diagnostic>, diagnostics: &[Diagnostic]) {
    let now: BTreeSet<Diagnostic> = diagnostics.iter().cloned().collect();
    now.difference(seen).for_each(log_diagnostic);
    *seen = now;
}

/// For the one-shot modes against the API server: the cluster once the initial lists
/// and this node's Node are complete (see [`NODE_WAIT`]); gives up after a minute.
pub async fn initial_snapshot(
    client: nftproxy_kube_source::Client,
    node_name: &str,
) -> Result<Snapshot, String> {
    const PATIENCE: Duration = Duration::from_secs(60);
    let source = KubeSource::start(client, node_name, NODE_WAIT);
    let ready = async {
        loop {
            let changed = source.changed();
            if let Some(snapshot) = source.snapshot() {
                return snapshot;
            }
            changed.await;
        }
    };
    tokio::time::timeout(PATIENCE, ready).await.map_err(|_| {
        format!(
            "the API server did not complete the lists of Services, EndpointSlices and \
             this Node within {} s",
            PATIENCE.as_secs()
        )
    })
}
