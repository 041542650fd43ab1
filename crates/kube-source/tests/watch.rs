//! The real kube-rs client against the in-process fake API server: initial lists gate the
//! snapshot, changes arrive, disconnects resume the watch, `410 Gone` relists, bookmarks
//! keep a resumed watch valid, and kube-proxy's label filters apply.

use std::time::Duration;

use kube::ResourceExt;
use nftproxy_kube_source::{KubeSource, client};
use nftproxy_model::{Decoded, Grouped, ProxyConfig, ServicePortState, Snapshot, build};
use nftproxy_testkit::fake_api::{FakeApi, Resource};
use serde_json::json;

const NODE: &str = "test-node";

fn service(name: &str, ip: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

fn slice(
    name: &str,
    service: &str,
    ips: &[&str],
    annotations: serde_json::Value,
) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": "default", "annotations": annotations,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect::<Vec<_>>(),
    })
}

/// A source that does not wait for the Node (these clusters have none).
async fn start(api: &FakeApi) -> KubeSource {
    start_waiting(api, Duration::ZERO).await
}

async fn start_waiting(api: &FakeApi, node_wait: Duration) -> KubeSource {
    let client = client(None, Some(&api.url())).await.expect("client");
    KubeSource::start(client, NODE, node_wait)
}

/// Polls `check` every 20 ms for up to 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

fn names<T: Grouped>(objects: &[Decoded<T>]) -> Vec<String> {
    let mut names: Vec<String> = objects.iter().map(|o| o.name().to_owned()).collect();
    names.sort();
    names
}

/// The IPv4 service ports a build of `snapshot` programs.
fn built(snapshot: &Snapshot) -> Vec<ServicePortState> {
    build(snapshot, &ProxyConfig::new(NODE)).ipv4.services
}

fn endpoint_count(source: &KubeSource) -> usize {
    source
        .snapshot()
        .map(|s| {
            built(&s)
                .iter()
                .map(|p| p.endpoints.all_reachable().len())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_snapshot_until_both_initial_lists_are_complete() {
    let api = FakeApi::start();
    api.apply(service("web", "10.96.0.10", json!({})));
    api.apply(slice("web-1", "web", &["10.0.0.1"], json!({})));
    api.refuse(Resource::EndpointSlices, true);
    let source = start(&api).await;
    // Services are listed, EndpointSlices keep failing: nothing may be programmed yet,
    // because an empty slice list would mean "no endpoints" for every Service.
    eventually("the Service list", || api.lists(Resource::Services) > 0).await;
    eventually("a refused EndpointSlice list", || {
        api.lists(Resource::EndpointSlices) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!source.is_synced());
    assert!(source.snapshot().is_none());

    api.refuse(Resource::EndpointSlices, false);
    eventually("both lists", || source.is_synced()).await;
    let snapshot = source.snapshot().expect("synced");
    assert_eq!(names(&snapshot.services), ["web"]);
    assert_eq!(names(&snapshot.endpoint_slices), ["web-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_snapshot_waits_for_a_late_node_list() {
    let api = FakeApi::start();
    api.apply(service("web", "10.96.0.10", json!({})));
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}));
    api.delay_lists(Resource::Nodes, Duration::from_millis(1_500));
    let started = std::time::Instant::now();
    let source = start_waiting(&api, Duration::from_secs(30)).await;
    eventually("both lists", || source.is_synced()).await;
    // Services and EndpointSlices are there, the Node is not yet: no snapshot, since
    // it would program the node without its addresses.
    assert!(source.snapshot().is_none());
    // `changed` wakes the caller when the Node arrives.
    while source.snapshot().is_none() {
        tokio::time::timeout(Duration::from_secs(10), source.changed())
            .await
            .expect("the Node list arrives");
    }
    assert!(started.elapsed() >= Duration::from_millis(1_500));
    let snapshot = source.snapshot().expect("ready");
    assert_eq!(snapshot.nodes.len(), 1);
    // Once the first snapshot is out, the Node going away does not hold up updates.
    api.delete("Node", "", NODE);
    eventually("the Node's deletion", || {
        source.snapshot().is_some_and(|s| s.nodes.is_empty())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_node_the_first_snapshot_comes_after_a_bounded_wait() {
    let api = FakeApi::start();
    api.apply(service("web", "10.96.0.10", json!({})));
    let started = std::time::Instant::now();
    let source = start_waiting(&api, Duration::from_millis(800)).await;
    eventually("both lists", || source.is_synced()).await;
    assert!(source.node_listed());
    assert!(source.snapshot().is_none(), "the wait is not over");
    // Nothing changes in the cluster; `changed` still wakes the caller at the deadline.
    tokio::time::timeout(Duration::from_secs(5), async {
        while source.snapshot().is_none() {
            source.changed().await;
        }
    })
    .await
    .expect("a snapshot after the wait");
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert!(source.snapshot().expect("ready").nodes.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_arrive_and_label_filters_apply() {
    let api = FakeApi::start();
    let mut web = service("web", "10.96.0.10", json!({}));
    web["metadata"]["managedFields"] = json!([{"manager": "kubectl", "operation": "Apply"}]);
    web["metadata"]["annotations"] = json!({
        "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": true}",
        "service.beta.kubernetes.io/load-balancer-source-ranges": "10.0.0.0/8",
    });
    api.apply(web);
    api.apply(service(
        "elsewhere",
        "10.96.0.11",
        json!({"service.kubernetes.io/service-proxy-name": "other-proxy"}),
    ));
    api.apply(slice("web-1", "web", &["10.0.0.1"], json!({})));
    let mut headless = slice("headless-1", "headless", &["10.0.0.9"], json!({}));
    headless["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    api.apply(headless);
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}));
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "other-node"}}));
    let source = start(&api).await;
    eventually("both lists", || source.is_synced()).await;
    // The Node arrives on its own watch, not gated by the lists.
    eventually("the Node", || {
        source.snapshot().is_some_and(|s| s.nodes.len() == 1)
    })
    .await;
    let snapshot = source.snapshot().expect("synced");
    assert_eq!(names(&snapshot.services), ["web"]);
    assert_eq!(names(&snapshot.endpoint_slices), ["web-1"]);
    let nodes: Vec<String> = snapshot.nodes.iter().map(|n| n.name_any()).collect();
    assert_eq!(nodes, [NODE]);
    // Only the decoded objects are kept, and a build reads them.
    let web = built(&snapshot);
    assert_eq!(web.len(), 1);
    assert_eq!(web[0].name.to_string(), "default/web");
    assert_eq!(web[0].endpoints.all_reachable().len(), 1);
    assert!(source.node_eligible());

    let before = source.generation();
    let changed = source.changed();
    api.apply(slice("web-1", "web", &["10.0.0.1", "10.0.0.2"], json!({})));
    tokio::time::timeout(Duration::from_secs(10), changed)
        .await
        .expect("a change notification");
    eventually("the new endpoint", || endpoint_count(&source) == 2).await;
    assert!(source.generation() > before);

    // A label that hands the Service to another proxy removes it from our view.
    api.apply(service(
        "web",
        "10.96.0.10",
        json!({"service.kubernetes.io/service-proxy-name": "other-proxy"}),
    ));
    eventually("the Service to leave", || {
        source.snapshot().is_some_and(|s| s.services.is_empty())
    })
    .await;

    // A Node being deleted is no longer eligible for load-balanced traffic.
    api.apply(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "deletionTimestamp": "2026-01-01T00:00:00Z"},
    }));
    eventually("the Node's deletion", || !source.node_eligible()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_resumes_without_relisting() {
    let api = FakeApi::start();
    api.apply(service("web", "10.96.0.10", json!({})));
    api.apply(slice("web-1", "web", &["10.0.0.1"], json!({})));
    let source = start(&api).await;
    eventually("both lists", || source.is_synced()).await;
    eventually("the watches", || api.watches(Resource::EndpointSlices) == 1).await;
    let lists = api.lists(Resource::EndpointSlices);

    api.drop_connections();
    // Changed while the client is disconnected.
    api.apply(slice(
        "web-1",
        "web",
        &["10.0.0.1", "10.0.0.2", "10.0.0.3"],
        json!({}),
    ));
    eventually("the missed change", || endpoint_count(&source) == 3).await;
    assert_eq!(
        api.lists(Resource::EndpointSlices),
        lists,
        "resumed, not relisted"
    );
    assert_eq!(names(&source.snapshot().expect("synced").services), ["web"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_relists_and_the_store_follows() {
    let api = FakeApi::start();
    api.apply(service("web", "10.96.0.10", json!({})));
    api.apply(service("db", "10.96.0.20", json!({})));
    api.apply(slice("web-1", "web", &["10.0.0.1"], json!({})));
    let source = start(&api).await;
    eventually("both lists", || source.is_synced()).await;
    eventually("the watches", || api.watches(Resource::Services) == 1).await;
    let lists = api.lists(Resource::Services);

    // The API server loses the history the client would resume from: 410 Gone.
    api.drop_connections();
    api.delete("Service", "default", "db");
    api.apply(service("cache", "10.96.0.30", json!({})));
    api.compact();
    eventually("the relisted Services", || {
        source
            .snapshot()
            .is_some_and(|s| names(&s.services) == ["cache", "web"])
    })
    .await;
    assert!(api.lists(Resource::Services) > lists, "relisted after 410");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("allowWatchBookmarks=true")),
        "bookmarks requested"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bookmark_keeps_a_quiet_watch_resumable() {
    let api = FakeApi::start();
    api.apply(service("web", "10.96.0.10", json!({})));
    api.apply(slice("web-1", "web", &["10.0.0.1"], json!({})));
    let source = start(&api).await;
    eventually("both lists", || source.is_synced()).await;
    eventually("the watches", || api.watches(Resource::EndpointSlices) == 1).await;
    // Other resources move the resourceVersion on; the slice watch sees no event of its
    // own, only the bookmark. After compaction it resumes from the bookmark's version
    // instead of relisting.
    for i in 0..5 {
        api.apply(service(
            &format!("s{i}"),
            &format!("10.96.1.{i}"),
            json!({}),
        ));
    }
    api.bookmark();
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.compact();
    let lists = api.lists(Resource::EndpointSlices);
    api.drop_connections();
    eventually("the slice watch to resume", || {
        api.watches(Resource::EndpointSlices) == 1
    })
    .await;
    api.apply(slice("web-1", "web", &["10.0.0.1", "10.0.0.2"], json!({})));
    eventually("the change", || endpoint_count(&source) == 2).await;
    assert_eq!(api.lists(Resource::EndpointSlices), lists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lists_are_paginated() {
    let api = FakeApi::start();
    for i in 0..1_200u32 {
        api.apply(service(
            &format!("svc-{i:04}"),
            &format!("10.96.{}.{}", i / 250, i % 250 + 1),
            json!({}),
        ));
    }
    let source = start(&api).await;
    eventually("both lists", || source.is_synced()).await;
    assert_eq!(source.snapshot().expect("synced").services.len(), 1_200);
    // kube-rs pages 500 at a time, as client-go does.
    assert_eq!(api.lists(Resource::Services), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_times_of_changes_after_start_are_collected_once() {
    let api = FakeApi::start();
    let old = json!({"endpoints.kubernetes.io/last-change-trigger-time": "2020-01-01T00:00:00Z"});
    api.apply(service("web", "10.96.0.10", json!({})));
    api.apply(slice("web-1", "web", &["10.0.0.1"], old));
    let source = start(&api).await;
    eventually("both lists", || source.is_synced()).await;
    assert!(
        source.take_trigger_times().is_empty(),
        "a change before start"
    );

    let now = jiff::Timestamp::now().to_string();
    let recent = json!({"endpoints.kubernetes.io/last-change-trigger-time": now});
    api.apply(slice(
        "web-1",
        "web",
        &["10.0.0.1", "10.0.0.2"],
        recent.clone(),
    ));
    eventually("the change", || endpoint_count(&source) == 2).await;
    // The same annotation again (an unrelated update) is not a second change.
    let before = source.generation();
    api.apply(slice("web-1", "web", &["10.0.0.2", "10.0.0.1"], recent));
    eventually("the update", || source.generation() > before).await;
    let times = source.take_trigger_times();
    assert_eq!(times.len(), 1);
    assert_eq!(times[0].0, nftproxy_model::IpFamily::V4);
    assert_eq!(times[0].1.to_string(), now);
}

fn service_cidr(name: &str, cidrs: &[&str]) -> serde_json::Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": name}, "spec": {"cidrs": cidrs},
    })
}

/// The CIDRs of a snapshot's ServiceCIDRs, sorted.
fn cidrs(snapshot: &Snapshot) -> Vec<String> {
    let mut cidrs: Vec<String> = snapshot
        .service_cidrs
        .iter()
        .flat_map(|c| c.spec.clone().and_then(|s| s.cidrs).unwrap_or_default())
        .collect();
    cidrs.sort();
    cidrs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_cidrs_gate_the_first_snapshot_and_follow_the_cluster() {
    let api = FakeApi::start();
    api.apply(service("web", "10.96.0.10", json!({})));
    api.apply(service_cidr("kubernetes", &["10.96.0.0/16"]));
    api.refuse(Resource::ServiceCidrs, true);
    let source = start(&api).await;
    eventually("both lists", || source.is_synced()).await;
    eventually("a refused ServiceCIDR list", || {
        api.lists(Resource::ServiceCidrs) > 0
    })
    .await;
    // Without the ranges, a sync would stop dropping unallocated ClusterIPs.
    assert!(source.snapshot().is_none());

    api.refuse(Resource::ServiceCidrs, false);
    eventually("the ServiceCIDR list", || source.snapshot().is_some()).await;
    assert_eq!(cidrs(&source.snapshot().expect("ready")), ["10.96.0.0/16"]);

    // A range added and one removed later, as `kubectl apply` / `delete` do.
    api.apply(service_cidr("extra", &["10.97.0.0/16", "fd00:97::/112"]));
    eventually("the new range", || {
        source.snapshot().is_some_and(|s| cidrs(&s).len() == 3)
    })
    .await;
    api.delete("ServiceCIDR", "", "kubernetes");
    eventually("the removed range", || {
        source
            .snapshot()
            .is_some_and(|s| cidrs(&s) == ["10.97.0.0/16", "fd00:97::/112"])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_without_service_cidrs_does_not_hold_up_the_first_snapshot() {
    let api = FakeApi::start();
    api.apply(service("web", "10.96.0.10", json!({})));
    api.unserve(Resource::ServiceCidrs, true);
    let source = start(&api).await;
    // 404 (an API server older than 1.33): the snapshot goes on without ranges.
    eventually("a snapshot", || source.snapshot().is_some()).await;
    let snapshot = source.snapshot().expect("ready");
    assert_eq!(names(&snapshot.services), ["web"]);
    assert!(snapshot.service_cidrs.is_empty());
    // Served after an upgrade: the watcher, still retrying, brings them in.
    api.apply(service_cidr("kubernetes", &["10.96.0.0/16"]));
    api.unserve(Resource::ServiceCidrs, false);
    tokio::time::timeout(Duration::from_secs(60), async {
        while source.snapshot().is_none_or(|s| s.service_cidrs.is_empty()) {
            source.changed().await;
        }
    })
    .await
    .expect("the ranges once served");
}
