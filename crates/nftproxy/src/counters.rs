//! Connection counters from the kernel: read from nftproxy's tables of this network
//! namespace, totalled per Service port, outcome and endpoint, for `/metrics`
//! ([`nftproxy_proxier::metrics::connections_text`]), `explain --live` and `nftproxy
//! top`.
//!
//! Invariant: reading only lists nftproxy's own counted sets and rules; a total never
//! goes down while its Service port exists ([`Totals`] carries deleted counters).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nftproxy_netlink::NetlinkBackend;
use nftproxy_nft::Family;
use nftproxy_render::TABLE_NAME;
use nftproxy_render::counters::{Counted, Outcome, ServicePortLabel, Totals, naming_sets};

/// Totals by what they count, both families added up.
pub type Connections = BTreeMap<Counted, u64>;

/// The totals of both families' tables, kept across readings.
#[derive(Debug, Default)]
pub struct Counters {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    totals: [Totals; 2],
    /// The last reading: when it started, how long it took, what it gave.
    last: Option<(Instant, Duration, Arc<Connections>)>,
}

/// A reading is reused until it is this many times as old as it took: reading costs
/// about 0.3 s at 10,000 Services × 5 endpoints and 2 s at 30,000 × 10 (see the
/// benchmark), so however often `/metrics` is scraped, the counters take at most a
/// tenth of a core; a small cluster's, read in milliseconds, are as fresh.
const REUSE_FACTOR: u32 = 10;

impl Counters {
    /// Both tables' totals: read now, or the last reading while it is recent enough.
    pub fn read(&self) -> Result<Arc<Connections>, String> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| "the counter totals were poisoned by a panic".to_owned())?;
        if let Some((at, took, connections)) = &state.last
            && at.elapsed() < *took * REUSE_FACTOR
        {
            return Ok(Arc::clone(connections));
        }
        let started = Instant::now();
        let connections = Arc::new(read_totals(&mut state.totals)?);
        state.last = Some((started, started.elapsed(), Arc::clone(&connections)));
        Ok(connections)
    }
}

/// Reads both tables' counters and adds them to `totals`, per family.
fn read_totals(totals: &mut [Totals; 2]) -> Result<Connections, String> {
    let mut backend = NetlinkBackend::reader().map_err(|e| e.to_string())?;
    let mut all = Connections::new();
    for (family, family_totals) in [Family::Ip, Family::Ip6].into_iter().zip(totals.iter_mut()) {
        let reading = backend
            .counters(family, TABLE_NAME, &naming_sets())
            .map_err(|e| format!("reading the counters of {family} {TABLE_NAME}: {e}"))?
            .unwrap_or_default();
        for (counted, n) in family_totals.update(&reading) {
            *all.entry(counted).or_default() += n;
        }
    }
    Ok(all)
}

/// One Service port's connections by outcome, and per endpoint.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Row {
    pub forwarded: u64,
    pub rejected: u64,
    pub dropped: u64,
    pub endpoints: BTreeMap<SocketAddr, u64>,
}

impl Row {
    fn total(&self) -> u64 {
        self.forwarded + self.rejected + self.dropped
    }
}

/// The totals gathered by Service port.
pub fn rows(connections: &Connections) -> BTreeMap<ServicePortLabel, Row> {
    let mut rows: BTreeMap<ServicePortLabel, Row> = BTreeMap::new();
    for (counted, n) in connections {
        match counted {
            Counted::Service(label, outcome) => {
                let row = rows.entry((**label).clone()).or_default();
                match outcome {
                    Outcome::Forwarded => row.forwarded += n,
                    Outcome::Rejected => row.rejected += n,
                    Outcome::Dropped => row.dropped += n,
                }
            }
            Counted::Endpoint(label, endpoint) => {
                *rows
                    .entry((**label).clone())
                    .or_default()
                    .endpoints
                    .entry(*endpoint)
                    .or_default() += n;
            }
            Counted::Unallocated => {}
        }
    }
    rows
}

/// A terminal table of the busiest Service ports (by all their connections), then of
/// those rejecting or dropping, at most `limit` rows each.
pub fn top_text(connections: &Connections, limit: usize) -> String {
    if connections.is_empty() {
        return "No connection counters in this network namespace's nftproxy tables: they \
                are counted only with --service-counters (serviceCounters: true).\n"
            .to_owned();
    }
    let rows = rows(connections);
    let mut busiest: Vec<(&ServicePortLabel, &Row)> =
        rows.iter().filter(|(_, r)| r.total() > 0).collect();
    busiest.sort_by(|a, b| b.1.total().cmp(&a.1.total()).then_with(|| a.0.cmp(b.0)));
    let mut refusing: Vec<(&ServicePortLabel, &Row)> = rows
        .iter()
        .filter(|(_, r)| r.rejected + r.dropped > 0)
        .collect();
    refusing.sort_by(|a, b| {
        (b.1.rejected + b.1.dropped)
            .cmp(&(a.1.rejected + a.1.dropped))
            .then_with(|| a.0.cmp(b.0))
    });
    let mut out = String::new();
    let table = |out: &mut String, title: &str, list: &[(&ServicePortLabel, &Row)]| {
        let _ = writeln!(out, "{title}");
        if list.is_empty() {
            let _ = writeln!(out, "  (none)");
            return;
        }
        let shown = &list[..list.len().min(limit)];
        let names: Vec<String> = shown.iter().map(|(l, _)| service_port_text(l)).collect();
        let width = names.iter().map(String::len).max().unwrap_or(0).max(12);
        let _ = writeln!(
            out,
            "  {:<width$}  {:>10}  {:>10}  {:>10}  {:>9}",
            "SERVICE PORT", "FORWARDED", "REJECTED", "DROPPED", "ENDPOINTS"
        );
        for (name, (_, row)) in names.iter().zip(shown) {
            let _ = writeln!(
                out,
                "  {name:<width$}  {:>10}  {:>10}  {:>10}  {:>9}",
                row.forwarded,
                row.rejected,
                row.dropped,
                row.endpoints.len()
            );
        }
    };
    table(
        &mut out,
        "Busiest Service ports (new connections):",
        &busiest,
    );
    let _ = writeln!(out);
    table(&mut out, "Rejecting or dropping:", &refusing);
    let unallocated = connections.get(&Counted::Unallocated).copied().unwrap_or(0);
    if unallocated > 0 {
        let _ = writeln!(
            out,
            "\n{unallocated} connections to unallocated Service addresses were dropped."
        );
    }
    out
}

/// `ns/name:port/PROTO`, or `ns/name (ports it does not define)`.
pub fn service_port_text(label: &ServicePortLabel) -> String {
    if label.port.is_empty() {
        format!("{} (ports it does not define)", label.service_name())
    } else {
        format!("{}:{}/{}", label.service_name(), label.port, label.protocol)
    }
}

/// A Service port's counters, for `explain --live`: its outcomes, then its endpoints.
pub fn row_text(label: &ServicePortLabel, row: &Row) -> String {
    let mut out = format!(
        "        {}: {} forwarded, {} rejected, {} dropped\n",
        service_port_text(label),
        row.forwarded,
        row.rejected,
        row.dropped
    );
    for (endpoint, n) in &row.endpoints {
        let _ = writeln!(out, "          endpoint {}: {n}", endpoint);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(port: &str) -> std::sync::Arc<ServicePortLabel> {
        std::sync::Arc::new(ServicePortLabel {
            namespace: "ns".into(),
            service: "web".into(),
            port: port.into(),
            protocol: "TCP".into(),
        })
    }

    #[test]
    fn top_lists_the_busiest_and_the_refusing() {
        let connections = Connections::from([
            (Counted::Service(label("http"), Outcome::Forwarded), 7),
            (Counted::Service(label("admin"), Outcome::Rejected), 3),
        ]);
        let text = top_text(&connections, 10);
        assert!(top_text(&Connections::new(), 10).contains("--service-counters"));
        assert_eq!(
            top_text(&connections, 1).matches("ns/web:http/TCP").count(),
            1
        );
        let busiest = text.split("Rejecting").next().unwrap_or_default();
        assert!(
            busiest.find("ns/web:http/TCP") < busiest.find("ns/web:admin/TCP"),
            "{text}"
        );
        let refusing = text.split("Rejecting").nth(1).unwrap_or_default();
        assert!(
            refusing.contains("ns/web:admin/TCP") && !refusing.contains("http"),
            "{text}"
        );
    }
}
