//! Synthetic clusters: N Services × E endpoints, as the API would hand them over.
//!
//! Invariant: every address and port is a pure function of the service index, so the
//! nftproxy ruleset and the upstream-shaped text describe exactly the same Services,
//! and no two Services collide on an address, port or NodePort.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use nftproxy_model::Snapshot;
use serde_json::json;
use std::net::Ipv4Addr;

/// The node the benchmark pretends to run on.
pub const NODE_NAME: &str = "bench-node";
/// Its address (NodePorts are accepted here).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
/// The pod network.
pub const CLUSTER_CIDR: &str = "10.128.0.0/9";
/// The port every Service exposes, and the endpoints' target port.
pub const PORT: u16 = 80;
/// The endpoints' port.
pub const TARGET_PORT: u16 = 8080;

/// What kind of Service index `i` is: seven in ten ClusterIP, two NodePort, one
/// LoadBalancer; one in twenty has ClientIP affinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// ClusterIP only.
    ClusterIp,
    /// ClusterIP and a NodePort.
    NodePort,
    /// ClusterIP, NodePort and a load-balancer ingress IP.
    LoadBalancer,
}

/// One synthetic Service port with everything the rules need.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Service index.
    pub index: u32,
    /// `ns-K`.
    pub namespace: String,
    /// `svc-I`.
    pub name: String,
    /// Its kind.
    pub kind: Kind,
    /// ClientIP affinity.
    pub affinity: bool,
    /// ClusterIP.
    pub cluster_ip: Ipv4Addr,
    /// NodePort, for NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
    /// Load-balancer ingress IP, for LoadBalancer Services.
    pub load_balancer_ip: Option<Ipv4Addr>,
    /// Endpoint addresses (all on port [`TARGET_PORT`]).
    pub endpoints: Vec<Ipv4Addr>,
}

fn offset(base: Ipv4Addr, by: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(by))
}

/// The address of endpoint `k` of Service `index` (room for 64 per Service). Rotated
/// by the index inside the Service's 64, so that the last bits of endpoint addresses
/// vary across Services as pod IPs do (hairpin sets are sharded by them).
pub fn endpoint_ip(index: u32, k: u32) -> Ipv4Addr {
    offset(Ipv4Addr::new(10, 128, 0, 0), index * 64 + (index + k) % 64)
}

/// Service `index` with `endpoints` endpoints.
pub fn spec(index: u32, endpoints: u32) -> Spec {
    let kind = match index % 10 {
        7 | 8 => Kind::NodePort,
        9 => Kind::LoadBalancer,
        _ => Kind::ClusterIp,
    };
    // NodePorts are numbered over the Services that have one: 3 in 10.
    let node_port_number = index / 10 * 3 + (index % 10).saturating_sub(7);
    Spec {
        index,
        namespace: format!("ns-{}", index % 100),
        name: format!("svc-{index}"),
        kind,
        affinity: index % 20 == 3,
        cluster_ip: offset(Ipv4Addr::new(10, 96, 0, 1), index),
        node_port: (kind != Kind::ClusterIp)
            .then(|| u16::try_from(30_000 + node_port_number % 35_000).unwrap_or(u16::MAX)),
        load_balancer_ip: (kind == Kind::LoadBalancer)
            .then(|| offset(Ipv4Addr::new(172, 16, 0, 1), index / 10)),
        endpoints: (0..endpoints).map(|k| endpoint_ip(index, k)).collect(),
    }
}

/// The Service object of a spec.
pub fn service(spec: &Spec) -> Service {
    let service_type = match spec.kind {
        Kind::ClusterIp => "ClusterIP",
        Kind::NodePort => "NodePort",
        Kind::LoadBalancer => "LoadBalancer",
    };
    let value = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.name, "namespace": spec.namespace},
        "spec": {
            "type": service_type,
            "clusterIP": spec.cluster_ip.to_string(),
            "clusterIPs": [spec.cluster_ip.to_string()],
            "sessionAffinity": if spec.affinity { "ClientIP" } else { "None" },
            "ports": [{
                "name": "http", "protocol": "TCP", "port": PORT,
                "targetPort": TARGET_PORT, "nodePort": spec.node_port,
            }],
        },
        "status": {"loadBalancer": {"ingress": spec.load_balancer_ip
            .map(|ip| vec![json!({"ip": ip.to_string()})]).unwrap_or_default()}},
    });
    serde_json::from_value(value).unwrap_or_default()
}

/// The EndpointSlice of a spec; endpoints alternate between this node and another.
pub fn endpoint_slice(spec: &Spec) -> EndpointSlice {
    let endpoints: Vec<_> = spec
        .endpoints
        .iter()
        .enumerate()
        .map(|(k, ip)| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": if k % 2 == 0 { NODE_NAME } else { "other-node" },
            })
        })
        .collect();
    let value = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-abcde", spec.name),
            "namespace": spec.namespace,
            "labels": {"kubernetes.io/service-name": spec.name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": TARGET_PORT}],
        "endpoints": endpoints,
    });
    serde_json::from_value(value).unwrap_or_default()
}

/// The specs of a cluster of `services` × `endpoints`.
pub fn specs(services: u32, endpoints: u32) -> Vec<Spec> {
    (0..services).map(|i| spec(i, endpoints)).collect()
}

/// The objects of a set of specs, decoded one at a time as the watch caches do.
pub fn snapshot(specs: &[Spec]) -> Snapshot {
    Snapshot {
        services: specs.iter().map(|s| (&service(s)).into()).collect(),
        endpoint_slices: specs.iter().map(|s| (&endpoint_slice(s)).into()).collect(),
        ..Snapshot::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_decode_and_never_collide() {
        let specs = specs(2_000, 3);
        let mut config = nftproxy_model::ProxyConfig::new(NODE_NAME);
        config.node_ips = vec![NODE_IP.into()];
        let built = nftproxy_model::build(&snapshot(&specs), &config);
        assert!(built.diagnostics.is_empty(), "{:?}", built.diagnostics);
        assert_eq!(built.ipv4.services.len(), 2_000);
        assert!(
            built
                .ipv4
                .services
                .iter()
                .all(|p| p.endpoints.cluster.len() == 3)
        );
        let mut node_ports: Vec<u16> = specs.iter().filter_map(|s| s.node_port).collect();
        let count = node_ports.len();
        node_ports.sort_unstable();
        node_ports.dedup();
        assert_eq!(node_ports.len(), count);
        assert_eq!(count, 600);
        let mut endpoints: Vec<Ipv4Addr> = specs.iter().flat_map(|s| s.endpoints.clone()).collect();
        endpoints.sort_unstable();
        endpoints.dedup();
        assert_eq!(endpoints.len(), 6_000);
    }
}
