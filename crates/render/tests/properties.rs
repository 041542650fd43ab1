//! Property tests over the whole Kubernetes-object → ruleset path (manifest decoding,
//! validation, endpoint selection, rendering): for generated clusters full of edge and
//! invalid values, and for randomly damaged golden manifests, nothing panics, the output
//! does not depend on input order or on the run, and the kernel accepts it (`nft -c`, in
//! a network namespace of its own). Kept up to date change by change, the tables and
//! what the reconciler sends match the whole computation.

use std::process::Command;

use nftproxy_model::config::parse_cidr_list;

use nftproxy_model::{Builder, DetectLocalMode, NodePortAddress, ProxyConfig, Snapshot, build};
use nftproxy_nft::{Table, diff, diff_scoped};
use nftproxy_render::{Renderer, render_all};
use nftproxy_testkit::{golden_cases, kernel_available, run_with_input};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};

/// Values where real clusters and broken ones differ: mostly valid, some at the edge,
/// some invalid, so that most generated Services survive validation and the invalid
/// ones sit beside them.
const NAMES: (&[&str], &[&str]) = (
    &["a", "web", "db-0"],
    &["x.y", "Bad", "", "日本", "a\"}; drop"],
);
const NAMESPACES: (&[&str], &[&str]) = (&["ns1", "kube-system"], &["", "NS"]);
const CLUSTER_IPS: (&[&str], &[&str]) = (
    &[
        "10.96.0.1",
        "10.96.0.2",
        "10.96.0.3",
        "10.96.0.4",
        "fd00:96::1",
        "fd00:96::2",
    ],
    &[
        "1.2.3",
        "10.96.0.01",
        "300.1.1.1",
        "None",
        "",
        "host",
        "::ffff:10.96.0.1",
    ],
);
const EXTERNAL_IPS: (&[&str], &[&str]) = (
    &["192.168.50.200", "203.0.113.7", "fd00:50::200"],
    &["300.1.1.1", "1.2.3", "fd00::/64"],
);
const NODE_IPS: (&[&str], &[&str]) = (&["192.168.0.2", "192.168.0.3", "fd00:50::2"], &["x"]);
const SOURCE_RANGES: (&[&str], &[&str]) = (&["203.0.113.0/24", "10.0.0.0/8"], &["1.2.3.4/40", "x"]);
const PORT_NAMES: (&[&str], &[&str]) = (
    &["http", "dns", "metrics"],
    &["", "HTTP", "sixteen-chars-xx", "80"],
);
const PORTS: (&[i64], &[i64]) = (&[80, 53, 443, 1, 65_535], &[0, -1, 65_536, 4_294_967_296]);
const PROTOCOLS: (&[&str], &[&str]) = (&["TCP", "UDP", "SCTP"], &["tcp", "ICMP"]);
const NODES: &[&str] = &["node-a", "node-b"];
const ZONES: &[&str] = &["zone-a", "zone-b"];

/// Nine in ten from the valid values, one in ten from the others.
fn mostly<T: std::fmt::Debug + Clone + 'static>(
    (valid, invalid): (&'static [T], &'static [T]),
) -> impl Strategy<Value = T> {
    prop_oneof![9 => select(valid), 1 => select(invalid)]
}

/// Usually none, sometimes one or two: for lists most Services leave empty.
fn few(
    values: (&'static [&'static str], &'static [&'static str]),
) -> impl Strategy<Value = Vec<&'static str>> {
    prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(mostly(values), 1..3)]
}

/// Absent three times in ten: every optional field is also tried unset.
fn maybe<T: std::fmt::Debug + Clone + 'static>(
    values: &'static [T],
) -> impl Strategy<Value = Option<T>> {
    prop::option::weighted(0.7, select(values))
}

fn service_port() -> impl Strategy<Value = Value> {
    (
        mostly(PORT_NAMES),
        mostly(PORTS),
        prop::option::weighted(0.7, mostly(PROTOCOLS)),
        prop::option::of(prop_oneof![30_000i64..30_010, Just(0), Just(70_000)]),
        prop::bool::weighted(0.02),
    )
        .prop_map(|(name, port, protocol, node_port, wrong_type)| {
            if wrong_type {
                return json!({"name": name, "port": format!("{port}")});
            }
            json!({"name": name, "port": port, "protocol": protocol, "nodePort": node_port})
        })
}

fn service() -> impl Strategy<Value = Value> {
    let optional = |values| prop::option::weighted(0.5, mostly(values));
    let policies: (&[&str], &[&str]) = (&["Cluster", "Local"], &["Sideways"]);
    (
        (mostly(NAMES), mostly(NAMESPACES)),
        optional((&["ClusterIP", "NodePort", "LoadBalancer"], &["ExternalName", "Magic"])),
        prop_oneof![
            16 => mostly(CLUSTER_IPS).prop_map(|ip| vec![ip]),
            2 => (select(&CLUSTER_IPS.0[..4]), select(&CLUSTER_IPS.0[4..])).prop_map(|(a, b)| vec![a, b]),
            1 => prop::collection::vec(mostly(CLUSTER_IPS), 0..4),
        ],
        prop::collection::vec(service_port(), 1..3),
        (optional(policies), optional(policies)),
        (
            optional((&["None", "ClientIP"], &["Sticky"])),
            prop::option::weighted(0.5, mostly((&[1i64, 10_800], &[0, 86_401]))),
        ),
        few(EXTERNAL_IPS),
        few(EXTERNAL_IPS),
        few(SOURCE_RANGES),
        prop::option::weighted(0.3, mostly((&[32_000i64], &[0, -5]))),
    )
        .prop_map(
            |(
                (name, namespace),
                service_type,
                cluster_ips,
                ports,
                (etp, itp),
                (affinity, timeout),
                external_ips,
                ingress,
                ranges,
                health_check_node_port,
            )| {
                json!({
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": {
                        "type": service_type,
                        "clusterIPs": cluster_ips,
                        "ports": ports,
                        "externalTrafficPolicy": etp,
                        "internalTrafficPolicy": itp,
                        "sessionAffinity": affinity,
                        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}},
                        "externalIPs": external_ips,
                        "loadBalancerSourceRanges": ranges,
                        "healthCheckNodePort": health_check_node_port,
                    },
                    "status": {"loadBalancer": {"ingress":
                        ingress.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}},
                })
            },
        )
}

/// Endpoint addresses by slice family: mostly of that family, sometimes not.
const V4_ENDPOINTS: (&[&str], &[&str]) = (
    &["10.244.1.5", "10.244.2.6", "10.244.1.7", "10.244.2.8"],
    &["fd00:10::5", "1.2.3", ""],
);
const V6_ENDPOINTS: (&[&str], &[&str]) = (
    &["fd00:10::5", "fd00:10::6", "fd00:10::7"],
    &["10.244.1.5", "fe80::1%eth0"],
);

fn endpoint(
    addresses: (&'static [&'static str], &'static [&'static str]),
) -> impl Strategy<Value = Value> {
    (
        mostly(addresses),
        (
            maybe(&[true, false]),
            maybe(&[true, false]),
            maybe(&[true, false]),
        ),
        maybe(NODES),
        maybe(ZONES),
    )
        .prop_map(|(ip, (ready, serving, terminating), node, zone)| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "nodeName": node,
                "hints": zone.map(|z| json!({"forZones": [{"name": z}]})),
            })
        })
}

/// A slice for one of `services` (so that endpoints meet their Service often enough to
/// reach the rules), copying its port names and protocols, with the usual damage.
fn endpoint_slice(services: &[Value]) -> impl Strategy<Value = Value> + use<> {
    let target = |service: &Value| {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let ports: Vec<(String, Value)> = service["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| (text(&p["name"]), p["protocol"].clone()))
            .collect();
        let family = match service["spec"]["clusterIPs"][0].as_str() {
            Some(ip) if ip.contains(':') => "IPv6",
            _ => "IPv4",
        };
        (
            text(&service["metadata"]["name"]),
            text(&service["metadata"]["namespace"]),
            ports,
            family,
        )
    };
    let mut targets: Vec<_> = services.iter().map(target).collect();
    targets.push((
        "a".to_owned(),
        "ns1".to_owned(),
        vec![("http".to_owned(), Value::Null)],
        "IPv4",
    ));
    (
        select(targets),
        0u8..12,
        prop::option::weighted(0.1, mostly((&["IPv4", "IPv6"], &["FQDN", "IPv5"]))),
        prop::collection::vec(mostly(PORTS), 3),
        prop::option::weighted(0.1, mostly(PORT_NAMES)),
        prop::collection::vec(endpoint(V4_ENDPOINTS), 0..6),
        prop::collection::vec(endpoint(V6_ENDPOINTS), 0..6),
    )
        .prop_map(
            |((service, namespace, ports, family), index, address_type, numbers, renamed, v4, v6)| {
                let address_type = address_type.unwrap_or(family);
                let ports: Vec<Value> = ports
                    .into_iter()
                    .zip(numbers)
                    .map(|((name, protocol), port)| {
                        json!({"name": renamed.unwrap_or(&name), "port": port, "protocol": protocol})
                    })
                    .collect();
                json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": format!("{service}-{index}"),
                        "namespace": namespace,
                        "labels": {"kubernetes.io/service-name": service},
                    },
                    "addressType": address_type,
                    "ports": ports,
                    "endpoints": if address_type == "IPv6" { v6 } else { v4 },
                })
            },
        )
}

fn node() -> impl Strategy<Value = Value> {
    (select(NODES), maybe(ZONES), prop::collection::vec(mostly(NODE_IPS), 0..3)).prop_map(
        |(name, zone, addresses)| {
            json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": zone.map(|z| json!({"topology.kubernetes.io/zone": z}))},
                "spec": {"podCIDRs": ["10.244.1.0/24"]},
                "status": {"addresses": addresses.iter()
                    .map(|a| json!({"type": "InternalIP", "address": a})).collect::<Vec<_>>()},
            })
        },
    )
}

fn config() -> impl Strategy<Value = ProxyConfig> {
    (
        any::<bool>(),
        any::<bool>(),
        0u8..4,
        prop::option::of(select(&["0.0.0.0/0", "192.168.0.0/16"])),
    )
        .prop_map(|(masquerade_all, explicit_node_ip, detect, node_ports)| {
            let mut config = ProxyConfig::new("node-a");
            config.masquerade_all = masquerade_all;
            if explicit_node_ip {
                config.node_ips = vec!["192.168.0.2".parse().expect("literal")];
            }
            config.cluster_cidrs =
                parse_cidr_list("clusterCIDR", "10.244.0.0/16,fd00:10::/64").expect("literal");
            config.detect_local = match detect {
                0 => DetectLocalMode::ClusterCidr,
                1 => DetectLocalMode::NodeCidr,
                2 => DetectLocalMode::BridgeInterface("cbr0".to_owned()),
                _ => DetectLocalMode::InterfaceNamePrefix("veth".to_owned()),
            };
            if let Some(cidr) = node_ports {
                config.node_port_addresses =
                    vec![NodePortAddress::Cidr(cidr.parse().expect("literal"))];
            }
            config
        })
}

/// The `nft -f` text of every table (and the warnings) for `text` under `config`.
fn ruleset(text: &[u8], config: &ProxyConfig) -> (String, Vec<String>) {
    let mut snapshot = Snapshot::default();
    let report = snapshot.add_manifest_bytes("fuzz.yaml", text);
    let built = build(&snapshot, config);
    let mut warnings: Vec<String> = report
        .diagnostics
        .iter()
        .chain(&built.diagnostics)
        .map(ToString::to_string)
        .chain(report.errors.iter().map(ToString::to_string))
        .collect();
    warnings.sort();
    let tables: Vec<String> = render_all(&built).iter().map(ToString::to_string).collect();
    (tables.join("\n"), warnings)
}

/// Whether the kernel accepts a ruleset, checked in a network namespace of its own.
fn nft_check(ruleset: &str) -> Result<(), String> {
    let output = run_with_input(
        Command::new("unshare").args(["--net", "nft", "-c", "-f", "-"]),
        ruleset,
    );
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn as_list(items: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
        .expect("serialisable")
}

/// Services and EndpointSlices of a generated cluster, each decoded once: the same
/// object in two snapshots is the same allocation, as in a watch cache.
fn objects(items: &[Value]) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let _ = snapshot.add_manifest_bytes("objects.yaml", &as_list(items));
    snapshot
}

/// A cluster drawn twice (`a` and `b`): each step takes, for every object position, a's
/// object, b's, nothing, a fresh copy of a's (as a re-read file gives), or a's object
/// twice (nothing stops a source from listing one object twice).
fn steps() -> impl Strategy<Value = (Vec<Value>, Vec<Value>, Vec<Value>, Vec<Vec<u8>>)> {
    // b's odd Services get names of their own, so that a step also adds Services beside
    // a's (and takes addresses a's still hold) instead of only replacing them.
    let cluster = |suffix: &'static str| {
        prop::collection::vec(service(), 0..8).prop_flat_map(move |mut services| {
            for service in services.iter_mut().skip(1).step_by(2) {
                let name = format!(
                    "{}{suffix}",
                    service["metadata"]["name"].as_str().unwrap_or_default()
                );
                service["metadata"]["name"] = Value::String(name);
            }
            let slices = prop::collection::vec(endpoint_slice(&services), 0..10);
            (Just(services), slices).prop_map(|(mut services, slices)| {
                services.extend(slices);
                services
            })
        })
    };
    (
        cluster(""),
        cluster("-b"),
        prop::collection::vec(node(), 0..2),
        prop::collection::vec(prop::collection::vec(0u8..5, 20), 1..6),
    )
}

fn pick<T: Clone>(a: &[T], b: &[T], fresh: &[T], choices: &[u8]) -> Vec<T> {
    let positions = a.len().max(b.len());
    (0..positions)
        .flat_map(|i| {
            let one = |side: &[T]| side.get(i).cloned().into_iter().collect::<Vec<T>>();
            match choices.get(i % choices.len()).copied().unwrap_or(0) {
                0 => one(a),
                1 => one(b),
                2 => Vec::new(),
                3 => one(fresh),
                _ => [one(a), one(a)].concat(),
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn tables_kept_up_to_date_equal_tables_made_whole(
        (a, b, nodes, choices) in steps(),
        config in config(),
    ) {
        let (a, b, fresh) = (objects(&a), objects(&b), objects(&a));
        let mut builder = Builder::new(config.clone());
        let mut renderer = Renderer::new();
        let mut kernel: Vec<Table> = Vec::new();
        for (step, choice) in choices.iter().enumerate() {
            let mut snapshot = Snapshot {
                services: pick(&a.services, &b.services, &fresh.services, choice),
                endpoint_slices: pick(&a.endpoint_slices, &b.endpoint_slices, &fresh.endpoint_slices, &choice[3..]),
                ..Snapshot::default()
            };
            // The Node comes and goes every other step: a change of the node itself.
            if step % 2 == 1 {
                let _ = snapshot.add_manifest_bytes("nodes.yaml", &as_list(&nodes));
            }
            let delta = builder.update(&snapshot);
            let scopes = renderer.update(builder.build(), &delta);
            // What the reconciler sends for these scopes brings the old tables to ones that
            // mean the new (the kernel keeps what it got: values moved between slots stay
            // there for the next step).
            let mut next = Vec::new();
            for table in renderer.tables() {
                let old = kernel.iter().find(|t| t.family == table.family);
                let tx = match (old, scopes.get(table.family)) {
                    (Some(old), Some(scope)) => diff_scoped(old, table, scope),
                    _ => diff(old, table),
                };
                let after = tx
                    .apply_to(old.cloned())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .ok_or_else(|| TestCaseError::fail("the table was deleted"))?;
                prop_assert_eq!(after.slots_in_order(), table.slots_in_order(), "{}", tx);
                // And so does the reconciler's bookkeeping, which looks at the scope alone.
                if let (Some(old), Some(scope)) = (old, scopes.get(table.family)) {
                    let mut applied = old.clone();
                    scope.apply(&mut applied, &tx).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(&applied, &after, "scoped: {}", tx);
                }
                next.push(after);
            }
            kernel = next;

            let whole = build(&snapshot, &config);
            prop_assert_eq!(&builder.build().ipv4, &whole.ipv4);
            prop_assert_eq!(&builder.build().ipv6, &whole.ipv6);
            prop_assert_eq!(&builder.build().diagnostics, &whole.diagnostics);
            let tables = render_all(&whole);
            prop_assert_eq!(renderer.tables(), &tables[..]);
        }
    }

    #[test]
    fn generated_clusters_render_deterministically_and_load(
        (services, slices) in prop::collection::vec(service(), 0..10).prop_map(|mut services| {
            // Mostly distinct names; every third Service keeps its drawn name, so that
            // duplicates still occur.
            for (index, service) in services.iter_mut().enumerate().filter(|(i, _)| i % 3 != 0) {
                let name = format!("{}-{index}", service["metadata"]["name"].as_str().unwrap_or_default());
                service["metadata"]["name"] = Value::String(name);
            }
            services
        }).prop_flat_map(|services| {
            let slices = prop::collection::vec(endpoint_slice(&services), 0..12);
            (Just(services), slices)
        }),
        nodes in prop::collection::vec(node(), 0..2),
        config in config(),
    ) {
        let items: Vec<Value> = services.into_iter().chain(slices).chain(nodes).collect();
        let (forward, warnings) = ruleset(&as_list(&items), &config);
        let reversed: Vec<Value> = items.iter().rev().cloned().collect();
        let (backward, warnings_backward) = ruleset(&as_list(&reversed), &config);
        prop_assert_eq!(&forward, &backward, "input order changed the ruleset");
        prop_assert_eq!(warnings, warnings_backward);
        prop_assert_eq!(&ruleset(&as_list(&items), &config).0, &forward);
        if kernel_available("generated_clusters_render_deterministically_and_load") {
            prop_assert!(nft_check(&forward).is_ok(), "{:?}\n{forward}", nft_check(&forward));
        }
    }

    #[test]
    fn damaged_manifests_never_panic_and_still_load(
        case in select(golden_cases()),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), 0usize..40, prop::collection::vec(any::<u8>(), 0..6)), 1..4),
    ) {
        let mut text = std::fs::read(case.join("input.yaml")).expect("input.yaml");
        // Each cut replaces up to 40 bytes at a random place with up to 6 random bytes:
        // truncation, deletion, insertion and corruption in one operation.
        for (at, length, insert) in cuts {
            let start = at.index(text.len() + 1);
            let end = (start + length).min(text.len());
            text.splice(start..end, insert);
        }
        let config = {
            let mut config = ProxyConfig::new("test-node");
            config.node_ips = vec!["192.168.0.2".parse().expect("literal")];
            config.cluster_cidrs = parse_cidr_list("clusterCIDR", "10.0.0.0/8").expect("literal");
            config
        };
        let (first, _) = ruleset(&text, &config);
        prop_assert_eq!(&ruleset(&text, &config).0, &first);
        if kernel_available("damaged_manifests_never_panic_and_still_load") {
            prop_assert!(nft_check(&first).is_ok(), "{:?}\n{first}", nft_check(&first));
        }
    }
}
