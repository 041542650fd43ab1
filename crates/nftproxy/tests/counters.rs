//! The kernel's connection counters, as the daemon's `/metrics`, `nftproxy top` and
//! `explain --live` report them, against real connections in network namespaces: each
//! number equals what was sent, per endpoint what each backend answered, and a restart
//! that changes nothing keeps them.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nftproxy_testkit::{SEED_NODE_FLAGS, kernel_available};

mod common;
use common::{Daemon, Outcome, Topology, addr, from, http_get, serve, sysctl, tcp, within};

const METRICS: &str = "127.0.0.1:10249";

/// Beside the seed: a Service without endpoints, one with ClientIP affinity (its
/// endpoints are chosen by rules, counted by rule counters), and a load balancer whose
/// source ranges leave the client out.
const EXTRA: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.100.11
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.100.12
  sessionAffinity: ClientIP
  ports: [{name: redis, port: 6379}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: default, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{name: redis, port: 6379}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node-a}
- {addresses: [10.244.2.10], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: guarded, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.100.14
  loadBalancerSourceRanges: [10.0.0.0/8]
  ports: [{name: web, port: 8080, targetPort: 3000, nodePort: 31200}]
status:
  loadBalancer:
    ingress: [{ip: 192.168.50.201}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: guarded-1, namespace: default, labels: {kubernetes.io/service-name: guarded}}
addressType: IPv4
ports: [{name: web, port: 3000}]
endpoints:
- {addresses: [10.244.1.20], nodeName: node-a}
- {addresses: [10.244.2.20], nodeName: node-b}
"#;

/// Every unallocated address of this Service CIDR is dropped (and counted).
const SERVICE_CIDR: &str = "10.96.0.0/12";

fn get(ns: &str, path: &'static str) -> Option<String> {
    http_get(ns, METRICS, path).map(|(_, body)| body)
}

/// The samples of `/metrics` whose name starts with `nftproxy_` and ends in
/// `connections_total`, by series.
fn connections(metrics: &str) -> BTreeMap<String, u64> {
    metrics
        .lines()
        .filter(|l| l.starts_with("nftproxy_") && !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            series
                .contains("connections_total")
                .then(|| Some((series.to_owned(), value.parse().ok()?)))?
        })
        .collect()
}

fn service(name: &str, port: &str, protocol: &str, outcome: &str) -> String {
    format!(
        "nftproxy_service_connections_total{{namespace=\"default\",service=\"{name}\",port=\"{port}\",protocol=\"{protocol}\",outcome=\"{outcome}\"}}"
    )
}

fn endpoint(name: &str, port: &str, endpoint: &str) -> String {
    format!(
        "nftproxy_endpoint_connections_total{{namespace=\"default\",service=\"{name}\",port=\"{port}\",protocol=\"TCP\",endpoint=\"{endpoint}\"}}"
    )
}

/// How many connections each endpoint answered.
fn answered_by(outcomes: &[Outcome]) -> BTreeMap<String, u64> {
    let mut by = BTreeMap::new();
    for outcome in outcomes {
        if let Outcome::Answered(_, _, endpoint) = outcome {
            *by.entry(endpoint.clone()).or_default() += 1;
        }
    }
    by
}

/// One connection attempt that sends one SYN: refused, or given up before the first
/// retransmission (after 1 s). A refused or dropped attempt leaves no connection
/// behind, so a retransmitted SYN is a new attempt to the kernel, and is counted as one.
fn attempt(to: std::net::SocketAddr) -> Outcome {
    match TcpStream::connect_timeout(&to, Duration::from_millis(300)) {
        Ok(_) => Outcome::Answered(String::new(), String::new(), String::new()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
        Err(_) => Outcome::TimedOut,
    }
}

fn nftproxy_in(ns: &str, args: &[&str]) -> String {
    let output = Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_nftproxy")])
        .args(args)
        .output()
        .expect("nftproxy runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

#[test]
fn counters_count_every_connection_by_outcome_and_endpoint_and_survive_a_restart() {
    if !kernel_available("counters_count_every_connection_by_outcome_and_endpoint") {
        return;
    }
    let topology = Topology::new("ctr");
    let counted = ["--service-cidr", SERVICE_CIDR, "--service-counters"];
    topology.program_with(EXTRA, &counted);
    let node = topology.ns("node");
    // The node answers every refused attempt (by default the kernel sends a peer about
    // six ICMP errors at once, then one a second): an unanswered attempt would be
    // retried by the client, and each retry is an attempt of its own.
    sysctl(&node, "net.ipv4.icmp_ratelimit=0");
    let daemon_command = || {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &node, env!("CARGO_BIN_EXE_nftproxy")])
            .args(SEED_NODE_FLAGS)
            .args(counted)
            .args([
                "--metrics-bind-address",
                METRICS,
                "--healthz-bind-address",
                "",
            ])
            .arg("--manifests")
            .arg(&topology.dir);
        command
    };
    let log = |n: u32| std::env::temp_dir().join(format!("{}daemon{n}.log", topology.ns("")));
    let daemon = Daemon::spawn(&mut daemon_command(), log(1));
    within(Duration::from_secs(10), "the first sync", || {
        daemon.log().contains("synced")
    });
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [
        serve(topology.ns("be1"), "be1", stop.clone()),
        serve(topology.ns("be2"), "be2", stop.clone()),
    ];
    // Nothing was sent yet: every series is there, at zero.
    let before = connections(&get(&node, "/metrics").expect("metrics"));
    assert_eq!(
        before.get(&service("redis", "6379", "TCP", "forwarded")),
        Some(&0)
    );

    let (pod, client) = (topology.ns("pod"), topology.ns("client"));
    let redis = from(pod.clone(), 40, || tcp(addr("10.103.50.102:6379")));
    let nodeport = from(client.clone(), 30, || tcp(addr("192.168.50.10:31000")));
    let sticky = from(pod.clone(), 10, || tcp(addr("10.96.100.12:6379")));
    let empty = from(pod.clone(), 10, || attempt(addr("10.96.100.11:80")));
    let undefined_port = from(pod.clone(), 5, || attempt(addr("10.103.50.102:9999")));
    let unallocated = from(pod.clone(), 3, || attempt(addr("10.96.200.200:80")));
    let guarded = from(client.clone(), 2, || attempt(addr("192.168.50.201:8080")));
    // Every connection was answered, refused or dropped as its rules say, before any
    // count is judged.
    for (what, outcomes, answered) in [
        ("redis", &redis, true),
        ("the NodePort", &nodeport, true),
        ("sticky", &sticky, true),
    ] {
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Answered(..)) == answered),
            "{what}: {outcomes:?}"
        );
    }
    // A refusal that reaches the client while its connect call holds the socket is
    // taken as a soft error until the retransmission: such an attempt gives up first.
    for refused in [&empty, &undefined_port] {
        let count = |outcome: Outcome| refused.iter().filter(|o| **o == outcome).count();
        assert_eq!(
            count(Outcome::Refused) + count(Outcome::TimedOut),
            refused.len()
        );
        assert!(count(Outcome::Refused) * 2 > refused.len(), "{refused:?}");
    }
    assert!(unallocated.iter().all(|o| *o == Outcome::TimedOut));
    assert!(guarded.iter().all(|o| *o == Outcome::TimedOut));

    let mut expected = BTreeMap::from([
        (service("redis", "6379", "TCP", "forwarded"), 40),
        (service("counter-np", "3000", "TCP", "forwarded"), 30),
        (service("sticky", "redis", "TCP", "forwarded"), 10),
        (service("empty", "http", "TCP", "rejected"), 10),
        (service("redis", "", "", "rejected"), 5),
        (service("guarded", "web", "TCP", "dropped"), 2),
        (
            "nftproxy_unallocated_service_address_connections_total".to_owned(),
            3,
        ),
    ]);
    for (name, port, outcomes) in [
        ("redis", "6379", &redis),
        ("counter-np", "3000", &nodeport),
        ("sticky", "redis", &sticky),
    ] {
        for (ep, n) in answered_by(outcomes) {
            expected.insert(endpoint(name, port, &ep), n);
        }
    }
    let after = connections(&get(&node, "/metrics").expect("metrics"));
    let nonzero: BTreeMap<String, u64> = after
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| (s.clone(), *n))
        .collect();
    assert_eq!(nonzero, expected);

    // The terminal views read the same counters.
    let top = nftproxy_in(&node, &["top"]);
    assert!(top.contains("default/redis:6379/TCP"), "{top}");
    assert!(top.contains("default/empty:http/TCP"), "{top}");
    let explained = nftproxy_in(
        &node,
        &[
            "explain",
            "--live",
            "--from",
            "10.244.3.10",
            "--to",
            "10.103.50.102:6379/tcp",
        ],
    );
    assert!(
        explained.contains("default/redis:6379/TCP: 40 forwarded, 0 rejected, 0 dropped"),
        "{explained}"
    );

    // A restart that changes nothing keeps every counter.
    drop(daemon);
    let daemon = Daemon::spawn(&mut daemon_command(), log(2));
    within(
        Duration::from_secs(10),
        "the sync after the restart",
        || daemon.log().contains("synced"),
    );
    assert!(daemon.log().contains("operations=0"), "{}", daemon.log());
    let restarted = connections(&get(&node, "/metrics").expect("metrics"));
    assert_eq!(restarted, after);

    stop.store(true, Ordering::SeqCst);
    for server in servers {
        server.join().expect("server");
    }
}
