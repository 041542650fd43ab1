//! Expressions raised back to statements, for the rules the kernel returns.
//!
//! Invariant: only sequences that [`super::emit`] writes are raised; anything else is an
//! error, so a foreign or damaged rule is never misread.

use super::*;

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

fn prefix_of(field: PayloadField, data: &[u8], prefix_len: u32) -> Result<Rhs, LowerError> {
    let full = addr_offset(field).map_or(0, |(_, len)| len) as usize;
    let mut bytes = data.to_vec();
    bytes.resize(full, 0);
    let addr = addr_of(&bytes)?;
    let net = IpNet::new(addr, u8::try_from(prefix_len).unwrap_or(u8::MAX))
        .map_err(|e| LowerError(e.to_string()))?;
    Ok(Rhs::Prefix(net))
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
            RawExpr::Counter { .. } => stmts.push(Stmt::Counter),
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
