//! What the running kernel does, probed once at start in a scratch table of nftproxy's
//! own rather than guessed from its release string (distribution kernels backport
//! fixes, and a vendor's 5.x may behave as 6.2).
//!
//! Invariant: the probe touches only its scratch table ([`PROBE_TABLE`]), which it
//! deletes whatever the outcome; a probe that cannot run decides for what every kernel
//! accepts.

use nftproxy_nft::{
    Backend, BackendError, DataType, Element, ErrorKind, Family, Op, Rule, Set, Stmt, Transaction,
    Value, Verdict,
};

use crate::ReconcilerOptions;

/// The scratch table of the probe (left over only if the process died during it; the
/// next probe and `--cleanup` remove it).
pub const PROBE_TABLE: &str = "nftproxy-probe";

const TARGET: &str = "target";
const MAP: &str = "dispatch";

/// What the probe found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainDeletes {
    /// A chain can be deleted in the transaction that deletes the map elements that
    /// jump to it (Linux 6.2 and later, and kernels that took the fix).
    WithTheirElements,
    /// The kernel refused that with EBUSY: such chains must wait for a later sync.
    AfterTheirElements,
    /// The probe could not run (why): chains wait, which every kernel accepts.
    Unknown(String),
}

impl std::fmt::Display for ChainDeletes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainDeletes::WithTheirElements => f.write_str(
                "a chain is deleted in the transaction that deletes the map elements naming it",
            ),
            ChainDeletes::AfterTheirElements => f.write_str(
                "the kernel keeps a chain busy until the map elements naming it are deleted: \
                 such chains are flushed, and deleted by the next sync",
            ),
            ChainDeletes::Unknown(why) => write!(
                f,
                "cannot probe whether a chain can go with the map elements naming it ({why}): \
                 such chains are flushed, and deleted by the next sync"
            ),
        }
    }
}

impl ChainDeletes {
    /// The reconciler's options for this kernel.
    pub fn options(&self) -> ReconcilerOptions {
        ReconcilerOptions {
            defer_chain_deletes: *self != ChainDeletes::WithTheirElements,
            ..ReconcilerOptions::default()
        }
    }
}

/// Probes in a scratch table whether the kernel deletes a chain in the transaction that
/// deletes the verdict map element jumping to it, then deletes the table.
pub fn chain_deletes<B: Backend>(backend: &mut B) -> ChainDeletes {
    let family = Family::Ip;
    let leftover = !matches!(backend.list(family, PROBE_TABLE), Ok(None));
    let mut tx = |ops: Vec<Op>| {
        let mut tx = Transaction::new(family, PROBE_TABLE);
        tx.ops = ops;
        backend.apply(&tx)
    };
    if leftover
        && let Err(error) = tx(vec![Op::DeleteTable])
        && error.kind() != ErrorKind::NotFound
    {
        return ChainDeletes::Unknown(error.to_string());
    }
    let key = || vec![Value::Port(1)];
    let created = tx(vec![
        Op::AddTable {
            comment: Some("nftproxy: a kernel probe at start, deleted at once".to_owned()),
        },
        Op::AddChain {
            name: TARGET.to_owned(),
            base: None,
        },
        Op::AddSet(Set::verdict_map(MAP, vec![DataType::InetService])),
        Op::AddElements {
            set: MAP.to_owned(),
            elements: vec![Element::with_verdict(
                key(),
                Verdict::Goto(TARGET.to_owned()),
            )],
        },
    ]);
    if let Err(error) = created {
        // Refused whole: there is no table to delete.
        return ChainDeletes::Unknown(error.to_string());
    }
    let found = match tx(vec![
        Op::DeleteElements {
            set: MAP.to_owned(),
            keys: vec![key()],
            is_map: true,
        },
        Op::DeleteChain(TARGET.to_owned()),
    ]) {
        Ok(()) => ChainDeletes::WithTheirElements,
        Err(error) if error.kind() == ErrorKind::Busy => ChainDeletes::AfterTheirElements,
        Err(error) => ChainDeletes::Unknown(error.to_string()),
    };
    if let Err(error) = tx(vec![Op::DeleteTable]) {
        tracing::warn!(%error, "cannot delete the kernel probe's table {PROBE_TABLE}");
    }
    found
}

/// Has the kernel load connection tracking, whose sysctls the daemon sets at start: a
/// rule matching `ct state` needs it (nft_ct depends on nf_conntrack), so adding one to
/// a chain of the scratch table loads it where it is a module. The table goes at once.
pub fn load_conntrack<B: Backend>(backend: &mut B) -> Result<(), B::Error> {
    let family = Family::Ip;
    let mut tx = Transaction::new(family, PROBE_TABLE);
    if !matches!(backend.list(family, PROBE_TABLE), Ok(None)) {
        tx.ops.push(Op::DeleteTable);
    }
    tx.ops.extend([
        Op::AddTable {
            comment: Some("nftproxy: a kernel probe at start, deleted at once".to_owned()),
        },
        Op::AddChain {
            name: TARGET.to_owned(),
            base: None,
        },
        Op::AddRule {
            chain: TARGET.to_owned(),
            rule: Rule::new(vec![Stmt::ct_state_new()]),
        },
    ]);
    backend.apply(&tx)?;
    let mut delete = Transaction::new(family, PROBE_TABLE);
    delete.ops.push(Op::DeleteTable);
    backend.apply(&delete)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nftproxy_nft::{FakeBackend, FakeError, Table};

    /// The fake kernel, whose `n`th transaction (counted from 1) fails with `kind`.
    struct Failing {
        kernel: FakeBackend,
        applied: usize,
        fail: Option<(usize, ErrorKind)>,
    }

    impl Backend for Failing {
        type Error = FakeError;

        fn list(&mut self, family: Family, table: &str) -> Result<Option<Table>, FakeError> {
            self.kernel.list(family, table)
        }

        fn apply(&mut self, tx: &Transaction) -> Result<(), FakeError> {
            self.applied += 1;
            match self.fail {
                Some((n, kind)) if n == self.applied => Err(FakeError {
                    kind,
                    message: format!("{kind:?}"),
                }),
                _ => self.kernel.apply(tx),
            }
        }
    }

    fn probed(fail: Option<(usize, ErrorKind)>) -> (ChainDeletes, Failing) {
        let mut backend = Failing {
            kernel: FakeBackend::default(),
            applied: 0,
            fail,
        };
        (chain_deletes(&mut backend), backend)
    }

    #[test]
    fn what_the_kernel_does_decides_and_the_scratch_table_goes() {
        // The first transaction builds the scratch table, the second deletes the
        // element and the chain, the third the table.
        for (fail, found) in [
            (None, ChainDeletes::WithTheirElements),
            (Some((2, ErrorKind::Busy)), ChainDeletes::AfterTheirElements),
            (
                Some((2, ErrorKind::Permission)),
                ChainDeletes::Unknown("Permission".into()),
            ),
            (
                Some((1, ErrorKind::Permission)),
                ChainDeletes::Unknown("Permission".into()),
            ),
        ] {
            let (probed, mut backend) = probed(fail);
            assert_eq!(probed, found, "{fail:?}");
            assert_eq!(
                probed.options().defer_chain_deletes,
                found != ChainDeletes::WithTheirElements
            );
            assert!(
                backend.kernel.tables.is_empty(),
                "{fail:?}: {:?}",
                backend.kernel.tables
            );
            assert_eq!(backend.list(Family::Ip, PROBE_TABLE).expect("lists"), None);
        }
    }

    #[test]
    fn a_table_left_by_a_probe_that_died_is_removed_first() {
        let mut backend = Failing {
            kernel: FakeBackend::default(),
            applied: 0,
            fail: None,
        };
        let mut tx = Transaction::new(Family::Ip, PROBE_TABLE);
        tx.ops.push(Op::AddTable { comment: None });
        backend.apply(&tx).expect("applied");
        assert_eq!(chain_deletes(&mut backend), ChainDeletes::WithTheirElements);
        assert!(backend.kernel.tables.is_empty());
    }
}
