//! The addresses of this network namespace's interfaces, read over rtnetlink, and a
//! listener the kernel tells when one is added or removed: where NodePorts may be
//! accepted when `nodePortAddresses` names CIDRs.
//!
//! Invariant: read-only; every reply is parsed from the bounds-checked [`Message`] the
//! socket hands out, so this module holds no `unsafe`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::socket::{Message, Reply, Socket};
use crate::{Error, attr};

const NLMSG_HDRLEN: usize = 16;
/// `struct ifaddrmsg`: family, prefix length, flags, scope, interface index.
const IFADDRMSG_LEN: usize = 8;
/// `struct ifinfomsg`: family, pad, type, index, flags, change.
const IFINFOMSG_LEN: usize = 16;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFLA_IFNAME: u16 = 3;
/// `RTNLGRP_IPV4_IFADDR` and `RTNLGRP_IPV6_IFADDR`.
const ADDRESS_GROUPS: [u32; 2] = [5, 9];

/// One address of an interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InterfaceAddress {
    /// The address.
    pub address: IpAddr,
    /// The interface's name (`if7` when it has none any more).
    pub interface: String,
}

/// Every address of every interface of this network namespace, sorted.
pub fn interface_addresses() -> Result<Vec<InterfaceAddress>, Error> {
    InterfaceAddresses::open()?.read()
}

/// Reads the interface addresses over a socket opened once, so that reading them again
/// (after the kernel announced a change) needs no new file descriptor.
pub struct InterfaceAddresses {
    socket: Socket,
    seq: u32,
}

impl InterfaceAddresses {
    /// Opens the rtnetlink socket.
    pub fn open() -> Result<InterfaceAddresses, Error> {
        Ok(InterfaceAddresses {
            socket: Socket::open_on(mnl::Bus::Route)?,
            seq: 0,
        })
    }

    /// Every address of every interface of this network namespace, sorted.
    pub fn read(&mut self) -> Result<Vec<InterfaceAddress>, Error> {
        let mut names = Vec::new();
        self.dump(libc::RTM_GETLINK, IFINFOMSG_LEN, |message| {
            if let Some(link) = parse_link(message.bytes()) {
                names.push(link);
            }
        })?;
        let mut addresses = Vec::new();
        self.dump(libc::RTM_GETADDR, IFADDRMSG_LEN, |message| {
            if let Some((index, address)) = parse_address(message.bytes()) {
                let interface = names
                    .iter()
                    .find(|(i, _)| *i == index)
                    .map_or_else(|| format!("if{index}"), |(_, name)| name.clone());
                addresses.push(InterfaceAddress { address, interface });
            }
        })?;
        addresses.sort();
        addresses.dedup();
        Ok(addresses)
    }

    /// A dump request of `kind` (with a zeroed family header of `header_len` bytes:
    /// every family), its replies handed to `each`. Replies to an earlier request (one
    /// given up on after an error) are skipped by their sequence number.
    fn dump(
        &mut self,
        kind: u16,
        header_len: usize,
        mut each: impl FnMut(Message<'_>),
    ) -> Result<(), Error> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let len = NLMSG_HDRLEN + header_len;
        let mut request = Vec::with_capacity(len);
        request.extend_from_slice(&(len as u32).to_ne_bytes());
        request.extend_from_slice(&kind.to_ne_bytes());
        request.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
        request.extend_from_slice(&seq.to_ne_bytes());
        request.extend_from_slice(&0u32.to_ne_bytes());
        request.resize(len, 0);
        self.socket.send(&request)?;
        loop {
            let Some(replies) = self.socket.receive(false)? else {
                continue;
            };
            for reply in replies.into_iter().filter(|r| r.seq() == seq) {
                match reply {
                    Reply::Done { .. } => return Ok(()),
                    Reply::Error { errno, .. } => {
                        return Err(Error::kernel("list interface addresses".to_owned(), errno));
                    }
                    Reply::Data { message, .. } => each(message),
                    Reply::Ack { .. } => {}
                }
            }
        }
    }
}

/// An `RTM_NEWLINK` message: the interface's index and name.
pub(crate) fn parse_link(bytes: &[u8]) -> Option<(u32, String)> {
    let header = bytes.get(NLMSG_HDRLEN..NLMSG_HDRLEN + IFINFOMSG_LEN)?;
    let index = u32::from_ne_bytes([header[4], header[5], header[6], header[7]]);
    let name = attr::find(bytes.get(NLMSG_HDRLEN + IFINFOMSG_LEN..)?, IFLA_IFNAME)?;
    Some((index, attr::text(name)))
}

/// An `RTM_NEWADDR` message: the interface's index and the address (for IPv4 the local
/// address, which differs from `IFA_ADDRESS` on point-to-point links).
pub(crate) fn parse_address(bytes: &[u8]) -> Option<(u32, IpAddr)> {
    let header = bytes.get(NLMSG_HDRLEN..NLMSG_HDRLEN + IFADDRMSG_LEN)?;
    let family = i32::from(header[0]);
    let index = u32::from_ne_bytes([header[4], header[5], header[6], header[7]]);
    let mut address = None;
    for (kind, value) in attr::attributes(bytes.get(NLMSG_HDRLEN + IFADDRMSG_LEN..)?) {
        let parsed = match (family, value.len()) {
            (libc::AF_INET, 4) => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(value).ok()?)),
            (libc::AF_INET6, 16) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(value).ok()?)),
            _ => continue,
        };
        match kind {
            IFA_LOCAL => address = Some(parsed),
            IFA_ADDRESS if address.is_none() => address = Some(parsed),
            _ => {}
        }
    }
    Some((index, address?))
}

/// Told by the kernel when an address of this network namespace is added or removed.
pub struct AddressWatch {
    socket: Socket,
}

impl AddressWatch {
    /// A listener subscribed to IPv4 and IPv6 address changes.
    pub fn open() -> Result<AddressWatch, Error> {
        let socket = Socket::open_on(mnl::Bus::Route)?;
        for group in ADDRESS_GROUPS {
            socket.join(group)?;
        }
        Ok(AddressWatch { socket })
    }

    /// Blocks until the kernel announces an address change (or announcements were
    /// lost), then takes in what else is queued.
    pub fn wait(&mut self) -> Result<(), Error> {
        loop {
            match self.socket.receive(false) {
                Ok(Some(replies)) if !replies.is_empty() => break,
                Ok(_) => {}
                Err(Error::Unknown) => break,
                // The socket's receive timeout: nothing happened.
                Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        self.changed().map(|_| ())
    }

    /// Reads every queued notification without blocking; whether there was any (a
    /// lost notification counts too: the addresses must be read again).
    pub fn changed(&mut self) -> Result<bool, Error> {
        let mut any = false;
        loop {
            match self.socket.receive(true) {
                Ok(Some(replies)) => any |= !replies.is_empty(),
                Ok(None) => return Ok(any),
                Err(Error::Unknown) => any = true,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_links_are_read_from_their_attributes() {
        // RTM_NEWADDR, AF_INET, /24 on index 2: IFA_ADDRESS 10.0.0.1, IFA_LOCAL 10.0.0.2.
        let mut message = vec![0u8; NLMSG_HDRLEN];
        message.extend_from_slice(&[libc::AF_INET as u8, 24, 0, 0, 2, 0, 0, 0]);
        for (kind, value) in [(IFA_ADDRESS, [10, 0, 0, 1]), (IFA_LOCAL, [10, 0, 0, 2])] {
            message.extend_from_slice(&8u16.to_ne_bytes());
            message.extend_from_slice(&kind.to_ne_bytes());
            message.extend_from_slice(&value);
        }
        assert_eq!(
            parse_address(&message),
            Some((2, IpAddr::from([10, 0, 0, 2])))
        );
        // A truncated attribute ends the list instead of being read past.
        message.truncate(message.len() - 2);
        assert_eq!(
            parse_address(&message),
            Some((2, IpAddr::from([10, 0, 0, 1])))
        );
        // RTM_NEWLINK of index 7 named "eth1".
        let mut link = vec![0u8; NLMSG_HDRLEN];
        link.extend_from_slice(&[0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        link.extend_from_slice(&9u16.to_ne_bytes());
        link.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        link.extend_from_slice(b"eth1\0\0\0\0");
        assert_eq!(parse_link(&link), Some((7, "eth1".to_owned())));
    }
}
