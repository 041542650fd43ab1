//! The reconciler and the binary's modes against the real kernel, each in a fresh
//! network namespace: a refused transaction keeps the old rules and the next sync repairs
//! the table; a restart sends nothing when nothing changed; the long-running file mode
//! follows edits, holds the rules while a manifest is half-written, and leaves them in
//! place on SIGTERM.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nftproxy_netlink::NetlinkBackend;
use nftproxy_netlink::netns::in_new_netns;
use nftproxy_nft::{Backend, Family};
use nftproxy_proxier::{Reconciler, ReconcilerOptions, SyncError, probe};
use nftproxy_testkit::{
    SEED_NODE_FLAGS, kernel_available, named_protocols, normalise_listing, repo_root, run_ok,
    tables_from_yaml,
};

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\n\
         spec: {{clusterIP: {ip}, ports: [{{name: p, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: ns, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: p, port: 80}}]\nendpoints: [{{addresses: [10.180.0.1]}}]\n"
    )
}

/// A child process killed when dropped, so a failing test leaves nothing running.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nft(args: &[&str]) -> String {
    run_ok(Command::new("nft").args(args), "")
}

#[test]
fn a_refused_sync_keeps_the_old_rules_and_the_next_one_repairs() {
    if !kernel_available("a_refused_sync_keeps_the_old_rules_and_the_next_one_repairs") {
        return;
    }
    let before = tables_from_yaml(&service("a", "172.30.0.1"));
    // b has ClientIP affinity, and so chains of its own: its service chain DNATs.
    let after = tables_from_yaml(&format!(
        "{}---\n{}",
        service("a", "172.30.0.1"),
        service("b", "172.30.0.2").replacen("spec: {", "spec: {sessionAffinity: ClientIP, ", 1)
    ));
    let new_chain = after[0]
        .chains
        .keys()
        .find(|c| c.starts_with("service-") && !before[0].chains.contains_key(*c))
        .expect("b has a service chain")
        .clone();
    in_new_netns(move || {
        let options = ReconcilerOptions::default();
        let mut reconciler =
            Reconciler::new(NetlinkBackend::open().expect("socket"), "nftproxy", options);
        reconciler.sync(&before).expect("first sync");
        // Someone else creates a filter base chain under the name b's chain will have:
        // the DNAT rules nftproxy adds to it are refused by the kernel.
        let spec = "{ type filter hook input priority 0; policy accept; }";
        nft(&["add", "chain", "ip", "nftproxy", &new_chain, spec]);
        let listing = nft(&["list", "ruleset"]);
        let error = reconciler
            .sync(&after)
            .expect_err("the kernel refuses DNAT in a filter chain");
        assert!(matches!(error, SyncError::Apply { .. }), "{error}");
        assert!(error.to_string().contains("EOPNOTSUPP"), "{error}");
        assert_eq!(
            nft(&["list", "ruleset"]),
            listing,
            "a refused transaction changed the kernel"
        );
        // The next sync reads the kernel again, replaces the foreign chain, and succeeds.
        let report = reconciler.sync(&after).expect("repairing sync");
        assert!(report.read_back);
        let mut backend = NetlinkBackend::open().expect("socket");
        assert_eq!(
            backend.list(Family::Ip, "nftproxy").expect("list").as_ref(),
            Some(&after[0])
        );
    })
    .expect("new network namespace");
}

/// The kernel probe finds out what this kernel does (whatever its release says), and
/// leaves nothing behind: a reconciler with the options it gives deletes a Service's
/// chain without an error, and only when the probe found that possible does it do so in
/// the same transaction as the map element naming it.
#[test]
fn the_kernel_probe_finds_what_chain_deletes_need_and_leaves_nothing() {
    if !kernel_available("the_kernel_probe_finds_what_chain_deletes_need_and_leaves_nothing") {
        return;
    }
    let both = tables_from_yaml(&format!(
        "{}---
{}",
        service("a", "172.30.0.1"),
        service("b", "172.30.0.2")
    ));
    let one = tables_from_yaml(&service("a", "172.30.0.1"));
    in_new_netns(move || {
        let mut backend = NetlinkBackend::open().expect("socket");
        let found = probe::chain_deletes(&mut backend);
        eprintln!("kernel probe: {found}");
        assert!(!matches!(found, probe::ChainDeletes::Unknown(_)), "{found}");
        assert_eq!(nft(&["list", "ruleset"]), "", "the probe left its table");
        let mut reconciler = Reconciler::new(backend, "nftproxy", found.options());
        reconciler.sync(&both).expect("first sync");
        let chains = |r: &mut Reconciler<NetlinkBackend>| {
            r.backend_mut()
                .list(Family::Ip, "nftproxy")
                .expect("list")
                .expect("table")
                .chains
                .len()
        };
        let before = chains(&mut reconciler);
        reconciler.sync(&one).expect("b goes");
        let left = chains(&mut reconciler);
        match found {
            probe::ChainDeletes::WithTheirElements => assert!(left < before),
            _ => assert_eq!(left, before, "b's chains wait for the next sync"),
        }
        reconciler.sync(&one).expect("the next sync");
        assert_eq!(
            reconciler
                .backend_mut()
                .list(Family::Ip, "nftproxy")
                .expect("list")
                .as_ref(),
            Some(&one[0])
        );
    })
    .expect("new network namespace");
}

fn nftproxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nftproxy"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("nftproxy runs")
}

/// The seed examples on the node they are written for.
fn seed() -> Vec<&'static str> {
    [
        &["--manifests", "hack/examples/seed/"][..],
        &SEED_NODE_FLAGS[..],
    ]
    .concat()
}

#[test]
fn once_matches_the_dry_run_restarts_send_nothing_and_other_tables_are_untouched() {
    let test = "once_matches_the_dry_run_restarts_send_nothing_and_other_tables_are_untouched";
    if !kernel_available(test) {
        return;
    }
    let dry_run = nftproxy(&[&["--dry-run"][..], &seed()[..]].concat());
    assert!(dry_run.status.success());
    let dry_run = String::from_utf8_lossy(&dry_run.stdout).into_owned();
    let reference = in_new_netns(move || {
        run_ok(Command::new("nft").args(["-f", "-"]), &dry_run);
        nft(&["list", "table", "ip", "nftproxy"])
    })
    .expect("new network namespace");
    let (first, second, listing, other, cleaned) = in_new_netns(|| {
        // Someone else's table, which nftproxy must neither read nor change.
        nft(&["add", "table", "ip", "other"]);
        nft(&[
            "add",
            "chain",
            "ip",
            "other",
            "c",
            "{ type filter hook input priority 0; policy accept; }",
        ]);
        nft(&[
            "add", "rule", "ip", "other", "c", "tcp", "dport", "22", "accept",
        ]);
        let other_before = nft(&["list", "table", "ip", "other"]);
        let first = nftproxy(&[&["--once"][..], &seed()[..]].concat());
        let listing = nft(&["list", "table", "ip", "nftproxy"]);
        let second = nftproxy(&[&["--once"][..], &seed()[..]].concat());
        assert_eq!(
            nft(&["list", "table", "ip", "nftproxy"]),
            listing,
            "a restart changed the rules"
        );
        let cleanup = nftproxy(&["--cleanup"]);
        assert!(cleanup.status.success());
        let other_after = nft(&["list", "table", "ip", "other"]);
        assert_eq!(other_before, other_after, "another table was touched");
        (
            first,
            second,
            listing,
            other_after,
            nft(&["list", "tables"]),
        )
    })
    .expect("new network namespace");
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        first.status.success() && stderr(&first).contains("operations=141"),
        "{}",
        stderr(&first)
    );
    assert!(
        second.status.success() && stderr(&second).contains("operations=0"),
        "{}",
        stderr(&second)
    );
    assert_eq!(normalise_listing(&listing), normalise_listing(&reference));
    assert!(other.contains("tcp dport 22 accept"));
    assert_eq!(
        cleaned.trim(),
        "table ip other",
        "--cleanup removes only nftproxy's tables"
    );
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn file_mode_follows_edits_and_leaves_the_rules_on_sigterm() {
    if !kernel_available("file_mode_follows_edits_and_leaves_the_rules_on_sigterm") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("nftproxy-watch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("a.yaml"), service("a", "172.30.0.1")).expect("write");
    std::fs::write(dir.join("b.yaml"), service("b", "172.30.0.2")).expect("write");
    let watched = dir.clone();
    let status = in_new_netns(move || {
        let mut daemon = Daemon(
            Command::new(env!("CARGO_BIN_EXE_nftproxy"))
                .args([
                    "--node-name",
                    "test-node",
                    "--min-sync-period",
                    "200ms",
                    "--manifests",
                ])
                .arg(&watched)
                .stderr(Stdio::null())
                .spawn()
                .expect("nftproxy starts"),
        );
        // The ClusterIPs load-balanced over Cluster endpoints.
        let services = || {
            Command::new("nft")
                .args(["list", "set", "ip", "nftproxy", "load-balance"])
                .output()
                .map(|o| named_protocols(&String::from_utf8_lossy(&o.stdout)))
                .unwrap_or_default()
        };
        wait_for("the first sync", || {
            services().contains("172.30.0.2 . tcp . 80")
        });
        std::fs::remove_file(watched.join("b.yaml")).expect("remove");
        wait_for("service b to go", || {
            let now = services();
            now.contains("172.30.0.1 . tcp . 80") && !now.contains("172.30.0.2")
        });
        std::fs::write(watched.join("c.yaml"), service("c", "172.30.0.3")).expect("write");
        wait_for("service c to come", || {
            services().contains("172.30.0.3 . tcp . 80")
        });
        // c.yaml caught half-written, while d.yaml is added: nothing changes until c.yaml
        // parses again, so neither c goes away nor d comes half-way.
        let c = service("c", "172.30.0.3");
        let cut = c.find("ports: [{").expect("flow sequence") + 9;
        std::fs::write(watched.join("c.yaml"), &c[..cut]).expect("write");
        std::fs::write(watched.join("d.yaml"), service("d", "172.30.0.4")).expect("write");
        std::thread::sleep(Duration::from_secs(1));
        let held = services();
        assert!(
            held.contains("172.30.0.3 . tcp . 80") && !held.contains("172.30.0.4"),
            "{held}"
        );
        std::fs::write(watched.join("c.yaml"), &c).expect("write");
        wait_for("service d to come", || {
            services().contains("172.30.0.4 . tcp . 80")
        });
        let pid = daemon.0.id().to_string();
        let term = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(term.success());
        let status = daemon.0.wait().expect("nftproxy exits");
        assert!(
            services().contains("172.30.0.3 . tcp . 80"),
            "rules are left in place"
        );
        status
    })
    .expect("new network namespace");
    let _ = std::fs::remove_dir_all(Path::new(&dir));
    assert!(status.success(), "{status}");
}

#[test]
fn a_table_with_foreign_rules_is_replaced_whole() {
    if !kernel_available("a_table_with_foreign_rules_is_replaced_whole") {
        return;
    }
    let (repaired, listing, clean) = in_new_netns(|| {
        assert!(
            nftproxy(&[&["--once"][..], &seed()[..]].concat())
                .status
                .success()
        );
        let clean = nft(&["list", "table", "ip", "nftproxy"]);
        // Something nftproxy never writes: it cannot read the table back.
        nft(&["add", "rule", "ip", "nftproxy", "services", "log"]);
        let repaired = nftproxy(&[&["--once"][..], &seed()[..]].concat());
        (repaired, nft(&["list", "table", "ip", "nftproxy"]), clean)
    })
    .expect("new network namespace");
    let stderr = String::from_utf8_lossy(&repaired.stderr);
    assert!(repaired.status.success(), "{stderr}");
    assert!(stderr.contains("replaced whole"), "{stderr}");
    assert!(!listing.contains(" log"), "{listing}");
    assert_eq!(normalise_listing(&listing), normalise_listing(&clean));
}

#[test]
fn after_a_large_load_only_a_change_to_our_tables_needs_a_read_back() {
    if !kernel_available("after_a_large_load_only_a_change_to_our_tables_needs_a_read_back") {
        return;
    }
    // 600 Services: thousands of objects, so the load is sent unannounced.
    let yaml: Vec<String> = (0..600)
        .map(|i| {
            service(
                &format!("s{i}"),
                &format!("172.30.{}.{}", i / 250, i % 250 + 1),
            )
        })
        .collect();
    let tables = tables_from_yaml(&yaml.join("---\n"));
    in_new_netns(move || {
        let backend = NetlinkBackend::open().expect("netlink");
        let mut r = Reconciler::new(backend, "nftproxy", ReconcilerOptions::default());
        let report = r.sync(&tables).expect("cold load");
        assert!(report.operations > 1_000, "{report:?}");
        assert!(!r.drifted(), "only our own commits");
        // Another program's table: the generation moves, the notifications say it was
        // not ours.
        nft(&["add", "table", "inet", "neighbour"]);
        assert!(!r.drifted(), "a neighbour's commit");
        // One of ours.
        nft(&["flush", "chain", "ip", "nftproxy", "nat-prerouting"]);
        assert!(r.drifted(), "our chain flushed");
        r.invalidate();
        let repair = r.sync(&tables).expect("repair");
        assert!(repair.operations > 0 && repair.read_back, "{repair:?}");
        assert!(!r.drifted());
    })
    .expect("netns");
}
