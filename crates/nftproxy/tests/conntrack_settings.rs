//! kube-proxy's `conntrack` settings as the daemon sets them at start, each test in a
//! network namespace of its own: kube-proxy's defaults without configuration, the
//! file's values, the flags over the file, a value of 0 leaving the kernel's; the
//! machine-wide maximum, which only the host's namespace may set, logged with the value
//! wanted while the daemon goes on; a bad duration ends the process with 2, naming the
//! flag, before anything is set.

use std::process::Command;
use std::time::Duration;

use nftproxy_testkit::{SEED_NODE_FLAGS, kernel_available, repo_root};

mod common;
use common::{Daemon, Namespace, within};

/// The daemon in `ns` on the seed manifests with `args`, once it has synced.
fn daemon(ns: &Namespace, args: &[&str]) -> Daemon {
    let log = std::env::temp_dir().join(format!("{}.log", ns.0));
    let daemon = Daemon::spawn(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_nftproxy")])
            .args(SEED_NODE_FLAGS)
            .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
            .arg("--manifests")
            .arg(repo_root().join("hack/examples/seed"))
            .args(args),
        log,
    );
    within(Duration::from_secs(30), "the first sync", || {
        daemon.log().contains("synced")
    });
    daemon
}

#[test]
fn without_configuration_the_daemon_sets_kube_proxys_defaults() {
    if !kernel_available("without_configuration_the_daemon_sets_kube_proxys_defaults") {
        return;
    }
    let ns = Namespace::new("ctdefault");
    // A new namespace starts with the kernel's values.
    assert_eq!(
        ns.netfilter_sysctl("nf_conntrack_tcp_timeout_established"),
        "432000"
    );
    let udp = ns.netfilter_sysctl("nf_conntrack_udp_timeout");
    let daemon = daemon(&ns, &[]);
    assert_eq!(
        ns.netfilter_sysctl("nf_conntrack_tcp_timeout_established"),
        "86400"
    );
    assert_eq!(
        ns.netfilter_sysctl("nf_conntrack_tcp_timeout_close_wait"),
        "3600"
    );
    assert_eq!(
        ns.netfilter_sysctl("nf_conntrack_udp_timeout"),
        udp,
        "0s leaves it"
    );
    assert_eq!(ns.netfilter_sysctl("nf_conntrack_tcp_be_liberal"), "0");
    // Only the host's namespace may set the maximum: said, with the value wanted.
    let log = daemon.log();
    let said = log
        .lines()
        .find(|l| l.contains("whole machine") && l.contains("name=\"nf_conntrack_max\""))
        .unwrap_or_else(|| panic!("the maximum is reported:\n{log}"));
    assert!(said.contains("wanted="), "{said}");
}

#[test]
fn the_file_sets_conntrack_and_flags_override_it() {
    if !kernel_available("the_file_sets_conntrack_and_flags_override_it") {
        return;
    }
    let ns = Namespace::new("ctconfig");
    let config = std::env::temp_dir().join(format!("{}.conf", ns.0));
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         conntrack:\n  maxPerCore: 0\n  tcpEstablishedTimeout: 3h0m0s\n\
         \x20 tcpCloseWaitTimeout: 30m\n  udpTimeout: 45s\n  udpStreamTimeout: 0s\n\
         \x20 tcpBeLiberal: true\n",
    )
    .expect("config written");
    let config_arg = config.display().to_string();
    let daemon = daemon(
        &ns,
        &[
            "--config",
            &config_arg,
            "--conntrack-tcp-timeout-established",
            "2h",
            "--conntrack-udp-timeout-stream",
            "5m0s",
        ],
    );
    let _ = std::fs::remove_file(&config);
    assert_eq!(
        ns.netfilter_sysctl("nf_conntrack_tcp_timeout_established"),
        "7200",
        "the flag"
    );
    assert_eq!(
        ns.netfilter_sysctl("nf_conntrack_tcp_timeout_close_wait"),
        "1800",
        "the file"
    );
    assert_eq!(ns.netfilter_sysctl("nf_conntrack_udp_timeout"), "45");
    assert_eq!(
        ns.netfilter_sysctl("nf_conntrack_udp_timeout_stream"),
        "300"
    );
    assert_eq!(ns.netfilter_sysctl("nf_conntrack_tcp_be_liberal"), "1");
    // maxPerCore 0: the maximum is not touched, so nothing is said about it.
    assert!(
        !daemon.log().contains("nf_conntrack_max"),
        "{}",
        daemon.log()
    );
}

#[test]
fn a_bad_conntrack_duration_exits_2_naming_the_flag() {
    // With --dry-run, which never sets anything even when the flags are good.
    let seed = repo_root().join("hack/examples/seed");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nftproxy"))
            .args(args)
            .args(["--dry-run", "--manifests"])
            .arg(&seed)
            .output()
            .expect("nftproxy runs")
    };
    for (flag, value) in [
        ("--conntrack-tcp-timeout-close-wait", "10x"),
        ("--conntrack-udp-timeout", "-5s"),
        ("--conntrack-tcp-timeout-established", "1d"),
    ] {
        let output = run(&[&format!("{flag}={value}")]);
        assert_eq!(output.status.code(), Some(2), "{flag}={value}");
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(said.contains(flag) && said.contains(value), "{said}");
    }
    let output = run(&["--conntrack-max-per-core=-1"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--conntrack-max-per-core"));
    assert!(
        run(&["--conntrack-tcp-timeout-established=24h0m0s"])
            .status
            .success()
    );
}
