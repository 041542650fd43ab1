//! `diff` over real rendered tables: every pair of golden cases, in memory, and a chain of
//! them through the kernel (`nft -f` of the diff's text in a scratch network namespace).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nftproxy_nft::{Table, diff};

fn golden_tables() -> Vec<(String, Table)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../rules-golden");
    let mut cases: Vec<PathBuf> = fs::read_dir(&root)
        .expect("rules-golden exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("input.yaml").is_file())
        .collect();
    cases.sort();
    let mut tables = Vec::new();
    for case in cases {
        let text = fs::read_to_string(case.join("input.yaml")).expect("input");
        let mut snapshot = nftproxy_model::Snapshot::default();
        snapshot.add_manifest("input.yaml", &text).expect("yaml");
        let mut config = nftproxy_model::ProxyConfig::new("test-node");
        if let Ok(text) = fs::read_to_string(case.join("config.yaml")) {
            let file = nftproxy_model::KubeProxyConfiguration::parse(&text).expect("config");
            config.apply_file(&file).expect("config applies");
        }
        if config.node_ips.is_empty() {
            config
                .node_ips
                .push("192.168.0.2".parse().expect("literal"));
        }
        let built = nftproxy_model::build(&snapshot, &config);
        let name = case
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        tables.push((name, nftproxy_render::render(&built.ipv4)));
    }
    tables
}

#[test]
fn diff_between_any_two_cases_reaches_the_target() {
    let tables = golden_tables();
    for (from_name, from) in &tables {
        for (to_name, to) in &tables {
            let tx = diff(Some(from), to);
            let after = tx
                .apply_to(Some(from.clone()))
                .unwrap_or_else(|e| panic!("{from_name} -> {to_name}: {e}\n{tx}"));
            assert_eq!(after.as_ref(), Some(to), "{from_name} -> {to_name}");
            if from_name == to_name {
                assert!(
                    tx.is_empty(),
                    "{from_name}: a no-change diff has operations:\n{tx}"
                );
            }
        }
    }
}

/// `nft list ruleset` output made comparable: the kernel lists chains and sets in
/// creation order and elements in hash order, so blocks and elements are sorted.
fn normalise(listing: &str) -> String {
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut elements: Option<String> = None;
    let mut lines: Vec<&str> = listing
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
            if ["chain ", "set ", "map "]
                .iter()
                .any(|k| line.starts_with(k))
            {
                blocks.push(std::mem::take(&mut current));
            }
            current.push(line.to_owned());
        }
        if let Some(done) = elements.as_ref().filter(|e| e.ends_with('}')) {
            let inner = done.trim_end_matches('}').trim();
            let mut items: Vec<&str> = inner.split(',').map(str::trim).collect();
            items.sort_unstable();
            current.push(format!("elements = {{ {} }}", items.join(", ")));
            elements = None;
        }
    }
    blocks.push(current);
    let mut blocks: Vec<String> = blocks.into_iter().map(|b| b.join("\n")).collect();
    blocks.sort();
    blocks.join("\n")
}

/// Runs `script` (shell) in a fresh network namespace and returns its stdout.
fn in_netns(script: &str, stdin: &str) -> String {
    let mut child = Command::new("unshare")
        .args(["--net", "sh", "-ec", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write");
    let output = child.wait_with_output().expect("wait");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn kernel_available() -> bool {
    let root = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let nft = Command::new("nft").arg("--version").output().is_ok();
    if !(root && nft) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run kernel tests (root and nft)"
        );
        eprintln!("skipping kernel diff test: needs root and nft");
    }
    root && nft
}

#[test]
fn diff_text_applied_by_the_kernel_reaches_the_target() {
    if !kernel_available() {
        return;
    }
    let tables = golden_tables();
    for pair in tables.windows(2) {
        let ((from_name, from), (to_name, to)) = (&pair[0], &pair[1]);
        let tx = diff(Some(from), to);
        // Load the source table, then the diff, in one namespace; the target alone in
        // another. The kernel must end up holding the same thing.
        let script = "f=$(mktemp); cat > $f; csplit -s -f $f. $f '/^### DIFF$/'; \
                      nft -f $f.00; tail -n +2 $f.01 > $f.02; nft -f $f.02; nft list ruleset; rm -f $f $f.*";
        let stepped = in_netns(script, &format!("{from}### DIFF\n{tx}"));
        let direct = in_netns("nft -f -; nft list ruleset", &to.to_string());
        assert_eq!(
            normalise(&stepped),
            normalise(&direct),
            "{from_name} -> {to_name}:\n{tx}"
        );
    }
}
