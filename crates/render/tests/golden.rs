//! Golden tests: every `rules-golden/<case>/` directory is rendered and compared byte for
//! byte with its expected files, and every expected file is checked by the kernel with
//! `nft -c -f` in a fresh network namespace.
//!
//! `UPDATE_GOLDEN=1` rewrites the expected files (refused when `CI` is set). Adding a case
//! needs no code: see `rules-golden/README.md`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use nftproxy_model::{KubeProxyConfiguration, ProxyConfig, Severity, Snapshot, build};
use nftproxy_render::render;

const DEFAULT_NODE_NAME: &str = "test-node";
const DEFAULT_NODE_IP: &str = "192.168.0.2";
const DEFAULT_CLUSTER_CIDRS: &str = "10.0.0.0/8,fd00:10::/64";

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../rules-golden")
}

fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = fs::read_dir(golden_root())
        .expect("rules-golden exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.join("input.yaml").is_file())
        .collect();
    cases.sort();
    cases
}

/// The config a case runs with: the harness defaults, then the case's `config.yaml`.
fn case_config(case: &Path, snapshot: &Snapshot) -> ProxyConfig {
    let mut config = ProxyConfig::new(DEFAULT_NODE_NAME);
    config.cluster_cidrs =
        nftproxy_model::config::parse_cidr_list("clusterCIDR", DEFAULT_CLUSTER_CIDRS)
            .expect("default CIDRs parse");
    if let Ok(text) = fs::read_to_string(case.join("config.yaml")) {
        let file = KubeProxyConfiguration::parse(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        config
            .apply_file(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
    }
    let has_node = snapshot
        .nodes
        .iter()
        .any(|n| n.metadata.name.as_deref() == Some(config.node_name.as_str()));
    if config.node_ips.is_empty() && !has_node {
        config
            .node_ips
            .push(DEFAULT_NODE_IP.parse().expect("literal"));
    }
    config
}

struct Rendered {
    ip: String,
    ip6: Option<String>,
    warnings: String,
}

fn render_case(case: &Path, reverse_input: bool) -> Rendered {
    let text = fs::read_to_string(case.join("input.yaml")).expect("input.yaml readable");
    let mut snapshot = Snapshot::default();
    let mut diagnostics = snapshot
        .add_manifest("input.yaml", &text)
        .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
    if reverse_input {
        snapshot.services.reverse();
        snapshot.endpoint_slices.reverse();
        snapshot.nodes.reverse();
        snapshot.service_cidrs.reverse();
    }
    let config = case_config(case, &snapshot);
    let built = build(&snapshot, &config);
    diagnostics.extend(built.diagnostics.iter().cloned());
    diagnostics.sort();
    let warnings: String = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Invalid)
        .map(|d| format!("{d}\n"))
        .collect();
    Rendered {
        ip: render(&built.ipv4).to_string(),
        ip6: built
            .ipv6
            .is_active()
            .then(|| render(&built.ipv6).to_string()),
        warnings,
    }
}

fn first_difference(expected: &str, actual: &str) -> String {
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    for i in 0..e.len().max(a.len()) {
        if e.get(i) != a.get(i) {
            return format!(
                "line {}:\n  expected: {}\n  actual:   {}",
                i + 1,
                e.get(i).unwrap_or(&"<end of file>"),
                a.get(i).unwrap_or(&"<end of file>")
            );
        }
    }
    "only in trailing whitespace".to_owned()
}

/// Compares (or, with UPDATE_GOLDEN, writes) one expected file; `None` means the file
/// must not exist.
fn check_file(path: &Path, actual: Option<&str>, failures: &mut Vec<String>) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        assert!(
            std::env::var_os("CI").is_none(),
            "UPDATE_GOLDEN is refused under CI: regenerate locally and commit the diff"
        );
        match actual {
            Some(text) => fs::write(path, text).expect("golden file writable"),
            None => {
                let _ = fs::remove_file(path);
            }
        }
        return;
    }
    let expected = fs::read_to_string(path).ok();
    match (expected.as_deref(), actual) {
        (Some(e), Some(a)) if e == a => {}
        (None, None) => {}
        (Some(e), Some(a)) => {
            failures.push(format!("{}: {}", path.display(), first_difference(e, a)))
        }
        (None, Some(_)) => failures.push(format!(
            "{}: missing (run with UPDATE_GOLDEN=1)",
            path.display()
        )),
        (Some(_), None) => failures.push(format!(
            "{}: expected nothing, but the file exists",
            path.display()
        )),
    }
}

#[test]
fn golden_cases_match() {
    let cases = cases();
    assert!(cases.len() >= 30, "only {} golden cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let rendered = render_case(case, false);
        check_file(&case.join("ip.nft"), Some(&rendered.ip), &mut failures);
        check_file(
            &case.join("ip6.nft"),
            rendered.ip6.as_deref(),
            &mut failures,
        );
        let warnings = (!rendered.warnings.is_empty()).then_some(rendered.warnings.as_str());
        check_file(&case.join("warnings.txt"), warnings, &mut failures);
    }
    assert!(
        failures.is_empty(),
        "golden mismatches:\n{}",
        failures.join("\n")
    );
}

#[test]
fn output_does_not_depend_on_input_order() {
    for case in cases() {
        let forward = render_case(&case, false);
        let backward = render_case(&case, true);
        assert_eq!(forward.ip, backward.ip, "{}", case.display());
        assert_eq!(forward.ip6, backward.ip6, "{}", case.display());
        assert_eq!(forward.warnings, backward.warnings, "{}", case.display());
    }
}

#[test]
fn rendering_twice_gives_the_same_bytes() {
    for case in cases() {
        assert_eq!(
            render_case(&case, false).ip,
            render_case(&case, false).ip,
            "{}",
            case.display()
        );
    }
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The kernel is the judge of whether a golden file is a loadable ruleset.
#[test]
fn golden_files_are_accepted_by_nft_check() {
    let nft_present = Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !nft_present || !is_root() {
        let reason = if nft_present {
            "not root"
        } else {
            "nft is not installed"
        };
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the nft -c check, but {reason}"
        );
        eprintln!("skipping nft -c check of golden files: {reason}");
        return;
    }
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in cases() {
        for family in ["ip.nft", "ip6.nft"] {
            let path = case.join(family);
            if !path.exists() {
                continue;
            }
            // A fresh network namespace per file: the host's ruleset is never touched.
            let output = Command::new("unshare")
                .args(["--net", "nft", "-c", "-f"])
                .arg(&path)
                .output()
                .expect("unshare runs");
            checked += 1;
            if !output.status.success() {
                failures.push(format!(
                    "{}:\n{}",
                    path.display(),
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
        }
    }
    assert!(checked >= 30, "only {checked} files checked");
    assert!(
        failures.is_empty(),
        "nft -c rejected:\n{}",
        failures.join("\n")
    );
}
