//! Scalar nftables types: families, hooks, priorities, data types, values and verdicts.
//!
//! Every type here prints the way `nft` 1.0.6 prints it, so that text built from these
//! types can be compared with `nft list` output.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The address family of a table. nftproxy keeps one table per family, as upstream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// `ip`: IPv4.
    Ip,
    /// `ip6`: IPv6.
    Ip6,
}

impl Family {
    /// The family an address belongs to.
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::Ip,
            IpAddr::V6(_) => Family::Ip6,
        }
    }

    /// The address data type of this family (`ipv4_addr` / `ipv6_addr`).
    pub fn addr_type(self) -> DataType {
        match self {
            Family::Ip => DataType::Ipv4Addr,
            Family::Ip6 => DataType::Ipv6Addr,
        }
    }

    /// The loopback network of this family (`127.0.0.0/8` / `::1`).
    pub fn loopback(self) -> ipnet::IpNet {
        match self {
            Family::Ip => ipnet::IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
            Family::Ip6 => ipnet::IpNet::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
        }
        .expect("constant prefix lengths are valid")
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
        })
    }
}

/// The type of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChainType {
    /// `filter`
    Filter,
    /// `nat`
    Nat,
}

/// The netfilter hook a base chain is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// `prerouting`
    Prerouting,
    /// `input`
    Input,
    /// `forward`
    Forward,
    /// `output`
    Output,
    /// `postrouting`
    Postrouting,
}

/// A base chain priority, in the kernel's numeric form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(pub i32);

impl Priority {
    /// `dstnat` (-100).
    pub const DSTNAT: Priority = Priority(-100);
    /// `filter` (0).
    pub const FILTER: Priority = Priority(0);
    /// `srcnat` (100).
    pub const SRCNAT: Priority = Priority(100);
}

/// What makes a chain a base chain: its type, hook and priority. The policy is always
/// `accept`: nftproxy never owns the fate of traffic it does not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BaseChain {
    /// Chain type.
    pub chain_type: ChainType,
    /// Hook.
    pub hook: Hook,
    /// Priority.
    pub priority: Priority,
}

/// A data type usable in a set key or map value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DataType {
    /// `ipv4_addr`
    Ipv4Addr,
    /// `ipv6_addr`
    Ipv6Addr,
    /// `inet_proto`
    InetProto,
    /// `inet_service`
    InetService,
    /// `verdict` (map values only)
    Verdict,
    /// `integer`, 32 bits: a `numgen` result in a key. nft has no `type` name for it in
    /// a concatenation, so a set using it is declared with `typeof`.
    Integer,
}

/// A layer-4 protocol that a Service port can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum L4Proto {
    /// TCP (6)
    Tcp,
    /// UDP (17)
    Udp,
    /// SCTP (132)
    Sctp,
}

impl L4Proto {
    /// Every protocol, in order.
    pub const ALL: [L4Proto; 3] = [L4Proto::Tcp, L4Proto::Udp, L4Proto::Sctp];

    /// The IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            L4Proto::Tcp => 6,
            L4Proto::Udp => 17,
            L4Proto::Sctp => 132,
        }
    }

    /// The lower-case name nft uses.
    pub fn name(self) -> &'static str {
        match self {
            L4Proto::Tcp => "tcp",
            L4Proto::Udp => "udp",
            L4Proto::Sctp => "sctp",
        }
    }
}

/// One field of a set element key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    /// An address (`ipv4_addr` or `ipv6_addr`).
    Addr(IpAddr),
    /// A protocol (`inet_proto`).
    Proto(L4Proto),
    /// A port (`inet_service`).
    Port(u16),
    /// A 32-bit number (`integer`): the `numgen` slot of a key.
    Number(u32),
}

/// Tags of [`Value`] fields encoded as bytes, in the order of the variants (and of
/// the address families), so that encoded keys compare as the values do.
const TAG_V4: u8 = 0;
const TAG_V6: u8 = 1;
const TAG_PROTO: u8 = 2;
const TAG_PORT: u8 = 3;
const TAG_NUMBER: u8 = 4;

impl Value {
    /// The value with every byte but the last cleared and the last ANDed with `mask`:
    /// what `FIELD & MASK` ([`crate::Expr::PayloadAnd`]) loads from a field holding it.
    /// `None` for a protocol, which no payload field holds.
    pub fn last_byte_and(self, mask: u8) -> Option<Value> {
        Some(match self {
            Value::Addr(IpAddr::V4(addr)) => {
                Value::Addr(IpAddr::from([0, 0, 0, addr.octets()[3] & mask]))
            }
            Value::Addr(IpAddr::V6(addr)) => {
                let mut octets = [0; 16];
                octets[15] = addr.octets()[15] & mask;
                Value::Addr(IpAddr::from(octets))
            }
            Value::Port(port) => Value::Port(port & u16::from(mask)),
            Value::Number(number) => Value::Number(number & u32::from(mask)),
            Value::Proto(_) => return None,
        })
    }

    /// Appends the field as a tag byte and its value in network order: comparing two
    /// encodings byte by byte orders them as comparing the values field by field.
    pub(crate) fn encode_into(self, out: &mut Vec<u8>) {
        match self {
            Value::Addr(IpAddr::V4(addr)) => {
                out.push(TAG_V4);
                out.extend(addr.octets());
            }
            Value::Addr(IpAddr::V6(addr)) => {
                out.push(TAG_V6);
                out.extend(addr.octets());
            }
            Value::Proto(proto) => {
                out.push(TAG_PROTO);
                out.push(proto as u8);
            }
            Value::Port(port) => {
                out.push(TAG_PORT);
                out.extend(port.to_be_bytes());
            }
            Value::Number(number) => {
                out.push(TAG_NUMBER);
                out.extend(number.to_be_bytes());
            }
        }
    }

    /// The first field of `bytes` (written by [`Value::encode_into`]) and its length.
    pub(crate) fn decode_from(bytes: &[u8]) -> Option<(Value, usize)> {
        let (tag, rest) = bytes.split_first()?;
        let len = match *tag {
            TAG_V4 | TAG_NUMBER => 4,
            TAG_V6 => 16,
            TAG_PROTO => 1,
            TAG_PORT => 2,
            _ => return None,
        };
        let field = rest.get(..len)?;
        let value = match *tag {
            TAG_V4 => Value::Addr(IpAddr::from(<[u8; 4]>::try_from(field).ok()?)),
            TAG_V6 => Value::Addr(IpAddr::from(<[u8; 16]>::try_from(field).ok()?)),
            TAG_PROTO => Value::Proto(*L4Proto::ALL.get(usize::from(field[0]))?),
            TAG_PORT => Value::Port(u16::from_be_bytes(field.try_into().ok()?)),
            _ => Value::Number(u32::from_be_bytes(field.try_into().ok()?)),
        };
        Some((value, 1 + len))
    }
}

/// Fields as bytes (see [`Value::encode_into`]).
pub(crate) fn encode(values: &[Value]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 5);
    for value in values {
        value.encode_into(&mut out);
    }
    out
}

/// The fields of an encoding, and where each starts.
pub(crate) fn decode(mut bytes: &[u8]) -> impl Iterator<Item = (usize, Value)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let (value, len) = Value::decode_from(bytes)?;
        let start = at;
        bytes = &bytes[len..];
        at += len;
        Some((start, value))
    })
}

/// A verdict: the end of a rule, or the value of a verdict map element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// `accept`
    Accept,
    /// `drop`
    Drop,
    /// `return`
    Return,
    /// `jump CHAIN`
    Jump(String),
    /// `goto CHAIN`
    Goto(String),
}

impl Verdict {
    /// The chain this verdict enters, if any.
    pub fn target(&self) -> Option<&str> {
        match self {
            Verdict::Jump(chain) | Verdict::Goto(chain) => Some(chain),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_byte_survives_a_last_byte_mask() {
        let and = |value, mask| Value::last_byte_and(value, mask);
        let addr = |text: &str| Value::Addr(text.parse().unwrap());
        assert_eq!(and(addr("10.96.1.250"), 0x0f), Some(addr("0.0.0.10")));
        assert_eq!(and(addr("fd00::12:3ff"), 0x0f), Some(addr("::f")));
        assert_eq!(and(Value::Port(30_011), 0x0f), Some(Value::Port(11)));
        assert_eq!(and(Value::Number(0x1234), 0xff), Some(Value::Number(0x34)));
        assert_eq!(and(Value::Proto(L4Proto::Tcp), 0x0f), None);
    }

    #[test]
    fn encoded_keys_decode_and_order_as_their_values() {
        let fields = [
            Value::Addr("10.0.0.1".parse().unwrap()),
            Value::Addr("10.0.0.2".parse().unwrap()),
            Value::Addr("255.255.255.255".parse().unwrap()),
            Value::Addr("::1".parse().unwrap()),
            Value::Addr("fd00::1".parse().unwrap()),
            Value::Proto(L4Proto::Tcp),
            Value::Proto(L4Proto::Udp),
            Value::Proto(L4Proto::Sctp),
            Value::Port(0),
            Value::Port(80),
            Value::Port(65_535),
            Value::Number(0),
            Value::Number(7),
            Value::Number(u32::MAX),
        ];
        // Keys of one to three fields, including every prefix of a longer key.
        let mut keys: Vec<Vec<Value>> = Vec::new();
        for a in fields {
            keys.push(vec![a]);
            for b in fields {
                keys.push(vec![a, b]);
                keys.extend([Value::Port(443), Value::Number(1)].map(|c| vec![a, b, c]));
            }
        }
        for a in &keys {
            let bytes = encode(a);
            let back: Vec<Value> = decode(&bytes).map(|(_, v)| v).collect();
            assert_eq!(&back, a);
            for b in &keys {
                assert_eq!(bytes.cmp(&encode(b)), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
        assert_eq!(
            decode(&[9, 1, 2]).count(),
            0,
            "an unknown tag ends the fields"
        );
    }
}
