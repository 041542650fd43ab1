//! [`NetlinkBackend`]: transactions applied to the kernel as single batches, and tables
//! read back from it.
//!
//! Invariant: only the table a caller names is read or written; a batch that the kernel
//! refuses changes nothing, and its error names the operation that failed.

use std::collections::{BTreeMap, BTreeSet};

use nftproxy_nft::{
    Backend, CountedElement, CounterReading, Element, Family, Op, Set, Table, Transaction,
};

use crate::Error;
use crate::ffi::Messages;
use crate::reply;
use crate::socket::{Message, Reply, Socket};

/// Above this many objects, a transaction of ours is sent with the notification listener
/// out of the group: building an announcement per object doubled the kernel's part of a
/// 10,000 × 5 cold load (270 to 740 ms). What others commit meanwhile is lost to the
/// listener, which the generation tells the reconciler.
const ANNOUNCED_OBJECTS: usize = 1_000;

/// How often a read the ruleset changed under (or a set dump walked twice) is tried
/// again; each waits twice as long as the one before, from 5 ms (a hash set's resize
/// after a large commit takes milliseconds).
const INTERRUPTED_RETRIES: u32 = 5;

fn interrupted_pause(attempts: &mut u32) {
    std::thread::sleep(std::time::Duration::from_millis(5 << *attempts));
    *attempts += 1;
}

/// A chain of another program's table, read only as far as cleaning up needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignChain {
    /// Its name.
    pub name: String,
    /// Whether it is a base chain (hooked; iptables' built-in chains).
    pub base: bool,
    /// Its rules, in order.
    pub rules: Vec<ForeignRule>,
}

/// A rule of another program's chain: its handle and the chains it jumps or goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignRule {
    /// The kernel's handle of the rule.
    pub handle: u64,
    /// The chains its `jump`/`goto` verdicts name.
    pub jumps: Vec<String>,
}

/// What to remove from another program's table, all in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForeignRemoval {
    /// The whole table.
    Table,
    /// These rules (chain, handle), then these chains (each flushed, then deleted).
    Objects {
        /// Rules by chain and handle.
        rules: Vec<(String, u64)>,
        /// Chains.
        chains: Vec<String>,
    },
}

/// The kernel's nf_tables, over a netfilter netlink socket in the caller's network
/// namespace.
pub struct NetlinkBackend {
    socket: Socket,
    seq: u32,
    /// Subscribed to nf_tables notifications, to tell which tables other programs
    /// changed; `None` when the subscription failed (then nothing can be told).
    listener: Option<Socket>,
    /// Tables other programs changed since they were last asked about.
    foreign: BTreeSet<String>,
    /// Notifications were lost since the last question: any table may have changed.
    lost: bool,
}

/// What a GET request asks for: a table's objects of one kind, a set's elements, or a
/// chain's rules.
enum Dump<'a> {
    Table,
    Set(&'a Set),
    Chain(&'a str),
}

/// Rule handles by chain, in rule order.
type Handles = std::collections::HashMap<String, Vec<u64>>;

impl NetlinkBackend {
    /// The error replies (sequence number, errno) to the batch just sent: the kernel
    /// processes a batch inside `sendmsg`, so they are all queued already.
    fn batch_errors(&mut self) -> Result<Vec<(u32, i32)>, Error> {
        let mut errors = Vec::new();
        while let Some(replies) = self.socket.receive(true)? {
            for reply in replies {
                if let Reply::Error { seq, errno } = reply {
                    errors.push((seq, errno));
                }
            }
        }
        Ok(errors)
    }

    /// Whether `family`'s table `name` exists (whoever wrote it).
    pub fn table_exists(&mut self, family: Family, name: &str) -> Result<bool, Error> {
        let found = self.request(
            libc::NFT_MSG_GETTABLE,
            family,
            name,
            Dump::Table,
            |_| Ok(()),
        );
        match found {
            Err(error) if error.is_not_found() => Ok(false),
            Err(error) => Err(error),
            Ok(()) => Ok(true),
        }
    }

    /// The chains of another program's table and, for each rule, the chains it jumps
    /// to (nothing else of the rules is read: they may hold expressions nftproxy does not
    /// write, such as iptables-nft's `xt` matches).
    pub fn foreign_chains(
        &mut self,
        family: Family,
        table: &str,
    ) -> Result<Vec<ForeignChain>, Error> {
        let mut chains: Vec<ForeignChain> = Vec::new();
        self.request(
            libc::NFT_MSG_GETCHAIN,
            family,
            table,
            Dump::Table,
            |message| {
                let (owner, chain) = reply::parse_chain(message)?;
                if owner == table {
                    chains.push(ForeignChain {
                        name: chain.name,
                        base: chain.base.is_some(),
                        rules: Vec::new(),
                    });
                }
                Ok(())
            },
        )?;
        for chain in &mut chains {
            let name = chain.name.clone();
            self.request(
                libc::NFT_MSG_GETRULE,
                family,
                table,
                Dump::Chain(&name),
                |message| {
                    let (owner, of, handle, jumps) = reply::parse_rule_jumps(message)?;
                    if owner == table && of == name {
                        chain.rules.push(ForeignRule { handle, jumps });
                    }
                    Ok(())
                },
            )?;
        }
        Ok(chains)
    }

    /// Removes `removal` from another program's table in one transaction: all of it, or
    /// nothing when the kernel refuses any part.
    pub fn remove_foreign(
        &mut self,
        family: Family,
        table: &str,
        removal: &ForeignRemoval,
    ) -> Result<(), Error> {
        let mut msgs = Messages::new(family, table)?;
        let mut described: Vec<(u32, String)> = Vec::new();
        let begin = self.next_seq();
        msgs.batch_begin(begin)?;
        match removal {
            ForeignRemoval::Table => {
                let seq = self.next_seq();
                msgs.table(libc::NFT_MSG_DELTABLE, None, 0, seq)?;
                described.push((seq, format!("delete table {family} {table}")));
            }
            ForeignRemoval::Objects { rules, chains } => {
                for (chain, handle) in rules {
                    let seq = self.next_seq();
                    msgs.delete_rule(chain, *handle, seq)?;
                    described.push((
                        seq,
                        format!("delete rule in chain {chain} (handle {handle})"),
                    ));
                }
                for chain in chains {
                    let seq = self.next_seq();
                    msgs.rule(libc::NFT_MSG_DELRULE, chain, None, 0, seq)?;
                    described.push((seq, format!("flush chain {chain}")));
                }
                for chain in chains {
                    let seq = self.next_seq();
                    msgs.chain(libc::NFT_MSG_DELCHAIN, chain, None, 0, seq)?;
                    described.push((seq, format!("delete chain {chain}")));
                }
            }
        }
        let end = self.next_seq();
        msgs.batch_end(end)?;
        self.socket.send(&msgs.bytes)?;
        let errors = self.batch_errors()?;
        self.drain_notifications()?;
        let Some(&(seq, errno)) = errors.first() else {
            return Ok(());
        };
        let op = described
            .iter()
            .find(|(s, _)| *s == seq)
            .map_or_else(|| "begin transaction".to_owned(), |(_, d)| d.clone());
        Err(Error::kernel(op, errno))
    }

    /// Opens a netfilter netlink socket (needs CAP_NET_ADMIN in the network namespace).
    pub fn open() -> Result<NetlinkBackend, Error> {
        NetlinkBackend::new(true)
    }

    /// A backend that only reads (tables, counters): no notification listener, whose
    /// queue nothing would drain.
    pub fn reader() -> Result<NetlinkBackend, Error> {
        NetlinkBackend::new(false)
    }

    fn new(listen: bool) -> Result<NetlinkBackend, Error> {
        let socket = Socket::open()?;
        // Sequence numbers only need to be unique on this socket; starting from the port
        // id keeps them recognisable in traces.
        let seq = socket.portid();
        Ok(NetlinkBackend {
            socket,
            seq,
            listener: listen.then(Socket::listener).and_then(Result::ok),
            foreign: BTreeSet::new(),
            lost: false,
        })
    }

    /// Reads the queued notifications, noting the tables other programs changed (our
    /// own commits come from this backend's socket).
    fn drain_notifications(&mut self) -> Result<(), Error> {
        let own = self.socket.portid();
        let Some(listener) = self.listener.as_mut() else {
            return Ok(());
        };
        match listener.notifications()? {
            Some(notifications) => {
                for notification in notifications.into_iter().filter(|n| n.portid != own) {
                    // A notification without a table name cannot be attributed: count it
                    // against every table.
                    match notification.table {
                        Some(table) => {
                            self.foreign.insert(table);
                        }
                        None => self.lost = true,
                    }
                }
            }
            None => self.lost = true,
        }
        Ok(())
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// The kernel's handles of the rules of the chains `tx` edits, in order (the kernel
    /// names a rule to delete, or to insert before, by its handle, the transaction by
    /// its position).
    fn rule_handles(&mut self, tx: &Transaction) -> Result<Handles, Error> {
        let mut handles = Handles::new();
        for op in &tx.ops {
            let Op::EditRules {
                chain,
                deleted,
                added,
                rules,
            } = op
            else {
                continue;
            };
            let mut found = Vec::new();
            let table = tx.table.as_str();
            self.request(
                libc::NFT_MSG_GETRULE,
                tx.family,
                table,
                Dump::Chain(chain),
                |message| {
                    let (owner, of, handle) = reply::parse_rule_handle(message)?;
                    if owner == table && of == *chain {
                        found.push(handle);
                    }
                    Ok(())
                },
            )?;
            // Positions only name the right rules in the chain the transaction was
            // planned against; a chain of another length was changed behind our back.
            let expected = (deleted.len() + rules.len()).saturating_sub(added.len());
            if found.len() != expected {
                return Err(Error::Conflict(format!(
                    "chain {chain} holds {} rules, the transaction expects {expected}",
                    found.len(),
                )));
            }
            handles.insert(chain.clone(), found);
        }
        Ok(handles)
    }

    fn encode(
        &mut self,
        tx: &Transaction,
        handles: &Handles,
    ) -> Result<(Messages, Vec<(u32, usize)>), Error> {
        let (family, table) = (tx.family, tx.table.as_str());
        let create = libc::NLM_F_CREATE as u16;
        let mut msgs = Messages::new(family, table)?;
        let mut seqs: Vec<(u32, usize)> = Vec::with_capacity(tx.ops.len() + 2);
        let begin = self.next_seq();
        msgs.batch_begin(begin)?;
        let mut set_id = 0;
        for (index, op) in tx.ops.iter().enumerate() {
            let mut seq = || {
                let seq = self.next_seq();
                seqs.push((seq, index));
                seq
            };
            match op {
                Op::AddTable { comment } => {
                    msgs.table(libc::NFT_MSG_NEWTABLE, comment.as_deref(), create, seq())?
                }
                Op::DeleteTable => msgs.table(libc::NFT_MSG_DELTABLE, None, 0, seq())?,
                Op::AddChain { name, base } => {
                    msgs.chain(libc::NFT_MSG_NEWCHAIN, name, base.as_ref(), create, seq())?
                }
                Op::FlushChain(name) => msgs.rule(libc::NFT_MSG_DELRULE, name, None, 0, seq())?,
                Op::DeleteChain(name) => {
                    msgs.chain(libc::NFT_MSG_DELCHAIN, name, None, 0, seq())?
                }
                Op::EditRules {
                    chain,
                    deleted,
                    added,
                    rules,
                } => {
                    let found = handles.get(chain).map_or(&[][..], Vec::as_slice);
                    let mut kept = Vec::with_capacity(found.len());
                    for (position, handle) in found.iter().enumerate() {
                        if deleted.binary_search(&position).is_ok() {
                            msgs.delete_rule(chain, *handle, seq())?;
                        } else {
                            kept.push(*handle);
                        }
                    }
                    // A rule added goes before the next rule kept, or at the end; rules
                    // added before the same kept rule go in their order.
                    let mut next_kept = kept.iter();
                    let mut before = next_kept.next();
                    for (at, rule) in rules.iter().enumerate() {
                        if added.binary_search(&at).is_err() {
                            before = next_kept.next();
                            continue;
                        }
                        match before {
                            Some(handle) => {
                                msgs.insert_rule(chain, rule, *handle, create, seq())?
                            }
                            None => {
                                let flags = create | libc::NLM_F_APPEND as u16;
                                msgs.rule(libc::NFT_MSG_NEWRULE, chain, Some(rule), flags, seq())?
                            }
                        }
                    }
                }
                Op::AddRule { chain, rule } => {
                    let flags = create | libc::NLM_F_APPEND as u16;
                    msgs.rule(libc::NFT_MSG_NEWRULE, chain, Some(rule), flags, seq())?
                }
                Op::AddSet(set) => {
                    set_id += 1;
                    msgs.set(libc::NFT_MSG_NEWSET, set, set_id, create, seq())?
                }
                Op::DeleteSet { name, .. } => msgs.set(
                    libc::NFT_MSG_DELSET,
                    &Set::new(name.clone(), vec![]),
                    0,
                    0,
                    seq(),
                )?,
                Op::AddElements { set, elements } => {
                    msgs.elements(libc::NFT_MSG_NEWSETELEM, set, elements, create, &mut seq)?
                }
                Op::DeleteElements { set, keys, .. } => {
                    let elements: Vec<Element> =
                        keys.iter().map(|k| Element::new(k.clone())).collect();
                    msgs.elements(libc::NFT_MSG_DELSETELEM, set, &elements, 0, &mut seq)?
                }
            }
        }
        let end = self.next_seq();
        msgs.batch_end(end)?;
        Ok((msgs, seqs))
    }

    /// The encoded batch of a transaction: what [`apply`](Backend::apply) sends.
    pub fn batch_bytes(&mut self, tx: &Transaction) -> Result<Vec<u8>, Error> {
        let handles = self.rule_handles(tx)?;
        Ok(self.encode(tx, &handles)?.0.bytes)
    }

    /// Sends a request and hands every data reply to `each`, until the dump ends (or,
    /// for a plain get, until the one answer).
    fn request(
        &mut self,
        kind: i32,
        family: Family,
        table: &str,
        dump: Dump<'_>,
        mut each: impl FnMut(Message<'_>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut msgs = Messages::new(family, table)?;
        let seq = self.next_seq();
        match dump {
            Dump::Set(set) => msgs.set(kind, set, 0, libc::NLM_F_DUMP as u16, seq)?,
            Dump::Chain(chain) => msgs.rule(kind, chain, None, libc::NLM_F_DUMP as u16, seq)?,
            Dump::Table => msgs.request(kind, seq)?,
        }
        self.socket.send(&msgs.bytes)?;
        let single = matches!(kind, libc::NFT_MSG_GETTABLE | libc::NFT_MSG_GETGEN);
        let mut interrupted = false;
        // A reply `each` cannot take fails the request, but only after the rest of the
        // dump is read: left on the socket, it would be taken for the next request's.
        let mut failed = None;
        loop {
            let replies = self.socket.receive(false)?.unwrap_or_default();
            // A late reply to an earlier request (one given up on) is not this one's.
            for reply in replies.into_iter().filter(|r| r.seq() == seq) {
                match reply {
                    Reply::Done { .. } => {
                        return match failed {
                            Some(error) => Err(error),
                            None if interrupted => Err(Error::Interrupted),
                            None => Ok(()),
                        };
                    }
                    Reply::Error { errno, .. } => {
                        return Err(Error::kernel(format!("list {table}"), errno));
                    }
                    Reply::Data {
                        message,
                        interrupted: flag,
                    } => {
                        interrupted |= flag;
                        if failed.is_none()
                            && let Err(error) = each(message)
                        {
                            failed = Some(error);
                        }
                        if single {
                            return failed.map_or(Ok(()), Err);
                        }
                    }
                    Reply::Ack { .. } => {}
                }
            }
        }
    }

    /// Every counter of our table `name`: the elements of its counted sets and maps,
    /// and its rules with a `counter` statement, with the elements of the uncounted
    /// sets `named`; `None` when the table does not exist. Reads no other set and no
    /// chain, so it costs a fraction of a [`list`](Backend::list). Retried when the
    /// ruleset changes during the read.
    pub fn counters(
        &mut self,
        family: Family,
        name: &str,
        named: &[&str],
    ) -> Result<Option<CounterReading>, Error> {
        let mut attempts = 0;
        loop {
            match self.try_counters(family, name, named) {
                Err(Error::Interrupted) if attempts < INTERRUPTED_RETRIES => {
                    interrupted_pause(&mut attempts)
                }
                Err(error) if error.is_not_found() => return Ok(None),
                other => return other.map(Some),
            }
        }
    }

    fn try_counters(
        &mut self,
        family: Family,
        name: &str,
        named: &[&str],
    ) -> Result<CounterReading, Error> {
        let mut counted = Vec::new();
        self.request(libc::NFT_MSG_GETSET, family, name, Dump::Table, |message| {
            let (owner, set) = reply::parse_set(message)?;
            if owner == name && (set.counter || named.contains(&set.name.as_str())) {
                counted.push(set);
            }
            Ok(())
        })?;
        let mut reading = CounterReading {
            family: Some(family),
            ..CounterReading::default()
        };
        for set in &counted {
            let mut keys = std::collections::HashSet::new();
            self.request(
                libc::NFT_MSG_GETSETELEM,
                family,
                name,
                Dump::Set(set),
                |message| {
                    for (element, count) in reply::parse_elements(message, set)? {
                        if !keys.insert(element.key()) {
                            return Err(Error::Interrupted);
                        }
                        match count {
                            Some(count) => reading.elements.push(CountedElement {
                                set: set.name.clone(),
                                element,
                                count,
                            }),
                            None => reading.named.push((set.name.clone(), element)),
                        }
                    }
                    Ok(())
                },
            )?;
        }
        self.request(
            libc::NFT_MSG_GETRULE,
            family,
            name,
            Dump::Table,
            |message| {
                if let Some((owner, rule)) = reply::parse_counted_rule(message, family)?
                    && owner == name
                {
                    reading.rules.push(rule);
                }
                Ok(())
            },
        )?;
        Ok(reading)
    }

    fn try_list(&mut self, family: Family, name: &str) -> Result<Option<Table>, Error> {
        let mut table = Table::new(family, name);
        let found = self.request(
            libc::NFT_MSG_GETTABLE,
            family,
            name,
            Dump::Table,
            |message| {
                let (_, comment) = reply::parse_table(message)?;
                table.comment = comment;
                Ok(())
            },
        );
        match found {
            Err(error) if error.is_not_found() => return Ok(None),
            other => other?,
        }
        self.request(
            libc::NFT_MSG_GETCHAIN,
            family,
            name,
            Dump::Table,
            |message| {
                let (owner, chain) = reply::parse_chain(message)?;
                if owner == name {
                    table.add_chain(chain);
                }
                Ok(())
            },
        )?;
        let mut sets = BTreeMap::new();
        self.request(libc::NFT_MSG_GETSET, family, name, Dump::Table, |message| {
            let (owner, set) = reply::parse_set(message)?;
            if owner == name {
                sets.insert(set.name.clone(), set);
            }
            Ok(())
        })?;
        // A dynamic set's elements are the data path's (affinity: clients and their
        // endpoints), not configuration: they are neither read nor diffed, so a restart
        // keeps them, as upstream does.
        for set in sets.values_mut().filter(|s| !s.dynamic) {
            let declaration = set.clone();
            // The kernel dumps in hash order: gathered, then added in one pass.
            let mut elements = Vec::new();
            self.request(
                libc::NFT_MSG_GETSETELEM,
                family,
                name,
                Dump::Set(&declaration),
                |message| {
                    let parsed = reply::parse_elements(message, &declaration)?;
                    elements.extend(parsed.into_iter().map(|(element, _)| element));
                    Ok(())
                },
            )?;
            let read = elements.len();
            set.elements.extend(elements);
            // A hash set the kernel resizes between two messages of its dump (as after
            // a large commit) is walked anew from the next one: some elements come
            // twice, and others not at all. The kernel does not flag that dump.
            if set.elements.len() != read {
                return Err(Error::Interrupted);
            }
        }
        table.sets = sets;
        let mut missing_chain = false;
        self.request(
            libc::NFT_MSG_GETRULE,
            family,
            name,
            Dump::Table,
            |message| {
                let (owner, chain, rule) = reply::parse_rule(message, family)?;
                if owner == name {
                    match table.chains.get_mut(&chain) {
                        Some(c) => c.rules.push(rule),
                        None => missing_chain = true,
                    }
                }
                Ok(())
            },
        )?;
        if missing_chain {
            // The table changed between the chain dump and the rule dump.
            return Err(Error::Interrupted);
        }
        Ok(Some(table))
    }
}

impl Backend for NetlinkBackend {
    type Error = Error;

    /// Reads our table back; `None` when it does not exist. Retried when the ruleset
    /// changes during the read.
    fn list(&mut self, family: Family, name: &str) -> Result<Option<Table>, Error> {
        let mut attempts = 0;
        loop {
            match self.try_list(family, name) {
                Err(Error::Interrupted) if attempts < INTERRUPTED_RETRIES => {
                    interrupted_pause(&mut attempts)
                }
                other => return other,
            }
        }
    }

    /// The ruleset generation id, one round trip (about ten microseconds): the kernel
    /// bumps it on every commit in this network namespace.
    fn generation(&mut self) -> Result<Option<u32>, Error> {
        let mut id = None;
        self.request(
            libc::NFT_MSG_GETGEN,
            Family::Ip,
            "",
            Dump::Table,
            |message| {
                id = Some(reply::parse_generation(message)?);
                Ok(())
            },
        )?;
        id.map(Some)
            .ok_or_else(|| Error::Decode("no generation in the reply".into()))
    }

    /// From the notifications of every commit since the last question: whether one of
    /// another program changed `table`.
    fn changed_by_others(&mut self, table: &str) -> Result<Option<bool>, Error> {
        if self.listener.is_none() {
            return Ok(None);
        }
        self.drain_notifications()?;
        let changed = self.foreign.remove(table) || std::mem::take(&mut self.lost);
        Ok(Some(changed))
    }

    /// Sends the transaction as one batch. The kernel processes a batch inside
    /// `sendmsg`, so every error reply is queued when it returns; no message asks for an
    /// acknowledgement, so an empty queue means the batch committed.
    fn apply(&mut self, tx: &Transaction) -> Result<(), Error> {
        if tx.is_empty() {
            return Ok(());
        }
        let handles = self.rule_handles(tx)?;
        let (msgs, seqs) = self.encode(tx, &handles)?;
        let quiet = tx.len() > ANNOUNCED_OBJECTS;
        if quiet {
            self.drain_notifications()?;
            if let Some(listener) = &self.listener {
                listener.listen(false)?;
            }
        }
        let sent = self.socket.send(&msgs.bytes);
        if quiet && let Some(listener) = &self.listener {
            listener.listen(true)?;
            self.lost = true;
        }
        sent?;
        let errors = self.batch_errors()?;
        let Some(&(seq, errno)) = errors.first() else {
            // Read what the commit announced now, so that a large one cannot overflow
            // the listener together with the next.
            self.drain_notifications()?;
            return Ok(());
        };
        let op = match seqs.iter().find(|(s, _)| *s == seq) {
            Some((_, index)) => tx.ops[*index].describe(),
            None => "begin transaction".to_owned(),
        };
        let mut error = Error::kernel(op, errno);
        if let Error::Kernel { more, .. } = &mut error {
            *more = errors.len() - 1;
        }
        Err(error)
    }
}
