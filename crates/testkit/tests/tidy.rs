//! The house rules that no compiler checks, as an ordinary test: the pure crates stay
//! free of runtimes, API clients and sockets; nothing in the repository points at a
//! document outside it; every golden case has its files.
//!
//! Invariant: each rule reads the repository as it is checked out (the crate graph
//! through `cargo tree`, offline), so a violation fails `cargo test` wherever it runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use nftproxy_testkit::repo_root;

/// The crates that must stay pure, and what they must never depend on, directly or not.
const PURE: [&str; 3] = ["nftproxy-nft", "nftproxy-model", "nftproxy-render"];
const FORBIDDEN: [&str; 12] = [
    "tokio",
    "kube",
    "kube-client",
    "kube-runtime",
    "libc",
    "nix",
    "mnl",
    "mnl-sys",
    "nftnl",
    "nftnl-sys",
    "hyper",
    "reqwest",
];

#[test]
fn the_pure_crates_depend_on_no_runtime_api_client_or_socket() {
    for krate in PURE {
        let output = Command::new(env!("CARGO"))
            .args(["tree", "--offline", "--locked", "-q", "-e", "normal"])
            .args(["--prefix", "none", "-p", krate])
            .current_dir(repo_root())
            .output()
            .expect("cargo tree runs");
        assert!(
            output.status.success(),
            "cargo tree -p {krate}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let tree = String::from_utf8_lossy(&output.stdout);
        let names: Vec<&str> = tree
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(names.contains(&krate), "{krate} is not in its own tree");
        let bad: Vec<&&str> = FORBIDDEN.iter().filter(|f| names.contains(f)).collect();
        assert!(bad.is_empty(), "pure crate {krate} depends on {bad:?}");
    }
}

/// Every file git tracks, as paths below the repository root.
fn tracked_files() -> Vec<PathBuf> {
    let output = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(repo_root())
        .output()
        .expect("git runs");
    assert!(output.status.success(), "git ls-files failed");
    output
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned()))
        .collect()
}

#[test]
fn nothing_points_at_documents_outside_the_repository() {
    // The notes the project was started from live beside the checkout, not in it: a
    // reader of the repository cannot follow a pointer to them.
    let outside = [
        "../shared",
        "shared/reference",
        "DESIGN.md",
        "kube-proxy-nftables.md",
        "rust-nftables-crates.md",
        "style-exemplars.md",
        "peers.md",
        "seeds/",
    ];
    let this_file = Path::new(file!());
    let mut found = Vec::new();
    for path in tracked_files() {
        if path.ends_with(this_file.file_name().unwrap_or_default()) {
            continue;
        }
        let Ok(text) = fs::read_to_string(repo_root().join(&path)) else {
            continue; // not text
        };
        for (n, line) in text.lines().enumerate() {
            if let Some(name) = outside.iter().find(|o| line.contains(*o)) {
                found.push(format!("{}:{}: {name}", path.display(), n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "pointers outside the repository:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_golden_case_has_its_files() {
    const REQUIRED: [&str; 3] = ["input.yaml", "expect.txt", "ip.nft"];
    const OPTIONAL: [&str; 3] = ["config.yaml", "ip6.nft", "warnings.txt"];
    let golden = repo_root().join("rules-golden");
    let mut problems = Vec::new();
    let mut cases = 0;
    for entry in fs::read_dir(&golden).expect("rules-golden exists") {
        let path = entry.expect("readable entry").path();
        if !path.is_dir() {
            continue;
        }
        cases += 1;
        let case = path.file_name().unwrap_or_default().to_string_lossy();
        for file in REQUIRED {
            let text = fs::read_to_string(path.join(file)).unwrap_or_default();
            if text.trim().is_empty() {
                problems.push(format!("{case}: {file} missing or empty"));
            }
        }
        for entry in fs::read_dir(&path).expect("readable case") {
            let name = entry.expect("readable entry").file_name();
            let name = name.to_string_lossy();
            if !REQUIRED.contains(&name.as_ref()) && !OPTIONAL.contains(&name.as_ref()) {
                problems.push(format!("{case}: unexpected file {name}"));
            }
        }
    }
    assert!(cases > 0, "no golden cases");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
