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
use nftproxy_model::{
    Build, Builder, Delta, Diagnostic, HealthCheck, IpFamily, ProxyConfig, Snapshot,
};
use nftproxy_netlink::{ConntrackSocket, NetlinkBackend};
use nftproxy_nft::{Family, Scopes, Table};
use nftproxy_proxier::conntrack::{self, ServingUdp};
use nftproxy_proxier::metrics::TrafficPolicy;
use nftproxy_proxier::runner::{self, Input, Source, Timing};
use nftproxy_proxier::{Monitor, Reconciler, SyncReport};
use tracing::{info, warn};

use crate::health_check::HealthCheckServers;
use nftproxy_render::Renderer;

use crate::{http, log_broken, log_diagnostic, log_diagnostics, source};

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

/// Runs the daemon on `runtime` until SIGTERM or SIGINT; `monitor` is the one the
/// source reports to.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    mut reconciler: Reconciler<NetlinkBackend>,
    config: &ProxyConfig,
    monitor: Arc<Monitor>,
    mode: Mode,
) -> Result<(), String> {
    runtime.block_on(async {
        if let Some(address) = config.healthz_bind_address {
            http::serve(
                "/healthz and /livez",
                address,
                http::health_handler(monitor.clone()),
            );
        }
        if let Some(address) = config.metrics_bind_address {
            http::serve("/metrics", address, http::metrics_handler(monitor.clone()));
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
            Mode::Files(mut files) => {
                runner::run(&mut reconciler, timing, &mut files, &monitor, shutdown).await
            }
            Mode::Api(mut api) => {
                runner::run(&mut reconciler, timing, &mut api, &monitor, shutdown).await
            }
        };
        Ok(())
    })
}

/// What follows a successful sync, for either source: the health-check servers, the
/// stale UDP conntrack entries, and the metrics of the build that was programmed.
struct AfterSync {
    monitor: Arc<Monitor>,
    health_checks: HealthCheckServers,
    /// Of the build handed to the sync loop last, not yet in the kernel: where and what
    /// to serve.
    pending: Option<(Vec<std::net::IpAddr>, Vec<HealthCheck>)>,
    /// The UDP Services of the build last handed to the sync loop.
    serving_udp: ServingUdp,
    /// Opened at the first cleanup. An `Err` stays: opening fails only without
    /// CAP_NET_ADMIN, which a running process does not regain.
    conntrack: Option<Result<ConntrackSocket, ()>>,
}

impl AfterSync {
    fn new(monitor: Arc<Monitor>) -> AfterSync {
        AfterSync {
            health_checks: HealthCheckServers::new(monitor.clone()),
            monitor,
            pending: None,
            serving_udp: ServingUdp::default(),
            conntrack: None,
        }
    }

    /// Deletes UDP flows the new rules would not produce, as kube-proxy does after every
    /// successful sync. Failures are logged; the next sync tries again.
    fn clean_conntrack(&mut self) {
        if self.serving_udp.families().is_empty() {
            return;
        }
        let socket = self.conntrack.get_or_insert_with(|| {
            ConntrackSocket::open().map_err(
                |e| warn!(error = %e, "cannot open the conntrack socket; stale UDP flows stay"),
            )
        });
        let Ok(socket) = socket else {
            return;
        };
        let mut cleaned = true;
        for &family in self.serving_udp.families() {
            let started = std::time::Instant::now();
            match conntrack::clean(socket, &self.serving_udp, family) {
                Ok(deleted) => {
                    if deleted > 0 {
                        info!(%family, deleted, "deleted stale UDP conntrack entries");
                    }
                    self.monitor
                        .metrics
                        .conntrack_reconciled(family, deleted, started.elapsed());
                }
                Err(e) => {
                    cleaned = false;
                    warn!(%family, error = %e, "conntrack cleanup failed");
                }
            }
        }
        if cleaned {
            self.serving_udp.cleaned();
        }
    }

    /// `build` is what the next sync programs.
    fn built(&mut self, build: &Build) {
        for (state, family) in [(&build.ipv4, Family::Ip), (&build.ipv6, Family::Ip6)] {
            let (internal, external) = state.no_local_endpoints();
            let metrics = &self.monitor.metrics;
            metrics.set_no_local_endpoints(TrafficPolicy::Internal, family, internal);
            metrics.set_no_local_endpoints(TrafficPolicy::External, family, external);
        }
        self.pending = Some((build.node_port_ips(), build.health_checks()));
        self.serving_udp = ServingUdp::from_build(build, &self.serving_udp);
    }

    /// The last build is in the kernel (said again after every periodic sync, which
    /// retries the health checks that could not be served).
    async fn synced(&mut self) {
        if let Some((addresses, checks)) = self.pending.take() {
            self.health_checks.want(addresses, checks);
        }
        self.health_checks.sync().await;
        runner::off_the_workers(|| self.clean_conntrack());
    }
}

/// The desired tables, kept up to date with the input: only the Services whose objects
/// changed are built and rendered again.
struct Desired {
    builder: Builder,
    renderer: Renderer,
}

impl Desired {
    /// The tables of what `builder` has built.
    fn new(builder: Builder) -> Desired {
        let mut renderer = Renderer::new();
        renderer.update(builder.build(), &Delta::All);
        Desired { builder, renderer }
    }

    /// Takes in `snapshot`; says what changed in the tables.
    fn update(&mut self, snapshot: &Snapshot) -> Scopes {
        let delta = self.builder.update(snapshot);
        self.renderer.update(self.builder.build(), &delta)
    }
}

/// The file source: re-reads the manifests when their fingerprint changes, checked every
/// `minSyncPeriod`.
pub struct Files {
    paths: Vec<PathBuf>,
    /// When the next poll is due (kept when the sync loop drops a wait for it).
    next_poll: Option<tokio::time::Instant>,
    fingerprint: Option<u64>,
    desired: Desired,
    first: bool,
    after: AfterSync,
}

impl Files {
    /// A file source whose first answer is what `builder` built from the files as they
    /// are.
    pub fn new(paths: Vec<PathBuf>, builder: Builder, monitor: Arc<Monitor>) -> Files {
        Files {
            next_poll: None,
            fingerprint: source::fingerprint(&paths).ok(),
            paths,
            desired: Desired::new(builder),
            first: true,
            after: AfterSync::new(monitor),
        }
    }
}

impl Source for Files {
    async fn changed(&mut self) {
        let period = self.desired.builder.config().min_sync_period;
        let at = *self
            .next_poll
            .get_or_insert_with(|| tokio::time::Instant::now() + period);
        tokio::time::sleep_until(at).await;
        self.next_poll = None;
    }

    fn input(&mut self) -> Input {
        if std::mem::take(&mut self.first) {
            self.after.built(self.desired.builder.build());
            return Input::Changed(Scopes::everything());
        }
        let now = match source::fingerprint(&self.paths) {
            Ok(now) => now,
            Err(e) => return Input::Unavailable(e.to_string()),
        };
        if self.fingerprint == Some(now) {
            return Input::Unchanged;
        }
        self.fingerprint = Some(now);
        info!("manifests changed");
        // A broken document is most likely a file caught half-written: rather than drop
        // its Services, keep the rules as they are until it parses again.
        match source::load(&self.paths) {
            Ok(loaded) if loaded.errors.is_empty() => {
                let scopes = self.desired.update(&loaded.snapshot);
                let built = self.desired.builder.build();
                log_diagnostics(loaded.diagnostics, built);
                self.after.built(built);
                Input::Changed(scopes)
            }
            Ok(loaded) => {
                loaded.errors.iter().for_each(log_broken);
                Input::Unavailable(format!(
                    "{} manifest document(s) could not be parsed",
                    loaded.errors.len()
                ))
            }
            Err(e) => Input::Unavailable(e.to_string()),
        }
    }

    fn tables(&self) -> &[Table] {
        self.desired.renderer.tables()
    }

    async fn synced(&mut self, _report: &SyncReport) {
        self.after.synced().await;
    }
}

/// The API source: rebuilds when a watched object changed, once the initial lists are
/// complete.
pub struct Api {
    source: KubeSource,
    desired: Desired,
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
    pub fn new(source: KubeSource, config: ProxyConfig, monitor: Arc<Monitor>) -> Api {
        Api {
            source,
            desired: Desired::new(Builder::new(config)),
            after: AfterSync::new(monitor),
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
        self.source.changed().await;
    }

    fn input(&mut self) -> Input {
        let eligible = self.source.node_eligible();
        self.after.monitor.health.set_node_eligible(eligible);
        let generation = self.source.generation();
        if self.seen == Some(generation) {
            return Input::Unchanged;
        }
        let Some(snapshot) = self.source.snapshot() else {
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
        let scopes = self.desired.update(&snapshot);
        let built = self.desired.builder.build();
        self.after.built(built);
        log_new(&mut self.diagnostics, &built.diagnostics);
        Input::Changed(scopes)
    }

    fn tables(&self) -> &[Table] {
        self.desired.renderer.tables()
    }

    async fn synced(&mut self, _report: &SyncReport) {
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
