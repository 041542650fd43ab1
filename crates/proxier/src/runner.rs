//! When to sync: on every change of the input, but no more often than `min_sync_period`,
//! at least every `sync_period`, and after a failure again after a back-off, as
//! kube-proxy's bounded-frequency runner does.
//!
//! Invariant: a sync never starts sooner than `min_sync_period` after the previous one,
//! and a failed sync is always retried.

use std::future::Future;
use std::time::Duration;

use nftproxy_nft::{Backend, Table};
use tokio::time::{Instant, sleep_until};
use tracing::{error, info_span, warn};

use crate::reconciler::Reconciler;

/// Timing of the loop.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Shortest time between syncs (and how often the input is polled).
    pub min_sync_period: Duration,
    /// Longest time between syncs.
    pub sync_period: Duration,
}

/// What the input source says when asked.
pub enum Input {
    /// Nothing changed since the last answer.
    Unchanged,
    /// The desired tables changed.
    Changed(Vec<Table>),
    /// The input cannot be read right now; the rules stay as they are.
    Unavailable(String),
}

/// Runs until `shutdown` completes: polls `input` every `min_sync_period`, syncs when it
/// changed, when `sync_period` passed, or to retry a failure (after a back-off doubling
/// from `min_sync_period` up to `sync_period`). Returns the number of syncs done.
pub async fn run<B: Backend>(
    reconciler: &mut Reconciler<B>,
    timing: Timing,
    mut input: impl FnMut() -> Input,
    shutdown: impl Future<Output = ()>,
) -> usize {
    tokio::pin!(shutdown);
    let mut desired: Option<Vec<Table>> = None;
    let mut pending = false;
    let mut last_sync: Option<Instant> = None;
    let mut backoff = timing.min_sync_period;
    let mut retry_at: Option<Instant> = None;
    let mut syncs = 0;
    let mut next_poll = Instant::now();
    loop {
        tokio::select! {
            () = &mut shutdown => return syncs,
            () = sleep_until(next_poll) => {}
        }
        let now = Instant::now();
        next_poll = now + timing.min_sync_period;
        match input() {
            Input::Unchanged => {}
            Input::Changed(tables) => {
                desired = Some(tables);
                pending = true;
            }
            Input::Unavailable(reason) => {
                warn!(%reason, "input unavailable; keeping the current rules")
            }
        }
        let Some(tables) = desired.as_ref() else {
            continue;
        };
        let periodic = last_sync.is_some_and(|t| now.duration_since(t) >= timing.sync_period);
        let retry = retry_at.is_some_and(|t| now >= t);
        let too_soon = last_sync.is_some_and(|t| now.duration_since(t) < timing.min_sync_period);
        if !(pending || periodic || retry) || too_soon || (retry_at.is_some() && !retry) {
            continue;
        }
        let span = info_span!("sync", n = syncs + 1);
        let _guard = span.enter();
        last_sync = Some(now);
        syncs += 1;
        match reconciler.sync(tables) {
            Ok(_) => {
                pending = false;
                retry_at = None;
                backoff = timing.min_sync_period;
            }
            Err(e) => {
                error!(error = %e, retry_in = ?backoff, "sync failed");
                retry_at = Some(now + backoff);
                backoff = (backoff * 2).min(timing.sync_period);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use nftproxy_nft::{Chain, FakeBackend, Family};

    use super::*;
    use crate::reconciler::ReconcilerOptions;

    fn tables(chains: usize) -> Vec<Table> {
        let mut t = Table::new(Family::Ip, "nftproxy");
        for i in 0..chains {
            t.add_chain(Chain::regular(format!("c{i}"), vec![]));
        }
        vec![t]
    }

    const TIMING: Timing = Timing {
        min_sync_period: Duration::from_secs(1),
        sync_period: Duration::from_secs(30),
    };

    #[tokio::test(start_paused = true)]
    async fn changes_are_synced_at_most_once_per_min_sync_period() {
        let mut r = Reconciler::new(
            FakeBackend::default(),
            "nftproxy",
            ReconcilerOptions::default(),
        );
        // The input changes on every poll for 10 polls.
        let polls = Rc::new(RefCell::new(0usize));
        let counter = polls.clone();
        let input = move || {
            *counter.borrow_mut() += 1;
            let n = *counter.borrow();
            if n <= 10 {
                Input::Changed(tables(n))
            } else {
                Input::Unchanged
            }
        };
        let syncs = run(
            &mut r,
            TIMING,
            input,
            tokio::time::sleep(Duration::from_millis(20_500)),
        )
        .await;
        // 21 polls in 20.5 s; the 10 changes give 10 syncs, one per second, and nothing
        // more (the 30 s periodic sync is not due yet).
        assert_eq!(*polls.borrow(), 21);
        assert_eq!(syncs, 10);
        assert_eq!(r.backend_mut().applied.len(), 10);
        assert_eq!(r.applied(Family::Ip), Some(&tables(10)[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_sync_is_retried_with_back_off() {
        let backend = FakeBackend {
            fail_next: Some("EBUSY".into()),
            ..FakeBackend::default()
        };
        let mut r = Reconciler::new(backend, "nftproxy", ReconcilerOptions::default());
        let mut first = true;
        let input = move || {
            if std::mem::take(&mut first) {
                Input::Changed(tables(1))
            } else {
                Input::Unchanged
            }
        };
        let syncs = run(
            &mut r,
            TIMING,
            input,
            tokio::time::sleep(Duration::from_millis(3_500)),
        )
        .await;
        // t=0 fails, t=1 retries and succeeds; nothing after that.
        assert_eq!(syncs, 2);
        assert_eq!(r.backend_mut().applied.len(), 1);
    }
}
