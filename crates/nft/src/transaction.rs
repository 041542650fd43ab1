//! A transaction: an ordered list of operations on one table, applied all or nothing.
//!
//! Invariant: a transaction's text (its `Display`) is `nft -f` input that leaves the
//! table exactly as the operations do (a chain edited by position, which nft's text can
//! only name by handle, is written as a flush and its rules added again), and
//! [`Transaction::apply_to`] computes the table the kernel holds afterwards, so a
//! transaction can be checked against the kernel and against the in-memory model alike.

use std::fmt::{self, Display, Formatter};

use crate::elements::Element;
use crate::expr::Rule;
use crate::table::{Chain, Set, Table};
use crate::text::{base_chain_spec, set_declaration};
use crate::types::{BaseChain, Family, Value};

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create the table (with its comment) if it does not exist.
    AddTable {
        /// The table comment.
        comment: Option<String>,
    },
    /// Delete the table and everything in it.
    DeleteTable,
    /// Create a chain (empty) if it does not exist.
    AddChain {
        /// Name.
        name: String,
        /// Type, hook and priority of a base chain.
        base: Option<BaseChain>,
    },
    /// Remove every rule of a chain.
    FlushChain(String),
    /// Edit a chain in place: delete some of its rules, by their positions in it before
    /// the transaction, and insert others among the rules kept, leaving `rules`. This
    /// must be the transaction's only operation on the chain: the kernel names the rules
    /// to delete, and those to insert before, by handle, which the backend looks up by
    /// position.
    EditRules {
        /// The chain.
        chain: String,
        /// Positions (from 0, ascending) of the rules deleted.
        deleted: Vec<usize>,
        /// Positions (from 0, ascending) in `rules` of the rules added; the others are
        /// the rules kept, in their old order.
        added: Vec<usize>,
        /// The rules afterwards. nft's text has no positions, so the text form flushes
        /// the chain and adds these again (same result, not the same cost).
        rules: Vec<Rule>,
    },
    /// Delete an empty, unreferenced chain.
    DeleteChain(String),
    /// Append a rule to a chain.
    AddRule {
        /// The chain.
        chain: String,
        /// The rule.
        rule: Rule,
    },
    /// Create a set or map (its elements are not part of this operation).
    AddSet(Set),
    /// Delete an unreferenced set or map.
    DeleteSet {
        /// Name.
        name: String,
        /// Whether it is a map (nft spells the two differently).
        is_map: bool,
    },
    /// Add elements to a set or map.
    AddElements {
        /// The set.
        set: String,
        /// The elements.
        elements: Vec<Element>,
    },
    /// Delete elements (by key) from a set or map.
    DeleteElements {
        /// The set.
        set: String,
        /// The keys.
        keys: Vec<Vec<Value>>,
        /// Whether the set is a map.
        is_map: bool,
    },
}

impl Op {
    /// How many kernel objects this operation touches (each element counts), the
    /// measure kube-proxy reports as a transaction's size.
    pub fn count(&self) -> usize {
        match self {
            Op::AddElements { elements, .. } => elements.len(),
            Op::DeleteElements { keys, .. } => keys.len(),
            Op::EditRules { deleted, added, .. } => deleted.len() + added.len(),
            _ => 1,
        }
    }

    /// One line for logs and errors, e.g. "add 3 elements to service-ips".
    pub fn describe(&self) -> String {
        match self {
            Op::AddTable { .. } => "add table".to_owned(),
            Op::DeleteTable => "delete table".to_owned(),
            Op::AddChain { name, .. } => format!("add chain {name}"),
            Op::FlushChain(name) => format!("flush chain {name}"),
            Op::DeleteChain(name) => format!("delete chain {name}"),
            Op::EditRules {
                chain,
                deleted,
                added,
                ..
            } => format!("edit chain {chain}: delete rules {deleted:?}, add rules {added:?}"),
            Op::AddRule { chain, rule } => format!("add rule in chain {chain} `{rule}`"),
            Op::AddSet(set) => format!("add set {}", set.name),
            Op::DeleteSet { name, .. } => format!("delete set {name}"),
            Op::AddElements { set, elements } => {
                format!("add {} elements to {set}", elements.len())
            }
            Op::DeleteElements { set, keys, .. } => {
                format!("delete {} elements from {set}", keys.len())
            }
        }
    }
}

/// Operations on one table, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// The table's family.
    pub family: Family,
    /// The table's name.
    pub table: String,
    /// The operations.
    pub ops: Vec<Op>,
}

impl Transaction {
    /// An empty transaction on a table.
    pub fn new(family: Family, table: impl Into<String>) -> Transaction {
        Transaction {
            family,
            table: table.into(),
            ops: Vec::new(),
        }
    }

    /// The number of objects touched (0 for a sync with nothing to do).
    pub fn len(&self) -> usize {
        self.ops.iter().map(Op::count).sum()
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The operations that create `table` from nothing.
    pub fn create(table: &Table) -> Transaction {
        let mut tx = Transaction::new(table.family, table.name.clone());
        tx.ops.push(Op::AddTable {
            comment: table.comment.clone(),
        });
        for set in table.sets.values() {
            tx.ops.push(Op::AddSet(set.without_elements()));
        }
        for chain in table.chains_in_order() {
            tx.ops.push(Op::AddChain {
                name: chain.name.clone(),
                base: chain.base,
            });
        }
        for chain in table.chains_in_order() {
            tx.push_rules(chain);
        }
        for set in table.sets.values() {
            tx.push_elements(&set.name, set.elements.values().cloned().collect());
        }
        tx
    }

    pub(crate) fn push_rules(&mut self, chain: &Chain) {
        for rule in &chain.rules {
            self.ops.push(Op::AddRule {
                chain: chain.name.clone(),
                rule: rule.clone(),
            });
        }
    }

    pub(crate) fn push_elements(&mut self, set: &str, elements: Vec<Element>) {
        if !elements.is_empty() {
            self.ops.push(Op::AddElements {
                set: set.to_owned(),
                elements,
            });
        }
    }

    /// The table after this transaction, starting from `table` (`None`: no table). Fails
    /// like the kernel would on a missing or still-referenced object, naming it.
    pub fn apply_to(&self, table: Option<Table>) -> Result<Option<Table>, ApplyError> {
        let mut table = table;
        for op in &self.ops {
            if let Op::AddTable { comment } = op {
                if table.is_none() {
                    let mut new = Table::new(self.family, self.table.clone());
                    new.comment = comment.clone();
                    table = Some(new);
                }
                continue;
            }
            if matches!(op, Op::DeleteTable) {
                table
                    .take()
                    .ok_or_else(|| ApplyError::NoTable(op.describe()))?;
                continue;
            }
            let t = table
                .as_mut()
                .ok_or_else(|| ApplyError::NoTable(op.describe()))?;
            apply_op(t, op)?;
        }
        Ok(table)
    }
}

/// Why a transaction cannot be applied to a table: what the kernel would refuse, with
/// the object named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The operation needs the table, which does not exist.
    #[error("{0}: no such table")]
    NoTable(String),
    /// A chain that is named does not exist.
    #[error("no such chain {0}")]
    NoChain(String),
    /// A set or map that is named does not exist.
    #[error("no such set {0}")]
    NoSet(String),
    /// An element to delete is not in its set.
    #[error("delete element from {0}: no such element")]
    NoElement(String),
    /// A chain to delete still has rules.
    #[error("delete chain {0}: chain is not empty")]
    ChainNotEmpty(String),
    /// A chain or set to delete is still referred to.
    #[error("delete {object}: still used by {user}")]
    InUse {
        /// `chain NAME` or `set NAME`.
        object: String,
        /// What refers to it.
        user: String,
    },
    /// An edit of a chain's rules does not fit the rules it holds.
    #[error("edit rules of {chain}: {problem}")]
    BadEdit {
        /// The chain.
        chain: String,
        /// What does not fit.
        problem: String,
    },
    /// A transaction limited to a scope deletes the whole table.
    #[error("the transaction deletes the table")]
    DeletesTable,
}

fn apply_op(t: &mut Table, op: &Op) -> Result<(), ApplyError> {
    match op {
        Op::AddTable { .. } | Op::DeleteTable => unreachable!("handled by apply_to"),
        Op::AddChain { name, base } => {
            t.chains.entry(name.clone()).or_insert_with(|| Chain {
                name: name.clone(),
                base: *base,
                rules: Vec::new(),
            });
        }
        Op::FlushChain(name) => {
            chain_mut(t, name)?.rules.clear();
        }
        Op::EditRules {
            chain,
            deleted,
            added,
            rules,
        } => {
            for rule in added.iter().filter_map(|at| rules.get(*at)) {
                check_references(t, rule)?;
            }
            let old = &mut chain_mut(t, chain)?.rules;
            if !ascending_below(deleted, old.len()) || !ascending_below(added, rules.len()) {
                return Err(ApplyError::BadEdit {
                    chain: chain.clone(),
                    problem: format!("no rules at {deleted:?} to delete, or at {added:?} to add"),
                });
            }
            for position in deleted.iter().rev() {
                old.remove(*position);
            }
            let kept = (0..rules.len())
                .filter(|at| added.binary_search(at).is_err())
                .map(|at| &rules[at]);
            if !kept.eq(old.iter()) {
                return Err(ApplyError::BadEdit {
                    chain: chain.clone(),
                    problem: "other rules are kept".to_owned(),
                });
            }
            old.clone_from(rules);
        }
        Op::DeleteChain(name) => {
            if !chain_mut(t, name)?.rules.is_empty() {
                return Err(ApplyError::ChainNotEmpty(name.clone()));
            }
            if let Some(user) = t.chain_users(name).first() {
                return Err(ApplyError::InUse {
                    object: format!("chain {name}"),
                    user: user.to_string(),
                });
            }
            t.chains.remove(name);
        }
        Op::AddRule { chain, rule } => {
            check_references(t, rule)?;
            chain_mut(t, chain)?.rules.push(rule.clone());
        }
        Op::AddSet(set) => {
            t.sets
                .entry(set.name.clone())
                .or_insert_with(|| set.without_elements());
        }
        Op::DeleteSet { name, .. } => {
            set_mut(t, name)?;
            if let Some(user) = t.set_users(name).first() {
                return Err(ApplyError::InUse {
                    object: format!("set {name}"),
                    user: format!("chain {user}"),
                });
            }
            t.sets.remove(name);
        }
        Op::AddElements { set, elements } => {
            for element in elements {
                if let Some(target) = element.verdict().and_then(|v| v.target()) {
                    chain_mut(t, target)?;
                }
            }
            let s = set_mut(t, set)?;
            for element in elements {
                // Adding an existing key is a no-op in the kernel, as in nft.
                s.elements.insert_new(element.clone());
            }
        }
        Op::DeleteElements { set, keys, .. } => {
            let s = set_mut(t, set)?;
            for key in keys {
                if s.elements.remove(key).is_none() {
                    return Err(ApplyError::NoElement(set.clone()));
                }
            }
        }
    }
    Ok(())
}

/// Whether `positions` ascend and all lie below `len`.
fn ascending_below(positions: &[usize], len: usize) -> bool {
    positions.windows(2).all(|w| w[0] < w[1]) && positions.last().is_none_or(|p| *p < len)
}

/// Fails unless the chains and sets `rule` refers to exist.
fn check_references(t: &mut Table, rule: &Rule) -> Result<(), ApplyError> {
    for target in rule.referenced_chains() {
        chain_mut(t, target)?;
    }
    for set in rule.referenced_sets() {
        set_mut(t, set)?;
    }
    Ok(())
}

fn chain_mut<'t>(t: &'t mut Table, name: &str) -> Result<&'t mut Chain, ApplyError> {
    t.chains
        .get_mut(name)
        .ok_or_else(|| ApplyError::NoChain(name.to_owned()))
}

fn set_mut<'t>(t: &'t mut Table, name: &str) -> Result<&'t mut Set, ApplyError> {
    t.sets
        .get_mut(name)
        .ok_or_else(|| ApplyError::NoSet(name.to_owned()))
}

impl Display for Transaction {
    /// `nft -f` input, one command per line.
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let (family, table) = (self.family, &self.table);
        for op in &self.ops {
            match op {
                Op::AddTable { comment: Some(c) } => {
                    writeln!(f, "add table {family} {table} {{ comment \"{c}\"; }}")?
                }
                Op::AddTable { comment: None } => writeln!(f, "add table {family} {table}")?,
                Op::DeleteTable => writeln!(f, "delete table {family} {table}")?,
                Op::AddChain {
                    name,
                    base: Some(base),
                } => writeln!(
                    f,
                    "add chain {family} {table} {name} {{ {}; }}",
                    base_chain_spec(base)
                )?,
                Op::AddChain { name, base: None } => {
                    writeln!(f, "add chain {family} {table} {name}")?
                }
                Op::FlushChain(name) => writeln!(f, "flush chain {family} {table} {name}")?,
                Op::EditRules { chain, rules, .. } => {
                    writeln!(f, "flush chain {family} {table} {chain}")?;
                    for rule in rules {
                        writeln!(f, "add rule {family} {table} {chain} {rule}")?;
                    }
                }
                Op::DeleteChain(name) => writeln!(f, "delete chain {family} {table} {name}")?,
                Op::AddRule { chain, rule } => {
                    writeln!(f, "add rule {family} {table} {chain} {rule}")?
                }
                Op::AddSet(set) => {
                    let keyword = if set.is_map() { "map" } else { "set" };
                    let declaration = set_declaration(set).join("; ");
                    writeln!(
                        f,
                        "add {keyword} {family} {table} {} {{ {declaration}; }}",
                        set.name
                    )?;
                }
                Op::DeleteSet { name, is_map } => {
                    let keyword = if *is_map { "map" } else { "set" };
                    writeln!(f, "delete {keyword} {family} {table} {name}")?;
                }
                Op::AddElements { set, elements } => {
                    let elements: Vec<String> = elements.iter().map(ToString::to_string).collect();
                    writeln!(
                        f,
                        "add element {family} {table} {set} {{ {} }}",
                        elements.join(", ")
                    )?;
                }
                Op::DeleteElements { set, keys, .. } => {
                    let keys: Vec<String> = keys
                        .iter()
                        .map(|k| Element::new(k.clone()).to_string())
                        .collect();
                    writeln!(
                        f,
                        "delete element {family} {table} {set} {{ {} }}",
                        keys.join(", ")
                    )?;
                }
            }
        }
        Ok(())
    }
}
