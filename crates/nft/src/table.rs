//! The contents of one nftables table: chains, sets and maps (their elements are in
//! [`crate::elements`]).
//!
//! Invariant: objects live in ordered maps keyed by name (elements by key), so iteration
//! order — and therefore the printed text — never depends on insertion order.

use std::collections::BTreeMap;

use crate::elements::{Element, Elements, slot_groups};
use crate::expr::{Expr, Rule};
use crate::types::{BaseChain, DataType, Family, Value, Verdict};

/// One table and everything in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// The family.
    pub family: Family,
    /// The table name.
    pub name: String,
    /// The table comment.
    pub comment: Option<String>,
    /// Sets and maps by name.
    pub sets: BTreeMap<String, Set>,
    /// Chains by name.
    pub chains: BTreeMap<String, Chain>,
}

impl Table {
    /// An empty table.
    pub fn new(family: Family, name: impl Into<String>) -> Table {
        Table {
            family,
            name: name.into(),
            comment: None,
            sets: BTreeMap::new(),
            chains: BTreeMap::new(),
        }
    }

    /// Adds a chain, replacing any chain of the same name.
    pub fn add_chain(&mut self, chain: Chain) {
        self.chains.insert(chain.name.clone(), chain);
    }

    /// Adds a set or map, replacing any of the same name.
    pub fn add_set(&mut self, set: Set) {
        self.sets.insert(set.name.clone(), set);
    }

    /// Adds an element to a set that was added before. Returns `false` (and adds
    /// nothing) when the set does not exist or already holds that key.
    pub fn add_element(&mut self, set: &str, element: Element) -> bool {
        self.sets
            .get_mut(set)
            .is_some_and(|set| set.elements.insert_new(element))
    }

    /// The same table with every slot map's values in a canonical order (see
    /// [`Set::slots_in_order`]): two tables that mean the same are then equal.
    pub fn slots_in_order(&self) -> Table {
        Table {
            sets: self
                .sets
                .iter()
                .map(|(name, set)| (name.clone(), set.slots_in_order()))
                .collect(),
            ..self.clone()
        }
    }

    /// Makes each element equal to the one with its key in the same set of `other` share
    /// it, so that the two tables hold one copy.
    pub fn share_elements(&mut self, other: &Table) {
        for (name, set) in &mut self.sets {
            if let Some(theirs) = other.sets.get(name) {
                set.elements.share(&theirs.elements);
            }
        }
    }

    /// What refers to a chain: `chain X` for rules that jump or go to it, `set X` for
    /// verdict-map elements that do.
    pub fn chain_users(&self, name: &str) -> Vec<String> {
        let rules = self
            .chains
            .values()
            .filter(|c| {
                c.rules
                    .iter()
                    .any(|r| r.referenced_chains().any(|t| t == name))
            })
            .map(|c| format!("chain {}", c.name));
        let elements = self
            .sets
            .values()
            .filter(|s| {
                s.elements
                    .values()
                    .any(|e| e.verdict().and_then(Verdict::target) == Some(name))
            })
            .map(|s| format!("set {}", s.name));
        rules.chain(elements).collect()
    }

    /// The chains whose rules refer to a set.
    pub fn set_users(&self, name: &str) -> Vec<String> {
        self.chains
            .values()
            .filter(|c| {
                c.rules
                    .iter()
                    .any(|r| r.referenced_sets().any(|s| s == name))
            })
            .map(|c| c.name.clone())
            .collect()
    }

    /// Base chains, then regular chains, each group in name order: the order in which
    /// they are printed and created.
    pub fn chains_in_order(&self) -> impl Iterator<Item = &Chain> {
        let base = self.chains.values().filter(|c| c.base.is_some());
        let regular = self.chains.values().filter(|c| c.base.is_none());
        base.chain(regular)
    }
}

/// A chain: a base chain when `base` is set, otherwise a regular chain entered by
/// `jump`/`goto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The name.
    pub name: String,
    /// Type, hook and priority of a base chain.
    pub base: Option<BaseChain>,
    /// The rules, in order (order is semantic).
    pub rules: Vec<Rule>,
}

impl Chain {
    /// A regular chain with the given rules.
    pub fn regular(name: impl Into<String>, rules: Vec<Rule>) -> Chain {
        Chain {
            name: name.into(),
            base: None,
            rules,
        }
    }

    /// A base chain with the given rules.
    pub fn base(name: impl Into<String>, base: BaseChain, rules: Vec<Rule>) -> Chain {
        Chain {
            name: name.into(),
            base: Some(base),
            rules,
        }
    }
}

/// A named set, or a map when `data` is not empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// The name.
    pub name: String,
    /// The key type; several types make a concatenation.
    pub key: Vec<DataType>,
    /// The value type of a map (several types make a concatenation); empty for a set.
    pub data: Vec<DataType>,
    /// The expressions the key and value types were taken from, when the set is declared
    /// with `typeof` (needed when a type has no name nft accepts, such as a `numgen`
    /// result in a concatenation). nft keeps them in the set's userdata.
    pub type_of: Option<TypeOf>,
    /// `flags dynamic`: the data path may add elements (`update`).
    pub dynamic: bool,
    /// `flags timeout` with this default timeout, in seconds.
    pub timeout: Option<u32>,
    /// Maximum number of elements.
    pub size: Option<u32>,
    /// `counter`: every element carries a counter of the packets its lookups matched.
    /// A lookup in a NAT chain sees only a connection's first packet, so there it counts
    /// connections.
    pub counter: bool,
    /// Comment.
    pub comment: Option<String>,
    /// Elements by key.
    pub elements: Elements,
}

impl Set {
    /// An empty set with the given key type.
    pub fn new(name: impl Into<String>, key: Vec<DataType>) -> Set {
        Set {
            name: name.into(),
            key,
            data: Vec::new(),
            type_of: None,
            dynamic: false,
            timeout: None,
            size: None,
            counter: false,
            comment: None,
            elements: Elements::default(),
        }
    }

    /// An empty verdict map with the given key type.
    pub fn verdict_map(name: impl Into<String>, key: Vec<DataType>) -> Set {
        Set {
            data: vec![DataType::Verdict],
            ..Set::new(name, key)
        }
    }

    /// An empty map declared by `typeof KEY : DATA`, or `None` when one of the
    /// expressions has no data type.
    pub fn typeof_map(name: impl Into<String>, key: Vec<Expr>, data: Vec<Expr>) -> Option<Set> {
        let types = |exprs: &[Expr]| {
            exprs
                .iter()
                .map(Expr::data_type)
                .collect::<Option<Vec<_>>>()
        };
        Some(Set {
            data: types(&data)?,
            type_of: Some(TypeOf {
                key: key.clone(),
                data,
            }),
            ..Set::new(name, types(&key)?)
        })
    }

    /// An empty set declared by `typeof KEY`, or `None` when a key expression has no data
    /// type.
    pub fn typeof_set(name: impl Into<String>, key: Vec<Expr>) -> Option<Set> {
        Set::typeof_map(name, key, Vec::new())
    }

    /// The same set with a comment.
    pub fn with_comment(mut self, comment: impl Into<String>) -> Set {
        self.comment = Some(comment.into());
        self
    }

    /// The same set with (`true`) or without a counter on every element.
    pub fn with_counter(mut self, counter: bool) -> Set {
        self.counter = counter;
        self
    }

    /// Whether this is a map.
    pub fn is_map(&self) -> bool {
        !self.data.is_empty()
    }

    /// Whether this is a slot map: a map whose last key field is declared as a `numgen
    /// random` result. nftproxy looks such a map up only with a fresh random number in
    /// that field (one per slot of the key's prefix, each as likely), so what a prefix
    /// means is its slots' values taken together, whichever slot holds which: the diff
    /// may move them between slots (see [`Set::slots_in_order`]).
    pub fn is_slot_map(&self) -> bool {
        self.is_map()
            && self
                .type_of
                .as_ref()
                .is_some_and(|t| matches!(t.key.last(), Some(Expr::NumgenRandom(_))))
    }

    /// The same set with a slot map's values in a canonical order: per key prefix, the
    /// values sorted, in its slots in ascending order. Two slot maps that mean the same
    /// are equal once both are in this order; other sets are returned as they are.
    pub fn slots_in_order(&self) -> Set {
        let mut set = self.without_elements();
        if !self.is_slot_map() {
            set.elements = self.elements.clone();
            return set;
        }
        for (_, mut group) in slot_groups(&self.elements) {
            let mut slots: Vec<Value> = group.iter().filter_map(|e| e.slot()).collect();
            slots.sort();
            group.sort_by(|a, b| a.payload().cmp(&b.payload()));
            for (slot, element) in slots.into_iter().zip(group) {
                set.elements.insert(element.in_slot(slot));
            }
        }
        set
    }

    /// The same declaration with no elements (without copying them first: a set can
    /// hold hundreds of thousands).
    pub fn without_elements(&self) -> Set {
        let Set {
            name,
            key,
            data,
            type_of,
            dynamic,
            timeout,
            size,
            counter,
            comment,
            elements: _,
        } = self;
        Set {
            name: name.clone(),
            key: key.clone(),
            data: data.clone(),
            type_of: type_of.clone(),
            dynamic: *dynamic,
            timeout: *timeout,
            size: *size,
            counter: *counter,
            comment: comment.clone(),
            elements: Elements::default(),
        }
    }

    /// Whether two sets are declared alike (elements aside): if not, the kernel needs
    /// the set deleted and created again.
    pub fn same_declaration(&self, other: &Set) -> bool {
        self.without_elements() == other.without_elements()
    }
}

/// The expressions of a `typeof` declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeOf {
    /// One expression per key field.
    pub key: Vec<Expr>,
    /// One expression per value field of a map.
    pub data: Vec<Expr>,
}
