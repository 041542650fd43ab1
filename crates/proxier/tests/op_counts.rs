//! Transaction sizes for the changes a cluster makes all day, on real rendered rules:
//! what the reconciler sends must stay proportional to what changed.

use nftproxy_nft::FakeBackend;
use nftproxy_proxier::{Reconciler, ReconcilerOptions};
use nftproxy_testkit::tables_from_yaml;

/// Service `web` with the given endpoint addresses, plus three unrelated services, `db`
/// with two endpoints, `queue` with three and `cache` with five, so that the balancer
/// has rules for those counts whatever `web` has: all four ClusterIPs end in the same
/// four bits, so they share a shard's chain. And `spread`, in a shard of its own, with
/// sixteen endpoints whose addresses end in every four bits: every hairpin shard is in
/// use, as in any cluster of some size, so that a change's count does not depend on
/// whether its endpoint is the first of its hairpin shard.
fn cluster(web_endpoints: &[u8], with_web: bool) -> String {
    let mut yaml = String::new();
    let addresses = |prefix: &str, last: &[u8]| -> Vec<String> {
        last.iter().map(|e| format!("{prefix}{e}")).collect()
    };
    let every_shard: Vec<u8> = (0..16).collect();
    service(
        &mut yaml,
        "spread",
        "172.30.0.3",
        &addresses("10.180.5.", &every_shard),
    );
    service(
        &mut yaml,
        "db",
        "172.30.0.17",
        &addresses("10.180.9.", &[1, 2]),
    );
    service(
        &mut yaml,
        "queue",
        "172.30.0.33",
        &addresses("10.180.7.", &[1, 2, 3]),
    );
    service(
        &mut yaml,
        "cache",
        "172.30.0.49",
        &addresses("10.180.8.", &[1, 2, 3, 4, 5]),
    );
    if with_web {
        service(
            &mut yaml,
            "web",
            "172.30.0.1",
            &addresses("10.180.0.", web_endpoints),
        );
    }
    yaml
}

/// Appends a ClusterIP Service on port 80 and its EndpointSlice.
fn service(yaml: &mut String, name: &str, cluster_ip: &str, endpoints: &[String]) {
    yaml.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\n\
         spec: {{clusterIP: {cluster_ip}, ports: [{{name: p, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: ns, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: p, port: 80}}]\nendpoints:\n"
    ));
    for address in endpoints {
        yaml.push_str(&format!("- addresses: [{address}]\n"));
    }
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
fn an_added_endpoint_is_two_element_operations() {
    let mut r = reconciler_at(&cluster(&[1, 2], true));
    // one endpoint element, one hairpin element; counts 2 and 3 stay in use
    assert_eq!(operations(&mut r, &cluster(&[1, 2, 3], true)), 2);
}

#[test]
fn a_removed_last_endpoint_is_two_element_operations() {
    let mut r = reconciler_at(&cluster(&[1, 2, 3], true));
    assert_eq!(operations(&mut r, &cluster(&[1, 2], true)), 2);
}

#[test]
fn a_removed_first_endpoint_is_refilled_by_the_last() {
    let mut r = reconciler_at(&cluster(&[1, 2, 3], true));
    // index 0 takes the last endpoint (delete and add: 2), index 2 goes (1), one
    // hairpin element (1); the middle endpoint stays where it is
    assert_eq!(operations(&mut r, &cluster(&[2, 3], true)), 4);
    // The kernel now holds the endpoints in another order than a fresh render; that
    // means the same, so the next sync of the same cluster has nothing to do.
    assert_eq!(operations(&mut r, &cluster(&[2, 3], true)), 0);
    // Index 0 holds 3 now: removing it moves 2 down, as above; nobody else has one
    // endpoint, so the rule for one endpoint comes too.
    assert_eq!(operations(&mut r, &cluster(&[2], true)), 5);
}

#[test]
fn a_count_no_destination_had_adds_its_rule() {
    let mut r = reconciler_at(&cluster(&[1, 2, 3], true));
    // the elements (2) and the rule for four endpoints, inserted between the rules for
    // five and three; the rule for three stays, queue still has three
    assert_eq!(operations(&mut r, &cluster(&[1, 2, 3, 4], true)), 3);
    // and back: the elements, and the rule for four deleted by handle
    assert_eq!(operations(&mut r, &cluster(&[1, 2, 3], true)), 3);
}

#[test]
fn no_one_endpoint_change_is_above_six_operations() {
    let seven = [1, 2, 3, 4, 5, 6, 7];
    let eight = [seven.as_slice(), &[8]].concat();
    let mut r = reconciler_at(&cluster(&seven, true));
    // the elements (2), the rule for eight endpoints added and the one for seven gone
    assert_eq!(operations(&mut r, &cluster(&eight, true)), 4);
    assert_eq!(operations(&mut r, &cluster(&seven, true)), 4);
    assert_eq!(operations(&mut r, &cluster(&eight, true)), 4);
    // The first endpoint: its slot is refilled by the last (3 instead of 1), so this
    // is the largest one endpoint change.
    assert_eq!(operations(&mut r, &cluster(&eight[1..], true)), 6);
}

#[test]
fn an_added_service_is_its_elements() {
    let mut r = reconciler_at(&cluster(&[], false));
    // cluster-ips and load-balance elements, two endpoint elements, two hairpin
    // elements; db has two endpoints too, so the rule is there
    assert_eq!(operations(&mut r, &cluster(&[1, 2], true)), 6);
}

#[test]
fn a_removed_service_leaves_nothing_behind() {
    let mut r = reconciler_at(&cluster(&[1, 2], true));
    assert_eq!(operations(&mut r, &cluster(&[], false)), 6);
    let kernel = r.applied(nftproxy_nft::Family::Ip).unwrap();
    let text = kernel.to_string();
    assert!(
        !text.contains("172.30.0.1 ") && !text.contains("10.180.0."),
        "{text}"
    );
}

#[test]
fn a_service_alone_in_its_shard_brings_and_takes_the_shard() {
    let mut r = reconciler_at(&cluster(&[1, 2], true));
    let mut with_solo = cluster(&[1, 2], true);
    // 172.30.0.2 ends in other bits than the rest
    service(&mut with_solo, "solo", "172.30.0.2", &["10.180.6.1".into()]);
    // cluster-ips, load-balance, endpoint and hairpin elements (4); the shard's map,
    // its chain, the rule for one endpoint, and the shard's element in the balancer's
    // verdict map (4)
    assert_eq!(operations(&mut r, &with_solo), 8);
    // the same elements, but the endpoint goes with its map, and the rule with the
    // chain's flush
    assert_eq!(operations(&mut r, &cluster(&[1, 2], true)), 7);
    let text = r.applied(nftproxy_nft::Family::Ip).unwrap().to_string();
    assert!(
        !text.contains("load-balance-tcp-2 ")
            && !text.contains("tcp-endpoints-2 ")
            && !text.contains("10.180.6."),
        "{text}"
    );
}
