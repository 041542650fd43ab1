//! decode(encode(x)) == x for every rule of every golden table, without a kernel: the
//! expressions a rule is lowered to raise back to the same statements.

use nftproxy_netlink::lower::{lower, raise};
use nftproxy_testkit::golden_tables;

#[test]
fn every_golden_rule_raises_back_to_itself() {
    let mut rules = 0;
    for (name, table) in golden_tables() {
        for chain in table.chains.values() {
            for rule in &chain.rules {
                let raw = lower(table.family, &rule.stmts)
                    .unwrap_or_else(|e| panic!("{name}: {rule}: {e}"));
                let back =
                    raise(table.family, &raw).unwrap_or_else(|e| panic!("{name}: {rule}: {e}"));
                assert_eq!(back[..], rule.stmts[..], "{name}: {rule}");
                rules += 1;
            }
        }
    }
    assert!(rules > 1000, "only {rules} rules");
}
