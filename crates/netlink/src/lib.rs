//! nftproxy's kernel edge: [`Transaction`](nftproxy_nft::Transaction)s encoded as
//! nf_tables netlink batches through libnftnl, sent over a netfilter netlink socket, and
//! our own tables read back into [`Table`](nftproxy_nft::Table)s.
//!
//! Invariant: one transaction is one batch in one `sendmsg`, applied by the kernel all or
//! nothing; only tables named by the caller are ever read or written.
//!
//! `unsafe` is allowed in three modules only: `ffi` (libnftnl), `socket` (the netlink
//! socket and its receive buffer) and `netns` (`setns`/`unshare`); the crate denies it
//! elsewhere, and every other crate forbids it. Replies are handed on as a `Message`,
//! a whole message borrowed from the receive buffer, so a parser can neither read past
//! a message nor keep it past the next receive.
//!
//! libnftnl (through `nftnl-sys`) encodes and parses every object, so the bytecode is the
//! same that `nft` writes; the `nftnl` crate's own object layer is not used, because it
//! hard-codes NLM_F_ACK on every message (an acknowledgement flood on large batches) and
//! has no maps or concatenations.

mod addresses;
mod attr;
mod backend;
mod conntrack;
mod ffi;
#[cfg(test)]
mod fuzz;
pub mod lower;
pub mod netns;
mod reply;
mod socket;
mod udata;

pub use addresses::{AddressWatch, InterfaceAddress, InterfaceAddresses, interface_addresses};
pub use backend::{ForeignChain, ForeignRemoval, ForeignRule, NetlinkBackend};
pub use conntrack::ConntrackSocket;
pub use ffi::rule_bytecode;

/// What can go wrong talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket itself failed.
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    /// The kernel refused an operation; the whole batch was rolled back.
    #[error("{op}: {name} ({message}){}", if *more > 0 { format!(" and {more} more errors") } else { String::new() })]
    Kernel {
        /// The operation, e.g. "add rule in chain X `…`".
        op: String,
        /// The errno.
        errno: i32,
        /// Its symbolic name.
        name: &'static str,
        /// Its description.
        message: String,
        /// How many further operations failed in the same batch.
        more: usize,
    },
    /// Something could not be encoded.
    #[error("cannot encode {0}")]
    Encode(String),
    /// What the kernel holds is not something nftproxy wrote.
    #[error("cannot read back: {0}")]
    Decode(String),
    /// Replies were lost (receive buffer overrun): whether the batch committed is unknown.
    #[error("kernel replies were lost; the outcome of the transaction is unknown")]
    Unknown,
    /// The ruleset changed while it was being read.
    #[error("the ruleset changed while it was being read")]
    Interrupted,
    /// The table is not what the transaction was planned against.
    #[error("the table changed behind our back: {0}")]
    Conflict(String),
}

impl nftproxy_nft::BackendError for Error {
    fn kind(&self) -> nftproxy_nft::ErrorKind {
        use nftproxy_nft::ErrorKind;
        match self {
            Error::Io(error) => match error.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => ErrorKind::Permission,
                _ => ErrorKind::Io,
            },
            Error::Kernel { errno, .. } => match *errno {
                libc::ENOENT => ErrorKind::NotFound,
                libc::EEXIST => ErrorKind::Exists,
                libc::EBUSY | libc::EAGAIN | libc::EINTR | libc::ERESTART => ErrorKind::Busy,
                libc::EPERM | libc::EACCES => ErrorKind::Permission,
                libc::ENOBUFS | libc::ENOMEM => ErrorKind::Io,
                _ => ErrorKind::Refused,
            },
            Error::Encode(_) => ErrorKind::Refused,
            Error::Decode(_) => ErrorKind::Foreign,
            Error::Unknown => ErrorKind::Io,
            Error::Interrupted => ErrorKind::Busy,
            Error::Conflict(_) => ErrorKind::Conflict,
        }
    }
}

impl Error {
    pub(crate) fn kernel(op: String, errno: i32) -> Error {
        Error::Kernel {
            op,
            errno,
            name: errno_name(errno),
            message: std::io::Error::from_raw_os_error(errno).to_string(),
            more: 0,
        }
    }

    /// The object does not exist.
    pub fn is_not_found(&self) -> bool {
        nftproxy_nft::BackendError::kind(self) == nftproxy_nft::ErrorKind::NotFound
    }

    /// The errno of a kernel error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
            Error::Io(error) => error.raw_os_error(),
            _ => None,
        }
    }
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ENOMEM => "ENOMEM",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::E2BIG => "E2BIG",
        libc::ERANGE => "ERANGE",
        libc::ELOOP => "ELOOP",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::ENOBUFS => "ENOBUFS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENFILE => "ENFILE",
        _ => "errno",
    }
}
