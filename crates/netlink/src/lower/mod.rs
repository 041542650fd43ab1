//! Typed rules lowered to nf_tables expressions (registers, loads, compares: [`emit`]),
//! and raised back ([`raise`]); set keys as bytes and type ids ([`keys`]); nft's `typeof`
//! userdata ([`type_of`]). This module holds the expression vocabulary they share. Pure:
//! no libnftnl, no kernel.
//!
//! Invariant: `raise(lower(rule)) == rule` for every rule nftproxy writes, and the
//! expressions are the ones `nft` 1.0.6 emits for the same text (prefix matches shortened
//! to whole bytes, concatenations in consecutive 32-bit registers), so `nft list`
//! decompiles them back to the same text.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use nftproxy_nft::{
    CmpOp, CtState, CtStatus, DataType, Expr, Family, FibInput, L4Proto, MarkOp, PayloadField, Rhs,
    Stmt, Value, Verdict,
};

/// The 128-bit register 1, which nft uses for the first field of every key.
pub const REG_1: u32 = libc::NFT_REG_1 as u32;
/// The first 32-bit register; `REG32_00 + n` is the n-th 32-bit word of the key area.
pub const REG32_00: u32 = libc::NFT_REG32_00 as u32;
/// The verdict register.
pub const REG_VERDICT: u32 = 0;

const META_L4PROTO: u32 = libc::NFT_META_L4PROTO as u32;
const META_MARK: u32 = libc::NFT_META_MARK as u32;
const META_IIFNAME: u32 = libc::NFT_META_IIFNAME as u32;
const NUMGEN_RANDOM: u32 = libc::NFT_NG_RANDOM as u32;
const CT_STATE: u32 = libc::NFT_CT_STATE as u32;
const CT_STATUS: u32 = libc::NFT_CT_STATUS as u32;
const CT_STATE_NEW: u32 = 8;
const CT_STATUS_DNAT: u32 = 0x20;
const FIB_F_SADDR: u32 = 1;
const FIB_F_DADDR: u32 = 2;
const FIB_RESULT_ADDRTYPE: u32 = 3;
const RTN_LOCAL: u32 = 2;
const NAT_RANGE_MAP_IPS: u32 = 0x1;
const NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
const NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;
const REJECT_ICMP_UNREACH: u32 = libc::NFT_REJECT_ICMP_UNREACH as u32;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_PORT_UNREACH: u8 = 4;
const IFNAMSIZ: usize = 16;

/// Where a payload load reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadBase {
    /// The network header.
    Network = 1,
    /// The transport header.
    Transport = 2,
}

/// One nf_tables expression, with the attributes nftproxy uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawExpr {
    /// `payload load LEN @ BASE + OFFSET => DREG`
    Payload {
        /// Header.
        base: PayloadBase,
        /// Byte offset.
        offset: u32,
        /// Byte length.
        len: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `meta load KEY => DREG`
    MetaLoad {
        /// `NFT_META_*`
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `meta set KEY with SREG`
    MetaSet {
        /// `NFT_META_*`
        key: u32,
        /// Source register.
        sreg: u32,
    },
    /// `ct load KEY => DREG`
    Ct {
        /// `NFT_CT_*`
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `bitwise DREG = (SREG & MASK) ^ XOR`
    Bitwise {
        /// Source register.
        sreg: u32,
        /// Destination register.
        dreg: u32,
        /// Mask bytes.
        mask: Vec<u8>,
        /// Xor bytes.
        xor: Vec<u8>,
    },
    /// `cmp OP SREG DATA`
    Cmp {
        /// Source register.
        sreg: u32,
        /// Equal (`false`) or not equal (`true`).
        neq: bool,
        /// The constant.
        data: Vec<u8>,
    },
    /// `lookup SREG set NAME [dreg 0]`
    Lookup {
        /// Key register.
        sreg: u32,
        /// The set.
        set: String,
        /// `Some(0)` for a verdict-map lookup.
        dreg: Option<u32>,
    },
    /// `immediate DREG DATA`
    Immediate {
        /// Destination register.
        dreg: u32,
        /// Data bytes.
        data: Vec<u8>,
    },
    /// `immediate reg 0 VERDICT`
    Verdict(Verdict),
    /// `numgen DREG = random mod MODULUS offset OFFSET`
    Numgen {
        /// Destination register.
        dreg: u32,
        /// Modulus.
        modulus: u32,
        /// Added to the result.
        offset: u32,
    },
    /// `fib FLAGS type => DREG`
    Fib {
        /// `NFTA_FIB_F_*`
        flags: u32,
        /// `NFT_FIB_RESULT_*`
        result: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `dynset update reg_key SREG set NAME`
    DynsetUpdate {
        /// Key register.
        sreg_key: u32,
        /// The set.
        set: String,
    },
    /// `nat dnat FAMILY addr_min REG proto_min REG flags FLAGS`
    Dnat {
        /// `NFPROTO_IPV4` / `NFPROTO_IPV6`.
        family: u32,
        /// Address register.
        reg_addr: u32,
        /// Port register.
        reg_proto: u32,
        /// `NF_NAT_RANGE_*`
        flags: u32,
    },
    /// `masq flags FLAGS`
    Masq {
        /// `NF_NAT_RANGE_*`
        flags: u32,
    },
    /// `reject type TYPE code CODE`
    Reject {
        /// `NFT_REJECT_*`
        kind: u32,
        /// ICMP code.
        code: u8,
    },
    /// `counter pkts PACKETS bytes BYTES` (written with zeros; read with the kernel's
    /// numbers, which the rule's statements leave out).
    Counter {
        /// Packets counted.
        packets: u64,
        /// Bytes counted.
        bytes: u64,
    },
}

/// A rule that nftproxy cannot put into (or read out of) bytecode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LowerError(pub String);

fn err<T>(message: impl Into<String>) -> Result<T, LowerError> {
    Err(LowerError(message.into()))
}

fn addr_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn addr_offset(field: PayloadField) -> Option<(u32, u32)> {
    match field {
        PayloadField::Saddr(Family::Ip) => Some((12, 4)),
        PayloadField::Daddr(Family::Ip) => Some((16, 4)),
        PayloadField::Saddr(Family::Ip6) => Some((8, 16)),
        PayloadField::Daddr(Family::Ip6) => Some((24, 16)),
        PayloadField::ThDport | PayloadField::Dport(_) => None,
    }
}

/// `NFPROTO_IPV4` / `NFPROTO_IPV6`.
pub fn nfproto(family: Family) -> u32 {
    match family {
        Family::Ip => libc::NFPROTO_IPV4 as u32,
        Family::Ip6 => libc::NFPROTO_IPV6 as u32,
    }
}

// === raising ===

fn u32_of(bytes: &[u8]) -> Result<u32, LowerError> {
    let array: [u8; 4] = bytes
        .try_into()
        .map_err(|_| LowerError(format!("expected 4 bytes, got {}", bytes.len())))?;
    Ok(u32::from_ne_bytes(array))
}

fn addr_of(bytes: &[u8]) -> Result<IpAddr, LowerError> {
    match bytes.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(bytes).expect("length checked"),
        ))),
        16 => Ok(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes).expect("length checked"),
        ))),
        n => err(format!("an address of {n} bytes")),
    }
}

fn proto_of(number: u8) -> Result<L4Proto, LowerError> {
    match number {
        6 => Ok(L4Proto::Tcp),
        17 => Ok(L4Proto::Udp),
        132 => Ok(L4Proto::Sctp),
        n => err(format!("protocol {n}")),
    }
}

/// Where the port of an `address . port` map value lands when the value is looked up
/// into register 1: the word after the address, named as nft names it.
fn mapped_port_reg(family: Family) -> u32 {
    match family {
        Family::Ip => REG32_00 + 1,
        Family::Ip6 => REG_1 + 1,
    }
}

mod emit;
mod keys;
mod raise;
mod type_of;

pub use emit::lower;
pub use keys::{key_bytes, key_len, key_type, key_types, key_values};
pub use raise::raise;
pub use type_of::{tlvs, typeof_exprs, typeof_udata};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_shortened_like_nft() {
        let stmt = Stmt::eq(
            Expr::saddr(Family::Ip),
            Rhs::Prefix("10.0.0.0/8".parse().unwrap()),
        );
        let raw = lower(Family::Ip, std::slice::from_ref(&stmt)).unwrap();
        assert_eq!(
            raw,
            vec![
                RawExpr::Payload {
                    base: PayloadBase::Network,
                    offset: 12,
                    len: 1,
                    dreg: 1
                },
                RawExpr::Cmp {
                    sreg: 1,
                    neq: false,
                    data: vec![10]
                },
            ]
        );
        let odd = Stmt::eq(
            Expr::saddr(Family::Ip),
            Rhs::Prefix("203.0.113.0/25".parse().unwrap()),
        );
        let raw = lower(Family::Ip, std::slice::from_ref(&odd)).unwrap();
        assert!(matches!(&raw[1], RawExpr::Bitwise { mask, .. } if mask == &[255, 255, 255, 128]));
        assert_eq!(raise(Family::Ip, &raw).unwrap(), vec![odd]);
    }

    #[test]
    fn concatenations_use_consecutive_32_bit_registers() {
        let key = Expr::Concat(vec![
            Expr::saddr(Family::Ip6),
            Expr::daddr(Family::Ip6),
            Expr::MetaL4proto,
            Expr::th_dport(),
        ]);
        let raw = lower(Family::Ip6, &[Stmt::lookup(key, "h")]).unwrap();
        let regs: Vec<u32> = raw
            .iter()
            .filter_map(|r| match r {
                RawExpr::Payload { dreg, .. } | RawExpr::MetaLoad { dreg, .. } => Some(*dreg),
                _ => None,
            })
            .collect();
        assert_eq!(regs, [1, 2, 3, 17]);
    }

    #[test]
    fn keys_round_trip() {
        let types = [
            DataType::Ipv4Addr,
            DataType::InetProto,
            DataType::InetService,
        ];
        let key = vec![
            Value::Addr([10, 96, 0, 1].into()),
            Value::Proto(L4Proto::Udp),
            Value::Port(53),
        ];
        let bytes = key_bytes(&key);
        assert_eq!(bytes, [10, 96, 0, 1, 17, 0, 0, 0, 0, 53, 0, 0]);
        assert_eq!(key_len(&types), 12);
        assert_eq!(key_values(&types, &bytes).unwrap(), key);
        assert_eq!(key_type(&types), 0x730d);
        assert_eq!(key_types(0x730d).unwrap(), types);
    }

    #[test]
    fn unknown_sequences_are_refused() {
        let raw = vec![RawExpr::MetaLoad { key: 99, dreg: 1 }];
        assert!(raise(Family::Ip, &raw).is_err());
        let dangling = vec![RawExpr::MetaLoad {
            key: META_MARK,
            dreg: 1,
        }];
        assert!(raise(Family::Ip, &dangling).is_err());
    }
}
