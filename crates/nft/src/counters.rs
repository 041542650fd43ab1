//! What the kernel's counters held when they were read: per element of a counted set
//! or map, and per rule with a `counter` statement.
//!
//! Invariant: a reading names each counted object as the table does (set and element
//! key, or chain and rule handle), so two readings of the same table line up object by
//! object, and an object missing from the later one was deleted in between.

use crate::{Element, Family, Rule};

/// A counter's numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// An element of a counted set or map, with its counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountedElement {
    /// The set or map.
    pub set: String,
    /// The element (key, data or verdict, comment).
    pub element: Element,
    /// Its counter.
    pub count: Count,
}

/// A rule with a `counter` statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountedRule {
    /// Its chain.
    pub chain: String,
    /// The kernel's handle of the rule: a rule written again gets a new one, and a new
    /// counter.
    pub handle: u64,
    /// The rule.
    pub rule: Rule,
    /// Its counter.
    pub count: Count,
}

/// Every counter of one table, read at one time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterReading {
    /// The table's family.
    pub family: Option<Family>,
    /// Elements of counted sets and maps.
    pub elements: Vec<CountedElement>,
    /// Elements of uncounted sets read for what they say (their comments name the
    /// destinations the counted elements are about), by set.
    pub named: Vec<(String, Element)>,
    /// Rules with a counter.
    pub rules: Vec<CountedRule>,
}
