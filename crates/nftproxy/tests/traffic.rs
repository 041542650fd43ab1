//! Real traffic through rules that `nftproxy --once` programs into a node namespace.
//!
//! The topology (`common`):
//!
//! ```text
//!  client 192.168.50.100 ──┐            ┌── be1 10.244.1.10, 10.244.1.20 (node-a: local)
//!                          ├── node ────┼── be2 10.244.2.10, 10.244.2.20 (node-b: remote)
//!  pod    10.244.3.10 ─────┘ 192.168.50.10 (node IP), forwarding, nftproxy rules
//! ```
//!
//! Backends run echo servers that answer with their name and the client address they see.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nftproxy_testkit::kernel_available;

mod common;
use common::{Outcome, Topology, addr, assert_split, from, serve, split, tcp, udp};

/// The endpoints of the seed's redis and of its two counter Services.
const REDIS: &[&str] = &["10.244.1.10:6379", "10.244.2.10:6379"];
const COUNTER: &[&str] = &["10.244.1.20:3000", "10.244.2.20:3000"];

/// Services beyond the seed examples, one per behaviour under test. (`triple` has three
/// endpoints, and its ClusterIP ends in the same four bits as redis's (0x6), so they
/// share a shard and redis's draws pass the rule for three first.)
const EXTRA: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: triple, namespace: default}
spec:
  clusterIP: 10.96.100.22
  ports: [{port: 6379}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: triple-1, namespace: default, labels: {kubernetes.io/service-name: triple}}
addressType: IPv4
ports: [{port: 6379}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node-a}
- {addresses: [10.244.1.20], nodeName: node-a}
- {addresses: [10.244.2.10], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: udp-echo, namespace: default}
spec:
  clusterIP: 10.96.100.10
  ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: udp-echo-1, namespace: default, labels: {kubernetes.io/service-name: udp-echo}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node-a}
- {addresses: [10.244.2.10], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.100.11
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.100.12
  sessionAffinity: ClientIP
  ports: [{port: 6379}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: default, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{port: 6379}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node-a}
- {addresses: [10.244.2.10], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: local-np, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.100.13
  ports: [{port: 3000, nodePort: 31100}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-np-1, namespace: default, labels: {kubernetes.io/service-name: local-np}}
addressType: IPv4
ports: [{port: 3000}]
endpoints:
- {addresses: [10.244.1.20], nodeName: node-a}
- {addresses: [10.244.2.20], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: guarded, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.100.14
  loadBalancerSourceRanges: [10.0.0.0/8]
  ports: [{port: 8080, targetPort: 3000, nodePort: 31200}]
status:
  loadBalancer:
    ingress: [{ip: 192.168.50.201}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: guarded-1, namespace: default, labels: {kubernetes.io/service-name: guarded}}
addressType: IPv4
ports: [{port: 3000}]
endpoints:
- {addresses: [10.244.1.20], nodeName: node-a}
- {addresses: [10.244.2.20], nodeName: node-b}
"#;

/// What `nftproxy explain --live` says, in the node namespace, about a packet.
fn explain_live(topology: &Topology, from: &str, to: &str) -> String {
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topology.ns("node"),
            env!("CARGO_BIN_EXE_nftproxy"),
            "explain",
            "--live",
        ])
        .args(["--from", from, "--to", to])
        .output()
        .expect("nftproxy runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("result: "))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn seed_services_carry_real_traffic() {
    if !kernel_available("seed_services_carry_real_traffic") {
        return;
    }
    let topology = Topology::new("seed");
    topology.program(EXTRA);
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [
        serve(topology.ns("be1"), "be1", stop.clone()),
        serve(topology.ns("be2"), "be2", stop.clone()),
    ];
    std::thread::sleep(Duration::from_millis(200));
    let (client, pod) = (topology.ns("client"), topology.ns("pod"));
    let started = Instant::now();

    // Three endpoints, two of them in be1.
    let triple = from(pod.clone(), 150, || tcp(addr("10.96.100.22:6379")));
    assert_split(
        "pod -> triple ClusterIP 10.96.100.22:6379",
        &triple,
        &["10.244.1.10:6379", "10.244.1.20:6379", "10.244.2.10:6379"],
    );

    // ClusterIP (redis) from a pod, NodePort 31000 and the LB IP from outside.
    let clusterip = from(pod.clone(), 200, || tcp(addr("10.103.50.102:6379")));
    assert_split(
        "pod -> redis ClusterIP 10.103.50.102:6379",
        &clusterip,
        REDIS,
    );
    assert!(
        clusterip
            .iter()
            .all(|o| matches!(o, Outcome::Answered(_, ip, _) if ip == "10.244.3.10")),
        "pod traffic is not masqueraded"
    );
    // Hairpin: be1 (10.244.1.10) reaching redis gets itself half of the time, and only
    // answers that its reply can travel: masqueraded, it sees the node's address; be2
    // sees be1's own.
    let hairpin = from(topology.ns("be1"), 60, || tcp(addr("10.103.50.102:6379")));
    assert_split("be1 -> redis ClusterIP (hairpin)", &hairpin, REDIS);
    for outcome in &hairpin {
        match outcome {
            Outcome::Answered(name, seen, _) if name == "be1" => {
                assert_ne!(seen, "10.244.1.10", "hairpin not masqueraded")
            }
            Outcome::Answered(_, seen, _) => assert_eq!(seen, "10.244.1.10"),
            other => panic!("hairpin connection not answered: {other:?}"),
        }
    }
    let nodeport = from(client.clone(), 200, || tcp(addr("192.168.50.10:31000")));
    assert_split(
        "client -> counter-np NodePort 192.168.50.10:31000",
        &nodeport,
        COUNTER,
    );
    let lb = from(client.clone(), 200, || tcp(addr("192.168.50.200:30000")));
    assert_split(
        "client -> counter-lb LB IP 192.168.50.200:30000",
        &lb,
        COUNTER,
    );
    let lb_nodeport = from(client.clone(), 50, || tcp(addr("192.168.50.10:31535")));
    assert_eq!(
        split(&lb_nodeport).values().sum::<usize>(),
        50,
        "{:?}",
        split(&lb_nodeport)
    );
    assert!(!split(&lb_nodeport).contains_key("TimedOut"));
    let from_outside = from(client.clone(), 50, || tcp(addr("10.103.50.102:6379")));
    assert!(
        from_outside
            .iter()
            .all(|o| matches!(o, Outcome::Answered(_, ip, _) if ip.starts_with("10.244."))),
        "ClusterIP traffic from outside the cluster CIDR is masqueraded: {from_outside:?}"
    );

    // UDP.
    let dns = from(pod.clone(), 100, || udp(addr("10.96.100.10:53")));
    assert_split(
        "pod -> udp-echo ClusterIP 10.96.100.10:53/udp",
        &dns,
        &["10.244.1.10:5353", "10.244.2.10:5353"],
    );

    // No endpoints: refused at once.
    let empty = from(pod.clone(), 5, || tcp(addr("10.96.100.11:80")));
    assert!(empty.iter().all(|o| *o == Outcome::Refused), "{empty:?}");
    // A ClusterIP port no Service defines: refused too.
    let wrong_port = from(pod.clone(), 3, || tcp(addr("10.103.50.102:6380")));
    assert!(
        wrong_port.iter().all(|o| *o == Outcome::Refused),
        "{wrong_port:?}"
    );

    // ClientIP affinity pins a client to one backend.
    let sticky = from(pod.clone(), 50, || tcp(addr("10.96.100.12:6379")));
    let counts = split(&sticky);
    assert!(
        sticky.iter().all(|o| matches!(o, Outcome::Answered(..))),
        "not every connection answered: {counts:?}"
    );
    assert_eq!(counts.len(), 1, "affinity must pin: {counts:?}");

    // externalTrafficPolicy Local: only the local endpoint, client address preserved.
    let local = from(client.clone(), 50, || tcp(addr("192.168.50.10:31100")));
    assert!(
        local
            .iter()
            .all(|o| matches!(o, Outcome::Answered(name, ip, _) if name == "be1" && ip == "192.168.50.100")),
        "{:?}",
        split(&local)
    );

    // loadBalancerSourceRanges 10.0.0.0/8: the pod may use the LB IP, the client may not.
    let allowed = from(pod.clone(), 20, || tcp(addr("192.168.50.201:8080")));
    assert_eq!(split(&allowed).values().sum::<usize>(), 20);
    assert!(
        allowed.iter().all(|o| matches!(o, Outcome::Answered(..))),
        "{:?}",
        split(&allowed)
    );
    let blocked = from(client.clone(), 3, || tcp(addr("192.168.50.201:8080")));
    assert!(
        blocked.iter().all(|o| *o == Outcome::TimedOut),
        "{blocked:?}"
    );
    // The NodePort of the same service is not subject to the ranges.
    let via_nodeport = from(client, 10, || tcp(addr("192.168.50.10:31200")));
    assert!(
        via_nodeport
            .iter()
            .all(|o| matches!(o, Outcome::Answered(..))),
        "{:?}",
        split(&via_nodeport)
    );

    // The tracer, reading the same kernel tables, predicts what the packets above did.
    let both =
        |a: &str, b: &str, masq: &str| format!("dnat {a}{masq} (50.0%), dnat {b}{masq} (50.0%)");
    let predictions = [
        (
            "10.244.3.10",
            "10.96.100.22:6379/tcp",
            "dnat 10.244.1.10:6379 (33.3%), dnat 10.244.1.20:6379 (33.3%), \
             dnat 10.244.2.10:6379 (33.3%)"
                .to_owned(),
        ),
        (
            "10.244.3.10",
            "10.103.50.102:6379/tcp",
            both("10.244.1.10:6379", "10.244.2.10:6379", ""),
        ),
        (
            "192.168.50.100",
            "192.168.50.10:31000/tcp",
            both("10.244.1.20:3000", "10.244.2.20:3000", " masquerade"),
        ),
        (
            "192.168.50.100",
            "192.168.50.200:30000/tcp",
            both("10.244.1.20:3000", "10.244.2.20:3000", " masquerade"),
        ),
        (
            "192.168.50.100",
            "10.103.50.102:6379/tcp",
            both("10.244.1.10:6379", "10.244.2.10:6379", " masquerade"),
        ),
        (
            "10.244.3.10",
            "10.96.100.10:53/udp",
            both("10.244.1.10:5353", "10.244.2.10:5353", ""),
        ),
        ("10.244.3.10", "10.96.100.11:80/tcp", "reject".to_owned()),
        ("10.244.3.10", "10.103.50.102:6380/tcp", "reject".to_owned()),
        (
            "192.168.50.100",
            "192.168.50.10:31100/tcp",
            "dnat 10.244.1.20:3000".to_owned(),
        ),
        (
            "192.168.50.100",
            "192.168.50.201:8080/tcp",
            "drop".to_owned(),
        ),
        (
            "10.244.3.10",
            "192.168.50.201:8080/tcp",
            both("10.244.1.20:3000", "10.244.2.20:3000", " masquerade"),
        ),
    ];
    for (from, to, expected) in predictions {
        assert_eq!(
            explain_live(&topology, from, to),
            expected,
            "explain --live {from} -> {to}"
        );
    }

    eprintln!("traffic checks took {:?}", started.elapsed());
    stop.store(true, Ordering::Relaxed);
    for server in servers {
        server.join().expect("server thread");
    }
}

/// Service `trio` (ClusterIP 10.96.100.20:6379) with these endpoints.
fn trio(endpoints: &[&str]) -> String {
    let mut yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: trio, namespace: default}\n\
                    spec: {clusterIP: 10.96.100.20, ports: [{port: 6379}]}\n---\n\
                    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                    metadata: {name: trio-1, namespace: default, labels: {kubernetes.io/service-name: trio}}\n\
                    addressType: IPv4\nports: [{port: 6379}]\nendpoints:\n"
        .to_owned();
    for endpoint in endpoints {
        yaml.push_str(&format!(
            "- {{addresses: [{endpoint}], nodeName: node-a}}\n"
        ));
    }
    yaml
}

/// The kernel's endpoint map of `trio`'s shard (10.96.100.20 ends in 0x4), in one line.
fn endpoint_map(topology: &Topology) -> String {
    let output = Command::new("ip")
        .args(["netns", "exec", &topology.ns("node")])
        .args([
            "nft",
            "-s",
            "list",
            "map",
            "ip",
            "nftproxy",
            "tcp-endpoints-4",
        ])
        .output()
        .expect("nft runs");
    assert!(output.status.success());
    // Without the elements' counters (`-s` lists each as `counter`).
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter(|word| *word != "counter")
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_removed_endpoints_slot_takes_the_last_one_and_traffic_follows() {
    if !kernel_available("a_removed_endpoints_slot_takes_the_last_one_and_traffic_follows") {
        return;
    }
    let topology = Topology::new("slots");
    topology.program(&trio(&["10.244.1.10", "10.244.1.20", "10.244.2.10"]));
    let slot =
        |index: u8, endpoint: &str| format!("10.96.100.20 . 6379 . {index} : {endpoint} . 6379");
    let before = endpoint_map(&topology);
    assert!(before.contains(&slot(0, "10.244.1.10")), "{before}");
    // The first endpoint goes. A second run diffs against what the kernel holds: the
    // last endpoint moves into the freed slot and the middle one stays, where a fresh
    // render would have shifted both.
    let remaining = trio(&["10.244.1.20", "10.244.2.10"]);
    topology.program(&remaining);
    let after = endpoint_map(&topology);
    assert!(after.contains(&slot(0, "10.244.2.10")), "{after}");
    assert!(after.contains(&slot(1, "10.244.1.20")), "{after}");
    assert!(!after.contains("10.96.100.20 . 6379 . 2 "), "{after}");
    // That means the same as the fresh render, so a third run leaves it alone.
    topology.program(&remaining);
    assert_eq!(endpoint_map(&topology), after);

    let stop = Arc::new(AtomicBool::new(false));
    let servers = [
        serve(topology.ns("be1"), "be1", stop.clone()),
        serve(topology.ns("be2"), "be2", stop.clone()),
    ];
    std::thread::sleep(Duration::from_millis(200));
    let outcomes = from(topology.ns("pod"), 100, || tcp(addr("10.96.100.20:6379")));
    assert_split(
        "pod -> trio 10.96.100.20:6379 after the removal",
        &outcomes,
        &["10.244.1.20:6379", "10.244.2.10:6379"],
    );
    assert_eq!(
        explain_live(&topology, "10.244.3.10", "10.96.100.20:6379/tcp"),
        "dnat 10.244.1.20:6379 (50.0%), dnat 10.244.2.10:6379 (50.0%)"
    );
    stop.store(true, Ordering::Relaxed);
    for server in servers {
        server.join().expect("server thread");
    }
}
