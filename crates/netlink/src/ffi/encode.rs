//! Netlink messages written from nftproxy's objects: batches, tables, chains, rules, sets
//! and elements, and the dump requests that read them back.
//!
//! Invariant: libnftnl writes a message without a limit, so each message's size is
//! bounded from its inputs and checked against the buffer before it is written.

use super::expr::build_expr;
use super::*;

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
    scratch: Vec<u8>,
    family: Family,
    table: String,
}

impl Messages {
    /// Messages about one table.
    pub(crate) fn new(family: Family, table: &str) -> Messages {
        Messages {
            bytes: Vec::new(),
            scratch: vec![0; SCRATCH],
            family,
            table: table.to_owned(),
        }
    }

    /// Builds one message of at most `bound` bytes in the scratch area with `build`, and
    /// appends it. libnftnl writes a message without a limit, so the bound is checked
    /// against the scratch area before anything is written, and the message against the
    /// bound after (a longer one is an error in the bound, which the tests would show).
    fn push(
        &mut self,
        bound: usize,
        build: impl FnOnce(*mut c_char) -> *mut nlmsghdr,
    ) -> Result<(), Error> {
        if bound > self.scratch.len() {
            return Err(Error::Encode(format!(
                "a message of up to {bound} bytes does not fit the {}-byte buffer",
                self.scratch.len()
            )));
        }
        let nlh = build(self.scratch.as_mut_ptr().cast());
        // SAFETY: `build` returned the header it wrote at the start of the scratch area,
        // which libnftnl keeps updated with the message length.
        let len = unsafe { (*nlh).nlmsg_len } as usize;
        if len > bound {
            return Err(Error::Encode(format!(
                "a message of {len} bytes exceeds its bound of {bound}"
            )));
        }
        if len > MESSAGE_MAX {
            return Err(Error::Encode(format!(
                "a message of {len} bytes exceeds 64 KiB"
            )));
        }
        self.bytes.extend_from_slice(&self.scratch[..len]);
        self.bytes.resize(self.bytes.len().div_ceil(4) * 4, 0);
        Ok(())
    }

    /// A message with the nf_tables header and a payload of at most `bound` bytes from
    /// `payload`.
    fn object(
        &mut self,
        kind: i32,
        flags: u16,
        seq: u32,
        bound: usize,
        payload: impl FnOnce(*mut nlmsghdr),
    ) -> Result<(), Error> {
        let family = self.family;
        self.push(HEADERS + bound, |buf| {
            // SAFETY: `buf` points at more writable bytes than the headers' 20.
            let nlh = unsafe {
                sys::nftnl_nlmsg_build_hdr(buf, kind as u16, nfproto(family), flags, seq)
            };
            payload(nlh);
            nlh
        })
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
                // SAFETY: `nlh` is the header just written; `obj` is live.
                self.object(kind, flags, seq, request, |nlh| unsafe {
                    sys::nftnl_table_nlmsg_build_payload(nlh, obj.ptr())
                })
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
                // SAFETY: as above.
                self.object(kind, flags, seq, request, |nlh| unsafe {
                    sys::nftnl_chain_nlmsg_build_payload(nlh, obj.ptr())
                })
            }
            libc::NFT_MSG_GETRULE => {
                let obj = RuleObj::new();
                // SAFETY: as above.
                unsafe {
                    sys::nftnl_rule_set_u32(obj.ptr(), sys::NFTNL_RULE_FAMILY as u16, family_attr);
                    sys::nftnl_rule_set_str(obj.ptr(), sys::NFTNL_RULE_TABLE as u16, name.as_ptr());
                }
                // SAFETY: as above.
                self.object(kind, flags, seq, request, |nlh| unsafe {
                    sys::nftnl_rule_nlmsg_build_payload(nlh, obj.ptr())
                })
            }
            libc::NFT_MSG_GETSET => {
                let obj = SetObj::new();
                // SAFETY: as above.
                unsafe {
                    sys::nftnl_set_set_u32(obj.ptr(), sys::NFTNL_SET_FAMILY as u16, family_attr);
                    sys::nftnl_set_set_str(obj.ptr(), sys::NFTNL_SET_TABLE as u16, name.as_ptr());
                }
                // SAFETY: as above.
                self.object(kind, flags, seq, request, |nlh| unsafe {
                    sys::nftnl_set_nlmsg_build_payload(nlh, obj.ptr())
                })
            }
            // A request without payload: the kernel answers with the ruleset generation.
            libc::NFT_MSG_GETGEN => self.object(kind, 0, seq, 0, |_| {}),
            other => Err(Error::Encode(format!(
                "no request for message type {other}"
            ))),
        }
    }

    pub(crate) fn batch_begin(&mut self, seq: u32) -> Result<(), Error> {
        // SAFETY: `buf` points at SCRATCH writable bytes; the message is 20 bytes.
        self.push(HEADERS, |buf| unsafe { sys::nftnl_batch_begin(buf, seq) })
    }

    pub(crate) fn batch_end(&mut self, seq: u32) -> Result<(), Error> {
        // SAFETY: as for `batch_begin`.
        self.push(HEADERS, |buf| unsafe { sys::nftnl_batch_end(buf, seq) })
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
            comment.map(|c| userdata(&[(sys::NFTNL_UDATA_TABLE_COMMENT as u8, &comment_bytes(c))]));
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
        // SAFETY: `nlh` is the header just written; `table` is live.
        self.object(kind, flags, seq, bound, |nlh| unsafe {
            sys::nftnl_table_nlmsg_build_payload(nlh, table.ptr())
        })
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
        // SAFETY: `nlh` is the header just written; `chain` is live.
        self.object(kind, flags, seq, bound, |nlh| unsafe {
            sys::nftnl_chain_nlmsg_build_payload(nlh, chain.ptr())
        })
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
        // SAFETY: `nlh` is the header just written; `obj` is live.
        self.object(kind, flags, seq, bound, |nlh| unsafe {
            sys::nftnl_rule_nlmsg_build_payload(nlh, obj.ptr())
        })
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
        // SAFETY: `nlh` is the header just written; `obj` is live.
        self.object(libc::NFT_MSG_NEWRULE, flags, seq, bound, |nlh| unsafe {
            sys::nftnl_rule_nlmsg_build_payload(nlh, obj.ptr())
        })
    }

    /// DELRULE of the rule with this handle.
    pub(crate) fn delete_rule(&mut self, chain: &str, handle: u64, seq: u32) -> Result<(), Error> {
        let (obj, bound) = rule_obj(self.family, &self.table.clone(), chain, None)?;
        // SAFETY: `obj` is live.
        unsafe { sys::nftnl_rule_set_u64(obj.ptr(), sys::NFTNL_RULE_HANDLE as u16, handle) };
        // SAFETY: `nlh` is the header just written; `obj` is live.
        self.object(libc::NFT_MSG_DELRULE, 0, seq, bound, |nlh| unsafe {
            sys::nftnl_rule_nlmsg_build_payload(nlh, obj.ptr())
        })
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
            let mut entries: Vec<(u8, Vec<u8>)> = vec![(
                sys::NFTNL_UDATA_SET_KEYBYTEORDER as u8,
                byteorder.to_ne_bytes().to_vec(),
            )];
            if set.is_map() {
                entries.push((
                    sys::NFTNL_UDATA_SET_DATABYTEORDER as u8,
                    0u32.to_ne_bytes().to_vec(),
                ));
            }
            if let Some(type_of) = &set.type_of {
                let typeof_entry = |exprs| {
                    lower::typeof_udata(exprs)
                        .map_err(|e| Error::Encode(format!("set {}: {e}", set.name)))
                };
                entries.push((
                    sys::NFTNL_UDATA_SET_KEY_TYPEOF as u8,
                    typeof_entry(&type_of.key)?,
                ));
                if set.is_map() {
                    entries.push((
                        sys::NFTNL_UDATA_SET_DATA_TYPEOF as u8,
                        typeof_entry(&type_of.data)?,
                    ));
                    entries.push((
                        sys::NFTNL_UDATA_SET_DATA_INTERVAL as u8,
                        0u32.to_ne_bytes().to_vec(),
                    ));
                }
            }
            if let Some(comment) = &set.comment {
                entries.push((sys::NFTNL_UDATA_SET_COMMENT as u8, comment_bytes(comment)));
            }
            let borrowed: Vec<(u8, &[u8])> =
                entries.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            let data = userdata(&borrowed);
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
        let elements = kind == libc::NFT_MSG_GETSETELEM;
        self.object(kind, flags, seq, bound, |nlh| {
            // SAFETY: `nlh` is the header just written; `obj` is live.
            unsafe {
                if elements {
                    sys::nftnl_set_elems_nlmsg_build_payload(nlh, obj.ptr());
                } else {
                    sys::nftnl_set_nlmsg_build_payload(nlh, obj.ptr());
                }
            }
        })
    }

    /// NEWSETELEM / DELSETELEM for `elements` (the caller keeps each message small).
    pub(crate) fn elements(
        &mut self,
        kind: i32,
        set: &str,
        elements: &[Element],
        flags: u16,
        seq: u32,
    ) -> Result<(), Error> {
        let (family, table) = (self.family, self.table.clone());
        let table = table.as_str();
        let obj = Self::set_obj(family, table, set)?;
        let mut bound = SCALARS + attr(table.len() + 1) + attr(set.len() + 1);
        for element in elements {
            let key = lower::key_bytes(&element.key());
            let data = element.data();
            let value = (!data.is_empty() && kind == libc::NFT_MSG_NEWSETELEM)
                .then(|| lower::key_bytes(&data));
            // SAFETY: allocation has no preconditions; null only when out of memory.
            let elem = NonNull::new(unsafe { sys::nftnl_set_elem_alloc() })
                .expect("libnftnl allocation failed: out of memory");
            let chain = element
                .verdict()
                .and_then(Verdict::target)
                .map(cstring)
                .transpose()?;
            let comment = element
                .comment()
                .filter(|_| kind == libc::NFT_MSG_NEWSETELEM)
                .map(|c| userdata(&[(sys::NFTNL_UDATA_SET_ELEM_COMMENT as u8, &comment_bytes(c))]));
            bound += ELEMENT_SCALARS
                + attr(key.len())
                + attr(value.as_ref().map_or(0, Vec::len))
                + attr(chain.as_ref().map_or(0, |c| c.as_bytes().len() + 1))
                + attr(comment.as_ref().map_or(0, Vec::len));
            // SAFETY: `elem` is live until handed to the set, which then owns it; every
            // buffer outlives its call and is copied.
            unsafe {
                sys::nftnl_set_elem_set(
                    elem.as_ptr(),
                    sys::NFTNL_SET_ELEM_KEY as u16,
                    key.as_ptr().cast(),
                    key.len() as u32,
                );
                if let Some(verdict) = element
                    .verdict()
                    .filter(|_| kind == libc::NFT_MSG_NEWSETELEM)
                {
                    sys::nftnl_set_elem_set_u32(
                        elem.as_ptr(),
                        sys::NFTNL_SET_ELEM_VERDICT as u16,
                        verdict_code(verdict) as u32,
                    );
                    if let Some(chain) = &chain {
                        sys::nftnl_set_elem_set_str(
                            elem.as_ptr(),
                            sys::NFTNL_SET_ELEM_CHAIN as u16,
                            chain.as_ptr(),
                        );
                    }
                }
                if let Some(value) = &value {
                    sys::nftnl_set_elem_set(
                        elem.as_ptr(),
                        sys::NFTNL_SET_ELEM_DATA as u16,
                        value.as_ptr().cast(),
                        value.len() as u32,
                    );
                }
                if let Some(data) = &comment {
                    sys::nftnl_set_elem_set(
                        elem.as_ptr(),
                        sys::NFTNL_SET_ELEM_USERDATA as u16,
                        data.as_ptr().cast(),
                        data.len() as u32,
                    );
                }
                sys::nftnl_set_elem_add(obj.ptr(), elem.as_ptr());
            }
        }
        // SAFETY: `nlh` is the header just written; `obj` is live.
        self.object(kind, flags, seq, bound, |nlh| unsafe {
            sys::nftnl_set_elems_nlmsg_build_payload(nlh, obj.ptr())
        })
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
        let data = userdata(&[(sys::NFTNL_UDATA_RULE_COMMENT as u8, &comment_bytes(comment))]);
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

    /// Every object of every golden table written as nftproxy sends it: each message
    /// within its bound (or `push` fails), and a message whose bound cannot fit the
    /// buffer refused before anything is written.
    #[test]
    fn messages_stay_within_their_bounds() {
        for (case, table) in nftproxy_testkit::golden_tables() {
            let mut msgs = Messages::new(table.family, &table.name);
            msgs.table(libc::NFT_MSG_NEWTABLE, table.comment.as_deref(), 0, 1)
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            for chain in table.chains.values() {
                msgs.chain(
                    libc::NFT_MSG_NEWCHAIN,
                    &chain.name,
                    chain.base.as_ref(),
                    0,
                    1,
                )
                .unwrap_or_else(|e| panic!("{case}: {e}"));
                for rule in &chain.rules {
                    msgs.rule(libc::NFT_MSG_NEWRULE, &chain.name, Some(rule), 0, 1)
                        .unwrap_or_else(|e| panic!("{case}: {e}"));
                }
            }
            for set in table.sets.values() {
                msgs.set(libc::NFT_MSG_NEWSET, set, 1, 0, 1)
                    .unwrap_or_else(|e| panic!("{case}: {e}"));
                let elements: Vec<Element> = set.elements.values().cloned().collect();
                for chunk in elements.chunks(128) {
                    msgs.elements(libc::NFT_MSG_NEWSETELEM, &set.name, chunk, 0, 1)
                        .unwrap_or_else(|e| panic!("{case}: {e}"));
                }
            }
        }
        let long = "x".repeat(200);
        let many: Vec<Element> = (0..20_000u32)
            .map(|i| {
                Element::new(vec![nftproxy_nft::Value::Port((i % 60_000) as u16 + 1)])
                    .with_comment(long.clone())
            })
            .collect();
        let mut msgs = Messages::new(Family::Ip, "t");
        let error = msgs
            .elements(libc::NFT_MSG_NEWSETELEM, "s", &many, 0, 1)
            .expect_err("too large for the buffer");
        assert!(error.to_string().contains("does not fit"), "{error}");
        assert!(msgs.bytes.is_empty());
    }
}
