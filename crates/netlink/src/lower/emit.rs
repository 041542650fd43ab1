//! Statements lowered to expressions: loads into registers, compares, lookups, NAT.
//!
//! Invariant: the expressions are the ones `nft` emits for the same statements.

use super::*;

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
            Stmt::Counter => out.push(RawExpr::Counter {
                packets: 0,
                bytes: 0,
            }),
            Stmt::Verdict(verdict) => out.push(RawExpr::Verdict(verdict.clone())),
        }
    }
    Ok(out)
}
