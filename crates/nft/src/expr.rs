//! Typed rule statements: the closed set of matches and actions nftproxy emits.
//!
//! Rules are values, never strings, so that the netlink encoder can lower every rule to
//! bytecode and the packet tracer can evaluate every rule without parsing text.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::types::{DataType, Family, L4Proto, Verdict};

/// A packet header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadField {
    /// `ip saddr` / `ip6 saddr` (by family).
    Saddr(Family),
    /// `ip daddr` / `ip6 daddr` (by family).
    Daddr(Family),
    /// `th dport`: the destination port of TCP, UDP or SCTP.
    ThDport,
    /// `tcp dport`, `udp dport`, `sctp dport`: only in `typeof` declarations. (Rules
    /// load `th dport` after a `meta l4proto` match, which nft lists the same way.)
    Dport(L4Proto),
}

impl PayloadField {
    /// The type of the field's value.
    pub fn data_type(self) -> DataType {
        match self {
            PayloadField::Saddr(family) | PayloadField::Daddr(family) => family.addr_type(),
            PayloadField::ThDport | PayloadField::Dport(_) => DataType::InetService,
        }
    }
}

/// Which address `fib` looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FibInput {
    /// `fib saddr type`
    Saddr,
    /// `fib daddr type`
    Daddr,
}

/// Something a rule loads from the packet or its context.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// A header field.
    Payload(PayloadField),
    /// `meta l4proto`
    MetaL4proto,
    /// `meta mark`
    MetaMark,
    /// `meta mark & MASK`
    MetaMarkAnd(u32),
    /// `FIELD & MASK` with MASK covering the field's last byte only (`ip daddr &
    /// 0.0.0.15`, `th dport & 15`): the low bits of an address or a port, as a set key.
    PayloadAnd(PayloadField, u8),
    /// `iifname`
    Iifname,
    /// `ct state`
    CtState,
    /// `ct status`
    CtStatus,
    /// `fib saddr|daddr type`: the address type of a route lookup.
    FibType(FibInput),
    /// `numgen random mod N`: a fresh random number in `0..N` for every evaluation.
    NumgenRandom(u32),
    /// `numgen random mod 1 offset N`: always N. A constant in a concatenated key, where
    /// nft 1.0.6 takes no literal (`ip saddr . 7 @set` does not parse).
    Tag(u32),
    /// `a . b . c`: a concatenation, for set lookups.
    Concat(Vec<Expr>),
}

impl Expr {
    /// The type of what this expression loads, as a set key or map value field; `None`
    /// for expressions nftproxy never stores in a set.
    pub fn data_type(&self) -> Option<DataType> {
        match self {
            Expr::Payload(field) | Expr::PayloadAnd(field, _) => Some(field.data_type()),
            Expr::MetaL4proto => Some(DataType::InetProto),
            Expr::NumgenRandom(_) | Expr::Tag(_) => Some(DataType::Integer),
            _ => None,
        }
    }

    /// Whether this expression loads `th dport`.
    pub fn loads_port(&self) -> bool {
        match self {
            Expr::Payload(PayloadField::ThDport) | Expr::PayloadAnd(PayloadField::ThDport, _) => {
                true
            }
            Expr::Concat(parts) => parts.iter().any(Expr::loads_port),
            _ => false,
        }
    }

    /// `ip saddr` or `ip6 saddr`.
    pub fn saddr(family: Family) -> Expr {
        Expr::Payload(PayloadField::Saddr(family))
    }

    /// `ip daddr` or `ip6 daddr`.
    pub fn daddr(family: Family) -> Expr {
        Expr::Payload(PayloadField::Daddr(family))
    }

    /// `th dport`.
    pub fn th_dport() -> Expr {
        Expr::Payload(PayloadField::ThDport)
    }
}

/// A `ct state` bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CtState {
    /// `new`
    New,
}

/// A `ct status` bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CtStatus {
    /// `dnat`: the connection's destination was rewritten.
    Dnat,
}

/// A constant a loaded value is compared with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Rhs {
    /// An address (a full-length prefix prints as the bare address).
    Prefix(IpNet),
    /// A protocol.
    Proto(L4Proto),
    /// A `ct state` bit.
    CtState(CtState),
    /// A `ct status` bit.
    CtStatus(CtStatus),
    /// `local`, for `fib … type`.
    FibLocal,
    /// A plain unsigned number (numgen results).
    Number(u32),
    /// A 32-bit mark, printed as `0x%08x`.
    Mark(u32),
    /// An interface name; a trailing `*` makes it a prefix match.
    Ifname(String),
}

impl Rhs {
    /// A single address as a constant.
    pub fn addr(addr: IpAddr) -> Rhs {
        Rhs::Prefix(IpNet::from(addr))
    }
}

/// Equality or inequality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    /// implicit `==`
    Eq,
    /// `!=`
    Neq,
}

/// How `meta mark set` combines the masquerade bit with the current mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MarkOp {
    /// `meta mark set meta mark | BIT`
    Or(u32),
    /// `meta mark set meta mark ^ BIT`
    Xor(u32),
}

/// One statement of a rule. Statements run left to right; a failed match ends the rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Stmt {
    /// `LEFT [!=] RIGHT`
    Match {
        /// What is loaded.
        left: Expr,
        /// Comparison.
        op: CmpOp,
        /// The constant.
        right: Rhs,
    },
    /// `LEFT @SET`: matches when the key is in the named set.
    Lookup {
        /// The key.
        left: Expr,
        /// The named set.
        set: String,
    },
    /// `KEY vmap @MAP`: the verdict of the element the key finds; no verdict if absent.
    Vmap {
        /// The key.
        key: Expr,
        /// The named verdict map.
        map: String,
    },
    /// `meta mark set …`
    SetMark(MarkOp),
    /// `update @SET { KEY }`: add or refresh the key in a dynamic set.
    Update {
        /// The dynamic set.
        set: String,
        /// The key.
        key: Expr,
    },
    /// `dnat to ADDR:PORT`; must follow a `meta l4proto` match.
    Dnat {
        /// New destination address.
        addr: IpAddr,
        /// New destination port.
        port: u16,
    },
    /// `dnat ip to KEY map @MAP`: the address and port of the element the key finds; no
    /// match if absent. Must follow a `meta l4proto` match, like `Dnat`.
    DnatMap {
        /// The family of the new destination.
        family: Family,
        /// The key.
        key: Expr,
        /// The named map, of `address . port` values.
        map: String,
    },
    /// `masquerade fully-random`
    MasqueradeFullyRandom,
    /// `reject` (ICMP port unreachable for this family).
    Reject,
    /// `counter`: counts the packets (and bytes) that reach it. Its numbers are the
    /// kernel's alone: a rule is the same rule whatever its counter holds.
    Counter,
    /// A verdict.
    Verdict(Verdict),
}

impl Stmt {
    /// `LEFT RIGHT`
    pub fn eq(left: Expr, right: Rhs) -> Stmt {
        Stmt::Match {
            left,
            op: CmpOp::Eq,
            right,
        }
    }

    /// `LEFT != RIGHT`
    pub fn neq(left: Expr, right: Rhs) -> Stmt {
        Stmt::Match {
            left,
            op: CmpOp::Neq,
            right,
        }
    }

    /// `LEFT @SET`
    pub fn lookup(left: Expr, set: impl Into<String>) -> Stmt {
        Stmt::Lookup {
            left,
            set: set.into(),
        }
    }

    /// Whether an expression of this statement loads `th dport`.
    pub fn loads_port(&self) -> bool {
        match self {
            Stmt::Match { left, .. } | Stmt::Lookup { left, .. } => left.loads_port(),
            Stmt::Vmap { key, .. } | Stmt::Update { key, .. } | Stmt::DnatMap { key, .. } => {
                key.loads_port()
            }
            _ => false,
        }
    }

    /// `ct state new`
    pub fn ct_state_new() -> Stmt {
        Stmt::eq(Expr::CtState, Rhs::CtState(CtState::New))
    }

    /// `jump CHAIN`
    pub fn jump(chain: impl Into<String>) -> Stmt {
        Stmt::Verdict(Verdict::Jump(chain.into()))
    }

    /// `goto CHAIN`
    pub fn goto(chain: impl Into<String>) -> Stmt {
        Stmt::Verdict(Verdict::Goto(chain.into()))
    }
}

/// A rule: statements and an optional comment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The statements, in evaluation order. Shared, so that the copies of a table (the
    /// reconciler's record of the kernel, a transaction's rules) cost a pointer per rule.
    pub stmts: Arc<[Stmt]>,
    /// A comment for humans; at most 128 bytes (the kernel's userdata limit for nft).
    pub comment: Option<String>,
}

impl Rule {
    /// A rule without a comment.
    pub fn new(stmts: Vec<Stmt>) -> Rule {
        Rule {
            stmts: stmts.into(),
            comment: None,
        }
    }

    /// The chains this rule jumps or goes to.
    pub fn referenced_chains(&self) -> impl Iterator<Item = &str> {
        self.stmts.iter().filter_map(|stmt| match stmt {
            Stmt::Verdict(verdict) => verdict.target(),
            _ => None,
        })
    }

    /// The sets and maps this rule looks up or updates.
    pub fn referenced_sets(&self) -> impl Iterator<Item = &str> {
        self.stmts.iter().filter_map(|stmt| match stmt {
            Stmt::Lookup { set, .. } | Stmt::Update { set, .. } => Some(set.as_str()),
            Stmt::Vmap { map, .. } | Stmt::DnatMap { map, .. } => Some(map.as_str()),
            _ => None,
        })
    }

    /// The same rule with a comment.
    pub fn with_comment(mut self, comment: impl Into<String>) -> Rule {
        self.comment = Some(comment.into());
        self
    }
}
