//! libnftnl objects built from nftproxy's types and encoded into netlink messages
//! ([`encode`]), with their expressions ([`expr`]); this module owns the objects, and the
//! guarded buffer messages are written into. Replies are not read with libnftnl (its
//! parsers end the process on an attribute they do not expect): [`crate::reply`] reads
//! them. With its children, one of the three modules that hold `unsafe` (with `socket`
//! and `netns`); the others of this crate, like every other crate, have none.
//!
//! Invariant: every libnftnl object is owned by exactly one Rust value (freed on drop) or
//! handed to a parent that frees it (expressions to rules, elements to sets); every
//! pointer passed to libnftnl is valid for the duration of the call, and every string is
//! NUL-terminated.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::raw::c_char;
use std::ptr::NonNull;

use nftnl_sys as sys;
use nftproxy_nft::{BaseChain, DataType, Element, Family, Hook, Rule, Set, Verdict};

use crate::Error;
use crate::lower::{self, RawExpr};

/// nft's `BYTEORDER_BIG_ENDIAN`, recorded for address keys.
const BYTEORDER_BIG_ENDIAN: u32 = 2;
/// Nested attributes have 16-bit lengths: a message must stay below this.
pub(crate) const MESSAGE_MAX: usize = 65_535;

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
    SetObj,
    sys::nftnl_set,
    sys::nftnl_set_alloc,
    sys::nftnl_set_free
);
owned!(
    ElemObj,
    sys::nftnl_set_elem,
    sys::nftnl_set_elem_alloc,
    sys::nftnl_set_elem_free
);

impl ElemObj {
    /// Hands the element over (to a set, which frees it).
    fn into_raw(self) -> *mut sys::nftnl_set_elem {
        let ptr = self.ptr();
        std::mem::forget(self);
        ptr
    }
}

/// Where libnftnl writes one message: `MESSAGE_MAX + 1` writable bytes that end where an
/// inaccessible guard page begins. libnftnl does not bound its writes; a message is only
/// written once its bound is known to fit, and should that bound ever be wrong, the
/// first byte written past the area faults instead of overwriting the heap.
struct Scratch {
    /// The mapping: the area's pages, then the guard page.
    mapping: NonNull<libc::c_void>,
    mapped: usize,
    /// Where the area starts, inside the mapping.
    area: NonNull<u8>,
}

/// The bytes of the scratch area.
const SCRATCH: usize = MESSAGE_MAX + 1;

impl Scratch {
    fn new() -> Result<Scratch, Error> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        let usable = SCRATCH.div_ceil(page) * page;
        let mapped = usable + page;
        // SAFETY: an anonymous private mapping at an address of the kernel's choice
        // touches no existing memory; failure is checked.
        let mapping = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let Some(mapping) = NonNull::new(mapping).filter(|m| m.as_ptr() != libc::MAP_FAILED) else {
            return Err(std::io::Error::last_os_error().into());
        };
        let scratch = Scratch {
            mapping,
            mapped,
            // SAFETY: `usable - SCRATCH` is less than `usable`, inside the mapping.
            area: unsafe { mapping.cast::<u8>().add(usable - SCRATCH) },
        };
        // SAFETY: the last page of the mapping just made; nothing refers to it.
        let guarded = unsafe {
            libc::mprotect(
                mapping.as_ptr().cast::<u8>().add(usable).cast(),
                page,
                libc::PROT_NONE,
            )
        };
        if guarded != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(scratch)
    }

    /// The start of the area, for libnftnl to write a message at.
    fn as_mut_ptr(&mut self) -> *mut c_char {
        self.area.as_ptr().cast()
    }

    /// The area's bytes (a message written, and what follows it).
    fn written(&self) -> &[u8] {
        // SAFETY: the area is SCRATCH readable bytes of the mapping, initialised (an
        // anonymous mapping is zeroed), and borrowed with `self`.
        unsafe { std::slice::from_raw_parts(self.area.as_ptr(), SCRATCH) }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `Scratch::new` with this length, and is
        // unmapped once.
        unsafe { libc::munmap(self.mapping.as_ptr(), self.mapped) };
    }
}

fn cstring(text: &str) -> Result<CString, Error> {
    CString::new(text).map_err(|_| Error::Encode(format!("{text:?} contains a NUL byte")))
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

fn verdict_code(verdict: &Verdict) -> i32 {
    match verdict {
        Verdict::Accept => libc::NF_ACCEPT,
        Verdict::Drop => libc::NF_DROP,
        Verdict::Return => libc::NFT_RETURN,
        Verdict::Jump(_) => libc::NFT_JUMP,
        Verdict::Goto(_) => libc::NFT_GOTO,
    }
}

mod encode;
mod expr;

pub(crate) use encode::Messages;
pub use encode::rule_bytecode;
