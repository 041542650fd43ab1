//! Which objects of a table one change may have touched, so that a diff can look at
//! those alone instead of the whole table.
//!
//! Invariant: [`diff_scoped`] equals [`diff`] whenever every object outside the scope is
//! the same in both tables; who builds a scope answers for that.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::diff::diff;
use crate::expr::Rule;
use crate::table::{Chain, Table};
use crate::transaction::{ApplyError, Op, Transaction};
use crate::types::{Family, Value};

/// Names of chains and sets, and keys of elements, that may differ between two versions
/// of a table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Chains (present in either version).
    pub chains: BTreeSet<String>,
    /// Whole sets and maps: declaration and elements.
    pub sets: BTreeSet<String>,
    /// Single elements of sets and maps outside [`Scope::sets`], by key.
    pub elements: BTreeMap<String, BTreeSet<Vec<Value>>>,
}

impl Scope {
    /// Whether nothing may differ.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.sets.is_empty() && self.elements.is_empty()
    }

    /// Adds everything `other` names.
    pub fn extend(&mut self, other: Scope) {
        self.chains.extend(other.chains);
        self.sets.extend(other.sets);
        for (set, keys) in other.elements {
            self.elements.entry(set).or_default().extend(keys);
        }
    }

    /// The part of `table` this scope names: its chains, its whole sets, and the
    /// declarations of the other sets it names, holding only the named elements.
    pub fn restrict(&self, table: &Table) -> Table {
        let mut part = Table::new(table.family, table.name.clone());
        part.comment.clone_from(&table.comment);
        for name in &self.chains {
            if let Some(chain) = table.chains.get(name) {
                part.chains.insert(name.clone(), chain.clone());
            }
        }
        for name in &self.sets {
            if let Some(set) = table.sets.get(name) {
                part.sets.insert(name.clone(), set.clone());
            }
        }
        for (name, keys) in &self.elements {
            let Some(set) = table.sets.get(name) else {
                continue;
            };
            let mut copy = set.without_elements();
            for key in keys {
                if let Some(element) = set.elements.get_shared(key) {
                    copy.elements.insert(Arc::clone(element));
                }
            }
            part.sets.insert(name.clone(), copy);
        }
        part
    }

    /// Applies `tx`, which touches nothing this scope does not name, to `table`: the
    /// named part is taken out, changed and put back, so the cost is the scope's, not the
    /// table's. Fails as [`Transaction::apply_to`] does, leaving `table` as it was.
    pub fn apply(&self, table: &mut Table, tx: &Transaction) -> Result<(), ApplyError> {
        let mut part = self.restrict(table);
        // What the transaction's rules and elements refer to outside the scope must be
        // there to refer to; it is not written back.
        for op in &tx.ops {
            let (chains, sets): (Vec<&str>, Vec<&str>) = match op {
                Op::AddRule { rule, .. } => (
                    rule.referenced_chains().collect(),
                    rule.referenced_sets().collect(),
                ),
                Op::EditRules { added, rules, .. } => {
                    let added = || added.iter().filter_map(|at| rules.get(*at));
                    (
                        added().flat_map(Rule::referenced_chains).collect(),
                        added().flat_map(Rule::referenced_sets).collect(),
                    )
                }
                Op::AddElements { elements, .. } => (
                    elements
                        .iter()
                        .filter_map(|e| e.verdict()?.target())
                        .collect(),
                    Vec::new(),
                ),
                _ => continue,
            };
            for name in chains {
                if let (None, Some(chain)) = (part.chains.get(name), table.chains.get(name)) {
                    let stub = Chain {
                        name: chain.name.clone(),
                        base: chain.base,
                        rules: Vec::new(),
                    };
                    part.chains.insert(name.to_owned(), stub);
                }
            }
            for name in sets {
                if let (None, Some(set)) = (part.sets.get(name), table.sets.get(name)) {
                    part.sets.insert(name.to_owned(), set.without_elements());
                }
            }
        }
        let mut part = tx.apply_to(Some(part))?.ok_or(ApplyError::DeletesTable)?;
        for name in &self.chains {
            match part.chains.remove(name) {
                Some(chain) => table.chains.insert(name.clone(), chain),
                None => table.chains.remove(name),
            };
        }
        for name in &self.sets {
            match part.sets.remove(name) {
                Some(set) => table.sets.insert(name.clone(), set),
                None => table.sets.remove(name),
            };
        }
        for (name, keys) in &self.elements {
            let (Some(set), Some(changed)) = (table.sets.get_mut(name), part.sets.get_mut(name))
            else {
                continue;
            };
            for key in keys {
                match changed.elements.remove(key) {
                    Some(element) => set.elements.insert(element),
                    None => set.elements.remove(key),
                };
            }
        }
        Ok(())
    }
}

/// [`diff`] of the objects `scope` names, the rest of both tables taken as equal.
pub fn diff_scoped(current: &Table, desired: &Table, scope: &Scope) -> Transaction {
    diff(Some(&scope.restrict(current)), &scope.restrict(desired))
}

/// Per family, what may differ from the tables last handed over; a family without an
/// entry may differ anywhere (its table is new, gone, or rendered whole).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(BTreeMap<Family, Scope>);

impl Scopes {
    /// Anything in any family may differ.
    pub fn everything() -> Scopes {
        Scopes::default()
    }

    /// Nothing in any family differs.
    pub fn nothing() -> Scopes {
        let mut scopes = Scopes::everything();
        scopes.insert(Family::Ip, Scope::default());
        scopes.insert(Family::Ip6, Scope::default());
        scopes
    }

    /// Only `scope` may differ in `family`.
    pub fn insert(&mut self, family: Family, scope: Scope) {
        self.0.insert(family, scope);
    }

    /// What may differ in `family` (`None`: anything).
    pub fn get(&self, family: Family) -> Option<&Scope> {
        self.0.get(&family)
    }

    /// Whether no family's table differs.
    pub fn is_nothing(&self) -> bool {
        [Family::Ip, Family::Ip6]
            .iter()
            .all(|f| self.0.get(f).is_some_and(Scope::is_empty))
    }

    /// What may differ after `self` and then `later`.
    pub fn then(mut self, later: Scopes) -> Scopes {
        let mut later = later.0;
        self.0.retain(|family, scope| match later.remove(family) {
            Some(more) => {
                scope.extend(more);
                true
            }
            None => false,
        });
        self
    }
}
