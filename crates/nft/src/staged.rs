//! A large table created in several transactions, each leaving a consistent table: so
//! that a cold start of tens of thousands of Services never holds the nf_tables commit
//! lock for long (upstream's cold-start stalls, kubernetes #139328).
//!
//! Invariant: every transaction only references objects created by itself or an earlier
//! one, and the union of all of them is exactly [`Transaction::create`] of the table.

use std::collections::{BTreeMap, BTreeSet};

use crate::elements::Element;
use crate::table::{Set, Table};
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

    /// Each name's group, by its root.
    fn roots<'t>(&mut self, ids: BTreeMap<&'t str, usize>) -> BTreeMap<&'t str, usize> {
        ids.into_iter().map(|(n, i)| (n, self.find(i))).collect()
    }
}

/// The group (by its root) of every chain and set the first transaction leaves out.
/// Chains and sets are looked up apart: a chain may share a set's name.
struct Owners<'t> {
    chains: BTreeMap<&'t str, usize>,
    sets: BTreeMap<&'t str, usize>,
}

impl Owners<'_> {
    /// The group an element of a set owned by `set_owner` comes with: that of the chain
    /// its verdict leads to, else its set's; `None` when neither has one.
    fn of(&self, set_owner: Option<usize>, element: &Element) -> Option<usize> {
        element
            .verdict()
            .and_then(|v| v.target())
            .and_then(|chain| self.chains.get(chain).copied())
            .or(set_owner)
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
        let limit = limit.max(1);
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
        if objects <= limit {
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
        let mut groups = Groups {
            parent: (0..chain_ids.len() + set_ids.len()).collect(),
        };
        for chain in table.chains.values() {
            let Some(&me) = chain_ids.get(chain.name.as_str()) else {
                continue;
            };
            for rule in &chain.rules {
                for target in rule.referenced_chains() {
                    if let Some(&other) = chain_ids.get(target) {
                        groups.union(me, other);
                    }
                }
                for set in rule.referenced_sets() {
                    if let Some(&other) = set_ids.get(set) {
                        groups.union(me, other);
                    }
                }
            }
        }
        let owners = Owners {
            chains: groups.roots(chain_ids),
            sets: groups.roots(set_ids),
        };

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
            match owners.sets.get(set.name.as_str()) {
                Some(root) => {
                    let group = by_root.entry(*root).or_default();
                    group.sets.insert(&set.name);
                    group.size += set_weight;
                }
                None => first.ops.push(Op::AddSet(set.without_elements())),
            }
        }
        for chain in table.chains_in_order() {
            if let Some(root) = owners.chains.get(chain.name.as_str()) {
                let group = by_root.entry(*root).or_default();
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
            if !owners.chains.contains_key(chain.name.as_str()) {
                first.push_rules(chain);
            }
        }
        for set in table.sets.values() {
            let set_owner = owners.sets.get(set.name.as_str()).copied();
            for element in set.elements.values() {
                if let Some(root) = owners.of(set_owner, element) {
                    let group = by_root.entry(root).or_default();
                    group.elements.entry(&set.name).or_default().push(element);
                    group.size += 1;
                }
            }
        }
        // A group too big for one transaction (chains shared by many Services, and
        // the elements of all of them) is created empty first; its elements then come
        // with the shared ones.
        let (big, small): (Vec<_>, Vec<_>) = by_root.into_iter().partition(|(_, g)| g.size > limit);
        let big_roots = big.iter().map(|(root, _)| *root).collect();
        let created_empty: Vec<Group> = big
            .into_iter()
            .map(|(_, group)| Group {
                elements: BTreeMap::new(),
                ..group
            })
            .collect();
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
        let mut sets: Vec<&Set> = table.sets.values().collect();
        sets.sort_by_key(|s| entries.contains(s.name.as_str()));

        // Pack the groups into transactions in an order that spreads alike groups (those
        // with affinity sets, whose chain names all start alike) over all of them: a
        // rule naming a set costs the kernel a scan of the table's sets, so bunching the
        // set-heavy groups would make a few transactions slow. The hash of the first
        // chain's name is a fixed, well-mixed order.
        let mut ordered: Vec<Group> = small.into_iter().map(|(_, group)| group).collect();
        ordered.sort_by_cached_key(|g| {
            let name = g
                .chains
                .first()
                .or(g.sets.first())
                .copied()
                .unwrap_or_default();
            (fnv1a(name), name)
        });
        let mut batches: Vec<Vec<Group>> = Vec::new();
        let mut batch: Vec<Group> = Vec::new();
        let mut size = 0;
        for group in ordered {
            if !batch.is_empty() && size + group.size > limit {
                batches.push(std::mem::take(&mut batch));
                size = 0;
            }
            size += group.size;
            batch.push(group);
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        Stages::Staged(Box::new(Staged {
            table,
            first: Some(first),
            created_empty: created_empty.into_iter(),
            shared: SharedElements {
                sets,
                at: 0,
                after: None,
                owners,
                big_roots,
                limit,
            },
            batches: batches.into_iter(),
        }))
    }
}

/// The transactions of [`Transaction::create_staged`], made one at a time: the first,
/// the groups too big for one (empty), the shared elements, then the other groups.
enum Stages<'t> {
    Whole(Option<&'t Table>),
    Staged(Box<Staged<'t>>),
}

struct Staged<'t> {
    table: &'t Table,
    first: Option<Transaction>,
    created_empty: std::vec::IntoIter<Group<'t>>,
    shared: SharedElements<'t>,
    batches: std::vec::IntoIter<Vec<Group<'t>>>,
}

impl Iterator for Stages<'_> {
    type Item = Transaction;

    fn next(&mut self) -> Option<Transaction> {
        match self {
            Stages::Whole(table) => table.take().map(Transaction::create),
            Stages::Staged(staged) => {
                let Staged {
                    table,
                    first,
                    created_empty,
                    shared,
                    batches,
                } = &mut **staged;
                first
                    .take()
                    .or_else(|| {
                        created_empty
                            .next()
                            .map(|g| groups_transaction(table, vec![g]))
                    })
                    .or_else(|| shared.next_transaction(table))
                    .or_else(|| batches.next().map(|b| groups_transaction(table, b)))
            }
        }
    }
}

/// The elements that no group of one transaction brings, walked in place a transaction
/// at a time: at 10,000 Services a list of them all took 10 MB while the load ran.
struct SharedElements<'t> {
    /// Every set, those whose elements lead into a chain last.
    sets: Vec<&'t Set>,
    /// The set the walk is in, and the key of the last element it passed there.
    at: usize,
    after: Option<&'t [u8]>,
    owners: Owners<'t>,
    /// Groups created empty, whose elements come here.
    big_roots: BTreeSet<usize>,
    limit: usize,
}

impl SharedElements<'_> {
    /// The next `limit` elements, or `None` when all have been sent.
    fn next_transaction(&mut self, table: &Table) -> Option<Transaction> {
        let mut tx = Transaction::new(table.family, table.name.clone());
        let mut taken = 0;
        while let Some(set) = self.sets.get(self.at).copied() {
            let set_owner = self.owners.sets.get(set.name.as_str()).copied();
            let mut elements = Vec::new();
            let mut rest = set.elements.keyed_after(self.after);
            while taken < self.limit {
                let Some((key, element)) = rest.next() else {
                    self.at += 1;
                    self.after = None;
                    break;
                };
                self.after = Some(key);
                let owner = self.owners.of(set_owner, element);
                if owner.is_none_or(|root| self.big_roots.contains(&root)) {
                    elements.push(element.clone());
                    taken += 1;
                }
            }
            tx.push_elements(&set.name, elements);
            if taken == self.limit {
                break;
            }
        }
        (!tx.ops.is_empty()).then_some(tx)
    }
}

/// Sets, then chains, then rules, then elements of `groups`.
fn groups_transaction(table: &Table, groups: Vec<Group<'_>>) -> Transaction {
    let mut tx = Transaction::new(table.family, table.name.clone());
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

/// 64-bit FNV-1a: a fixed, well-mixed hash of a name.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
