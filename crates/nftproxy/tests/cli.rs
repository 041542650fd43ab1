//! The command line as users run it: `--dry-run` on the seed examples, stdin, config
//! files, and the exit codes and messages for bad flags and bad input.

use std::process::{Command, Output};

use nftproxy_testkit::{repo_root, run_with_input};

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

const SEED_FLAGS: [&str; 9] = [
    "--dry-run",
    "--manifests",
    "examples/seed/",
    "--node-name",
    "node-a",
    "--node-ip",
    "192.168.50.10",
    "--cluster-cidr",
    "10.244.0.0/16",
];

#[test]
fn seed_dry_run_prints_the_golden_ruleset() {
    let output = nftproxy(&SEED_FLAGS, None);
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
        vec!["--dry-run", "--node-name", "n"],
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
fn unparseable_yaml_names_the_file_and_line() {
    let dir = std::env::temp_dir().join(format!("nftproxy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("broken.yaml");
    std::fs::write(&file, "kind: Service\nmetadata:\n  name: [oops\n").expect("write");
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
    assert!(stderr.contains("broken.yaml:"), "{stderr}");
    assert!(output.stdout.is_empty());
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
