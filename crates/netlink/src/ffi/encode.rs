//! Netlink messages written from nftproxy's objects: batches, tables, chains, rules, sets
//! and elements, and the dump requests that read them back.
//!
//! Invariant: libnftnl writes a message without a limit, so each message's size is
//! bounded from its inputs before it is written: a message whose bound exceeds the 64 KiB
//! a message may hold is split (elements) or refused before libnftnl writes a byte, and
//! it is written into a [`Scratch`] buffer of exactly that size, behind which a guard
//! page turns a bound that was ever too low into a fault instead of a heap overflow.

use super::expr::build_expr;
use super::*;
use crate::udata;

/// The netlink and nfgenmsg headers of a message.
const HEADERS: usize = 20;
/// More than every fixed-size attribute of one object takes (at most a dozen of up to
/// 12 bytes each, and the nests around them).
const SCALARS: usize = 256;
/// The same for one set element (flags, timeout, expiration, the verdict's nest).
const ELEMENT_SCALARS: usize = 64;

/// The bytes an attribute of `len` payload bytes takes: a 4-byte header, padded to 4.
fn attr(len: usize) -> usize {
    4 + len.div_ceil(4) * 4
}

/// The most bytes one expression takes in a rule message: its nest, its name and data
/// nest, up to eight scalar attributes, and its variable-length data.
fn expr_bound(raw: &RawExpr) -> usize {
    let variable = match raw {
        RawExpr::Bitwise { mask, xor, .. } => attr(mask.len()) + attr(xor.len()),
        RawExpr::Cmp { data, .. } | RawExpr::Immediate { data, .. } => attr(data.len()),
        RawExpr::Lookup { set, .. } | RawExpr::DynsetUpdate { set, .. } => attr(set.len() + 1),
        RawExpr::Verdict(verdict) => attr(verdict.target().map_or(0, |c| c.len() + 1)),
        _ => 0,
    };
    4 + attr(16) + 4 + 8 * 12 + variable
}

/// A buffer of netlink messages (a batch, or a dump request).
pub(crate) struct Messages {
    pub(crate) bytes: Vec<u8>,
    scratch: Scratch,
    family: Family,
    table: String,
}

/// The headers of a message.
enum Header {
    /// `NFNL_MSG_BATCH_BEGIN`.
    Begin(u32),
    /// `NFNL_MSG_BATCH_END`.
    End(u32),
    /// An nf_tables message of this type, with these flags and sequence number.
    Object { kind: i32, flags: u16, seq: u32 },
}

/// What libnftnl writes after the headers: an object's attributes, or a set's elements.
enum Payload<'a> {
    None,
    Table(&'a TableObj),
    Chain(&'a ChainObj),
    Rule(&'a RuleObj),
    Set(&'a SetObj),
    Elements(&'a SetObj),
}

impl Messages {
    /// Messages about one table.
    pub(crate) fn new(family: Family, table: &str) -> Result<Messages, Error> {
        Ok(Messages {
            bytes: Vec::new(),
            scratch: Scratch::new()?,
            family,
            table: table.to_owned(),
        })
    }

    /// Writes one message whose payload takes at most `bound` bytes, and appends it:
    /// refused before anything is written when it may not fit a message, and checked
    /// against the bound after (a longer one is an error in the bound, which the tests
    /// show, and which the guard page stops at its first byte past the buffer).
    fn push(&mut self, bound: usize, header: Header, payload: Payload<'_>) -> Result<(), Error> {
        let bound = HEADERS + bound;
        if bound > MESSAGE_MAX {
            return Err(Error::Encode(format!(
                "a message of up to {bound} bytes does not fit the {MESSAGE_MAX} bytes of a netlink message"
            )));
        }
        let buf = self.scratch.as_mut_ptr();
        let family = nfproto(self.family);
        // SAFETY: `buf` is the start of the scratch area, MESSAGE_MAX + 1 writable bytes
        // followed by a guard page, and no message of up to `bound` <= MESSAGE_MAX bytes
        // reaches past it; every object is live for the call (borrowed).
        unsafe {
            let nlh = match header {
                Header::Begin(seq) => sys::nftnl_batch_begin(buf, seq),
                Header::End(seq) => sys::nftnl_batch_end(buf, seq),
                Header::Object { kind, flags, seq } => {
                    sys::nftnl_nlmsg_build_hdr(buf, kind as u16, family, flags, seq)
                }
            };
            match payload {
                Payload::None => {}
                Payload::Table(table) => sys::nftnl_table_nlmsg_build_payload(nlh, table.ptr()),
                Payload::Chain(chain) => sys::nftnl_chain_nlmsg_build_payload(nlh, chain.ptr()),
                Payload::Rule(rule) => sys::nftnl_rule_nlmsg_build_payload(nlh, rule.ptr()),
                Payload::Set(set) => sys::nftnl_set_nlmsg_build_payload(nlh, set.ptr()),
                Payload::Elements(set) => sys::nftnl_set_elems_nlmsg_build_payload(nlh, set.ptr()),
            }
        }
        let written = self.scratch.written();
        let len = u32::from_ne_bytes([written[0], written[1], written[2], written[3]]) as usize;
        if len > bound {
            return Err(Error::Encode(format!(
                "a message of {len} bytes exceeds its bound of {bound}"
            )));
        }
        self.bytes.extend_from_slice(&written[..len]);
        self.bytes.resize(self.bytes.len().div_ceil(4) * 4, 0);
        Ok(())
    }

    /// An nf_tables message with a payload of at most `bound` bytes.
    fn object(
        &mut self,
        kind: i32,
        flags: u16,
        seq: u32,
        bound: usize,
        payload: Payload<'_>,
    ) -> Result<(), Error> {
        self.push(bound, Header::Object { kind, flags, seq }, payload)
    }

    /// A GET request for `table`'s objects of one kind (a dump, except for the table).
    pub(crate) fn request(&mut self, kind: i32, seq: u32) -> Result<(), Error> {
        let (family, table) = (self.family, self.table.clone());
        let table = table.as_str();
        let name = cstring(table)?;
        let flags = if kind == libc::NFT_MSG_GETTABLE {
            0
        } else {
            libc::NLM_F_DUMP as u16
        };
        let family_attr = u32::from(nfproto(family));
        let request = SCALARS + attr(table.len() + 1);
        match kind {
            libc::NFT_MSG_GETTABLE => {
                let obj = TableObj::new();
                // SAFETY: `obj` is live; `name` outlives the call and is copied.
                unsafe {
                    sys::nftnl_table_set_u32(
                        obj.ptr(),
                        sys::NFTNL_TABLE_FAMILY as u16,
                        family_attr,
                    );
                    sys::nftnl_table_set_str(
                        obj.ptr(),
                        sys::NFTNL_TABLE_NAME as u16,
                        name.as_ptr(),
                    );
                }
                self.object(kind, flags, seq, request, Payload::Table(&obj))
            }
            libc::NFT_MSG_GETCHAIN => {
                let obj = ChainObj::new();
                // SAFETY: as above.
                unsafe {
                    sys::nftnl_chain_set_u32(
                        obj.ptr(),
                        sys::NFTNL_CHAIN_FAMILY as u16,
                        family_attr,
                    );
                    sys::nftnl_chain_set_str(
                        obj.ptr(),
                        sys::NFTNL_CHAIN_TABLE as u16,
                        name.as_ptr(),
                    );
                }
                self.object(kind, flags, seq, request, Payload::Chain(&obj))
            }
            libc::NFT_MSG_GETRULE => {
                let obj = RuleObj::new();
                // SAFETY: as above.
                unsafe {
                    sys::nftnl_rule_set_u32(obj.ptr(), sys::NFTNL_RULE_FAMILY as u16, family_attr);
                    sys::nftnl_rule_set_str(obj.ptr(), sys::NFTNL_RULE_TABLE as u16, name.as_ptr());
                }
                self.object(kind, flags, seq, request, Payload::Rule(&obj))
            }
            libc::NFT_MSG_GETSET => {
                let obj = SetObj::new();
                // SAFETY: as above.
                unsafe {
                    sys::nftnl_set_set_u32(obj.ptr(), sys::NFTNL_SET_FAMILY as u16, family_attr);
                    sys::nftnl_set_set_str(obj.ptr(), sys::NFTNL_SET_TABLE as u16, name.as_ptr());
                }
                self.object(kind, flags, seq, request, Payload::Set(&obj))
            }
            // A request without payload: the kernel answers with the ruleset generation.
            libc::NFT_MSG_GETGEN => self.object(kind, 0, seq, 0, Payload::None),
            other => Err(Error::Encode(format!(
                "no request for message type {other}"
            ))),
        }
    }

    pub(crate) fn batch_begin(&mut self, seq: u32) -> Result<(), Error> {
        self.push(0, Header::Begin(seq), Payload::None)
    }

    pub(crate) fn batch_end(&mut self, seq: u32) -> Result<(), Error> {
        self.push(0, Header::End(seq), Payload::None)
    }

    pub(crate) fn table(
        &mut self,
        kind: i32,
        comment: Option<&str>,
        flags: u16,
        seq: u32,
    ) -> Result<(), Error> {
        let (family, name) = (self.family, self.table.clone());
        let table = TableObj::new();
        let name = cstring(&name)?;
        let data =
            comment.map(|c| udata::userdata(&[(udata::TABLE_COMMENT, &udata::comment_bytes(c))]));
        let bound =
            SCALARS + attr(name.as_bytes().len() + 1) + attr(data.as_ref().map_or(0, Vec::len));
        // SAFETY: `table` is a live object; `name` and `data` outlive the calls (libnftnl
        // copies them).
        unsafe {
            sys::nftnl_table_set_u32(
                table.ptr(),
                sys::NFTNL_TABLE_FAMILY as u16,
                nfproto(family).into(),
            );
            sys::nftnl_table_set_str(table.ptr(), sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
            if let Some(data) = &data {
                sys::nftnl_table_set_data(
                    table.ptr(),
                    sys::NFTNL_TABLE_USERDATA as u16,
                    data.as_ptr().cast(),
                    data.len() as u32,
                );
            }
        }
        self.object(kind, flags, seq, bound, Payload::Table(&table))
    }

    pub(crate) fn chain(
        &mut self,
        kind: i32,
        name: &str,
        base: Option<&BaseChain>,
        flags: u16,
        seq: u32,
    ) -> Result<(), Error> {
        let (family, table) = (self.family, self.table.clone());
        let table = table.as_str();
        let chain = ChainObj::new();
        let (table, name) = (cstring(table)?, cstring(name)?);
        let chain_type = base
            .map(|b| cstring(&b.chain_type.to_string()))
            .transpose()?;
        let bound = SCALARS
            + attr(table.as_bytes().len() + 1)
            + attr(name.as_bytes().len() + 1)
            + attr(chain_type.as_ref().map_or(0, |t| t.as_bytes().len() + 1));
        // SAFETY: `chain` is live; the strings outlive the calls and are copied.
        unsafe {
            sys::nftnl_chain_set_u32(
                chain.ptr(),
                sys::NFTNL_CHAIN_FAMILY as u16,
                nfproto(family).into(),
            );
            sys::nftnl_chain_set_str(chain.ptr(), sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
            sys::nftnl_chain_set_str(chain.ptr(), sys::NFTNL_CHAIN_NAME as u16, name.as_ptr());
            if let (Some(base), Some(chain_type)) = (base, &chain_type) {
                sys::nftnl_chain_set_u32(
                    chain.ptr(),
                    sys::NFTNL_CHAIN_HOOKNUM as u16,
                    hook_number(base.hook),
                );
                sys::nftnl_chain_set_s32(
                    chain.ptr(),
                    sys::NFTNL_CHAIN_PRIO as u16,
                    base.priority.0,
                );
                sys::nftnl_chain_set_str(
                    chain.ptr(),
                    sys::NFTNL_CHAIN_TYPE as u16,
                    chain_type.as_ptr(),
                );
                sys::nftnl_chain_set_u32(
                    chain.ptr(),
                    sys::NFTNL_CHAIN_POLICY as u16,
                    libc::NF_ACCEPT as u32,
                );
            }
        }
        self.object(kind, flags, seq, bound, Payload::Chain(&chain))
    }

    /// A rule message; `rule` `None` means "every rule of the chain" (a flush).
    pub(crate) fn rule(
        &mut self,
        kind: i32,
        chain: &str,
        rule: Option<&Rule>,
        flags: u16,
        seq: u32,
    ) -> Result<(), Error> {
        let (family, table) = (self.family, self.table.clone());
        let table = table.as_str();
        let (obj, bound) = rule_obj(family, table, chain, rule)?;
        self.object(kind, flags, seq, bound, Payload::Rule(&obj))
    }

    /// NEWRULE of `rule`, inserted before the rule with handle `before`.
    pub(crate) fn insert_rule(
        &mut self,
        chain: &str,
        rule: &Rule,
        before: u64,
        flags: u16,
        seq: u32,
    ) -> Result<(), Error> {
        let (obj, bound) = rule_obj(self.family, &self.table.clone(), chain, Some(rule))?;
        // SAFETY: `obj` is live.
        unsafe { sys::nftnl_rule_set_u64(obj.ptr(), sys::NFTNL_RULE_POSITION as u16, before) };
        self.object(
            libc::NFT_MSG_NEWRULE,
            flags,
            seq,
            bound,
            Payload::Rule(&obj),
        )
    }

    /// DELRULE of the rule with this handle.
    pub(crate) fn delete_rule(&mut self, chain: &str, handle: u64, seq: u32) -> Result<(), Error> {
        let (obj, bound) = rule_obj(self.family, &self.table.clone(), chain, None)?;
        // SAFETY: `obj` is live.
        unsafe { sys::nftnl_rule_set_u64(obj.ptr(), sys::NFTNL_RULE_HANDLE as u16, handle) };
        self.object(libc::NFT_MSG_DELRULE, 0, seq, bound, Payload::Rule(&obj))
    }

    fn set_obj(family: Family, table: &str, name: &str) -> Result<SetObj, Error> {
        let set = SetObj::new();
        let (table, name) = (cstring(table)?, cstring(name)?);
        // SAFETY: `set` is live; the strings outlive the calls and are copied.
        unsafe {
            sys::nftnl_set_set_u32(
                set.ptr(),
                sys::NFTNL_SET_FAMILY as u16,
                nfproto(family).into(),
            );
            sys::nftnl_set_set_str(set.ptr(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(set.ptr(), sys::NFTNL_SET_NAME as u16, name.as_ptr());
        }
        Ok(set)
    }

    /// NEWSET / DELSET (declaration only) or a GETSETELEM dump request (no elements).
    pub(crate) fn set(
        &mut self,
        kind: i32,
        set: &Set,
        id: u32,
        flags: u16,
        seq: u32,
    ) -> Result<(), Error> {
        let (family, table) = (self.family, self.table.clone());
        let table = table.as_str();
        let obj = Self::set_obj(family, table, &set.name)?;
        let mut bound = SCALARS + attr(table.len() + 1) + attr(set.name.len() + 1);
        if kind == libc::NFT_MSG_NEWSET {
            let mut set_flags = 0;
            if set.is_map() {
                set_flags |= libc::NFT_SET_MAP as u32;
            }
            if set.timeout.is_some() {
                set_flags |= libc::NFT_SET_TIMEOUT as u32;
            }
            if set.dynamic {
                set_flags |= libc::NFT_SET_EVAL as u32;
            }
            let byteorder = if set.key.len() == 1 {
                BYTEORDER_BIG_ENDIAN
            } else {
                0
            };
            let mut entries: Vec<(u8, Vec<u8>)> =
                vec![(udata::SET_KEY_BYTEORDER, byteorder.to_ne_bytes().to_vec())];
            if set.is_map() {
                entries.push((udata::SET_DATA_BYTEORDER, 0u32.to_ne_bytes().to_vec()));
            }
            if let Some(type_of) = &set.type_of {
                let typeof_entry = |exprs| {
                    lower::typeof_udata(exprs)
                        .map_err(|e| Error::Encode(format!("set {}: {e}", set.name)))
                };
                entries.push((udata::SET_KEY_TYPEOF, typeof_entry(&type_of.key)?));
                if set.is_map() {
                    entries.push((udata::SET_DATA_TYPEOF, typeof_entry(&type_of.data)?));
                    entries.push((udata::SET_DATA_INTERVAL, 0u32.to_ne_bytes().to_vec()));
                }
            }
            if let Some(comment) = &set.comment {
                entries.push((udata::SET_COMMENT, udata::comment_bytes(comment)));
            }
            let borrowed: Vec<(u8, &[u8])> =
                entries.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            let data = udata::userdata(&borrowed);
            // The counter's nest: its name and two 64-bit numbers.
            bound += attr(data.len()) + if set.counter { 64 } else { 0 };
            let data_type_and_len = if set.data == [DataType::Verdict] {
                Some((libc::NFT_DATA_VERDICT, 0))
            } else {
                set.is_map()
                    .then(|| (lower::key_type(&set.data), lower::key_len(&set.data)))
            };
            // SAFETY: `obj` is live; `data` outlives the call and is copied.
            unsafe {
                sys::nftnl_set_set_u32(obj.ptr(), sys::NFTNL_SET_FLAGS as u16, set_flags);
                sys::nftnl_set_set_u32(
                    obj.ptr(),
                    sys::NFTNL_SET_KEY_TYPE as u16,
                    lower::key_type(&set.key),
                );
                sys::nftnl_set_set_u32(
                    obj.ptr(),
                    sys::NFTNL_SET_KEY_LEN as u16,
                    lower::key_len(&set.key),
                );
                if let Some((data_type, data_len)) = data_type_and_len {
                    sys::nftnl_set_set_u32(obj.ptr(), sys::NFTNL_SET_DATA_TYPE as u16, data_type);
                    sys::nftnl_set_set_u32(obj.ptr(), sys::NFTNL_SET_DATA_LEN as u16, data_len);
                }
                if let Some(timeout) = set.timeout {
                    sys::nftnl_set_set_u64(
                        obj.ptr(),
                        sys::NFTNL_SET_TIMEOUT as u16,
                        u64::from(timeout) * 1000,
                    );
                }
                if let Some(size) = set.size {
                    sys::nftnl_set_set_u32(obj.ptr(), sys::NFTNL_SET_DESC_SIZE as u16, size);
                }
                sys::nftnl_set_set_u32(obj.ptr(), sys::NFTNL_SET_ID as u16, id);
                if set.counter {
                    let counter = super::expr::build_expr(&RawExpr::Counter {
                        packets: 0,
                        bytes: 0,
                    })?;
                    // The set takes the expression over (and frees it with itself).
                    sys::nftnl_set_add_expr(obj.ptr(), counter.into_raw());
                }
                sys::nftnl_set_set_data(
                    obj.ptr(),
                    sys::NFTNL_SET_USERDATA as u16,
                    data.as_ptr().cast(),
                    data.len() as u32,
                );
            }
        }
        let payload = if kind == libc::NFT_MSG_GETSETELEM {
            Payload::Elements(&obj)
        } else {
            Payload::Set(&obj)
        };
        self.object(kind, flags, seq, bound, payload)
    }

    /// NEWSETELEM / DELSETELEM for `elements`, in as many messages as their bounds need,
    /// each with a sequence number from `seq`.
    pub(crate) fn elements(
        &mut self,
        kind: i32,
        set: &str,
        elements: &[Element],
        flags: u16,
        seq: &mut dyn FnMut() -> u32,
    ) -> Result<(), Error> {
        let (family, table) = (self.family, self.table.clone());
        let header = SCALARS + attr(table.len() + 1) + attr(set.len() + 1);
        let adding = kind == libc::NFT_MSG_NEWSETELEM;
        let mut rest = elements;
        while !rest.is_empty() {
            let obj = Self::set_obj(family, &table, set)?;
            let mut bound = header;
            let mut taken = 0;
            for element in rest {
                let attrs = ElementAttrs::of(element, adding)?;
                if HEADERS + bound + attrs.bound > MESSAGE_MAX {
                    break;
                }
                bound += attrs.bound;
                attrs.add_to(&obj);
                taken += 1;
            }
            if taken == 0 {
                return Err(Error::Encode(format!(
                    "an element of set {set} does not fit a netlink message"
                )));
            }
            self.object(kind, flags, seq(), bound, Payload::Elements(&obj))?;
            rest = &rest[taken..];
        }
        Ok(())
    }
}

/// An element's attributes as libnftnl takes them, and the most bytes they take in a
/// message.
struct ElementAttrs {
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    verdict: Option<(u32, Option<CString>)>,
    comment: Option<Vec<u8>>,
    bound: usize,
}

impl ElementAttrs {
    /// What a NEWSETELEM (`adding`) or DELSETELEM message says of `element`.
    fn of(element: &Element, adding: bool) -> Result<ElementAttrs, Error> {
        let key = lower::key_bytes(&element.key());
        let data = element.data();
        let value = (adding && !data.is_empty()).then(|| lower::key_bytes(&data));
        let verdict = match element.verdict().filter(|_| adding) {
            Some(verdict) => Some((
                verdict_code(verdict) as u32,
                verdict.target().map(cstring).transpose()?,
            )),
            None => None,
        };
        let comment = element
            .comment()
            .filter(|_| adding)
            .map(|c| udata::userdata(&[(udata::SET_ELEM_COMMENT, &udata::comment_bytes(c))]));
        let chain = verdict.as_ref().and_then(|(_, chain)| chain.as_ref());
        let bound = ELEMENT_SCALARS
            + attr(key.len())
            + attr(value.as_ref().map_or(0, Vec::len))
            + attr(chain.map_or(0, |c| c.as_bytes().len() + 1))
            + attr(comment.as_ref().map_or(0, Vec::len));
        Ok(ElementAttrs {
            key,
            value,
            verdict,
            comment,
            bound,
        })
    }

    /// Adds the element to `set`, which takes it over.
    fn add_to(&self, set: &SetObj) {
        let elem = ElemObj::new();
        let data = |attr: u32, bytes: &[u8]| {
            // SAFETY: `elem` is live; `bytes` outlives the call and is copied.
            unsafe {
                sys::nftnl_set_elem_set(
                    elem.ptr(),
                    attr as u16,
                    bytes.as_ptr().cast(),
                    bytes.len() as u32,
                )
            };
        };
        data(sys::NFTNL_SET_ELEM_KEY, &self.key);
        if let Some(value) = &self.value {
            data(sys::NFTNL_SET_ELEM_DATA, value);
        }
        if let Some(comment) = &self.comment {
            data(sys::NFTNL_SET_ELEM_USERDATA, comment);
        }
        if let Some((code, chain)) = &self.verdict {
            // SAFETY: `elem` is live; `chain` outlives the call and is copied.
            unsafe {
                sys::nftnl_set_elem_set_u32(elem.ptr(), sys::NFTNL_SET_ELEM_VERDICT as u16, *code);
                if let Some(chain) = chain {
                    sys::nftnl_set_elem_set_str(
                        elem.ptr(),
                        sys::NFTNL_SET_ELEM_CHAIN as u16,
                        chain.as_ptr(),
                    );
                }
            }
        }
        // SAFETY: `set` is live; it takes the element over and frees it with itself.
        unsafe { sys::nftnl_set_elem_add(set.ptr(), elem.into_raw()) };
    }
}

/// A libnftnl rule for `chain`; without `rule`, one that names only the chain (a flush).
/// With it, the most bytes its message payload can take.
fn rule_obj(
    family: Family,
    table: &str,
    chain: &str,
    rule: Option<&Rule>,
) -> Result<(RuleObj, usize), Error> {
    let obj = RuleObj::new();
    let (table, chain) = (cstring(table)?, cstring(chain)?);
    let mut bound = SCALARS + attr(table.as_bytes().len() + 1) + attr(chain.as_bytes().len() + 1);
    // SAFETY: `obj` is live; the strings outlive the calls and are copied.
    unsafe {
        sys::nftnl_rule_set_u32(
            obj.ptr(),
            sys::NFTNL_RULE_FAMILY as u16,
            nfproto(family).into(),
        );
        sys::nftnl_rule_set_str(obj.ptr(), sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
        sys::nftnl_rule_set_str(obj.ptr(), sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
    }
    let Some(rule) = rule else {
        return Ok((obj, bound));
    };
    let exprs = lower::lower(family, &rule.stmts)
        .map_err(|e| Error::Encode(format!("rule `{rule}`: {e}")))?;
    for raw in &exprs {
        bound += expr_bound(raw);
        let expr = build_expr(raw)?;
        // SAFETY: `expr` is a fresh expression; the rule takes ownership of it.
        unsafe { sys::nftnl_rule_add_expr(obj.ptr(), expr.into_raw()) };
    }
    if let Some(comment) = &rule.comment {
        let data = udata::userdata(&[(udata::RULE_COMMENT, &udata::comment_bytes(comment))]);
        bound += attr(data.len());
        // SAFETY: `obj` is live; `data` outlives the call and is copied.
        unsafe {
            sys::nftnl_rule_set_data(
                obj.ptr(),
                sys::NFTNL_RULE_USERDATA as u16,
                data.as_ptr().cast(),
                data.len() as u32,
            )
        };
    }
    Ok((obj, bound))
}

/// A rule's bytecode as libnftnl prints it, one `[ … ]` expression per line: the format
/// of `nft --debug=netlink`, so nftproxy's encoding can be compared with nft's.
pub fn rule_bytecode(family: Family, rule: &Rule) -> Result<Vec<String>, Error> {
    let (obj, _) = rule_obj(family, "t", "c", Some(rule))?;
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: `buf` is writable for its length, which is passed; `obj` is live.
    let written = unsafe {
        sys::nftnl_rule_snprintf(
            buf.as_mut_ptr().cast(),
            buf.len(),
            obj.ptr(),
            sys::NFTNL_OUTPUT_DEFAULT,
            0,
        )
    };
    let written = usize::try_from(written).map_err(|_| Error::Encode("rule text".into()))?;
    let text = String::from_utf8_lossy(&buf[..written.min(buf.len())]).into_owned();
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .map(str::to_owned)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nftproxy_nft::{CmpOp, Expr, FibInput, L4Proto, MarkOp, PayloadField, Rhs, Stmt, Value};
    use proptest::prelude::*;
    use std::net::IpAddr;

    /// The longest name nf_tables takes (NFT_NAME_MAXLEN, 256 with the NUL).
    const LONGEST_NAME: usize = 255;
    /// The longest comment nft writes.
    const LONGEST_COMMENT: usize = 128;

    /// `elements` written as NEWSETELEM messages of set `name`: how many messages.
    fn write_elements(msgs: &mut Messages, name: &str, elements: &[Element]) -> Result<u32, Error> {
        let mut messages = 0;
        let mut seq = || {
            messages += 1;
            messages
        };
        msgs.elements(libc::NFT_MSG_NEWSETELEM, name, elements, 0, &mut seq)?;
        Ok(messages)
    }

    /// Every object of every golden table written as nftproxy sends it: each message
    /// within its bound (or `push` fails).
    #[test]
    fn golden_tables_stay_within_their_bounds() {
        for (case, table) in nftproxy_testkit::golden_tables() {
            let mut msgs = Messages::new(table.family, &table.name).expect("scratch");
            let fail = |e: Error| panic!("{case}: {e}");
            msgs.table(libc::NFT_MSG_NEWTABLE, table.comment.as_deref(), 0, 1)
                .unwrap_or_else(fail);
            for chain in table.chains.values() {
                msgs.chain(
                    libc::NFT_MSG_NEWCHAIN,
                    &chain.name,
                    chain.base.as_ref(),
                    0,
                    1,
                )
                .unwrap_or_else(fail);
                for rule in &chain.rules {
                    msgs.rule(libc::NFT_MSG_NEWRULE, &chain.name, Some(rule), 0, 1)
                        .unwrap_or_else(fail);
                }
            }
            for set in table.sets.values() {
                msgs.set(libc::NFT_MSG_NEWSET, set, 1, 0, 1)
                    .unwrap_or_else(fail);
                let elements: Vec<Element> = set.elements.values().cloned().collect();
                if let Err(e) = write_elements(&mut msgs, &set.name, &elements) {
                    fail(e);
                }
            }
        }
    }

    fn name(len: impl Strategy<Value = usize> + Clone) -> impl Strategy<Value = String> + Clone {
        len.prop_flat_map(|len| {
            proptest::string::string_regex(&format!("[a-zA-Z0-9/_.-]{{{len}}}")).expect("regex")
        })
    }

    /// Up to the longest nft writes, and (rarely) longer: libnftnl's userdata is cut to
    /// its 256 bytes whatever is asked.
    fn comment() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            name(0..=LONGEST_COMMENT).prop_map(Some),
            Just(Some("é".repeat(LONGEST_COMMENT / 2))),
            name(LONGEST_COMMENT..=400).prop_map(Some),
        ]
    }

    fn family() -> impl Strategy<Value = Family> {
        prop_oneof![Just(Family::Ip), Just(Family::Ip6)]
    }

    fn address(family: Family) -> BoxedStrategy<IpAddr> {
        match family {
            Family::Ip => any::<[u8; 4]>().prop_map(IpAddr::from).boxed(),
            Family::Ip6 => any::<[u8; 16]>().prop_map(IpAddr::from).boxed(),
        }
    }

    fn prefix_bits(family: Family) -> u8 {
        match family {
            Family::Ip => 32,
            Family::Ip6 => 128,
        }
    }

    fn protocol() -> impl Strategy<Value = L4Proto> {
        prop_oneof![Just(L4Proto::Tcp), Just(L4Proto::Udp), Just(L4Proto::Sctp)]
    }

    /// A key expression as the layout writes them: single fields and concatenations.
    fn key(family: Family) -> impl Strategy<Value = Expr> + Clone {
        let field = prop_oneof![
            Just(Expr::saddr(family)),
            Just(Expr::daddr(family)),
            Just(Expr::th_dport()),
            Just(Expr::MetaL4proto),
            (1..16u32).prop_map(Expr::NumgenRandom),
            (0..16u32).prop_map(Expr::Tag),
            any::<u8>().prop_map(move |m| Expr::PayloadAnd(PayloadField::Daddr(family), m)),
        ];
        prop_oneof![
            field.clone(),
            proptest::collection::vec(field, 2..4).prop_map(Expr::Concat),
        ]
    }

    fn verdict() -> impl Strategy<Value = Verdict> {
        prop_oneof![
            Just(Verdict::Accept),
            Just(Verdict::Drop),
            Just(Verdict::Return),
            name(1..=LONGEST_NAME).prop_map(Verdict::Jump),
            name(1..=LONGEST_NAME).prop_map(Verdict::Goto),
        ]
    }

    fn stmt(family: Family) -> impl Strategy<Value = Stmt> {
        let set = name(1..=LONGEST_NAME);
        let op = prop_oneof![Just(CmpOp::Eq), Just(CmpOp::Neq)];
        // Only what the encoder has a lowering for (ports are matched through sets).
        let matched = prop_oneof![
            (address(family), 0..=prefix_bits(family), any::<bool>()).prop_map(
                move |(a, p, source)| {
                    let field = if source {
                        Expr::saddr(family)
                    } else {
                        Expr::daddr(family)
                    };
                    (field, Rhs::Prefix(ipnet::IpNet::new(a, p).expect("prefix")))
                }
            ),
            protocol().prop_map(|p| (Expr::MetaL4proto, Rhs::Proto(p))),
            (1..64u32)
                .prop_flat_map(|n| (Just(n), 0..n))
                .prop_map(|(n, k)| (Expr::NumgenRandom(n), Rhs::Number(k))),
            Just((Expr::FibType(FibInput::Daddr), Rhs::FibLocal)),
            any::<u32>().prop_map(|m| (Expr::MetaMarkAnd(m), Rhs::Mark(m))),
            name(1..16usize).prop_map(|n| (Expr::Iifname, Rhs::Ifname(n))),
        ];
        let set_only_equal = prop_oneof![
            Just(Stmt::ct_state_new()),
            Just(Stmt::eq(
                Expr::CtStatus,
                Rhs::CtStatus(nftproxy_nft::CtStatus::Dnat)
            )),
        ];
        prop_oneof![
            (matched, op).prop_map(|((left, right), op)| Stmt::Match { left, op, right }),
            set_only_equal,
            (key(family), set.clone()).prop_map(|(left, set)| Stmt::Lookup { left, set }),
            (key(family), set.clone()).prop_map(|(key, map)| Stmt::Vmap { key, map }),
            (key(family), set.clone()).prop_map(|(key, set)| Stmt::Update { set, key }),
            (key(family), set).prop_map(move |(key, map)| Stmt::DnatMap { family, key, map }),
            (address(family), any::<u16>()).prop_map(|(addr, port)| Stmt::Dnat { addr, port }),
            any::<u32>().prop_map(|m| Stmt::SetMark(MarkOp::Or(m))),
            Just(Stmt::MasqueradeFullyRandom),
            Just(Stmt::Reject),
            Just(Stmt::Counter),
            verdict().prop_map(Stmt::Verdict),
        ]
    }

    fn rule(family: Family) -> impl Strategy<Value = Rule> {
        (proptest::collection::vec(stmt(family), 1..24), comment()).prop_map(|(stmts, comment)| {
            let mut rule = Rule::new(stmts);
            rule.comment = comment;
            rule
        })
    }

    fn element(key: Vec<DataType>, map: bool) -> impl Strategy<Value = Element> {
        let value = |t: DataType| -> BoxedStrategy<Value> {
            match t {
                DataType::Ipv4Addr => address(Family::Ip).prop_map(Value::Addr).boxed(),
                DataType::Ipv6Addr => address(Family::Ip6).prop_map(Value::Addr).boxed(),
                DataType::InetProto => protocol().prop_map(Value::Proto).boxed(),
                DataType::InetService => any::<u16>().prop_map(Value::Port).boxed(),
                _ => any::<u32>().prop_map(Value::Number).boxed(),
            }
        };
        let values: Vec<_> = key.into_iter().map(value).collect();
        (values, verdict(), comment()).prop_map(move |(key, verdict, comment)| {
            let element = if map {
                Element::with_verdict(key, verdict)
            } else {
                Element::new(key)
            };
            match comment {
                Some(comment) => element.with_comment(comment),
                None => element,
            }
        })
    }

    fn set_and_elements() -> impl Strategy<Value = (Vec<DataType>, bool, Vec<Element>)> {
        let types = prop_oneof![
            Just(vec![DataType::Ipv4Addr]),
            Just(vec![
                DataType::Ipv6Addr,
                DataType::InetProto,
                DataType::InetService
            ]),
            Just(vec![
                DataType::Ipv4Addr,
                DataType::InetProto,
                DataType::InetService
            ]),
            Just(vec![DataType::InetProto, DataType::InetService]),
            Just(vec![
                DataType::Ipv6Addr,
                DataType::Ipv6Addr,
                DataType::Integer
            ]),
        ];
        (types, any::<bool>()).prop_flat_map(|(types, map)| {
            let elements = proptest::collection::vec(element(types.clone(), map), 0..600);
            (Just(types), Just(map), elements)
        })
    }

    /// The number of messages in a buffer of NEWSETELEM messages, and of the elements
    /// in them with a key, each read with the bounds-checked attribute walker. (libnftnl
    /// parses only what the kernel writes: each element's nest typed NFTA_LIST_ELEM,
    /// where its encoder numbers them.)
    fn read_back(bytes: &[u8], set: &Set) -> (usize, usize) {
        const NFTA_SET_ELEM_LIST_SET: u16 = 2;
        const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
        const NFTA_SET_ELEM_KEY: u16 = 1;
        let (mut messages, mut elements) = (0, 0);
        crate::socket::each_message(bytes, |message| {
            messages += 1;
            let attributes = &message.bytes()[HEADERS..];
            let named =
                crate::attr::find(attributes, NFTA_SET_ELEM_LIST_SET).map(crate::attr::text);
            assert_eq!(named.as_deref(), Some(set.name.as_str()));
            let list =
                crate::attr::find(attributes, NFTA_SET_ELEM_LIST_ELEMENTS).unwrap_or_default();
            elements += crate::attr::attributes(list)
                .filter(|(_, element)| crate::attr::find(element, NFTA_SET_ELEM_KEY).is_some())
                .count();
        });
        (messages, elements)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every rule is written within its bound, or refused whole before libnftnl
        /// writes anything when it cannot fit a message.
        #[test]
        fn rules_are_written_within_their_bounds_or_refused(
            (family, rule) in family().prop_flat_map(|f| (Just(f), rule(f))),
            chain in name(1..=LONGEST_NAME),
        ) {
            let mut msgs = Messages::new(family, &"t".repeat(LONGEST_NAME)).expect("scratch");
            match msgs.rule(libc::NFT_MSG_NEWRULE, &chain, Some(&rule), 0, 1) {
                Ok(()) => prop_assert!(msgs.bytes.len() <= MESSAGE_MAX),
                Err(Error::Encode(reason)) => {
                    prop_assert!(msgs.bytes.is_empty());
                    prop_assert!(
                        reason.contains("does not fit") || reason.starts_with("rule `"),
                        "{reason}"
                    );
                }
                Err(other) => prop_assert!(false, "{other}"),
            }
        }

        /// Set declarations, chains and tables with the longest names and comments are
        /// written within their bounds.
        #[test]
        fn declarations_are_written_within_their_bounds(
            (family, key) in family().prop_flat_map(|f| (Just(f), key(f))),
            name in name(1..=LONGEST_NAME),
            comment in comment(),
            (timeout, size, counter, map) in (proptest::option::of(any::<u32>()), proptest::option::of(any::<u32>()), any::<bool>(), any::<bool>()),
        ) {
            let types = match &key {
                Expr::Concat(parts) => parts.clone(),
                single => vec![single.clone()],
            };
            let mut set = Set::new(name.clone(), types.iter().filter_map(Expr::data_type).collect());
            // Declared with `typeof` where the layout does: fields loaded whole.
            let typed = types
                .iter()
                .all(|e| matches!(e, Expr::Payload(_) | Expr::MetaL4proto | Expr::NumgenRandom(_)));
            if typed {
                set.type_of = Some(nftproxy_nft::TypeOf { key: types, data: Vec::new() });
            }
            if map {
                set.data = vec![DataType::Verdict];
            }
            set.timeout = timeout;
            set.dynamic = timeout.is_some();
            set.size = size;
            set.counter = counter;
            set.comment = comment.clone();
            let mut msgs = Messages::new(family, &name).expect("scratch");
            msgs.table(libc::NFT_MSG_NEWTABLE, comment.as_deref(), 0, 1).expect("table");
            msgs.set(libc::NFT_MSG_NEWSET, &set, 1, 0, 2).expect("set");
            let base = nftproxy_nft::BaseChain {
                chain_type: nftproxy_nft::ChainType::Nat,
                hook: nftproxy_nft::Hook::Postrouting,
                priority: nftproxy_nft::Priority(i32::MIN),
            };
            msgs.chain(libc::NFT_MSG_NEWCHAIN, &name, Some(&base), 0, 3).expect("chain");
            msgs.rule(libc::NFT_MSG_DELRULE, &name, None, 0, 4).expect("flush");
            msgs.delete_rule(&name, u64::MAX, 5).expect("delete rule");
        }

        /// Elements at their limits are split into messages that each fit, and every
        /// one of them is in one.
        #[test]
        fn elements_are_split_into_messages_that_fit(
            (key, map, elements) in set_and_elements(),
            name in name(1..=LONGEST_NAME),
        ) {
            let mut set = Set::new(name.clone(), key);
            if map {
                set.data = vec![DataType::Verdict];
            }
            let mut msgs = Messages::new(Family::Ip, &"t".repeat(LONGEST_NAME)).expect("scratch");
            let written = write_elements(&mut msgs, &name, &elements).expect("written");
            let (messages, read) = read_back(&msgs.bytes, &set);
            prop_assert_eq!(read, elements.len());
            prop_assert_eq!(messages, written as usize);
        }
    }

    #[test]
    fn a_quarter_million_elements_at_their_limits_fit_in_messages() {
        let chain = "c".repeat(LONGEST_NAME);
        let comment = "x".repeat(LONGEST_COMMENT);
        let elements: Vec<Element> = (0..250_000u32)
            .map(|i| {
                let key = vec![
                    Value::Addr(IpAddr::from((u128::from(i) << 64).to_be_bytes())),
                    Value::Proto(L4Proto::Sctp),
                    Value::Port(i as u16),
                ];
                Element::with_verdict(key, Verdict::Goto(chain.clone()))
                    .with_comment(comment.clone())
            })
            .collect();
        let mut set = Set::new(
            "s".repeat(LONGEST_NAME),
            vec![
                DataType::Ipv6Addr,
                DataType::InetProto,
                DataType::InetService,
            ],
        );
        set.data = vec![DataType::Verdict];
        let mut msgs = Messages::new(Family::Ip6, &"t".repeat(LONGEST_NAME)).expect("scratch");
        let written = write_elements(&mut msgs, &set.name, &elements).expect("written");
        let (messages, read) = read_back(&msgs.bytes, &set);
        assert_eq!(read, elements.len());
        assert_eq!(messages, written as usize);
        assert!(messages > 1000, "{messages} messages");
    }

    #[test]
    fn a_rule_too_large_for_a_message_is_refused_before_it_is_written() {
        let stmts = (0..300)
            .map(|i| Stmt::lookup(Expr::daddr(Family::Ip), format!("{i}{}", "s".repeat(250))))
            .collect();
        let mut msgs = Messages::new(Family::Ip, "t").expect("scratch");
        let error = msgs
            .rule(libc::NFT_MSG_NEWRULE, "c", Some(&Rule::new(stmts)), 0, 1)
            .expect_err("too large");
        assert!(error.to_string().contains("does not fit"), "{error}");
        assert!(msgs.bytes.is_empty());
    }
}
