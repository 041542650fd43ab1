//! kube-proxy's Prometheus metrics (subsystem `kubeproxy`), with upstream's names, labels
//! and histogram buckets so that existing dashboards and recording rules keep working,
//! plus the few of nftproxy's own (prefix `nftproxy_`).
//!
//! Invariant: every metric is registered once, in one registry that `/metrics` renders;
//! `ip_family` is always `IPv4` or `IPv6`, as upstream spells it.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, SystemTime};

use nftproxy_nft::Family;
use nftproxy_render::counters::{Counted, ServicePortLabel};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The metrics registry and its collectors.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Every registered metric's name.
    names: Vec<String>,
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
    http_connections: IntGaugeVec,
    http_shed: IntCounterVec,
    http_accept_errors: IntCounterVec,
    health_check_ports: IntGaugeVec,
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

/// `kubeproxy_network_programming_duration_seconds` buckets: upstream's (pkg/proxy/metrics:
/// 0.25 s, 0.5 s, then 1–59 s by 1 s, 60–115 s by 5 s, 120–300 s by 30 s), below which
/// nftproxy adds 1 ms to 100 ms: its changes reach the kernel in milliseconds, which
/// upstream's first bucket cannot tell apart. A bucket more changes no existing series.
fn network_programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5];
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
        let names = std::cell::RefCell::new(Vec::new());
        fn register<C: prometheus::core::Collector + Clone + 'static>(
            (registry, names): (&Registry, &std::cell::RefCell<Vec<String>>),
            collector: Result<C, prometheus::Error>,
        ) -> C {
            #[allow(clippy::expect_used, reason = "constant metric definitions")]
            let collector = collector.expect("valid metric definition");
            let mut names = names.borrow_mut();
            names.extend(collector.desc().iter().map(|d| d.fq_name.clone()));
            #[allow(clippy::expect_used, reason = "each name is registered once")]
            registry
                .register(Box::new(collector.clone()))
                .expect("unique metric name");
            collector
        }
        let histogram = |name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]| {
            register(
                (&registry, &names),
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels),
            )
        };
        let family = &["ip_family"];
        #[allow(clippy::expect_used, reason = "constant bucket parameters")]
        let sync_buckets =
            prometheus::exponential_buckets(0.001, 2.0, 15).expect("valid bucket parameters");
        let metrics = Metrics {
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
                (&registry, &names),
                GaugeVec::new(
                    Opts::new(
                        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                        "The last time proxy rules were successfully synced",
                    ),
                    family,
                ),
            ),
            last_queued: register(
                (&registry, &names),
                GaugeVec::new(
                    Opts::new(
                        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                        "The last time a sync of proxy rules was queued",
                    ),
                    family,
                ),
            ),
            sync_failures: register(
                (&registry, &names),
                IntCounterVec::new(
                    Opts::new(
                        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                        "Cumulative proxy nftables sync failures",
                    ),
                    family,
                ),
            ),
            no_local_endpoints: register(
                (&registry, &names),
                IntGaugeVec::new(
                    Opts::new(
                        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                        "Number of services with a Local traffic policy and no endpoints",
                    ),
                    &["traffic_policy", "ip_family"],
                ),
            ),
            healthz: register(
                (&registry, &names),
                IntCounterVec::new(
                    Opts::new(
                        "kubeproxy_proxy_healthz_total",
                        "Cumulative proxy healthz HTTP status",
                    ),
                    &["code"],
                ),
            ),
            livez: register(
                (&registry, &names),
                IntCounterVec::new(
                    Opts::new(
                        "kubeproxy_proxy_livez_total",
                        "Cumulative proxy livez HTTP status",
                    ),
                    &["code"],
                ),
            ),
            conntrack_deleted: register(
                (&registry, &names),
                IntCounterVec::new(
                    Opts::new(
                        "kubeproxy_conntrack_reconciler_deleted_entries_total",
                        "Cumulative conntrack flows deleted by conntrack reconciler",
                    ),
                    family,
                ),
            ),
            operations: register(
                (&registry, &names),
                IntCounter::new(
                    "nftproxy_sync_operations_total",
                    "Cumulative nf_tables objects added, replaced or deleted by syncs",
                ),
            ),
            repairs: register(
                (&registry, &names),
                IntCounter::new(
                    "nftproxy_sync_repairs_total",
                    "Syncs that put back what another program changed in nftproxy's tables",
                ),
            ),
            kube_proxy_cleanup: register(
                (&registry, &names),
                IntCounter::new(
                    "nftproxy_kube_proxy_cleanup_objects_total",
                    "Tables, chains and rules kube-proxy left on the node that nftproxy removed",
                ),
            ),
            service_changes: register(
                (&registry, &names),
                IntCounter::new(
                    "kubeproxy_sync_proxy_rules_service_changes_total",
                    "Cumulative proxy rules Service changes",
                ),
            ),
            service_changes_pending: register(
                (&registry, &names),
                IntGauge::new(
                    "kubeproxy_sync_proxy_rules_service_changes_pending",
                    "Pending proxy rules Service changes",
                ),
            ),
            endpoint_changes: register(
                (&registry, &names),
                IntCounter::new(
                    "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                    "Cumulative proxy rules Endpoint changes",
                ),
            ),
            endpoint_changes_pending: register(
                (&registry, &names),
                IntGauge::new(
                    "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                    "Pending proxy rules Endpoint changes",
                ),
            ),
            http_connections: register(
                (&registry, &names),
                IntGaugeVec::new(
                    Opts::new(
                        "nftproxy_http_connections",
                        "Connections open now to nftproxy's HTTP servers",
                    ),
                    &["server"],
                ),
            ),
            http_shed: register(
                (&registry, &names),
                IntCounterVec::new(
                    Opts::new(
                        "nftproxy_http_connections_closed_total",
                        "Connections nftproxy's HTTP servers closed on their own: over a connection cap (the least recently active goes), a request head not read in time, or too old",
                    ),
                    &["server", "reason"],
                ),
            ),
            http_accept_errors: register(
                (&registry, &names),
                IntCounterVec::new(
                    Opts::new(
                        "nftproxy_http_accept_errors_total",
                        "Failed accepts of nftproxy's HTTP servers (each backs off), by error",
                    ),
                    &["server", "error"],
                ),
            ),
            health_check_ports: register(
                (&registry, &names),
                IntGaugeVec::new(
                    Opts::new(
                        "nftproxy_health_check_node_ports",
                        "Health-check node ports the last sync wanted, served or unbound (their port could not be bound; retried on every sync)",
                    ),
                    &["state"],
                ),
            ),
            names: names.into_inner(),
            registry,
        };
        // Both families' series exist from the start, as kube-proxy's gauges do: a last
        // sync at 0 (never) and no failures, so that an alert on "not synced" fires for
        // a daemon that never syncs, and `increase()` counts the first failure. A family
        // the node has no table for stays at 0, which is why the shipped alerts judge a
        // node by its latest sync of any family (one transaction programs both).
        for family in [Family::Ip, Family::Ip6] {
            let label = [ip_family(family)];
            metrics.last_sync.with_label_values(&label).set(0.0);
            metrics.sync_failures.with_label_values(&label).reset();
        }
        metrics
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

    /// A connection to HTTP server `server` opened (`+1`) or closed (`-1`).
    pub fn http_connections(&self, server: &str, delta: i64) {
        self.http_connections
            .with_label_values(&[server])
            .add(delta);
    }

    /// HTTP server `server` closed a connection for `reason`.
    pub fn http_connection_shed(&self, server: &str, reason: &str) {
        self.http_shed.with_label_values(&[server, reason]).inc();
    }

    /// HTTP server `server` failed to accept a connection with `error` (`EMFILE`, …).
    pub fn http_accept_failed(&self, server: &str, error: &str) {
        self.http_accept_errors
            .with_label_values(&[server, error])
            .inc();
    }

    /// Of the health-check node ports wanted, `served` are served and `unbound` could not
    /// be bound.
    pub fn health_check_ports(&self, served: usize, unbound: usize) {
        for (state, count) in [("served", served), ("unbound", unbound)] {
            self.health_check_ports
                .with_label_values(&[state])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
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

    /// The name of every metric `/metrics` can show: the registered ones and the
    /// connection counters ([`connections_text`]).
    pub fn names(&self) -> Vec<String> {
        let mut names = self.names.clone();
        names.extend(CONNECTION_METRICS.map(str::to_owned));
        names
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

/// The connection counters' metrics, read from the kernel at each scrape.
pub const CONNECTION_METRICS: [&str; 3] = [
    "nftproxy_service_connections_total",
    "nftproxy_endpoint_connections_total",
    "nftproxy_unallocated_service_address_connections_total",
];

/// A label value in the Prometheus text format.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `namespace="…",service="…",port="…",protocol="…"`
fn port_labels(label: &ServicePortLabel) -> String {
    format!(
        "namespace=\"{}\",service=\"{}\",port=\"{}\",protocol=\"{}\"",
        escape(&label.namespace),
        escape(&label.service),
        escape(&label.port),
        escape(&label.protocol)
    )
}

/// The connection totals (from [`nftproxy_render::counters::Totals`]) as Prometheus
/// text: per Service port and outcome, per endpoint (`ip:port`, IPv6 in brackets), and
/// to unallocated Service addresses. Every family is announced, with or without
/// samples.
pub fn connections_text(connections: &BTreeMap<Counted, u64>) -> String {
    let [services_name, endpoints_name, unallocated_name] = CONNECTION_METRICS;
    let mut services = String::new();
    let mut endpoints = String::new();
    let mut unallocated = 0;
    for (counted, n) in connections {
        match counted {
            Counted::Service(label, outcome) => {
                let _ = writeln!(
                    services,
                    "{services_name}{{{},outcome=\"{}\"}} {n}",
                    port_labels(label),
                    outcome.as_str()
                );
            }
            Counted::Endpoint(label, endpoint) => {
                let _ = writeln!(
                    endpoints,
                    "{endpoints_name}{{{},endpoint=\"{endpoint}\"}} {n}",
                    port_labels(label),
                );
            }
            Counted::Unallocated => unallocated += n,
        }
    }
    let mut out = String::new();
    for (name, help, body) in [
        (
            services_name,
            "New connections to a Service port by what became of them, counted in the kernel (a refused or dropped attempt retried counts again)",
            services,
        ),
        (
            endpoints_name,
            "New connections a Service port sent to an endpoint, counted in the kernel",
            endpoints,
        ),
        (
            unallocated_name,
            "New connections to addresses of the Service CIDRs that no Service holds (dropped)",
            format!("{unallocated_name} {unallocated}\n"),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        out.push_str(&body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nftproxy_render::counters::Outcome;

    #[test]
    fn connections_are_named_with_their_labels() {
        let label = std::sync::Arc::new(ServicePortLabel {
            namespace: "ns".into(),
            service: "web".into(),
            port: "http".into(),
            protocol: "TCP".into(),
        });
        let endpoint = "[fd00::1]:8080".parse().expect("test address");
        let connections = BTreeMap::from([
            (Counted::Service(label.clone(), Outcome::Forwarded), 7),
            (Counted::Endpoint(label, endpoint), 7),
            (Counted::Unallocated, 2),
        ]);
        let text = connections_text(&connections);
        for line in [
            r#"nftproxy_service_connections_total{namespace="ns",service="web",port="http",protocol="TCP",outcome="forwarded"} 7"#,
            r#"nftproxy_endpoint_connections_total{namespace="ns",service="web",port="http",protocol="TCP",endpoint="[fd00::1]:8080"} 7"#,
            "nftproxy_unallocated_service_address_connections_total 2",
            "# TYPE nftproxy_endpoint_connections_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
        // Every family the text announces is one of the names.
        let names = Metrics::new().names();
        for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = family.split(' ').next().unwrap_or_default();
            assert!(names.iter().any(|n| n == name), "{name}");
        }
    }

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
        metrics.http_connections("healthz", 2);
        metrics.http_connections("healthz", -1);
        metrics.http_connection_shed("health-check", "over_cap");
        metrics.http_accept_failed("metrics", "EMFILE");
        let text = metrics.render();
        for line in [
            r#"kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.004"} 1"#,
            r#"kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.002"} 0"#,
            r#"kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv6"} 1"#,
            r#"kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"} 1700000000"#,
            r#"kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family="IPv4"} 1700000000"#,
            r#"kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family="IPv6"} 1"#,
            r#"kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="0.001"} 0"#,
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
            r#"nftproxy_http_connections{server="healthz"} 1"#,
            r#"nftproxy_http_connections_closed_total{reason="over_cap",server="health-check"} 1"#,
            r#"nftproxy_http_accept_errors_total{error="EMFILE",server="metrics"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        // 7 below upstream's, its 2 + 59 + 12 + 7 boundaries, plus +Inf.
        let buckets = text
            .lines()
            .filter(|l| {
                l.starts_with(
                    r#"kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4""#,
                )
            })
            .count();
        assert_eq!(buckets, 7 + 2 + 59 + 12 + 7 + 1);
    }
}
