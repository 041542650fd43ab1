//! The install as an admin renders it: `kubectl kustomize` by the pinned kubectl, on the
//! overlays and on the README's own kustomization for a cluster.

use std::path::Path;
use std::process::Command;

use nftproxy_testkit::{kubectl, repo_root, tool_available};
use serde_json::Value;

/// `kubectl kustomize DIR`, decoded; `None` (a named skip) without the pinned kubectl.
pub fn render(test: &str, dir: &Path) -> Option<Vec<Value>> {
    if !tool_available(test, &kubectl(), &["version", "--client"]) {
        return None;
    }
    let output = Command::new(kubectl())
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl runs");
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    Some(serde_saphyr::from_multiple(&text).expect("valid YAML"))
}

/// The object of `kind` named `name`, or generated from that name (`name-<hash>`).
pub fn object<T: serde::de::DeserializeOwned>(documents: &[Value], kind: &str, name: &str) -> T {
    let document = documents
        .iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"].as_str().is_some_and(|n| {
                    n == name
                        || n.strip_prefix(name)
                            .is_some_and(|rest| rest.len() == 11 && rest.starts_with('-'))
                })
        })
        .unwrap_or_else(|| panic!("a {kind} {name}"));
    serde_json::from_value(document.clone()).unwrap_or_else(|e| panic!("{kind} {name}: {e}"))
}

/// The README's kustomization for a cluster of one's own (the block after its marker),
/// each `(from, to)` replaced, rendered as the README lays it out: `my-cluster/` beside
/// a checkout named `nftproxy`.
pub fn render_readme_kustomization(test: &str, replace: &[(&str, &str)]) -> Option<Vec<Value>> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let after = readme
        .split_once("<!-- tested by tests/deploy.rs -->")
        .expect("the README marks its kustomization")
        .1;
    let mut text = after
        .split_once("```yaml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a yaml block after the marker")
        .0
        .to_owned();
    for (from, to) in replace {
        assert!(text.contains(from), "{from} in the README's kustomization");
        text = text.replace(from, to);
    }
    let dir =
        std::env::temp_dir().join(format!("nftproxy-kustomize-{}-{test}", std::process::id()));
    let cluster = dir.join("my-cluster");
    std::fs::create_dir_all(&cluster).expect("temp dir");
    std::os::unix::fs::symlink(repo_root(), dir.join("nftproxy")).expect("checkout link");
    std::fs::write(cluster.join("kustomization.yaml"), text).expect("written");
    let rendered = render(test, &cluster);
    let _ = std::fs::remove_dir_all(&dir);
    rendered
}
