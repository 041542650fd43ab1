//! When to sync: on every change of the input, rate-limited as kube-proxy's
//! bounded-frequency runner is (a bucket of two syncs refilled one per `min_sync_period`,
//! so a lone change is programmed at once and a stream of changes at most once per
//! period), at least every `sync_period`, and after a failure again after a back-off.
//!
//! Between syncs it asks the kernel every [`DRIFT_CHECK`] (or `sync_period`, when
//! shorter) whether anyone committed to the ruleset since nftproxy last wrote or read it,
//! and when someone did, reads its tables back and repairs them by the smallest
//! transaction; kube-proxy rewrites its whole table every `sync_period` instead.
//!
//! Invariant: over any stretch of time T, at most 2 + T / `min_sync_period` syncs for
//! input changes start, and a failed sync is always retried; a change another program
//! makes to our tables is repaired within `sync_period`.

use std::future::Future;
use std::time::{Duration, SystemTime};

use nftproxy_nft::{Backend, Conntrack, Family, Scopes, Table};
use tokio::time::{Instant, sleep_until};
use tracing::{error, info, warn};

use crate::Monitor;
use crate::proxier::{Desired, Proxier};
use crate::reconciler::SyncReport;

/// Timing of the loop.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Shortest time between syncs.
    pub min_sync_period: Duration,
    /// Longest time between syncs.
    pub sync_period: Duration,
}

/// What the input source says when asked.
pub enum Input {
    /// Nothing changed since the last answer.
    Unchanged,
    /// The desired tables changed; only what the scopes name differs from the tables of
    /// the last answer.
    Changed(Scopes),
    /// The input cannot be read right now; the rules stay as they are.
    Unavailable(String),
}

/// Where the cluster's objects come from.
pub trait Source {
    /// Resolves when the input may have changed (a watch event, or simply the next poll).
    /// Must be cancel-safe: the loop drops it when a timer of its own fires first, and a
    /// poll that is due must still come when it is called again.
    fn changed(&mut self) -> impl Future<Output = ()>;
    /// The input now; a change is taken into `desired` (see [`Desired::update`]).
    fn input(&mut self, desired: &mut Desired) -> Input;
    /// The tables of the last [`Input::Changed`] are now in the kernel (also said when an
    /// answer changes nothing in tables the kernel holds, and after every periodic sync);
    /// the source's own work that follows a sync (health-check servers, latency metrics)
    /// goes here.
    fn synced(&mut self) -> impl Future<Output = ()>;
}

/// How often the loop asks the kernel whether the ruleset changed behind its back (one
/// netlink round trip; a read-back only when the answer is yes).
pub const DRIFT_CHECK: Duration = Duration::from_secs(1);

/// kube-proxy's burst: two syncs may follow each other immediately.
const BURST: f64 = 2.0;

/// The first retry after a failed sync waits at least this long, even with a
/// `min_sync_period` of zero, so that a kernel refusing every transaction is not asked
/// again in a busy loop.
const RETRY_FLOOR: Duration = Duration::from_millis(100);

/// A token bucket: `BURST` tokens, one more every `period`; a sync takes one.
struct Bucket {
    tokens: f64,
    period: Duration,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let earned = now.duration_since(self.at).as_secs_f64() / self.period.as_secs_f64();
        self.tokens = (self.tokens + earned).min(BURST);
        self.at = now;
    }

    /// When a token is (or was) available.
    fn ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= 1.0 || self.period.is_zero() {
            now
        } else {
            now + self.period.mul_f64(1.0 - self.tokens)
        }
    }

    fn take(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }
}

/// Runs until `shutdown` completes. Syncs when the input changed (rate-limited by the
/// bucket above), at least every `sync_period`, and after a failure again after a
/// back-off doubling from `min_sync_period` up to `sync_period`. Returns the number of
/// syncs done.
pub async fn run<B: Backend + Send, C: Conntrack, S: Source>(
    proxier: &mut Proxier<B, C>,
    timing: Timing,
    source: &mut S,
    shutdown: impl Future<Output = ()>,
) -> usize {
    tokio::pin!(shutdown);
    let monitor = proxier.monitor().clone();
    // What may differ between the source's tables and the kernel's (`None`: the source
    // has no tables yet).
    let mut unsynced: Option<Scopes> = None;
    let mut pending = false;
    let mut last_sync: Option<Instant> = None;
    let mut bucket = Bucket {
        tokens: BURST,
        period: timing.min_sync_period,
        at: Instant::now(),
    };
    let mut backoff = timing.min_sync_period.max(RETRY_FLOOR);
    let mut retry_at: Option<Instant> = None;
    let mut syncs = 0;
    let mut ask = true;
    let drift_check = DRIFT_CHECK.min(timing.sync_period);
    let mut drift_at = Instant::now() + drift_check;
    // After a read-back that found our tables intact (someone changed another table), the
    // next one waits this long, so that a busy neighbour cannot make us read back every
    // second; a change to ours is still repaired within `sync_period`.
    let mut read_back_after: Option<Instant> = None;
    let Some(mut first) = read_ahead(proxier, source, shutdown.as_mut()) else {
        return syncs;
    };
    loop {
        if ask {
            let input = match first.take() {
                Some(input) => input,
                None => off_the_workers(|| source.input(proxier.desired_mut())),
            };
            if let Input::Changed(_) = input {
                proxier.built();
            }
            match input {
                Input::Unchanged => {}
                // An input change that changes no rule (a Node heartbeat, an edit of an
                // unrelated field) is nothing to sync; if the kernel already holds these
                // tables, what follows a sync is still due for the new input.
                Input::Changed(changed) if unsynced.is_some() && changed.is_nothing() => {
                    if !pending {
                        synced(proxier, source).await;
                    }
                }
                Input::Changed(changed) => {
                    let now = SystemTime::now();
                    monitor.health.queued(now);
                    monitor.metrics.queued(&families(proxier.tables()), now);
                    unsynced = Some(match unsynced.take() {
                        Some(before) => before.then(changed),
                        None => changed,
                    });
                    pending = true;
                }
                Input::Unavailable(reason) => {
                    warn!(%reason, "input unavailable; keeping the current rules");
                }
            }
        }
        let now = Instant::now();
        let due = unsynced.as_ref().map(|_| {
            let earliest = bucket.ready_at(now);
            match retry_at {
                Some(retry) => retry.max(earliest),
                None if pending => earliest,
                None => last_sync.map_or(now, |t| t + timing.sync_period),
            }
        });
        let due_now = due.is_some_and(|due| due <= now);
        let in_sync = unsynced.is_some() && !pending && retry_at.is_none();
        // Between syncs: has anyone else committed since our last commit or read?
        let repair = !due_now && in_sync && now >= drift_at && {
            drift_at = now + drift_check;
            read_back_after.is_none_or(|t| now >= t) && proxier.reconciler_mut().drifted()
        };
        if let (true, Some(changed)) = (due_now || repair, unsynced.as_ref()) {
            syncs += 1;
            last_sync = Some(now);
            let everything = Scopes::everything();
            let scopes = if repair {
                // Read back and compare everything.
                proxier.reconciler_mut().invalidate();
                &everything
            } else {
                bucket.take(now);
                changed
            };
            let outcome =
                off_the_workers(|| sync_once(proxier, scopes, syncs, &monitor, backoff, repair));
            match outcome {
                Ok(report) => {
                    if repair {
                        read_back_after =
                            (report.operations == 0).then(|| now + timing.sync_period / 2);
                    }
                    unsynced = Some(Scopes::nothing());
                    pending = false;
                    retry_at = None;
                    backoff = timing.min_sync_period.max(RETRY_FLOOR);
                    synced(proxier, source).await;
                }
                Err(()) => {
                    retry_at = Some(now + backoff);
                    backoff = (backoff * 2).min(timing.sync_period);
                }
            }
            ask = false;
            continue;
        }
        // Nothing is due before this; a change of the input may make something due sooner.
        let wake = due.unwrap_or(now + timing.sync_period);
        let wake = if in_sync { wake.min(drift_at) } else { wake };
        tokio::select! {
            () = &mut shutdown => return syncs,
            () = source.changed() => ask = true,
            () = sleep_until(wake) => ask = false,
        }
    }
}

/// Reads the kernel's tables ahead of the first sync (seconds for a large cluster after
/// a restart), while the watchers list and, on a multi-threaded runtime, while the first
/// input is waited for and built on this thread: the read goes on on a thread of its own.
/// Returns that first input (`Some(None)` when it was not waited for here), or `None`
/// when `shutdown` came first.
fn read_ahead<B: Backend + Send, C: Conntrack, S: Source>(
    proxier: &mut Proxier<B, C>,
    source: &mut S,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<Option<Input>> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let handle = Handle::current();
    if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
        proxier.reconciler_mut().read_ahead();
        return Some(None);
    }
    let (desired, reconciler) = proxier.parts_mut();
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let reading = scope.spawn(|| reconciler.read_ahead());
            let first = handle.block_on(async {
                loop {
                    match source.input(desired) {
                        Input::Unchanged => {}
                        input => return Some(Some(input)),
                    }
                    tokio::select! {
                        () = &mut shutdown => return None,
                        () = source.changed() => {}
                    }
                }
            });
            if let Err(panic) = reading.join() {
                std::panic::resume_unwind(panic);
            }
            first
        })
    })
}

/// Runs blocking work (building and rendering a large cluster, a kernel commit or
/// read-back of seconds) so that it never holds up the runtime's other tasks: on a
/// multi-threaded runtime the worker hands its queued tasks (the HTTP servers, the
/// health-check ports, the watchers) to another thread first. A current-thread runtime
/// (the tests) runs it in place.
pub fn off_the_workers<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

fn families(tables: &[Table]) -> Vec<Family> {
    tables.iter().map(|t| t.family).collect()
}

/// What follows a sync: the proxier's kernel-side work, then the source's.
async fn synced<B: Backend, C: Conntrack, S: Source>(proxier: &mut Proxier<B, C>, source: &mut S) {
    off_the_workers(|| proxier.synced());
    source.synced().await;
}

/// One sync, inside its own span, with its outcome recorded in the monitor. A `repair`
/// follows a change of the ruleset by someone else: what it changed is logged as
/// repaired.
fn sync_once<B: Backend, C: Conntrack>(
    proxier: &mut Proxier<B, C>,
    scopes: &Scopes,
    n: usize,
    monitor: &Monitor,
    retry_in: Duration,
    repair: bool,
) -> Result<SyncReport, ()> {
    let span = tracing::info_span!("sync", n);
    let _guard = span.enter();
    let started = std::time::Instant::now();
    let families = families(proxier.tables());
    match proxier.sync(scopes) {
        Ok(report) => {
            let took = started.elapsed();
            let now = SystemTime::now();
            monitor.health.updated(now);
            monitor
                .metrics
                .synced(&families, took, report.operations, now);
            if repair && report.operations > 0 {
                monitor.metrics.repaired();
                warn!(
                    operations = report.operations,
                    took_ms = took.as_millis() as u64,
                    repaired = %report.changed.join("; "),
                    "another program changed nftproxy's tables; repaired"
                );
            } else if repair {
                tracing::debug!(
                    took_ms = took.as_millis() as u64,
                    "the ruleset changed elsewhere; nftproxy's tables are intact"
                );
            } else if report.operations > 0 || report.read_back {
                info!(
                    operations = report.operations,
                    transactions = report.transactions,
                    took_ms = took.as_millis() as u64,
                    "synced"
                );
            } else {
                tracing::debug!(
                    took_ms = took.as_millis() as u64,
                    "synced; nothing to change"
                );
            }
            Ok(report)
        }
        Err(e) => {
            monitor.metrics.failed(&families);
            error!(error = %e, ?retry_in, "sync failed; the kernel keeps the previous rules");
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::sync::{Arc, Mutex};

    use nftproxy_model::{ProxyConfig, Snapshot};
    use nftproxy_nft::{FakeBackend, FakeConntrack, Family};

    use super::*;
    use crate::reconciler::ReconcilerOptions;

    /// A cluster of `services` ClusterIP Services without endpoints.
    fn snapshot(services: usize) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for i in 0..services {
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\n\
                 spec: {{clusterIP: 10.96.0.{}, ports: [{{port: 80}}]}}\n",
                i + 1
            );
            let report = snapshot.add_manifest("test", &yaml);
            assert!(report.errors.is_empty() && report.diagnostics.is_empty());
        }
        snapshot
    }

    /// The tables of [`snapshot`]`(services)`.
    fn tables(services: usize) -> Vec<Table> {
        let mut desired = Desired::new(ProxyConfig::new("node-a"));
        desired.update(&snapshot(services));
        desired.tables().to_vec()
    }

    type TestProxier<B> = Proxier<B, FakeConntrack>;

    fn proxier<B: Backend>(backend: B) -> TestProxier<B> {
        let monitor = Arc::new(Monitor::new(TIMING.sync_period));
        Proxier::new(Desired::new(ProxyConfig::new("node-a")), backend, monitor)
            .with_options(ReconcilerOptions::default())
    }

    /// What the kernel holds of family `ip`.
    fn applied<B: Backend>(p: &mut TestProxier<B>) -> Option<Table> {
        p.reconciler_mut().applied(Family::Ip).cloned()
    }

    const TIMING: Timing = Timing {
        min_sync_period: Duration::from_secs(1),
        sync_period: Duration::from_secs(30),
    };

    /// Takes the cluster `new` (if any) into `desired`.
    fn answer(desired: &mut Desired, new: Option<Snapshot>) -> Input {
        match new {
            None => Input::Unchanged,
            Some(new) => Input::Changed(desired.update(&new)),
        }
    }

    /// A source without change notifications, asked every `period`, like the file source.
    /// It notes when each sync succeeded.
    struct Polled<F> {
        period: Duration,
        next_poll: Option<Instant>,
        input: F,
        synced_at: Vec<Instant>,
    }

    /// A polled source asked every `period`, whose answers `input` gives (`None`: no change).
    fn polled<F: FnMut() -> Option<Snapshot>>(period: Duration, input: F) -> Polled<F> {
        Polled {
            period,
            next_poll: None,
            input,
            synced_at: Vec::new(),
        }
    }

    impl<F: FnMut() -> Option<Snapshot>> Source for Polled<F> {
        async fn changed(&mut self) {
            let at = *self.next_poll.get_or_insert(Instant::now() + self.period);
            tokio::time::sleep_until(at).await;
            self.next_poll = None;
        }

        fn input(&mut self, desired: &mut Desired) -> Input {
            let new = (self.input)();
            answer(desired, new)
        }

        async fn synced(&mut self) {
            self.synced_at.push(Instant::now());
        }
    }

    /// Runs the loop over `source` for `duration`: the syncs done, and what was reported.
    async fn run_for<S: Source>(
        p: &mut TestProxier<FakeBackend>,
        source: &mut S,
        duration: Duration,
    ) -> usize {
        run(p, TIMING, source, tokio::time::sleep(duration)).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_of_changes_is_synced_in_a_burst_of_two_then_once_per_min_sync_period() {
        let mut p = proxier(FakeBackend::default());
        // The input changes on every poll (every 100 ms) for 3 s.
        let polls = Rc::new(RefCell::new(0usize));
        let counter = polls.clone();
        let start = Instant::now();
        let mut source = polled(Duration::from_millis(100), move || {
            *counter.borrow_mut() += 1;
            let n = *counter.borrow();
            (n <= 30).then(|| snapshot(n))
        });
        let syncs = run_for(&mut p, &mut source, Duration::from_millis(20_500)).await;
        // The first two changes spend the burst; after that at most one sync per second
        // until the last change is in; nothing more (the periodic sync is not due).
        let at: Vec<Duration> = source.synced_at.iter().map(|t| *t - start).collect();
        assert!(*polls.borrow() > 100);
        assert!(at[1] < Duration::from_millis(150), "{at:?}");
        // Sync k (from 0) needs k - 1 tokens earned at one per second.
        for (k, t) in at.iter().enumerate().skip(2) {
            let earned = Duration::from_secs(k as u64 - 1);
            assert!(*t + Duration::from_millis(1) >= earned, "{at:?}");
        }
        // 30 polls take a little over 3 s: 2 + 3 or 4 syncs.
        assert!((5..=6).contains(&syncs), "{at:?}");
        assert_eq!(p.reconciler_mut().backend_mut().applied.len(), syncs);
        assert_eq!(applied(&mut p).as_ref(), Some(&tables(30)[0]));
    }

    /// A source told about changes, like the API watch.
    struct Notified {
        changes: Rc<tokio::sync::Notify>,
        next: Rc<RefCell<Option<Snapshot>>>,
    }

    impl Source for Notified {
        async fn changed(&mut self) {
            self.changes.notified().await;
        }

        fn input(&mut self, desired: &mut Desired) -> Input {
            let new = self.next.borrow_mut().take();
            answer(desired, new)
        }

        async fn synced(&mut self) {}
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_after_a_quiet_spell_is_synced_at_once_and_periodic_syncs_follow() {
        let mut p = proxier(FakeBackend::default());
        let changes = Rc::new(tokio::sync::Notify::new());
        let next = Rc::new(RefCell::new(Some(snapshot(1))));
        let mut source = Notified {
            changes: changes.clone(),
            next: next.clone(),
        };
        let start = Instant::now();
        let synced_at = Rc::new(RefCell::new(Vec::new()));
        let (log, at) = (synced_at.clone(), next.clone());
        let script = async move {
            tokio::time::sleep(Duration::from_millis(5_000)).await;
            *at.borrow_mut() = Some(snapshot(2));
            changes.notify_one();
            tokio::time::sleep(Duration::from_millis(1)).await;
            log.borrow_mut().push(start.elapsed());
            tokio::time::sleep(Duration::from_millis(60_000)).await;
        };
        let syncs = run(&mut p, TIMING, &mut source, script).await;
        // t=0 the first input; t=5 s the change, applied within the same millisecond;
        // then periodic syncs at 35 s and 65 s that change nothing.
        assert_eq!(syncs, 4);
        assert_eq!(p.reconciler_mut().backend_mut().applied.len(), 2);
        assert_eq!(applied(&mut p).as_ref(), Some(&tables(2)[0]));
        assert!(synced_at.borrow()[0] < Duration::from_millis(5_002));
        assert!(p.monitor().health.healthz(SystemTime::now()).healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_tables_again_are_not_a_change() {
        let mut p = proxier(FakeBackend::default());
        let mut polls = 0;
        let mut source = polled(Duration::from_secs(2), move || {
            polls += 1;
            (polls <= 5).then(|| snapshot(1))
        });
        let syncs = run_for(&mut p, &mut source, Duration::from_secs(11)).await;
        // One sync for the first answer; each repeat is told it is in the kernel.
        assert_eq!(syncs, 1);
        assert_eq!(source.synced_at.len(), 5);
        let text = p.monitor().metrics.render();
        assert!(
            text.contains(
                r#"kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"} 1"#
            )
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_sync_is_retried_with_back_off() {
        let mut p = proxier(FakeBackend {
            fail_next: Some("EBUSY".into()),
            ..FakeBackend::default()
        });
        let mut first = true;
        let mut source = polled(TIMING.min_sync_period, move || {
            std::mem::take(&mut first).then(|| snapshot(1))
        });
        let syncs = run_for(&mut p, &mut source, Duration::from_millis(3_500)).await;
        // t=0 fails, t=1 retries and succeeds; nothing after that.
        assert_eq!(syncs, 2);
        assert_eq!(p.reconciler_mut().backend_mut().applied.len(), 1);
        assert!(p.monitor().metrics.render().contains(
            r#"kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family="IPv4"} 1"#
        ));
    }

    /// A kernel shared between the loop and the test, which plays the other program.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<FakeBackend>>);

    impl Shared {
        fn kernel(&self) -> std::sync::MutexGuard<'_, FakeBackend> {
            self.0.lock().expect("kernel")
        }
    }

    impl Backend for Shared {
        type Error = nftproxy_nft::FakeError;

        fn list(&mut self, family: Family, table: &str) -> Result<Option<Table>, Self::Error> {
            self.kernel().list(family, table)
        }

        fn apply(&mut self, tx: &nftproxy_nft::Transaction) -> Result<(), Self::Error> {
            self.kernel().apply(tx)
        }

        fn generation(&mut self) -> Result<Option<u32>, Self::Error> {
            self.kernel().generation()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn changes_by_another_program_are_repaired_within_a_drift_check() {
        let kernel = Shared::default();
        let mut p = proxier(kernel.clone());
        let mut first = true;
        let mut source = polled(Duration::from_secs(10), move || {
            std::mem::take(&mut first).then(|| snapshot(3))
        });
        let k = kernel.clone();
        let script = async move {
            tokio::time::sleep(Duration::from_millis(5_500)).await;
            // Someone deletes a chain's rule and adds one of theirs elsewhere.
            k.kernel().tamper(Family::Ip, "nftproxy", |t| {
                let t = t.as_mut().expect("our table");
                let service = t.chains.keys().find(|n| n.starts_with("service-")).cloned();
                t.chains.remove(&service.expect("a Service's chain"));
            });
            tokio::time::sleep(Duration::from_millis(1_100)).await;
            assert_eq!(
                k.kernel().tables.values().next(),
                Some(&tables(3)[0]),
                "repaired"
            );
            let lists = k.kernel().lists;
            // Another table changes: our tables are read back once, found intact...
            k.kernel().tamper(Family::Ip, "other", |t| {
                *t = Some(Table::new(Family::Ip, "other"))
            });
            tokio::time::sleep(Duration::from_millis(1_100)).await;
            assert_eq!(
                k.kernel().lists,
                lists + 2,
                "one read-back of both families"
            );
            // ...and a busy neighbour does not make us read back every second.
            for _ in 0..5 {
                k.kernel().tamper(Family::Ip, "other", |_| {});
                tokio::time::sleep(Duration::from_millis(1_000)).await;
            }
            assert_eq!(k.kernel().lists, lists + 2);
            // Our table deleted: within the quiet spell's end (sync_period / 2), it is back.
            k.kernel().tamper(Family::Ip, "nftproxy", |t| *t = None);
            tokio::time::sleep(Duration::from_secs(15)).await;
            assert_eq!(
                k.kernel().tables.get(&(Family::Ip, "nftproxy".to_owned())),
                Some(&tables(3)[0])
            );
        };
        run(&mut p, TIMING, &mut source, script).await;
        let text = p.monitor().metrics.render();
        assert!(text.contains("nftproxy_sync_repairs_total 2"), "{text}");
    }

    /// A kernel whose read takes `delay`; it notes when the last read ended.
    struct Slow {
        kernel: FakeBackend,
        delay: Duration,
        read: Arc<Mutex<Option<std::time::Instant>>>,
    }

    impl Backend for Slow {
        type Error = nftproxy_nft::FakeError;

        fn list(&mut self, family: Family, table: &str) -> Result<Option<Table>, Self::Error> {
            std::thread::sleep(self.delay);
            let listed = self.kernel.list(family, table);
            *self.read.lock().expect("read") = Some(std::time::Instant::now());
            listed
        }

        fn apply(&mut self, tx: &nftproxy_nft::Transaction) -> Result<(), Self::Error> {
            self.kernel.apply(tx)
        }

        fn generation(&mut self) -> Result<Option<u32>, Self::Error> {
            self.kernel.generation()
        }
    }

    /// On the daemon's runtime the kernel is read on a thread of its own while the first
    /// input is built: after a restart, the build is done before the read, and the first
    /// sync changes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_builds_while_it_reads_the_kernel_and_changes_nothing() {
        let mut kernel = FakeBackend::default();
        for table in tables(3) {
            kernel.tamper(Family::Ip, "nftproxy", |t| *t = Some(table.clone()));
        }
        let read = Arc::new(Mutex::new(None));
        let mut p = proxier(Slow {
            kernel,
            delay: Duration::from_millis(200),
            read: read.clone(),
        });
        let built = Arc::new(Mutex::new(None));
        let noted = built.clone();
        let mut source = polled(Duration::from_millis(10), move || {
            let mut built = noted.lock().expect("built");
            built.is_none().then(|| {
                *built = Some(std::time::Instant::now());
                snapshot(3)
            })
        });
        run(
            &mut p,
            TIMING,
            &mut source,
            tokio::time::sleep(Duration::from_secs(1)),
        )
        .await;
        let (built, read) = (*built.lock().expect("built"), *read.lock().expect("read"));
        assert!(
            built.expect("built") < read.expect("read"),
            "built before the read ended"
        );
        assert_eq!(source.synced_at.len(), 1);
        let backend = p.reconciler_mut().backend_mut();
        assert_eq!(backend.kernel.lists, 2, "one read of each family");
        assert!(
            backend.kernel.applied.is_empty(),
            "{:?}",
            backend.kernel.applied
        );
    }
}
