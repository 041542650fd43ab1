//! Stale UDP conntrack entries, kube-proxy's conntrack reconciler: after a sync, a UDP flow
//! addressed to a Service (its ClusterIP, an external or load-balancer IP, or a NodePort)
//! whose replies come from anything but a backend the rules now send to is deleted, so
//! that the client's next datagram is load-balanced afresh instead of following the old
//! entry into a black hole (or staying unanswered after a Service got its first endpoint).
//!
//! Invariant: only UDP flows to a Service address or NodePort are ever deleted; a flow
//! whose reply source is a current backend of that Service port is kept.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use nftproxy_model::{Build, Protocol};
use nftproxy_nft::{Conntrack, Family, Flow, L4Proto};

type Backend = (IpAddr, u16);

/// Where each UDP Service port is reached and which backends may answer there.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServingUdp {
    by_address: HashMap<(IpAddr, u16), HashSet<Backend>>,
    by_node_port: HashMap<u16, HashSet<Backend>>,
    /// The node addresses that accept NodePorts; empty means every address.
    node_port_ips: Vec<IpAddr>,
    families: Vec<Family>,
}

impl ServingUdp {
    /// The UDP Service ports of a build and their reachable endpoints.
    pub fn from_build(build: &Build) -> ServingUdp {
        let mut serving = ServingUdp {
            node_port_ips: build.node_port_ips(),
            ..ServingUdp::default()
        };
        for (state, family) in [(&build.ipv4, Family::Ip), (&build.ipv6, Family::Ip6)] {
            let mut any = false;
            for service in state
                .services
                .iter()
                .filter(|s| s.name.protocol == Protocol::Udp)
            {
                any = true;
                let backends: HashSet<Backend> = service
                    .endpoints
                    .all_reachable()
                    .iter()
                    .map(|e| (e.ip, e.port))
                    .collect();
                let addresses = std::iter::once(&service.cluster_ip)
                    .chain(&service.external_ips)
                    .chain(&service.load_balancer_ips);
                for address in addresses {
                    serving
                        .by_address
                        .entry((*address, service.port))
                        .or_default()
                        .extend(backends.iter().copied());
                }
                if let Some(node_port) = service.node_port {
                    serving
                        .by_node_port
                        .entry(node_port)
                        .or_default()
                        .extend(backends.iter().copied());
                }
            }
            if any {
                serving.families.push(family);
            }
        }
        serving
    }

    /// Whether a flow is addressed to a Service and answered by a non-backend.
    pub fn is_stale(&self, flow: &Flow) -> bool {
        if flow.protocol != L4Proto::Udp {
            return false;
        }
        let destination = (flow.original.dst, flow.original.dst_port);
        let answering = (flow.reply.src, flow.reply.src_port);
        if let Some(backends) = self.by_address.get(&destination) {
            return !backends.contains(&answering);
        }
        let to_node =
            self.node_port_ips.is_empty() || self.node_port_ips.contains(&flow.original.dst);
        match self.by_node_port.get(&flow.original.dst_port) {
            Some(backends) if to_node => !backends.contains(&answering),
            _ => false,
        }
    }

    /// The families that have UDP Services.
    pub fn families(&self) -> &[Family] {
        &self.families
    }
}

/// Deletes the stale UDP flows of one family; returns how many were deleted.
pub fn clean<C: Conntrack>(
    conntrack: &mut C,
    serving: &ServingUdp,
    family: Family,
) -> Result<usize, C::Error> {
    let stale: Vec<Flow> = conntrack
        .flows(family, L4Proto::Udp)?
        .into_iter()
        .filter(|flow| serving.is_stale(flow))
        .collect();
    if stale.is_empty() {
        return Ok(0);
    }
    conntrack.delete(&stale)
}

#[cfg(test)]
mod tests {
    use nftproxy_model::{ProxyConfig, Snapshot, build};
    use nftproxy_nft::{FakeConntrack, Tuple};

    use super::*;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: ns}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: dns, port: 53, protocol: UDP, nodePort: 30053}, {name: tcp, port: 53, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: ns, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}, {name: tcp, port: 5353, protocol: TCP}]
endpoints: [{addresses: [10.244.1.2], conditions: {ready: true}}]
"#;

    fn flow(protocol: L4Proto, dst: &str, dst_port: u16, reply_src: &str, reply_port: u16) -> Flow {
        let client: IpAddr = "10.244.9.9".parse().unwrap();
        Flow {
            protocol,
            original: Tuple {
                src: client,
                dst: dst.parse().unwrap(),
                src_port: 40000,
                dst_port,
            },
            reply: Tuple {
                src: reply_src.parse().unwrap(),
                dst: client,
                src_port: reply_port,
                dst_port: 40000,
            },
            zone: 0,
        }
    }

    #[test]
    fn only_udp_flows_to_a_service_answered_by_a_non_backend_go() {
        let mut snapshot = Snapshot::default();
        assert!(snapshot.add_manifest("c.yaml", CLUSTER).errors.is_empty());
        let mut config = ProxyConfig::new("me");
        config.node_ips = vec!["192.168.0.2".parse().unwrap()];
        let serving = ServingUdp::from_build(&build(&snapshot, &config));
        assert_eq!(serving.families(), [Family::Ip]);
        let udp = L4Proto::Udp;
        let current = flow(udp, "10.96.0.10", 53, "10.244.1.2", 5353);
        let old_backend = flow(udp, "10.96.0.10", 53, "10.244.1.7", 5353);
        // Sent while the Service had no endpoints: never translated.
        let untranslated = flow(udp, "10.96.0.10", 53, "10.96.0.10", 53);
        let node_port_old = flow(udp, "192.168.0.2", 30053, "10.244.1.7", 5353);
        let node_port_current = flow(udp, "192.168.0.2", 30053, "10.244.1.2", 5353);
        // The same port number on an address that is not this node's.
        let elsewhere = flow(udp, "198.51.100.1", 30053, "198.51.100.1", 30053);
        let tcp = flow(L4Proto::Tcp, "10.96.0.10", 53, "10.244.1.7", 5353);
        let unrelated = flow(udp, "8.8.8.8", 53, "8.8.8.8", 53);
        let mut conntrack = FakeConntrack {
            flows: vec![
                current,
                old_backend,
                untranslated,
                node_port_old,
                node_port_current,
                elsewhere,
                tcp,
                unrelated,
            ],
        };
        assert_eq!(clean(&mut conntrack, &serving, Family::Ip), Ok(3));
        assert_eq!(
            conntrack.flows,
            [current, node_port_current, elsewhere, tcp, unrelated]
        );
        assert_eq!(clean(&mut conntrack, &serving, Family::Ip), Ok(0));
    }
}
