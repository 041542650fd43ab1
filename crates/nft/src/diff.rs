//! The smallest transaction that turns the table the kernel holds into the desired one.
//!
//! Invariant: `diff(current, desired).apply_to(current)` means what `desired` means: it
//! equals it, except that a slot map's values may sit in other slots of their key prefix
//! (the two are equal after [`Table::slots_in_order`]). The transaction is empty when
//! both mean the same, and its operations are ordered so the kernel accepts them in one
//! batch: objects exist before anything refers to them, and nothing is deleted while a
//! rule or element still refers to it. Sets and maps change element by element; a
//! changed chain keeps as many of its rules as the desired chain has in the same order,
//! and loses and gains the others one by one, in place; it is flushed and refilled only
//! when it keeps none. Unchanged chains are not touched. (Every rule added binds the
//! sets it uses, which for a map walks its elements; deleting a rule does not, so kept
//! rules are never added again.)

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::elements::{Element, Elements, Payload, slot_groups};
use crate::table::Table;
use crate::transaction::{Op, Transaction};
use crate::types::Value;

/// The operations that turn `current` (`None`: no table yet) into `desired`.
pub fn diff(current: Option<&Table>, desired: &Table) -> Transaction {
    let Some(current) = current else {
        return Transaction::create(desired);
    };
    let mut tx = Transaction::new(desired.family, desired.name.clone());

    // Sets whose declaration changed must be deleted and created again, which first
    // needs every rule that refers to them gone.
    let redeclared: BTreeSet<&str> = desired
        .sets
        .values()
        .filter(|set| {
            current
                .sets
                .get(&set.name)
                .is_some_and(|old| !old.same_declaration(set))
        })
        .map(|set| set.name.as_str())
        .collect();
    // Base chains whose type, hook or priority changed are replaced.
    let rebased: BTreeSet<&str> = desired
        .chains
        .values()
        .filter(|chain| {
            current
                .chains
                .get(&chain.name)
                .is_some_and(|old| old.base != chain.base)
        })
        .map(|chain| chain.name.as_str())
        .collect();
    // Changed chains: edited in place, or, keeping no rule (or using a set that is
    // declared anew), flushed and refilled.
    let mut edited: BTreeMap<&str, (Vec<usize>, Vec<usize>)> = BTreeMap::new();
    let mut refilled: BTreeSet<&str> = BTreeSet::new();
    for chain in desired.chains.values() {
        let Some(old) = current.chains.get(&chain.name) else {
            continue;
        };
        let uses_redeclared = || {
            old.rules
                .iter()
                .chain(&chain.rules)
                .flat_map(|r| r.referenced_sets())
                .any(|s| redeclared.contains(s))
        };
        if rebased.contains(chain.name.as_str()) || uses_redeclared() {
            refilled.insert(chain.name.as_str());
            continue;
        }
        if old.rules == chain.rules {
            continue;
        }
        let (deleted, added) = edit(&old.rules, &chain.rules);
        if deleted.len() == old.rules.len() {
            refilled.insert(chain.name.as_str());
        } else {
            edited.insert(chain.name.as_str(), (deleted, added));
        }
    }

    for set in desired.sets.values() {
        if !current.sets.contains_key(&set.name) {
            tx.ops.push(Op::AddSet(set.without_elements()));
        }
    }
    for chain in desired.chains_in_order() {
        if !current.chains.contains_key(&chain.name) {
            tx.ops.push(Op::AddChain {
                name: chain.name.clone(),
                base: chain.base,
            });
        }
    }
    for chain in current.chains_in_order() {
        let removed = !desired.chains.contains_key(&chain.name);
        if (removed || refilled.contains(chain.name.as_str())) && !chain.rules.is_empty() {
            tx.ops.push(Op::FlushChain(chain.name.clone()));
        }
        if let Some((deleted, added)) = edited.remove(chain.name.as_str()) {
            tx.ops.push(Op::EditRules {
                chain: chain.name.clone(),
                deleted,
                added,
                rules: desired.chains[&chain.name].rules.clone(),
            });
        }
    }
    // Per set in both tables: the keys to delete and the elements to add.
    let mut changed: BTreeMap<&str, (Vec<Vec<Value>>, Vec<Element>)> = BTreeMap::new();
    for (name, old) in &current.sets {
        let Some(new) = desired.sets.get(name) else {
            continue;
        };
        if redeclared.contains(name.as_str()) {
            continue;
        }
        let changes = if new.is_slot_map() {
            slot_changes(&old.elements, &new.elements)
        } else {
            let pairs = || merged(old.elements.keyed(), new.elements.keyed());
            let stale = pairs()
                .filter_map(|(_, was, is)| was.filter(|was| Some(*was) != is))
                .map(|was| was.key())
                .collect();
            let missing = pairs()
                .filter_map(|(_, was, is)| is.filter(|is| was != Some(*is)).cloned())
                .collect();
            (stale, missing)
        };
        changed.insert(name.as_str(), changes);
    }
    for (name, old) in &current.sets {
        let Some((stale, _)) = changed.get_mut(name.as_str()) else {
            continue;
        };
        let stale = std::mem::take(stale);
        if !stale.is_empty() {
            tx.ops.push(Op::DeleteElements {
                set: name.clone(),
                keys: stale,
                is_map: old.is_map(),
            });
        }
    }
    for name in &redeclared {
        tx.ops.push(Op::DeleteSet {
            name: (*name).to_owned(),
            is_map: current.sets[*name].is_map(),
        });
        tx.ops
            .push(Op::AddSet(desired.sets[*name].without_elements()));
    }
    for name in &rebased {
        tx.ops.push(Op::DeleteChain((*name).to_owned()));
        tx.ops.push(Op::AddChain {
            name: (*name).to_owned(),
            base: desired.chains[*name].base,
        });
    }
    for chain in desired.chains_in_order() {
        if refilled.contains(chain.name.as_str()) || !current.chains.contains_key(&chain.name) {
            tx.push_rules(chain);
        }
    }
    for (name, new) in &desired.sets {
        let missing: Vec<Element> = match changed.get_mut(name.as_str()) {
            Some((_, missing)) => std::mem::take(missing),
            None => new.elements.values().cloned().collect(),
        };
        tx.push_elements(name, missing);
    }
    for chain in current.chains_in_order() {
        if !desired.chains.contains_key(&chain.name) {
            tx.ops.push(Op::DeleteChain(chain.name.clone()));
        }
    }
    for (name, set) in &current.sets {
        if !desired.sets.contains_key(name) {
            tx.ops.push(Op::DeleteSet {
                name: name.clone(),
                is_map: set.is_map(),
            });
        }
    }
    tx
}

/// A slot map's changes (keys to delete, elements to add), prefix by prefix: a slot of
/// the desired prefix whose value is still wanted keeps it (where it is when it can), and
/// the wanted values left over fill the desired slots left over, in order. Removing one
/// of a prefix's values then moves at most one other (into the freed slot), instead of
/// shifting every later one.
fn slot_changes(old: &Elements, new: &Elements) -> (Vec<Vec<Value>>, Vec<Element>) {
    let mut stale = Vec::new();
    let mut missing = Vec::new();
    let (old, new) = (slot_groups(old), slot_groups(new));
    let pairs = merged(
        old.iter().map(|(prefix, g)| (*prefix, g)),
        new.iter().map(|(prefix, g)| (*prefix, g)),
    );
    for (_, was, is) in pairs {
        let (was, is): (&[&Element], &[&Element]) = (
            was.map_or(&[][..], |g| g.as_slice()),
            is.map_or(&[][..], |g| g.as_slice()),
        );
        // Most prefixes of a whole-table diff (after a read-back) are unchanged.
        if was == is {
            continue;
        }
        // The desired values not placed yet, by slot and by value.
        let mut unplaced: BTreeMap<Value, &Element> =
            is.iter().filter_map(|e| Some((e.slot()?, *e))).collect();
        let mut slots_of: HashMap<Payload<'_>, BTreeSet<Value>> = HashMap::new();
        for (slot, element) in &unplaced {
            slots_of.entry(element.payload()).or_default().insert(*slot);
        }
        let mut free: BTreeSet<Value> = unplaced.keys().copied().collect();
        let mut kept = vec![false; was.len()];
        // First the values already in their desired slot, then any wanted value in a
        // desired slot.
        for in_place in [true, false] {
            for (index, element) in was.iter().enumerate() {
                let Some(slot) = element.slot().filter(|s| !kept[index] && free.contains(s)) else {
                    continue;
                };
                let Some(slots) = slots_of.get_mut(&element.payload()) else {
                    continue;
                };
                let found = if in_place {
                    slots.take(&slot)
                } else {
                    slots.pop_first()
                };
                if let Some(found) = found {
                    unplaced.remove(&found);
                    free.remove(&slot);
                    kept[index] = true;
                }
            }
        }
        stale.extend(
            was.iter()
                .zip(&kept)
                .filter(|(_, kept)| !**kept)
                .map(|(e, _)| e.key()),
        );
        missing.extend(
            free.into_iter()
                .zip(unplaced.into_values())
                .map(|(slot, e)| e.in_slot(slot)),
        );
    }
    (stale, missing)
}

/// How a chain's rules `old` become `new` with the fewest rules deleted and added: the
/// positions in `old` of the rules deleted, and in `new` of the rules added; the rules
/// kept are a longest common subsequence of the two. The common ends are matched first,
/// so the usual edit, a few rules in one place, costs time in the chain's length only.
fn edit<T: PartialEq>(old: &[T], new: &[T]) -> (Vec<usize>, Vec<usize>) {
    // Past this many pairs of rules between the common ends, all of them are replaced
    // rather than a quadratic table built.
    const MAX_PAIRS: usize = 1 << 20;
    let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let (old_rest, new_rest) = (&old[prefix..], &new[prefix..]);
    let suffix = old_rest
        .iter()
        .rev()
        .zip(new_rest.iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let o = &old_rest[..old_rest.len() - suffix];
    let n = &new_rest[..new_rest.len() - suffix];
    let (mut deleted, mut added) = (Vec::new(), Vec::new());
    if o.len().saturating_mul(n.len()) > MAX_PAIRS {
        return (
            (prefix..prefix + o.len()).collect(),
            (prefix..prefix + n.len()).collect(),
        );
    }
    // common[i * width + j]: how many rules o[i..] and n[j..] have in common, in order.
    let width = n.len() + 1;
    let mut common = vec![0u32; (o.len() + 1) * width];
    for i in (0..o.len()).rev() {
        for j in (0..n.len()).rev() {
            common[i * width + j] = if o[i] == n[j] {
                common[(i + 1) * width + j + 1] + 1
            } else {
                common[(i + 1) * width + j].max(common[i * width + j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < o.len() && j < n.len() {
        if o[i] == n[j] {
            i += 1;
            j += 1;
        } else if common[(i + 1) * width + j] >= common[i * width + j + 1] {
            deleted.push(prefix + i);
            i += 1;
        } else {
            added.push(prefix + j);
            j += 1;
        }
    }
    deleted.extend((i..o.len()).map(|i| prefix + i));
    added.extend((j..n.len()).map(|j| prefix + j));
    (deleted, added)
}

/// The keys of two sorted walks in one ordered walk, with each side's value: one key
/// comparison per step instead of a tree search per key (the sets of a large table hold
/// hundreds of thousands of elements).
fn merged<'a, K: Ord + ?Sized + 'a, V: 'a>(
    old: impl Iterator<Item = (&'a K, &'a V)>,
    new: impl Iterator<Item = (&'a K, &'a V)>,
) -> impl Iterator<Item = (&'a K, Option<&'a V>, Option<&'a V>)> {
    let mut old = old.peekable();
    let mut new = new.peekable();
    std::iter::from_fn(move || match (old.peek(), new.peek()) {
        (Some((a, _)), Some((b, _))) => match a.cmp(b) {
            Ordering::Less => old.next().map(|(k, v)| (k, Some(v), None)),
            Ordering::Greater => new.next().map(|(k, v)| (k, None, Some(v))),
            Ordering::Equal => {
                let (k, was) = old.next()?;
                let (_, is) = new.next()?;
                Some((k, Some(was), Some(is)))
            }
        },
        (Some(_), None) => old.next().map(|(k, v)| (k, Some(v), None)),
        (None, Some(_)) => new.next().map(|(k, v)| (k, None, Some(v))),
        (None, None) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::{Rule, Stmt};
    use crate::table::{Chain, Set};
    use crate::types::{DataType, Family, Value, Verdict};

    fn table(services: &[(&str, &[u8])]) -> Table {
        let mut t = Table::new(Family::Ip, "t");
        t.add_set(Set::verdict_map("svc", vec![DataType::Ipv4Addr]));
        t.add_set(Set::new("hairpin", vec![DataType::Ipv4Addr]));
        t.add_chain(Chain::regular(
            "services",
            vec![Rule::new(vec![Stmt::Vmap {
                key: crate::Expr::daddr(Family::Ip),
                map: "svc".into(),
            }])],
        ));
        for (i, (name, endpoints)) in services.iter().enumerate() {
            let rules = endpoints
                .iter()
                .map(|e| {
                    Rule::new(vec![Stmt::Dnat {
                        addr: [10, 0, 0, *e].into(),
                        port: 80,
                    }])
                })
                .collect();
            t.add_chain(Chain::regular(*name, rules));
            let ip = [172, 30, 0, i as u8 + 1].into();
            t.add_element(
                "svc",
                Element::with_verdict(vec![Value::Addr(ip)], Verdict::Goto((*name).into())),
            );
            for e in endpoints.iter() {
                t.add_element(
                    "hairpin",
                    Element::new(vec![Value::Addr([10, 0, 0, *e].into())]),
                );
            }
        }
        t
    }

    fn check(from: &Table, to: &Table) -> Transaction {
        let tx = diff(Some(from), to);
        let after = tx.apply_to(Some(from.clone())).unwrap().unwrap();
        assert_eq!(after.slots_in_order(), to.slots_in_order(), "{tx}");
        tx
    }

    /// A table with one slot map: per destination port, its endpoints' ports in slots
    /// 0, 1, … in the order given.
    fn slots(destinations: &[(u16, &[u16])]) -> Table {
        let mut t = Table::new(Family::Ip, "t");
        let key = vec![crate::Expr::th_dport(), crate::Expr::NumgenRandom(1)];
        let map = Set::typeof_map("endpoints", key, vec![crate::Expr::th_dport()]).unwrap();
        assert!(map.is_slot_map());
        t.add_set(map);
        for (port, endpoints) in destinations {
            for (slot, endpoint) in (0u32..).zip(*endpoints) {
                let key = vec![Value::Port(*port), Value::Number(slot)];
                t.add_element(
                    "endpoints",
                    Element::mapped(key, vec![Value::Port(*endpoint)]),
                );
            }
        }
        t
    }

    #[test]
    fn a_slot_map_keeps_values_in_their_slots_and_fills_freed_ones() {
        let from = slots(&[(80, &[1, 2, 3, 4, 5]), (81, &[7])]);
        // The first value gone: the last one moves into its slot, nothing else moves.
        let tx = check(&from, &slots(&[(80, &[2, 3, 4, 5]), (81, &[7])]));
        assert_eq!(
            tx.to_string(),
            "delete element ip t endpoints { 80 . 0, 80 . 4 }\n\
             add element ip t endpoints { 80 . 0 : 5 }\n"
        );
        // The same values in other slots mean the same: nothing to do, either way.
        let shuffled = slots(&[(80, &[5, 2, 3, 4]), (81, &[7])]);
        assert!(check(&shuffled, &slots(&[(80, &[2, 3, 4, 5]), (81, &[7])])).is_empty());
        // A value added goes into the new slot; one replaced stays in its slot.
        assert_eq!(
            check(&shuffled, &slots(&[(80, &[2, 3, 4, 5, 6]), (81, &[7])])).len(),
            1
        );
        assert_eq!(
            check(&shuffled, &slots(&[(80, &[2, 3, 4, 9]), (81, &[7])])).len(),
            2
        );
        // Prefixes that come and go take their slots along.
        assert_eq!(check(&from, &slots(&[(81, &[7, 8])])).len(), 6);
        // Repeated values are kept as often as they are wanted.
        assert_eq!(
            check(&slots(&[(80, &[1, 1, 2])]), &slots(&[(80, &[1, 2, 1])])).len(),
            0
        );
        // (One 1 gives way to the 2, whose slot goes.)
        assert_eq!(
            check(&slots(&[(80, &[1, 1, 2])]), &slots(&[(80, &[2, 1])])).len(),
            3
        );
    }

    #[test]
    fn a_large_destination_in_another_order_is_no_change() {
        let sorted: Vec<u16> = (1..=3_000).collect();
        let reversed: Vec<u16> = sorted.iter().rev().copied().collect();
        assert!(check(&slots(&[(80, &reversed)]), &slots(&[(80, &sorted)])).is_empty());
        // One value replaced: it alone is deleted and added.
        let mut changed = sorted.clone();
        changed[1_500] = 9_999;
        assert_eq!(
            check(&slots(&[(80, &reversed)]), &slots(&[(80, &changed)])).len(),
            2
        );
    }

    #[test]
    fn slots_in_order_equalizes_only_what_means_the_same() {
        let a = slots(&[(80, &[5, 2, 3])]);
        assert_eq!(a.slots_in_order(), slots(&[(80, &[2, 3, 5])]));
        assert_ne!(
            a.slots_in_order(),
            slots(&[(80, &[2, 3, 6])]).slots_in_order()
        );
        // Other sets are left as they are.
        let plain = table(&[("a", &[2, 1])]);
        assert_eq!(plain.slots_in_order(), plain);
    }

    #[test]
    fn no_change_is_no_operation() {
        let t = table(&[("a", &[1, 2]), ("b", &[3])]);
        assert!(check(&t, &t).is_empty());
    }

    #[test]
    fn a_rule_added_at_the_end_is_appended() {
        let from = table(&[("a", &[1, 2]), ("b", &[3])]);
        let to = table(&[("a", &[1, 2]), ("b", &[3, 4])]);
        let tx = check(&from, &to);
        // one rule, one hairpin element
        assert_eq!(tx.len(), 2, "{tx}");
        assert!(
            !tx.ops.iter().any(|op| matches!(op, Op::FlushChain(_))),
            "{tx}"
        );
    }

    #[test]
    fn a_rule_added_before_others_is_inserted() {
        let from = table(&[("a", &[1, 2]), ("b", &[4])]);
        let to = table(&[("a", &[1, 2]), ("b", &[3, 4])]);
        let tx = check(&from, &to);
        // one rule inserted before the kept one, one hairpin element
        assert_eq!(tx.len(), 2, "{tx}");
        assert!(
            matches!(&tx.ops[0], Op::EditRules { deleted, added, .. }
                if deleted.is_empty() && added == &[0]),
            "{tx}"
        );
    }

    #[test]
    fn a_chain_keeping_no_rule_is_refilled() {
        let from = table(&[("a", &[1, 2])]);
        let to = table(&[("a", &[3])]);
        let tx = check(&from, &to);
        // flush, one rule, hairpin: two out, one in
        assert_eq!(tx.len(), 5, "{tx}");
        assert!(matches!(&tx.ops[0], Op::FlushChain(_)), "{tx}");
    }

    #[test]
    fn a_removed_endpoint_deletes_its_element() {
        let from = table(&[("a", &[1, 2])]);
        let to = table(&[("a", &[1])]);
        let tx = check(&from, &to);
        // the second rule deleted (by position; the first stays), one hairpin element
        assert_eq!(tx.len(), 2, "{tx}");
        assert!(
            matches!(&tx.ops[0], Op::EditRules { deleted, added, rules, .. }
                if deleted == &[1] && added.is_empty() && rules.len() == 1),
            "{tx}"
        );
    }

    #[test]
    fn an_edit_keeps_a_longest_common_subsequence_of_rules() {
        assert_eq!(edit(&[1, 2, 3, 5], &[1, 3, 5, 6]), (vec![1], vec![3]));
        assert_eq!(edit(&[1, 2, 3, 5], &[1, 2, 3, 4, 5]), (vec![], vec![3]));
        assert_eq!(edit(&[4], &[3, 4]), (vec![], vec![0]));
        assert_eq!(edit::<u8>(&[], &[1]), (vec![], vec![0]));
        assert_eq!(edit(&[1], &[]), (vec![0], vec![]));
        // Greedy matching from the front would keep 9 and lose 1, 2, 3.
        assert_eq!(edit(&[9, 1, 2, 3], &[1, 2, 3, 9]), (vec![0], vec![3]));
        assert_eq!(edit(&[7, 1, 7], &[1, 7, 7]), (vec![0], vec![1]));
        let from = table(&[("a", &[1, 2, 3])]);
        let to = table(&[("a", &[1, 3, 4])]);
        let tx = check(&from, &to);
        // rule 2 deleted, rule 4 appended; hairpin: 2 out, 4 in
        assert_eq!(tx.len(), 4, "{tx}");
        assert!(
            !tx.ops.iter().any(|op| matches!(op, Op::FlushChain(_))),
            "{tx}"
        );
    }

    #[test]
    fn services_come_and_go_with_their_chains_and_elements() {
        let from = table(&[("a", &[1])]);
        let to = table(&[("a", &[1]), ("b", &[2])]);
        // add chain, one rule, map element, hairpin element
        assert_eq!(check(&from, &to).len(), 4);
        // flush, delete map element and hairpin element, delete chain
        assert_eq!(check(&to, &from).len(), 4);
    }

    #[test]
    fn a_redeclared_set_is_recreated_after_its_users_are_flushed() {
        let from = table(&[("a", &[1])]);
        let mut to = from.clone();
        to.sets.get_mut("svc").unwrap().comment = Some("changed".into());
        let tx = check(&from, &to);
        let text = tx.to_string();
        let flush = text.find("flush chain ip t services").unwrap();
        let delete = text.find("delete map ip t svc").unwrap();
        assert!(flush < delete, "{text}");
    }

    #[test]
    fn from_nothing_everything_is_created() {
        let to = table(&[("a", &[1, 2])]);
        let tx = diff(None, &to);
        assert_eq!(tx.apply_to(None).unwrap().as_ref(), Some(&to));
        assert!(tx.to_string().starts_with("add table ip t\n"));
    }
}
