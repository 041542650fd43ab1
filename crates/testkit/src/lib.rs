//! Test support shared by nftproxy's test suites (and the benchmark's fake API server):
//! the golden cases and how they are built, `nft list` normalisation, and the check for
//! a usable kernel.
//!
//! Invariant: every suite builds a golden case the same way (the defaults documented in
//! `rules-golden/README.md`), so a case means the same thing in every test.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use nftproxy_model::{Build, KubeProxyConfiguration, ProxyConfig, Severity, Snapshot, build};

#[cfg(feature = "fake-api")]
pub mod fake_api;

/// Node name unless a case says otherwise.
pub const DEFAULT_NODE_NAME: &str = "test-node";
/// Node IP unless a case has a Node object or a `bindAddress`.
pub const DEFAULT_NODE_IP: &str = "192.168.0.2";
/// Cluster CIDRs unless a case's config sets `clusterCIDR`.
pub const DEFAULT_CLUSTER_CIDRS: &str = "10.0.0.0/8,fd00:10::/64";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The seed examples (`hack/examples/seed/`, the user's Services) as one multi-document
/// YAML text, files in name order.
pub fn seed_manifests() -> String {
    let dir = repo_root().join("hack/examples/seed");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Every `rules-golden/<case>/` directory with an `input.yaml`, in name order.
pub fn golden_cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = fs::read_dir(repo_root().join("rules-golden"))
        .expect("rules-golden exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.join("input.yaml").is_file())
        .collect();
    cases.sort();
    cases
}

/// A case's directory name.
pub fn case_name(case: &Path) -> String {
    case.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A golden case built into proxy state, with its warnings.
pub struct BuiltCase {
    /// Both families' state.
    pub build: Build,
    /// The warnings (invalid objects), one line each, sorted.
    pub warnings: String,
}

/// Builds a golden case; with `reverse_input` every object list is reversed first (the
/// output must not change).
pub fn build_case(case: &Path, reverse_input: bool) -> BuiltCase {
    let text = fs::read_to_string(case.join("input.yaml")).expect("input.yaml readable");
    let mut snapshot = Snapshot::default();
    let report = snapshot.add_manifest("input.yaml", &text);
    if let Some(error) = report.errors.first() {
        panic!("{}: {error}", case.display());
    }
    let mut diagnostics = report.diagnostics;
    if reverse_input {
        snapshot.services.reverse();
        snapshot.endpoint_slices.reverse();
        snapshot.nodes.reverse();
        snapshot.service_cidrs.reverse();
    }
    // The namespace's interface addresses, when the case gives them: one per line.
    if let Ok(text) = fs::read_to_string(case.join("local-addresses.txt")) {
        let addresses = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or_default().trim())
            .filter(|l| !l.is_empty())
            .map(|l| {
                l.parse()
                    .unwrap_or_else(|e| panic!("{}: {l}: {e}", case.display()))
            })
            .collect();
        snapshot.local_addresses = Some(addresses);
    }
    let mut config = default_config();
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
    let built = build(&snapshot, &config);
    diagnostics.extend(built.diagnostics.iter().cloned());
    diagnostics.sort();
    let warnings = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Invalid)
        .map(|d| format!("{d}\n"))
        .collect();
    BuiltCase {
        build: built,
        warnings,
    }
}

/// The golden defaults before a case's own config: node name and cluster CIDRs.
fn default_config() -> ProxyConfig {
    let mut config = ProxyConfig::new(DEFAULT_NODE_NAME);
    config.cluster_cidrs =
        nftproxy_model::config::parse_cidr_list("clusterCIDR", DEFAULT_CLUSTER_CIDRS)
            .expect("default CIDRs parse");
    config
}

/// The tables for a YAML manifest under the golden defaults (node `test-node`,
/// `192.168.0.2`, cluster CIDRs `10.0.0.0/8,fd00:10::/64`).
pub fn tables_from_yaml(yaml: &str) -> Vec<nftproxy_nft::Table> {
    let mut snapshot = Snapshot::default();
    let report = snapshot.add_manifest("inline.yaml", yaml);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let mut config = default_config();
    config
        .node_ips
        .push(DEFAULT_NODE_IP.parse().expect("literal"));
    nftproxy_render::render_all(&build(&snapshot, &config))
}

/// The rendered tables of every golden case: `(case, table)` for IPv4 and, where the
/// case has it, IPv6.
pub fn golden_tables() -> Vec<(String, nftproxy_nft::Table)> {
    let mut tables = Vec::new();
    for case in golden_cases() {
        let built = build_case(&case, false).build;
        for table in nftproxy_render::render_all(&built) {
            tables.push((format!("{}/{}", case_name(&case), table.family), table));
        }
    }
    tables
}

/// `nft list` output made comparable: the kernel lists chains and sets in creation order
/// and elements in hash order, so blocks and elements are sorted; blank lines and
/// indentation are dropped, and so are the numbers of counters (`counter packets 3
/// bytes 180` reads `counter`, as nftproxy writes it). nft names layer-4 protocols from `/etc/protocols`, and prints
/// numbers on a host without it, so a number that stands alone where a protocol may
/// (6, 17, 132) reads as its name on either side of a comparison.
pub fn normalise_listing(listing: &str) -> String {
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut elements: Option<String> = None;
    let named = without_counts(&named_protocols(listing));
    let mut lines: Vec<&str> = named
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    // The table's own closing brace would otherwise stick to whichever block is last.
    lines.pop_if(|l| *l == "}");
    for line in lines {
        if let Some(open) = elements.as_mut() {
            open.push(' ');
            open.push_str(line);
        } else if let Some(rest) = line.strip_prefix("elements = { ") {
            elements = Some(rest.to_owned());
        } else {
            if ["chain ", "set ", "map ", "table "]
                .iter()
                .any(|k| line.starts_with(k))
            {
                blocks.push(std::mem::take(&mut current));
            }
            current.push(line.to_owned());
        }
        if let Some(done) = elements.as_ref().filter(|e| e.ends_with('}')) {
            let inner = done.trim_end_matches('}').trim();
            // An element's counter is the set's doing (its `counter` line), which nft
            // lists on every element and nftproxy writes once.
            let mut items: Vec<String> = inner
                .split(',')
                .map(|item| {
                    let words = item.split_whitespace().filter(|w| *w != "counter");
                    words.collect::<Vec<_>>().join(" ")
                })
                .collect();
            items.sort_unstable();
            current.push(format!("elements = {{ {} }}", items.join(", ")));
            elements = None;
        }
    }
    blocks.push(current);
    let mut blocks: Vec<String> = blocks
        .into_iter()
        .filter(|b| !b.is_empty())
        .map(|b| b.join("\n"))
        .collect();
    blocks.sort();
    blocks.join("\n")
}

/// `text` with every `counter packets N bytes M` cut to `counter`.
fn without_counts(text: &str) -> String {
    let digits = |t: &str| t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("counter packets ") {
        let (before, after) = rest.split_at(at + "counter".len());
        out.push_str(before);
        let after = &after[" packets ".len()..];
        let after = &after[after.len() - digits(after)..];
        let after = after.strip_prefix(" bytes ").unwrap_or(after);
        rest = &after[after.len() - digits(after)..];
    }
    out.push_str(rest);
    out
}

/// `nft list` output with the protocol numbers nftproxy uses (a word of their own: 6, 17,
/// 132) written as nft names them when `/etc/protocols` is there, so that what a test
/// looks for does not depend on the host's naming files.
pub fn named_protocols(listing: &str) -> String {
    listing
        .lines()
        .map(named_in_line)
        .collect::<Vec<_>>()
        .join("\n")
}

fn named_in_line(line: &str) -> String {
    line.split(' ')
        .map(|token| {
            let (word, rest) = token.split_at(token.trim_end_matches([',', '}']).len());
            let name = match word {
                "6" => "tcp",
                "17" => "udp",
                "132" => "sctp",
                other => other,
            };
            format!("{name}{rest}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The node the seed examples (`hack/examples/seed/`) are written for: its name, address and
/// pod network, as command-line flags.
pub const SEED_NODE_FLAGS: [&str; 6] = [
    "--node-name",
    "node-a",
    "--node-ip",
    "192.168.50.10",
    "--cluster-cidr",
    "10.244.0.0/16",
];

/// Runs `command` with `input` on its standard input and returns what it printed.
pub fn run_with_input(command: &mut Command, input: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("command starts");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .expect("stdin writable");
    child.wait_with_output().expect("command finishes")
}

/// Like [`run_with_input`], failing the test with the command's stderr unless it
/// succeeds; returns its stdout.
pub fn run_ok(command: &mut Command, input: &str) -> String {
    let output = run_with_input(command, input);
    assert!(
        output.status.success(),
        "{:?}: {}",
        command,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether kernel tests can run (root and the `nft` tool). Without them a test prints
/// why it skips; under `CI`, where both must exist, it fails instead.
pub fn kernel_available(test: &str) -> bool {
    let root = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let nft = Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && nft {
        return true;
    }
    let reason = if root {
        "nft is not installed"
    } else {
        "not root"
    };
    skip(test, reason)
}

/// Whether `program args` runs and exits 0: a tool a test needs (podman, promtool,
/// kubectl). Without it the test is skipped by name, and fails under `CI`.
pub fn tool_available(test: &str, program: &Path, args: &[&str]) -> bool {
    let runs = Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success());
    runs || skip(test, &format!("{} does not run", program.display()))
}

/// The kubectl `hack/install-deps.sh` installs, in the version it pins (one already on
/// the machine may be older).
pub fn kubectl() -> PathBuf {
    repo_root().join("target/tools/kubectl/bin/kubectl")
}

/// Says that `test` cannot run and why; under `CI`, where everything must run, fails.
fn skip(test: &str, reason: &str) -> bool {
    assert!(!under_ci(), "{test}: CI must run this test, but {reason}");
    eprintln!("skipping {test}: {reason}");
    // cargo shows nothing of a passing test's output: hack/test.sh names and counts the
    // skips from this file.
    if let Some(path) = std::env::var_os("NFTPROXY_SKIPPED") {
        use std::io::Write;
        let line = format!("{test}: {reason}\n");
        let file = fs::OpenOptions::new().append(true).create(true).open(path);
        let _ = file.and_then(|mut f| f.write_all(line.as_bytes()));
    }
    false
}

/// Whether this run is CI: `CI` set to anything but empty or `false` (as CI services set
/// it, and `.ci/run` does).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_compare_as_sets_of_blocks() {
        let a = "table ip t {\n\tchain b {\n\t\tdrop\n\t}\n\n\tset s {\n\t\telements = { 2, 1 }\n\t}\n}\n";
        let b = "table ip t {\n\tset s {\n\t\telements = { 1,\n\t\t\t     2 }\n\t}\n\tchain b {\n\t\tdrop\n\t}\n}\n";
        assert_eq!(normalise_listing(a), normalise_listing(b));
        let c = a.replace("drop", "accept");
        assert_ne!(normalise_listing(a), normalise_listing(&c));
    }

    #[test]
    fn counters_compare_without_their_numbers() {
        let listed = "\t\telements = { 10.0.0.1 counter packets 3 bytes 180 comment \"a\" }\n\t\tip daddr 10.0.0.0/8 counter packets 0 bytes 0 drop\n";
        let written = "\t\telements = { 10.0.0.1 counter comment \"a\" }\n\t\tip daddr 10.0.0.0/8 counter drop\n";
        assert_eq!(normalise_listing(listed), normalise_listing(written));
        let other = written.replace("counter drop", "drop");
        assert_ne!(normalise_listing(listed), normalise_listing(&other));
    }

    #[test]
    fn protocols_compare_the_same_named_or_numbered() {
        let named = "\t\telements = { 10.0.0.1 . tcp . 6379 comment \"a\",\n\t\t\t     udp . 53 }\n\t\tmeta l4proto sctp drop\n";
        let numbered = "\t\telements = { 10.0.0.1 . 6 . 6379 comment \"a\",\n\t\t\t     17 . 53 }\n\t\tmeta l4proto 132 drop\n";
        assert_eq!(normalise_listing(named), normalise_listing(numbered));
        let other = numbered.replace("6379", "6378");
        assert_ne!(normalise_listing(named), normalise_listing(&other));
    }
}
