//! libnftnl objects built from nftproxy's types, encoded into netlink messages, and
//! parsed back from dump replies. One of the three modules that hold `unsafe` (with
//! `socket` and `netns`); the others of this crate, like every other crate, have none.
//!
//! Invariant: every libnftnl object is owned by exactly one Rust value (freed on drop) or
//! handed to a parent that frees it (expressions to rules, elements to sets); every
//! pointer passed to libnftnl is valid for the duration of the call, and every string is
//! NUL-terminated.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::ptr::NonNull;

use libc::nlmsghdr;
use nftnl_sys as sys;
use nftproxy_nft::{
    BaseChain, Chain, ChainType, DataType, Element, Family, Hook, Priority, Rule, Set, TypeOf,
    Verdict,
};

use crate::Error;
use crate::lower::{self, PayloadBase, RawExpr};
use crate::socket::Message;

/// libnftnl's userdata buffer limit (NFT_USERDATA_MAXLEN).
const USERDATA_MAX: u32 = 256;
/// nft's `BYTEORDER_BIG_ENDIAN`, recorded for address keys.
const BYTEORDER_BIG_ENDIAN: u32 = 2;
/// Nested attributes have 16-bit lengths: a message must stay below this.
pub(crate) const MESSAGE_MAX: usize = 65_535;
/// The size the kernel gives a dynamic set that was created without one.
const DYNSET_DEFAULT_SIZE: u32 = 0xffff;
/// Scratch space for one message: libnftnl does not bound its writes, so this is far
/// larger than any message we accept.
const SCRATCH: usize = 4 * MESSAGE_MAX;
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

macro_rules! owned {
    ($name:ident, $ty:ty, $alloc:path, $free:path) => {
        struct $name(NonNull<$ty>);

        impl $name {
            fn new() -> $name {
                // SAFETY: the allocator has no preconditions; it returns null only when
                // memory is exhausted, which `expect` turns into an abort-like panic.
                let ptr = unsafe { $alloc() };
                $name(NonNull::new(ptr).expect("libnftnl allocation failed: out of memory"))
            }

            fn ptr(&self) -> *mut $ty {
                self.0.as_ptr()
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: this value owns the object, and drop runs once.
                unsafe { $free(self.0.as_ptr()) }
            }
        }
    };
}

owned!(
    TableObj,
    sys::nftnl_table,
    sys::nftnl_table_alloc,
    sys::nftnl_table_free
);
owned!(
    ChainObj,
    sys::nftnl_chain,
    sys::nftnl_chain_alloc,
    sys::nftnl_chain_free
);
owned!(
    RuleObj,
    sys::nftnl_rule,
    sys::nftnl_rule_alloc,
    sys::nftnl_rule_free
);
owned!(
    GenObj,
    sys::nftnl_gen,
    sys::nftnl_gen_alloc,
    sys::nftnl_gen_free
);
owned!(
    SetObj,
    sys::nftnl_set,
    sys::nftnl_set_alloc,
    sys::nftnl_set_free
);

fn cstring(text: &str) -> Result<CString, Error> {
    CString::new(text).map_err(|_| Error::Encode(format!("{text:?} contains a NUL byte")))
}

/// A string attribute read back; `None` when absent.
fn owned_str(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: libnftnl returns NUL-terminated strings owned by the object, which outlives
    // this call; the bytes are copied out.
    Some(
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Userdata TLVs (type, length, value) as libnftnl lays them out.
fn userdata(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, value) in entries {
        let len = u8::try_from(value.len()).unwrap_or(u8::MAX);
        out.push(*kind);
        out.push(len);
        out.extend_from_slice(&value[..usize::from(len)]);
    }
    out.truncate(USERDATA_MAX as usize);
    out
}

fn comment_bytes(comment: &str) -> Vec<u8> {
    let mut bytes = comment.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// The value of userdata entry `kind`, if present before any damaged entry.
fn userdata_entry(data: &[u8], kind: u8) -> Option<&[u8]> {
    lower::tlvs(data)
        .map_while(Result::ok)
        .find_map(|(entry_kind, value)| (entry_kind == kind).then_some(value))
}

fn comment_of(data: &[u8], kind: u8) -> Option<String> {
    let value = userdata_entry(data, kind)?;
    let text = value.strip_suffix(&[0]).unwrap_or(value);
    Some(String::from_utf8_lossy(text).into_owned())
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
            bound += attr(data.len());
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

fn nfproto(family: Family) -> u16 {
    lower::nfproto(family) as u16
}

fn hook_number(hook: Hook) -> u32 {
    (match hook {
        Hook::Prerouting => libc::NF_INET_PRE_ROUTING,
        Hook::Input => libc::NF_INET_LOCAL_IN,
        Hook::Forward => libc::NF_INET_FORWARD,
        Hook::Output => libc::NF_INET_LOCAL_OUT,
        Hook::Postrouting => libc::NF_INET_POST_ROUTING,
    }) as u32
}

fn hook_of(number: u32) -> Option<Hook> {
    Some(match number as i32 {
        libc::NF_INET_PRE_ROUTING => Hook::Prerouting,
        libc::NF_INET_LOCAL_IN => Hook::Input,
        libc::NF_INET_FORWARD => Hook::Forward,
        libc::NF_INET_LOCAL_OUT => Hook::Output,
        libc::NF_INET_POST_ROUTING => Hook::Postrouting,
        _ => return None,
    })
}

fn verdict_code(verdict: &Verdict) -> i32 {
    match verdict {
        Verdict::Accept => libc::NF_ACCEPT,
        Verdict::Drop => libc::NF_DROP,
        Verdict::Return => libc::NFT_RETURN,
        Verdict::Jump(_) => libc::NFT_JUMP,
        Verdict::Goto(_) => libc::NFT_GOTO,
    }
}

fn verdict_of(code: i32, chain: Option<String>) -> Result<Verdict, Error> {
    Ok(match (code, chain) {
        (libc::NF_ACCEPT, _) => Verdict::Accept,
        (libc::NF_DROP, _) => Verdict::Drop,
        (libc::NFT_RETURN, _) => Verdict::Return,
        (libc::NFT_JUMP, Some(chain)) => Verdict::Jump(chain),
        (libc::NFT_GOTO, Some(chain)) => Verdict::Goto(chain),
        (code, _) => return Err(Error::Decode(format!("verdict code {code}"))),
    })
}

/// An expression owned until it is added to a rule.
struct ExprObj(NonNull<sys::nftnl_expr>);

impl ExprObj {
    /// Hands the expression over (to a rule, which frees it).
    fn into_raw(self) -> *mut sys::nftnl_expr {
        let ptr = self.0.as_ptr();
        std::mem::forget(self);
        ptr
    }

    fn u32(&self, attr: u32, value: u32) {
        // SAFETY: the expression is live; libnftnl validates the attribute id.
        unsafe { sys::nftnl_expr_set_u32(self.0.as_ptr(), attr as u16, value) }
    }

    fn data(&self, attr: u32, value: &[u8]) {
        // SAFETY: the expression is live; `value` outlives the call and is copied.
        unsafe {
            sys::nftnl_expr_set(
                self.0.as_ptr(),
                attr as u16,
                value.as_ptr().cast(),
                value.len() as u32,
            )
        };
    }

    fn str(&self, attr: u32, value: &str) -> Result<(), Error> {
        let value = cstring(value)?;
        // SAFETY: the expression is live; `value` outlives the call and is copied.
        unsafe { sys::nftnl_expr_set_str(self.0.as_ptr(), attr as u16, value.as_ptr()) };
        Ok(())
    }
}

impl Drop for ExprObj {
    fn drop(&mut self) {
        // SAFETY: an expression not handed to a rule is still owned here.
        unsafe { sys::nftnl_expr_free(self.0.as_ptr()) }
    }
}

fn build_expr(raw: &RawExpr) -> Result<ExprObj, Error> {
    let name = match raw {
        RawExpr::Payload { .. } => "payload",
        RawExpr::MetaLoad { .. } | RawExpr::MetaSet { .. } => "meta",
        RawExpr::Ct { .. } => "ct",
        RawExpr::Bitwise { .. } => "bitwise",
        RawExpr::Cmp { .. } => "cmp",
        RawExpr::Lookup { .. } => "lookup",
        RawExpr::Immediate { .. } | RawExpr::Verdict(_) => "immediate",
        RawExpr::Numgen { .. } => "numgen",
        RawExpr::Fib { .. } => "fib",
        RawExpr::DynsetUpdate { .. } => "dynset",
        RawExpr::Dnat { .. } => "nat",
        RawExpr::Masq { .. } => "masq",
        RawExpr::Reject { .. } => "reject",
    };
    let cname = cstring(name)?;
    // SAFETY: `cname` is a valid NUL-terminated expression name.
    let ptr = unsafe { sys::nftnl_expr_alloc(cname.as_ptr()) };
    let expr = ExprObj(
        NonNull::new(ptr)
            .ok_or_else(|| Error::Encode(format!("libnftnl has no expression {name}")))?,
    );
    match raw {
        RawExpr::Payload {
            base,
            offset,
            len,
            dreg,
        } => {
            expr.u32(sys::NFTNL_EXPR_PAYLOAD_DREG, *dreg);
            expr.u32(sys::NFTNL_EXPR_PAYLOAD_BASE, *base as u32);
            expr.u32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, *offset);
            expr.u32(sys::NFTNL_EXPR_PAYLOAD_LEN, *len);
        }
        RawExpr::MetaLoad { key, dreg } => {
            expr.u32(sys::NFTNL_EXPR_META_KEY, *key);
            expr.u32(sys::NFTNL_EXPR_META_DREG, *dreg);
        }
        RawExpr::MetaSet { key, sreg } => {
            expr.u32(sys::NFTNL_EXPR_META_KEY, *key);
            expr.u32(sys::NFTNL_EXPR_META_SREG, *sreg);
        }
        RawExpr::Ct { key, dreg } => {
            expr.u32(sys::NFTNL_EXPR_CT_KEY, *key);
            expr.u32(sys::NFTNL_EXPR_CT_DREG, *dreg);
        }
        RawExpr::Bitwise {
            sreg,
            dreg,
            mask,
            xor,
        } => {
            expr.u32(sys::NFTNL_EXPR_BITWISE_SREG, *sreg);
            expr.u32(sys::NFTNL_EXPR_BITWISE_DREG, *dreg);
            expr.u32(sys::NFTNL_EXPR_BITWISE_LEN, mask.len() as u32);
            expr.data(sys::NFTNL_EXPR_BITWISE_MASK, mask);
            expr.data(sys::NFTNL_EXPR_BITWISE_XOR, xor);
        }
        RawExpr::Cmp { sreg, neq, data } => {
            expr.u32(sys::NFTNL_EXPR_CMP_SREG, *sreg);
            expr.u32(
                sys::NFTNL_EXPR_CMP_OP,
                if *neq {
                    libc::NFT_CMP_NEQ
                } else {
                    libc::NFT_CMP_EQ
                } as u32,
            );
            expr.data(sys::NFTNL_EXPR_CMP_DATA, data);
        }
        RawExpr::Lookup { sreg, set, dreg } => {
            expr.u32(sys::NFTNL_EXPR_LOOKUP_SREG, *sreg);
            expr.str(sys::NFTNL_EXPR_LOOKUP_SET, set)?;
            if let Some(dreg) = dreg {
                expr.u32(sys::NFTNL_EXPR_LOOKUP_DREG, *dreg);
            }
        }
        RawExpr::Immediate { dreg, data } => {
            expr.u32(sys::NFTNL_EXPR_IMM_DREG, *dreg);
            expr.data(sys::NFTNL_EXPR_IMM_DATA, data);
        }
        RawExpr::Verdict(verdict) => {
            expr.u32(sys::NFTNL_EXPR_IMM_DREG, lower::REG_VERDICT);
            expr.u32(sys::NFTNL_EXPR_IMM_VERDICT, verdict_code(verdict) as u32);
            if let Some(chain) = verdict.target() {
                expr.str(sys::NFTNL_EXPR_IMM_CHAIN, chain)?;
            }
        }
        RawExpr::Numgen {
            dreg,
            modulus,
            offset,
        } => {
            expr.u32(sys::NFTNL_EXPR_NG_DREG, *dreg);
            expr.u32(sys::NFTNL_EXPR_NG_MODULUS, *modulus);
            if *offset != 0 {
                expr.u32(sys::NFTNL_EXPR_NG_OFFSET, *offset);
            }
            expr.u32(sys::NFTNL_EXPR_NG_TYPE, libc::NFT_NG_RANDOM as u32);
        }
        RawExpr::Fib {
            flags,
            result,
            dreg,
        } => {
            expr.u32(sys::NFTNL_EXPR_FIB_DREG, *dreg);
            expr.u32(sys::NFTNL_EXPR_FIB_RESULT, *result);
            expr.u32(sys::NFTNL_EXPR_FIB_FLAGS, *flags);
        }
        RawExpr::DynsetUpdate { sreg_key, set } => {
            expr.u32(sys::NFTNL_EXPR_DYNSET_SREG_KEY, *sreg_key);
            expr.u32(sys::NFTNL_EXPR_DYNSET_OP, libc::NFT_DYNSET_OP_UPDATE as u32);
            expr.str(sys::NFTNL_EXPR_DYNSET_SET_NAME, set)?;
        }
        RawExpr::Dnat {
            family,
            reg_addr,
            reg_proto,
            flags,
        } => {
            expr.u32(sys::NFTNL_EXPR_NAT_TYPE, libc::NFT_NAT_DNAT as u32);
            expr.u32(sys::NFTNL_EXPR_NAT_FAMILY, *family);
            expr.u32(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, *reg_addr);
            expr.u32(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, *reg_proto);
            // nft leaves the attribute out when there are no flags.
            if *flags != 0 {
                expr.u32(sys::NFTNL_EXPR_NAT_FLAGS, *flags);
            }
        }
        RawExpr::Masq { flags } => expr.u32(sys::NFTNL_EXPR_MASQ_FLAGS, *flags),
        RawExpr::Reject { kind, code } => {
            expr.u32(sys::NFTNL_EXPR_REJECT_TYPE, *kind);
            // SAFETY: the expression is live.
            unsafe {
                sys::nftnl_expr_set_u8(expr.0.as_ptr(), sys::NFTNL_EXPR_REJECT_CODE as u16, *code)
            };
        }
    }
    Ok(expr)
}

// === decoding dump replies ===

fn expr_u32(expr: *const sys::nftnl_expr, attr: u32) -> u32 {
    // SAFETY: `expr` is a live expression of a live rule; absent attributes read as 0.
    unsafe { sys::nftnl_expr_get_u32(expr, attr as u16) }
}

fn expr_is_set(expr: *const sys::nftnl_expr, attr: u32) -> bool {
    // SAFETY: as above.
    unsafe { sys::nftnl_expr_is_set(expr, attr as u16) }
}

fn expr_data(expr: *const sys::nftnl_expr, attr: u32) -> Vec<u8> {
    let mut len = 0u32;
    // SAFETY: as above; the returned buffer holds `len` bytes owned by the expression.
    let ptr = unsafe { sys::nftnl_expr_get(expr, attr as u16, &mut len) };
    if ptr.is_null() {
        return Vec::new();
    }
    // SAFETY: `ptr` is valid for `len` bytes while the rule lives; copied out here.
    unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize) }.to_vec()
}

fn expr_str(expr: *const sys::nftnl_expr, attr: u32) -> Option<String> {
    // SAFETY: as above.
    owned_str(unsafe { sys::nftnl_expr_get_str(expr, attr as u16) })
}

fn raw_expr(expr: *const sys::nftnl_expr) -> Result<RawExpr, Error> {
    let name = expr_str(expr, sys::NFTNL_EXPR_NAME).unwrap_or_default();
    let u = |attr| expr_u32(expr, attr);
    Ok(match name.as_str() {
        "payload" => RawExpr::Payload {
            base: match u(sys::NFTNL_EXPR_PAYLOAD_BASE) {
                1 => PayloadBase::Network,
                2 => PayloadBase::Transport,
                other => return Err(Error::Decode(format!("payload base {other}"))),
            },
            offset: u(sys::NFTNL_EXPR_PAYLOAD_OFFSET),
            len: u(sys::NFTNL_EXPR_PAYLOAD_LEN),
            dreg: u(sys::NFTNL_EXPR_PAYLOAD_DREG),
        },
        "meta" if expr_is_set(expr, sys::NFTNL_EXPR_META_SREG) => RawExpr::MetaSet {
            key: u(sys::NFTNL_EXPR_META_KEY),
            sreg: u(sys::NFTNL_EXPR_META_SREG),
        },
        "meta" => RawExpr::MetaLoad {
            key: u(sys::NFTNL_EXPR_META_KEY),
            dreg: u(sys::NFTNL_EXPR_META_DREG),
        },
        "ct" => RawExpr::Ct {
            key: u(sys::NFTNL_EXPR_CT_KEY),
            dreg: u(sys::NFTNL_EXPR_CT_DREG),
        },
        "bitwise" => RawExpr::Bitwise {
            sreg: u(sys::NFTNL_EXPR_BITWISE_SREG),
            dreg: u(sys::NFTNL_EXPR_BITWISE_DREG),
            mask: expr_data(expr, sys::NFTNL_EXPR_BITWISE_MASK),
            xor: expr_data(expr, sys::NFTNL_EXPR_BITWISE_XOR),
        },
        "cmp" => RawExpr::Cmp {
            sreg: u(sys::NFTNL_EXPR_CMP_SREG),
            neq: u(sys::NFTNL_EXPR_CMP_OP) == libc::NFT_CMP_NEQ as u32,
            data: expr_data(expr, sys::NFTNL_EXPR_CMP_DATA),
        },
        "lookup" => RawExpr::Lookup {
            sreg: u(sys::NFTNL_EXPR_LOOKUP_SREG),
            set: expr_str(expr, sys::NFTNL_EXPR_LOOKUP_SET).unwrap_or_default(),
            dreg: expr_is_set(expr, sys::NFTNL_EXPR_LOOKUP_DREG)
                .then(|| u(sys::NFTNL_EXPR_LOOKUP_DREG)),
        },
        "immediate" if u(sys::NFTNL_EXPR_IMM_DREG) == lower::REG_VERDICT => {
            let chain = expr_str(expr, sys::NFTNL_EXPR_IMM_CHAIN);
            RawExpr::Verdict(verdict_of(u(sys::NFTNL_EXPR_IMM_VERDICT) as i32, chain)?)
        }
        "immediate" => RawExpr::Immediate {
            dreg: u(sys::NFTNL_EXPR_IMM_DREG),
            data: expr_data(expr, sys::NFTNL_EXPR_IMM_DATA),
        },
        "numgen" if u(sys::NFTNL_EXPR_NG_TYPE) == libc::NFT_NG_RANDOM as u32 => RawExpr::Numgen {
            dreg: u(sys::NFTNL_EXPR_NG_DREG),
            modulus: u(sys::NFTNL_EXPR_NG_MODULUS),
            offset: u(sys::NFTNL_EXPR_NG_OFFSET),
        },
        "fib" => RawExpr::Fib {
            flags: u(sys::NFTNL_EXPR_FIB_FLAGS),
            result: u(sys::NFTNL_EXPR_FIB_RESULT),
            dreg: u(sys::NFTNL_EXPR_FIB_DREG),
        },
        "dynset" if u(sys::NFTNL_EXPR_DYNSET_OP) == libc::NFT_DYNSET_OP_UPDATE as u32 => {
            RawExpr::DynsetUpdate {
                sreg_key: u(sys::NFTNL_EXPR_DYNSET_SREG_KEY),
                set: expr_str(expr, sys::NFTNL_EXPR_DYNSET_SET_NAME).unwrap_or_default(),
            }
        }
        "nat" if u(sys::NFTNL_EXPR_NAT_TYPE) == libc::NFT_NAT_DNAT as u32 => RawExpr::Dnat {
            family: u(sys::NFTNL_EXPR_NAT_FAMILY),
            reg_addr: u(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN),
            reg_proto: u(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN),
            flags: u(sys::NFTNL_EXPR_NAT_FLAGS),
        },
        "masq" => RawExpr::Masq {
            flags: u(sys::NFTNL_EXPR_MASQ_FLAGS),
        },
        "reject" => RawExpr::Reject {
            kind: u(sys::NFTNL_EXPR_REJECT_TYPE),
            // SAFETY: the expression is live.
            code: unsafe { sys::nftnl_expr_get_u8(expr, sys::NFTNL_EXPR_REJECT_CODE as u16) },
        },
        other => {
            return Err(Error::Decode(format!(
                "expression {other:?} is not one nftproxy writes"
            )));
        }
    })
}

/// The generation id of a NEWGEN reply.
pub(crate) fn parse_generation(message: Message<'_>) -> Result<u32, Error> {
    let generation = GenObj::new();
    // SAFETY: a `Message` is a whole message of `nlmsg_len` readable bytes, borrowed for the call; `generation` is live.
    if unsafe { sys::nftnl_gen_nlmsg_parse(message.as_ptr(), generation.ptr()) } < 0 {
        return Err(Error::Decode("generation message".into()));
    }
    // SAFETY: `generation` is live; an unset attribute reads as 0.
    Ok(unsafe { sys::nftnl_gen_get_u32(generation.ptr(), sys::NFTNL_GEN_ID as u16) })
}

/// A table header parsed from a GETTABLE reply: its comment.
pub(crate) fn parse_table(message: Message<'_>) -> Result<(String, Option<String>), Error> {
    let table = TableObj::new();
    // SAFETY: a `Message` is a whole message of `nlmsg_len` readable bytes, borrowed for the call; `table` is live.
    if unsafe { sys::nftnl_table_nlmsg_parse(message.as_ptr(), table.ptr()) } < 0 {
        return Err(Error::Decode("table message".into()));
    }
    // SAFETY: `table` is live.
    let name =
        owned_str(unsafe { sys::nftnl_table_get_str(table.ptr(), sys::NFTNL_TABLE_NAME as u16) })
            .unwrap_or_default();
    let mut len = 0u32;
    // SAFETY: `table` is live; the buffer holds `len` bytes while it lives.
    let ptr = unsafe {
        sys::nftnl_table_get_data(table.ptr(), sys::NFTNL_TABLE_USERDATA as u16, &mut len)
    };
    let comment = if ptr.is_null() {
        None
    } else {
        // SAFETY: valid for `len` bytes; copied before `table` is dropped.
        let data = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize) };
        comment_of(data, sys::NFTNL_UDATA_TABLE_COMMENT as u8)
    };
    Ok((name, comment))
}

/// A chain parsed from a GETCHAIN reply, with the table it belongs to.
pub(crate) fn parse_chain(message: Message<'_>) -> Result<(String, Chain), Error> {
    let chain = ChainObj::new();
    // SAFETY: a `Message` is a whole message of `nlmsg_len` readable bytes, borrowed for the call; `chain` is live.
    if unsafe { sys::nftnl_chain_nlmsg_parse(message.as_ptr(), chain.ptr()) } < 0 {
        return Err(Error::Decode("chain message".into()));
    }
    let p = chain.ptr();
    // SAFETY: `chain` is live for all these reads.
    let (table, name, base) = unsafe {
        let table = owned_str(sys::nftnl_chain_get_str(p, sys::NFTNL_CHAIN_TABLE as u16))
            .unwrap_or_default();
        let name = owned_str(sys::nftnl_chain_get_str(p, sys::NFTNL_CHAIN_NAME as u16))
            .unwrap_or_default();
        let base = if sys::nftnl_chain_is_set(p, sys::NFTNL_CHAIN_HOOKNUM as u16) {
            let hook = hook_of(sys::nftnl_chain_get_u32(p, sys::NFTNL_CHAIN_HOOKNUM as u16));
            let chain_type =
                match owned_str(sys::nftnl_chain_get_str(p, sys::NFTNL_CHAIN_TYPE as u16))
                    .as_deref()
                {
                    Some("filter") => Some(ChainType::Filter),
                    Some("nat") => Some(ChainType::Nat),
                    _ => None,
                };
            let policy = sys::nftnl_chain_get_u32(p, sys::NFTNL_CHAIN_POLICY as u16);
            match (hook, chain_type) {
                (Some(hook), Some(chain_type)) if policy == libc::NF_ACCEPT as u32 => {
                    Some(BaseChain {
                        chain_type,
                        hook,
                        priority: Priority(sys::nftnl_chain_get_s32(
                            p,
                            sys::NFTNL_CHAIN_PRIO as u16,
                        )),
                    })
                }
                _ => {
                    return Err(Error::Decode(format!(
                        "base chain {name} is not one nftproxy writes"
                    )));
                }
            }
        } else {
            None
        };
        (table, name, base)
    };
    Ok((
        table,
        Chain {
            name,
            base,
            rules: Vec::new(),
        },
    ))
}

/// A GETRULE reply parsed, with the rule's table and chain.
fn rule_message(message: Message<'_>) -> Result<(RuleObj, String, String), Error> {
    let rule = RuleObj::new();
    // SAFETY: a `Message` is a whole message of `nlmsg_len` readable bytes, borrowed for the call; `rule` is live.
    if unsafe { sys::nftnl_rule_nlmsg_parse(message.as_ptr(), rule.ptr()) } < 0 {
        return Err(Error::Decode("rule message".into()));
    }
    let p = rule.ptr();
    // SAFETY: `rule` is live for these reads.
    let (table, chain) = unsafe {
        (
            owned_str(sys::nftnl_rule_get_str(p, sys::NFTNL_RULE_TABLE as u16)).unwrap_or_default(),
            owned_str(sys::nftnl_rule_get_str(p, sys::NFTNL_RULE_CHAIN as u16)).unwrap_or_default(),
        )
    };
    Ok((rule, table, chain))
}

/// Table, chain and handle of a rule in a GETRULE reply (its expressions unread).
pub(crate) fn parse_rule_handle(message: Message<'_>) -> Result<(String, String, u64), Error> {
    let (rule, table, chain) = rule_message(message)?;
    // SAFETY: `rule` is live.
    let handle = unsafe { sys::nftnl_rule_get_u64(rule.ptr(), sys::NFTNL_RULE_HANDLE as u16) };
    Ok((table, chain, handle))
}

/// A rule parsed from a GETRULE reply: table, chain and the rule.
pub(crate) fn parse_rule(
    message: Message<'_>,
    family: Family,
) -> Result<(String, String, Rule), Error> {
    let (rule, table, chain) = rule_message(message)?;
    let p = rule.ptr();
    let mut raw = Vec::new();
    // SAFETY: the iterator borrows the live rule and is destroyed below.
    let iter = unsafe { sys::nftnl_expr_iter_create(p) };
    if iter.is_null() {
        return Err(Error::Decode("rule expression iterator".into()));
    }
    loop {
        // SAFETY: `iter` is live; it returns null at the end.
        let expr = unsafe { sys::nftnl_expr_iter_next(iter) };
        if expr.is_null() {
            break;
        }
        match raw_expr(expr) {
            Ok(e) => raw.push(e),
            Err(e) => {
                // SAFETY: `iter` is live and destroyed once.
                unsafe { sys::nftnl_expr_iter_destroy(iter) };
                return Err(e);
            }
        }
    }
    // SAFETY: `iter` is live and destroyed once.
    unsafe { sys::nftnl_expr_iter_destroy(iter) };
    let stmts = lower::raise(family, &raw)
        .map_err(|e| Error::Decode(format!("a rule in chain {chain}: {e}")))?;
    let mut len = 0u32;
    // SAFETY: `rule` is live; the buffer holds `len` bytes while it lives.
    let ptr = unsafe { sys::nftnl_rule_get_data(p, sys::NFTNL_RULE_USERDATA as u16, &mut len) };
    let comment = if ptr.is_null() {
        None
    } else {
        // SAFETY: valid for `len` bytes; copied before `rule` is dropped.
        comment_of(
            unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize) },
            sys::NFTNL_UDATA_RULE_COMMENT as u8,
        )
    };
    Ok((
        table,
        chain,
        Rule {
            stmts: stmts.into(),
            comment,
        },
    ))
}

/// A set declaration parsed from a GETSET reply, with its table.
pub(crate) fn parse_set(message: Message<'_>) -> Result<(String, Set), Error> {
    let set = SetObj::new();
    // SAFETY: a `Message` is a whole message of `nlmsg_len` readable bytes, borrowed for the call; `set` is live.
    if unsafe { sys::nftnl_set_nlmsg_parse(message.as_ptr(), set.ptr()) } < 0 {
        return Err(Error::Decode("set message".into()));
    }
    let p = set.ptr();
    // SAFETY: `set` is live for these reads; buffers are copied before it is dropped.
    unsafe {
        let table =
            owned_str(sys::nftnl_set_get_str(p, sys::NFTNL_SET_TABLE as u16)).unwrap_or_default();
        let name =
            owned_str(sys::nftnl_set_get_str(p, sys::NFTNL_SET_NAME as u16)).unwrap_or_default();
        let flags = sys::nftnl_set_get_u32(p, sys::NFTNL_SET_FLAGS as u16);
        let key = lower::key_types(sys::nftnl_set_get_u32(p, sys::NFTNL_SET_KEY_TYPE as u16))
            .map_err(|e| Error::Decode(format!("set {name}: {e}")))?;
        let is_map = flags & libc::NFT_SET_MAP as u32 != 0;
        let data = match sys::nftnl_set_get_u32(p, sys::NFTNL_SET_DATA_TYPE as u16) {
            _ if !is_map => Vec::new(),
            libc::NFT_DATA_VERDICT => vec![DataType::Verdict],
            id => lower::key_types(id).map_err(|e| Error::Decode(format!("map {name}: {e}")))?,
        };
        let timeout = (flags & libc::NFT_SET_TIMEOUT as u32 != 0)
            .then(|| (sys::nftnl_set_get_u64(p, sys::NFTNL_SET_TIMEOUT as u16) / 1000) as u32);
        let size = sys::nftnl_set_is_set(p, sys::NFTNL_SET_DESC_SIZE as u16)
            .then(|| sys::nftnl_set_get_u32(p, sys::NFTNL_SET_DESC_SIZE as u16));
        let mut len = 0u32;
        let ptr = sys::nftnl_set_get_data(p, sys::NFTNL_SET_USERDATA as u16, &mut len);
        let udata: &[u8] = if ptr.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize)
        };
        let comment = comment_of(udata, sys::NFTNL_UDATA_SET_COMMENT as u8);
        let typeof_entry = |kind: u32| {
            userdata_entry(udata, kind as u8)
                .map(lower::typeof_exprs)
                .transpose()
                .map_err(|e| Error::Decode(format!("set {name}: {e}")))
        };
        let type_of = match typeof_entry(sys::NFTNL_UDATA_SET_KEY_TYPEOF)? {
            Some(key) => Some(TypeOf {
                key,
                data: typeof_entry(sys::NFTNL_UDATA_SET_DATA_TYPEOF)?.unwrap_or_default(),
            }),
            None => None,
        };
        let mut decoded = Set::new(name, key);
        decoded.data = data;
        decoded.type_of = type_of;
        decoded.dynamic = flags & libc::NFT_SET_EVAL as u32 != 0;
        decoded.timeout = timeout;
        // A set without a size gets 65,535 from the kernel when an `update` binds it
        // (nft_dynset_init), without its hash table being sized for that: it is the
        // kernel's default, not something the set was created with.
        decoded.size = size.filter(|s| *s != 0 && !(decoded.dynamic && *s == DYNSET_DEFAULT_SIZE));
        decoded.comment = comment;
        Ok((table, decoded))
    }
}

/// The elements of a GETSETELEM reply, decoded with the set's key types.
pub(crate) fn parse_elements(message: Message<'_>, set: &Set) -> Result<Vec<Element>, Error> {
    let obj = SetObj::new();
    // SAFETY: a `Message` is a whole message of `nlmsg_len` readable bytes, borrowed for the call; `obj` is live.
    if unsafe { sys::nftnl_set_elems_nlmsg_parse(message.as_ptr(), obj.ptr()) } < 0 {
        return Err(Error::Decode(format!("elements of {}", set.name)));
    }
    let mut elements = Vec::new();
    // SAFETY: the iterator borrows the live set and is destroyed below.
    let iter = unsafe { sys::nftnl_set_elems_iter_create(obj.ptr()) };
    if iter.is_null() {
        return Ok(elements);
    }
    let mut result = Ok(());
    loop {
        // SAFETY: `iter` is live; it returns null at the end.
        let elem = unsafe { sys::nftnl_set_elems_iter_next(iter) };
        if elem.is_null() {
            break;
        }
        match parse_element(elem, set) {
            Ok(element) => elements.push(element),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // SAFETY: `iter` is live and destroyed once.
    unsafe { sys::nftnl_set_elems_iter_destroy(iter) };
    result.map(|()| elements)
}

fn parse_element(elem: *mut sys::nftnl_set_elem, set: &Set) -> Result<Element, Error> {
    let data = |attr: u32| {
        let mut len = 0u32;
        // SAFETY: `elem` is live (owned by the set being iterated); copied out.
        let ptr = unsafe { sys::nftnl_set_elem_get(elem, attr as u16, &mut len) };
        if ptr.is_null() {
            None
        } else {
            // SAFETY: valid for `len` bytes while the set lives.
            Some(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize) }.to_vec())
        }
    };
    let key_bytes = data(sys::NFTNL_SET_ELEM_KEY)
        .ok_or_else(|| Error::Decode(format!("element of {} without a key", set.name)))?;
    let key = lower::key_values(&set.key, &key_bytes)
        .map_err(|e| Error::Decode(format!("element of {}: {e}", set.name)))?;
    let value = if set.is_map() && set.data != [DataType::Verdict] {
        let bytes = data(sys::NFTNL_SET_ELEM_DATA)
            .ok_or_else(|| Error::Decode(format!("element of {} without a value", set.name)))?;
        lower::key_values(&set.data, &bytes)
            .map_err(|e| Error::Decode(format!("element of {}: {e}", set.name)))?
    } else {
        Vec::new()
    };
    let verdict = if set.data == [DataType::Verdict] {
        // SAFETY: `elem` is live (owned by the set being iterated).
        let code =
            unsafe { sys::nftnl_set_elem_get_u32(elem, sys::NFTNL_SET_ELEM_VERDICT as u16) } as i32;
        // SAFETY: `elem` is live.
        let chain = owned_str(unsafe {
            sys::nftnl_set_elem_get_str(elem, sys::NFTNL_SET_ELEM_CHAIN as u16)
        });
        Some(verdict_of(code, chain)?)
    } else {
        None
    };
    let comment = data(sys::NFTNL_SET_ELEM_USERDATA)
        .and_then(|d| comment_of(&d, sys::NFTNL_UDATA_SET_ELEM_COMMENT as u8));
    let mut element = match verdict {
        Some(verdict) => Element::with_verdict(key, verdict),
        None => Element::mapped(key, value),
    };
    element.set_comment(comment);
    Ok(element)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userdata_round_trips() {
        let data = userdata(&[(0, &comment_bytes("hello")), (7, &[1, 2])]);
        assert_eq!(data, [0, 6, b'h', b'e', b'l', b'l', b'o', 0, 7, 2, 1, 2]);
        assert_eq!(comment_of(&data, 0).as_deref(), Some("hello"));
        assert_eq!(userdata_entry(&data, 7), Some(&[1u8, 2][..]));
        assert_eq!(userdata_entry(&data, 3), None);
    }

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
