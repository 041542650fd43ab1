//! The netfilter netlink socket: opened with mnl, written with one `sendmsg` per batch,
//! read without blocking after a batch and until `NLMSG_DONE` for dumps.
//!
//! Invariant: a batch leaves in a single `sendmsg` (the kernel only treats BEGIN..END as
//! one transaction within one message buffer), with the send buffer forced large enough.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use libc::nlmsghdr;

use crate::Error;

/// Large enough for a whole dump reply page and many error messages.
const RECV_BUFFER: usize = 1 << 20;
const NLMSG_HDRLEN: usize = 16;

pub(crate) struct Socket {
    inner: mnl::Socket,
    recv: Vec<u64>,
}

// SAFETY: an `mnl_socket` is a file descriptor and its bound address, owned by this
// value alone; libmnl keeps no per-thread state, so the owner may move to another thread
// (the sync loop reads the kernel on one while it builds on another). Not `Sync`: one
// owner sends and receives at a time.
unsafe impl Send for Socket {}

/// One whole netlink message, borrowed from the buffer it was received into: at least a
/// header long, exactly as long as its header says, and aligned for the header. The
/// borrow keeps the buffer from being received into again while the message is read.
#[derive(Clone, Copy)]
pub(crate) struct Message<'buf>(&'buf [u8]);

impl<'buf> Message<'buf> {
    /// The first message of `bytes`, when `bytes` begins with a whole one.
    fn first(bytes: &'buf [u8]) -> Option<Message<'buf>> {
        let header = bytes.get(..NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let aligned = bytes.as_ptr().align_offset(align_of::<nlmsghdr>()) == 0;
        (len >= NLMSG_HDRLEN && aligned)
            .then(|| bytes.get(..len))
            .flatten()
            .map(Message)
    }

    /// The message's bytes, header included.
    pub(crate) fn bytes(&self) -> &'buf [u8] {
        self.0
    }

    fn kind(&self) -> u16 {
        u16::from_ne_bytes([self.0[4], self.0[5]])
    }

    fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.0[6], self.0[7]])
    }

    /// The header, for libnftnl's parsers: it points at `nlmsg_len` readable bytes, as
    /// long as `'buf` lasts.
    pub(crate) fn as_ptr(&self) -> *const nlmsghdr {
        self.0.as_ptr().cast()
    }
}

/// One message received: what kind, and its contents where they matter.
pub(crate) enum Reply<'buf> {
    /// `NLMSG_ERROR` with a non-zero error for the message with this sequence number.
    Error { seq: u32, errno: i32 },
    /// `NLMSG_DONE`.
    Done,
    /// A data message.
    Data {
        message: Message<'buf>,
        interrupted: bool,
    },
    /// An acknowledgement.
    Ack,
}

fn setsockopt(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a live i32 and its size is passed; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Socket {
    /// A netfilter netlink socket.
    pub(crate) fn open() -> Result<Socket, Error> {
        Socket::open_on(mnl::Bus::Netfilter)
    }

    /// A netlink socket on `bus`.
    pub(crate) fn open_on(bus: mnl::Bus) -> Result<Socket, Error> {
        let inner = mnl::Socket::new(bus)?;
        let fd = inner.as_raw_fd();
        // Error replies carry only the header of the failed message, not all of it, and
        // may say which attribute was wrong.
        setsockopt(fd, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1)?;
        setsockopt(fd, libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1)?;
        setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            RECV_BUFFER as i32,
        )?;
        let timeout = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: `timeout` is a live timeval and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(Socket {
            inner,
            recv: vec![0; RECV_BUFFER / 8],
        })
    }

    /// Sends `bytes` as one message buffer.
    pub(crate) fn send(&self, bytes: &[u8]) -> Result<(), Error> {
        let fd = self.inner.as_raw_fd();
        // The kernel doubles the value; a batch must fit in the send buffer whole.
        let wanted = i32::try_from(bytes.len()).unwrap_or(i32::MAX).max(1 << 16);
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, wanted)?;
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // SAFETY: zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // SAFETY: `msg` points at one iovec covering `bytes`, which outlives the call.
        let sent = unsafe { libc::sendmsg(fd, &msg, 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error().into());
        }
        if sent as usize != bytes.len() {
            return Err(Error::Io(io::Error::other(format!(
                "sent {sent} of {} bytes",
                bytes.len()
            ))));
        }
        Ok(())
    }

    /// Receives one buffer of replies; `None` when `nonblocking` and nothing is queued.
    /// The replies borrow the buffer until they are dropped.
    pub(crate) fn receive(&mut self, nonblocking: bool) -> Result<Option<Vec<Reply<'_>>>, Error> {
        let fd = self.inner.as_raw_fd();
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        let len = self.recv.len() * 8;
        // SAFETY: the buffer is `len` writable bytes owned by `self`.
        let got = unsafe { libc::recv(fd, self.recv.as_mut_ptr().cast(), len, flags) };
        if got < 0 {
            let error = io::Error::last_os_error();
            return match error.raw_os_error() {
                Some(libc::EAGAIN) if nonblocking => Ok(None),
                Some(libc::ENOBUFS) => Err(Error::Unknown),
                _ => Err(error.into()),
            };
        }
        let got = (got as usize).min(len);
        // SAFETY: the u64 buffer holds `len` >= `got` initialised bytes (a Vec of zeros,
        // then what the kernel wrote), and `self` stays borrowed as long as the slice.
        let bytes = unsafe { std::slice::from_raw_parts(self.recv.as_ptr().cast::<u8>(), got) };
        let mut replies = Vec::new();
        let mut offset = 0;
        while offset + NLMSG_HDRLEN <= got {
            let message = Message::first(&bytes[offset..])
                .ok_or_else(|| Error::Decode("truncated netlink reply".into()))?;
            let body = &message.bytes()[NLMSG_HDRLEN..];
            replies.push(match i32::from(message.kind()) {
                libc::NLMSG_DONE => Reply::Done,
                libc::NLMSG_ERROR => {
                    let errno = body
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    let seq = body
                        .get(12..16)
                        .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    if errno == 0 {
                        Reply::Ack
                    } else {
                        Reply::Error { seq, errno: -errno }
                    }
                }
                _ => Reply::Data {
                    message,
                    interrupted: message.flags() & libc::NLM_F_DUMP_INTR as u16 != 0,
                },
            });
            offset += message.bytes().len().div_ceil(4) * 4;
        }
        Ok(Some(replies))
    }

    /// Joins the multicast group `group` of the socket's bus.
    pub(crate) fn join(&self, group: u32) -> Result<(), Error> {
        let group = i32::try_from(group).map_err(|_| Error::Encode("group".into()))?;
        setsockopt(
            self.inner.as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            group,
        )?;
        Ok(())
    }

    pub(crate) fn portid(&self) -> u32 {
        self.inner.portid()
    }

    /// A socket subscribed to nf_tables notifications (every commit in this network
    /// namespace announces each object it changed), with a large receive buffer.
    pub(crate) fn listener() -> Result<Socket, Error> {
        let socket = Socket::open()?;
        socket.listen(true)?;
        let fd = socket.inner.as_raw_fd();
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, LISTENER_BUFFER)?;
        Ok(socket)
    }

    /// Joins or leaves the nf_tables notification group (a listener that left misses
    /// what is committed meanwhile, and the kernel builds no notifications for nobody).
    pub(crate) fn listen(&self, on: bool) -> Result<(), Error> {
        let option = if on {
            libc::NETLINK_ADD_MEMBERSHIP
        } else {
            libc::NETLINK_DROP_MEMBERSHIP
        };
        setsockopt(
            self.inner.as_raw_fd(),
            libc::SOL_NETLINK,
            option,
            libc::NFNLGRP_NFTABLES,
        )?;
        Ok(())
    }

    /// Reads every queued notification without blocking: for each, the table it names
    /// and the netlink port of the program that committed it. `None` when the queue
    /// overflowed, so some were lost.
    pub(crate) fn notifications(&mut self) -> Result<Option<Vec<Notification>>, Error> {
        let mut notifications = Vec::new();
        loop {
            let fd = self.inner.as_raw_fd();
            let len = self.recv.len() * 8;
            // SAFETY: the buffer is `len` writable bytes owned by `self`.
            let got =
                unsafe { libc::recv(fd, self.recv.as_mut_ptr().cast(), len, libc::MSG_DONTWAIT) };
            if got < 0 {
                let error = io::Error::last_os_error();
                return match error.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(Some(notifications)),
                    Some(libc::ENOBUFS) => Ok(None),
                    _ => Err(error.into()),
                };
            }
            // SAFETY: the kernel wrote `got` bytes into the buffer.
            let bytes = unsafe {
                std::slice::from_raw_parts(self.recv.as_ptr().cast::<u8>(), got as usize)
            };
            parse_notifications(bytes, &mut notifications);
        }
    }
}

/// The receive buffer of the notification listener: room for the announcements of a
/// commit of tens of thousands of objects between two reads.
const LISTENER_BUFFER: i32 = 16 << 20;

/// One nf_tables notification: the table of the object, and who committed it.
pub(crate) struct Notification {
    pub(crate) table: Option<String>,
    pub(crate) portid: u32,
}

/// The nf_tables object notifications in a receive buffer (the generation announcement,
/// which names no table, is skipped).
fn parse_notifications(bytes: &[u8], out: &mut Vec<Notification>) {
    let word = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let half = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
    };
    let mut offset = 0;
    while let (Some(len), Some(kind), Some(portid)) =
        (word(offset), half(offset + 4), word(offset + 12))
    {
        let len = len as usize;
        if len < NLMSG_HDRLEN || offset + len > bytes.len() {
            return;
        }
        let subsystem = i32::from(kind >> 8);
        let message = i32::from(kind & 0xff);
        if subsystem == libc::NFNL_SUBSYS_NFTABLES && message != libc::NFT_MSG_NEWGEN {
            // After the header and the 4-byte nfgenmsg: attributes; the first kind of
            // every object message (NFTA_*_TABLE, NFTA_TABLE_NAME) names the table.
            let end = offset + len;
            let mut at = offset + NLMSG_HDRLEN + 4;
            let mut table = None;
            while let (Some(attr_len), Some(attr_kind)) = (half(at), half(at + 2)) {
                let attr_len = usize::from(attr_len);
                if attr_len < 4 || at + attr_len > end {
                    break;
                }
                if attr_kind & 0x3fff == 1 {
                    let value = &bytes[at + 4..at + attr_len];
                    let value = value.split(|b| *b == 0).next().unwrap_or_default();
                    table = Some(String::from_utf8_lossy(value).into_owned());
                    break;
                }
                at += attr_len.div_ceil(4) * 4;
            }
            out.push(Notification { table, portid });
        }
        offset += len.div_ceil(4) * 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `words` as native-endian bytes, in a buffer aligned for a header.
    fn aligned(words: &[u32]) -> Vec<u32> {
        words.to_vec()
    }

    fn bytes(buffer: &[u32]) -> &[u8] {
        // SAFETY: a u32 slice is readable as four times as many bytes.
        unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast(), buffer.len() * 4) }
    }

    #[test]
    fn a_message_is_whole_or_not_at_all() {
        // nlmsg_len 20: a header and four bytes, followed by the next message.
        let buffer = aligned(&[20, 0x0003_0000, 7, 0, 0xdead_beef, 16, 3, 8, 0]);
        let message = Message::first(bytes(&buffer)).expect("a whole message");
        assert_eq!(message.bytes().len(), 20);
        assert_eq!(message.kind(), 0);
        assert_eq!(message.flags(), 3);
        // Claims more bytes than there are.
        let long = aligned(&[64, 0, 0, 0, 0]);
        assert!(Message::first(bytes(&long)).is_none());
        // Claims less than a header.
        let short = aligned(&[8, 0, 0, 0]);
        assert!(Message::first(bytes(&short)).is_none());
        // Fewer bytes than a header.
        assert!(Message::first(&bytes(&buffer)[..12]).is_none());
        // The same whole message, aligned for a header and not.
        let mut raw = [0u8; 24];
        let aligned_at = raw.as_ptr().align_offset(4);
        for (at, whole) in [(aligned_at, true), (aligned_at + 2, false)] {
            raw.fill(0);
            raw[at..at + 4].copy_from_slice(&16u32.to_ne_bytes());
            assert_eq!(Message::first(&raw[at..]).is_some(), whole, "at {at}");
        }
    }
}
