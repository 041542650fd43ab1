//! The command line as users run it: `--dry-run` on the seed examples, stdin, config
//! files, and the exit codes and messages for bad flags and bad input.

use std::process::{Command, Output};

use nftproxy_testkit::{SEED_NODE_FLAGS, repo_root, run_with_input};

fn nftproxy(args: &[&str], stdin: Option<&str>) -> Output {
    run_with_input(
        Command::new(env!("CARGO_BIN_EXE_nftproxy"))
            .args(args)
            .current_dir(repo_root())
            .env_remove("RUST_LOG"),
        stdin.unwrap_or_default(),
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `--dry-run` of the seed examples on the node they are written for.
fn seed_flags() -> Vec<&'static str> {
    [
        &["--dry-run", "--manifests", "hack/examples/seed/"][..],
        &SEED_NODE_FLAGS[..],
    ]
    .concat()
}

#[test]
fn seed_dry_run_prints_the_golden_ruleset() {
    let output = nftproxy(&seed_flags(), None);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let expected =
        std::fs::read_to_string(repo_root().join("rules-golden/seed/ip.nft")).expect("golden file");
    assert_eq!(text(&output.stdout), expected);
    assert_eq!(text(&output.stderr), "", "the seed manifests are valid");
}

#[test]
fn manifests_can_come_from_stdin_and_a_config_file() {
    let manifest =
        std::fs::read_to_string(repo_root().join("rules-golden/masquerade-bit/input.yaml"))
            .expect("input");
    let config = repo_root().join("rules-golden/masquerade-bit/config.yaml");
    let config = config.to_str().expect("utf-8 path");
    let output = nftproxy(
        &[
            "--dry-run",
            "--manifests",
            "-",
            "--config",
            config,
            "--node-name",
            "test-node",
            "--node-ip",
            "192.168.0.2",
            "--cluster-cidr",
            "10.0.0.0/8",
        ],
        Some(&manifest),
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let expected = std::fs::read_to_string(repo_root().join("rules-golden/masquerade-bit/ip.nft"))
        .expect("golden file");
    assert_eq!(text(&output.stdout), expected);

    // A flag overrides the file.
    let output = nftproxy(
        &[
            "--dry-run",
            "--manifests",
            "-",
            "--config",
            config,
            "--node-name",
            "n",
            "--masquerade-bit",
            "3",
        ],
        Some(&manifest),
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("meta mark & 0x00000008 != 0x00000000"));
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    for args in [
        vec!["--dry-run", "--no-such-flag"],
        vec!["--dry-run", "--manifests", "x", "--node-ip", "300.1.1.1"],
        vec![
            "--dry-run",
            "--manifests",
            "x",
            "--cluster-cidr",
            "10.0.0.0/33",
        ],
        vec!["--dry-run", "--manifests", "x", "--masquerade-bit", "32"],
        vec![
            "--dry-run",
            "--manifests",
            "x",
            "--node-name",
            "n",
            "--detect-local-mode",
            "Magic",
        ],
        vec![
            "--dry-run",
            "--manifests",
            "x",
            "--master",
            "http://127.0.0.1:1",
        ],
        vec!["--healthz-bind-address", "localhost:x", "--manifests", "x"],
    ] {
        let output = nftproxy(&args, None);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&output.stderr)
        );
        let stderr = text(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("nftproxy: "), "{stderr}");
    }
}

#[test]
fn unparseable_yaml_names_the_file_line_and_object_and_the_rest_is_printed() {
    let dir = std::env::temp_dir().join(format!("nftproxy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("broken.yaml");
    std::fs::write(
        &file,
        "kind: Service\nmetadata:\n  name: oops\nspec: [\n---\n\
         kind: Service\nmetadata: {name: fine, namespace: ns1}\n\
         spec: {clusterIP: 172.30.0.3, ports: [{port: 80}]}\n",
    )
    .expect("write");
    let output = nftproxy(
        &[
            "--dry-run",
            "--node-name",
            "n",
            "--manifests",
            file.to_str().expect("utf-8"),
        ],
        None,
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("broken.yaml:4:") && stderr.contains("Service default/oops"),
        "{stderr}"
    );
    assert!(text(&output.stdout).contains("172.30.0.3 . tcp . 80"));
}

#[test]
fn a_bad_object_is_named_and_the_rest_still_printed() {
    let manifest = "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: ns1}\n\
                    spec: {clusterIP: 172.30.0.2, ports: [{port: 80, protocol: ICMP}]}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: fine, namespace: ns1}\n\
                    spec: {clusterIP: 172.30.0.3, ports: [{port: 80}]}\n";
    let output = nftproxy(
        &["--dry-run", "--node-name", "n", "--manifests", "-"],
        Some(manifest),
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert_eq!(
        stderr.lines().filter(|l| l.contains("WARN")).count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("Service ns1/broken"), "{stderr}");
    assert!(stderr.contains("ICMP"), "{stderr}");
    let stdout = text(&output.stdout);
    assert!(stdout.contains("172.30.0.3 . tcp . 80"), "{stdout}");
    assert!(!stdout.contains("172.30.0.2"), "{stdout}");
}

#[test]
fn ipv6_input_adds_the_ip6_table() {
    let manifest = std::fs::read_to_string(repo_root().join("rules-golden/dualstack/input.yaml"))
        .expect("input");
    let output = nftproxy(
        &[
            "--dry-run",
            "--node-name",
            "test-node",
            "--cluster-cidr",
            "10.0.0.0/8,fd00:10::/64",
            "--manifests",
            "-",
        ],
        Some(&manifest),
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let expected = [
        std::fs::read_to_string(repo_root().join("rules-golden/dualstack/ip.nft")).expect("golden"),
        std::fs::read_to_string(repo_root().join("rules-golden/dualstack/ip6.nft"))
            .expect("golden"),
    ]
    .join("\n");
    assert_eq!(text(&output.stdout), expected);
}

#[test]
fn explain_traces_a_packet_through_the_seed_rules() {
    let probe = ["--from", "203.0.113.9", "--to", "192.168.50.10:31000/tcp"];
    let human = nftproxy(
        &[&["explain"][..], &seed_flags()[1..], &probe[..]].concat(),
        None,
    );
    assert!(human.status.success(), "{}", text(&human.stderr));
    let out = text(&human.stdout);
    assert!(
        out.contains("result: dnat 10.244.1.20:3000 masquerade (50.0%), dnat 10.244.2.20:3000 masquerade (50.0%)"),
        "{out}"
    );
    assert!(out.contains("service: default/counter-np (tcp)"), "{out}");
    assert!(
        out.contains("nat-prerouting > services #6: ip daddr @nodeport-ips goto nodeports"),
        "{out}"
    );

    let json = nftproxy(
        &[
            &["explain"][..],
            &seed_flags()[1..],
            &probe[..],
            &["--output", "json"][..],
        ]
        .concat(),
        None,
    );
    assert!(json.status.success(), "{}", text(&json.stderr));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("valid JSON");
    let total: f64 = value["outcomes"]
        .as_array()
        .expect("outcomes")
        .iter()
        .map(|o| o["probability"].as_f64().expect("number"))
        .sum();
    assert!((total - 1.0).abs() < 1e-9, "{total}");
    assert_eq!(value["packet"]["origin"], "arriving on an interface");

    // A Service port without endpoints names its Service in the answer.
    let reject = nftproxy(
        &[
            "explain",
            "--manifests",
            "rules-golden/clusterip-no-endpoints/input.yaml",
            "--node-name",
            "test-node",
            "--from",
            "10.0.1.7",
            "--to",
            "172.30.0.41:80/tcp",
        ],
        None,
    );
    let out = text(&reject.stdout);
    assert!(
        out.contains("result: reject") && out.contains("ns1/svc1:p80 (no usable endpoints)"),
        "{out}"
    );

    let bad = nftproxy(
        &[
            "explain",
            "--from",
            "10.0.0.1",
            "--to",
            "10.96.0.1:99999/tcp",
        ],
        None,
    );
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn without_manifests_or_a_cluster_the_error_says_what_to_pass() {
    let output = run_with_input(
        Command::new(env!("CARGO_BIN_EXE_nftproxy"))
            .args(["--dry-run", "--node-name", "n"])
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT"),
        "",
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("not running in a cluster") && stderr.contains("--kubeconfig FILE"),
        "{stderr}"
    );
}

/// The examples `--help` ends with, one command each (continuation lines joined).
fn help_examples() -> Vec<Vec<String>> {
    let help = text(&nftproxy(&["--help"], None).stdout);
    let examples = help
        .split_once("Examples:")
        .map(|(_, e)| e.to_owned())
        .expect("--help has examples");
    let joined = examples.replace("\\\n", " ");
    joined
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("nftproxy "))
        .map(|l| l.split_whitespace().skip(1).map(str::to_owned).collect())
        .collect()
}

#[test]
fn the_help_says_what_runs_as_the_daemon_and_its_examples_work() {
    let help = text(&nftproxy(&["--help"], None).stdout);
    assert!(help.contains("runs as the node's daemon"), "{help}");
    for default in ["default 30s", "default 1s", "default 14", "0.0.0.0:10256"] {
        assert!(help.contains(default), "--help does not show {default}");
    }
    let examples = help_examples();
    assert!(examples.len() >= 5, "{examples:?}");
    // Those that need neither a kernel nor a cluster run here, as printed.
    let offline: Vec<&Vec<String>> = examples
        .iter()
        .filter(|e| {
            (e.contains(&"--dry-run".to_owned()) && !e.contains(&"--diff".to_owned()))
                || e.first().is_some_and(|c| c == "explain")
        })
        .collect();
    assert_eq!(offline.len(), 2, "{examples:?}");
    for example in offline {
        let args: Vec<&str> = example.iter().map(String::as_str).collect();
        let output = nftproxy(&args, None);
        assert!(
            output.status.success() && !output.stdout.is_empty(),
            "nftproxy {}: {}",
            args.join(" "),
            text(&output.stderr)
        );
    }
}

#[test]
fn service_counters_are_off_unless_asked_for() {
    let counted = |output: &Output| {
        text(&output.stdout)
            .lines()
            .filter(|l| l.trim() == "counter" || l.contains(" counter "))
            .count()
    };
    let default = nftproxy(&seed_flags(), None);
    assert_eq!(counted(&default), 0, "off by default");
    let on = nftproxy(&[&seed_flags()[..], &["--service-counters"]].concat(), None);
    assert!(counted(&on) > 5, "{}", text(&on.stdout));
    let explicit = nftproxy(
        &[&seed_flags()[..], &["--service-counters=true"]].concat(),
        None,
    );
    assert_eq!(text(&explicit.stdout), text(&on.stdout));
    let off = nftproxy(
        &[&seed_flags()[..], &["--service-counters=false"]].concat(),
        None,
    );
    assert!(off.status.success(), "{}", text(&off.stderr));
    assert_eq!(text(&off.stdout), text(&default.stdout));
    let bad = nftproxy(
        &[&seed_flags()[..], &["--service-counters=maybe"]].concat(),
        None,
    );
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn localhost_in_nodeport_addresses_is_said_and_the_rest_applies() {
    // As kube-proxy's nftables mode without its localhost gate: the entry does not stop
    // anything, NodePorts stay on the primary IP, and the warning says why.
    let mut flags = seed_flags();
    flags.extend(["--nodeport-addresses", "primary,localhost"]);
    let output = nftproxy(&flags, None);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let expected =
        std::fs::read_to_string(repo_root().join("rules-golden/seed/ip.nft")).expect("golden file");
    assert_eq!(text(&output.stdout), expected);
    let said = text(&output.stderr);
    assert!(
        said.contains("NodePorts are not served on localhost"),
        "{said}"
    );
    // `all` is every local address: the ruleset's NodePort rule matches them by type.
    let mut flags = seed_flags();
    flags.extend(["--nodeport-addresses", "all"]);
    let all = nftproxy(&flags, None);
    assert!(all.status.success(), "{}", text(&all.stderr));
    let mut flags = seed_flags();
    flags.extend(["--nodeport-addresses", "0.0.0.0/0,::/0"]);
    let zero = nftproxy(&flags, None);
    assert_eq!(text(&all.stdout), text(&zero.stdout));
    assert_eq!(text(&all.stderr), "");
}
