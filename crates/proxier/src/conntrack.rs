//! Stale UDP conntrack entries, kube-proxy's conntrack reconciler and one step further:
//! after a sync, a UDP flow addressed to a Service (its ClusterIP, an external or
//! load-balancer IP, or a NodePort) whose replies come from anything but a serving
//! endpoint of that Service port is deleted, so that the client's next datagram is
//! load-balanced afresh instead of following the old entry into a black hole (or staying
//! unanswered after a Service got its first endpoint); and every UDP flow to a Service
//! that was deleted goes too.
//!
//! Invariant: only UDP flows to a Service address or NodePort (now or in the build
//! before) are ever deleted; a flow answered by a serving endpoint of its Service port is
//! kept, whatever traffic policies and topology hints make of that endpoint (a
//! terminating endpoint that still serves keeps its clients).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use nftproxy_model::{Build, Protocol};
use nftproxy_nft::{Conntrack, Family, Flow, L4Proto};

type Backend = (IpAddr, u16);

/// Where each UDP Service port is reached and which endpoints may answer there, and the
/// destinations of UDP Services deleted since the last cleanup.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServingUdp {
    by_address: HashMap<(IpAddr, u16), HashSet<Backend>>,
    by_node_port: HashMap<u16, HashSet<Backend>>,
    /// The node addresses that accept NodePorts; empty means every address.
    node_port_ips: Vec<IpAddr>,
    /// Addresses and NodePorts of UDP Service ports that are gone, not yet cleaned up.
    gone_addresses: HashSet<(IpAddr, u16)>,
    gone_node_ports: HashSet<u16>,
    families: Vec<Family>,
}

impl ServingUdp {
    /// The UDP Service ports of a build and their serving endpoints; what `before` served
    /// and `build` no longer does is gone (with what was gone before and not yet cleaned).
    pub fn from_build(build: &Build, before: &ServingUdp) -> ServingUdp {
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
                    .udp_serving
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
        serving.gone_addresses = gone(
            &before.by_address,
            &before.gone_addresses,
            &serving.by_address,
        );
        serving.gone_node_ports = gone(
            &before.by_node_port,
            &before.gone_node_ports,
            &serving.by_node_port,
        );
        if serving.has_gone() {
            for family in &before.families {
                if !serving.families.contains(family) {
                    serving.families.push(*family);
                }
            }
        }
        serving
    }

    fn has_gone(&self) -> bool {
        !(self.gone_addresses.is_empty() && self.gone_node_ports.is_empty())
    }

    /// Whether a flow is addressed to a Service and answered by anything but a serving
    /// endpoint, or addressed to a Service that is gone.
    pub fn is_stale(&self, flow: &Flow) -> bool {
        if flow.protocol != L4Proto::Udp {
            return false;
        }
        let destination = (flow.original.dst, flow.original.dst_port);
        let answering = (flow.reply.src, flow.reply.src_port);
        if let Some(backends) = self.by_address.get(&destination) {
            return !backends.contains(&answering);
        }
        if self.gone_addresses.contains(&destination) {
            return true;
        }
        let to_node =
            self.node_port_ips.is_empty() || self.node_port_ips.contains(&flow.original.dst);
        if !to_node {
            return false;
        }
        match self.by_node_port.get(&flow.original.dst_port) {
            Some(backends) => !backends.contains(&answering),
            None => self.gone_node_ports.contains(&flow.original.dst_port),
        }
    }

    /// The families to clean: those with UDP Services, and those of Services gone.
    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// The flows of the Services gone were deleted: they need not be looked for again.
    pub fn cleaned(&mut self) {
        self.gone_addresses.clear();
        self.gone_node_ports.clear();
    }
}

/// The destinations served `before` or gone before, and not served `now`.
fn gone<K: Copy + Eq + std::hash::Hash>(
    before: &HashMap<K, HashSet<Backend>>,
    gone_before: &HashSet<K>,
    now: &HashMap<K, HashSet<Backend>>,
) -> HashSet<K> {
    before
        .keys()
        .chain(gone_before)
        .filter(|destination| !now.contains_key(destination))
        .copied()
        .collect()
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
        let serving = ServingUdp::from_build(&build(&snapshot, &config), &ServingUdp::default());
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

    /// The dns Service with endpoints `a` (ready, on this node), `b` (`b_conditions`, on
    /// another node), both its traffic policies Local: b is in none of this node's rules.
    fn dns(b_conditions: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: ns}}\n\
             spec: {{type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Local,\n  \
             internalTrafficPolicy: Local,\n  \
             ports: [{{name: dns, port: 53, protocol: UDP, nodePort: 30053}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: dns-1, namespace: ns, labels: {{kubernetes.io/service-name: dns}}}}\n\
             addressType: IPv4\nports: [{{name: dns, port: 5353, protocol: UDP}}]\n\
             endpoints:\n\
             - {{addresses: [10.244.1.2], nodeName: me, conditions: {{ready: true}}}}\n\
             - {{addresses: [10.244.2.2], nodeName: other, conditions: {b_conditions}}}\n"
        )
    }

    fn serving(yaml: &str, before: &ServingUdp) -> ServingUdp {
        let mut snapshot = Snapshot::default();
        assert!(snapshot.add_manifest("c.yaml", yaml).errors.is_empty());
        let mut config = ProxyConfig::new("me");
        config.node_ips = vec!["192.168.0.2".parse().unwrap()];
        ServingUdp::from_build(&build(&snapshot, &config), before)
    }

    #[test]
    fn a_serving_endpoint_keeps_its_flows_whatever_policy_and_termination_make_of_it() {
        let udp = L4Proto::Udp;
        // b is remote: the Local policy leaves it out of the NodePort's rules, yet it
        // serves, so a flow it answers (from before the policy changed) stays.
        let to_b = flow(udp, "10.96.0.10", 53, "10.244.2.2", 5353);
        let node_port_to_b = flow(udp, "192.168.0.2", 30053, "10.244.2.2", 5353);
        let ready = serving(&dns("{ready: true}"), &ServingUdp::default());
        assert!(!ready.is_stale(&to_b));
        assert!(!ready.is_stale(&node_port_to_b));
        // b terminates but still serves: its flows stay.
        let terminating = serving(
            &dns("{ready: false, serving: true, terminating: true}"),
            &ready,
        );
        assert!(!terminating.is_stale(&to_b));
        assert!(!terminating.is_stale(&node_port_to_b));
        // b stops serving: its flows go; a's stay.
        let gone = serving(
            &dns("{ready: false, serving: false, terminating: true}"),
            &terminating,
        );
        assert!(gone.is_stale(&to_b));
        assert!(gone.is_stale(&node_port_to_b));
        assert!(!gone.is_stale(&flow(udp, "10.96.0.10", 53, "10.244.1.2", 5353)));
    }

    #[test]
    fn the_flows_of_a_deleted_service_go_once() {
        let udp = L4Proto::Udp;
        let before = serving(&dns("{ready: true}"), &ServingUdp::default());
        let current = flow(udp, "10.96.0.10", 53, "10.244.1.2", 5353);
        let node_port = flow(udp, "192.168.0.2", 30053, "10.244.1.2", 5353);
        let unrelated = flow(udp, "10.96.0.99", 53, "10.96.0.99", 53);
        let mut after = serving("", &before);
        // No UDP Service is left, but the family of the one deleted is still cleaned.
        assert_eq!(after.families(), [Family::Ip]);
        let mut conntrack = FakeConntrack {
            flows: vec![current, node_port, unrelated],
        };
        assert_eq!(clean(&mut conntrack, &after, Family::Ip), Ok(2));
        assert_eq!(conntrack.flows, [unrelated]);
        after.cleaned();
        // A later build does not look for them again.
        assert!(!serving("", &after).is_stale(&current));
        // Gone before a sync could clean them: still gone after the next build.
        let again = serving("", &serving("", &before));
        assert!(again.is_stale(&current) && again.is_stale(&node_port));
    }
}
