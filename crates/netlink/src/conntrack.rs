//! ctnetlink: listing and deleting conntrack entries over a netfilter netlink socket.
//!
//! Invariant: a delete request carries the entry's full original tuple and its zone, so
//! the kernel removes exactly that entry; an entry already gone (ENOENT) is not an error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use nftproxy_nft::{Conntrack, Family, Flow, L4Proto, Tuple};

use crate::Error;
use crate::attr::attributes;
use crate::socket::{Reply, Socket};

// linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
/// Delete requests are sent in buffers of about this size, each answered before the next.
const DELETE_CHUNK: usize = 32 * 1024;

/// A netlink socket for the conntrack table of the calling thread's network namespace.
pub struct ConntrackSocket {
    socket: Socket,
    seq: u32,
}

impl ConntrackSocket {
    /// Opens the socket (deleting entries needs CAP_NET_ADMIN).
    pub fn open() -> Result<ConntrackSocket, Error> {
        Ok(ConntrackSocket {
            socket: Socket::open()?,
            seq: 0,
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }
}

fn family_byte(family: Family) -> u8 {
    match family {
        Family::Ip => libc::AF_INET as u8,
        Family::Ip6 => libc::AF_INET6 as u8,
    }
}

/// Appends one netlink message: header, nfgenmsg, then `attributes`.
fn message(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8, attributes: &[u8]) {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attributes.len();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version NFNETLINK_V0, resource id 0 (big-endian)
    out.extend_from_slice(&[family, 0, 0, 0]);
    out.extend_from_slice(attributes);
}

/// Appends one attribute, padded to 4 bytes.
fn attribute(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().div_ceil(4) * 4, 0);
}

fn nested(out: &mut Vec<u8>, kind: u16, build: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    build(&mut inner);
    attribute(out, kind | NLA_F_NESTED, &inner);
}

fn encode_tuple(out: &mut Vec<u8>, kind: u16, protocol: L4Proto, tuple: &Tuple) {
    nested(out, kind, |t| {
        nested(t, CTA_TUPLE_IP, |ip| match (tuple.src, tuple.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                attribute(ip, CTA_IP_V4_SRC, &src.octets());
                attribute(ip, CTA_IP_V4_DST, &dst.octets());
            }
            (src, dst) => {
                attribute(ip, CTA_IP_V6_SRC, &v6(src).octets());
                attribute(ip, CTA_IP_V6_DST, &v6(dst).octets());
            }
        });
        nested(t, CTA_TUPLE_PROTO, |p| {
            attribute(p, CTA_PROTO_NUM, &[protocol.number()]);
            attribute(p, CTA_PROTO_SRC_PORT, &tuple.src_port.to_be_bytes());
            attribute(p, CTA_PROTO_DST_PORT, &tuple.dst_port.to_be_bytes());
        });
    });
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn port(payload: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(payload.get(..2)?.try_into().ok()?))
}

fn address(payload: &[u8]) -> Option<IpAddr> {
    match payload.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(payload).ok()?,
        ))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(payload).ok()?,
        ))),
        _ => None,
    }
}

/// A tuple and its protocol number.
fn decode_tuple(bytes: &[u8]) -> Option<(u8, Tuple)> {
    let (mut src, mut dst, mut number, mut src_port, mut dst_port) = (None, None, None, 0, 0);
    for (kind, payload) in attributes(bytes) {
        match kind {
            CTA_TUPLE_IP => {
                for (kind, payload) in attributes(payload) {
                    match kind {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = address(payload),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = address(payload),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (kind, payload) in attributes(payload) {
                    match kind {
                        CTA_PROTO_NUM => number = payload.first().copied(),
                        CTA_PROTO_SRC_PORT => src_port = port(payload)?,
                        CTA_PROTO_DST_PORT => dst_port = port(payload)?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        number?,
        Tuple {
            src: src?,
            dst: dst?,
            src_port,
            dst_port,
        },
    ))
}

/// A conntrack message's flow, when it is of `protocol` (other protocols and entries
/// without ports are skipped).
pub(crate) fn decode_flow(message: &[u8], protocol: L4Proto) -> Option<Flow> {
    let body = message.get(NLMSG_HDRLEN + NFGENMSG_LEN..)?;
    let (mut original, mut reply, mut zone) = (None, None, 0);
    for (kind, payload) in attributes(body) {
        match kind {
            CTA_TUPLE_ORIG => original = decode_tuple(payload),
            CTA_TUPLE_REPLY => reply = decode_tuple(payload),
            CTA_ZONE => zone = port(payload).unwrap_or(0),
            _ => {}
        }
    }
    let (number, original) = original?;
    let (_, reply) = reply?;
    (number == protocol.number()).then_some(Flow {
        protocol,
        original,
        reply,
        zone,
    })
}

impl Conntrack for ConntrackSocket {
    type Error = Error;

    fn flows(&mut self, family: Family, protocol: L4Proto) -> Result<Vec<Flow>, Error> {
        let mut request = Vec::new();
        let seq = self.next_seq();
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        message(
            &mut request,
            IPCTNL_MSG_CT_GET,
            flags,
            seq,
            family_byte(family),
            &[],
        );
        self.socket.send(&request)?;
        let mut flows = Vec::new();
        loop {
            let Some(replies) = self.socket.receive(false)? else {
                continue;
            };
            for reply in replies {
                match reply {
                    Reply::Done { .. } => return Ok(flows),
                    Reply::Error { errno, .. } => {
                        return Err(Error::kernel("list conntrack entries".to_owned(), errno));
                    }
                    Reply::Ack { .. } => {}
                    Reply::Data { message, .. } => {
                        flows.extend(decode_flow(message.bytes(), protocol));
                    }
                }
            }
        }
    }

    fn delete(&mut self, flows: &[Flow]) -> Result<usize, Error> {
        let mut deleted = 0;
        let mut buffer = Vec::new();
        let mut pending = 0usize;
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        for (index, flow) in flows.iter().enumerate() {
            let mut attrs = Vec::new();
            encode_tuple(&mut attrs, CTA_TUPLE_ORIG, flow.protocol, &flow.original);
            if flow.zone != 0 {
                attribute(&mut attrs, CTA_ZONE, &flow.zone.to_be_bytes());
            }
            let family = family_byte(Family::of(&flow.original.src));
            let seq = self.next_seq();
            message(
                &mut buffer,
                IPCTNL_MSG_CT_DELETE,
                flags,
                seq,
                family,
                &attrs,
            );
            pending += 1;
            if buffer.len() >= DELETE_CHUNK || index + 1 == flows.len() {
                self.socket.send(&buffer)?;
                buffer.clear();
                while pending > 0 {
                    let Some(replies) = self.socket.receive(false)? else {
                        continue;
                    };
                    for reply in replies {
                        match reply {
                            Reply::Ack { .. } => {
                                deleted += 1;
                                pending -= 1;
                            }
                            Reply::Error { errno, .. } if errno == libc::ENOENT => pending -= 1,
                            Reply::Error { errno, .. } => {
                                return Err(Error::kernel(
                                    "delete conntrack entry".to_owned(),
                                    errno,
                                ));
                            }
                            Reply::Done { .. } | Reply::Data { .. } => {}
                        }
                    }
                }
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_tuple_decodes_to_itself() {
        let tuple = Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.96.0.10".parse().unwrap(),
            src_port: 40000,
            dst_port: 53,
        };
        let mut attrs = Vec::new();
        encode_tuple(&mut attrs, CTA_TUPLE_ORIG, L4Proto::Udp, &tuple);
        let reply = Tuple {
            src: "10.244.1.5".parse().unwrap(),
            dst: "10.0.0.1".parse().unwrap(),
            src_port: 53,
            dst_port: 40000,
        };
        encode_tuple(&mut attrs, CTA_TUPLE_REPLY, L4Proto::Udp, &reply);
        attribute(&mut attrs, CTA_ZONE, &7u16.to_be_bytes());
        let mut bytes = Vec::new();
        message(
            &mut bytes,
            IPCTNL_MSG_CT_GET,
            0,
            1,
            libc::AF_INET as u8,
            &attrs,
        );
        let flow = decode_flow(&bytes, L4Proto::Udp).expect("a flow");
        assert_eq!(flow.original, tuple);
        assert_eq!(flow.reply, reply);
        assert_eq!(flow.zone, 7);
        assert_eq!(decode_flow(&bytes, L4Proto::Tcp), None);
    }

    #[test]
    fn ipv6_tuples_round_trip() {
        let tuple = Tuple {
            src: "fd00::1".parse().unwrap(),
            dst: "fd00:96::a".parse().unwrap(),
            src_port: 1,
            dst_port: 2,
        };
        let mut attrs = Vec::new();
        encode_tuple(&mut attrs, CTA_TUPLE_ORIG, L4Proto::Udp, &tuple);
        encode_tuple(&mut attrs, CTA_TUPLE_REPLY, L4Proto::Udp, &tuple);
        let mut bytes = Vec::new();
        message(
            &mut bytes,
            IPCTNL_MSG_CT_GET,
            0,
            1,
            libc::AF_INET6 as u8,
            &attrs,
        );
        assert_eq!(
            decode_flow(&bytes, L4Proto::Udp).expect("flow").original,
            tuple
        );
    }
}
