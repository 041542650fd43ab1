//! The sync pipeline behind one type, as the daemon, `--once` and the benchmark all run
//! it: the cluster's objects are built into the proxy state and rendered into tables
//! ([`Desired`]), the reconciler brings the kernel to those tables, and the kernel-side
//! work that follows a sync (stale UDP conntrack entries) is done.
//!
//! Invariant: the kernel only ever receives tables rendered from a complete build, and
//! the conntrack cleanup only ever follows a successful sync of the build it was
//! computed from.

use std::sync::Arc;
use std::time::Instant;

use nftproxy_model::{Build, Builder, Delta, ProxyConfig, Snapshot};
use nftproxy_nft::{Backend, Conntrack, Family, Scopes, Table, Transaction};
use nftproxy_render::{Renderer, TABLE_NAME};
use tracing::{debug, info, warn};

use crate::conntrack::{self, ServingUdp};
use crate::metrics::TrafficPolicy;
use crate::{Monitor, Reconciler, ReconcilerOptions, SyncError, SyncReport};

/// The desired tables, kept up to date with the input: only the Services whose objects
/// changed are built and rendered again.
pub struct Desired {
    builder: Builder,
    renderer: Renderer,
}

impl Desired {
    /// Nothing built yet, and no tables: the first update renders everything whole.
    pub fn new(config: ProxyConfig) -> Desired {
        Desired {
            builder: Builder::new(config),
            renderer: Renderer::new(),
        }
    }

    /// Takes in `snapshot`; says what changed in the tables.
    pub fn update(&mut self, snapshot: &Snapshot) -> Scopes {
        let started = Instant::now();
        let delta = self.build(snapshot);
        let built = started.elapsed();
        let scopes = self.render(&delta);
        debug!(
            build_ms = built.as_millis() as u64,
            render_ms = (started.elapsed() - built).as_millis() as u64,
            "desired tables updated"
        );
        scopes
    }

    /// The first half of [`Desired::update`]: the proxy state of `snapshot`, and what
    /// changed in it (the benchmark measures the halves apart).
    pub fn build(&mut self, snapshot: &Snapshot) -> Delta {
        self.builder.update(snapshot)
    }

    /// The second half of [`Desired::update`]: renders what `delta` names.
    pub fn render(&mut self, delta: &Delta) -> Scopes {
        self.renderer.update(self.builder.build(), delta)
    }

    /// The proxy state last built.
    pub fn built(&self) -> &Build {
        self.builder.build()
    }

    /// The tables of the proxy state last built.
    pub fn tables(&self) -> &[Table] {
        self.renderer.tables()
    }

    /// The settings the rules are built with.
    pub fn config(&self) -> &ProxyConfig {
        self.builder.config()
    }
}

/// The whole pipeline: [`Desired`] tables, the [`Reconciler`] that keeps the kernel equal
/// to them, and what follows each sync.
pub struct Proxier<B: Backend, C: Conntrack> {
    desired: Desired,
    reconciler: Reconciler<B>,
    monitor: Arc<Monitor>,
    /// The UDP Services of the build last taken in.
    serving_udp: ServingUdp,
    /// `None`: stale UDP flows are left alone (the socket could not be opened).
    conntrack: Option<C>,
}

impl<B: Backend, C: Conntrack> Proxier<B, C> {
    /// A proxier over `desired`, for nftproxy's tables in `backend`, with the default
    /// options (see [`Proxier::with_options`] for a kernel's own); reports to `monitor`.
    pub fn new(desired: Desired, backend: B, monitor: Arc<Monitor>) -> Proxier<B, C> {
        let options = ReconcilerOptions::default();
        let mut proxier = Proxier {
            desired,
            reconciler: Reconciler::new(backend, TABLE_NAME, options),
            monitor,
            serving_udp: ServingUdp::default(),
            conntrack: None,
        };
        proxier.built();
        proxier
    }

    /// Other reconciler options than the default ones: those the kernel needs
    /// ([`crate::probe`]), or a given behaviour in a test.
    pub fn with_options(mut self, options: ReconcilerOptions) -> Proxier<B, C> {
        self.reconciler.set_options(options);
        self
    }

    /// Deletes stale UDP flows through `conntrack` after each sync.
    pub fn with_conntrack(mut self, conntrack: C) -> Proxier<B, C> {
        self.conntrack = Some(conntrack);
        self
    }

    /// Builds the proxy state of `snapshot` (see [`Desired::build`]); the tables stay as
    /// they were until [`Proxier::render`].
    pub fn build(&mut self, snapshot: &Snapshot) -> Delta {
        self.desired.build(snapshot)
    }

    /// Renders what `delta` names: says what changed in the tables.
    pub fn render(&mut self, delta: &Delta) -> Scopes {
        let scopes = self.desired.render(delta);
        self.built();
        scopes
    }

    /// For a source that builds incrementally; [`Proxier::built`] follows a change.
    pub(crate) fn desired_mut(&mut self) -> &mut Desired {
        &mut self.desired
    }

    /// The desired tables and the reconciler apart, to work on both at once.
    pub(crate) fn parts_mut(&mut self) -> (&mut Desired, &mut Reconciler<B>) {
        (&mut self.desired, &mut self.reconciler)
    }

    /// The desired tables.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// The desired tables.
    pub fn tables(&self) -> &[Table] {
        self.desired.tables()
    }

    /// The reporting of health and metrics.
    pub fn monitor(&self) -> &Arc<Monitor> {
        &self.monitor
    }

    /// The reconciler (for callers that time or inspect the kernel side).
    pub fn reconciler_mut(&mut self) -> &mut Reconciler<B> {
        &mut self.reconciler
    }

    /// The desired tables changed: the metrics of the new build, and the UDP Services the
    /// next cleanup works from.
    pub(crate) fn built(&mut self) {
        let build = self.desired.built();
        for (state, family) in [(&build.ipv4, Family::Ip), (&build.ipv6, Family::Ip6)] {
            let (internal, external) = state.no_local_endpoints();
            let metrics = &self.monitor.metrics;
            metrics.set_no_local_endpoints(TrafficPolicy::Internal, family, internal);
            metrics.set_no_local_endpoints(TrafficPolicy::External, family, external);
        }
        self.serving_udp = ServingUdp::from_build(build, &self.serving_udp);
    }

    /// Brings the kernel to the desired tables, of which only what `scopes` names changed
    /// since the last successful sync.
    pub fn sync(&mut self, scopes: &Scopes) -> Result<SyncReport, SyncError<B::Error>> {
        self.reconciler.sync_changes(self.desired.tables(), scopes)
    }

    /// The transactions a sync of everything would send now, without sending them.
    pub fn plans(&mut self) -> Result<Vec<Transaction>, SyncError<B::Error>> {
        self.reconciler.plans(self.desired.tables())
    }

    /// One sync of everything and what follows it: `--once`.
    pub fn sync_once(&mut self) -> Result<SyncReport, SyncError<B::Error>> {
        let report = self.sync(&Scopes::everything())?;
        self.synced();
        Ok(report)
    }

    /// The kernel holds the desired tables: deletes the UDP flows the new rules would not
    /// produce, as kube-proxy does after every successful sync. Failures are logged; the
    /// next sync tries again.
    pub fn synced(&mut self) {
        let (Some(socket), false) = (&mut self.conntrack, self.serving_udp.families().is_empty())
        else {
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
}
