//! Transaction sizes for the changes a cluster makes all day, on real rendered rules:
//! what the reconciler sends must stay proportional to what changed.

use nftproxy_nft::FakeBackend;
use nftproxy_proxier::{Reconciler, ReconcilerOptions};
use nftproxy_testkit::tables_from_yaml;

/// Service `web` with the given endpoint addresses, plus an unrelated service `db`.
fn cluster(web_endpoints: &[u8], with_web: bool) -> String {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: ns}\n\
         spec: {clusterIP: 172.30.0.2, ports: [{name: p, port: 5432}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: db-1, namespace: ns, labels: {kubernetes.io/service-name: db}}\n\
         addressType: IPv4\nports: [{name: p, port: 5432}]\nendpoints: [{addresses: [10.180.9.1]}]\n",
    );
    if with_web {
        yaml.push_str(
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\n\
             spec: {clusterIP: 172.30.0.1, ports: [{name: p, port: 80}]}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nports: [{name: p, port: 80}]\nendpoints:\n",
        );
        for e in web_endpoints {
            yaml.push_str(&format!("- addresses: [10.180.0.{e}]\n"));
        }
    }
    yaml
}

fn reconciler_at(yaml: &str) -> Reconciler<FakeBackend> {
    let mut r = Reconciler::new(
        FakeBackend::default(),
        "nftproxy",
        ReconcilerOptions::default(),
    );
    r.sync(&tables_from_yaml(yaml)).expect("initial sync");
    r
}

fn operations(r: &mut Reconciler<FakeBackend>, yaml: &str) -> usize {
    r.sync(&tables_from_yaml(yaml)).expect("sync").operations
}

#[test]
fn nothing_changed_is_zero_operations() {
    let mut r = reconciler_at(&cluster(&[1, 2], true));
    assert_eq!(operations(&mut r, &cluster(&[1, 2], true)), 0);
}

#[test]
fn an_added_endpoint_rewrites_one_chain() {
    let mut r = reconciler_at(&cluster(&[1, 2], true));
    // flush the service chain, three cascade rules, one hairpin element
    assert_eq!(operations(&mut r, &cluster(&[1, 2, 3], true)), 5);
}

#[test]
fn a_removed_endpoint_rewrites_one_chain() {
    let mut r = reconciler_at(&cluster(&[1, 2, 3], true));
    // flush the service chain, two cascade rules, one hairpin element deleted
    assert_eq!(operations(&mut r, &cluster(&[1, 2], true)), 4);
}

#[test]
fn an_added_service_adds_its_chain_and_elements() {
    let mut r = reconciler_at(&cluster(&[], false));
    // chain, two rules, cluster-ips and service-ips elements, two hairpin elements
    assert_eq!(operations(&mut r, &cluster(&[1, 2], true)), 7);
}

#[test]
fn a_removed_service_leaves_nothing_behind() {
    let mut r = reconciler_at(&cluster(&[1, 2], true));
    // flush and delete its chain, cluster-ips, service-ips and two hairpin elements
    assert_eq!(operations(&mut r, &cluster(&[], false)), 6);
    let kernel = r.applied(nftproxy_nft::Family::Ip).unwrap();
    assert!(!kernel.chains.keys().any(|c| c.contains("/web/")));
}
