//! The binary against the in-process fake API server, each test in a fresh network
//! namespace (the fake listens on that namespace's loopback): the API's ruleset equals the
//! manifests' one; nothing is programmed before both initial lists are complete; an
//! EndpointSlice change reaches the kernel within one minSyncPeriod; an unreachable API
//! server keeps the rules and the watch recovers; after the changes the kernel holds
//! what a fresh build gives; `/metrics` moves after a sync;
//! `/healthz` turns 503 when syncs stall; health-check node ports follow the local
//! endpoints; stale UDP flows are deleted (also when a Service is scaled to zero or
//! deleted); ServiceCIDRs added and removed move the drop
//! of unallocated addresses; SIGTERM leaves the rules.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nftproxy_netlink::netns::in_new_netns;
use nftproxy_testkit::fake_api::{FakeApi, Resource};
use nftproxy_testkit::{
    SEED_NODE_FLAGS, kernel_available, normalise_listing, repo_root, run_ok, seed_manifests,
};

mod common;
use common::{Daemon, within};

const HEALTHZ: &str = "127.0.0.1:10256";
const METRICS: &str = "127.0.0.1:10249";

/// This node's Node, as the API server holds it (the daemon waits for it).
const NODE_A: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n\
                      status: {addresses: [{type: InternalIP, address: 192.168.50.10}]}\n";

/// The seed examples and this node's Node, as the API server would hold them.
fn seed_yaml() -> String {
    format!("{}\n---\n{NODE_A}", seed_manifests())
}

fn nftproxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nftproxy"))
}

fn start(api: &FakeApi, extra: &[&str]) -> Daemon {
    let log = std::env::temp_dir().join(format!(
        "nftproxy-api-test-{}-{:?}.log",
        std::process::id(),
        std::thread::current().id()
    ));
    Daemon::spawn(
        nftproxy()
            .args(["--master", &api.url()])
            .args(SEED_NODE_FLAGS)
            .args(["--healthz-bind-address", HEALTHZ])
            .args(["--metrics-bind-address", METRICS])
            .args(extra),
        log,
    )
}

fn bring_up_loopback() {
    run_ok(Command::new("ip").args(["link", "set", "lo", "up"]), "");
}

fn listing() -> Option<String> {
    let output = Command::new("nft")
        .args(["list", "table", "ip", "nftproxy"])
        .output()
        .expect("nft runs");
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A plain HTTP/1.0 GET: the status code and the body.
fn get(address: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

/// The value of one sample line of `/metrics`, e.g. `name{label="x"}`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn metrics() -> String {
    get(METRICS, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default()
}

#[test]
fn the_api_and_the_manifests_give_the_same_ruleset() {
    if !kernel_available("the_api_and_the_manifests_give_the_same_ruleset") {
        return;
    }
    in_new_netns(|| {
        bring_up_loopback();
        let api = FakeApi::start();
        api.apply_yaml(&seed_yaml());
        let from_api = run_ok(
            nftproxy()
                .args(["--dry-run", "--master", &api.url()])
                .args(SEED_NODE_FLAGS),
            "",
        );
        let from_files = run_ok(
            nftproxy()
                .args(["--dry-run", "--manifests"])
                .arg(repo_root().join("hack/examples/seed"))
                .args(SEED_NODE_FLAGS),
            "",
        );
        // redis's ClusterIP.
        assert!(from_api.contains("10.103.50.102"), "{from_api}");
        assert_eq!(from_api, from_files);
    })
    .expect("netns");
}

#[test]
fn the_daemon_follows_the_api_keeps_rules_while_it_is_down_and_reports_metrics() {
    if !kernel_available(
        "the_daemon_follows_the_api_keeps_rules_while_it_is_down_and_reports_metrics",
    ) {
        return;
    }
    in_new_netns(|| {
        bring_up_loopback();
        let api = FakeApi::start();
        api.apply_yaml(&seed_yaml());
        // The EndpointSlice list fails at first: nothing may be programmed, since every
        // Service would look endpoint-less.
        api.refuse(Resource::EndpointSlices, true);
        let mut daemon = start(&api, &["--min-sync-period", "2s", "--sync-period", "30s"]);
        within(Duration::from_secs(20), "the Service list", || {
            api.lists(Resource::Services) > 0 && api.lists(Resource::EndpointSlices) > 0
        });
        std::thread::sleep(Duration::from_secs(1));
        assert!(listing().is_none(), "programmed before the initial lists");
        api.refuse(Resource::EndpointSlices, false);

        // The first sync, after both initial lists.
        within(Duration::from_secs(20), "the first sync", || {
            listing().is_some_and(|l| l.contains("10.103.50.102"))
        });
        within(Duration::from_secs(5), "/healthz", || {
            get(HEALTHZ, "/healthz").is_some_and(|(code, _)| code == 200)
        });
        let (code, body) = get(HEALTHZ, "/healthz").expect("healthz answers");
        assert_eq!(code, 200);
        assert!(body.contains(r#""nodeEligible": true"#), "{body}");
        let before = metrics();
        let syncs = sample(
            &before,
            r#"kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"}"#,
        )
        .expect("a sync was measured");
        assert!(syncs >= 1.0);
        assert!(
            sample(
                &before,
                r#"kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}"#
            )
            .is_some_and(|t| t > 1.6e9)
        );
        assert_eq!(
            get(METRICS, "/proxyMode").map(|(_, body)| body).as_deref(),
            Some("nftables")
        );

        // An EndpointSlice change after a quiet spell: in the kernel within one
        // minSyncPeriod (2 s; it is applied at once, the bound leaves room for a slow
        // machine), with its network programming latency measured.
        std::thread::sleep(Duration::from_secs(2));
        let mut slice = seed_object("redis-7xk2p");
        let endpoints = slice["endpoints"].as_array_mut().expect("endpoints");
        let mut added = endpoints[0].clone();
        added["addresses"] = serde_json::json!(["10.244.3.77"]);
        endpoints.push(added);
        slice["metadata"]["annotations"] = serde_json::json!({
            "endpoints.kubernetes.io/last-change-trigger-time": jiff::Timestamp::now().to_string(),
        });
        api.apply(slice);
        let took = within(Duration::from_secs(2), "the new endpoint", || {
            listing().is_some_and(|l| l.contains("10.244.3.77"))
        });
        eprintln!("endpoint change reached the kernel in {took:?}");
        within(Duration::from_secs(5), "the programming latency", || {
            sample(
                &metrics(),
                r#"kubeproxy_network_programming_duration_seconds_count{ip_family="IPv4"}"#,
            )
            .is_some_and(|n| n >= 1.0)
        });
        let after = metrics();
        assert!(
            sample(
                &after,
                r#"kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"}"#
            )
            .is_some_and(|n| n > syncs),
            "{after}"
        );

        // The API server goes away: the rules stay, health stays good (nothing is
        // queued), and a change made meanwhile arrives once it is back.
        let held = listing().expect("rules");
        api.set_available(false);
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(listing().as_deref(), Some(held.as_str()));
        assert_eq!(get(HEALTHZ, "/healthz").map(|(code, _)| code), Some(200));
        api.delete("Service", "default", "redis");
        api.set_available(true);
        within(
            Duration::from_secs(40),
            "the deletion after reconnecting",
            || listing().is_some_and(|l| !l.contains("10.103.50.102")),
        );

        // After these changes, each synced as only what changed, the kernel holds what
        // a fresh build of the API's objects gives: nothing left behind, nothing missed.
        let fresh = run_ok(
            nftproxy()
                .args(["--dry-run", "--master", &api.url()])
                .args(SEED_NODE_FLAGS),
            "",
        );
        let fresh_ip = fresh.split("table ip6 ").next().unwrap_or_default();
        assert_eq!(
            normalise_listing(&listing().expect("rules")),
            normalise_listing(fresh_ip)
        );

        // SIGTERM: a clean exit that leaves the rules.
        let pid = daemon.0.id().to_string();
        run_ok(Command::new("kill").args(["-TERM", &pid]), "");
        let status = daemon.0.wait().expect("exits");
        assert!(status.success(), "{status}");
        // counter-lb's ClusterIP.
        assert!(listing().is_some_and(|l| l.contains("10.109.133.129")));
    })
    .expect("netns");
}

#[test]
fn healthz_turns_unhealthy_while_syncs_stall_and_recovers() {
    if !kernel_available("healthz_turns_unhealthy_while_syncs_stall_and_recovers") {
        return;
    }
    in_new_netns(|| {
        bring_up_loopback();
        let api = FakeApi::start();
        api.apply_yaml(&seed_yaml());
        // Another program owns a table of our name (`flags owner`, held by its open
        // netlink socket): the kernel refuses every change to it, so each sync fails and
        // the queued update ages past 2 × syncPeriod.
        let mut holder = Command::new("nft")
            .arg("-i")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("nft -i starts");
        let mut commands = holder.stdin.take().expect("stdin");
        writeln!(commands, "add table ip nftproxy {{ flags owner; }}").expect("nft -i reads");
        within(Duration::from_secs(5), "the owned table", || {
            listing().is_some()
        });
        let _daemon = start(&api, &["--sync-period", "1s", "--min-sync-period", "100ms"]);
        within(Duration::from_secs(10), "a failed sync", || {
            sample(
                &metrics(),
                r#"kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family="IPv4"}"#,
            )
            .is_some_and(|n| n >= 1.0)
        });
        within(Duration::from_secs(10), "/healthz 503", || {
            get(HEALTHZ, "/healthz").is_some_and(|(code, _)| code == 503)
        });
        let (code, body) = get(HEALTHZ, "/livez").expect("livez answers");
        assert_eq!(code, 503, "{body}");
        assert!(
            body.starts_with(r#"{"lastUpdated": "0001-01-01 00:00:00 +0000 UTC""#),
            "{body}"
        );
        assert!(
            sample(&metrics(), r#"kubeproxy_proxy_healthz_total{code="503"}"#)
                .is_some_and(|n| n >= 1.0)
        );

        // The owner goes away and takes its table along: the next retry programs the
        // rules and health returns.
        drop(commands);
        let _ = holder.kill();
        let _ = holder.wait();
        within(Duration::from_secs(10), "the rules after the stall", || {
            listing().is_some_and(|l| l.contains("10.103.50.102"))
        });
        within(Duration::from_secs(5), "/healthz 200", || {
            get(HEALTHZ, "/healthz").is_some_and(|(code, _)| code == 200)
        });
    })
    .expect("netns");
}

/// One document of the seed examples, as JSON.
fn seed_object(name: &str) -> serde_json::Value {
    let yaml = seed_yaml();
    let document = yaml
        .split("\n---\n")
        .find(|d| d.contains(&format!("\n  name: {name}\n")))
        .unwrap_or_else(|| panic!("{name} in the seed"));
    serde_saphyr::from_str(document).expect("yaml")
}

/// In this namespace: the node's address on loopback (where NodePorts, and so health
/// checks, are served), and an API server with the seed cluster whose counter-lb has
/// `externalTrafficPolicy: Local` and health-check node port 32100 (returned).
fn cluster_with_a_health_check() -> (FakeApi, serde_json::Value) {
    bring_up_loopback();
    run_ok(
        Command::new("ip").args(["addr", "add", "192.168.50.10/32", "dev", "lo"]),
        "",
    );
    let api = FakeApi::start();
    api.apply_yaml(&seed_yaml());
    let mut service = seed_object("counter-lb");
    service["spec"]["externalTrafficPolicy"] = serde_json::json!("Local");
    service["spec"]["healthCheckNodePort"] = serde_json::json!(32100);
    api.apply(service.clone());
    (api, service)
}

#[test]
fn health_check_node_ports_follow_local_endpoints() {
    if !kernel_available("health_check_node_ports_follow_local_endpoints") {
        return;
    }
    in_new_netns(|| {
        let (api, mut service) = cluster_with_a_health_check();
        let _daemon = start(&api, &["--min-sync-period", "100ms"]);
        let probe = "192.168.50.10:32100";

        // counter-lb has one ready endpoint on node-a (this node) and one on node-b.
        within(Duration::from_secs(20), "the health check", || {
            get(probe, "/").is_some_and(|(code, _)| code == 200)
        });
        let (_, body) = get(probe, "/").expect("answers");
        assert!(body.contains("\"name\": \"counter-lb\""), "{body}");
        assert!(body.contains("\"localEndpoints\": 1"), "{body}");

        // The local endpoint goes away: 503, so that load balancers skip this node.
        let mut slice = seed_object("counter-lb-h5t8w");
        slice["endpoints"]
            .as_array_mut()
            .expect("endpoints")
            .retain(|e| e["nodeName"] != "node-a");
        api.apply(slice);
        within(
            Duration::from_secs(10),
            "503 without local endpoints",
            || {
                get(probe, "/").is_some_and(|(code, body)| {
                    code == 503 && body.contains("\"localEndpoints\": 0")
                })
            },
        );

        // Back to the Cluster policy: no health check any more.
        service["spec"]["externalTrafficPolicy"] = serde_json::json!("Cluster");
        service["spec"]
            .as_object_mut()
            .expect("spec")
            .remove("healthCheckNodePort");
        api.apply(service);
        within(Duration::from_secs(10), "the port to close", || {
            TcpStream::connect(probe).is_err()
        });
    })
    .expect("netns");
}

/// In this namespace: loopback, and the pod network behind one end of a veth pair whose
/// other end nobody reads: datagrams DNATed to a pod leave through it, which is enough
/// for conntrack to confirm their flows.
fn pod_network() {
    bring_up_loopback();
    for args in [
        &[
            "link",
            "add",
            "pods",
            "type",
            "veth",
            "peer",
            "name",
            "pods-peer",
        ][..],
        &["link", "set", "pods-peer", "up"],
        &["link", "set", "pods", "up"],
        &["addr", "add", "10.244.0.1/16", "dev", "pods"],
        &["route", "add", "10.96.0.0/12", "dev", "pods"],
    ] {
        run_ok(Command::new("ip").args(args), "");
    }
}

fn udp_service(name: &str, cluster_ip: &str, endpoint: &str) -> String {
    udp_service_with(name, cluster_ip, endpoint, "{ready: true}")
}

/// A UDP Service on port 53 with one endpoint on node-b, whose conditions are given.
fn udp_service_with(name: &str, cluster_ip: &str, endpoint: &str, conditions: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: kube-system}}\n\
         spec: {{clusterIP: {cluster_ip}, ports: [{{name: dns, port: 53, protocol: UDP}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: kube-system, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: dns, port: 53, protocol: UDP}}]\n\
         endpoints: [{{addresses: [{endpoint}], nodeName: node-b, conditions: {conditions}}}]\n"
    )
}

fn udp_flows() -> Vec<String> {
    let output = run_ok(Command::new("conntrack").args(["-L", "-p", "udp"]), "");
    output.lines().map(str::to_owned).collect()
}

#[test]
fn stale_udp_flows_are_deleted_after_a_sync() {
    if !kernel_available("stale_udp_flows_are_deleted_after_a_sync") {
        return;
    }
    in_new_netns(|| {
        pod_network();
        let api = FakeApi::start();
        api.apply_yaml(&udp_service("dns", "10.96.0.10", "10.244.1.53"));
        api.apply_yaml(&udp_service("other", "10.96.0.11", "10.244.1.54"));
        api.apply_yaml(NODE_A);
        let _daemon = start(&api, &["--min-sync-period", "100ms"]);
        within(Duration::from_secs(20), "the rules", || {
            listing().is_some_and(|l| l.contains("10.96.0.11"))
        });

        let client = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
        for target in ["10.96.0.10:53", "10.96.0.11:53", "10.244.7.7:53"] {
            client.send_to(b"query", target).expect("sent");
        }
        within(Duration::from_secs(5), "the flows", || {
            let flows = udp_flows();
            flows
                .iter()
                .any(|f| f.contains("dst=10.96.0.10") && f.contains("src=10.244.1.53"))
                && flows.iter().any(|f| f.contains("src=10.244.1.54"))
        });

        // dns's backend is replaced: its flow still points at the old pod and goes; the
        // other Service's flow and the flow to a plain address stay.
        api.apply_yaml(&udp_service("dns", "10.96.0.10", "10.244.2.53"));
        within(Duration::from_secs(10), "the stale flow to go", || {
            !udp_flows().iter().any(|f| f.contains("src=10.244.1.53"))
        });
        let flows = udp_flows();
        assert!(
            flows.iter().any(|f| f.contains("src=10.244.1.54")),
            "{flows:?}"
        );
        assert!(
            flows.iter().any(|f| f.contains("dst=10.244.7.7")),
            "{flows:?}"
        );
        within(Duration::from_secs(5), "the metric", || {
            sample(
                &metrics(),
                r#"kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family="IPv4"}"#,
            )
            .is_some_and(|n| n >= 1.0)
        });

        // The next datagram from the same socket reaches the new backend.
        client.send_to(b"query", "10.96.0.10:53").expect("sent");
        within(Duration::from_secs(5), "a fresh flow", || {
            udp_flows().iter().any(|f| f.contains("src=10.244.2.53"))
        });
    })
    .expect("netns");
}

#[test]
fn an_unreachable_api_server_turns_healthz_503_after_two_sync_periods_and_says_why() {
    if !kernel_available(
        "an_unreachable_api_server_turns_healthz_503_after_two_sync_periods_and_says_why",
    ) {
        return;
    }
    in_new_netns(|| {
        bring_up_loopback();
        // Nothing listens on port 1 of this namespace's loopback.
        let log =
            std::env::temp_dir().join(format!("nftproxy-unreachable-{}.log", std::process::id()));
        let daemon = Daemon::spawn(
            nftproxy()
                .args(["--master", "http://127.0.0.1:1"])
                .args(SEED_NODE_FLAGS)
                .args(["--sync-period", "1s", "--healthz-bind-address", HEALTHZ]),
            log.clone(),
        );
        let started = Instant::now();
        within(Duration::from_secs(5), "/healthz answers", || {
            get(HEALTHZ, "/healthz").is_some()
        });
        let took = within(Duration::from_secs(10), "/healthz 503", || {
            get(HEALTHZ, "/healthz").is_some_and(|(code, _)| code == 503)
        });
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "not before 2 x syncPeriod: {took:?}"
        );
        assert_eq!(get(HEALTHZ, "/livez").map(|(code, _)| code), Some(503));
        assert!(listing().is_none(), "nothing programmed");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            text.contains("Connection refused"),
            "the log names the cause, not only that the request failed:\n{text}"
        );
        drop(daemon);
    })
    .expect("netns");
}

#[test]
fn the_health_check_port_is_served_after_every_start_with_or_without_a_late_node() {
    if !kernel_available(
        "the_health_check_port_is_served_after_every_start_with_or_without_a_late_node",
    ) {
        return;
    }
    in_new_netns(|| {
        let (api, _) = cluster_with_a_health_check();
        // The node's address comes from its Node (in the seed) alone: no --node-ip.
        let probe = "192.168.50.10:32100";
        let flags = [
            "--master",
            &api.url(),
            "--node-name",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--healthz-bind-address",
            HEALTHZ,
            "--metrics-bind-address",
            METRICS,
        ];
        for start in 0..20 {
            let late = start % 2 == 0;
            let delay = if late {
                Duration::from_millis(1_000)
            } else {
                Duration::ZERO
            };
            api.delay_lists(Resource::Nodes, delay);
            let log = std::env::temp_dir()
                .join(format!("nftproxy-hc-{}-{start}.log", std::process::id()));
            let daemon = Daemon::spawn(nftproxy().args(flags), log);
            within(
                Duration::from_secs(15),
                &format!("start {start} (late Node: {late})"),
                || get(probe, "/").is_some_and(|(code, _)| code == 200),
            );
            drop(daemon);
        }
    })
    .expect("netns");
}

#[test]
fn a_udp_flow_stays_with_a_serving_endpoint_and_goes_with_it_or_its_service() {
    if !kernel_available("a_udp_flow_stays_with_a_serving_endpoint_and_goes_with_it_or_its_service")
    {
        return;
    }
    in_new_netns(|| {
        pod_network();
        let api = FakeApi::start();
        api.apply_yaml(NODE_A);
        api.apply_yaml(&udp_service("dns", "10.96.0.10", "10.244.1.53"));
        let _daemon = start(&api, &["--min-sync-period", "100ms"]);
        within(Duration::from_secs(20), "the rules", || {
            listing().is_some_and(|l| l.contains("10.96.0.10"))
        });
        // A client with a fixed source port, as a resolver reusing its socket.
        let client = std::net::UdpSocket::bind("0.0.0.0:40053").expect("udp socket");
        let to_pod = |flows: &[String]| {
            flows
                .iter()
                .any(|f| f.contains("dport=40053") && f.contains("src=10.244.1.53"))
        };
        let changes = || {
            sample(
                &metrics(),
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            )
            .unwrap_or(0.0)
        };
        client.send_to(b"query", "10.96.0.10:53").expect("sent");
        within(Duration::from_secs(5), "the flow", || to_pod(&udp_flows()));

        // The endpoint terminates but still serves: its flow stays through the syncs
        // that follow.
        let seen = changes();
        api.apply_yaml(&udp_service_with(
            "dns",
            "10.96.0.10",
            "10.244.1.53",
            "{ready: false, serving: true, terminating: true}",
        ));
        within(Duration::from_secs(10), "the change", || changes() > seen);
        std::thread::sleep(Duration::from_millis(1_500));
        assert!(
            to_pod(&udp_flows()),
            "kept while serving: {:?}",
            udp_flows()
        );

        // It stops serving: the flow goes.
        api.apply_yaml(&udp_service_with(
            "dns",
            "10.96.0.10",
            "10.244.1.53",
            "{ready: false, serving: false, terminating: true}",
        ));
        within(Duration::from_secs(10), "the flow to go", || {
            !to_pod(&udp_flows())
        });

        // Served again, a new flow; then scaled to zero (the slice keeps no endpoint, as
        // upstream's #139628 has it): the flow goes.
        let served_again = || {
            api.apply_yaml(&udp_service("dns", "10.96.0.10", "10.244.1.53"));
            within(Duration::from_secs(10), "served again", || {
                // Refused (EPERM) until the rules have the endpoint again.
                let _ = client.send_to(b"query", "10.96.0.10:53");
                to_pod(&udp_flows())
            });
        };
        served_again();
        api.apply_yaml(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: dns-1, namespace: kube-system, \
             labels: {kubernetes.io/service-name: dns}}\n\
             addressType: IPv4\nports: [{name: dns, port: 53, protocol: UDP}]\nendpoints: []\n",
        );
        within(
            Duration::from_secs(10),
            "the flow of a Service scaled to zero to go",
            || !to_pod(&udp_flows()),
        );

        // Served again; then the Service is deleted (upstream's #141371): the flow goes.
        served_again();
        api.delete("Service", "kube-system", "dns");
        within(
            Duration::from_secs(10),
            "the deleted Service's flow to go",
            || !to_pod(&udp_flows()),
        );
    })
    .expect("netns");
}

fn service_cidr(name: &str, cidr: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {{name: {name}}}\n\
         spec: {{cidrs: [{cidr}]}}\n"
    )
}

/// Datagrams to unallocated Service addresses the kernel dropped, from `/metrics`.
fn unallocated_drops() -> f64 {
    sample(
        &metrics(),
        "nftproxy_unallocated_service_address_connections_total",
    )
    .unwrap_or(0.0)
}

/// Whether the kernel drops a datagram sent from a new socket (a new flow) to `target`:
/// a packet this host sends and its own rules drop fails the send with EPERM.
fn dropped(target: &str) -> bool {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
    match socket.send_to(b"query", target) {
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => true,
        Err(e) => panic!("sending to {target}: {e}"),
    }
}

#[test]
fn service_cidrs_from_the_api_drop_unallocated_addresses_as_ranges_come_and_go() {
    if !kernel_available(
        "service_cidrs_from_the_api_drop_unallocated_addresses_as_ranges_come_and_go",
    ) {
        return;
    }
    in_new_netns(|| {
        pod_network();
        let api = FakeApi::start();
        api.apply_yaml(&udp_service("dns", "10.96.0.10", "10.244.1.53"));
        api.apply_yaml(&service_cidr("kubernetes", "10.96.0.0/16"));
        api.apply_yaml(NODE_A);
        let _daemon = start(&api, &["--min-sync-period", "100ms", "--service-counters"]);
        within(Duration::from_secs(20), "the first range", || {
            listing().is_some_and(|l| l.contains("10.96.0.0/16"))
        });
        let unallocated = "10.100.0.5:53";
        assert!(
            dropped("10.96.7.7:53"),
            "an unallocated address of the first range"
        );
        assert!(!dropped("10.96.0.10:53"), "an allocated one");
        assert!(!dropped(unallocated), "an address of a range not yet added");

        // A range added: its unallocated addresses are dropped from the next sync on.
        api.apply_yaml(&service_cidr("extra", "10.100.0.0/16"));
        within(Duration::from_secs(10), "the new range", || {
            listing().is_some_and(|l| l.contains("10.100.0.0/16"))
        });
        assert!(dropped(unallocated));
        // Read as a scrape reads them: a counter deleted later is carried from here.
        assert_eq!(unallocated_drops(), 2.0);

        // And removed: no longer.
        api.delete("ServiceCIDR", "", "extra");
        within(Duration::from_secs(10), "the range to go", || {
            listing().is_some_and(|l| !l.contains("10.100.0.0/16"))
        });
        assert!(!dropped(unallocated));
        // Each drop was counted, the others not, and the removed range's count stays.
        assert_eq!(unallocated_drops(), 2.0);
        assert!(api.requests().iter().any(|r| r.contains("/servicecidrs")));
    })
    .expect("netns");
}
