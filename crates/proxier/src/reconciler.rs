//! The reconciler: brings the kernel's nftproxy tables to the desired ones with the
//! smallest transactions, one per family, keeping what it applied in memory.
//!
//! Invariant: `applied` is exactly what the kernel holds whenever `known` is set; it is
//! read back from the kernel at start-up and after any failure, never assumed. A failed
//! transaction changes nothing (the kernel guarantees it), so the old rules keep serving.
//! `generation` is the ruleset generation at which `applied` was last proven equal to the
//! kernel's tables: while the kernel reports the same number, nobody changed anything.

use std::collections::{BTreeMap, BTreeSet};

use nftproxy_nft::{
    Backend, BackendError, ErrorKind, Family, Op, Scope, Scopes, Table, Transaction, diff,
    diff_scoped,
};
use tracing::{debug, warn};

/// Why a sync did not complete.
#[derive(Debug, thiserror::Error)]
pub enum SyncError<E: BackendError> {
    /// The kernel's table could not be read back (and is not known to hold anything
    /// foreign); nothing was changed.
    #[error("reading table {family} {table} back: {source}")]
    Read {
        /// Family.
        family: Family,
        /// Table.
        table: String,
        /// Cause.
        source: E,
    },
    /// The kernel refused the transaction; nothing changed.
    #[error("programming table {family} {table} ({operations} operations): {source}")]
    Apply {
        /// Family.
        family: Family,
        /// Table.
        table: String,
        /// Size of the refused transaction.
        operations: usize,
        /// Cause.
        source: E,
    },
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Objects touched, over all families (0 when nothing changed).
    pub operations: usize,
    /// Transactions sent.
    pub transactions: usize,
    /// Whether the kernel's tables were read first (start-up, after a failure, or to
    /// repair a change made by another program).
    pub read_back: bool,
    /// After a read-back, what the sync changed: one line per operation, the first
    /// [`DESCRIBED_OPERATIONS`] of them.
    pub changed: Vec<String>,
}

/// How many operations a [`SyncReport`] after a read-back describes.
pub const DESCRIBED_OPERATIONS: usize = 20;

/// How the reconciler treats the kernel.
#[derive(Debug, Clone, Copy)]
pub struct ReconcilerOptions {
    /// Before Linux 6.2, a chain cannot be deleted in the transaction that deletes the
    /// map elements pointing at it (EBUSY): such chains are flushed, and deleted by a
    /// later sync. [`crate::probe::chain_deletes`] finds out.
    pub defer_chain_deletes: bool,
    /// A table created from nothing (a cold start) is written in transactions of about
    /// this many objects, each adding whole Services, so that no single commit holds the
    /// nf_tables lock for long; every other change is one transaction.
    pub cold_stage_objects: usize,
}

/// The default [`ReconcilerOptions::cold_stage_objects`]: about 700 Services with five
/// endpoints each, which the kernel commits in about 0.1 s on the benchmark machine.
pub const COLD_STAGE_OBJECTS: usize = 10_000;

impl Default for ReconcilerOptions {
    fn default() -> Self {
        ReconcilerOptions {
            defer_chain_deletes: false,
            cold_stage_objects: COLD_STAGE_OBJECTS,
        }
    }
}

/// How [`Reconciler::apply`] records a transaction the kernel took.
#[derive(Clone, Copy)]
enum Record<'a> {
    /// Apply it to the whole applied table.
    Whole,
    /// Apply it to the objects the scope names.
    Scoped(&'a Scope),
    /// Not at all: the caller records the result of a series (a staged cold load).
    Later,
}

/// Keeps the kernel's tables equal to the desired ones.
pub struct Reconciler<B: Backend> {
    backend: B,
    table: String,
    options: ReconcilerOptions,
    applied: BTreeMap<Family, Option<Table>>,
    /// Families whose table could not be read back (it holds something nftproxy did not
    /// write): the next transaction replaces the whole table.
    unreadable: Vec<Family>,
    /// Chains whose deletion was held back (see
    /// [`ReconcilerOptions::defer_chain_deletes`]): still in the kernel, no longer wanted.
    held_back: BTreeMap<Family, BTreeSet<String>>,
    known: bool,
    /// See the module's invariant; `None` when unknown.
    generation: Option<u32>,
    /// `applied` was read ahead of the first sync ([`Reconciler::read_ahead`]): that sync
    /// compares everything, once it has made sure nobody changed our tables since.
    read_ahead: bool,
}

const FAMILIES: [Family; 2] = [Family::Ip, Family::Ip6];

impl<B: Backend> Reconciler<B> {
    /// A reconciler for the tables named `table`; it reads the kernel on its first sync.
    pub fn new(backend: B, table: impl Into<String>, options: ReconcilerOptions) -> Reconciler<B> {
        Reconciler {
            backend,
            table: table.into(),
            options,
            applied: BTreeMap::new(),
            unreadable: Vec::new(),
            held_back: BTreeMap::new(),
            known: false,
            generation: None,
            read_ahead: false,
        }
    }

    /// Plans with `options` from now on.
    pub(crate) fn set_options(&mut self, options: ReconcilerOptions) {
        self.options = options;
    }

    /// The backend (for callers that also read or clean up).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// What the kernel holds for a family, as far as this reconciler knows.
    pub fn applied(&self, family: Family) -> Option<&Table> {
        self.applied.get(&family).and_then(Option::as_ref)
    }

    /// Forgets the applied state, so the next sync reads the kernel again.
    pub fn invalidate(&mut self) {
        self.known = false;
    }

    /// Whether another program may have changed our tables since this reconciler last
    /// wrote or read them: one question to the kernel (its generation), and when that
    /// moved, the backend's record of whose commits touched which table; no read-back.
    /// True when the applied state is not known or the kernel cannot be asked; false when
    /// the backend cannot tell generations.
    pub fn drifted(&mut self) -> bool {
        if !self.known {
            return true;
        }
        match self.backend.generation() {
            Ok(Some(now)) if self.generation == Some(now) => false,
            // Someone committed: if the backend can tell that nobody touched our table,
            // the applied state still holds at the new generation.
            Ok(Some(now)) => match self.backend.changed_by_others(&self.table) {
                Ok(Some(false)) => {
                    tracing::debug!(
                        generation = now,
                        "another program committed to other tables; nftproxy's are intact"
                    );
                    self.generation = Some(now);
                    false
                }
                _ => true,
            },
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// The kernel's generation now, `None` when it cannot be had.
    fn kernel_generation(&mut self) -> Option<u32> {
        self.backend.generation().ok().flatten()
    }

    /// Reads the kernel's tables. A table holding what nftproxy cannot read is not fatal:
    /// it is ours, so it is replaced as a whole by the next transaction. Any other failure
    /// (a busy kernel, a lost reply) fails the sync, to be retried: replacing a whole table
    /// for a transient error would rewrite every rule.
    fn read_back(&mut self) -> Result<(), SyncError<B::Error>> {
        // What others changed before this read is in what it reads.
        let _ = self.backend.changed_by_others(&self.table);
        let before = self.kernel_generation();
        self.unreadable.clear();
        for family in FAMILIES {
            match self.backend.list(family, &self.table) {
                Ok(table) => {
                    self.applied.insert(family, table);
                }
                Err(error) if error.kind() == ErrorKind::Foreign => {
                    warn!(%family, %error, "cannot read table back; it will be replaced whole");
                    self.applied.insert(family, None);
                    self.unreadable.push(family);
                }
                Err(source) => {
                    self.known = false;
                    return Err(SyncError::Read {
                        family,
                        table: self.table.clone(),
                        source,
                    });
                }
            }
        }
        // What was read is one state of the kernel only if nothing committed meanwhile.
        let after = self.kernel_generation();
        self.generation = before.filter(|b| Some(*b) == after);
        self.known = true;
        Ok(())
    }

    /// Reads the kernel's tables now, ahead of the first sync, so that the read (seconds
    /// for a large cluster after a restart) can overlap the wait for the API server's
    /// lists. A failure is left for the first sync to meet again.
    pub fn read_ahead(&mut self) {
        if self.known {
            return;
        }
        let started = std::time::Instant::now();
        let read = self.read_back();
        debug!(
            took_ms = started.elapsed().as_millis() as u64,
            "tables read ahead"
        );
        if let Err(error) = read {
            debug!(%error, "reading the tables ahead failed; the first sync reads them");
            return;
        }
        self.read_ahead = true;
    }

    /// The transactions that bring one family from `current` to `desired`: the diff (of
    /// the objects in `scope` alone, when given), with deletes of still-referenced chains
    /// held back when the kernel needs that.
    pub fn plan(
        &self,
        family: Family,
        desired: Option<&Table>,
        scope: Option<&Scope>,
    ) -> Transaction {
        self.plan_holding(family, desired, scope).0
    }

    /// [`Reconciler::plan`], and the chains whose deletion it holds back.
    fn plan_holding(
        &self,
        family: Family,
        desired: Option<&Table>,
        scope: Option<&Scope>,
    ) -> (Transaction, BTreeSet<String>) {
        let mut held = BTreeSet::new();
        if self.unreadable.contains(&family) {
            // Add-then-delete removes the table whether or not it exists, in the same
            // atomic transaction that writes the new one.
            let mut tx = Transaction::new(family, self.table.clone());
            tx.ops.push(Op::AddTable { comment: None });
            tx.ops.push(Op::DeleteTable);
            if let Some(desired) = desired {
                tx.ops.extend(Transaction::create(desired).ops);
            }
            return (tx, held);
        }
        let current = self.applied(family);
        let mut tx = match desired {
            Some(desired) => match (current, scope) {
                (Some(current), Some(scope)) => diff_scoped(current, desired, scope),
                _ => diff(current, desired),
            },
            None if current.is_some() => {
                let mut tx = Transaction::new(family, self.table.clone());
                tx.ops.push(Op::DeleteTable);
                tx
            }
            None => Transaction::new(family, self.table.clone()),
        };
        if self.options.defer_chain_deletes
            && let Some(current) = current
        {
            tx.ops.retain(|op| match op {
                Op::DeleteChain(name) if !current.chain_users(name).is_empty() => {
                    held.insert(name.clone());
                    false
                }
                _ => true,
            });
        }
        (tx, held)
    }

    /// The transactions a sync would send now, without sending them (reads the kernel
    /// first when the applied state is not known).
    pub fn plans(&mut self, desired: &[Table]) -> Result<Vec<Transaction>, SyncError<B::Error>> {
        if !self.known {
            self.read_back()?;
        }
        Ok(FAMILIES
            .iter()
            .map(|family| self.plan(*family, desired.iter().find(|t| t.family == *family), None))
            .collect())
    }

    /// Brings the kernel to `desired` (at most one table per family; a family without a
    /// table has its table removed).
    pub fn sync(&mut self, desired: &[Table]) -> Result<SyncReport, SyncError<B::Error>> {
        self.sync_changes(desired, &Scopes::everything())
    }

    /// Like [`Reconciler::sync`], for `desired` tables of which only what `scopes` names
    /// may differ from the tables of the last successful sync; the rest is not compared.
    /// After a failure (or at start-up) the kernel is read back and compared whole.
    pub fn sync_changes(
        &mut self,
        desired: &[Table],
        scopes: &Scopes,
    ) -> Result<SyncReport, SyncError<B::Error>> {
        let mut report = SyncReport::default();
        let mut scopes = scopes;
        let everything = Scopes::everything();
        if std::mem::take(&mut self.read_ahead) && self.known {
            // What was read ahead stands only if no commit since touched our tables.
            if self.drifted() {
                self.known = false;
            } else {
                report.read_back = true;
                scopes = &everything;
            }
        }
        if !self.known {
            self.read_back()?;
            report.read_back = true;
            scopes = &everything;
        }
        for family in FAMILIES {
            let want = desired.iter().find(|t| t.family == family);
            let cold = self.applied(family).is_none() && !self.unreadable.contains(&family);
            if let Some(table) = want.filter(|_| cold) {
                for tx in Transaction::create_staged(table, self.options.cold_stage_objects) {
                    self.apply(family, &tx, Record::Later, &mut report)?;
                }
                // Every stage went in: the kernel holds the table. The copy shares its
                // elements with the desired one.
                self.applied.insert(family, Some(table.clone()));
                continue;
            }
            // Chains held back last time are not in the desired table; the scope must
            // name them for their deletion to be seen again.
            let scope = scopes.get(family).map(|scope| {
                let mut scope = scope.clone();
                let held = self.held_back.get(&family).into_iter().flatten();
                scope.chains.extend(held.cloned());
                scope
            });
            let (tx, held) = self.plan_holding(family, want, scope.as_ref());
            let record = scope.as_ref().map_or(Record::Whole, Record::Scoped);
            self.apply(family, &tx, record, &mut report)?;
            if let (Record::Whole, Some(Some(applied)), Some(want)) =
                (record, self.applied.get_mut(&family), want)
            {
                // After a read-back the copy's elements are the kernel's; where they equal
                // the desired ones, keep one of each.
                applied.share_elements(want);
            }
            self.held_back.insert(family, held);
        }
        Ok(report)
    }

    /// Sends one transaction and, when the kernel took it, records its effect as
    /// `record` says.
    fn apply(
        &mut self,
        family: Family,
        tx: &Transaction,
        record: Record<'_>,
        report: &mut SyncReport,
    ) -> Result<(), SyncError<B::Error>> {
        if tx.is_empty() {
            return Ok(());
        }
        let operations = tx.len();
        let before = self.kernel_generation();
        if let Err(source) = self.backend.apply(tx) {
            // The kernel kept the old rules; re-read before trusting anything again.
            self.known = false;
            self.generation = None;
            debug!(%family, operations, error = %source, "transaction refused; old rules stay");
            return Err(SyncError::Apply {
                family,
                table: self.table.clone(),
                operations,
                source,
            });
        }
        // Only when nobody else committed between the last proof and this commit is the
        // kernel still exactly what the applied state says.
        let after = self.kernel_generation();
        self.generation = match (self.generation, before, after) {
            (Some(known), Some(before), Some(after))
                if known == before && after == before.wrapping_add(1) =>
            {
                // Every commit since the last proof is ours: what the backend recorded
                // of others (or lost while it did not listen) concerns none of them.
                let _ = self.backend.changed_by_others(&self.table);
                Some(after)
            }
            _ => None,
        };
        if report.read_back {
            let room = DESCRIBED_OPERATIONS.saturating_sub(report.changed.len());
            let described = tx.ops.iter().take(room).map(Op::describe);
            report.changed.extend(described);
        }
        self.unreadable.retain(|f| *f != family);
        // The transaction was checked against the same model the kernel follows.
        let applied = self.applied.entry(family).or_default();
        let outcome = match (applied.as_mut(), record) {
            (_, Record::Later) => Ok(()),
            (Some(table), Record::Scoped(scope)) => scope.apply(table, tx),
            _ => tx.apply_to(applied.take()).map(|after| *applied = after),
        };
        if let Err(reason) = outcome {
            warn!(%family, %reason, "applied state unknown after a transaction; will re-read");
            self.known = false;
        }
        debug!(%family, operations, "transaction applied");
        report.operations += operations;
        report.transactions += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nftproxy_nft::{Chain, Element, FakeBackend, FakeError, Rule, Set, Stmt, Value, Verdict};
    use std::collections::BTreeSet;

    /// A kernel that already holds [`table`]`(services)`, as after a restart.
    fn kernel_holding(services: &[&str]) -> FakeBackend {
        let mut backend = FakeBackend::default();
        backend
            .apply(&Transaction::create(&table(services)))
            .unwrap();
        backend
    }

    fn table(services: &[&str]) -> Table {
        let mut t = Table::new(Family::Ip, "nftproxy");
        t.add_set(Set::verdict_map(
            "service-ips",
            vec![nftproxy_nft::DataType::Ipv4Addr],
        ));
        for (i, name) in services.iter().enumerate() {
            t.add_chain(Chain::regular(
                *name,
                vec![Rule::new(vec![Stmt::Verdict(Verdict::Accept)])],
            ));
            t.add_element(
                "service-ips",
                Element::with_verdict(
                    vec![Value::Addr([10, 0, 0, i as u8 + 1].into())],
                    Verdict::Goto((*name).into()),
                ),
            );
        }
        t
    }

    /// What may differ between `table(from)` and `table(to)`: the chains of both and
    /// their `service-ips` elements.
    fn scopes(from: &[&str], to: &[&str]) -> Scopes {
        let mut scope = Scope::default();
        for names in [from, to] {
            for (i, name) in names.iter().enumerate() {
                scope.chains.insert((*name).to_owned());
                let key = vec![Value::Addr([10, 0, 0, i as u8 + 1].into())];
                scope
                    .elements
                    .entry("service-ips".to_owned())
                    .or_default()
                    .insert(key);
            }
        }
        let mut scopes = Scopes::nothing();
        scopes.insert(Family::Ip, scope);
        scopes
    }

    #[test]
    fn a_scoped_sync_sends_what_a_whole_one_does_and_keeps_the_applied_table_exact() {
        let options = ReconcilerOptions::default();
        let mut whole = Reconciler::new(FakeBackend::default(), "nftproxy", options);
        let mut scoped = Reconciler::new(FakeBackend::default(), "nftproxy", options);
        for r in [&mut whole, &mut scoped] {
            r.sync(&[table(&["a", "b"])]).unwrap();
        }
        let next = [table(&["a", "c"])];
        let by_whole = whole.sync(&next).unwrap();
        let by_scope = scoped
            .sync_changes(&next, &scopes(&["a", "b"], &["a", "c"]))
            .unwrap();
        assert_eq!(by_scope, by_whole);
        assert_eq!(scoped.backend_mut().applied, whole.backend_mut().applied);
        assert_eq!(scoped.applied(Family::Ip), Some(&next[0]));
        assert_eq!(
            scoped.sync_changes(&next, &Scopes::nothing()).unwrap(),
            SyncReport::default()
        );
    }

    #[test]
    fn a_second_sync_of_the_same_tables_does_nothing() {
        let mut r = Reconciler::new(
            FakeBackend::default(),
            "nftproxy",
            ReconcilerOptions::default(),
        );
        let first = r.sync(&[table(&["a", "b"])]).unwrap();
        assert!(first.read_back && first.operations > 0);
        let second = r.sync(&[table(&["a", "b"])]).unwrap();
        assert_eq!(second, SyncReport::default());
    }

    #[test]
    fn a_cold_start_is_staged_and_later_changes_are_one_transaction() {
        let options = ReconcilerOptions {
            cold_stage_objects: 6,
            ..ReconcilerOptions::default()
        };
        let mut r = Reconciler::new(FakeBackend::default(), "nftproxy", options);
        let names = ["a", "b", "c", "d", "e", "f"];
        let cold = r.sync(&[table(&names)]).unwrap();
        // The table and its map, then two Services (a chain, a rule and an element: three
        // objects each) per stage.
        assert_eq!(cold.transactions, 4);
        assert_eq!(r.applied(Family::Ip), Some(&table(&names)));
        assert_eq!(r.backend_mut().tables.values().next(), Some(&table(&names)));
        let mut more = names.to_vec();
        more.extend(["g", "h", "i"]);
        let warm = r.sync(&[table(&more)]).unwrap();
        assert_eq!(warm.transactions, 1);
    }

    /// Whether `a` and `b` hold the very same `service-ips` elements, not equal copies.
    fn shared(a: &Table, b: &Table) -> bool {
        let (a, b) = (
            &a.sets["service-ips"].elements,
            &b.sets["service-ips"].elements,
        );
        a.len() == b.len()
            && a.values().all(|element| {
                let key = element.key();
                match (a.get_shared(&key), b.get_shared(&key)) {
                    (Some(x), Some(y)) => std::sync::Arc::ptr_eq(x, y),
                    _ => false,
                }
            })
    }

    #[test]
    fn the_applied_copy_shares_its_elements_with_the_desired_table() {
        let options = ReconcilerOptions {
            cold_stage_objects: 6,
            ..ReconcilerOptions::default()
        };
        let desired = [table(&["a", "b", "c", "d"])];
        let mut r = Reconciler::new(FakeBackend::default(), "nftproxy", options);
        r.sync(&desired).unwrap();
        assert!(shared(r.applied(Family::Ip).unwrap(), &desired[0]));

        // After a restart the copy is read from the kernel, then shared where equal.
        let backend = std::mem::take(r.backend_mut());
        let mut r = Reconciler::new(backend, "nftproxy", options);
        let desired = [table(&["a", "b", "c"])];
        assert_eq!(r.sync(&desired).unwrap().operations, 3);
        assert!(shared(r.applied(Family::Ip).unwrap(), &desired[0]));
    }

    #[test]
    fn a_failed_transaction_keeps_the_old_rules_and_is_followed_by_a_read_back() {
        let mut r = Reconciler::new(
            FakeBackend::default(),
            "nftproxy",
            ReconcilerOptions::default(),
        );
        r.sync(&[table(&["a"])]).unwrap();
        r.backend_mut().fail_next = Some("EBUSY".into());
        assert!(matches!(
            r.sync(&[table(&["a", "b"])]),
            Err(SyncError::Apply { .. })
        ));
        let kernel = r.backend_mut().list(Family::Ip, "nftproxy").unwrap();
        assert_eq!(kernel, Some(table(&["a"])));
        // The retry's scope names nothing, yet the kernel is read back and compared whole.
        let retry = r
            .sync_changes(&[table(&["a", "b"])], &Scopes::nothing())
            .unwrap();
        assert!(retry.read_back && retry.operations > 0);
        assert_eq!(
            r.backend_mut().list(Family::Ip, "nftproxy").unwrap(),
            Some(table(&["a", "b"]))
        );
    }

    #[test]
    fn a_restart_applies_only_the_difference() {
        let backend = kernel_holding(&["a", "b"]);
        let mut r = Reconciler::new(backend, "nftproxy", ReconcilerOptions::default());
        assert_eq!(r.sync(&[table(&["a", "b"])]).unwrap().operations, 0);
        // One service removed: its map element, flushed rule and chain.
        assert_eq!(r.sync(&[table(&["a"])]).unwrap().operations, 3);
    }

    #[test]
    fn old_kernels_delete_a_chain_one_sync_after_its_references() {
        let options = ReconcilerOptions {
            defer_chain_deletes: true,
            ..ReconcilerOptions::default()
        };
        let mut r = Reconciler::new(FakeBackend::default(), "nftproxy", options);
        r.sync(&[table(&["a", "b"])]).unwrap();
        r.sync_changes(&[table(&["a"])], &scopes(&["a", "b"], &["a"]))
            .unwrap();
        let kernel = r
            .backend_mut()
            .list(Family::Ip, "nftproxy")
            .unwrap()
            .unwrap();
        assert!(
            kernel.chains.get("b").is_some_and(|c| c.rules.is_empty()),
            "b is flushed, not deleted"
        );
        // Nothing changed since, yet the held-back deletion is remembered.
        let later = r
            .sync_changes(&[table(&["a"])], &Scopes::nothing())
            .unwrap();
        assert_eq!(later.operations, 1);
        let kernel = r
            .backend_mut()
            .list(Family::Ip, "nftproxy")
            .unwrap()
            .unwrap();
        assert!(!kernel.chains.contains_key("b"));
    }

    #[test]
    fn a_family_without_desired_rules_has_its_table_removed() {
        let mut r = Reconciler::new(
            FakeBackend::default(),
            "nftproxy",
            ReconcilerOptions::default(),
        );
        let mut six = table(&["a"]);
        six.family = Family::Ip6;
        six.sets.clear();
        six.chains.clear();
        r.sync(&[table(&["a"]), six]).unwrap();
        assert!(
            r.backend_mut()
                .list(Family::Ip6, "nftproxy")
                .unwrap()
                .is_some()
        );
        r.sync(&[table(&["a"])]).unwrap();
        assert!(
            r.backend_mut()
                .list(Family::Ip6, "nftproxy")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_transient_read_failure_fails_the_sync_and_rewrites_nothing() {
        let mut backend = kernel_holding(&["a", "b"]);
        backend.fail_list = Some(FakeError {
            kind: ErrorKind::Busy,
            message: "EBUSY".into(),
        });
        let mut r = Reconciler::new(backend, "nftproxy", ReconcilerOptions::default());
        assert!(matches!(
            r.sync(&[table(&["a", "b"])]),
            Err(SyncError::Read { .. })
        ));
        // The retry reads the kernel and finds nothing to do.
        assert_eq!(r.sync(&[table(&["a", "b"])]).unwrap().operations, 0);
        assert_eq!(r.backend_mut().applied.len(), 1);
    }

    #[test]
    fn a_table_holding_foreign_objects_is_replaced_whole() {
        let mut backend = kernel_holding(&["a"]);
        backend.fail_list = Some(FakeError {
            kind: ErrorKind::Foreign,
            message: "expression 'xt' is not one nftproxy writes".into(),
        });
        let mut r = Reconciler::new(backend, "nftproxy", ReconcilerOptions::default());
        let report = r.sync(&[table(&["a", "b"])]).unwrap();
        assert!(report.read_back);
        let tx = r.backend_mut().applied.last().unwrap().clone();
        assert_eq!(
            tx.ops[..2],
            [Op::AddTable { comment: None }, Op::DeleteTable]
        );
    }

    #[test]
    fn the_generation_tells_whether_anyone_else_committed() {
        let mut r = Reconciler::new(
            FakeBackend::default(),
            "nftproxy",
            ReconcilerOptions::default(),
        );
        assert!(r.drifted(), "nothing known yet");
        r.sync(&[table(&["a", "b"])]).unwrap();
        assert!(!r.drifted(), "only our own commits");
        r.sync(&[table(&["a", "b", "c"])]).unwrap();
        assert!(!r.drifted());
        r.backend_mut().tamper(Family::Ip, "nftproxy", |t| {
            t.as_mut()
                .unwrap()
                .chains
                .get_mut("a")
                .unwrap()
                .rules
                .clear();
        });
        assert!(r.drifted());
        r.invalidate();
        let repair = r.sync(&[table(&["a", "b", "c"])]).unwrap();
        assert!(repair.read_back);
        assert_eq!(repair.changed, ["add rule in chain a `accept`"]);
        assert!(!r.drifted());
        assert_eq!(
            r.backend_mut().list(Family::Ip, "nftproxy").unwrap(),
            Some(table(&["a", "b", "c"]))
        );
    }

    #[test]
    fn tables_read_ahead_stand_unless_someone_changed_them_before_the_first_sync() {
        let backend = kernel_holding(&["a", "b"]);
        let mut r = Reconciler::new(backend, "nftproxy", ReconcilerOptions::default());
        r.read_ahead();
        assert_eq!(r.backend_mut().lists, 2, "both families read ahead");
        let report = r.sync(&[table(&["a", "b"])]).unwrap();
        assert!(report.read_back, "the first sync compares everything");
        assert_eq!(report.operations, 0);
        assert_eq!(r.backend_mut().lists, 2, "and does not read again");

        // Read ahead, then changed by someone else before the first sync.
        let mut r = Reconciler::new(
            std::mem::take(r.backend_mut()),
            "nftproxy",
            ReconcilerOptions::default(),
        );
        r.read_ahead();
        r.backend_mut().tamper(Family::Ip, "nftproxy", |t| {
            t.as_mut().unwrap().chains.remove("b");
        });
        let report = r.sync(&[table(&["a", "b"])]).unwrap();
        assert!(report.read_back);
        assert_eq!(
            report.changed,
            ["add chain b", "add rule in chain b `accept`"]
        );
        assert_eq!(
            r.backend_mut().list(Family::Ip, "nftproxy").unwrap(),
            Some(table(&["a", "b"]))
        );
    }

    #[test]
    fn a_commit_elsewhere_needs_no_read_back_when_the_backend_tells_whose_it_was() {
        let backend = FakeBackend {
            tampered: Some(BTreeSet::new()),
            ..FakeBackend::default()
        };
        let mut r = Reconciler::new(backend, "nftproxy", ReconcilerOptions::default());
        r.sync(&[table(&["a", "b"])]).unwrap();
        r.backend_mut().tamper(Family::Ip, "other", |t| {
            *t = Some(Table::new(Family::Ip, "other"))
        });
        let lists = r.backend_mut().lists;
        assert!(!r.drifted(), "another table changed");
        assert!(!r.drifted(), "and the new generation is ours to keep");
        assert_eq!(r.backend_mut().lists, lists);
        r.backend_mut().tamper(Family::Ip, "nftproxy", |t| {
            t.as_mut().unwrap().chains.remove("b");
        });
        assert!(r.drifted(), "ours changed");
    }
}
