//! Endpoint selection for one service port (kube-proxy's `CategorizeEndpoints`):
//! readiness, the serving-terminating fallback, traffic policies and topology hints.
//!
//! Invariant: not-serving endpoints are never chosen; the Cluster and Local sets each
//! fall back to serving-terminating endpoints only when they have no ready one; hints
//! apply all-or-nothing.

use std::borrow::Cow;

use crate::endpoint::Endpoint;

/// The endpoints a service port uses on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CategorizedEndpoints {
    /// Endpoints for Cluster traffic policy.
    pub cluster: Vec<Endpoint>,
    /// Endpoints on this node, for Local traffic policy.
    pub local: Vec<Endpoint>,
    /// Whether any usable endpoint exists anywhere in the cluster.
    pub has_any: bool,
    /// UDP service ports only: every serving endpoint, wherever it runs and whatever the
    /// traffic policy and topology hints make of it, in address order. A UDP flow whose
    /// reply comes from one of these is still answered, so the conntrack cleanup keeps
    /// it. Empty for other protocols (nothing asks), which is most of a large cluster.
    pub udp_serving: Vec<Endpoint>,
}

impl CategorizedEndpoints {
    /// The union of both, in address order: every endpoint traffic may reach from here.
    /// Borrowed when one list is that already, as it is for nearly every service port
    /// (the endpoints come sorted): the build keeps no third list.
    pub fn all_reachable(&self) -> Cow<'_, [Endpoint]> {
        let ordered = |list: &[Endpoint]| list.windows(2).all(|pair| pair[0] < pair[1]);
        match (self.cluster.as_slice(), self.local.as_slice()) {
            (list, []) | ([], list) if ordered(list) => Cow::Borrowed(list),
            (cluster, local) => {
                let mut all = cluster.to_vec();
                all.extend_from_slice(local);
                all.sort();
                all.dedup();
                Cow::Owned(all)
            }
        }
    }
}

/// How topology hints narrow the Cluster endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    None,
    SameNode,
    SameZone,
}

fn topology_mode(endpoints: &[Endpoint], node_name: &str, zone: Option<&str>) -> TopologyMode {
    let ready = || endpoints.iter().filter(|e| e.ready);
    let all_have_node_hints = ready().all(|e| !e.node_hints().is_empty());
    let all_have_zone_hints = ready().all(|e| !e.zone_hints().is_empty());
    // With no ready endpoint there is nothing to narrow.
    if ready().next().is_none() {
        return TopologyMode::None;
    }
    if all_have_node_hints && ready().any(|e| e.node_hints().iter().any(|n| n == node_name)) {
        return TopologyMode::SameNode;
    }
    if let Some(zone) = zone
        && all_have_zone_hints
        && ready().any(|e| e.zone_hints().iter().any(|z| z == zone))
    {
        return TopologyMode::SameZone;
    }
    TopologyMode::None
}

fn available(endpoint: &Endpoint, mode: TopologyMode, node_name: &str, zone: Option<&str>) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameNode => endpoint.node_hints().iter().any(|n| n == node_name),
        TopologyMode::SameZone => endpoint
            .zone_hints()
            .iter()
            .any(|z| Some(z.as_str()) == zone),
    }
}

/// Splits a service port's endpoints into the Cluster and Local sets.
///
/// `uses_cluster` / `uses_local` say whether any traffic of the service follows the
/// Cluster or the Local policy; a set that is not used stays empty.
pub fn categorize_endpoints(
    endpoints: &[Endpoint],
    uses_cluster: bool,
    uses_local: bool,
    node_name: &str,
    zone: Option<&str>,
) -> CategorizedEndpoints {
    let serving_terminating = |e: &&Endpoint| e.serving && e.terminating;
    let mut result = CategorizedEndpoints::default();
    if uses_cluster {
        let mode = topology_mode(endpoints, node_name, zone);
        result.cluster = endpoints
            .iter()
            .filter(|e| e.ready && available(e, mode, node_name, zone))
            .cloned()
            .collect();
        if result.cluster.is_empty() {
            result.cluster = endpoints
                .iter()
                .filter(serving_terminating)
                .cloned()
                .collect();
        }
        result.has_any = !result.cluster.is_empty();
    }
    if uses_local {
        result.has_any |= endpoints
            .iter()
            .any(|e| e.ready || (e.serving && e.terminating));
        let local_ready: Vec<Endpoint> = endpoints
            .iter()
            .filter(|e| e.is_local && e.ready)
            .cloned()
            .collect();
        result.local = if local_ready.is_empty() {
            endpoints
                .iter()
                .filter(|e| e.is_local)
                .filter(serving_terminating)
                .cloned()
                .collect()
        } else {
            local_ready
        };
    }
    // The build keeps these for every service port of the cluster: no spare room.
    result.cluster.shrink_to_fit();
    result.local.shrink_to_fit();
    result
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::endpoint::Hints;

    fn ep(last: u8, ready: bool, serving: bool, terminating: bool, local: bool) -> Endpoint {
        Endpoint {
            ip: [10, 180, 0, last].into(),
            port: 80,
            ready,
            serving,
            terminating,
            is_local: local,
            hints: None,
        }
    }

    fn zones(names: &[&str]) -> Option<Arc<Hints>> {
        Some(Arc::new(Hints {
            zones: names.iter().map(|z| (*z).to_owned()).collect(),
            nodes: Vec::new(),
        }))
    }

    fn ips(endpoints: &[Endpoint]) -> Vec<u8> {
        endpoints
            .iter()
            .map(|e| match e.ip {
                std::net::IpAddr::V4(v4) => v4.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            })
            .collect()
    }

    #[test]
    fn ready_endpoints_win_over_terminating_ones() {
        let eps = [
            ep(1, true, true, false, false),
            ep(2, false, true, true, false),
        ];
        let c = categorize_endpoints(&eps, true, false, "n", None);
        assert_eq!(ips(&c.cluster), [1]);
        assert!(c.has_any);
    }

    #[test]
    fn serving_terminating_is_the_fallback_and_not_serving_is_never_used() {
        let eps = [
            ep(1, false, false, true, false),
            ep(2, false, true, true, false),
            ep(3, false, false, false, false),
        ];
        let c = categorize_endpoints(&eps, true, false, "n", None);
        assert_eq!(ips(&c.cluster), [2]);
        let none = categorize_endpoints(&[ep(1, false, false, true, false)], true, true, "n", None);
        assert!(!none.has_any && none.cluster.is_empty() && none.local.is_empty());
    }

    #[test]
    fn local_set_falls_back_independently() {
        let eps = [
            ep(1, true, true, false, false),
            ep(2, false, true, true, true),
        ];
        let c = categorize_endpoints(&eps, true, true, "n", None);
        assert_eq!(ips(&c.cluster), [1]);
        assert_eq!(ips(&c.local), [2]);
        assert_eq!(ips(&c.all_reachable()), [1, 2]);
        let only_local = categorize_endpoints(&eps[..1], false, true, "n", None);
        assert!(only_local.has_any && only_local.local.is_empty() && only_local.cluster.is_empty());
    }

    #[test]
    fn zone_hints_are_all_or_nothing() {
        let mut a = ep(1, true, true, false, false);
        let mut b = ep(2, true, true, false, false);
        a.hints = zones(&["z1"]);
        b.hints = zones(&["z2"]);
        let c = categorize_endpoints(&[a.clone(), b.clone()], true, false, "n", Some("z1"));
        assert_eq!(ips(&c.cluster), [1]);
        // No endpoint hinted for this zone: hints ignored.
        let c = categorize_endpoints(&[a.clone(), b.clone()], true, false, "n", Some("z3"));
        assert_eq!(ips(&c.cluster), [1, 2]);
        // One ready endpoint without hints: hints ignored.
        b.hints = None;
        let c = categorize_endpoints(&[a, b], true, false, "n", Some("z1"));
        assert_eq!(ips(&c.cluster), [1, 2]);
    }

    #[test]
    fn node_hints_take_precedence_over_zone_hints() {
        let mut a = ep(1, true, true, false, true);
        let mut b = ep(2, true, true, false, false);
        let both = |node: &str| {
            Some(Arc::new(Hints {
                zones: vec!["z".into()],
                nodes: vec![node.into()],
            }))
        };
        a.hints = both("n");
        b.hints = both("other");
        let c = categorize_endpoints(&[a, b], true, false, "n", Some("z"));
        assert_eq!(ips(&c.cluster), [1]);
    }
}
