//! Golden tests: every `rules-golden/<case>/` directory is rendered and compared byte for
//! byte with its expected files, and every expected file is checked by the kernel with
//! `nft -c -f` in a fresh network namespace.
//!
//! `UPDATE_GOLDEN=1` rewrites the expected files (refused when `CI` is set). Adding a case
//! needs no code: see `rules-golden/README.md`.

use std::fs;
use std::path::Path;
use std::process::Command;

use nftproxy_render::render;
use nftproxy_testkit::{build_case, golden_cases as cases, kernel_available};

struct Rendered {
    ip: String,
    ip6: Option<String>,
    warnings: String,
}

fn render_case(case: &Path, reverse_input: bool) -> Rendered {
    let built = build_case(case, reverse_input);
    Rendered {
        ip: render(&built.build.ipv4).to_string(),
        ip6: built
            .build
            .ipv6
            .is_active()
            .then(|| render(&built.build.ipv6).to_string()),
        warnings: built.warnings,
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
            !nftproxy_testkit::under_ci(),
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

/// The kernel is the judge of whether a golden file is a loadable ruleset.
#[test]
fn golden_files_are_accepted_by_nft_check() {
    if !kernel_available("golden_files_are_accepted_by_nft_check") {
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
