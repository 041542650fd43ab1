//! nftables vocabulary for nftproxy: the objects of one table (`Table`, `Chain`, `Rule`,
//! `Set`, `Element`) with typed expressions instead of rule strings, and their canonical
//! text in `nft -f` syntax.
//!
//! Invariant: the text of a [`Table`] is a pure function of its contents, and it is
//! exactly what `nft list table` prints for the same objects (up to the order in which
//! the kernel returns set elements), so `--dry-run` output, golden files and the kernel
//! program are one and the same thing.

mod backend;
pub mod conntrack;
mod counters;
mod diff;
mod elements;
mod expr;
mod scope;
mod staged;
mod table;
mod text;
pub mod trace;
mod transaction;
mod types;

pub use backend::{Backend, BackendError, ErrorKind, FakeBackend, FakeError};
pub use conntrack::{Conntrack, FakeConntrack, Flow, Tuple};
pub use counters::{Count, CountedElement, CountedRule, CounterReading};
pub use diff::diff;
pub use elements::{Element, Elements};
pub use expr::{CmpOp, CtState, CtStatus, Expr, FibInput, MarkOp, PayloadField, Rhs, Rule, Stmt};
pub use scope::{Scope, Scopes, diff_scoped};
pub use table::{Chain, Set, Table, TypeOf};
pub use text::format_duration;
pub use transaction::{ApplyError, Op, Transaction};
pub use types::{BaseChain, ChainType, DataType, Family, Hook, L4Proto, Priority, Value, Verdict};
