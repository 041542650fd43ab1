//! Where transactions go: the [`Backend`] trait, and [`FakeBackend`], an in-memory
//! kernel for tests of everything above the netlink layer.
//!
//! Invariant: a backend applies a transaction whole or not at all, as the kernel does.

use std::collections::BTreeMap;

use crate::table::Table;
use crate::transaction::Transaction;
use crate::types::Family;

/// What kind of failure a backend reports, so that callers tell a table that holds
/// what nftproxy did not write from a read that merely failed this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An object does not exist.
    NotFound,
    /// An object exists already.
    Exists,
    /// The kernel is busy with the object (it is in use, or the ruleset changed under a
    /// read): trying again later can succeed.
    Busy,
    /// Not allowed (no CAP_NET_ADMIN, or a table owned by another program).
    Permission,
    /// The socket failed, or replies were lost.
    Io,
    /// The table holds something nftproxy did not write and cannot read.
    Foreign,
    /// The table is not what the transaction was planned against (changed behind our
    /// back).
    Conflict,
    /// Any other refusal of the kernel, or an object that cannot be encoded.
    Refused,
}

/// An error of a [`Backend`], with its kind.
pub trait BackendError: std::error::Error + Send + Sync + 'static {
    /// What kind of failure this is.
    fn kind(&self) -> ErrorKind;
}

/// Something that holds nftables tables.
pub trait Backend {
    /// Why an operation failed.
    type Error: BackendError;

    /// The current contents of a table; `None` when it does not exist.
    fn list(&mut self, family: Family, table: &str) -> Result<Option<Table>, Self::Error>;

    /// Applies a transaction atomically.
    fn apply(&mut self, tx: &Transaction) -> Result<(), Self::Error>;

    /// The ruleset's generation: a number every committed transaction changes (by
    /// anyone, on any table), so that an unchanged number proves nothing changed. `None`
    /// when the backend cannot tell.
    fn generation(&mut self) -> Result<Option<u32>, Self::Error> {
        Ok(None)
    }

    /// Whether another program changed `table` since the last call (or since the backend
    /// was opened); `None` when the backend cannot tell. Lets a moved generation that
    /// concerns other tables pass without reading ours back.
    fn changed_by_others(&mut self, _table: &str) -> Result<Option<bool>, Self::Error> {
        Ok(None)
    }
}

/// A failure in the [`FakeBackend`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FakeError {
    /// Its kind.
    pub kind: ErrorKind,
    /// What it says.
    pub message: String,
}

impl FakeError {
    /// A refused transaction.
    pub fn refused(message: impl Into<String>) -> FakeError {
        FakeError {
            kind: ErrorKind::Refused,
            message: message.into(),
        }
    }
}

impl BackendError for FakeError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// An in-memory backend with the kernel's all-or-nothing semantics and reference checks.
#[derive(Debug, Default)]
pub struct FakeBackend {
    /// The tables it holds.
    pub tables: BTreeMap<(Family, String), Table>,
    /// Every transaction applied successfully, in order.
    pub applied: Vec<Transaction>,
    /// When set, the next `apply` fails with this message (and changes nothing).
    pub fail_next: Option<String>,
    /// When set, the next `list` fails with this error.
    pub fail_list: Option<FakeError>,
    /// How many times a table was listed.
    pub lists: usize,
    /// The ruleset generation: bumped by every transaction applied, and by
    /// [`FakeBackend::tamper`].
    pub generation: u32,
    /// Tables [`FakeBackend::tamper`] changed, when it reports them
    /// ([`Backend::changed_by_others`]: `None` unless set).
    pub tampered: Option<std::collections::BTreeSet<String>>,
}

impl FakeBackend {
    /// Another program changes a table (`change` gets `None` when it does not exist and
    /// leaves `None` to delete it), committing a transaction of its own.
    pub fn tamper(&mut self, family: Family, table: &str, change: impl FnOnce(&mut Option<Table>)) {
        if let Some(tampered) = &mut self.tampered {
            tampered.insert(table.to_owned());
        }
        let key = (family, table.to_owned());
        let mut current = self.tables.remove(&key);
        change(&mut current);
        if let Some(table) = current {
            self.tables.insert(key, table);
        }
        self.generation = self.generation.wrapping_add(1);
    }
}

impl Backend for FakeBackend {
    type Error = FakeError;

    fn list(&mut self, family: Family, table: &str) -> Result<Option<Table>, FakeError> {
        self.lists += 1;
        if let Some(error) = self.fail_list.take() {
            return Err(error);
        }
        Ok(self.tables.get(&(family, table.to_owned())).cloned())
    }

    fn apply(&mut self, tx: &Transaction) -> Result<(), FakeError> {
        if let Some(message) = self.fail_next.take() {
            return Err(FakeError::refused(message));
        }
        let key = (tx.family, tx.table.clone());
        let after = tx
            .apply_to(self.tables.get(&key).cloned())
            .map_err(|e| FakeError::refused(e.to_string()))?;
        match after {
            Some(table) => self.tables.insert(key, table),
            None => self.tables.remove(&key),
        };
        self.applied.push(tx.clone());
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    fn generation(&mut self) -> Result<Option<u32>, FakeError> {
        Ok(Some(self.generation))
    }

    fn changed_by_others(&mut self, table: &str) -> Result<Option<bool>, FakeError> {
        Ok(self
            .tampered
            .as_mut()
            .map(|tampered| tampered.remove(table)))
    }
}
