//! Canonical `nft -f` text for tables, rules and their parts.
//!
//! Invariant: the text matches what `nft` 1.0.6 prints in `nft list table` for the same
//! objects, statement by statement, so it can be loaded with `nft -f` and compared with
//! what the kernel holds. Every byte here is pinned by the golden files.

use std::fmt::{self, Display, Formatter, Write};
use std::net::IpAddr;

use crate::elements::Element;
use crate::expr::{
    CmpOp, CtState, CtStatus, Expr, FibInput, MarkOp, PayloadField, Rhs, Rule, Stmt,
};
use crate::table::{Chain, Set, Table};
use crate::types::{BaseChain, ChainType, DataType, Hook, L4Proto, Value, Verdict};

/// Formats seconds the way nft prints timeouts: `3h`, `1d1h1m1s`, `10s`.
pub fn format_duration(seconds: u32) -> String {
    if seconds == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let mut rest = seconds;
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if rest >= size {
            // Writing to a String cannot fail.
            let _ = write!(out, "{}{unit}", rest / size);
            rest %= size;
        }
    }
    out
}

impl Display for ChainType {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        })
    }
}

impl Display for Hook {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        })
    }
}

/// nft names a priority after a standard one that is valid for the hook when it lies
/// within 10 of it (`dstnat - 10`), and prints the number otherwise.
fn priority_text(base: &BaseChain) -> String {
    const STANDARD: [(&str, i32, Option<Hook>); 6] = [
        ("raw", -300, None),
        ("mangle", -150, None),
        ("dstnat", -100, Some(Hook::Prerouting)),
        ("filter", 0, None),
        ("security", 50, None),
        ("srcnat", 100, Some(Hook::Postrouting)),
    ];
    let value = base.priority.0;
    for (name, standard, hook) in STANDARD {
        if hook.is_some_and(|h| h != base.hook) {
            continue;
        }
        let offset = value - standard;
        match offset {
            0 => return name.to_owned(),
            1..=10 => return format!("{name} + {offset}"),
            -10..=-1 => return format!("{name} - {}", -offset),
            _ => {}
        }
    }
    value.to_string()
}

impl Display for DataType {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataType::Ipv4Addr => "ipv4_addr",
            DataType::Ipv6Addr => "ipv6_addr",
            DataType::InetProto => "inet_proto",
            DataType::InetService => "inet_service",
            DataType::Verdict => "verdict",
            DataType::Integer => "integer",
        })
    }
}

impl Display for Value {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Value::Addr(addr) => addr.fmt(f),
            Value::Proto(proto) => f.write_str(proto.name()),
            Value::Port(port) => port.fmt(f),
            Value::Number(n) => n.fmt(f),
        }
    }
}

impl Display for Verdict {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Return => f.write_str("return"),
            Verdict::Jump(chain) => write!(f, "jump {chain}"),
            Verdict::Goto(chain) => write!(f, "goto {chain}"),
        }
    }
}

impl Display for Expr {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write_expr(f, self, None)
    }
}

/// An expression; with `proto` set, `th dport` prints as that protocol's port, the way
/// nft shows a port whose `meta l4proto` dependency it folded away.
fn write_expr(f: &mut Formatter<'_>, expr: &Expr, proto: Option<L4Proto>) -> fmt::Result {
    match expr {
        Expr::Payload(PayloadField::Saddr(family)) => write!(f, "{family} saddr"),
        Expr::Payload(PayloadField::Daddr(family)) => write!(f, "{family} daddr"),
        Expr::Payload(PayloadField::Dport(proto)) => write!(f, "{} dport", proto.name()),
        Expr::Payload(PayloadField::ThDport) => match proto {
            Some(proto) => write!(f, "{} dport", proto.name()),
            None => f.write_str("th dport"),
        },
        Expr::PayloadAnd(field, mask) => {
            write_expr(f, &Expr::Payload(*field), proto)?;
            match field.data_type() {
                DataType::Ipv4Addr => write!(f, " & 0.0.0.{mask}"),
                DataType::Ipv6Addr => write!(f, " & ::{mask:x}"),
                _ => write!(f, " & {mask}"),
            }
        }
        Expr::MetaL4proto => f.write_str("meta l4proto"),
        Expr::MetaMark => f.write_str("meta mark"),
        Expr::MetaMarkAnd(mask) => write!(f, "meta mark & {mask:#010x}"),
        Expr::Iifname => f.write_str("iifname"),
        Expr::CtState => f.write_str("ct state"),
        Expr::CtStatus => f.write_str("ct status"),
        Expr::FibType(FibInput::Saddr) => f.write_str("fib saddr type"),
        Expr::FibType(FibInput::Daddr) => f.write_str("fib daddr type"),
        Expr::NumgenRandom(modulus) => write!(f, "numgen random mod {modulus}"),
        Expr::Tag(tag) => write!(f, "numgen random mod 1 offset {tag}"),
        Expr::Concat(parts) => {
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    f.write_str(" . ")?;
                }
                write_expr(f, part, proto)?;
            }
            Ok(())
        }
    }
}

impl Display for Rhs {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Rhs::Prefix(net) if net.prefix_len() == net.max_prefix_len() => net.addr().fmt(f),
            Rhs::Prefix(net) => net.fmt(f),
            Rhs::Proto(proto) => f.write_str(proto.name()),
            Rhs::CtState(CtState::New) => f.write_str("new"),
            Rhs::CtStatus(CtStatus::Dnat) => f.write_str("dnat"),
            Rhs::FibLocal => f.write_str("local"),
            Rhs::Number(n) => n.fmt(f),
            Rhs::Mark(mark) => write!(f, "{mark:#010x}"),
            Rhs::Ifname(name) => write!(f, "\"{name}\""),
        }
    }
}

impl Display for Stmt {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write_stmt(f, self, None)
    }
}

fn write_stmt(f: &mut Formatter<'_>, stmt: &Stmt, proto: Option<L4Proto>) -> fmt::Result {
    let expr = |f: &mut Formatter<'_>, expr: &Expr| write_expr(f, expr, proto);
    match stmt {
        Stmt::Match { left, op, right } => {
            expr(f, left)?;
            match op {
                CmpOp::Eq => write!(f, " {right}"),
                CmpOp::Neq => write!(f, " != {right}"),
            }
        }
        Stmt::Lookup { left, set } => {
            expr(f, left)?;
            write!(f, " @{set}")
        }
        Stmt::Vmap { key, map } => {
            expr(f, key)?;
            write!(f, " vmap @{map}")
        }
        Stmt::SetMark(MarkOp::Or(bits)) => write!(f, "meta mark set meta mark | {bits:#010x}"),
        Stmt::SetMark(MarkOp::Xor(bits)) => write!(f, "meta mark set meta mark ^ {bits:#010x}"),
        Stmt::Update { set, key } => {
            write!(f, "update @{set} {{ ")?;
            expr(f, key)?;
            f.write_str(" }")
        }
        Stmt::Dnat {
            addr: IpAddr::V4(addr),
            port,
        } => write!(f, "dnat to {addr}:{port}"),
        Stmt::Dnat {
            addr: IpAddr::V6(addr),
            port,
        } => write!(f, "dnat to [{addr}]:{port}"),
        Stmt::DnatMap { family, key, map } => {
            write!(f, "dnat {family} to ")?;
            expr(f, key)?;
            write!(f, " map @{map}")
        }
        Stmt::MasqueradeFullyRandom => f.write_str("masquerade fully-random"),
        Stmt::Reject => f.write_str("reject"),
        Stmt::Counter => f.write_str("counter"),
        Stmt::Verdict(verdict) => verdict.fmt(f),
    }
}

/// The protocol of a `meta l4proto` match that nft lists folded into a later `th dport`
/// (as `tcp dport` …): the first statement, when a later one loads the port.
fn folded_protocol(stmts: &[Stmt]) -> Option<L4Proto> {
    let (
        Stmt::Match {
            left: Expr::MetaL4proto,
            op: CmpOp::Eq,
            right: Rhs::Proto(proto),
        },
        rest,
    ) = stmts.split_first()?
    else {
        return None;
    };
    rest.iter().any(Stmt::loads_port).then_some(*proto)
}

impl Display for Rule {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let proto = folded_protocol(&self.stmts);
        let shown = &self.stmts[usize::from(proto.is_some())..];
        for (i, stmt) in shown.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write_stmt(f, stmt, proto)?;
        }
        if let Some(comment) = &self.comment {
            write!(f, " comment \"{comment}\"")?;
        }
        Ok(())
    }
}

impl Display for Element {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for (i, value) in self.key().iter().enumerate() {
            if i > 0 {
                f.write_str(" . ")?;
            }
            value.fmt(f)?;
        }
        if let Some(comment) = self.comment() {
            write!(f, " comment \"{comment}\"")?;
        }
        if let Some(verdict) = self.verdict() {
            write!(f, " : {verdict}")?;
        }
        for (i, value) in self.data().iter().enumerate() {
            f.write_str(if i == 0 { " : " } else { " . " })?;
            value.fmt(f)?;
        }
        Ok(())
    }
}

/// The declaration lines of a set (`type …`, `size …`, `flags …`, `counter`,
/// `timeout …`, `comment …`), in the order nft lists them.
pub(crate) fn set_declaration(set: &Set) -> Vec<String> {
    let mut lines = Vec::with_capacity(5);
    lines.push(match &set.type_of {
        Some(type_of) => {
            let mut line = format!("typeof {}", Expr::Concat(type_of.key.clone()));
            if !type_of.data.is_empty() {
                let _ = write!(line, " : {}", Expr::Concat(type_of.data.clone()));
            }
            line
        }
        None => {
            let join = |types: &[DataType]| {
                types
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" . ")
            };
            let mut line = format!("type {}", join(&set.key));
            if set.is_map() {
                let _ = write!(line, " : {}", join(&set.data));
            }
            line
        }
    });
    if let Some(size) = set.size {
        lines.push(format!("size {size}"));
    }
    match (set.dynamic, set.timeout.is_some()) {
        (true, true) => lines.push("flags dynamic,timeout".to_owned()),
        (true, false) => lines.push("flags dynamic".to_owned()),
        (false, true) => lines.push("flags timeout".to_owned()),
        (false, false) => {}
    }
    if set.counter {
        lines.push("counter".to_owned());
    }
    if let Some(timeout) = set.timeout {
        lines.push(format!("timeout {}", format_duration(timeout)));
    }
    if let Some(comment) = &set.comment {
        lines.push(format!("comment \"{comment}\""));
    }
    lines
}

/// `type filter hook input priority filter; policy accept`
pub(crate) fn base_chain_spec(base: &BaseChain) -> String {
    format!(
        "type {} hook {} priority {}; policy accept",
        base.chain_type,
        base.hook,
        priority_text(base)
    )
}

fn write_set(f: &mut Formatter<'_>, set: &Set) -> fmt::Result {
    let keyword = if set.is_map() { "map" } else { "set" };
    writeln!(f, "\t{keyword} {} {{", set.name)?;
    for line in set_declaration(set) {
        writeln!(f, "\t\t{line}")?;
    }
    for (i, element) in set.elements.values().enumerate() {
        if i == 0 {
            write!(f, "\t\telements = {{ {element}")?;
        } else {
            write!(f, ",\n\t\t\t     {element}")?;
        }
    }
    if !set.elements.is_empty() {
        f.write_str(" }\n")?;
    }
    f.write_str("\t}\n")
}

fn write_chain(f: &mut Formatter<'_>, chain: &Chain) -> fmt::Result {
    writeln!(f, "\tchain {} {{", chain.name)?;
    if let Some(base) = &chain.base {
        writeln!(f, "\t\t{};", base_chain_spec(base))?;
    }
    for rule in &chain.rules {
        writeln!(f, "\t\t{rule}")?;
    }
    f.write_str("\t}\n")
}

impl Display for Table {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(f, "table {} {} {{", self.family, self.name)?;
        if let Some(comment) = &self.comment {
            writeln!(f, "\tcomment \"{comment}\"")?;
        }
        let mut first = true;
        for set in self.sets.values() {
            if !first {
                f.write_str("\n")?;
            }
            first = false;
            write_set(f, set)?;
        }
        for chain in self.chains_in_order() {
            if !first {
                f.write_str("\n")?;
            }
            first = false;
            write_chain(f, chain)?;
        }
        f.write_str("}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Family, L4Proto, Priority};

    #[test]
    fn durations_print_like_nft() {
        assert_eq!(format_duration(10_800), "3h");
        assert_eq!(format_duration(90_061), "1d1h1m1s");
        assert_eq!(format_duration(10), "10s");
        assert_eq!(format_duration(86_400), "1d");
    }

    #[test]
    fn priorities_use_standard_names_only_where_nft_does() {
        let text = |hook, priority| {
            priority_text(&BaseChain {
                chain_type: ChainType::Filter,
                hook,
                priority: Priority(priority),
            })
        };
        assert_eq!(text(Hook::Prerouting, -110), "dstnat - 10");
        assert_eq!(text(Hook::Prerouting, -100), "dstnat");
        assert_eq!(text(Hook::Output, -100), "-100");
        assert_eq!(text(Hook::Output, -110), "-110");
        assert_eq!(text(Hook::Input, 0), "filter");
        assert_eq!(text(Hook::Postrouting, 100), "srcnat");
    }

    #[test]
    fn statements_print_like_nft_list() {
        let mark = Rule::new(vec![
            Stmt::neq(Expr::MetaMarkAnd(0x4000), Rhs::Mark(0)),
            Stmt::SetMark(MarkOp::Xor(0x4000)),
            Stmt::MasqueradeFullyRandom,
        ]);
        assert_eq!(
            mark.to_string(),
            "meta mark & 0x00004000 != 0x00000000 meta mark set meta mark ^ 0x00004000 masquerade fully-random"
        );
        let dnat6 = Rule::new(vec![
            Stmt::eq(Expr::NumgenRandom(2), Rhs::Number(0)),
            Stmt::eq(Expr::MetaL4proto, Rhs::Proto(L4Proto::Sctp)),
            Stmt::Dnat {
                addr: "fd00:10::1".parse().expect("literal"),
                port: 80,
            },
        ]);
        assert_eq!(
            dnat6.to_string(),
            "numgen random mod 2 0 meta l4proto sctp dnat to [fd00:10::1]:80"
        );
        let lookup = Rule::new(vec![
            Stmt::lookup(
                Expr::Concat(vec![
                    Expr::saddr(Family::Ip),
                    Expr::daddr(Family::Ip),
                    Expr::MetaL4proto,
                    Expr::th_dport(),
                ]),
                "hairpin-connections",
            ),
            Stmt::MasqueradeFullyRandom,
        ])
        .with_comment("x");
        assert_eq!(
            lookup.to_string(),
            "ip saddr . ip daddr . meta l4proto . th dport @hairpin-connections masquerade fully-random comment \"x\""
        );
        let shards = |field| {
            Rule::new(vec![Stmt::Vmap {
                key: Expr::Concat(vec![Expr::MetaL4proto, Expr::PayloadAnd(field, 0x0f)]),
                map: "shards".to_owned(),
            }])
            .to_string()
        };
        assert_eq!(
            shards(PayloadField::Daddr(Family::Ip)),
            "meta l4proto . ip daddr & 0.0.0.15 vmap @shards"
        );
        assert_eq!(
            shards(PayloadField::Daddr(Family::Ip6)),
            "meta l4proto . ip6 daddr & ::f vmap @shards"
        );
        assert_eq!(
            shards(PayloadField::ThDport),
            "meta l4proto . th dport & 15 vmap @shards"
        );
    }
}
