//! The install (`hack/deploy/`, a kustomize base and two overlays) is what it claims,
//! rendered by a real kubectl as the README tells an admin to: every object decodes as
//! its Kubernetes type, the RBAC rules grant only list and watch of what the watchers
//! read, the DaemonSet passes the flags and mounts the files the binary expects, the
//! overlays differ only where they say, and the README's own kustomization for a cluster
//! renders with its values. (`tests/image.rs` runs the rendered DaemonSet's container.)

mod common;

use common::kustomize::{object, render, render_readme_kustomization};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use nftproxy_testkit::repo_root;
use serde_json::Value;

fn overlay(name: &str) -> std::path::PathBuf {
    repo_root().join("hack/deploy/overlays").join(name)
}

fn pod(daemon_set: &DaemonSet) -> PodSpec {
    daemon_set.spec.template.spec.clone().expect("pod spec")
}

fn container(daemon_set: &DaemonSet) -> Container {
    pod(daemon_set).containers[0].clone()
}

#[test]
fn the_overlays_render_and_hang_together() {
    let test = "the_overlays_render_and_hang_together";
    let Some(replace) = render(test, &overlay("replace-kube-proxy")) else {
        return;
    };
    let beside = render(test, &overlay("beside-kube-proxy")).expect("rendered");
    assert_eq!(
        replace.len(),
        6,
        "ServiceAccount, ClusterRole(Binding), 2 ConfigMaps, DaemonSet"
    );
    let account: ServiceAccount = object(&replace, "ServiceAccount", "nftproxy");
    let role: ClusterRole = object(&replace, "ClusterRole", "nftproxy");
    let binding: ClusterRoleBinding = object(&replace, "ClusterRoleBinding", "nftproxy");
    let config: ConfigMap = object(&replace, "ConfigMap", "nftproxy");
    let cluster: ConfigMap = object(&replace, "ConfigMap", "nftproxy-cluster");
    let daemon_set: DaemonSet = object(&replace, "DaemonSet", "nftproxy");

    // Read-only, and only what the watchers read.
    let mut granted = Vec::new();
    for rule in role.rules.expect("rules") {
        assert_eq!(rule.verbs, ["list", "watch"]);
        granted.extend(rule.resources.expect("resources"));
    }
    granted.sort();
    assert_eq!(
        granted,
        ["endpointslices", "nodes", "servicecidrs", "services"]
    );
    assert_eq!(binding.role_ref.name, role.metadata.name.expect("name"));
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
    assert_eq!(subject.namespace, account.metadata.namespace);

    let pod_spec = pod(&daemon_set);
    assert_eq!(pod_spec.host_network, Some(true));
    assert_eq!(pod_spec.service_account_name, account.metadata.name);
    let container = container(&daemon_set);
    assert_eq!(
        container.image.as_deref(),
        Some(format!("nftproxy:{}", env!("CARGO_PKG_VERSION")).as_str()),
        "the base's image tag is the version hack/image.sh builds"
    );
    let command = container.command.clone().expect("command");
    for flag in [
        "--config=/var/lib/nftproxy/config.conf",
        "--hostname-override=$(NODE_NAME)",
        "--cluster-cidr=$(CLUSTER_CIDR)",
        "--cleanup-kube-proxy",
    ] {
        assert!(command.contains(&flag.to_owned()), "{flag} in {command:?}");
    }
    // Every `$(VAR)` the command names is set: from the downward API or nftproxy-cluster.
    let cluster_data = cluster.data.expect("data");
    let from_config_map = container.env_from.as_ref().expect("envFrom")[0]
        .config_map_ref
        .as_ref()
        .map(|r| r.name.clone());
    assert_eq!(from_config_map, cluster.metadata.name);
    for key in [
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
        "CLUSTER_CIDR",
    ] {
        assert!(cluster_data.contains_key(key), "{key}");
    }
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
    let volume = &pod_spec.volumes.as_ref().expect("volumes")[0];
    assert_eq!(
        volume.config_map.as_ref().map(|c| c.name.clone()),
        config.metadata.name,
        "the DaemonSet mounts the generated ConfigMap (its name carries the content's hash)"
    );
    let mount = &container.volume_mounts.as_ref().expect("mounts")[0];
    assert_eq!(mount.mount_path, "/var/lib/nftproxy");
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(
        capabilities.add.as_deref(),
        Some(&["NET_ADMIN".to_owned()][..])
    );
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(security.read_only_root_filesystem, Some(true));

    // The conntrack settings: a privileged init container, with the same configuration.
    let init = &pod_spec.init_containers.as_ref().expect("initContainers")[0];
    assert_eq!(
        init.command
            .as_deref()
            .and_then(<[String]>::last)
            .map(String::as_str),
        Some("--init-only")
    );
    assert!(
        init.command
            .as_ref()
            .expect("command")
            .contains(&command[1])
    );
    assert_eq!(
        init.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    assert_eq!(init.volume_mounts, container.volume_mounts);
    assert_eq!(init.image, container.image);

    let data = config.data.expect("data");
    let file = nftproxy_model::KubeProxyConfiguration::parse(&data["config.conf"])
        .expect("config.conf parses");
    assert!(
        file.unused_fields().is_empty(),
        "{:?}",
        file.unused_fields()
    );
    assert_eq!(file.service_counters, Some(true));
    let mut daemon = nftproxy_model::DaemonConfig::default();
    daemon.apply_file(&file).expect("config.conf applies");
    assert_eq!(
        daemon.conntrack,
        nftproxy_model::config::ConntrackSettings::default(),
        "kube-proxy's defaults, written out"
    );

    // The look first differs in three ways only: the pod's own network namespace,
    // nothing of kube-proxy's removed, and no conntrack setting touched.
    let beside_set: DaemonSet = object(&beside, "DaemonSet", "nftproxy");
    assert_eq!(pod(&beside_set).host_network, Some(false));
    assert_eq!(pod(&beside_set).init_containers, None);
    let beside_command = container_command(&beside_set);
    let mut expected = command.clone();
    expected.retain(|flag| flag != "--cleanup-kube-proxy");
    // With every conntrack setting at 0, the daemon leaves them all to the kernel.
    expected.extend(
        [
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0s",
            "--conntrack-tcp-timeout-close-wait=0s",
        ]
        .map(str::to_owned),
    );
    assert_eq!(beside_command, expected);
    let strip = |mut documents: Vec<Value>| {
        for d in &mut documents {
            if d["kind"] == "DaemonSet" {
                d["spec"]["template"]["spec"]["hostNetwork"] = Value::Null;
                d["spec"]["template"]["spec"]["initContainers"] = Value::Null;
                d["spec"]["template"]["spec"]["containers"][0]["command"] = Value::Null;
            }
        }
        documents
    };
    assert_eq!(strip(replace), strip(beside));
}

fn container_command(daemon_set: &DaemonSet) -> Vec<String> {
    container(daemon_set).command.expect("command")
}

#[test]
fn the_readmes_kustomization_sets_the_clusters_values() {
    let test = "the_readmes_kustomization_sets_the_clusters_values";
    let Some(rendered) = render_readme_kustomization(test, &[]) else {
        return;
    };
    let daemon_set: DaemonSet = object(&rendered, "DaemonSet", "nftproxy");
    assert_eq!(
        container(&daemon_set).image.as_deref(),
        Some(format!("registry.example/nftproxy:{}", env!("CARGO_PKG_VERSION")).as_str())
    );
    let cluster: ConfigMap = object(&rendered, "ConfigMap", "nftproxy-cluster");
    let data = cluster.data.expect("data");
    assert_eq!(data["KUBERNETES_SERVICE_HOST"], "10.0.0.10");
    assert_eq!(data["CLUSTER_CIDR"], "10.244.0.0/16");
    // The DaemonSet follows the merged ConfigMap's new name.
    let env_from = container(&daemon_set).env_from.expect("envFrom");
    assert_eq!(
        env_from[0].config_map_ref.as_ref().map(|r| r.name.clone()),
        cluster.metadata.name
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
