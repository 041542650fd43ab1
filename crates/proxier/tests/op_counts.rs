//! Transaction sizes for the changes a cluster makes all day, on real rendered rules:
//! what the reconciler sends must stay proportional to what changed.

use nftproxy_nft::FakeBackend;
use nftproxy_proxier::{Reconciler, ReconcilerOptions};
use nftproxy_testkit::tables_from_yaml;

/// Service `web` with the given endpoint addresses, plus two unrelated services, `db`
/// with two endpoints and `cache` with five, so that the balancer has rules for one to
/// six endpoints (its span) whatever `web` has up to five.
fn cluster(web_endpoints: &[u8], with_web: bool) -> String {
    let mut yaml = String::new();
    let mut service = |name: &str, cluster_ip: &str, endpoints: &[String]| {
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
    };
    let addresses = |prefix: &str, last: &[u8]| -> Vec<String> {
        last.iter().map(|e| format!("{prefix}{e}")).collect()
    };
    service("db", "172.30.0.2", &addresses("10.180.9.", &[1, 2]));
    service(
        "cache",
        "172.30.0.3",
        &addresses("10.180.8.", &[1, 2, 3, 4, 5]),
    );
    if with_web {
        service("web", "172.30.0.1", &addresses("10.180.0.", web_endpoints));
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
fn an_added_endpoint_is_four_element_operations() {
    let mut r = reconciler_at(&cluster(&[1, 2], true));
    // web leaves the two-endpoint set for the three-endpoint one; one endpoint element,
    // one hairpin element
    assert_eq!(operations(&mut r, &cluster(&[1, 2, 3], true)), 4);
}

#[test]
fn a_removed_last_endpoint_is_four_element_operations() {
    let mut r = reconciler_at(&cluster(&[1, 2, 3], true));
    assert_eq!(operations(&mut r, &cluster(&[1, 2], true)), 4);
}

#[test]
fn a_removed_first_endpoint_is_refilled_by_the_last() {
    let mut r = reconciler_at(&cluster(&[1, 2, 3], true));
    // the count sets (2), index 0 takes the last endpoint (delete and add: 2), index 2
    // goes (1), one hairpin element (1); the middle endpoint stays where it is
    assert_eq!(operations(&mut r, &cluster(&[2, 3], true)), 6);
    // The kernel now holds the endpoints in another order than a fresh render; that
    // means the same, so the next sync of the same cluster has nothing to do.
    assert_eq!(operations(&mut r, &cluster(&[2, 3], true)), 0);
    // Index 0 holds 3 now: removing it moves 2 down, as above.
    assert_eq!(operations(&mut r, &cluster(&[2], true)), 6);
}

#[test]
fn a_count_no_destination_had_is_still_elements_only() {
    let mut r = reconciler_at(&cluster(&[1, 2, 3], true));
    // nobody had four endpoints, but the span holds its set and rule already
    assert_eq!(operations(&mut r, &cluster(&[1, 2, 3, 4], true)), 4);
}

#[test]
fn a_new_largest_count_grows_the_span_by_one_rule() {
    let seven = [1, 2, 3, 4, 5, 6, 7];
    let eight = [seven.as_slice(), &[8]].concat();
    let mut r = reconciler_at(&cluster(&seven, true));
    // as an added endpoint, plus the set and rule for nine endpoints, appended to the
    // protocol's balancer chain
    assert_eq!(operations(&mut r, &cluster(&eight, true)), 6);
    // and back: the elements (4), the rule (deleted by handle: the first eight are not
    // added again) and its set
    assert_eq!(operations(&mut r, &cluster(&seven, true)), 6);
    // The first endpoint of the largest: its slot is refilled by the last (3 instead
    // of 1), so this is the one endpoint change above six operations.
    assert_eq!(operations(&mut r, &cluster(&eight, true)), 6);
    assert_eq!(operations(&mut r, &cluster(&eight[1..], true)), 8);
}

#[test]
fn an_added_service_is_its_elements() {
    let mut r = reconciler_at(&cluster(&[], false));
    // cluster-ips and service-ips elements, the count element, two endpoint elements,
    // two hairpin elements
    assert_eq!(operations(&mut r, &cluster(&[1, 2], true)), 7);
}

#[test]
fn a_removed_service_leaves_nothing_behind() {
    let mut r = reconciler_at(&cluster(&[1, 2], true));
    assert_eq!(operations(&mut r, &cluster(&[], false)), 7);
    let kernel = r.applied(nftproxy_nft::Family::Ip).unwrap();
    let text = kernel.to_string();
    assert!(
        !text.contains("172.30.0.1 ") && !text.contains("10.180.0."),
        "{text}"
    );
}
