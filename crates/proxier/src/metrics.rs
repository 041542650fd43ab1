//! kube-proxy's Prometheus metrics (subsystem `kubeproxy`), with upstream's names, labels
//! and histogram buckets so that existing dashboards and recording rules keep working,
//! plus the few of nftproxy's own (prefix `nftproxy_`).
//!
//! Invariant: every metric is registered once, in one registry that `/metrics` renders;
//! `ip_family` is always `IPv4` or `IPv6`, as upstream spells it.

use std::time::{Duration, SystemTime};

use nftproxy_nft::Family;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The metrics registry and its collectors.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    sync_duration: HistogramVec,
    last_sync: GaugeVec,
    last_queued: GaugeVec,
    network_programming: HistogramVec,
    sync_failures: IntCounterVec,
    no_local_endpoints: IntGaugeVec,
    healthz: IntCounterVec,
    livez: IntCounterVec,
    conntrack_deleted: IntCounterVec,
    conntrack_duration: HistogramVec,
    operations: IntCounter,
    repairs: IntCounter,
    kube_proxy_cleanup: IntCounter,
    service_changes: IntCounter,
    service_changes_pending: IntGauge,
    endpoint_changes: IntCounter,
    endpoint_changes_pending: IntGauge,
}

/// The `ip_family` label value of a table family.
pub fn ip_family(family: Family) -> &'static str {
    match family {
        Family::Ip => "IPv4",
        _ => "IPv6",
    }
}

/// Which endpoints a traffic policy governs, as the `traffic_policy` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// `internalTrafficPolicy: Local`.
    Internal,
    /// `externalTrafficPolicy: Local`.
    External,
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(seconds)
        .unwrap_or_default()
}

/// `kubeproxy_network_programming_duration_seconds` buckets (pkg/proxy/metrics): 0.25 s,
/// 0.5 s, then 1–59 s by 1 s, 60–115 s by 5 s, 120–300 s by 30 s.
fn network_programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.25, 0.5];
    buckets.extend((1..60).map(f64::from));
    buckets.extend((60..120).step_by(5).map(f64::from));
    buckets.extend((120..=300).step_by(30).map(f64::from));
    buckets
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // The names and label sets are constants; registering them into a new registry
        // cannot clash, so a failure here is a programming error caught by the tests.
        fn register<C: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            collector: Result<C, prometheus::Error>,
        ) -> C {
            #[allow(clippy::expect_used, reason = "constant metric definitions")]
            let collector = collector.expect("valid metric definition");
            #[allow(clippy::expect_used, reason = "each name is registered once")]
            registry
                .register(Box::new(collector.clone()))
                .expect("unique metric name");
            collector
        }
        let histogram = |name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]| {
            register(
                &registry,
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels),
            )
        };
        let family = &["ip_family"];
        #[allow(clippy::expect_used, reason = "constant bucket parameters")]
        let sync_buckets =
            prometheus::exponential_buckets(0.001, 2.0, 15).expect("valid bucket parameters");
        Metrics {
            sync_duration: histogram(
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                sync_buckets,
                family,
            ),
            network_programming: histogram(
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                network_programming_buckets(),
                family,
            ),
            conntrack_duration: histogram(
                "kubeproxy_conntrack_reconciler_sync_duration_seconds",
                "Time taken to reconcile the conntrack table, in seconds",
                prometheus::DEFAULT_BUCKETS.to_vec(),
                family,
            ),
            last_sync: register(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                        "The last time proxy rules were successfully synced",
                    ),
                    family,
                ),
            ),
            last_queued: register(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                        "The last time a sync of proxy rules was queued",
                    ),
                    family,
                ),
            ),
            sync_failures: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                        "Cumulative proxy nftables sync failures",
                    ),
                    family,
                ),
            ),
            no_local_endpoints: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                        "Number of services with a Local traffic policy and no endpoints",
                    ),
                    &["traffic_policy", "ip_family"],
                ),
            ),
            healthz: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "kubeproxy_proxy_healthz_total",
                        "Cumulative proxy healthz HTTP status",
                    ),
                    &["code"],
                ),
            ),
            livez: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "kubeproxy_proxy_livez_total",
                        "Cumulative proxy livez HTTP status",
                    ),
                    &["code"],
                ),
            ),
            conntrack_deleted: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "kubeproxy_conntrack_reconciler_deleted_entries_total",
                        "Cumulative conntrack flows deleted by conntrack reconciler",
                    ),
                    family,
                ),
            ),
            operations: register(
                &registry,
                IntCounter::new(
                    "nftproxy_sync_operations_total",
                    "Cumulative nf_tables objects added, replaced or deleted by syncs",
                ),
            ),
            repairs: register(
                &registry,
                IntCounter::new(
                    "nftproxy_sync_repairs_total",
                    "Syncs that put back what another program changed in nftproxy's tables",
                ),
            ),
            kube_proxy_cleanup: register(
                &registry,
                IntCounter::new(
                    "nftproxy_kube_proxy_cleanup_objects_total",
                    "Tables, chains and rules kube-proxy left on the node that nftproxy removed",
                ),
            ),
            service_changes: register(
                &registry,
                IntCounter::new(
                    "kubeproxy_sync_proxy_rules_service_changes_total",
                    "Cumulative proxy rules Service changes",
                ),
            ),
            service_changes_pending: register(
                &registry,
                IntGauge::new(
                    "kubeproxy_sync_proxy_rules_service_changes_pending",
                    "Pending proxy rules Service changes",
                ),
            ),
            endpoint_changes: register(
                &registry,
                IntCounter::new(
                    "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                    "Cumulative proxy rules Endpoint changes",
                ),
            ),
            endpoint_changes_pending: register(
                &registry,
                IntGauge::new(
                    "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                    "Pending proxy rules Endpoint changes",
                ),
            ),
            registry,
        }
    }

    /// A sync was requested for these families.
    pub fn queued(&self, families: &[Family], now: SystemTime) {
        for family in families {
            self.last_queued
                .with_label_values(&[ip_family(*family)])
                .set(unix_seconds(now));
        }
    }

    /// Service and EndpointSlice events that arrived (pending until the next sync).
    pub fn changes_seen(&self, services: u64, endpoint_slices: u64) {
        self.service_changes.inc_by(services);
        self.endpoint_changes.inc_by(endpoint_slices);
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.service_changes_pending.add(gauge(services));
        self.endpoint_changes_pending.add(gauge(endpoint_slices));
    }

    /// A sync of these families succeeded.
    pub fn synced(&self, families: &[Family], took: Duration, operations: usize, now: SystemTime) {
        self.service_changes_pending.set(0);
        self.endpoint_changes_pending.set(0);
        for family in families {
            let label = [ip_family(*family)];
            self.sync_duration
                .with_label_values(&label)
                .observe(seconds(took));
            self.last_sync
                .with_label_values(&label)
                .set(unix_seconds(now));
        }
        self.operations.inc_by(operations as u64);
    }

    /// A sync repaired changes another program made to our tables.
    pub fn repaired(&self) {
        self.repairs.inc();
    }

    /// `objects` of what kube-proxy left were removed.
    pub fn kube_proxy_cleaned(&self, objects: usize) {
        self.kube_proxy_cleanup.inc_by(objects as u64);
    }

    /// A sync of these families failed.
    pub fn failed(&self, families: &[Family]) {
        for family in families {
            self.sync_failures
                .with_label_values(&[ip_family(*family)])
                .inc();
        }
    }

    /// An endpoint change triggered `latency` ago is now programmed.
    pub fn network_programmed(&self, family: Family, latency: Duration) {
        self.network_programming
            .with_label_values(&[ip_family(family)])
            .observe(seconds(latency));
    }

    /// Services with a Local policy whose endpoints are all on other nodes.
    pub fn set_no_local_endpoints(&self, policy: TrafficPolicy, family: Family, count: usize) {
        let policy = match policy {
            TrafficPolicy::Internal => "internal",
            TrafficPolicy::External => "external",
        };
        self.no_local_endpoints
            .with_label_values(&[policy, ip_family(family)])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// A `/healthz` answer was sent.
    pub fn healthz_answered(&self, code: u16) {
        self.healthz.with_label_values(&[&code.to_string()]).inc();
    }

    /// A `/livez` answer was sent.
    pub fn livez_answered(&self, code: u16) {
        self.livez.with_label_values(&[&code.to_string()]).inc();
    }

    /// A conntrack cleanup pass deleted `deleted` entries.
    pub fn conntrack_reconciled(&self, family: Family, deleted: usize, took: Duration) {
        let label = [ip_family(family)];
        self.conntrack_deleted
            .with_label_values(&label)
            .inc_by(deleted as u64);
        self.conntrack_duration
            .with_label_values(&label)
            .observe(seconds(took));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into memory fails only on invalid metric families, which the
        // constant definitions above rule out.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_under_upstreams_name_once_touched() {
        let metrics = Metrics::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        metrics.queued(&[Family::Ip], now);
        metrics.synced(&[Family::Ip, Family::Ip6], Duration::from_millis(3), 7, now);
        metrics.failed(&[Family::Ip6]);
        metrics.network_programmed(Family::Ip, Duration::from_millis(700));
        metrics.set_no_local_endpoints(TrafficPolicy::External, Family::Ip, 2);
        metrics.healthz_answered(503);
        metrics.livez_answered(200);
        metrics.conntrack_reconciled(Family::Ip, 1, Duration::from_millis(1));
        metrics.changes_seen(2, 5);
        let text = metrics.render();
        for line in [
            r#"kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.004"} 1"#,
            r#"kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.002"} 0"#,
            r#"kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv6"} 1"#,
            r#"kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"} 1700000000"#,
            r#"kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family="IPv4"} 1700000000"#,
            r#"kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family="IPv6"} 1"#,
            r#"kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="0.5"} 0"#,
            r#"kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="1"} 1"#,
            r#"kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="300"} 1"#,
            r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="external"} 2"#,
            r#"kubeproxy_proxy_healthz_total{code="503"} 1"#,
            r#"kubeproxy_proxy_livez_total{code="200"} 1"#,
            r#"kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family="IPv4"} 1"#,
            "nftproxy_sync_operations_total 7",
            "kubeproxy_sync_proxy_rules_service_changes_total 2",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 5",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        // 2 + 59 + 12 + 7 upstream boundaries, plus +Inf.
        let buckets = text
            .lines()
            .filter(|l| {
                l.starts_with(
                    r#"kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4""#,
                )
            })
            .count();
        assert_eq!(buckets, 2 + 59 + 12 + 7 + 1);
    }
}
