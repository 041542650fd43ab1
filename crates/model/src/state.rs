//! The per-family proxy state: every service port this node programs, with its
//! addresses, policies and chosen endpoints, plus the node-level settings for the family.
//!
//! Invariant: a `ProxyState` is consistent enough to render without checks: service
//! ports are sorted by name, addresses belong to the state's family, endpoints are sorted
//! and unique, and no two service ports claim the same address, protocol and port (the
//! later one in name order loses the address, with a diagnostic).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::rc::Rc;

use compact_str::CompactString;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use crate::config::ProxyConfig;
use crate::diag::{Diagnostic, ObjectRef};
use crate::manifest::Snapshot;
use crate::net::{parse_cidr, parse_ip};
pub use crate::topology::CategorizedEndpoints;
use crate::{IpFamily, Protocol};

const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Identifies a service port: `namespace/name:port` plus the protocol.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    /// Namespace.
    pub namespace: CompactString,
    /// Service name.
    pub name: CompactString,
    /// Port name (may be empty).
    pub port: CompactString,
    /// Protocol.
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    /// kube-proxy's spelling: `ns/name:port`, or `ns/name` for an unnamed port.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// One service port in one family, ready to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortState {
    /// Name.
    pub name: ServicePortName,
    /// ClusterIP of this family.
    pub cluster_ip: IpAddr,
    /// Service port.
    pub port: u16,
    /// NodePort, if any.
    pub node_port: Option<u16>,
    /// externalIPs of this family.
    pub external_ips: Vec<IpAddr>,
    /// Load balancer ingress IPs of this family (ipMode Proxy excluded).
    pub load_balancer_ips: Vec<IpAddr>,
    /// loadBalancerSourceRanges of this family.
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// internalTrafficPolicy: Local.
    pub internal_policy_local: bool,
    /// externalTrafficPolicy: Local (only where external traffic exists).
    pub external_policy_local: bool,
    /// ClientIP session affinity timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// healthCheckNodePort (LoadBalancer with externalTrafficPolicy Local).
    pub health_check_node_port: Option<u16>,
    /// Chosen endpoints.
    pub endpoints: CategorizedEndpoints,
}

impl ServicePortState {
    /// Reachable from outside the cluster: a NodePort, external IPs or LB IPs.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }

    /// Whether any traffic follows the Cluster policy. External traffic always needs the
    /// Cluster endpoints, even with Local policy, to short-circuit pod and host traffic.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }

    /// Whether any traffic follows the Local policy.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.external_policy_local && self.externally_accessible())
    }

    /// Whether ClusterIP traffic has somewhere to go.
    pub fn has_internal_endpoints(&self) -> bool {
        if self.internal_policy_local {
            !self.endpoints.local.is_empty()
        } else {
            self.endpoints.has_any
        }
    }

    /// Whether external traffic has somewhere to go.
    pub fn has_external_endpoints(&self) -> bool {
        if self.external_policy_local {
            !self.endpoints.local.is_empty()
        } else {
            self.endpoints.has_any
        }
    }
}

/// A Service that asks for a health-check node port (a LoadBalancer with
/// `externalTrafficPolicy: Local`): load balancers probe it to learn whether this node has
/// endpoints of the Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HealthCheck {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// `healthCheckNodePort`.
    pub port: u16,
    /// Ready endpoints of the Service on this node (terminating ones do not count), each
    /// address and port once over all the Service's ports and families, as upstream counts.
    pub local_endpoints: usize,
}

impl Build {
    /// The node addresses that accept NodePorts (and health-check node ports) in the
    /// families in use; empty when every address does.
    pub fn node_port_ips(&self) -> Vec<IpAddr> {
        let mut ips = Vec::new();
        for state in [&self.ipv4, &self.ipv6] {
            match &state.node_port_addresses {
                NodePortAddresses::All => return Vec::new(),
                NodePortAddresses::Addresses(list) => ips.extend(list.iter().copied()),
            }
        }
        ips.sort();
        ips.dedup();
        ips
    }

    /// The health-check node ports to serve, sorted by Service.
    pub fn health_checks(&self) -> Vec<HealthCheck> {
        // (namespace, name) → (port, local ready address:port pairs)
        type Local = BTreeSet<(IpAddr, u16)>;
        let mut services: BTreeMap<(&str, &str), (u16, Local)> = BTreeMap::new();
        for service in self.ipv4.services.iter().chain(&self.ipv6.services) {
            let Some(port) = service.health_check_node_port else {
                continue;
            };
            let key = (service.name.namespace.as_str(), service.name.name.as_str());
            let (_, local) = services.entry(key).or_insert((port, BTreeSet::new()));
            local.extend(
                service
                    .endpoints
                    .local
                    .iter()
                    .filter(|e| e.ready)
                    .map(|e| (e.ip, e.port)),
            );
        }
        services
            .into_iter()
            .map(|((namespace, name), (port, local))| HealthCheck {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                port,
                local_endpoints: local.len(),
            })
            .collect()
    }
}

/// Which node addresses accept NodePort traffic in a family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every local address except loopback.
    All,
    /// These addresses (possibly none).
    Addresses(Vec<IpAddr>),
}

/// One candidate NodePort address and whether it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePortChoice {
    /// The address.
    pub address: IpAddr,
    /// Whether NodePorts are accepted on it.
    pub taken: bool,
    /// Why (e.g. "inside 192.168.0.0/16", "outside every nodePortAddresses CIDR").
    pub reason: String,
}

/// How this family recognises traffic from local pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalTraffic {
    /// Not known: no ClusterIP masquerade rule for outside traffic, no pod short-circuit.
    Unknown,
    /// Source inside this CIDR.
    Cidr(IpNet),
    /// Arriving on this interface.
    Interface(String),
    /// Arriving on an interface whose name starts with this prefix.
    InterfacePrefix(String),
}

/// Everything one family's table is rendered from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyState {
    /// The family.
    pub family: IpFamily,
    /// Node IPs of this family, primary first.
    pub node_ips: Vec<IpAddr>,
    /// Where NodePorts are accepted.
    pub node_port_addresses: NodePortAddresses,
    /// The candidates for NodePort addresses and what became of each, for the logs.
    pub node_port_choices: Vec<NodePortChoice>,
    /// Local pod traffic detection.
    pub local_traffic: LocalTraffic,
    /// Masquerade all ClusterIP traffic.
    pub masquerade_all: bool,
    /// The mark bit that requests masquerading.
    pub masquerade_mark: u32,
    /// Count connections per Service port, outcome and endpoint in the kernel.
    pub service_counters: bool,
    /// Service CIDRs of this family.
    pub service_cidrs: Vec<IpNet>,
    /// Service ports, sorted by name.
    pub services: Vec<ServicePortState>,
}

impl ProxyState {
    /// kube-proxy's `no_local_endpoints` counts: service ports with endpoints somewhere but
    /// none on this node whose internal, or (when reachable from outside) external,
    /// traffic policy is Local, so that such traffic arriving here is dropped.
    pub fn no_local_endpoints(&self) -> (usize, usize) {
        let stranded = self
            .services
            .iter()
            .filter(|s| s.endpoints.has_any && s.endpoints.local.is_empty());
        let (mut internal, mut external) = (0, 0);
        for service in stranded {
            internal += usize::from(service.internal_policy_local);
            external +=
                usize::from(service.external_policy_local && service.externally_accessible());
        }
        (internal, external)
    }

    /// Whether this family has anything to program: IPv4 always; IPv6 only with IPv6
    /// node addresses, Services or Service CIDRs.
    pub fn is_active(&self) -> bool {
        self.family == IpFamily::V4
            || !self.node_ips.is_empty()
            || !self.services.is_empty()
            || !self.service_cidrs.is_empty()
    }
}

/// The result of [`build`]: both families' states and what was left out.
#[derive(Debug, Clone)]
pub struct Build {
    /// IPv4 state.
    pub ipv4: ProxyState,
    /// IPv6 state.
    pub ipv6: ProxyState,
    /// Objects (or parts) left out, sorted and without repeats.
    pub diagnostics: Vec<Diagnostic>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeFacts {
    pub(crate) ips: Vec<IpAddr>,
    pub(crate) zone: Option<String>,
    pub(crate) pod_cidrs: Vec<IpNet>,
    /// The namespace's interface addresses, sorted (see [`Snapshot::local_addresses`]).
    pub(crate) local_addresses: Option<Vec<IpAddr>>,
}

pub(crate) fn node_facts(
    snapshot: &Snapshot,
    config: &ProxyConfig,
    diagnostics: &mut Vec<Diagnostic>,
) -> NodeFacts {
    let object = ObjectRef::new("Node", "", &config.node_name);
    let ours: Vec<&Node> = snapshot
        .nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() == Some(config.node_name.as_str()))
        .collect();
    let node: Option<&Node> = unique(ours, |_| (), |_| object.clone(), diagnostics)
        .first()
        .copied();
    let mut ips = config.node_ips.clone();
    if ips.is_empty()
        && let Some(addresses) = node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref())
    {
        // kube-proxy prefers InternalIP, then ExternalIP.
        for wanted in ["InternalIP", "ExternalIP"] {
            for address in addresses.iter().filter(|a| a.type_ == wanted) {
                match parse_ip(&address.address) {
                    Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                    Ok(_) => {}
                    Err(e) => diagnostics.push(Diagnostic::invalid(
                        &object,
                        format!("status.addresses: {e}"),
                    )),
                }
            }
        }
    }
    let zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(ZONE_LABEL))
        .cloned();
    let mut pod_cidrs = Vec::new();
    if let Some(spec) = node.and_then(|n| n.spec.as_ref()) {
        let texts = spec
            .pod_cidrs
            .clone()
            .unwrap_or_else(|| spec.pod_cidr.clone().into_iter().collect());
        for text in texts {
            match parse_cidr(&text) {
                Ok(cidr) => pod_cidrs.push(cidr),
                Err(e) => {
                    diagnostics.push(Diagnostic::invalid(&object, format!("spec.podCIDRs: {e}")))
                }
            }
        }
    }
    let local_addresses = snapshot.local_addresses.clone().map(|mut addresses| {
        addresses.sort();
        addresses.dedup();
        addresses
    });
    NodeFacts {
        ips,
        zone,
        pod_cidrs,
        local_addresses,
    }
}

pub(crate) fn in_family(family: IpFamily) -> impl Fn(&IpAddr) -> bool {
    move |ip| IpFamily::of(ip) == family
}

pub(crate) fn net_in_family(family: IpFamily) -> impl Fn(&IpNet) -> bool {
    move |net| IpFamily::of(&net.addr()) == family
}

/// Records `owner` as the holder of `key`, or returns the holder it already has.
pub(crate) fn claim<K: Hash + Eq>(
    claimed: &mut HashMap<K, Rc<str>>,
    key: K,
    owner: &Rc<str>,
) -> Result<(), Rc<str>> {
    match claimed.get(&key) {
        Some(other) => Err(Rc::clone(other)),
        None => {
            claimed.insert(key, Rc::clone(owner));
            Ok(())
        }
    }
}

/// Keeps one object per `key`. Identical copies (a manifest concatenated twice) count
/// once; copies that differ are all left out with a diagnostic, because which one is
/// meant cannot be told from a snapshot, the API server never holds two, and any choice
/// would make the result depend on input order.
pub(crate) fn unique<T: PartialEq, K: Ord>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> K,
    object: impl Fn(&T) -> ObjectRef,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<T> {
    items.sort_by_key(&key);
    let mut kept: Vec<T> = Vec::with_capacity(items.len());
    let mut conflicting = false;
    for item in items {
        match kept.last() {
            Some(last) if key(last) == key(&item) => {
                if *last != item && !conflicting {
                    conflicting = true;
                    diagnostics.push(Diagnostic::invalid(
                        &object(&item),
                        "defined more than once with different contents; no copy is used",
                    ));
                }
            }
            _ => {
                if std::mem::take(&mut conflicting) {
                    kept.pop();
                }
                kept.push(item);
            }
        }
    }
    if conflicting {
        kept.pop();
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build;

    #[test]
    fn copies_count_once_and_conflicting_copies_not_at_all() {
        let items = vec![("b", 1), ("a", 1), ("c", 1), ("b", 2), ("a", 1), ("b", 1)];
        let mut diagnostics = Vec::new();
        let kept = unique(
            items,
            |(name, _)| *name,
            |(name, _)| ObjectRef::new("Service", "ns", name),
            &mut diagnostics,
        );
        assert_eq!(kept, [("a", 1), ("c", 1)]);
        assert_eq!(diagnostics.len(), 1);
        assert!(
            diagnostics[0]
                .to_string()
                .starts_with("Service ns/b: defined more than once")
        );
    }

    /// The build of `yaml` on node `me` (192.168.0.2).
    fn build_yaml(yaml: &str) -> Build {
        let mut snapshot = Snapshot::default();
        let report = snapshot.add_manifest("t.yaml", yaml);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let mut config = ProxyConfig::new("me");
        config.node_ips = vec!["192.168.0.2".parse().unwrap()];
        build(&snapshot, &config)
    }

    #[test]
    fn no_local_endpoints_counts_local_policies_stranded_on_this_node() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: both, namespace: ns}
spec:
  type: NodePort
  clusterIP: 10.96.0.1
  internalTrafficPolicy: Local
  externalTrafficPolicy: Local
  ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30081}]
---
apiVersion: v1
kind: Service
metadata: {name: internal-only, namespace: ns}
spec:
  clusterIP: 10.96.0.2
  internalTrafficPolicy: Local
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: served-here, namespace: ns}
spec:
  clusterIP: 10.96.0.3
  internalTrafficPolicy: Local
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: both-1, namespace: ns, labels: {kubernetes.io/service-name: both}}
addressType: IPv4
ports: [{name: a, port: 8080}, {name: b, port: 8081}]
endpoints: [{addresses: [10.0.1.1], nodeName: other, conditions: {ready: true}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: internal-only-1, namespace: ns, labels: {kubernetes.io/service-name: internal-only}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.1.2], nodeName: other, conditions: {ready: true}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: served-here-1, namespace: ns, labels: {kubernetes.io/service-name: served-here}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.1.3], nodeName: me, conditions: {ready: true}}]
"#;
        let built = build_yaml(yaml);
        // both:a, both:b and internal-only for internal; both:a and both:b for external.
        assert_eq!(built.ipv4.no_local_endpoints(), (3, 2));
        assert_eq!(built.ipv6.no_local_endpoints(), (0, 0));
    }

    #[test]
    fn health_checks_count_local_ready_endpoints_per_service() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: ns}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.1
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30081}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.1}]}}
---
apiVersion: v1
kind: Service
metadata: {name: cluster, namespace: ns}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.2
  ports: [{port: 80, nodePort: 30090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: ns, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: a, port: 8080}, {name: b, port: 8081}]
endpoints:
- {addresses: [10.0.1.1], nodeName: me, conditions: {ready: true}}
- {addresses: [10.0.1.2], nodeName: me, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.1.3], nodeName: other, conditions: {ready: true}}
"#;
        let checks = build_yaml(yaml).health_checks();
        // One ready local endpoint, reached on two ports; the terminating one does not
        // count; the Cluster-policy Service has no health check.
        assert_eq!(
            checks,
            [HealthCheck {
                namespace: "ns".into(),
                name: "lb".into(),
                port: 32000,
                local_endpoints: 2,
            }]
        );
    }
}
