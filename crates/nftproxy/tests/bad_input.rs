//! The bad-input corpus (`tests/bad-input/`, plus a few inputs too large to commit,
//! generated here): each hostile manifest is programmed together with the seed examples
//! into a fresh network namespace. For every one the process must exit normally, name
//! the offending object (`# expect:` lines), program the valid Services of the same file
//! (`# programs:` lines) and leave the seed Services' rules exactly as without it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nftproxy_netlink::NetlinkBackend;
use nftproxy_netlink::netns::in_new_netns;
use nftproxy_nft::{Backend, Family, Table};
use nftproxy_testkit::{SEED_NODE_FLAGS, kernel_available, repo_root};

/// One hostile input and what its run must show.
struct Case {
    name: String,
    path: PathBuf,
    /// Text stderr must contain.
    expect: Vec<String>,
    /// `namespace/name` of Services that must be programmed.
    programs: Vec<String>,
}

impl Case {
    fn from_file(path: PathBuf) -> Case {
        let text = String::from_utf8_lossy(&std::fs::read(&path).expect("readable")).into_owned();
        let header = |key: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .collect()
        };
        Case {
            name: path
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned(),
            expect: header("# expect:"),
            programs: header("# programs:"),
            path,
        }
    }
}

/// Inputs measured in megabytes, written to `dir`.
fn generated_cases(dir: &Path) -> Vec<Case> {
    let ten_mb = "x".repeat(10 << 20);
    let endpoints: String = (0..100_000u32)
        .map(|i| {
            format!(
                "- addresses: [10.{}.{}.{}]\n",
                200 + i / 65_536,
                i / 256 % 256,
                i % 256
            )
        })
        .collect();
    let inputs = [
        (
            "ten-megabyte-strings.yaml",
            format!(
                "kind: Service\nmetadata: {{name: {ten_mb}, namespace: bad}}\n\
                 spec: {{clusterIP: 10.96.9.1, ports: [{{port: 80}}]}}\n---\n\
                 kind: Service\nmetadata:\n  name: ok-annotated\n  namespace: good\n  \
                 annotations: {{note: \"{ten_mb}\"}}\n  labels: {{big: \"{ten_mb}\"}}\n\
                 spec: {{clusterIP: 10.96.9.2, ports: [{{port: 80}}]}}\n"
            ),
            vec!["Service bad/xxxxxxxx", "name is 10485760 characters long"],
            vec!["good/ok-annotated"],
        ),
        (
            "hundred-thousand-endpoints.yaml",
            format!(
                "kind: Service\nmetadata: {{name: ok-big, namespace: good}}\n\
                 spec: {{clusterIP: 10.96.9.3, ports: [{{name: http, port: 80}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: big-1, namespace: good, labels: {{kubernetes.io/service-name: ok-big}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: 80}}]\nendpoints:\n{endpoints}"
            ),
            vec!["EndpointSlice good/big-1: 100000 endpoints"],
            vec!["good/ok-big"],
        ),
    ];
    inputs
        .into_iter()
        .map(|(name, text, expect, programs)| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("temp file");
            Case {
                name: name.to_owned(),
                path,
                expect: expect.into_iter().map(str::to_owned).collect(),
                programs: programs.into_iter().map(str::to_owned).collect(),
            }
        })
        .collect()
}

fn nftproxy(mode: &[&str], manifests: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nftproxy"))
        .args(mode)
        .args(SEED_NODE_FLAGS)
        .arg("--manifests")
        .args(manifests)
        .current_dir(repo_root())
        .env_remove("RUST_LOG")
        .output()
        .expect("nftproxy runs")
}

fn listed() -> Table {
    NetlinkBackend::open()
        .expect("socket")
        .list(Family::Ip, "nftproxy")
        .expect("list")
        .expect("table exists")
}

/// Everything of `reference` that belongs to the seed Services (namespace `default`) is
/// in `table` unchanged: their chains rule for rule, their set and map elements.
fn seed_problems(reference: &Table, table: &Table) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, chain) in reference
        .chains
        .iter()
        .filter(|(n, _)| n.contains("default/"))
    {
        if table.chains.get(name) != Some(chain) {
            problems.push(format!("chain {name} differs or is missing"));
        }
    }
    for (name, set) in &reference.sets {
        for element in set.elements.values() {
            let key = element.key();
            let found = table.sets.get(name).and_then(|s| s.elements.get(&key));
            if found != Some(element) {
                problems.push(format!("{name}: element {key:?} differs or is missing"));
            }
        }
    }
    problems
}

fn check(case: &Case, output: &Output, table: &Table, reference: &Table) -> Vec<String> {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut problems = Vec::new();
    let broken_document = stderr.contains("ERROR skipping document");
    match output.status.code() {
        Some(0) if !broken_document => {}
        Some(1) if broken_document => {}
        other => problems.push(format!("exit {other:?}")),
    }
    if stderr.contains("panicked") {
        problems.push("panicked".to_owned());
    }
    for expect in &case.expect {
        if !stderr.contains(expect.as_str()) {
            problems.push(format!("stderr does not name {expect:?}"));
        }
    }
    for service in &case.programs {
        // A Service's destinations have elements (where they go with endpoints, or
        // no-endpoint verdicts without), commented `namespace/name[:port]`.
        let named = table.sets.values().any(|set| {
            set.elements.values().any(|e| {
                e.comment()
                    .and_then(|c| c.strip_prefix(service.as_str()))
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
            })
        });
        if !named {
            problems.push(format!("Service {service} is not programmed"));
        }
    }
    problems.extend(seed_problems(reference, table));
    if !problems.is_empty() {
        let shown: String = stderr.chars().take(2_000).collect();
        problems.push(format!("stderr:\n{shown}"));
    }
    problems
}

#[test]
fn every_hostile_input_is_named_and_the_valid_rest_programmed() {
    if !kernel_available("every_hostile_input_is_named_and_the_valid_rest_programmed") {
        return;
    }
    let corpus = repo_root().join("crates/nftproxy/tests/bad-input");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .expect("corpus")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 40, "the corpus holds {} files", files.len());
    let temp = std::env::temp_dir().join(format!("nftproxy-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&temp).expect("temp dir");
    let mut cases: Vec<Case> = files.into_iter().map(Case::from_file).collect();
    cases.extend(generated_cases(&temp));

    let failures = in_new_netns(move || {
        let seed = repo_root().join("hack/examples/seed");
        let output = nftproxy(&["--once"], &[&seed]);
        assert!(output.status.success(), "{output:?}");
        let reference = listed();
        let mut failures = Vec::new();
        for case in &cases {
            let output = nftproxy(&["--once"], &[&case.path, &seed]);
            let mut problems = check(case, &output, &listed(), &reference);
            // What the kernel holds is the whole valid input, not just the parts checked.
            let diff = nftproxy(&["--dry-run", "--diff"], &[&case.path, &seed]);
            if !String::from_utf8_lossy(&diff.stdout).contains("nothing to do") {
                problems.push("the kernel does not hold the whole ruleset".to_owned());
            }
            if !problems.is_empty() {
                failures.push(format!("{}:\n  {}", case.name, problems.join("\n  ")));
            }
        }
        failures
    })
    .expect("new network namespace");
    let _ = std::fs::remove_dir_all(&temp);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `kubectl get -o json` takes another decoder than YAML: every corpus file that is
/// well-formed YAML, written as one JSON List of its documents, must be named and
/// rendered exactly as the YAML is.
#[test]
fn the_corpus_as_json_is_read_as_its_yaml() {
    let corpus = repo_root().join("crates/nftproxy/tests/bad-input");
    let temp = std::env::temp_dir().join(format!("nftproxy-bad-json-{}", std::process::id()));
    std::fs::create_dir_all(&temp).expect("temp dir");
    let without_times = |output: &Output| -> Vec<String> {
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .map(|l| l.split_once(' ').map_or(l, |(_, rest)| rest).to_owned())
            .collect()
    };
    let mut compared = Vec::new();
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(&corpus).expect("corpus") {
        let yaml = entry.expect("entry").path();
        if yaml.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        // Broken YAML, what the parser refuses (alias bombs, deep nesting) and what is
        // not text have no JSON twin.
        let Ok(text) = String::from_utf8(std::fs::read(&yaml).expect("readable")) else {
            continue;
        };
        let Ok(documents) = serde_saphyr::from_multiple::<serde_json::Value>(&text) else {
            continue;
        };
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": documents});
        let json = temp.join("case.json");
        std::fs::write(&json, list.to_string()).expect("temp file");
        let (from_yaml, from_json) = (
            nftproxy(&["--dry-run"], &[&yaml]),
            nftproxy(&["--dry-run"], &[&json]),
        );
        let name = yaml
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if from_yaml.stdout != from_json.stdout {
            failures.push(format!("{name}: the rendered rules differ"));
        }
        if without_times(&from_yaml) != without_times(&from_json) {
            failures.push(format!(
                "{name}: YAML says\n{}\nJSON says\n{}",
                String::from_utf8_lossy(&from_yaml.stderr),
                String::from_utf8_lossy(&from_json.stderr)
            ));
        }
        compared.push(name);
    }
    let _ = std::fs::remove_dir_all(&temp);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        compared.len() >= 30,
        "only {} files compared",
        compared.len()
    );
}

/// A List over 1 MiB whose own metadata comes first, with a double-quoted annotation
/// continued at the margin that holds an `items:` line and items: the parallel reader
/// once took those for the List's items and dropped the real ones. Every mode reads it
/// as the YAML parser does (its reading, written as JSON, is the reference): the same
/// ruleset, programmed by `--once` and by the daemon watching the file, and the same
/// diagnostics.
#[test]
fn a_list_with_items_inside_a_string_is_read_as_the_parser_reads_it_in_every_mode() {
    let test = "a_list_with_items_inside_a_string_is_read_as_the_parser_reads_it_in_every_mode";
    if !kernel_available(test) {
        return;
    }
    let item = |name: &str, i: u32, port: u32| {
        format!(
            "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: {name}\n    namespace: lists\n  \
             spec:\n    clusterIP: 10.99.{}.{}\n    ports:\n    - port: {port}\n      protocol: TCP\n",
            i / 250,
            i % 250 + 1
        )
    };
    let fake: String = (0..3)
        .map(|i| item(&format!("fake-{i}"), 60_000 + i, 80))
        .collect();
    // Every thousandth is invalid: its diagnostic must be the parser's too.
    let real: String = (0..7_185)
        .map(|i| item(&format!("real-{i}"), i, if i % 1_000 == 7 { 0 } else { 80 }))
        .collect();
    let text = format!(
        "apiVersion: v1\nkind: List\nmetadata:\n  annotations:\n    note: \"look\nitems:\n{fake}\"\nitems:\n{real}"
    );
    assert!(text.len() > 1 << 20);
    let dir =
        std::env::temp_dir().join(format!("nftproxy-items-in-a-string-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let yaml = dir.join("list.yaml");
    std::fs::write(&yaml, &text).expect("temp file");
    let parsed: serde_json::Value = serde_saphyr::from_str(&text).expect("the parser reads it");
    let json = dir.join("list.json");
    std::fs::write(&json, parsed.to_string()).expect("temp file");

    let warnings = |stderr: &[u8]| -> Vec<String> {
        let mut lines: Vec<String> = String::from_utf8_lossy(stderr)
            .lines()
            .filter_map(|l| Some(l.split_once("skipping ")?.1.to_owned()))
            .collect();
        lines.sort();
        lines
    };
    let (from_yaml, from_json) = (
        nftproxy(&["--dry-run"], &[&yaml]),
        nftproxy(&["--dry-run"], &[&json]),
    );
    assert!(from_yaml.status.success() && from_json.status.success());
    let rules = String::from_utf8_lossy(&from_json.stdout).into_owned();
    assert!(
        rules.contains("lists/real-7184") && !rules.contains("fake"),
        "the reference reads the real items"
    );
    assert_eq!(
        String::from_utf8_lossy(&from_yaml.stdout),
        rules,
        "--dry-run"
    );
    let said = warnings(&from_json.stderr);
    assert_eq!(said.len(), 8, "{said:?}");
    assert_eq!(warnings(&from_yaml.stderr), said, "--dry-run diagnostics");

    let (yaml_once, json_once) = (yaml.clone(), json.clone());
    let once = in_new_netns(move || {
        let output = nftproxy(&["--once"], &[&yaml_once]);
        let diff = nftproxy(&["--dry-run", "--diff"], &[&json_once]);
        (output, String::from_utf8_lossy(&diff.stdout).into_owned())
    })
    .expect("new network namespace");
    assert!(once.0.status.success(), "{once:?}");
    assert!(
        once.1.contains("nothing to do"),
        "--once programmed another ruleset:\n{}",
        once.1
    );
    assert_eq!(warnings(&once.0.stderr), said, "--once diagnostics");

    let (yaml_daemon, json_daemon) = (yaml.clone(), json.clone());
    let log = dir.join("daemon.log");
    let daemon_log = log.clone();
    let diff = in_new_netns(move || {
        let mut daemon = Command::new(env!("CARGO_BIN_EXE_nftproxy"))
            .args(SEED_NODE_FLAGS)
            .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
            .arg("--manifests")
            .arg(&yaml_daemon)
            .stderr(std::fs::File::create(&daemon_log).expect("log"))
            .spawn()
            .expect("nftproxy starts");
        let start = std::time::Instant::now();
        let mut diff = String::new();
        while start.elapsed() < std::time::Duration::from_secs(60) {
            let output = nftproxy(&["--dry-run", "--diff"], &[&json_daemon]);
            diff = String::from_utf8_lossy(&output.stdout).into_owned();
            if diff.contains("nothing to do") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let _ = daemon.kill();
        let _ = daemon.wait();
        diff
    })
    .expect("new network namespace");
    assert!(
        diff.contains("nothing to do"),
        "the daemon programmed another ruleset:\n{diff}"
    );
    let logged = std::fs::read(&log).expect("daemon log");
    assert_eq!(warnings(&logged), said, "the daemon's diagnostics");
    let _ = std::fs::remove_dir_all(&dir);
}
