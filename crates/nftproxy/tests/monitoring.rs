//! The alerts and the dashboard of `hack/deploy/` on a real Prometheus (Debian's): the
//! rules pass `promtool check rules` and their unit tests, the PrometheusRule object
//! holds the same rules, the daemon's `/metrics` passes `promtool check metrics`, and
//! with Prometheus scraping a daemon under traffic in a namespace, every query of the
//! Grafana dashboard evaluates without error, every panel has data, and of the alerts
//! only the one the traffic calls for is pending.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Daemon, Topology, addr, http_get, serve, sysctl, tcp, within};
use nftproxy_netlink::netns;
use nftproxy_testkit::fake_api::FakeApi;
use nftproxy_testkit::{
    SEED_NODE_FLAGS, kernel_available, repo_root, seed_manifests, tool_available,
};
use serde_json::Value;

fn deploy(file: &str) -> std::path::PathBuf {
    repo_root().join("hack/deploy").join(file)
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs");
    let said = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "promtool {args:?}: {said}");
    said.into_owned()
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let test = "the_alert_rules_pass_promtool_and_their_unit_tests";
    if !tool_available(test, Path::new("promtool"), &["--version"]) {
        return;
    }
    let dir = repo_root().join("hack/deploy");
    let checked = promtool(&["check", "rules", "prometheus-rules.yaml"], &dir);
    assert!(checked.contains("SUCCESS: 5 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "prometheus-rules.test.yaml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test.
    let read = |file: &str| -> Value {
        let text = std::fs::read_to_string(deploy(file)).expect(file);
        serde_saphyr::from_str(&text).expect("YAML")
    };
    let rules = read("prometheus-rules.yaml");
    let tests = std::fs::read_to_string(deploy("prometheus-rules.test.yaml")).expect("tests");
    for rule in rules["groups"][0]["rules"].as_array().expect("rules") {
        let alert = rule["alert"].as_str().expect("an alert");
        assert!(
            tests.contains(&format!("alertname: {alert}\n        exp_alerts:")),
            "no test expects {alert} to fire"
        );
    }
    // The operator's object holds the same groups.
    let object = read("prometheus-rule.yaml");
    assert_eq!(object["kind"], "PrometheusRule");
    assert_eq!(object["spec"]["groups"], rules["groups"]);
}

/// What `promtool check metrics` finds in an exposition, one line per finding.
fn lint(exposition: &str) -> Vec<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(exposition.as_bytes())
        .expect("input written");
    drop(stdin);
    let output = child.wait_with_output().expect("promtool ends");
    let said = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    let findings: Vec<String> = said
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    assert_eq!(output.status.success(), findings.is_empty(), "{said}");
    findings
}

/// The body of a 200 answer to `GET path` from inside `ns`.
fn get(ns: &str, address: &'static str, path: String) -> Option<String> {
    http_get(ns, address, &path).and_then(|(status, body)| (status == 200).then_some(body))
}

const METRICS: &str = "127.0.0.1:10249";
const PROMETHEUS: &str = "127.0.0.1:9090";

/// A PromQL query through Prometheus's HTTP API: its result vector.
fn query(ns: &str, promql: &str) -> Vec<Value> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let body = get(ns, PROMETHEUS, format!("/api/v1/query?query={encoded}"))
        .unwrap_or_else(|| panic!("Prometheus answers {promql}"));
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["status"], "success", "{promql}: {answer}");
    answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A Service without endpoints, for the panels of refused connections, and one whose
/// endpoints the test changes.
const EXTRA: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: default}\n\
                     spec: {clusterIP: 10.96.100.11, ports: [{name: http, port: 80}]}\n\
                     ---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
                     spec: {clusterIP: 10.96.100.12, ports: [{name: http, port: 80}]}\n";

/// `web`'s EndpointSlice in its `round`th version, stamped with the time of its change.
fn web_endpoints(round: u32) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}},\n\
         annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{}'}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 80}}]\n\
         endpoints: [{{addresses: [10.244.1.{}], nodeName: node-a}}]\n",
        jiff::Timestamp::now(),
        10 + round % 2
    )
}

#[test]
fn every_dashboard_query_answers_on_prometheus_scraping_a_daemon_under_traffic() {
    let test = "every_dashboard_query_answers_on_prometheus_scraping_a_daemon_under_traffic";
    if !kernel_available(test)
        || !tool_available(test, Path::new("prometheus"), &["--version"])
        || !tool_available(test, Path::new("promtool"), &["--version"])
    {
        return;
    }
    let topology = Topology::new("mon");
    let node = topology.ns("node");
    sysctl(&node, "net.ipv4.icmp_ratelimit=0");
    // The API server inside the node's namespace, where the daemon reaches it.
    let api = netns::in_named_netns(&node, FakeApi::start).expect("node namespace");
    api.apply_yaml(&format!("{}\n---\n{EXTRA}", seed_manifests()));
    api.apply_yaml(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n\
         status: {addresses: [{type: InternalIP, address: 192.168.50.10}]}\n",
    );
    let log = |name: &str| std::env::temp_dir().join(format!("{}{name}.log", topology.ns("")));
    let daemon = Daemon::spawn(
        Command::new("ip")
            .args(["netns", "exec", &node, env!("CARGO_BIN_EXE_nftproxy")])
            .args(SEED_NODE_FLAGS)
            .args(["--service-cidr", "10.96.0.0/12", "--service-counters"])
            .args(["--metrics-bind-address", METRICS, "--master", &api.url()]),
        log("daemon"),
    );
    within(Duration::from_secs(30), "the first sync", || {
        daemon.log().contains("synced")
    });

    // The exposition passes Prometheus's own linter.
    let exposition = get(&node, METRICS, "/metrics".to_owned()).expect("metrics");
    // One finding is upstream's: kube-proxy exports this gauge under a counter's suffix,
    // and dashboards and alerts written for kube-proxy read it by that name.
    let upstream = "kubeproxy_sync_proxy_rules_no_local_endpoints_total non-counter metrics should not have \"_total\" suffix";
    let linted = lint(&exposition);
    assert_eq!(linted, [upstream], "promtool check metrics");
    // The linter is not silent: a counter without its suffix is a finding.
    let renamed = exposition.replace("nftproxy_sync_repairs_total", "nftproxy_sync_repairs");
    assert!(lint(&renamed).len() > 1);

    // Prometheus in the node's namespace, scraping every second and evaluating the
    // shipped alert rules.
    let home = std::env::temp_dir().join(format!("{}prometheus", topology.ns("")));
    let data = home.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let config = home.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: ['{}']\n\
             scrape_configs:\n  - job_name: nftproxy\n    static_configs: [{{targets: ['{METRICS}']}}]\n",
            deploy("prometheus-rules.yaml").display()
        ),
    )
    .expect("config written");
    let prometheus = Daemon::spawn(
        Command::new("ip")
            .args(["netns", "exec", &node, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={PROMETHEUS}")),
        log("prometheus"),
    );

    // Traffic: forwarded (ClusterIP from a pod, NodePort from outside), rejected (no
    // endpoints) and dropped (an unallocated Service address), in rounds.
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [
        serve(topology.ns("be1"), "be1", stop.clone()),
        serve(topology.ns("be2"), "be2", stop.clone()),
    ];
    let (pod, client) = (topology.ns("pod"), topology.ns("client"));
    let sent = Arc::new(AtomicBool::new(false));
    let api = Arc::new(api);
    let traffic = {
        let (sent, stop, api) = (sent.clone(), stop.clone(), api.clone());
        std::thread::spawn(move || {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                let answered = [
                    netns::in_named_netns(&pod, || tcp(addr("10.103.50.102:6379"))),
                    netns::in_named_netns(&client, || tcp(addr("192.168.50.10:31000"))),
                ];
                assert!(
                    answered
                        .iter()
                        .all(|o| matches!(o, Ok(common::Outcome::Answered(..)))),
                    "{answered:?}"
                );
                for refused in ["10.96.100.11:80", "10.96.200.200:80"] {
                    let _ = netns::in_named_netns(&pod, move || {
                        TcpStream::connect_timeout(&addr(refused), Duration::from_millis(200))
                    });
                }
                // An endpoint change stamped as the EndpointSlice controller does, for
                // the network programming latency.
                round += 1;
                api.apply_yaml(&web_endpoints(round));
                sent.store(true, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // Prometheus has seen connections of every outcome change.
    within(
        Duration::from_secs(60),
        "Prometheus scraped the traffic",
        || {
            get(&node, PROMETHEUS, "/-/ready".to_owned()).is_some()
            && ["forwarded", "rejected"].iter().all(|outcome| {
                !query(
                    &node,
                    &format!(
                        "changes(nftproxy_service_connections_total{{outcome=\"{outcome}\"}}[1m]) > 0"
                    ),
                )
                .is_empty()
            })
            && !query(
                &node,
                "changes(nftproxy_unallocated_service_address_connections_total[1m]) > 0",
            )
            .is_empty()
        },
    );
    assert!(sent.load(Ordering::Relaxed));

    let text = std::fs::read_to_string(deploy("grafana-dashboard.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("JSON");
    let mut empty = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("a title");
        let mut series = 0;
        for target in panel["targets"].as_array().expect("targets") {
            // Grafana's variables as a user picks "All" over a 1 m range.
            let promql = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "1m")
                .replace("=~\"$instance\"", "=~\".+\"")
                .replace("=~\"$namespace\"", "=~\".+\"");
            assert!(!promql.contains('$'), "an unknown variable in {promql}");
            series += query(&node, &promql).len();
        }
        eprintln!("{title}: {series} series");
        if series == 0 {
            empty.push(title.to_owned());
        }
    }
    // The alerts, on the real exposition: the refused connections make the one rule
    // that covers them pending (it fires after 10 minutes), and nothing else is.
    let refusing = "ALERTS{alertname=\"NftproxyServiceRefusingConnections\",service=\"empty\"}";
    within(
        Duration::from_secs(60),
        "a pending alert for the refused connections",
        || !query(&node, refusing).is_empty(),
    );
    let alerts = query(&node, "ALERTS");
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let labels = &alerts[0]["metric"];
    assert_eq!(labels["alertstate"], "pending");
    assert_eq!(labels["outcome"], "rejected");
    assert_eq!(labels["port"], "http");
    assert_eq!(labels["instance"], METRICS);

    stop.store(true, Ordering::Relaxed);
    traffic.join().expect("every connection answered");
    for server in servers {
        let _ = server.join();
    }
    drop(prometheus);
    let _ = std::fs::remove_dir_all(&home);
    assert!(empty.is_empty(), "panels without data: {empty:?}");
}
