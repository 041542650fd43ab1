//! The deployment manifests (`hack/deploy/nftproxy.yaml`) are what they claim: every
//! object decodes as its Kubernetes type, the RBAC rules grant only list and watch of
//! what the watchers read, the DaemonSet passes the flags and mounts the files the
//! binary expects, and the ConfigMap's KubeProxyConfiguration and kubeconfig work: run
//! against the fake API server, nftproxy reads its address and token from them.

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use nftproxy_testkit::fake_api::FakeApi;
use nftproxy_testkit::{repo_root, run_with_input};
use serde_json::Value;

fn manifests() -> Vec<Value> {
    let text = std::fs::read_to_string(repo_root().join("hack/deploy/nftproxy.yaml"))
        .expect("hack/deploy/nftproxy.yaml");
    serde_saphyr::from_multiple(&text).expect("valid YAML")
}

fn object<T: serde::de::DeserializeOwned>(documents: &[Value], kind: &str) -> T {
    let document = documents
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("a {kind}"));
    serde_json::from_value(document.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

#[test]
fn the_manifests_decode_and_hang_together() {
    let documents = manifests();
    assert_eq!(documents.len(), 5);
    let account: ServiceAccount = object(&documents, "ServiceAccount");
    let role: ClusterRole = object(&documents, "ClusterRole");
    let binding: ClusterRoleBinding = object(&documents, "ClusterRoleBinding");
    let config: ConfigMap = object(&documents, "ConfigMap");
    let daemon_set: DaemonSet = object(&documents, "DaemonSet");

    // Read-only, and only what the watchers read.
    let mut granted = Vec::new();
    for rule in role.rules.expect("rules") {
        assert_eq!(rule.verbs, ["list", "watch"]);
        for resource in rule.resources.expect("resources") {
            granted.push(resource);
        }
    }
    granted.sort();
    assert_eq!(granted, ["endpointslices", "nodes", "services"]);
    assert_eq!(binding.role_ref.name, role.metadata.name.expect("name"));
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!(Some(&subject.name), account.metadata.name.as_ref());

    let pod = daemon_set.spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name, account.metadata.name);
    let container = &pod.containers[0];
    let command = container.command.clone().expect("command");
    assert!(command.contains(&"--config=/var/lib/nftproxy/config.conf".to_owned()));
    assert!(command.contains(&"--hostname-override=$(NODE_NAME)".to_owned()));
    let node_name = container
        .env
        .as_ref()
        .expect("env")
        .iter()
        .find(|e| e.name == "NODE_NAME");
    assert_eq!(
        node_name
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    let mount = &container.volume_mounts.as_ref().expect("mounts")[0];
    assert_eq!(mount.mount_path, "/var/lib/nftproxy");
    let capabilities = container
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .expect("capabilities");
    assert_eq!(
        capabilities.add.as_deref(),
        Some(&["NET_ADMIN".to_owned()][..])
    );
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let data = config.data.expect("data");
    assert!(data.contains_key("config.conf") && data.contains_key("kubeconfig.conf"));
    // The takeover is one step: kube-proxy's leftovers go once nftproxy has synced.
    let file = nftproxy_model::KubeProxyConfiguration::parse(&data["config.conf"])
        .expect("config.conf parses");
    let mut daemon = nftproxy_model::DaemonConfig::default();
    daemon.apply_file(&file).expect("config.conf applies");
    assert!(daemon.cleanup_kube_proxy);
    assert_eq!(file.service_counters, Some(true));
    assert!(
        file.unused_fields().is_empty(),
        "{:?}",
        file.unused_fields()
    );
}

/// The ConfigMap's files, with the placeholders filled in for the fake API server and
/// the ServiceAccount paths moved into `dir`.
fn write_config(dir: &Path, server: &str) -> std::path::PathBuf {
    let config: ConfigMap = object(&manifests(), "ConfigMap");
    let data = config.data.expect("data");
    let token = dir.join("token");
    std::fs::write(&token, "test-token").expect("token written");
    let kubeconfig = data["kubeconfig.conf"]
        .replace("https://CONTROL_PLANE_ENDPOINT", server)
        .replace(
            "/var/run/secrets/kubernetes.io/serviceaccount/token",
            &token.display().to_string(),
        )
        .lines()
        .filter(|l| !l.contains("certificate-authority"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("kubeconfig.conf"), kubeconfig).expect("kubeconfig written");
    let conf = data["config.conf"]
        .replace("CLUSTER_CIDR", "10.244.0.0/16")
        .replace("/var/lib/nftproxy", &dir.display().to_string());
    let path = dir.join("config.conf");
    std::fs::write(&path, conf).expect("config written");
    path
}

#[test]
fn the_configmap_points_nftproxy_at_the_api_server_with_its_token() {
    let api = FakeApi::start();
    for file in ["redis.yaml", "counter-nodeport.yaml"] {
        let text = std::fs::read_to_string(repo_root().join("hack/examples/seed").join(file))
            .expect("seed example");
        api.apply_yaml(&text);
    }
    // This node's Node, which the first sync waits for.
    api.apply_yaml("apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n");
    let dir = std::env::temp_dir().join(format!("nftproxy-deploy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = write_config(&dir, &api.url());
    let output = run_with_input(
        Command::new(env!("CARGO_BIN_EXE_nftproxy"))
            .arg("--dry-run")
            .arg("--config")
            .arg(&config)
            .args([
                "--hostname-override",
                "node-a",
                "--node-ip",
                "192.168.50.10",
            ])
            .env_remove("RUST_LOG"),
        "",
    );
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // Every field of the shipped configuration is one nftproxy reads.
    assert!(!stderr.contains("is not used"), "{stderr}");
    let ruleset = String::from_utf8_lossy(&output.stdout);
    assert!(ruleset.contains("10.103.50.102"), "{ruleset}");
    assert!(ruleset.contains("31000"), "{ruleset}");
    let authorizations = api.authorizations();
    assert!(!authorizations.is_empty());
    assert!(
        authorizations
            .iter()
            .all(|a| a.as_deref() == Some("Bearer test-token")),
        "{authorizations:?}"
    );
}

/// Every string under an `expr` key, wherever it sits in the dashboard.
fn queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(fields) => {
            for (key, field) in fields {
                match (key.as_str(), field) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => queries(field, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| queries(item, out)),
        _ => {}
    }
}

/// The metric names a PromQL query reads: its words that start like ours or upstream's,
/// a histogram's `_bucket`/`_count`/`_sum` series taken as the histogram.
fn metrics_read(query: &str, known: &[String]) -> Vec<String> {
    query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("kubeproxy_") || word.starts_with("nftproxy_"))
        .map(|word| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .filter_map(|suffix| word.strip_suffix(suffix))
                .find(|base| known.iter().any(|k| k == base))
                .unwrap_or(word)
                .to_owned()
        })
        .collect()
}

#[test]
fn every_dashboard_query_reads_metrics_nftproxy_exports() {
    let text = std::fs::read_to_string(repo_root().join("hack/deploy/grafana-dashboard.json"))
        .expect("hack/deploy/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(dashboard["uid"], "nftproxy");
    let known = nftproxy_proxier::metrics::Metrics::new().names();
    let mut all = Vec::new();
    queries(&dashboard, &mut all);
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    for panel in panels {
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has queries");
        assert!(!targets.is_empty(), "{}", panel["title"]);
    }
    let mut read = Vec::new();
    for query in &all {
        let names = metrics_read(query, &known);
        assert!(!names.is_empty(), "a query that reads no metric: {query}");
        for name in names {
            assert!(known.contains(&name), "{name} is not exported (in {query})");
            read.push(name);
        }
    }
    // What the dashboard is for: syncs, their rate, programming latency, failures, and
    // connections by Service, outcome and endpoint.
    for wanted in [
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_network_programming_duration_seconds",
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        "nftproxy_service_connections_total",
        "nftproxy_endpoint_connections_total",
    ] {
        assert!(read.iter().any(|r| r == wanted), "no panel reads {wanted}");
    }
    // A misspelt name is caught: the check is not vacuous.
    assert!(!known.contains(&"kubeproxy_sync_proxy_rules_duration".to_owned()));
}
