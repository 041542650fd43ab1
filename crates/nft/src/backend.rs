//! Where transactions go: the [`Backend`] trait, and [`FakeBackend`], an in-memory
//! kernel for tests of everything above the netlink layer.
//!
//! Invariant: a backend applies a transaction whole or not at all, as the kernel does.

use std::collections::BTreeMap;

use crate::table::Table;
use crate::transaction::Transaction;
use crate::types::Family;

/// Something that holds nftables tables.
pub trait Backend {
    /// Why an operation failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The current contents of a table; `None` when it does not exist.
    fn list(&mut self, family: Family, table: &str) -> Result<Option<Table>, Self::Error>;

    /// Applies a transaction atomically.
    fn apply(&mut self, tx: &Transaction) -> Result<(), Self::Error>;
}

/// A refused transaction in the [`FakeBackend`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FakeError(pub String);

/// An in-memory backend with the kernel's all-or-nothing semantics and reference checks.
#[derive(Debug, Default)]
pub struct FakeBackend {
    /// The tables it holds.
    pub tables: BTreeMap<(Family, String), Table>,
    /// Every transaction applied successfully, in order.
    pub applied: Vec<Transaction>,
    /// When set, the next `apply` fails with this message (and changes nothing).
    pub fail_next: Option<String>,
}

impl Backend for FakeBackend {
    type Error = FakeError;

    fn list(&mut self, family: Family, table: &str) -> Result<Option<Table>, FakeError> {
        Ok(self.tables.get(&(family, table.to_owned())).cloned())
    }

    fn apply(&mut self, tx: &Transaction) -> Result<(), FakeError> {
        if let Some(message) = self.fail_next.take() {
            return Err(FakeError(message));
        }
        let key = (tx.family, tx.table.clone());
        let after = tx
            .apply_to(self.tables.get(&key).cloned())
            .map_err(FakeError)?;
        match after {
            Some(table) => self.tables.insert(key, table),
            None => self.tables.remove(&key),
        };
        self.applied.push(tx.clone());
        Ok(())
    }
}
