//! Dump replies parsed back into nftproxy's objects: the generation, tables, chains,
//! rules, sets and elements, read in safe Rust with the bounds-checked attribute walker
//! ([`crate::attr`]). libnftnl's own parsers end the process (`exit`, "kernel ABI is
//! broken") on an attribute of an unexpected size, so no reply ever reaches them.
//!
//! Invariant: a parser reads only the [`Message`] it is given, one whole message
//! borrowed from the receive buffer; every attribute it reads lies inside it, every
//! integer has exactly its size (or the attribute is taken as absent), and everything it
//! keeps is copied out. A reply that is not what nftproxy writes is a named
//! [`Error::Decode`], never a panic.

use nftproxy_nft::{
    BaseChain, Chain, ChainType, Count, CountedRule, DataType, Element, Family, Hook, Priority,
    Rule, Set, TypeOf, Verdict,
};

use crate::attr::{attributes, text};
use crate::lower::{self, PayloadBase, RawExpr};
use crate::socket::Message;
use crate::{Error, udata};

/// The attribute numbers of linux/netfilter/nf_tables.h that replies are read by.
mod nfta {
    pub const LIST_ELEM: u16 = 1;
    pub const HOOK_HOOKNUM: u16 = 1;
    pub const HOOK_PRIORITY: u16 = 2;
    pub const TABLE_NAME: u16 = 1;
    pub const TABLE_USERDATA: u16 = 6;
    pub const CHAIN_TABLE: u16 = 1;
    pub const CHAIN_NAME: u16 = 3;
    pub const CHAIN_HOOK: u16 = 4;
    pub const CHAIN_POLICY: u16 = 5;
    pub const CHAIN_TYPE: u16 = 7;
    pub const RULE_TABLE: u16 = 1;
    pub const RULE_CHAIN: u16 = 2;
    pub const RULE_HANDLE: u16 = 3;
    pub const RULE_EXPRESSIONS: u16 = 4;
    pub const RULE_USERDATA: u16 = 7;
    pub const SET_DESC_SIZE: u16 = 1;
    pub const SET_TABLE: u16 = 1;
    pub const SET_NAME: u16 = 2;
    pub const SET_FLAGS: u16 = 3;
    pub const SET_KEY_TYPE: u16 = 4;
    pub const SET_DATA_TYPE: u16 = 6;
    pub const SET_DESC: u16 = 9;
    pub const SET_TIMEOUT: u16 = 11;
    pub const SET_USERDATA: u16 = 13;
    pub const SET_EXPR: u16 = 17;
    pub const SET_EXPRESSIONS: u16 = 18;
    pub const SET_ELEM_KEY: u16 = 1;
    pub const SET_ELEM_DATA: u16 = 2;
    pub const SET_ELEM_USERDATA: u16 = 6;
    pub const SET_ELEM_EXPR: u16 = 7;
    pub const SET_ELEM_EXPRESSIONS: u16 = 11;
    pub const SET_ELEM_LIST_ELEMENTS: u16 = 3;
    pub const DATA_VALUE: u16 = 1;
    pub const DATA_VERDICT: u16 = 2;
    pub const VERDICT_CODE: u16 = 1;
    pub const VERDICT_CHAIN: u16 = 2;
    pub const EXPR_NAME: u16 = 1;
    pub const EXPR_DATA: u16 = 2;
    pub const GEN_ID: u16 = 1;
}

/// `NFT_DATA_VERDICT`: a map's value type when its values are verdicts.
const DATA_VERDICT: u32 = 0xffff_ff00;
/// The size the kernel gives a dynamic set that was created without one.
const DYNSET_DEFAULT_SIZE: u32 = 0xffff;
/// The netlink and nfgenmsg headers before a message's attributes.
const HEADERS: usize = 20;

/// The attributes of one level, by type: the first of each type counts.
struct Attrs<'a>(Vec<(u16, &'a [u8])>);

impl<'a> Attrs<'a> {
    fn of(bytes: &'a [u8]) -> Attrs<'a> {
        Attrs(attributes(bytes).collect())
    }

    /// The attributes of a message, after its headers.
    fn of_message(message: Message<'a>) -> Attrs<'a> {
        Attrs::of(message.bytes().get(HEADERS..).unwrap_or_default())
    }

    fn get(&self, kind: u16) -> Option<&'a [u8]> {
        self.0.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
    }

    fn str(&self, kind: u16) -> Option<String> {
        self.get(kind).map(text)
    }

    /// A big-endian 32-bit attribute; absent (as libnftnl reads it, 0) unless it has
    /// exactly four bytes.
    fn u32(&self, kind: u16) -> Option<u32> {
        Some(u32::from_be_bytes(self.get(kind)?.try_into().ok()?))
    }

    fn u64(&self, kind: u16) -> Option<u64> {
        Some(u64::from_be_bytes(self.get(kind)?.try_into().ok()?))
    }

    fn nested(&self, kind: u16) -> Option<Attrs<'a>> {
        self.get(kind).map(Attrs::of)
    }

    /// The bytes of an `NFTA_DATA_VALUE` inside the nest `kind`.
    fn data(&self, kind: u16) -> Option<&'a [u8]> {
        self.nested(kind)?.get(nfta::DATA_VALUE)
    }
}

fn decode(what: impl Into<String>) -> Error {
    Error::Decode(what.into())
}

/// The generation id of a NEWGEN reply.
pub(crate) fn parse_generation(message: Message<'_>) -> Result<u32, Error> {
    Attrs::of_message(message)
        .u32(nfta::GEN_ID)
        .ok_or_else(|| decode("generation message"))
}

/// A table header parsed from a GETTABLE reply: its name and comment.
pub(crate) fn parse_table(message: Message<'_>) -> Result<(String, Option<String>), Error> {
    let attrs = Attrs::of_message(message);
    let name = attrs
        .str(nfta::TABLE_NAME)
        .ok_or_else(|| decode("table message without a name"))?;
    let comment = attrs
        .get(nfta::TABLE_USERDATA)
        .and_then(|data| udata::comment_of(data, udata::TABLE_COMMENT));
    Ok((name, comment))
}

fn hook_of(number: u32) -> Option<Hook> {
    Some(match number as i32 {
        libc::NF_INET_PRE_ROUTING => Hook::Prerouting,
        libc::NF_INET_LOCAL_IN => Hook::Input,
        libc::NF_INET_FORWARD => Hook::Forward,
        libc::NF_INET_LOCAL_OUT => Hook::Output,
        libc::NF_INET_POST_ROUTING => Hook::Postrouting,
        _ => return None,
    })
}

/// A chain parsed from a GETCHAIN reply, with the table it belongs to.
pub(crate) fn parse_chain(message: Message<'_>) -> Result<(String, Chain), Error> {
    let attrs = Attrs::of_message(message);
    let (Some(table), Some(name)) = (attrs.str(nfta::CHAIN_TABLE), attrs.str(nfta::CHAIN_NAME))
    else {
        return Err(decode("chain message without a table or name"));
    };
    let base = match attrs.nested(nfta::CHAIN_HOOK) {
        None => None,
        Some(hook) => {
            let chain_type = match attrs.str(nfta::CHAIN_TYPE).as_deref() {
                Some("filter") => Some(ChainType::Filter),
                Some("nat") => Some(ChainType::Nat),
                _ => None,
            };
            let policy = attrs.u32(nfta::CHAIN_POLICY).unwrap_or(0);
            match (hook.u32(nfta::HOOK_HOOKNUM).and_then(hook_of), chain_type) {
                (Some(hook_kind), Some(chain_type)) if policy == libc::NF_ACCEPT as u32 => {
                    Some(BaseChain {
                        chain_type,
                        hook: hook_kind,
                        priority: Priority(hook.u32(nfta::HOOK_PRIORITY).unwrap_or(0) as i32),
                    })
                }
                _ => {
                    return Err(decode(format!(
                        "base chain {name} is not one nftproxy writes"
                    )));
                }
            }
        }
    };
    Ok((
        table,
        Chain {
            name,
            base,
            rules: Vec::new(),
        },
    ))
}

/// What a GETRULE reply holds: table, chain, handle, expressions and userdata.
struct RuleReply<'a> {
    table: String,
    chain: String,
    handle: u64,
    attrs: Attrs<'a>,
}

impl<'a> RuleReply<'a> {
    fn of(message: Message<'a>) -> Result<RuleReply<'a>, Error> {
        let attrs = Attrs::of_message(message);
        let (Some(table), Some(chain)) = (attrs.str(nfta::RULE_TABLE), attrs.str(nfta::RULE_CHAIN))
        else {
            return Err(decode("rule message without a table or chain"));
        };
        Ok(RuleReply {
            table,
            chain,
            handle: attrs.u64(nfta::RULE_HANDLE).unwrap_or(0),
            attrs,
        })
    }

    /// The expressions, in order: (name, attributes of its data).
    fn exprs(&self) -> Vec<(String, Attrs<'a>)> {
        let Some(list) = self.attrs.get(nfta::RULE_EXPRESSIONS) else {
            return Vec::new();
        };
        attributes(list).map(|(_, expr)| expr_parts(expr)).collect()
    }

    /// The expressions as nftproxy's raw ones, with the numbers of the first counter.
    fn raw(&self) -> Result<(Vec<RawExpr>, Option<Count>), Error> {
        let mut raw = Vec::new();
        let mut count = None;
        for (name, data) in self.exprs() {
            let expr = raw_expr(&name, &data)?;
            if let RawExpr::Counter { packets, bytes } = expr {
                count.get_or_insert(Count { packets, bytes });
            }
            raw.push(expr);
        }
        Ok((raw, count))
    }

    /// The rule, its expressions being `raw`.
    fn rule(&self, family: Family, raw: &[RawExpr]) -> Result<Rule, Error> {
        let stmts = lower::raise(family, raw)
            .map_err(|e| decode(format!("a rule in chain {}: {e}", self.chain)))?;
        let comment = self
            .attrs
            .get(nfta::RULE_USERDATA)
            .and_then(|data| udata::comment_of(data, udata::RULE_COMMENT));
        Ok(Rule {
            stmts: stmts.into(),
            comment,
        })
    }
}

/// An expression's name and the attributes of its data, from its nest.
fn expr_parts(expr: &[u8]) -> (String, Attrs<'_>) {
    let attrs = Attrs::of(expr);
    let name = attrs.str(nfta::EXPR_NAME).unwrap_or_default();
    let data = attrs.nested(nfta::EXPR_DATA).unwrap_or(Attrs(Vec::new()));
    (name, data)
}

/// Table, chain and handle of a rule in a GETRULE reply (its expressions unread).
pub(crate) fn parse_rule_handle(message: Message<'_>) -> Result<(String, String, u64), Error> {
    let reply = RuleReply::of(message)?;
    Ok((reply.table, reply.chain, reply.handle))
}

/// A rule parsed from a GETRULE reply: table, chain and the rule.
pub(crate) fn parse_rule(
    message: Message<'_>,
    family: Family,
) -> Result<(String, String, Rule), Error> {
    let reply = RuleReply::of(message)?;
    let (raw, _) = reply.raw()?;
    let rule = reply.rule(family, &raw)?;
    Ok((reply.table, reply.chain, rule))
}

/// A rule with a `counter` statement, from a GETRULE reply: its table and the counted
/// rule; `None` for a rule without one.
pub(crate) fn parse_counted_rule(
    message: Message<'_>,
    family: Family,
) -> Result<Option<(String, CountedRule)>, Error> {
    let reply = RuleReply::of(message)?;
    let (raw, count) = reply.raw()?;
    let Some(count) = count else {
        return Ok(None);
    };
    let rule = reply.rule(family, &raw)?;
    Ok(Some((
        reply.table,
        CountedRule {
            chain: reply.chain,
            handle: reply.handle,
            rule,
            count,
        },
    )))
}

/// A rule of any program's table, read only as far as cleaning up needs: its table,
/// chain and handle, and the chains it jumps or goes to (an `immediate` verdict naming
/// one, as nft and iptables-nft both write them; every other expression names none).
pub(crate) fn parse_rule_jumps(
    message: Message<'_>,
) -> Result<(String, String, u64, Vec<String>), Error> {
    let reply = RuleReply::of(message)?;
    let jumps = reply
        .exprs()
        .iter()
        .filter(|(name, _)| name == "immediate")
        .filter_map(|(_, data)| {
            let verdict = data
                .nested(expr::immediate::DATA)?
                .nested(nfta::DATA_VERDICT)?;
            verdict.str(nfta::VERDICT_CHAIN)
        })
        .collect();
    Ok((reply.table, reply.chain, reply.handle, jumps))
}

/// The verdict of an `NFTA_DATA_VERDICT` nest.
fn verdict_of(verdict: &Attrs<'_>) -> Result<Verdict, Error> {
    let code = verdict.u32(nfta::VERDICT_CODE).unwrap_or(0) as i32;
    Ok(match (code, verdict.str(nfta::VERDICT_CHAIN)) {
        (libc::NF_ACCEPT, _) => Verdict::Accept,
        (libc::NF_DROP, _) => Verdict::Drop,
        (libc::NFT_RETURN, _) => Verdict::Return,
        (libc::NFT_JUMP, Some(chain)) => Verdict::Jump(chain),
        (libc::NFT_GOTO, Some(chain)) => Verdict::Goto(chain),
        (code, _) => return Err(decode(format!("verdict code {code}"))),
    })
}

/// The attribute numbers of each expression's data (linux/netfilter/nf_tables.h).
mod expr {
    pub mod payload {
        pub const DREG: u16 = 1;
        pub const BASE: u16 = 2;
        pub const OFFSET: u16 = 3;
        pub const LEN: u16 = 4;
    }
    pub mod meta {
        pub const DREG: u16 = 1;
        pub const KEY: u16 = 2;
        pub const SREG: u16 = 3;
    }
    pub mod ct {
        pub const DREG: u16 = 1;
        pub const KEY: u16 = 2;
    }
    pub mod bitwise {
        pub const SREG: u16 = 1;
        pub const DREG: u16 = 2;
        pub const MASK: u16 = 4;
        pub const XOR: u16 = 5;
    }
    pub mod cmp {
        pub const SREG: u16 = 1;
        pub const OP: u16 = 2;
        pub const DATA: u16 = 3;
    }
    pub mod lookup {
        pub const SET: u16 = 1;
        pub const SREG: u16 = 2;
        pub const DREG: u16 = 3;
    }
    pub mod immediate {
        pub const DREG: u16 = 1;
        pub const DATA: u16 = 2;
    }
    pub mod numgen {
        pub const DREG: u16 = 1;
        pub const MODULUS: u16 = 2;
        pub const TYPE: u16 = 3;
        pub const OFFSET: u16 = 4;
    }
    pub mod fib {
        pub const DREG: u16 = 1;
        pub const RESULT: u16 = 2;
        pub const FLAGS: u16 = 3;
    }
    pub mod dynset {
        pub const SET_NAME: u16 = 1;
        pub const OP: u16 = 3;
        pub const SREG_KEY: u16 = 4;
    }
    pub mod nat {
        pub const TYPE: u16 = 1;
        pub const FAMILY: u16 = 2;
        pub const REG_ADDR_MIN: u16 = 3;
        pub const REG_PROTO_MIN: u16 = 5;
        pub const FLAGS: u16 = 7;
    }
    pub mod masq {
        pub const FLAGS: u16 = 1;
    }
    pub mod reject {
        pub const TYPE: u16 = 1;
        pub const ICMP_CODE: u16 = 2;
    }
    pub mod counter {
        pub const BYTES: u16 = 1;
        pub const PACKETS: u16 = 2;
    }
}

/// An expression of a rule, as nftproxy writes them.
fn raw_expr(name: &str, data: &Attrs<'_>) -> Result<RawExpr, Error> {
    // Absent attributes read as 0, as libnftnl's getters read them.
    let u = |kind: u16| data.u32(kind).unwrap_or(0);
    Ok(match name {
        "payload" => RawExpr::Payload {
            base: match u(expr::payload::BASE) {
                1 => PayloadBase::Network,
                2 => PayloadBase::Transport,
                other => return Err(decode(format!("payload base {other}"))),
            },
            offset: u(expr::payload::OFFSET),
            len: u(expr::payload::LEN),
            dreg: u(expr::payload::DREG),
        },
        "meta" if data.get(expr::meta::SREG).is_some() => RawExpr::MetaSet {
            key: u(expr::meta::KEY),
            sreg: u(expr::meta::SREG),
        },
        "meta" => RawExpr::MetaLoad {
            key: u(expr::meta::KEY),
            dreg: u(expr::meta::DREG),
        },
        "ct" => RawExpr::Ct {
            key: u(expr::ct::KEY),
            dreg: u(expr::ct::DREG),
        },
        "bitwise" => RawExpr::Bitwise {
            sreg: u(expr::bitwise::SREG),
            dreg: u(expr::bitwise::DREG),
            mask: data.data(expr::bitwise::MASK).unwrap_or_default().to_vec(),
            xor: data.data(expr::bitwise::XOR).unwrap_or_default().to_vec(),
        },
        "cmp" => RawExpr::Cmp {
            sreg: u(expr::cmp::SREG),
            neq: u(expr::cmp::OP) == libc::NFT_CMP_NEQ as u32,
            data: data.data(expr::cmp::DATA).unwrap_or_default().to_vec(),
        },
        "lookup" => RawExpr::Lookup {
            sreg: u(expr::lookup::SREG),
            set: data.str(expr::lookup::SET).unwrap_or_default(),
            dreg: data.u32(expr::lookup::DREG),
        },
        "immediate" if u(expr::immediate::DREG) == lower::REG_VERDICT => {
            let verdict = data
                .nested(expr::immediate::DATA)
                .and_then(|d| d.nested(nfta::DATA_VERDICT))
                .ok_or_else(|| decode("an immediate verdict without its verdict"))?;
            RawExpr::Verdict(verdict_of(&verdict)?)
        }
        "immediate" => RawExpr::Immediate {
            dreg: u(expr::immediate::DREG),
            data: data
                .data(expr::immediate::DATA)
                .unwrap_or_default()
                .to_vec(),
        },
        "numgen" if u(expr::numgen::TYPE) == libc::NFT_NG_RANDOM as u32 => RawExpr::Numgen {
            dreg: u(expr::numgen::DREG),
            modulus: u(expr::numgen::MODULUS),
            offset: u(expr::numgen::OFFSET),
        },
        "fib" => RawExpr::Fib {
            flags: u(expr::fib::FLAGS),
            result: u(expr::fib::RESULT),
            dreg: u(expr::fib::DREG),
        },
        "dynset" if u(expr::dynset::OP) == libc::NFT_DYNSET_OP_UPDATE as u32 => {
            RawExpr::DynsetUpdate {
                sreg_key: u(expr::dynset::SREG_KEY),
                set: data.str(expr::dynset::SET_NAME).unwrap_or_default(),
            }
        }
        "nat" if u(expr::nat::TYPE) == libc::NFT_NAT_DNAT as u32 => RawExpr::Dnat {
            family: u(expr::nat::FAMILY),
            reg_addr: u(expr::nat::REG_ADDR_MIN),
            reg_proto: u(expr::nat::REG_PROTO_MIN),
            flags: u(expr::nat::FLAGS),
        },
        "masq" => RawExpr::Masq {
            flags: u(expr::masq::FLAGS),
        },
        "reject" => RawExpr::Reject {
            kind: u(expr::reject::TYPE),
            code: data
                .get(expr::reject::ICMP_CODE)
                .and_then(|c| c.first().copied())
                .unwrap_or(0),
        },
        "counter" => {
            let Count { packets, bytes } = counter_of(data);
            RawExpr::Counter { packets, bytes }
        }
        other => {
            return Err(decode(format!(
                "expression {other:?} is not one nftproxy writes"
            )));
        }
    })
}

/// The numbers of the first `counter` among the expressions of a set or an element:
/// one expression (`single`), or a list of them (`list`).
fn first_counter(single: Option<&[u8]>, list: Option<&[u8]>) -> Option<Count> {
    let listed = list.into_iter().flat_map(|l| attributes(l).map(|(_, e)| e));
    single.into_iter().chain(listed).find_map(|expr| {
        let (name, data) = expr_parts(expr);
        (name == "counter").then(|| counter_of(&data))
    })
}

/// A `counter` expression's numbers.
fn counter_of(data: &Attrs<'_>) -> Count {
    Count {
        packets: data.u64(expr::counter::PACKETS).unwrap_or(0),
        bytes: data.u64(expr::counter::BYTES).unwrap_or(0),
    }
}

/// A set declaration parsed from a GETSET reply, with its table.
pub(crate) fn parse_set(message: Message<'_>) -> Result<(String, Set), Error> {
    let attrs = Attrs::of_message(message);
    let (Some(table), Some(name)) = (attrs.str(nfta::SET_TABLE), attrs.str(nfta::SET_NAME)) else {
        return Err(decode("set message without a table or name"));
    };
    let flags = attrs.u32(nfta::SET_FLAGS).unwrap_or(0);
    let key = lower::key_types(attrs.u32(nfta::SET_KEY_TYPE).unwrap_or(0))
        .map_err(|e| decode(format!("set {name}: {e}")))?;
    let is_map = flags & libc::NFT_SET_MAP as u32 != 0;
    let data = match attrs.u32(nfta::SET_DATA_TYPE).unwrap_or(0) {
        _ if !is_map => Vec::new(),
        DATA_VERDICT => vec![DataType::Verdict],
        id => lower::key_types(id).map_err(|e| decode(format!("map {name}: {e}")))?,
    };
    let timeout = (flags & libc::NFT_SET_TIMEOUT as u32 != 0)
        .then(|| (attrs.u64(nfta::SET_TIMEOUT).unwrap_or(0) / 1000) as u32);
    let size = attrs
        .nested(nfta::SET_DESC)
        .and_then(|desc| desc.u32(nfta::SET_DESC_SIZE));
    let udata = attrs.get(nfta::SET_USERDATA).unwrap_or_default();
    let comment = udata::comment_of(udata, udata::SET_COMMENT);
    let typeof_entry = |kind: u8| {
        udata::entry(udata, kind)
            .map(lower::typeof_exprs)
            .transpose()
            .map_err(|e| decode(format!("set {name}: {e}")))
    };
    let type_of = match typeof_entry(udata::SET_KEY_TYPEOF)? {
        Some(key) => Some(TypeOf {
            key,
            data: typeof_entry(udata::SET_DATA_TYPEOF)?.unwrap_or_default(),
        }),
        None => None,
    };
    let mut decoded = Set::new(name, key);
    decoded.data = data;
    decoded.type_of = type_of;
    decoded.dynamic = flags & libc::NFT_SET_EVAL as u32 != 0;
    decoded.timeout = timeout;
    // A set without a size gets 65,535 from the kernel when an `update` binds it
    // (nft_dynset_init), without its hash table being sized for that: it is the
    // kernel's default, not something the set was created with.
    decoded.size = size.filter(|s| *s != 0 && !(decoded.dynamic && *s == DYNSET_DEFAULT_SIZE));
    decoded.comment = comment;
    decoded.counter =
        first_counter(attrs.get(nfta::SET_EXPR), attrs.get(nfta::SET_EXPRESSIONS)).is_some();
    Ok((table, decoded))
}

/// The elements of a GETSETELEM reply, decoded with the set's key types, each with its
/// counter's numbers when the set counts.
pub(crate) fn parse_elements(
    message: Message<'_>,
    set: &Set,
) -> Result<Vec<(Element, Option<Count>)>, Error> {
    let attrs = Attrs::of_message(message);
    let list = attrs.get(nfta::SET_ELEM_LIST_ELEMENTS).unwrap_or_default();
    attributes(list)
        .filter(|(kind, _)| *kind == nfta::LIST_ELEM)
        .map(|(_, element)| parse_element(&Attrs::of(element), set))
        .collect()
}

fn parse_element(elem: &Attrs<'_>, set: &Set) -> Result<(Element, Option<Count>), Error> {
    let key_bytes = elem
        .data(nfta::SET_ELEM_KEY)
        .ok_or_else(|| decode(format!("element of {} without a key", set.name)))?;
    let key = lower::key_values(&set.key, key_bytes)
        .map_err(|e| decode(format!("element of {}: {e}", set.name)))?;
    let value = if set.is_map() && set.data != [DataType::Verdict] {
        let bytes = elem
            .data(nfta::SET_ELEM_DATA)
            .ok_or_else(|| decode(format!("element of {} without a value", set.name)))?;
        lower::key_values(&set.data, bytes)
            .map_err(|e| decode(format!("element of {}: {e}", set.name)))?
    } else {
        Vec::new()
    };
    let verdict = if set.data == [DataType::Verdict] {
        let verdict = elem
            .nested(nfta::SET_ELEM_DATA)
            .and_then(|d| d.nested(nfta::DATA_VERDICT))
            .ok_or_else(|| decode(format!("element of {} without a verdict", set.name)))?;
        Some(verdict_of(&verdict)?)
    } else {
        None
    };
    let comment = elem
        .get(nfta::SET_ELEM_USERDATA)
        .and_then(|d| udata::comment_of(d, udata::SET_ELEM_COMMENT));
    let mut element = match verdict {
        Some(verdict) => Element::with_verdict(key, verdict),
        None => Element::mapped(key, value),
    };
    element.set_comment(comment);
    let count = if set.counter {
        first_counter(
            elem.get(nfta::SET_ELEM_EXPR),
            elem.get(nfta::SET_ELEM_EXPRESSIONS),
        )
    } else {
        None
    };
    Ok((element, count))
}
