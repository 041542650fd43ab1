//! Typed rules lowered to nf_tables expressions (registers, loads, compares), and raised
//! back. Pure: no libnftnl, no kernel.
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

/// The byte length of a loaded value, as it sits in registers.
fn load_len(expr: &Expr) -> Result<u32, LowerError> {
    Ok(match expr {
        Expr::Payload(PayloadField::ThDport | PayloadField::Dport(_)) => 2,
        Expr::Payload(field) | Expr::PayloadAnd(field, _) => {
            addr_offset(*field).map_or(0, |(_, len)| len)
        }
        Expr::MetaL4proto => 1,
        Expr::NumgenRandom(_) | Expr::Tag(_) => 4,
        other => return err(format!("{other} cannot be part of a set key")),
    })
}

/// Loads `expr` into `dreg`.
fn load(expr: &Expr, dreg: u32, out: &mut Vec<RawExpr>) -> Result<(), LowerError> {
    if let Expr::PayloadAnd(field, last) = expr {
        let payload = Expr::Payload(*field);
        load(&payload, dreg, out)?;
        let len = load_len(&payload)? as usize;
        let mut mask = vec![0; len];
        mask[len - 1] = *last;
        out.push(RawExpr::Bitwise {
            sreg: dreg,
            dreg,
            mask,
            xor: vec![0; len],
        });
        return Ok(());
    }
    out.push(match expr {
        Expr::Payload(PayloadField::ThDport) => RawExpr::Payload {
            base: PayloadBase::Transport,
            offset: 2,
            len: 2,
            dreg,
        },
        Expr::Payload(PayloadField::Dport(_)) => {
            return err(format!("{expr} only declares sets (rules load th dport)"));
        }
        Expr::Payload(field) => {
            let (offset, len) = addr_offset(*field).expect("address fields have offsets");
            RawExpr::Payload {
                base: PayloadBase::Network,
                offset,
                len,
                dreg,
            }
        }
        Expr::MetaL4proto => RawExpr::MetaLoad {
            key: META_L4PROTO,
            dreg,
        },
        Expr::MetaMark => RawExpr::MetaLoad {
            key: META_MARK,
            dreg,
        },
        Expr::Iifname => RawExpr::MetaLoad {
            key: META_IIFNAME,
            dreg,
        },
        Expr::CtState => RawExpr::Ct {
            key: CT_STATE,
            dreg,
        },
        Expr::CtStatus => RawExpr::Ct {
            key: CT_STATUS,
            dreg,
        },
        Expr::FibType(input) => RawExpr::Fib {
            flags: match input {
                FibInput::Saddr => FIB_F_SADDR,
                FibInput::Daddr => FIB_F_DADDR,
            },
            result: FIB_RESULT_ADDRTYPE,
            dreg,
        },
        Expr::NumgenRandom(modulus) => RawExpr::Numgen {
            dreg,
            modulus: *modulus,
            offset: 0,
        },
        Expr::Tag(tag) => RawExpr::Numgen {
            dreg,
            modulus: 1,
            offset: *tag,
        },
        Expr::MetaMarkAnd(_) | Expr::PayloadAnd(..) | Expr::Concat(_) => {
            return err(format!("{expr} is not a single load"));
        }
    });
    Ok(())
}

/// Loads a (possibly concatenated) key into registers starting at register 1, each
/// field in the next free 32-bit word. Like nft, a field that starts on a 16-byte
/// boundary is named by its 128-bit register (`reg 2`), any other by its 32-bit one.
fn load_key(key: &Expr, out: &mut Vec<RawExpr>) -> Result<(), LowerError> {
    let parts: &[Expr] = match key {
        Expr::Concat(parts) => parts,
        single => std::slice::from_ref(single),
    };
    let mut word = 0;
    for part in parts {
        let dreg = if word % 4 == 0 {
            REG_1 + word / 4
        } else {
            REG32_00 + word
        };
        load(part, dreg, out)?;
        word += load_len(part)?.div_ceil(4);
    }
    Ok(())
}

fn cmp(neq: bool, data: Vec<u8>) -> RawExpr {
    RawExpr::Cmp {
        sreg: REG_1,
        neq,
        data,
    }
}

fn bitwise(mask: Vec<u8>, xor: Vec<u8>) -> RawExpr {
    RawExpr::Bitwise {
        sreg: REG_1,
        dreg: REG_1,
        mask,
        xor,
    }
}

/// `bits & MASK != 0`: how nft tests a flag of `ct state` / `ct status`.
fn flag_test(expr: &Expr, flag: u32, out: &mut Vec<RawExpr>) -> Result<(), LowerError> {
    load(expr, REG_1, out)?;
    out.push(bitwise(flag.to_ne_bytes().to_vec(), vec![0; 4]));
    out.push(cmp(true, vec![0; 4]));
    Ok(())
}

fn lower_match(
    left: &Expr,
    op: CmpOp,
    right: &Rhs,
    out: &mut Vec<RawExpr>,
) -> Result<(), LowerError> {
    let neq = op == CmpOp::Neq;
    match (left, right) {
        (
            Expr::Payload(field @ (PayloadField::Saddr(_) | PayloadField::Daddr(_))),
            Rhs::Prefix(net),
        ) => {
            let (offset, full) = addr_offset(*field).expect("address fields have offsets");
            if (net.max_prefix_len() == 32) != (full == 4) {
                return err(format!("{net} does not match the family of {left}"));
            }
            let bytes = addr_bytes(net.network());
            let prefix = u32::from(net.prefix_len());
            if prefix % 8 == 0 && prefix > 0 {
                out.push(RawExpr::Payload {
                    base: PayloadBase::Network,
                    offset,
                    len: prefix / 8,
                    dreg: REG_1,
                });
                out.push(cmp(neq, bytes[..(prefix / 8) as usize].to_vec()));
            } else {
                load(left, REG_1, out)?;
                out.push(bitwise(addr_bytes(net.netmask()), vec![0; full as usize]));
                out.push(cmp(neq, bytes));
            }
        }
        (Expr::MetaL4proto, Rhs::Proto(proto)) => {
            load(left, REG_1, out)?;
            out.push(cmp(neq, vec![proto.number()]));
        }
        (Expr::MetaMarkAnd(mask), Rhs::Mark(value)) => {
            load(&Expr::MetaMark, REG_1, out)?;
            out.push(bitwise(mask.to_ne_bytes().to_vec(), vec![0; 4]));
            out.push(cmp(neq, value.to_ne_bytes().to_vec()));
        }
        (Expr::Iifname, Rhs::Ifname(name)) => {
            load(left, REG_1, out)?;
            let data = match name.strip_suffix('*') {
                Some(prefix) => prefix.as_bytes().to_vec(),
                None => {
                    let mut padded = name.as_bytes().to_vec();
                    padded.resize(IFNAMSIZ, 0);
                    padded
                }
            };
            if data.is_empty() || data.len() > IFNAMSIZ {
                return err(format!("interface name {name:?} does not fit"));
            }
            out.push(cmp(neq, data));
        }
        (Expr::CtState, Rhs::CtState(CtState::New)) if !neq => flag_test(left, CT_STATE_NEW, out)?,
        (Expr::CtStatus, Rhs::CtStatus(CtStatus::Dnat)) if !neq => {
            flag_test(left, CT_STATUS_DNAT, out)?
        }
        (Expr::FibType(_), Rhs::FibLocal) => {
            load(left, REG_1, out)?;
            out.push(cmp(neq, RTN_LOCAL.to_ne_bytes().to_vec()));
        }
        (Expr::NumgenRandom(_), Rhs::Number(n)) => {
            load(left, REG_1, out)?;
            out.push(cmp(neq, n.to_ne_bytes().to_vec()));
        }
        _ => return err(format!("no encoding for the match `{left} {right}`")),
    }
    Ok(())
}

/// Lowers the statements of one rule of a table of `family`.
pub fn lower(family: Family, stmts: &[Stmt]) -> Result<Vec<RawExpr>, LowerError> {
    let mut out = Vec::with_capacity(stmts.len() * 3);
    for stmt in stmts {
        match stmt {
            Stmt::Match { left, op, right } => lower_match(left, *op, right, &mut out)?,
            Stmt::Lookup { left, set } => {
                load_key(left, &mut out)?;
                out.push(RawExpr::Lookup {
                    sreg: REG_1,
                    set: set.clone(),
                    dreg: None,
                });
            }
            Stmt::Vmap { key, map } => {
                load_key(key, &mut out)?;
                out.push(RawExpr::Lookup {
                    sreg: REG_1,
                    set: map.clone(),
                    dreg: Some(REG_VERDICT),
                });
            }
            Stmt::SetMark(op) => {
                load(&Expr::MetaMark, REG_1, &mut out)?;
                let (mask, xor) = match op {
                    MarkOp::Or(bits) => (!bits, *bits),
                    MarkOp::Xor(bits) => (u32::MAX, *bits),
                };
                out.push(bitwise(
                    mask.to_ne_bytes().to_vec(),
                    xor.to_ne_bytes().to_vec(),
                ));
                out.push(RawExpr::MetaSet {
                    key: META_MARK,
                    sreg: REG_1,
                });
            }
            Stmt::Update { set, key } => {
                load_key(key, &mut out)?;
                out.push(RawExpr::DynsetUpdate {
                    sreg_key: REG_1,
                    set: set.clone(),
                });
            }
            Stmt::Dnat { addr, port } => {
                if Family::of(addr) != family {
                    return err(format!("dnat to {addr} in a {family} table"));
                }
                out.push(RawExpr::Immediate {
                    dreg: REG_1,
                    data: addr_bytes(*addr),
                });
                out.push(RawExpr::Immediate {
                    dreg: REG_1 + 1,
                    data: port.to_be_bytes().to_vec(),
                });
                out.push(RawExpr::Dnat {
                    family: nfproto(family),
                    reg_addr: REG_1,
                    reg_proto: REG_1 + 1,
                    flags: NAT_RANGE_PROTO_SPECIFIED,
                });
            }
            Stmt::DnatMap {
                family: to,
                key,
                map,
            } => {
                if *to != family {
                    return err(format!("dnat {to} in a {family} table"));
                }
                load_key(key, &mut out)?;
                out.push(RawExpr::Lookup {
                    sreg: REG_1,
                    set: map.clone(),
                    dreg: Some(REG_1),
                });
                // Like nft, no flags: the kernel sets them for the registers given.
                out.push(RawExpr::Dnat {
                    family: nfproto(family),
                    reg_addr: REG_1,
                    reg_proto: mapped_port_reg(family),
                    flags: 0,
                });
            }
            Stmt::MasqueradeFullyRandom => out.push(RawExpr::Masq {
                flags: NAT_RANGE_PROTO_RANDOM_FULLY,
            }),
            Stmt::Reject => out.push(RawExpr::Reject {
                kind: REJECT_ICMP_UNREACH,
                code: match family {
                    Family::Ip => ICMP_PORT_UNREACH,
                    Family::Ip6 => ICMPV6_PORT_UNREACH,
                },
            }),
            Stmt::Verdict(verdict) => out.push(RawExpr::Verdict(verdict.clone())),
        }
    }
    Ok(out)
}

/// Where the port of an `address . port` map value lands when the value is looked up
/// into register 1: the word after the address, named as nft names it.
fn mapped_port_reg(family: Family) -> u32 {
    match family {
        Family::Ip => REG32_00 + 1,
        Family::Ip6 => REG_1 + 1,
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

/// What a register holds while raising.
#[derive(Debug, Clone)]
enum Loaded {
    /// A value loaded by an expression, possibly a prefix of it (`len` bytes).
    Value { expr: Expr, len: u32 },
    /// `value & mask` of a loaded value.
    Masked { expr: Expr, mask: Vec<u8> },
    /// `(mark & mask) ^ xor`, about to be written back to the mark.
    MarkUpdate { mask: u32, xor: u32 },
    /// Immediate data (dnat operands).
    Data(Vec<u8>),
    /// The value a map lookup found for a key (dnat operands).
    Mapped { key: Expr, map: String },
}

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

fn prefix_of(field: PayloadField, data: &[u8], prefix_len: u32) -> Result<Rhs, LowerError> {
    let full = addr_offset(field).map_or(0, |(_, len)| len) as usize;
    let mut bytes = data.to_vec();
    bytes.resize(full, 0);
    let addr = addr_of(&bytes)?;
    let net = IpNet::new(addr, u8::try_from(prefix_len).unwrap_or(u8::MAX))
        .map_err(|e| LowerError(e.to_string()))?;
    Ok(Rhs::Prefix(net))
}

fn proto_of(number: u8) -> Result<L4Proto, LowerError> {
    match number {
        6 => Ok(L4Proto::Tcp),
        17 => Ok(L4Proto::Udp),
        132 => Ok(L4Proto::Sctp),
        n => err(format!("protocol {n}")),
    }
}

fn expr_of_load(raw: &RawExpr) -> Option<(Expr, u32, u32)> {
    match raw {
        RawExpr::Payload {
            base: PayloadBase::Transport,
            offset: 2,
            len: 2,
            dreg,
        } => Some((Expr::th_dport(), 2, *dreg)),
        RawExpr::Payload {
            base: PayloadBase::Network,
            offset,
            len,
            dreg,
        } => {
            let field = match (offset, len) {
                (12, 1..=4) => PayloadField::Saddr(Family::Ip),
                (16, 1..=4) => PayloadField::Daddr(Family::Ip),
                (8, 1..=16) => PayloadField::Saddr(Family::Ip6),
                (24, 1..=16) => PayloadField::Daddr(Family::Ip6),
                _ => return None,
            };
            Some((Expr::Payload(field), *len, *dreg))
        }
        RawExpr::MetaLoad { key, dreg } => {
            let (expr, len) = match *key {
                META_L4PROTO => (Expr::MetaL4proto, 1),
                META_MARK => (Expr::MetaMark, 4),
                META_IIFNAME => (Expr::Iifname, IFNAMSIZ as u32),
                _ => return None,
            };
            Some((expr, len, *dreg))
        }
        RawExpr::Ct { key, dreg } => match *key {
            CT_STATE => Some((Expr::CtState, 4, *dreg)),
            CT_STATUS => Some((Expr::CtStatus, 4, *dreg)),
            _ => None,
        },
        RawExpr::Fib {
            flags,
            result: FIB_RESULT_ADDRTYPE,
            dreg,
        } => match *flags {
            FIB_F_SADDR => Some((Expr::FibType(FibInput::Saddr), 4, *dreg)),
            FIB_F_DADDR => Some((Expr::FibType(FibInput::Daddr), 4, *dreg)),
            _ => None,
        },
        RawExpr::Numgen {
            dreg,
            modulus,
            offset: 0,
        } => Some((Expr::NumgenRandom(*modulus), 4, *dreg)),
        RawExpr::Numgen {
            dreg,
            modulus: 1,
            offset,
        } => Some((Expr::Tag(*offset), 4, *dreg)),
        _ => None,
    }
}

/// The 32-bit register index a register number starts at (register 1 = words 8..11).
fn word_index(reg: u32) -> u32 {
    if (1..=4).contains(&reg) {
        REG32_00 + (reg - 1) * 4
    } else {
        reg
    }
}

/// The key loaded at register 1 and onwards: one expression, or a concatenation.
fn key_at(loaded: &[(u32, Loaded)]) -> Result<Expr, LowerError> {
    let mut parts: Vec<(u32, Expr)> = Vec::with_capacity(loaded.len());
    for (reg, value) in loaded {
        let expr = match value {
            Loaded::Value { expr, .. } => expr.clone(),
            Loaded::Masked {
                expr: Expr::Payload(field),
                mask,
            } => match mask.split_last() {
                Some((last, rest)) if rest.iter().all(|b| *b == 0) => {
                    Expr::PayloadAnd(*field, *last)
                }
                _ => return err(format!("a key field masked with {mask:02x?}")),
            },
            _ => continue,
        };
        parts.push((word_index(*reg), expr));
    }
    parts.sort_by_key(|(word, _)| *word);
    match parts.len() {
        0 => err("lookup without a key"),
        1 => Ok(parts.remove(0).1),
        _ => Ok(Expr::Concat(parts.into_iter().map(|(_, e)| e).collect())),
    }
}

fn rhs_for(expr: &Expr, len: u32, data: &[u8]) -> Result<Rhs, LowerError> {
    Ok(match expr {
        Expr::Payload(field @ (PayloadField::Saddr(_) | PayloadField::Daddr(_))) => {
            prefix_of(*field, data, len * 8)?
        }
        Expr::MetaL4proto => Rhs::Proto(proto_of(*data.first().unwrap_or(&0))?),
        Expr::Iifname if data.len() < IFNAMSIZ => {
            Rhs::Ifname(format!("{}*", String::from_utf8_lossy(data)))
        }
        Expr::Iifname => Rhs::Ifname(
            String::from_utf8_lossy(data)
                .trim_end_matches('\0')
                .to_owned(),
        ),
        Expr::FibType(_) if u32_of(data)? == RTN_LOCAL => Rhs::FibLocal,
        Expr::NumgenRandom(_) => Rhs::Number(u32_of(data)?),
        other => return err(format!("no decoding for a compare of {other}")),
    })
}

/// Raises the expressions of one rule back to statements. Fails on any sequence
/// nftproxy does not write, so a foreign or damaged rule is never misread.
pub fn raise(family: Family, exprs: &[RawExpr]) -> Result<Vec<Stmt>, LowerError> {
    let mut stmts = Vec::new();
    let mut regs: Vec<(u32, Loaded)> = Vec::new();
    let set_reg = |regs: &mut Vec<(u32, Loaded)>, reg: u32, value: Loaded| {
        regs.retain(|(r, _)| *r != reg);
        regs.push((reg, value));
    };
    let take_reg = |regs: &mut Vec<(u32, Loaded)>, reg: u32| -> Result<Loaded, LowerError> {
        let index = regs
            .iter()
            .position(|(r, _)| *r == reg)
            .ok_or_else(|| LowerError(format!("register {reg} read before it was written")))?;
        Ok(regs.remove(index).1)
    };
    for raw in exprs {
        if let Some((expr, len, dreg)) = expr_of_load(raw) {
            set_reg(&mut regs, dreg, Loaded::Value { expr, len });
            continue;
        }
        match raw {
            RawExpr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
            } => {
                let loaded = take_reg(&mut regs, *sreg)?;
                let value = match loaded {
                    Loaded::Value {
                        expr: Expr::MetaMark,
                        ..
                    } if xor.iter().any(|b| *b != 0) || mask == &[0xff; 4] => Loaded::MarkUpdate {
                        mask: u32_of(mask)?,
                        xor: u32_of(xor)?,
                    },
                    Loaded::Value { expr, .. } if xor.iter().all(|b| *b == 0) => Loaded::Masked {
                        expr,
                        mask: mask.clone(),
                    },
                    _ => return err("unexpected bitwise operation"),
                };
                set_reg(&mut regs, *dreg, value);
            }
            RawExpr::Cmp { sreg, neq, data } => {
                let op = if *neq { CmpOp::Neq } else { CmpOp::Eq };
                let stmt = match take_reg(&mut regs, *sreg)? {
                    Loaded::Value { expr, len } => Stmt::Match {
                        right: rhs_for(&expr, len, data)?,
                        left: expr,
                        op,
                    },
                    Loaded::Masked {
                        expr: Expr::CtState,
                        mask,
                    } if *neq && u32_of(&mask)? == CT_STATE_NEW && u32_of(data)? == 0 => {
                        Stmt::ct_state_new()
                    }
                    Loaded::Masked {
                        expr: Expr::CtStatus,
                        mask,
                    } if *neq && u32_of(&mask)? == CT_STATUS_DNAT && u32_of(data)? == 0 => {
                        Stmt::eq(Expr::CtStatus, Rhs::CtStatus(CtStatus::Dnat))
                    }
                    Loaded::Masked {
                        expr: Expr::MetaMark,
                        mask,
                    } => Stmt::Match {
                        left: Expr::MetaMarkAnd(u32_of(&mask)?),
                        op,
                        right: Rhs::Mark(u32_of(data)?),
                    },
                    Loaded::Masked {
                        expr: Expr::Payload(field),
                        mask,
                    } => {
                        let prefix_len: u32 = mask.iter().map(|b| b.count_ones()).sum();
                        Stmt::Match {
                            left: Expr::Payload(field),
                            op,
                            right: prefix_of(field, data, prefix_len)?,
                        }
                    }
                    other => return err(format!("unexpected compare of {other:?}")),
                };
                stmts.push(stmt);
            }
            RawExpr::MetaSet {
                key: META_MARK,
                sreg,
            } => match take_reg(&mut regs, *sreg)? {
                Loaded::MarkUpdate { mask, xor } if mask == !xor => {
                    stmts.push(Stmt::SetMark(MarkOp::Or(xor)))
                }
                Loaded::MarkUpdate {
                    mask: u32::MAX,
                    xor,
                } => stmts.push(Stmt::SetMark(MarkOp::Xor(xor))),
                other => return err(format!("unexpected mark update {other:?}")),
            },
            RawExpr::Lookup { sreg, set, dreg } => {
                if word_index(*sreg) != REG32_00 {
                    return err("lookup from a register other than 1");
                }
                let key = key_at(&regs)?;
                regs.clear();
                stmts.push(match dreg {
                    None => Stmt::Lookup {
                        left: key,
                        set: set.clone(),
                    },
                    Some(REG_VERDICT) => Stmt::Vmap {
                        key,
                        map: set.clone(),
                    },
                    Some(REG_1) => {
                        set_reg(
                            &mut regs,
                            REG_1,
                            Loaded::Mapped {
                                key,
                                map: set.clone(),
                            },
                        );
                        continue;
                    }
                    Some(other) => return err(format!("map lookup into register {other}")),
                });
            }
            RawExpr::DynsetUpdate { sreg_key, set } => {
                if word_index(*sreg_key) != REG32_00 {
                    return err("dynset key from a register other than 1");
                }
                let key = key_at(&regs)?;
                regs.clear();
                stmts.push(Stmt::Update {
                    set: set.clone(),
                    key,
                });
            }
            RawExpr::Immediate { dreg, data } => {
                set_reg(&mut regs, *dreg, Loaded::Data(data.clone()))
            }
            // The kernel adds NF_NAT_RANGE_MAP_IPS itself when an address is given.
            RawExpr::Dnat {
                family: nat_family,
                reg_addr,
                reg_proto,
                flags,
            } if *nat_family == nfproto(family)
                && *flags & !(NAT_RANGE_MAP_IPS | NAT_RANGE_PROTO_SPECIFIED) == 0 =>
            {
                let addr = match take_reg(&mut regs, *reg_addr)? {
                    Loaded::Mapped { key, map } if *reg_proto == mapped_port_reg(family) => {
                        stmts.push(Stmt::DnatMap { family, key, map });
                        continue;
                    }
                    Loaded::Data(addr) => addr,
                    other => return err(format!("dnat to {other:?}")),
                };
                let Loaded::Data(port) = take_reg(&mut regs, *reg_proto)? else {
                    return err("dnat port is not an immediate");
                };
                let port: [u8; 2] = port
                    .as_slice()
                    .try_into()
                    .map_err(|_| LowerError("dnat port is not 2 bytes".into()))?;
                stmts.push(Stmt::Dnat {
                    addr: addr_of(&addr)?,
                    port: u16::from_be_bytes(port),
                });
            }
            RawExpr::Masq {
                flags: NAT_RANGE_PROTO_RANDOM_FULLY,
            } => stmts.push(Stmt::MasqueradeFullyRandom),
            RawExpr::Reject {
                kind: REJECT_ICMP_UNREACH,
                code,
            } if *code == ICMP_PORT_UNREACH || *code == ICMPV6_PORT_UNREACH => {
                stmts.push(Stmt::Reject)
            }
            RawExpr::Verdict(verdict) => stmts.push(Stmt::Verdict(verdict.clone())),
            other => return err(format!("unexpected expression {other:?}")),
        }
    }
    if !regs.is_empty() {
        return err("a loaded value is never used");
    }
    Ok(stmts)
}

// === set keys ===

/// nft's type id for a data type (`ipv4_addr` = 7, …; `verdict` = 1).
fn type_id(data_type: DataType) -> u32 {
    match data_type {
        DataType::Verdict => 1,
        DataType::Ipv4Addr => 7,
        DataType::Ipv6Addr => 8,
        DataType::InetProto => 12,
        DataType::InetService => 13,
        DataType::Integer => 4,
    }
}

fn type_of_id(id: u32) -> Result<DataType, LowerError> {
    Ok(match id {
        1 => DataType::Verdict,
        7 => DataType::Ipv4Addr,
        8 => DataType::Ipv6Addr,
        12 => DataType::InetProto,
        13 => DataType::InetService,
        4 => DataType::Integer,
        other => return err(format!("data type {other}")),
    })
}

/// The key type of a set: type ids, 6 bits each, first field highest.
pub fn key_type(types: &[DataType]) -> u32 {
    types.iter().fold(0, |acc, t| (acc << 6) | type_id(*t))
}

/// The data types of a set key type.
pub fn key_types(mut id: u32) -> Result<Vec<DataType>, LowerError> {
    let mut types = Vec::new();
    while id != 0 {
        types.push(type_of_id(id & 0x3f)?);
        id >>= 6;
    }
    types.reverse();
    Ok(types)
}

fn type_len(data_type: DataType) -> usize {
    match data_type {
        DataType::Ipv4Addr => 4,
        DataType::Ipv6Addr => 16,
        DataType::InetProto => 1,
        DataType::InetService => 2,
        DataType::Integer => 4,
        DataType::Verdict => 0,
    }
}

/// The key length of a set: each field padded to 4 bytes when there are several.
pub fn key_len(types: &[DataType]) -> u32 {
    let len: usize = match types {
        [single] => type_len(*single),
        many => many.iter().map(|t| type_len(*t).div_ceil(4) * 4).sum(),
    };
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// A key as bytes: each field in network order, padded to 4 bytes in concatenations.
pub fn key_bytes(values: &[Value]) -> Vec<u8> {
    // Written in place: a cold load lowers a few hundred thousand keys.
    let mut out = Vec::with_capacity(values.len() * 16);
    for value in values {
        match value {
            Value::Addr(IpAddr::V4(v4)) => out.extend_from_slice(&v4.octets()),
            Value::Addr(IpAddr::V6(v6)) => out.extend_from_slice(&v6.octets()),
            Value::Proto(proto) => out.push(proto.number()),
            Value::Port(port) => out.extend_from_slice(&port.to_be_bytes()),
            // numgen writes its result in host order.
            Value::Number(n) => out.extend_from_slice(&n.to_ne_bytes()),
        }
        if values.len() > 1 {
            out.resize(out.len().div_ceil(4) * 4, 0);
        }
    }
    out
}

/// A key read back from bytes, given the set's key types.
pub fn key_values(types: &[DataType], bytes: &[u8]) -> Result<Vec<Value>, LowerError> {
    let mut values = Vec::with_capacity(types.len());
    let mut offset = 0;
    for data_type in types {
        let len = type_len(*data_type);
        let field = bytes
            .get(offset..offset + len)
            .ok_or_else(|| LowerError(format!("key of {} bytes is too short", bytes.len())))?;
        values.push(match data_type {
            DataType::Ipv4Addr | DataType::Ipv6Addr => Value::Addr(addr_of(field)?),
            DataType::InetProto => Value::Proto(proto_of(field[0])?),
            DataType::InetService => Value::Port(u16::from_be_bytes([field[0], field[1]])),
            DataType::Integer => Value::Number(u32_of(field)?),
            DataType::Verdict => return err("verdict in a key"),
        });
        offset += if types.len() > 1 {
            len.div_ceil(4) * 4
        } else {
            len
        };
    }
    Ok(values)
}

// === `typeof` declarations, in nft's set userdata ===
//
// A `typeof` key or value is kept as nested userdata TLVs (type, length, value; numbers
// in host order): the expression's kind (`NFTNL_UDATA_SET_TYPEOF_EXPR`) and its own
// fields (`NFTNL_UDATA_SET_TYPEOF_DATA`); a concatenation lists its parts under indexes
// 0, 1, … with the same two entries each. nft lists a set from these, so they must be
// the ones nft writes.

const TYPEOF_EXPR: u8 = 0;
const TYPEOF_DATA: u8 = 1;
/// nft's `enum expr_types`.
const EXPR_PAYLOAD: u32 = 7;
const EXPR_META: u32 = 9;
const EXPR_CONCAT: u32 = 13;
const EXPR_NUMGEN: u32 = 23;
/// nft's `enum proto_desc_id` and header field indexes.
const PROTO_DESC_UDP: u32 = 6;
const PROTO_DESC_TCP: u32 = 8;
const PROTO_DESC_SCTP: u32 = 10;
const PROTO_DESC_TH: u32 = 11;
const PROTO_DESC_IP: u32 = 12;
const PROTO_DESC_IP6: u32 = 13;
const IPHDR_SADDR: u32 = 11;
const IPHDR_DADDR: u32 = 12;
const IP6HDR_SADDR: u32 = 8;
const IP6HDR_DADDR: u32 = 9;
const THDR_DPORT: u32 = 2;

fn proto_desc(proto: L4Proto) -> u32 {
    match proto {
        L4Proto::Tcp => PROTO_DESC_TCP,
        L4Proto::Udp => PROTO_DESC_UDP,
        L4Proto::Sctp => PROTO_DESC_SCTP,
    }
}

fn proto_of_desc(desc: u32) -> Option<L4Proto> {
    L4Proto::ALL.into_iter().find(|p| proto_desc(*p) == desc)
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) -> Result<(), LowerError> {
    let len = u8::try_from(value.len()).map_err(|_| LowerError("typeof too long".into()))?;
    out.push(kind);
    out.push(len);
    out.extend_from_slice(value);
    Ok(())
}

fn tlv_u32s(values: &[u32]) -> Result<Vec<u8>, LowerError> {
    let mut out = Vec::with_capacity(values.len() * 6);
    for (kind, value) in (0u8..).zip(values) {
        tlv(&mut out, kind, &value.to_ne_bytes())?;
    }
    Ok(out)
}

/// An expression's kind and fields, as nft records them.
fn typeof_fields(expr: &Expr) -> Result<(u32, Vec<u32>), LowerError> {
    Ok(match expr {
        Expr::Payload(field) => (
            EXPR_PAYLOAD,
            match field {
                PayloadField::Saddr(Family::Ip) => vec![PROTO_DESC_IP, IPHDR_SADDR],
                PayloadField::Daddr(Family::Ip) => vec![PROTO_DESC_IP, IPHDR_DADDR],
                PayloadField::Saddr(Family::Ip6) => vec![PROTO_DESC_IP6, IP6HDR_SADDR],
                PayloadField::Daddr(Family::Ip6) => vec![PROTO_DESC_IP6, IP6HDR_DADDR],
                PayloadField::ThDport => vec![PROTO_DESC_TH, THDR_DPORT],
                PayloadField::Dport(proto) => vec![proto_desc(*proto), THDR_DPORT],
            },
        ),
        Expr::MetaL4proto => (EXPR_META, vec![META_L4PROTO]),
        Expr::NumgenRandom(modulus) => (EXPR_NUMGEN, vec![NUMGEN_RANDOM, *modulus, 0]),
        other => return err(format!("{other} cannot declare a set with typeof")),
    })
}

fn typeof_of_fields(kind: u32, fields: &[u32]) -> Result<Expr, LowerError> {
    Ok(match (kind, fields) {
        (EXPR_PAYLOAD, [PROTO_DESC_IP, IPHDR_SADDR]) => Expr::saddr(Family::Ip),
        (EXPR_PAYLOAD, [PROTO_DESC_IP, IPHDR_DADDR]) => Expr::daddr(Family::Ip),
        (EXPR_PAYLOAD, [PROTO_DESC_IP6, IP6HDR_SADDR]) => Expr::saddr(Family::Ip6),
        (EXPR_PAYLOAD, [PROTO_DESC_IP6, IP6HDR_DADDR]) => Expr::daddr(Family::Ip6),
        (EXPR_PAYLOAD, [PROTO_DESC_TH, THDR_DPORT]) => Expr::th_dport(),
        (EXPR_PAYLOAD, [desc, THDR_DPORT]) if let Some(proto) = proto_of_desc(*desc) => {
            Expr::Payload(PayloadField::Dport(proto))
        }
        (EXPR_META, [META_L4PROTO]) => Expr::MetaL4proto,
        (EXPR_NUMGEN, [NUMGEN_RANDOM, modulus, 0]) => Expr::NumgenRandom(*modulus),
        _ => return err(format!("typeof expression {kind} with {fields:?}")),
    })
}

/// One expression (kind, then its fields) as a TLV body.
fn typeof_body(kind: u32, data: &[u8]) -> Result<Vec<u8>, LowerError> {
    let mut out = Vec::new();
    tlv(&mut out, TYPEOF_EXPR, &kind.to_ne_bytes())?;
    tlv(&mut out, TYPEOF_DATA, data)?;
    Ok(out)
}

/// The value of a `NFTNL_UDATA_SET_KEY_TYPEOF` / `_DATA_TYPEOF` entry for `exprs` (a
/// concatenation when there are several).
pub fn typeof_udata(exprs: &[Expr]) -> Result<Vec<u8>, LowerError> {
    if let [single] = exprs {
        let (kind, fields) = typeof_fields(single)?;
        return typeof_body(kind, &tlv_u32s(&fields)?);
    }
    let mut parts = Vec::new();
    for (index, expr) in (0u8..).zip(exprs) {
        let (kind, fields) = typeof_fields(expr)?;
        tlv(&mut parts, index, &typeof_body(kind, &tlv_u32s(&fields)?)?)?;
    }
    typeof_body(EXPR_CONCAT, &parts)
}

/// The TLVs (type, value) of a userdata body, in order; an entry that runs past the end
/// is an error, and the last item.
pub fn tlvs(mut data: &[u8]) -> impl Iterator<Item = Result<(u8, &[u8]), LowerError>> {
    std::iter::from_fn(move || {
        let [kind, len, rest @ ..] = data else {
            return None;
        };
        let Some(value) = rest.get(..usize::from(*len)) else {
            data = &[];
            return Some(err("userdata entry runs past its end"));
        };
        data = &rest[value.len()..];
        Some(Ok((*kind, value)))
    })
}

/// An expression's (kind, fields body) from its TLV body.
fn typeof_parts(body: &[u8]) -> Result<(u32, &[u8]), LowerError> {
    match tlvs(body).collect::<Result<Vec<_>, _>>()?.as_slice() {
        [(TYPEOF_EXPR, kind), (TYPEOF_DATA, data)] => Ok((u32_of(kind)?, data)),
        _ => err("typeof entry without a kind and fields"),
    }
}

fn typeof_single(kind: u32, body: &[u8]) -> Result<Expr, LowerError> {
    let fields = tlvs(body)
        .map(|entry| u32_of(entry?.1))
        .collect::<Result<Vec<_>, _>>()?;
    typeof_of_fields(kind, &fields)
}

/// The expressions of a `typeof` entry written by [`typeof_udata`] (or by nft).
pub fn typeof_exprs(value: &[u8]) -> Result<Vec<Expr>, LowerError> {
    let (kind, body) = typeof_parts(value)?;
    if kind != EXPR_CONCAT {
        return Ok(vec![typeof_single(kind, body)?]);
    }
    tlvs(body)
        .map(|entry| {
            let (kind, fields) = typeof_parts(entry?.1)?;
            typeof_single(kind, fields)
        })
        .collect()
}

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
