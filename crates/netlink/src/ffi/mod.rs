//! libnftnl objects built from nftproxy's types, encoded into netlink messages
//! ([`encode`]), their expressions ([`expr`]), and replies parsed back ([`parse`]); this
//! module owns the objects and the helpers all three share. With its children, one of
//! the three modules that hold `unsafe` (with `socket` and `netns`); the others of this
//! crate, like every other crate, have none.
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
    BaseChain, Chain, ChainType, Count, CountedRule, DataType, Element, Family, Hook, Priority,
    Rule, Set, TypeOf, Verdict,
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

mod encode;
mod expr;
mod parse;

pub(crate) use encode::Messages;
pub use encode::rule_bytecode;
pub(crate) use parse::{
    parse_chain, parse_counted_rule, parse_elements, parse_generation, parse_rule,
    parse_rule_handle, parse_rule_jumps, parse_set, parse_table,
};

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
}
