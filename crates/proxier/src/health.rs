//! kube-proxy's health semantics: `/healthz` fails when a requested sync has waited longer
//! than twice the sync period or when this node is leaving the cluster; `/livez` ignores
//! the node.
//!
//! Invariant: a queued update stays queued (and ages) until a sync succeeds; a failing
//! or stalled sync loop therefore turns unhealthy, while an idle one never does. The
//! first sync counts as queued from the start, so a proxy that never manages to sync
//! (the API server cannot be listed) turns unhealthy too.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

/// The proxy's health, updated by the sync loop and read by the HTTP servers.
#[derive(Debug)]
pub struct Health {
    timeout: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    last_updated: Option<SystemTime>,
    oldest_queued: Option<SystemTime>,
    node_eligible: bool,
}

/// An answer for `/healthz` or `/livez`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Healthy or not (200 or 503).
    pub healthy: bool,
    /// The JSON body kube-proxy sends.
    pub body: String,
}

impl Report {
    /// The HTTP status code.
    pub fn code(&self) -> u16 {
        if self.healthy { 200 } else { 503 }
    }
}

impl Health {
    /// Health with kube-proxy's timeout, twice the sync period, for a proxy that started
    /// at `started` and has not synced yet.
    pub fn new(sync_period: Duration, started: SystemTime) -> Health {
        Health {
            timeout: sync_period * 2,
            state: Mutex::new(State {
                last_updated: None,
                oldest_queued: Some(started),
                node_eligible: true,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every field is valid on its own, so a panic elsewhere cannot corrupt it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A change is waiting to be synced (the first one since the last success counts).
    pub fn queued(&self, now: SystemTime) {
        self.state().oldest_queued.get_or_insert(now);
    }

    /// A sync succeeded.
    pub fn updated(&self, now: SystemTime) {
        let mut state = self.state();
        state.last_updated = Some(now);
        state.oldest_queued = None;
    }

    /// Whether this node may take load-balanced traffic (false while its Node is being
    /// deleted or is marked for removal by the cluster autoscaler).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.state().node_eligible = eligible;
    }

    /// `/healthz`.
    pub fn healthz(&self, now: SystemTime) -> Report {
        self.report(now, true)
    }

    /// `/livez`: the same without the node's eligibility.
    pub fn livez(&self, now: SystemTime) -> Report {
        self.report(now, false)
    }

    fn report(&self, now: SystemTime, with_node: bool) -> Report {
        let state = self.state();
        let stalled = state
            .oldest_queued
            .is_some_and(|queued| now.duration_since(queued).unwrap_or_default() > self.timeout);
        let healthy = !stalled && (state.node_eligible || !with_node);
        // As upstream: a healthy answer reports the current time as the last update
        // (older releases meant "the loop ran recently"); an unhealthy one the real time.
        let last_updated = if healthy {
            Some(now)
        } else {
            state.last_updated
        };
        let mut body = format!(
            r#"{{"lastUpdated": "{}","currentTime": "{}""#,
            go_time(last_updated),
            go_time(Some(now))
        );
        if with_node {
            body.push_str(&format!(r#", "nodeEligible": {}"#, state.node_eligible));
        }
        body.push('}');
        Report { healthy, body }
    }

    /// When the last sync succeeded.
    pub fn last_updated(&self) -> Option<SystemTime> {
        self.state().last_updated
    }
}

/// A time as kube-proxy prints it (Go's `time.Time.String()` in UTC, without the
/// monotonic clock reading; the zero time when unset), so that whatever parses
/// kube-proxy's body parses ours.
fn go_time(time: Option<SystemTime>) -> String {
    let Some(timestamp) = time.and_then(|t| jiff::Timestamp::try_from(t).ok()) else {
        return "0001-01-01 00:00:00 +0000 UTC".to_owned();
    };
    let utc = timestamp.to_zoned(jiff::tz::TimeZone::UTC);
    let mut text = utc.strftime("%Y-%m-%d %H:%M:%S").to_string();
    let nanos = utc.subsec_nanosecond();
    if nanos > 0 {
        let fraction = format!("{nanos:09}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push_str(" +0000 UTC");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_secs(30);

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + seconds)
    }

    /// A proxy that started at 0 and synced at 1.
    fn synced() -> Health {
        let health = Health::new(PERIOD, at(0));
        health.updated(at(1));
        health
    }

    #[test]
    fn an_idle_proxy_is_healthy() {
        let health = synced();
        let report = health.healthz(at(1_000));
        assert!(report.healthy);
        assert_eq!(
            report.body,
            r#"{"lastUpdated": "2023-11-14 22:30:00 +0000 UTC","currentTime": "2023-11-14 22:30:00 +0000 UTC", "nodeEligible": true}"#
        );
    }

    #[test]
    fn a_proxy_that_never_synced_is_unhealthy_after_two_sync_periods() {
        let health = Health::new(PERIOD, at(0));
        assert!(health.healthz(at(60)).healthy);
        let never = health.healthz(at(61));
        assert_eq!(never.code(), 503);
        assert!(
            never
                .body
                .starts_with(r#"{"lastUpdated": "0001-01-01 00:00:00 +0000 UTC","#)
        );
        assert_eq!(health.livez(at(61)).code(), 503);
        health.updated(at(62));
        assert!(health.livez(at(63)).healthy);
    }

    #[test]
    fn a_queued_update_older_than_two_sync_periods_is_unhealthy_until_a_sync() {
        let health = Health::new(PERIOD, at(0));
        health.queued(at(0));
        // Later changes do not reset the age of the oldest one.
        health.queued(at(50));
        assert!(health.healthz(at(60)).healthy);
        let stalled = health.healthz(at(61));
        assert_eq!(stalled.code(), 503);
        // Never synced: the zero time, as upstream prints it.
        assert!(
            stalled
                .body
                .starts_with(r#"{"lastUpdated": "0001-01-01 00:00:00 +0000 UTC","#)
        );
        assert_eq!(health.livez(at(61)).code(), 503);
        health.updated(at(62));
        assert!(health.healthz(at(63)).healthy);
        health.queued(at(100));
        let late =
            health.healthz(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_161, 250_000_000));
        assert_eq!(late.code(), 503);
        assert_eq!(
            late.body,
            r#"{"lastUpdated": "2023-11-14 22:14:22 +0000 UTC","currentTime": "2023-11-14 22:16:01.25 +0000 UTC", "nodeEligible": true}"#
        );
    }

    #[test]
    fn a_node_leaving_the_cluster_fails_healthz_but_not_livez() {
        let health = synced();
        health.set_node_eligible(false);
        let healthz = health.healthz(at(0));
        assert_eq!(healthz.code(), 503);
        assert!(healthz.body.ends_with(r#", "nodeEligible": false}"#));
        let livez = health.livez(at(0));
        assert!(livez.healthy);
        assert!(!livez.body.contains("nodeEligible"));
    }
}
