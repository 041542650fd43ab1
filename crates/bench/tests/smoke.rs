//! The benchmark itself, small: every measurement runs and reports numbers that make
//! sense (a sync with nothing changed sends nothing; the changes send something; every
//! connection through the rules completes; the daemon answers every `/healthz` request
//! while it loads), so `hack/bench.sh` cannot rot unnoticed. It runs the `nftproxy`
//! binary built beside the benchmark (`cargo test --workspace` builds both).

use std::process::Command;

use nftproxy_testkit::kernel_available;
use serde_json::Value;

#[test]
fn a_small_benchmark_runs_end_to_end() {
    if !kernel_available("a_small_benchmark_runs_end_to_end") {
        return;
    }
    let json = std::env::temp_dir().join(format!("nftproxy-bench-{}.json", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_nftproxy-bench"))
        .args([
            "--services",
            "200",
            "--wide-loads",
            "50x5",
            "--latency",
            "20",
            "--daemon-loads",
            "300x5",
            "--churn-services",
            "200",
            "--churn-rate",
            "20",
            "--churn-seconds",
            "2",
            "--counters-cost",
            "200",
            "--manifest-services",
            "300",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("bench runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("| 200 x 5 |"), "{table}");
    let results: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("json");
    let _ = std::fs::remove_file(&json);
    let row = &results["rows"][0];
    assert!(row["nft_same_text"]["seconds"].as_f64() > Some(0.0));
    assert!(row["nft_upstream_shape"]["rss_kb"].as_u64() > Some(0));
    let syncs = row["nftproxy"]["syncs"].as_array().expect("syncs");
    let operations = |what: &str| {
        syncs
            .iter()
            .find(|s| s["what"] == what)
            .and_then(|s| s["operations"].as_u64())
            .unwrap_or_else(|| panic!("no sync {what:?}"))
    };
    assert!(operations("cold load") > 1_000);
    // An endpoint added to a ClusterIP Service: one endpoint element and one hairpin
    // element, and the rule of a count that comes into use. The first endpoint removed:
    // the freed and the last slot go, the last endpoint comes back in the freed slot, one
    // hairpin element, and the rule of a count that falls out of use.
    assert_eq!(
        operations("one endpoint added (a new count: its rule comes)"),
        3
    );
    assert_eq!(operations("one endpoint added (a count in use)"), 2);
    assert_eq!(operations("one endpoint removed (the first)"), 4);
    assert_eq!(
        operations("one endpoint removed (the first, the last of its count: its rule goes)"),
        5
    );
    for change in ["one service added", "one service removed"] {
        assert!(
            (1..50).contains(&operations(change)),
            "{change}: {}",
            operations(change)
        );
    }
    assert_eq!(operations("nothing changed"), 0);
    // The drift checks ran (each fails the run when it wants to read back or repair).
    for check in [
        "drift check, nothing changed (generation asked)",
        "drift check after another program's commit elsewhere (notifications read)",
        "read-back and compare, as when our tables were touched",
    ] {
        assert_eq!(operations(check), 0, "{check}");
    }
    assert_eq!(results["wide"][0]["services"], 50);
    let latency = results["latency"].as_array().expect("latency");
    for counters in [true, false] {
        let report = latency.iter().find(|l| l["counters"] == counters);
        assert_eq!(report.expect("both ways")["connects"], 3_000);
    }
    // The counters' cost, and what a scrape reads: every counted element attributed.
    let cost = &results["counters_cost"];
    assert!(cost["cold_with"].as_f64() > Some(0.0) && cost["cold_without"].as_f64() > Some(0.0));
    let read = &cost["read"];
    assert!(read["elements"].as_u64() > Some(200), "{read}");
    assert!(
        row["nftproxy"]["counter_read"].is_null(),
        "rows load the default: no counters"
    );
    assert!(read["series"].as_u64() > Some(200), "{read}");
    assert!(
        table.contains("| a /metrics scrape's counter read"),
        "{table}"
    );
    // The daemon against the API server: the cold start programs the cluster, the
    // restart sends nothing, and /healthz answered every request in between.
    let daemon = &results["daemon"][0];
    assert!(
        daemon["cold"]["operations"].as_u64() > Some(1_000),
        "{daemon}"
    );
    assert_eq!(daemon["restart"]["operations"], 0, "{daemon}");
    assert!(
        daemon["healthz"]["requests"].as_u64() > Some(50),
        "{daemon}"
    );
    assert_eq!(daemon["healthz"]["unanswered"], 0, "{daemon}");
    assert!(table.contains("| /healthz every 10 ms"), "{table}");
    // Churn: every change was programmed (the run fails otherwise), under both periods.
    let runs = results["churn"]["runs"].as_array().expect("churn runs");
    assert_eq!(runs.len(), 2, "{runs:?}");
    for run in runs {
        assert_eq!(run["changes"], 40, "{run}");
        assert!(run["p99_seconds"].as_f64() > Some(0.0), "{run}");
    }
}
