//! A large table created in several transactions, each leaving a consistent table: so
//! that a cold start of tens of thousands of Services never holds the nf_tables commit
//! lock for long (upstream's cold-start stalls, kubernetes #139328).
//!
//! Invariant: every transaction only references objects created by itself or an earlier
//! one, and the union of all of them is exactly [`Transaction::create`] of the table.

use std::collections::{BTreeMap, BTreeSet};

use crate::table::{Element, Table};
use crate::transaction::{Op, Transaction};
use crate::types::DataType;

/// A group of chains (with the sets only they use) that only reference each other and
/// the first stage's objects, and the elements that point at them.
#[derive(Default)]
struct Group<'t> {
    chains: BTreeSet<&'t str>,
    sets: BTreeSet<&'t str>,
    elements: BTreeMap<&'t str, Vec<&'t Element>>,
    size: usize,
}

/// What one transaction after the first adds.
enum Stage<'t> {
    /// Elements that lead to no chain of their own.
    Shared(Vec<(&'t str, &'t Element)>),
    /// Whole groups.
    Groups(Vec<Group<'t>>),
}

/// Union-find over chain and set names, by index.
struct Groups {
    parent: Vec<usize>,
}

impl Groups {
    fn find(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }

    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.parent[a.max(b)] = a.min(b);
        }
    }
}

impl Transaction {
    /// [`Transaction::create`] of `table`, split into transactions of about `limit`
    /// objects (chains, rules, sets and elements) when it is larger. The first creates the
    /// table, its shared sets and maps (empty), the chains rules reach from the base
    /// chains, and the elements that name no other chain; each further one adds whole
    /// groups of the remaining chains (a Service's chains reach only each other and its
    /// own affinity sets) with the map elements that lead to them, so a Service appears
    /// complete or not at all. Each transaction is made when the iterator reaches it, so
    /// only one is held at a time.
    pub fn create_staged(table: &Table, limit: usize) -> impl Iterator<Item = Transaction> + '_ {
        let objects = 1
            + table
                .sets
                .values()
                .map(|s| 1 + s.elements.len())
                .sum::<usize>()
            + table
                .chains
                .values()
                .map(|c| 1 + c.rules.len())
                .sum::<usize>();
        if objects <= limit.max(1) {
            return Stages::Whole(Some(table));
        }
        // Chains reached by rules from the base chains, and the sets their rules use.
        let mut rooted: BTreeSet<&str> = BTreeSet::new();
        let mut pending: Vec<&str> = table
            .chains
            .values()
            .filter(|c| c.base.is_some())
            .map(|c| c.name.as_str())
            .collect();
        while let Some(name) = pending.pop() {
            if !rooted.insert(name) {
                continue;
            }
            if let Some(chain) = table.chains.get(name) {
                pending.extend(chain.rules.iter().flat_map(|r| r.referenced_chains()));
            }
        }
        let shared_sets: BTreeSet<&str> = rooted
            .iter()
            .filter_map(|name| table.chains.get(*name))
            .flat_map(|c| c.rules.iter().flat_map(|r| r.referenced_sets()))
            .collect();

        // Group the other chains (and the sets only they use) by what their rules
        // reference: chains are numbered first, then sets.
        let chain_ids: BTreeMap<&str, usize> = table
            .chains
            .keys()
            .map(String::as_str)
            .filter(|n| !rooted.contains(n))
            .enumerate()
            .map(|(i, n)| (n, i))
            .collect();
        // Sets used by those chains' rules alone go with them; every other set (used by
        // the base chains, or by no rule at all) is created in the first transaction.
        let set_ids: BTreeMap<&str, usize> = chain_ids
            .keys()
            .filter_map(|name| table.chains.get(*name))
            .flat_map(|c| c.rules.iter().flat_map(|r| r.referenced_sets()))
            .filter(|set| !shared_sets.contains(set) && table.sets.contains_key(*set))
            .collect::<BTreeSet<&str>>()
            .into_iter()
            .enumerate()
            .map(|(i, n)| (n, chain_ids.len() + i))
            .collect();
        let chain_index = |name: &str| chain_ids.get(name).copied();
        let set_index = |name: &str| set_ids.get(name).copied();
        let mut groups = Groups {
            parent: (0..chain_ids.len() + set_ids.len()).collect(),
        };
        for chain in table.chains.values() {
            let Some(me) = chain_index(&chain.name) else {
                continue;
            };
            for rule in &chain.rules {
                for target in rule.referenced_chains() {
                    if let Some(other) = chain_index(target) {
                        groups.union(me, other);
                    }
                }
                for set in rule.referenced_sets() {
                    if let Some(other) = set_index(set) {
                        groups.union(me, other);
                    }
                }
            }
        }

        let mut first = Transaction::new(table.family, table.name.clone());
        first.ops.push(Op::AddTable {
            comment: table.comment.clone(),
        });
        // The kernel keeps a table's sets in a list: creating a set, and every rule
        // naming one, walks it. A group's sets count for that, so stages of set-heavy
        // groups hold fewer of them. (When affinity took a set per endpoint, 15,000 sets
        // at 30,000 × 10, stages of 160 such Services took up to 14 s; weighed this way,
        // at most 0.5 s.)
        let set_weight = 1 + table.sets.len() / 32;
        let mut by_root: BTreeMap<usize, Group> = BTreeMap::new();
        for set in table.sets.values() {
            match set_index(&set.name) {
                Some(i) => {
                    let group = by_root.entry(groups.find(i)).or_default();
                    group.sets.insert(&set.name);
                    group.size += set_weight;
                }
                None => first.ops.push(Op::AddSet(set.without_elements())),
            }
        }
        for chain in table.chains_in_order() {
            if let Some(i) = chain_index(&chain.name) {
                let group = by_root.entry(groups.find(i)).or_default();
                group.chains.insert(&chain.name);
                group.size += 1 + chain.rules.len();
            } else {
                first.ops.push(Op::AddChain {
                    name: chain.name.clone(),
                    base: chain.base,
                });
            }
        }
        for chain in table.chains_in_order() {
            if chain_index(&chain.name).is_none() {
                first.push_rules(chain);
            }
        }
        let mut shared: Vec<(&str, &Element)> = Vec::new();
        for set in table.sets.values() {
            for element in set.elements.values() {
                let owner = element
                    .verdict()
                    .and_then(|v| v.target())
                    .and_then(chain_index)
                    .or_else(|| set_index(&set.name));
                match owner {
                    Some(i) => {
                        let group = by_root.entry(groups.find(i)).or_default();
                        group.elements.entry(&set.name).or_default().push(element);
                        group.size += 1;
                    }
                    None => shared.push((&set.name, element)),
                }
            }
        }
        // A group too big for one transaction (chains shared by many Services, and
        // the elements of all of them) is created empty first; its elements then come
        // with the shared ones.
        let mut stages: Vec<Stage> = Vec::new();
        let (big, small): (Vec<Group>, Vec<Group>) =
            by_root.into_values().partition(|g| g.size > limit);
        for mut group in big {
            shared.extend(
                std::mem::take(&mut group.elements)
                    .into_iter()
                    .flat_map(|(set, list)| list.into_iter().map(move |e| (set, e))),
            );
            stages.push(Stage::Groups(vec![group]));
        }
        // Elements that lead to no chain of their own (ClusterIPs, hairpin pairs,
        // endpoints) can come in any order after the chains: in transactions of their
        // own, with those that lead into a chain last (verdict maps, and sets a rule
        // looks up before going to a chain), so a destination is entered only once the
        // data it leads to is in.
        let entries: BTreeSet<&str> = table
            .chains
            .values()
            .flat_map(|c| &c.rules)
            .filter(|r| r.referenced_chains().next().is_some())
            .flat_map(|r| r.referenced_sets())
            .chain(
                table
                    .sets
                    .values()
                    .filter(|s| s.data == [DataType::Verdict])
                    .map(|s| s.name.as_str()),
            )
            .collect();
        shared.sort_by_key(|(set, _)| entries.contains(set));
        stages.extend(
            shared
                .chunks(limit.max(1))
                .map(|chunk| Stage::Shared(chunk.to_vec())),
        );

        // Pack the groups into transactions in an order that spreads alike groups (those
        // with affinity sets, whose chain names all start alike) over all of them: a
        // rule naming a set costs the kernel a scan of the table's sets, so bunching the
        // set-heavy groups would make a few transactions slow. The hash of the first
        // chain's name is a fixed, well-mixed order.
        let mut ordered = small;
        ordered.sort_by_cached_key(|g| {
            let name = g
                .chains
                .first()
                .or(g.sets.first())
                .copied()
                .unwrap_or_default();
            (fnv1a(name), name)
        });
        let mut batch: Vec<Group> = Vec::new();
        let mut size = 0;
        for group in ordered {
            if !batch.is_empty() && size + group.size > limit {
                stages.push(Stage::Groups(std::mem::take(&mut batch)));
                size = 0;
            }
            size += group.size;
            batch.push(group);
        }
        if !batch.is_empty() {
            stages.push(Stage::Groups(batch));
        }
        Stages::Staged {
            table,
            first: Some(first),
            rest: stages.into_iter(),
        }
    }
}

/// The transactions of [`Transaction::create_staged`], made one at a time.
enum Stages<'t> {
    Whole(Option<&'t Table>),
    Staged {
        table: &'t Table,
        first: Option<Transaction>,
        rest: std::vec::IntoIter<Stage<'t>>,
    },
}

impl Iterator for Stages<'_> {
    type Item = Transaction;

    fn next(&mut self) -> Option<Transaction> {
        match self {
            Stages::Whole(table) => table.take().map(Transaction::create),
            Stages::Staged { table, first, rest } => first
                .take()
                .or_else(|| rest.next().map(|stage| stage.transaction(table))),
        }
    }
}

impl Stage<'_> {
    /// Sets, then chains, then rules, then elements.
    fn transaction(self, table: &Table) -> Transaction {
        let mut tx = Transaction::new(table.family, table.name.clone());
        let groups = match self {
            Stage::Shared(elements) => {
                let mut by_set: BTreeMap<&str, Vec<Element>> = BTreeMap::new();
                for (set, element) in elements {
                    by_set.entry(set).or_default().push(element.clone());
                }
                for (set, elements) in by_set {
                    tx.push_elements(set, elements);
                }
                return tx;
            }
            Stage::Groups(groups) => groups,
        };
        for set in groups.iter().flat_map(|g| &g.sets) {
            if let Some(set) = table.sets.get(*set) {
                tx.ops.push(Op::AddSet(set.without_elements()));
            }
        }
        let chains: Vec<_> = groups
            .iter()
            .flat_map(|g| &g.chains)
            .filter_map(|name| table.chains.get(*name))
            .collect();
        for chain in &chains {
            tx.ops.push(Op::AddChain {
                name: chain.name.clone(),
                base: chain.base,
            });
        }
        for chain in &chains {
            tx.push_rules(chain);
        }
        let mut elements: BTreeMap<&str, Vec<Element>> = BTreeMap::new();
        for group in groups {
            for (set, list) in group.elements {
                elements
                    .entry(set)
                    .or_default()
                    .extend(list.into_iter().cloned());
            }
        }
        for (set, list) in elements {
            tx.push_elements(set, list);
        }
        tx
    }
}

/// 64-bit FNV-1a: a fixed, well-mixed hash of a name.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
