//! What kube-proxy leaves on a node, found and removed over netlink once nftproxy has
//! synced (`--cleanup-kube-proxy`): its nftables-mode tables, and in the tables
//! iptables-nft manages (`nat`, `filter`, `mangle`) the `KUBE-*` chains and the rules of
//! built-in chains that jump to them. Legacy (x_tables) rules cannot be reached over
//! nf_tables; their presence is reported with the command that removes them.
//!
//! Invariant: nothing else is touched: other tables, other chains, and the other rules of
//! the built-in chains stay as they are; a `KUBE-*` chain another program's chain still
//! jumps to is kept (and said so), with every `KUBE-*` chain it reaches. Each table is
//! changed by one transaction, all of it or nothing.

use std::collections::BTreeSet;

use nftproxy_netlink::{ForeignChain, ForeignRemoval, NetlinkBackend};
use nftproxy_nft::Family;
use tracing::{info, warn};

/// kube-proxy's own tables in nftables mode.
const KUBE_PROXY_TABLE: &str = "kube-proxy";
/// The tables iptables-nft keeps kube-proxy's iptables-mode chains in.
const IPTABLES_TABLES: [&str; 3] = ["nat", "filter", "mangle"];
const PREFIX: &str = "KUBE-";

/// What to remove from one table, and each object in words for the log.
#[derive(Debug)]
pub struct Removal {
    family: Family,
    table: String,
    what: ForeignRemoval,
    /// `table ip kube-proxy`, `chain ip nat KUBE-SERVICES`, `rule ip nat PREROUTING
    /// (handle 4, jump KUBE-SERVICES)`.
    objects: Vec<String>,
    /// Chains kept, and why.
    kept: Vec<String>,
}

/// Finds what kube-proxy left in this network namespace.
pub fn plan(backend: &mut NetlinkBackend) -> Result<Vec<Removal>, nftproxy_netlink::Error> {
    let mut removals = Vec::new();
    for family in [Family::Ip, Family::Ip6] {
        if backend.table_exists(family, KUBE_PROXY_TABLE)? {
            removals.push(Removal {
                family,
                table: KUBE_PROXY_TABLE.to_owned(),
                what: ForeignRemoval::Table,
                objects: vec![format!("table {family} {KUBE_PROXY_TABLE}")],
                kept: Vec::new(),
            });
        }
        for table in IPTABLES_TABLES {
            if !backend.table_exists(family, table)? {
                continue;
            }
            let chains = backend.foreign_chains(family, table)?;
            if let Some(removal) = iptables_removal(family, table, &chains) {
                removals.push(removal);
            }
        }
    }
    Ok(removals)
}

/// kube-proxy's objects in one iptables-nft table, if any.
fn iptables_removal(family: Family, table: &str, chains: &[ForeignChain]) -> Option<Removal> {
    let ours = |name: &str| name.starts_with(PREFIX);
    // KUBE-* chains that another program's own (non-KUBE, non-built-in) chain jumps to stay,
    // and so does every KUBE-* chain a kept one reaches.
    let mut kept: BTreeSet<&str> = BTreeSet::new();
    let mut why = Vec::new();
    for chain in chains.iter().filter(|c| !c.base && !ours(&c.name)) {
        for target in chain.rules.iter().flat_map(|r| &r.jumps) {
            if ours(target) && kept.insert(target) {
                why.push(format!(
                    "kept chain {family} {table} {target}: chain {} still jumps to it",
                    chain.name
                ));
            }
        }
    }
    loop {
        let reached: Vec<&str> = chains
            .iter()
            .filter(|c| kept.contains(c.name.as_str()))
            .flat_map(|c| c.rules.iter().flat_map(|r| &r.jumps))
            .map(String::as_str)
            .filter(|t| ours(t) && !kept.contains(t))
            .collect();
        if reached.is_empty() {
            break;
        }
        kept.extend(reached);
    }
    let removed: Vec<&ForeignChain> = chains
        .iter()
        .filter(|c| ours(&c.name) && !c.base && !kept.contains(c.name.as_str()))
        .collect();
    let mut rules = Vec::new();
    let mut objects = Vec::new();
    for chain in chains.iter().filter(|c| c.base) {
        for rule in &chain.rules {
            let jumps_to_removed = rule
                .jumps
                .iter()
                .any(|t| removed.iter().any(|c| c.name == *t));
            if jumps_to_removed {
                rules.push((chain.name.clone(), rule.handle));
                objects.push(format!(
                    "rule {family} {table} {} (handle {}, jump {})",
                    chain.name,
                    rule.handle,
                    rule.jumps.join(", ")
                ));
            }
        }
    }
    for chain in &removed {
        objects.push(format!("chain {family} {table} {}", chain.name));
    }
    if objects.is_empty() && why.is_empty() {
        return None;
    }
    Some(Removal {
        family,
        table: table.to_owned(),
        what: ForeignRemoval::Objects {
            rules,
            chains: removed.iter().map(|c| c.name.clone()).collect(),
        },
        objects,
        kept: why,
    })
}

/// The plan in words, one object per line, for `--dry-run --cleanup-kube-proxy`.
pub fn describe(removals: &[Removal]) -> String {
    let mut text = String::new();
    for removal in removals {
        for object in &removal.objects {
            text += &format!("remove {object}\n");
        }
        for kept in &removal.kept {
            text += &format!("# {kept}\n");
        }
    }
    for line in legacy() {
        text += &format!("# {line}\n");
    }
    if text.is_empty() {
        text = "# nothing of kube-proxy's on this node\n".to_owned();
    }
    text
}

/// Removes what `plan` found; logs each object removed and what stays. The number of
/// objects removed; a table whose transaction failed is logged and left as it was.
pub fn clean(backend: &mut NetlinkBackend) -> usize {
    let removals = match plan(backend) {
        Ok(removals) => removals,
        Err(e) => {
            warn!(error = %e, "cannot read what kube-proxy left; nothing removed");
            return 0;
        }
    };
    let mut removed = 0;
    for removal in &removals {
        removal.kept.iter().for_each(|k| warn!("{k}"));
        if removal.objects.is_empty() {
            continue;
        }
        match backend.remove_foreign(removal.family, &removal.table, &removal.what) {
            Ok(()) => {
                for object in &removal.objects {
                    info!("removed {object}");
                }
                removed += removal.objects.len();
            }
            Err(e) => warn!(
                family = %removal.family,
                table = %removal.table,
                error = %e,
                "cannot remove kube-proxy's objects; left as they were"
            ),
        }
    }
    for line in legacy() {
        warn!("{line}");
    }
    removed
}

/// What nf_tables cannot reach: legacy iptables tables in use in this namespace.
fn legacy() -> Vec<String> {
    let mut lines = Vec::new();
    for (file, save, restore) in [
        (
            "/proc/net/ip_tables_names",
            "iptables-legacy-save",
            "iptables-legacy-restore",
        ),
        (
            "/proc/net/ip6_tables_names",
            "ip6tables-legacy-save",
            "ip6tables-legacy-restore",
        ),
    ] {
        let tables: Vec<String> = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        if !tables.is_empty() {
            lines.push(format!(
                "legacy iptables tables in use ({}): nftproxy cannot read them over \
                 nf_tables; if kube-proxy ran with iptables-legacy, its KUBE-* chains may \
                 remain there: `{save} | grep -v KUBE- | {restore}` removes them (or \
                 `kube-proxy --cleanup`)",
                tables.join(", ")
            ));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use nftproxy_netlink::ForeignRule;

    fn chain(name: &str, base: bool, rules: &[(u64, &[&str])]) -> ForeignChain {
        ForeignChain {
            name: name.to_owned(),
            base,
            rules: rules
                .iter()
                .map(|(handle, jumps)| ForeignRule {
                    handle: *handle,
                    jumps: jumps.iter().map(|j| (*j).to_owned()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn only_kube_proxys_chains_and_the_jumps_to_them_go() {
        let chains = [
            chain(
                "PREROUTING",
                true,
                &[(1, &["KUBE-SERVICES"]), (2, &["DOCKER"])],
            ),
            chain("OUTPUT", true, &[(3, &["KUBE-SERVICES"]), (4, &[])]),
            chain("KUBE-SERVICES", false, &[(5, &["KUBE-SVC-A"])]),
            chain("KUBE-SVC-A", false, &[(6, &[])]),
            chain("DOCKER", false, &[(7, &["KUBE-MARK-DROP"])]),
            chain("KUBE-MARK-DROP", false, &[(8, &["KUBE-SVC-B"])]),
            chain("KUBE-SVC-B", false, &[]),
        ];
        let removal = iptables_removal(Family::Ip, "nat", &chains).expect("something");
        assert_eq!(
            removal.what,
            ForeignRemoval::Objects {
                rules: vec![("PREROUTING".into(), 1), ("OUTPUT".into(), 3)],
                chains: vec!["KUBE-SERVICES".into(), "KUBE-SVC-A".into()],
            }
        );
        // DOCKER still jumps to KUBE-MARK-DROP, which reaches KUBE-SVC-B: both stay.
        assert_eq!(removal.kept.len(), 1, "{:?}", removal.kept);
        assert!(removal.kept[0].contains("KUBE-MARK-DROP"));
        assert!(iptables_removal(Family::Ip, "filter", &[chain("INPUT", true, &[])]).is_none());
    }
}
