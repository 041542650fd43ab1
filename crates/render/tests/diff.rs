//! `diff` over real rendered tables: every pair of golden cases, in memory, and a chain of
//! them through the kernel (`nft -f` of the diff's text in a scratch network namespace).

use std::process::Command;

use nftproxy_nft::{Family, Op, Table, Transaction, diff};
use nftproxy_testkit::{golden_tables, kernel_available, normalise_listing, run_ok};

fn ipv4_tables() -> Vec<(String, Table)> {
    golden_tables()
        .into_iter()
        .filter(|(_, t)| t.family == Family::Ip)
        .collect()
}

#[test]
fn diff_between_any_two_cases_reaches_the_target() {
    let tables = golden_tables();
    for (from_name, from) in &tables {
        for (to_name, to) in tables.iter().filter(|(_, t)| t.family == from.family) {
            let tx = diff(Some(from), to);
            let after = tx
                .apply_to(Some(from.clone()))
                .unwrap_or_else(|e| panic!("{from_name} -> {to_name}: {e}\n{tx}"));
            assert_eq!(
                after.as_ref().map(Table::slots_in_order),
                Some(to.slots_in_order()),
                "{from_name} -> {to_name}"
            );
            if from_name == to_name {
                assert!(
                    tx.is_empty(),
                    "{from_name}: a no-change diff has operations:\n{tx}"
                );
            }
        }
    }
}

/// Runs `script` (shell) in a fresh network namespace and returns its stdout.
fn in_netns(script: &str, stdin: &str) -> String {
    run_ok(
        Command::new("unshare").args(["--net", "sh", "-ec", script]),
        stdin,
    )
}

#[test]
fn diff_text_applied_by_the_kernel_reaches_the_target() {
    if !kernel_available("diff_text_applied_by_the_kernel_reaches_the_target") {
        return;
    }
    let tables = ipv4_tables();
    for pair in tables.windows(2) {
        let ((from_name, from), (to_name, to)) = (&pair[0], &pair[1]);
        let tx = diff(Some(from), to);
        // Load the source table, then the diff, in one namespace; the target alone in
        // another. The kernel must end up holding the same thing.
        let script = "f=$(mktemp); cat > $f; csplit -s -f $f. $f '/^### DIFF$/'; \
                      nft -f $f.00; tail -n +2 $f.01 > $f.02; nft -f $f.02; nft list ruleset; rm -f $f $f.*";
        let stepped = in_netns(script, &format!("{from}### DIFF\n{tx}"));
        let direct = in_netns("nft -f -; nft list ruleset", &to.to_string());
        assert!(
            direct.contains("table ip nftproxy"),
            "{to_name}: nothing listed"
        );
        assert_eq!(
            normalise_listing(&stepped),
            normalise_listing(&direct),
            "{from_name} -> {to_name}:\n{tx}"
        );
    }
}

#[test]
fn a_staged_creation_is_consistent_after_every_step_and_ends_at_the_table() {
    for (name, table) in golden_tables() {
        let whole: usize = Transaction::create(&table).ops.iter().map(Op::count).sum();
        assert_eq!(
            Transaction::create_staged(&table, whole).count(),
            1,
            "{name}"
        );
        for limit in [1, 5, 40] {
            let stages: Vec<Transaction> = Transaction::create_staged(&table, limit).collect();
            let mut state = None;
            for (i, stage) in stages.iter().enumerate() {
                state = stage
                    .apply_to(state)
                    .unwrap_or_else(|e| panic!("{name}, limit {limit}, stage {i}: {e}\n{stage}"));
            }
            assert_eq!(state.as_ref(), Some(&table), "{name}, limit {limit}");
            let staged: usize = stages.iter().flat_map(|s| &s.ops).map(Op::count).sum();
            assert_eq!(
                staged, whole,
                "{name}, limit {limit}: objects created twice or not at all"
            );
            // The first transaction holds the skeleton whole; the rest is split.
            let rest = whole
                - stages
                    .first()
                    .map_or(0, |s| s.ops.iter().map(Op::count).sum());
            if rest > 3 * limit {
                assert!(stages.len() > 2, "{name}, limit {limit}: not split");
            }
        }
    }
}
