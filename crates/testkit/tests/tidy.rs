//! The house rules that no compiler checks, as an ordinary test: the pure crates stay
//! free of runtimes, API clients and sockets; the modules of a crate do not depend on
//! each other in a cycle; nothing in the repository points at a document outside it;
//! every golden case has its files.
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

/// The modules of one crate (its `src/*.rs` files and `src/*/` directories, but the
/// root) and, for each, the sibling modules its code (a directory's files together) names
/// as `crate::module`, comments left out.
fn module_graph(src: &Path) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut modules: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for entry in fs::read_dir(src).expect("src readable") {
        let path = entry.expect("readable entry").path();
        let name = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if path.is_dir() {
            let files = fs::read_dir(&path)
                .expect("module directory readable")
                .map(|e| e.expect("readable entry").path())
                .filter(|p| p.extension().is_some_and(|e| e == "rs"))
                .collect();
            modules.push((name, files));
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            modules.push((name, vec![path]));
        }
    }
    let names: Vec<&String> = modules.iter().map(|(name, _)| name).collect();
    let mut graph = std::collections::BTreeMap::new();
    for (module, files) in &modules {
        let text: String = files
            .iter()
            .map(|f| fs::read_to_string(f).expect("readable"))
            .collect::<Vec<_>>()
            .join("\n");
        let code: String = text
            .lines()
            .map(|l| l.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        // `crate::a::b`, and `use crate::{a, b::c}` written on one or more lines.
        let ident = |item: &str| -> String {
            item.trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        };
        let named: Vec<String> = code
            .match_indices("crate::")
            .flat_map(|(at, _)| {
                let rest = &code[at + "crate::".len()..];
                match rest.strip_prefix('{') {
                    Some(group) => group
                        .split('}')
                        .next()
                        .unwrap_or_default()
                        .split(',')
                        .map(ident)
                        .collect(),
                    None => vec![ident(rest)],
                }
            })
            .collect();
        let mut uses: Vec<String> = names
            .iter()
            .filter(|m| **m != module && named.contains(m))
            .map(|m| (*m).clone())
            .collect();
        uses.sort();
        graph.insert(module.clone(), uses);
    }
    graph
}

/// A cycle in `graph`, if any, as the modules along it.
fn cycle(graph: &std::collections::BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    fn visit(
        graph: &std::collections::BTreeMap<String, Vec<String>>,
        module: &str,
        path: &mut Vec<String>,
        done: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| m == module) {
            let mut found = path[at..].to_vec();
            found.push(module.to_owned());
            return Some(found);
        }
        if done.iter().any(|m| m == module) {
            return None;
        }
        path.push(module.to_owned());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(found) = visit(graph, next, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.push(module.to_owned());
        None
    }
    let mut done = Vec::new();
    graph
        .keys()
        .find_map(|m| visit(graph, m, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_a_cycle_between_its_modules() {
    let crates = fs::read_dir(repo_root().join("crates")).expect("crates readable");
    let mut cycles = Vec::new();
    for krate in crates {
        let src = krate.expect("readable entry").path().join("src");
        if let Some(found) = src.is_dir().then(|| cycle(&module_graph(&src))).flatten() {
            cycles.push(format!("{}: {}", src.display(), found.join(" -> ")));
        }
    }
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
    // The check sees a cycle where there is one.
    let mut graph = std::collections::BTreeMap::new();
    graph.insert("a".to_owned(), vec!["b".to_owned()]);
    graph.insert("b".to_owned(), vec!["a".to_owned()]);
    assert!(cycle(&graph).is_some());
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
    const OPTIONAL: [&str; 4] = [
        "config.yaml",
        "ip6.nft",
        "warnings.txt",
        "local-addresses.txt",
    ];
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
