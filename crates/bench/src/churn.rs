//! Network programming latency under churn, as users run the daemon: against an API
//! server holding a synthetic cluster, EndpointSlices change at a steady rate, each
//! stamped with its `endpoints.kubernetes.io/last-change-trigger-time` as the
//! EndpointSlice controller does, and the daemon's own
//! `kubeproxy_network_programming_duration_seconds` says how long each took to reach the
//! kernel.
//!
//! Invariant: a run counts only when every change was observed programmed (the
//! histogram's count equals the changes made); quantiles are read from the histogram as
//! Prometheus's `histogram_quantile` reads them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nftproxy_testkit::fake_api::FakeApi;
use serde::{Deserialize, Serialize};

use crate::daemon::{Daemon, get, nftproxy_binary, populate};
use crate::synth::{self, Spec};

/// Where the daemon serves `/metrics`.
const METRICS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 10249);
/// How long the last changes may take to be programmed before the run fails.
const SETTLE: Duration = Duration::from_secs(15);
const HISTOGRAM: &str =
    "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"";

/// One daemon's latency under churn.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChurnRun {
    /// `--min-sync-period`.
    pub min_sync_period: String,
    /// EndpointSlice changes made (and observed programmed).
    pub changes: u64,
    /// Quantiles of the trigger-to-kernel latency, from the histogram.
    pub p50_seconds: f64,
    /// 90th percentile.
    pub p90_seconds: f64,
    /// 99th percentile.
    pub p99_seconds: f64,
    /// Share of changes programmed within 50 ms (the histogram's `le="0.05"` bucket):
    /// exact, where the quantiles are interpolated.
    pub within_50ms: f64,
    /// Share programmed within 1 s (`le="1"`), the default `--min-sync-period`'s bound.
    pub within_1s: f64,
}

/// The churn runs of one cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChurnReport {
    /// Services.
    pub services: u32,
    /// Endpoints per Service.
    pub endpoints: u32,
    /// Changes per second.
    pub rate: u32,
    /// Seconds of churn per run.
    pub seconds: u32,
    /// One per `--min-sync-period`.
    pub runs: Vec<ChurnRun>,
}

/// The IPv4 histogram's cumulative buckets, `(le, count)`, `+Inf` last.
fn buckets(metrics: &str) -> Vec<(f64, f64)> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(HISTOGRAM))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of cumulative `buckets`, interpolated inside its bucket as
/// `histogram_quantile` does (the last finite bound when it falls in `+Inf`).
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |(_, count)| *count);
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower;
            }
            let share = if count > below {
                (rank - below) / (count - below)
            } else {
                0.0
            };
            return lower + (le - lower) * share;
        }
        (lower, below) = (le, count);
    }
    lower
}

/// EndpointSlice changes at `rate` per second for `seconds`, each one endpoint more or
/// less than before, each stamped with its trigger time.
fn churn(api: &FakeApi, specs: &mut [Spec], rate: u32, seconds: u32) -> Result<u64, String> {
    let every = Duration::from_secs(1) / rate.max(1);
    let total = u64::from(rate) * u64::from(seconds);
    let started = Instant::now();
    for n in 0..total {
        let at = started + every * u32::try_from(n).map_err(|e| e.to_string())?;
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        // Spread over the cluster, and back to the first Service only after all.
        let index = usize::try_from(n.wrapping_mul(7_919) % specs.len() as u64)
            .map_err(|e| e.to_string())?;
        let spec = &mut specs[index];
        let k = u32::try_from(spec.endpoints.len()).map_err(|e| e.to_string())?;
        if k % 2 == 0 {
            spec.endpoints.pop();
        } else {
            spec.endpoints.push(synth::endpoint_ip(spec.index, k));
        }
        let mut slice =
            serde_json::to_value(synth::endpoint_slice(spec)).map_err(|e| e.to_string())?;
        slice["metadata"]["annotations"] = serde_json::json!({
            "endpoints.kubernetes.io/last-change-trigger-time": jiff::Timestamp::now().to_string(),
        });
        api.apply(slice);
    }
    Ok(total)
}

/// The daemon with `extra` flags, churned; its histogram read once every change is in.
fn measure(
    api: &FakeApi,
    specs: &mut [Spec],
    rate: u32,
    seconds: u32,
    min_sync_period: &str,
) -> Result<ChurnRun, String> {
    let binary = nftproxy_binary()?;
    let mut daemon = Daemon::start(&binary, api, &["--min-sync-period", min_sync_period])?;
    daemon.first_sync()?;
    let changes = churn(api, specs, rate, seconds)?;
    let deadline = Instant::now() + SETTLE;
    let buckets = loop {
        let text = get(METRICS, "/metrics").map_err(|e| format!("/metrics: {e}"))?;
        let buckets = buckets(&text);
        let observed = buckets.last().map_or(0.0, |(_, count)| *count);
        if observed >= changes as f64 {
            break buckets;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "--min-sync-period {min_sync_period}: {observed} of {changes} changes programmed"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    daemon.stop()?;
    let within = |bound: f64| {
        let count = buckets
            .iter()
            .find(|(le, _)| (*le - bound).abs() < 1e-9)
            .map_or(0.0, |(_, count)| *count);
        count / changes.max(1) as f64
    };
    Ok(ChurnRun {
        min_sync_period: min_sync_period.to_owned(),
        changes,
        p50_seconds: quantile(&buckets, 0.5),
        p90_seconds: quantile(&buckets, 0.9),
        p99_seconds: quantile(&buckets, 0.99),
        within_50ms: within(0.05),
        within_1s: within(1.0),
    })
}

/// `services` × `endpoints` in the API server; `rate` changes a second for `seconds`,
/// with `--min-sync-period 0s` and then the default `1s`.
pub fn run(services: u32, endpoints: u32, rate: u32, seconds: u32) -> Result<ChurnReport, String> {
    crate::worker::ip(&["link", "set", "lo", "up"])?;
    let api = FakeApi::start();
    populate(&api, services, endpoints)?;
    let mut specs = synth::specs(services, endpoints);
    let mut runs = Vec::new();
    for min_sync_period in ["0s", "1s"] {
        runs.push(measure(&api, &mut specs, rate, seconds, min_sync_period)?);
    }
    Ok(ChurnReport {
        services,
        endpoints,
        rate,
        seconds,
        runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_read_as_histogram_quantile_reads_them() {
        let text = format!(
            "{HISTOGRAM}0.001\"}} 0\n{HISTOGRAM}0.01\"}} 50\n{HISTOGRAM}0.05\"}} 90\n\
             {HISTOGRAM}0.25\"}} 100\n{HISTOGRAM}+Inf\"}} 100\nother 1\n"
        );
        let b = buckets(&text);
        assert_eq!(b.len(), 5);
        assert!((quantile(&b, 0.5) - 0.01).abs() < 1e-9);
        // Rank 70 is halfway from 50 to 90: halfway from 10 ms to 50 ms.
        assert!((quantile(&b, 0.7) - 0.03).abs() < 1e-9);
        assert!((quantile(&b, 0.99) - (0.05 + 0.2 * 0.9)).abs() < 1e-9);
    }
}
