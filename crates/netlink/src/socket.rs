//! The netfilter netlink socket: opened with mnl, written with one `sendmsg` per batch,
//! read without blocking after a batch and until `NLMSG_DONE` for dumps.
//!
//! Invariant: a batch leaves in a single `sendmsg` (the kernel only treats BEGIN..END as
//! one transaction within one message buffer), with the send buffer forced large enough.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use crate::{Error, attr};

/// Large enough for a whole dump reply page and many error messages.
const RECV_BUFFER: usize = 1 << 20;
const NLMSG_HDRLEN: usize = 16;

pub(crate) struct Socket {
    inner: mnl::Socket,
    recv: Vec<u8>,
}

// SAFETY: an `mnl_socket` is a file descriptor and its bound address, owned by this
// value alone; libmnl keeps no per-thread state, so the owner may move to another thread
// (the sync loop reads the kernel on one while it builds on another). Not `Sync`: one
// owner sends and receives at a time.
unsafe impl Send for Socket {}

/// One whole netlink message, borrowed from the buffer it was received into: at least a
/// header long, and exactly as long as its header says. The borrow keeps the buffer from
/// being received into again while the message is read.
#[derive(Clone, Copy)]
pub(crate) struct Message<'buf>(&'buf [u8]);

impl<'buf> Message<'buf> {
    /// The first message of `bytes`, when `bytes` begins with a whole one.
    fn first(bytes: &'buf [u8]) -> Option<Message<'buf>> {
        let header = bytes.get(..NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        (len >= NLMSG_HDRLEN)
            .then(|| bytes.get(..len))
            .flatten()
            .map(Message)
    }

    /// The whole messages at the start of `bytes`, in order, up to the first that is
    /// not whole.
    pub(crate) fn all(bytes: &'buf [u8]) -> AllMessages<'buf> {
        AllMessages { rest: bytes }
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

    fn seq(&self) -> u32 {
        u32::from_ne_bytes([self.0[8], self.0[9], self.0[10], self.0[11]])
    }

    /// The netlink port of the sender (of the program that committed, in a
    /// notification).
    fn portid(&self) -> u32 {
        u32::from_ne_bytes([self.0[12], self.0[13], self.0[14], self.0[15]])
    }
}

/// Hands `each` every whole message of a buffer of them (written by this crate's
/// encoder, say).
#[cfg(test)]
pub(crate) fn each_message(bytes: &[u8], each: impl FnMut(Message<'_>)) {
    Message::all(bytes).for_each(each);
}

/// See [`Message::all`].
pub(crate) struct AllMessages<'buf> {
    rest: &'buf [u8],
}

impl<'buf> AllMessages<'buf> {
    /// What follows the last whole message.
    fn rest(&self) -> &'buf [u8] {
        self.rest
    }
}

impl<'buf> Iterator for AllMessages<'buf> {
    type Item = Message<'buf>;

    fn next(&mut self) -> Option<Message<'buf>> {
        let message = Message::first(self.rest)?;
        let next = message.bytes().len().div_ceil(4) * 4;
        self.rest = self.rest.get(next..).unwrap_or_default();
        Some(message)
    }
}

/// One message received: what kind, and its contents where they matter; each answers
/// the request with its sequence number.
pub(crate) enum Reply<'buf> {
    /// `NLMSG_ERROR` with a non-zero error for the message with this sequence number.
    Error { seq: u32, errno: i32 },
    /// `NLMSG_DONE`.
    Done { seq: u32 },
    /// A data message.
    Data {
        message: Message<'buf>,
        interrupted: bool,
    },
    /// An acknowledgement.
    Ack { seq: u32 },
}

impl<'buf> Reply<'buf> {
    /// What `message` is.
    pub(crate) fn of(message: Message<'buf>) -> Reply<'buf> {
        let body = &message.bytes()[NLMSG_HDRLEN..];
        match i32::from(message.kind()) {
            libc::NLMSG_DONE => Reply::Done { seq: message.seq() },
            libc::NLMSG_ERROR => {
                let errno = body
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                // The header of the message the error answers follows the errno.
                let seq = body
                    .get(12..16)
                    .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                if errno == 0 {
                    Reply::Ack { seq }
                } else {
                    Reply::Error { seq, errno: -errno }
                }
            }
            _ => Reply::Data {
                message,
                interrupted: message.flags() & libc::NLM_F_DUMP_INTR as u16 != 0,
            },
        }
    }

    /// The sequence number of the request this answers.
    pub(crate) fn seq(&self) -> u32 {
        match self {
            Reply::Error { seq, .. } | Reply::Done { seq } | Reply::Ack { seq } => *seq,
            Reply::Data { message, .. } => message.seq(),
        }
    }
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
            recv: vec![0; RECV_BUFFER],
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

    /// Receives one datagram into the buffer: its length; `None` when it came from
    /// another process than the kernel (a process with CAP_NET_ADMIN may send to any
    /// port): it is dropped unread, so that only the kernel's replies are ever parsed.
    fn receive_from_kernel(&mut self, flags: i32) -> io::Result<Option<usize>> {
        let fd = self.inner.as_raw_fd();
        let len = self.recv.len();
        // SAFETY: an all-zero sockaddr_nl is a valid value.
        let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut from_len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: the buffer is `len` writable bytes owned by `self`; `from` is a live
        // sockaddr_nl whose size is passed.
        let got = unsafe {
            libc::recvfrom(
                fd,
                self.recv.as_mut_ptr().cast(),
                len,
                flags,
                (&raw mut from).cast(),
                &mut from_len,
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((from.nl_pid == 0).then_some((got as usize).min(len)))
    }

    /// The first `len` bytes of the buffer, as the last receive left them.
    fn received(&self, len: usize) -> &[u8] {
        &self.recv[..len.min(self.recv.len())]
    }

    /// Receives one buffer of replies; `None` when `nonblocking` and nothing is queued.
    /// The replies borrow the buffer until they are dropped.
    pub(crate) fn receive(&mut self, nonblocking: bool) -> Result<Option<Vec<Reply<'_>>>, Error> {
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        let got = match self.receive_from_kernel(flags) {
            Ok(Some(got)) => got,
            Ok(None) => return Ok(Some(Vec::new())),
            Err(error) => {
                return match error.raw_os_error() {
                    Some(libc::EAGAIN) if nonblocking => Ok(None),
                    Some(libc::ENOBUFS) => Err(Error::Unknown),
                    _ => Err(error.into()),
                };
            }
        };
        let bytes = self.received(got);
        let mut messages = Message::all(bytes);
        let replies = messages.by_ref().map(Reply::of).collect();
        if messages.rest().len() >= NLMSG_HDRLEN {
            return Err(Error::Decode("truncated netlink reply".into()));
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
            match self.receive_from_kernel(libc::MSG_DONTWAIT) {
                Ok(Some(got)) => parse_notifications(self.received(got), &mut notifications),
                Ok(None) => {}
                Err(error) => {
                    return match error.raw_os_error() {
                        Some(libc::EAGAIN) => Ok(Some(notifications)),
                        Some(libc::ENOBUFS) => Ok(None),
                        _ => Err(error.into()),
                    };
                }
            }
        }
    }
}

/// The receive buffer of the notification listener: room for the announcements of a
/// commit of tens of thousands of objects between two reads.
const LISTENER_BUFFER: i32 = 16 << 20;

/// One nf_tables notification: the table of the object, and who committed it.
#[derive(Debug)]
pub(crate) struct Notification {
    pub(crate) table: Option<String>,
    pub(crate) portid: u32,
}

/// The nf_tables object notifications in a receive buffer (the generation announcement,
/// which names no table, is skipped).
pub(crate) fn parse_notifications(bytes: &[u8], out: &mut Vec<Notification>) {
    for message in Message::all(bytes) {
        let kind = message.kind();
        let subsystem = i32::from(kind >> 8);
        if subsystem != libc::NFNL_SUBSYS_NFTABLES || i32::from(kind & 0xff) == libc::NFT_MSG_NEWGEN
        {
            continue;
        }
        // After the header and the 4-byte nfgenmsg: attributes; the first kind of every
        // object message (NFTA_*_TABLE, NFTA_TABLE_NAME) names the table.
        let attributes = message.bytes().get(NLMSG_HDRLEN + 4..).unwrap_or_default();
        out.push(Notification {
            table: attr::find(attributes, 1).map(attr::text),
            portid: message.portid(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn a_message_is_whole_or_not_at_all() {
        // nlmsg_len 20: a header and four bytes, followed by the next message.
        let buffer = bytes(&[20, 0x0003_0000, 7, 0, 0xdead_beef, 16, 3, 8, 0]);
        let message = Message::first(&buffer).expect("a whole message");
        assert_eq!(message.bytes().len(), 20);
        assert_eq!(message.kind(), 0);
        assert_eq!(message.flags(), 3);
        assert_eq!(message.seq(), 7);
        let all: Vec<usize> = Message::all(&buffer).map(|m| m.bytes().len()).collect();
        assert_eq!(all, [20, 16]);
        // Claims more bytes than there are.
        assert!(Message::first(&bytes(&[64, 0, 0, 0, 0])).is_none());
        // Claims less than a header.
        assert!(Message::first(&bytes(&[8, 0, 0, 0])).is_none());
        // Fewer bytes than a header.
        assert!(Message::first(&buffer[..12]).is_none());
        // A message cut short ends the walk.
        let mut cut = Message::all(&buffer[..30]);
        assert_eq!(cut.by_ref().count(), 1);
        assert_eq!(cut.rest().len(), 10);
    }

    /// Another process (with CAP_NET_ADMIN, which may send to any port) sends a reply-
    /// shaped message to our socket: it is dropped unread, and the kernel's own reply
    /// still comes through.
    #[test]
    fn only_the_kernel_is_heard() {
        if !nftproxy_testkit::kernel_available("only_the_kernel_is_heard") {
            return;
        }
        let mut ours = Socket::open().expect("socket");
        let other = Socket::open().expect("socket");
        // An error reply for sequence number 7, as the kernel would write it.
        let forged = bytes(&[36, 2, 7, 0, (-1i32) as u32, 20, 0, 7, 0]);
        let mut to: libc::sockaddr_nl = unsafe_zeroed();
        to.nl_family = libc::AF_NETLINK as u16;
        to.nl_pid = ours.portid();
        // SAFETY: `forged` and `to` are live for the call, their sizes passed.
        let sent = unsafe {
            libc::sendto(
                other.inner.as_raw_fd(),
                forged.as_ptr().cast(),
                forged.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        assert_eq!(
            sent,
            forged.len() as isize,
            "{}",
            io::Error::last_os_error()
        );
        let heard = ours.receive(true).expect("receive").map(|r| r.len());
        assert_eq!(heard, Some(0), "the forged message is dropped");
        assert!(ours.receive(true).expect("receive").is_none());
    }

    fn unsafe_zeroed() -> libc::sockaddr_nl {
        // SAFETY: an all-zero sockaddr_nl is a valid value.
        unsafe { std::mem::zeroed() }
    }
}
