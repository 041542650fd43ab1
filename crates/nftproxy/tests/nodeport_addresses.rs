//! NodePorts on every address of the node's interfaces inside a `nodePortAddresses`
//! CIDR, both families, with real connections; and addresses added and removed while
//! the daemon runs, followed within a second by a sync of a handful of operations.
//!
//! ```text
//!  client  192.168.50.100 ── eth0 192.168.50.10 (node IP, outside the CIDRs)
//!          fd00:50::100         fd00:50::10
//!  client2 10.20.1.100    ── eth1 10.20.1.5   (inside 10.20.0.0/16)
//!          10.21.0.100          10.21.0.9   (outside every CIDR)
//!          fd00:20::100         fd00:20::5  (inside fd00:20::/64)
//!          fd00:21::100         fd00:21::9  (outside)
//!  be      10.244.1.10, .20, fd00:244::10, ::20 ── node 10.244.1.1, fd00:244::1
//! ```

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::{Daemon, Outcome, addr, assert_split, from, ip, serve, tcp, within};
use nftproxy_testkit::fake_api::FakeApi;
use nftproxy_testkit::kernel_available;

/// A NodePort Service of both families, its endpoints on `be` (port 3000).
const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 172.30.0.42
  clusterIPs: [172.30.0.42, fd00:30::42]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{port: 80, targetPort: 3000, nodePort: 31080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 3000}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node-a}
- {addresses: [10.244.1.20], nodeName: node-a}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 3000}]
endpoints:
- {addresses: ["fd00:244::10"], nodeName: node-a}
- {addresses: ["fd00:244::20"], nodeName: node-a}
"#;

const FLAGS: [&str; 10] = [
    "--node-name",
    "node-a",
    "--node-ip",
    "192.168.50.10",
    "--node-ip",
    "fd00:50::10",
    "--cluster-cidr",
    "10.244.0.0/16,fd00:244::/64",
    "--nodeport-addresses",
    "10.20.0.0/16,fd00:20::/64",
];

/// A veth pair from the node: peer namespace, the node's interface, the node's and the
/// peer's addresses, and the peer's gateways.
type Link<'a> = (
    &'a str,
    &'a str,
    &'a [&'a str],
    &'a [&'a str],
    &'a [&'a str],
);

/// The namespaces of the picture above; deleted on drop.
struct Node {
    prefix: String,
    manifest: std::path::PathBuf,
}

impl Node {
    fn new(test: &str) -> Node {
        let prefix = format!("npa{}{test}-", std::process::id());
        let node = Node {
            manifest: std::env::temp_dir().join(format!("{prefix}web.yaml")),
            prefix,
        };
        std::fs::write(&node.manifest, WEB).expect("manifest");
        for name in ["node", "client", "client2", "be"] {
            ip(&["netns", "add", &node.ns(name)]);
            ip(&["-n", &node.ns(name), "link", "set", "lo", "up"]);
        }
        let links: [Link; 3] = [
            (
                "client",
                "eth0",
                &["192.168.50.10/24", "fd00:50::10/64"],
                &["192.168.50.100/24", "fd00:50::100/64"],
                &["192.168.50.10", "fd00:50::10"],
            ),
            (
                "client2",
                "eth1",
                &[
                    "10.20.1.5/24",
                    "10.21.0.9/24",
                    "fd00:20::5/64",
                    "fd00:21::9/64",
                ],
                &[
                    "10.20.1.100/24",
                    "10.21.0.100/24",
                    "fd00:20::100/64",
                    "fd00:21::100/64",
                ],
                &["10.20.1.5", "fd00:20::5"],
            ),
            (
                "be",
                "n-be",
                &["10.244.1.1/24", "fd00:244::1/64"],
                &[
                    "10.244.1.10/24",
                    "10.244.1.20/24",
                    "fd00:244::10/64",
                    "fd00:244::20/64",
                ],
                &["10.244.1.1", "fd00:244::1"],
            ),
        ];
        let node_ns = node.ns("node");
        for (peer, link, node_addrs, peer_addrs, gateways) in links {
            let peer_ns = node.ns(peer);
            ip(&[
                "-n", &node_ns, "link", "add", link, "type", "veth", "peer", "name", "eth",
                "netns", &peer_ns,
            ]);
            for address in node_addrs {
                ip(&["-n", &node_ns, "addr", "add", address, "dev", link, "nodad"]);
            }
            for address in peer_addrs {
                ip(&[
                    "-n", &peer_ns, "addr", "add", address, "dev", "eth", "nodad",
                ]);
            }
            ip(&["-n", &node_ns, "link", "set", link, "up"]);
            ip(&["-n", &peer_ns, "link", "set", "eth", "up"]);
            for gateway in gateways {
                ip(&["-n", &peer_ns, "route", "add", "default", "via", gateway]);
            }
        }
        for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            let status = Command::new("ip")
                .args(["netns", "exec", &node_ns, "sysctl", "-qw", sysctl])
                .status()
                .expect("sysctl runs");
            assert!(status.success());
        }
        node
    }

    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// `nftproxy` in the node namespace with the test's flags and `extra`, reading the
    /// manifest file.
    fn nftproxy(&self, extra: &[&str]) -> Command {
        let mut command = self.nftproxy_from(extra);
        command.arg("--manifests").arg(&self.manifest);
        command
    }

    /// `nftproxy` in the node namespace with the test's flags and `extra`.
    fn nftproxy_from(&self, extra: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                &self.ns("node"),
                env!("CARGO_BIN_EXE_nftproxy"),
            ])
            .args(FLAGS)
            .args(extra);
        command
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for name in ["node", "client", "client2", "be"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(name)])
                .status();
        }
        let _ = std::fs::remove_file(&self.manifest);
    }
}

const V4_ENDPOINTS: &[&str] = &["10.244.1.10:3000", "10.244.1.20:3000"];
const V6_ENDPOINTS: &[&str] = &["[fd00:244::10]:3000", "[fd00:244::20]:3000"];

/// Every connection answered, by the backend seeing the node's address (masqueraded).
fn masqueraded(outcomes: &[Outcome], node: &str) -> bool {
    outcomes
        .iter()
        .all(|o| matches!(o, Outcome::Answered(_, client, _) if client == node))
}

#[test]
fn nodeports_are_served_on_every_interface_address_inside_a_cidr() {
    if !kernel_available("nodeports_are_served_on_every_interface_address_inside_a_cidr") {
        return;
    }
    let node = Node::new("once");
    let output = node.nftproxy(&["--once", "-v"]).output().expect("runs");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    // At -v, each candidate and why.
    assert!(
        log.contains("candidate taken") && log.contains("10.20.1.5") && log.contains("eth1"),
        "{log}"
    );
    assert!(
        log.contains("outside every nodePortAddresses CIDR"),
        "{log}"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve(node.ns("be"), "be", stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    let client2 = node.ns("client2");

    // Inside a CIDR: load-balanced over both endpoints and masqueraded, both families.
    let v4 = from(client2.clone(), 100, || tcp(addr("10.20.1.5:31080")));
    assert_split("client2 -> 10.20.1.5:31080", &v4, V4_ENDPOINTS);
    assert!(masqueraded(&v4, "10.244.1.1"), "{v4:?}");
    let v6 = from(client2.clone(), 100, || tcp(addr("[fd00:20::5]:31080")));
    assert_split("client2 -> [fd00:20::5]:31080", &v6, V6_ENDPOINTS);
    assert!(masqueraded(&v6, "fd00:244::1"), "{v6:?}");

    // Outside every CIDR, the node IP included: not nftproxy's (nothing listens there).
    for outside in ["10.21.0.9:31080", "[fd00:21::9]:31080"] {
        let outcomes = from(client2.clone(), 3, move || tcp(addr(outside)));
        assert!(
            outcomes.iter().all(|o| *o == Outcome::Refused),
            "{outside}: {outcomes:?}"
        );
    }
    for outside in ["192.168.50.10:31080", "[fd00:50::10]:31080"] {
        let outcomes = from(node.ns("client"), 3, move || tcp(addr(outside)));
        assert!(
            outcomes.iter().all(|o| *o == Outcome::Refused),
            "{outside}: {outcomes:?}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().expect("server");
}

#[test]
fn addresses_added_and_removed_are_followed_within_a_second() {
    if !kernel_available("addresses_added_and_removed_are_followed_within_a_second") {
        return;
    }
    let node = Node::new("files");
    follows_addresses(&node, node.nftproxy(&DAEMON_FLAGS));
}

#[test]
fn addresses_are_followed_against_the_api_server_too() {
    if !kernel_available("addresses_are_followed_against_the_api_server_too") {
        return;
    }
    let node = Node::new("api");
    // The API server listens on the node's loopback; the test's objects and the Node.
    let api = in_namespace(&node.ns("node"), FakeApi::start);
    api.apply_yaml(WEB);
    api.apply_yaml(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  \
         addresses: [{type: InternalIP, address: 192.168.50.10}]\n",
    );
    let mut command = node.nftproxy_from(&DAEMON_FLAGS);
    command.args(["--master", &api.url()]);
    follows_addresses(&node, command);
}

/// Four changes in a row: with the default minSyncPeriod (1 s) the rate limit, not the
/// address listener, would set the pace after the first two.
const DAEMON_FLAGS: [&str; 6] = [
    "--healthz-bind-address",
    "",
    "--metrics-bind-address",
    "",
    "--min-sync-period",
    "100ms",
];

/// Runs `f` on a thread that entered namespace `ns` (a server started there stays there).
fn in_namespace<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    nftproxy_netlink::netns::in_named_netns(ns, f).expect("thread")
}

/// The addresses added on the node's second interface (inside the CIDRs), and a NodePort
/// on each.
const ADDED: [(&str, &str); 2] = [
    ("10.20.9.9/32", "10.20.9.9:31080"),
    ("fd00:20::99/128", "[fd00:20::99]:31080"),
];

/// Starts the daemon with `command` and adds and removes addresses under it.
fn follows_addresses(node: &Node, mut command: Command) {
    let log_path = std::env::temp_dir().join(format!("{}daemon.log", node.prefix));
    let daemon = Daemon::spawn(&mut command, log_path);
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve(node.ns("be"), "be", stop.clone());
    let client2 = node.ns("client2");
    within(Duration::from_secs(10), "the first sync", || {
        daemon.log().contains("synced")
    });
    // client2 reaches the new addresses through the node.
    ip(&[
        "-n",
        &client2,
        "route",
        "add",
        "10.20.9.9/32",
        "via",
        "10.20.1.5",
    ]);
    ip(&[
        "-n",
        &client2,
        "route",
        "add",
        "fd00:20::99/128",
        "via",
        "fd00:20::5",
    ]);
    let answered = |to: &'static str| {
        let client2 = client2.clone();
        move || {
            let outcome = from(client2.clone(), 1, move || tcp(addr(to)));
            matches!(outcome[0], Outcome::Answered(..))
        }
    };
    let syncs_before = daemon.log().matches("synced").count();
    for (address, to) in ADDED {
        ip(&[
            "-n",
            &node.ns("node"),
            "addr",
            "add",
            address,
            "dev",
            "eth1",
            "nodad",
        ]);
        let took = within(Duration::from_secs(1), address, answered(to));
        eprintln!("{address} served after {took:?}");
    }
    // Each change was one small sync: the address set's element, nothing else.
    within(Duration::from_secs(1), "the syncs logged", || {
        daemon.log().matches("synced").count() >= syncs_before + 2
    });
    let text = daemon.log();
    // After the first sync, one sync with operations per address added (at least).
    let changes: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("synced operations="))
        .skip(1)
        .collect();
    assert!(changes.len() >= ADDED.len(), "{text}");
    assert!(
        changes
            .iter()
            .all(|l| l.contains("operations=1 ") || l.contains("operations=2 ")),
        "{text}"
    );
    assert!(text.contains("interface address added"), "{text}");
    for (address, to) in ADDED {
        ip(&[
            "-n",
            &node.ns("node"),
            "addr",
            "del",
            address,
            "dev",
            "eth1",
        ]);
        let check = answered(to);
        within(Duration::from_secs(1), &format!("{address} gone"), || {
            !check()
        });
    }
    assert!(daemon.log().contains("interface address removed"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().expect("server");
}
