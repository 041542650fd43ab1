//! Fuzz-style tests of every parser of kernel replies: the buffers the kernel sent (as
//! `hack/record-replies.sh` recorded them, `tests/replies/`), mutated at random (bits
//! flipped, bytes set, lengths rewritten, buffers cut short or spliced), handed to each
//! parser as the socket hands them. None may panic or read out of bounds (the C parsers
//! of libnftnl included); each answers with a value or a named error.

use std::collections::BTreeMap;

use nftproxy_nft::{DataType, Family, L4Proto, Set};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::socket::{Message, Reply};
use crate::{addresses, conntrack, reply, socket};

/// The recorded buffers of a fixture file: one hex line each, after `#` comments.
fn recorded(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            (0..line.len())
                .step_by(2)
                .map(|at| u8::from_str_radix(&line[at..at + 2], 16).expect("hex"))
                .collect()
        })
        .collect()
}

/// One change to a buffer.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    /// A 16-bit length (an attribute's) rewritten.
    SetU16(usize, u16),
    /// A 32-bit length (a message's) rewritten.
    SetU32(usize, u32),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    /// The bytes of another recorded buffer spliced in.
    Splice(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        3 => (at, 0..8u8).prop_map(|(a, b)| Mutation::FlipBit(a, b)),
        2 => (at, any::<u8>()).prop_map(|(a, v)| Mutation::SetByte(a, v)),
        3 => (at, prop_oneof![Just(0u16), Just(3), Just(4), Just(0xffff), any::<u16>()])
            .prop_map(|(a, v)| Mutation::SetU16(a, v)),
        1 => (at, prop_oneof![Just(0u32), Just(16), Just(u32::MAX), any::<u32>()])
            .prop_map(|(a, v)| Mutation::SetU32(a, v)),
        1 => at.prop_map(Mutation::Truncate),
        1 => (at, proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(a, b)| Mutation::Insert(a, b)),
        1 => (at, any::<usize>()).prop_map(|(a, other)| Mutation::Splice(a, other)),
    ]
}

fn mutate(buffer: &mut Vec<u8>, mutation: &Mutation, corpus: &[Vec<u8>]) {
    let len = buffer.len().max(1);
    match mutation {
        Mutation::FlipBit(at, bit) => {
            if let Some(byte) = buffer.get_mut(at % len) {
                *byte ^= 1 << bit;
            }
        }
        Mutation::SetByte(at, value) => {
            if let Some(byte) = buffer.get_mut(at % len) {
                *byte = *value;
            }
        }
        Mutation::SetU16(at, value) => {
            let at = (at % len) & !3;
            if at + 2 <= buffer.len() {
                buffer[at..at + 2].copy_from_slice(&value.to_ne_bytes());
            }
        }
        Mutation::SetU32(at, value) => {
            let at = (at % len) & !3;
            if at + 4 <= buffer.len() {
                buffer[at..at + 4].copy_from_slice(&value.to_ne_bytes());
            }
        }
        Mutation::Truncate(at) => buffer.truncate(at % len),
        Mutation::Insert(at, bytes) => {
            let at = at % len;
            let at = at.min(buffer.len());
            buffer.splice(at..at, bytes.iter().copied());
        }
        Mutation::Splice(at, other) => {
            let other = &corpus[other % corpus.len()];
            let at = (at % len).min(buffer.len());
            buffer.truncate(at);
            buffer.extend_from_slice(other);
        }
    }
}

/// The family a message's nfgenmsg names.
fn family(message: Message<'_>) -> Option<Family> {
    match i32::from(*message.bytes().get(16)?) {
        libc::AF_INET => Some(Family::Ip),
        libc::AF_INET6 => Some(Family::Ip6),
        _ => None,
    }
}

/// Hands every message of `bytes` to every parser that reads its kind. `sets` are the
/// set declarations the element parser is given (by name; any other set's elements are
/// read as those of a generic one).
fn parse_all(bytes: &[u8], sets: &BTreeMap<String, Set>) -> usize {
    let mut notifications = Vec::new();
    socket::parse_notifications(bytes, &mut notifications);
    let mut parsed = notifications.len();
    let generic = Set::new(
        "any",
        vec![
            DataType::Ipv4Addr,
            DataType::InetProto,
            DataType::InetService,
        ],
    );
    for message in Message::all(bytes) {
        let _ = Reply::of(message).seq();
        let raw = message.bytes();
        let kind = u16::from_ne_bytes([raw[4], raw[5]]);
        let results: Vec<bool> = match (i32::from(kind >> 8), i32::from(kind & 0xff)) {
            (libc::NFNL_SUBSYS_NFTABLES, libc::NFT_MSG_NEWGEN) => {
                vec![reply::parse_generation(message).is_ok()]
            }
            (libc::NFNL_SUBSYS_NFTABLES, libc::NFT_MSG_NEWTABLE) => {
                vec![reply::parse_table(message).is_ok()]
            }
            (libc::NFNL_SUBSYS_NFTABLES, libc::NFT_MSG_NEWCHAIN) => {
                vec![reply::parse_chain(message).is_ok()]
            }
            (libc::NFNL_SUBSYS_NFTABLES, libc::NFT_MSG_NEWSET) => {
                vec![reply::parse_set(message).is_ok()]
            }
            (libc::NFNL_SUBSYS_NFTABLES, libc::NFT_MSG_NEWRULE) => {
                let family = family(message).unwrap_or(Family::Ip);
                vec![
                    reply::parse_rule(message, family).is_ok(),
                    reply::parse_counted_rule(message, family).is_ok(),
                    reply::parse_rule_handle(message).is_ok(),
                    reply::parse_rule_jumps(message).is_ok(),
                ]
            }
            (libc::NFNL_SUBSYS_NFTABLES, libc::NFT_MSG_NEWSETELEM) => {
                let name = raw
                    .get(20..)
                    .and_then(|a| crate::attr::find(a, 2))
                    .map(crate::attr::text);
                let set = name.and_then(|n| sets.get(&n)).unwrap_or(&generic);
                vec![reply::parse_elements(message, set).is_ok()]
            }
            (1, _) => vec![
                conntrack::decode_flow(raw, L4Proto::Udp).is_some(),
                conntrack::decode_flow(raw, L4Proto::Tcp).is_some(),
            ],
            (_, k) if k == i32::from(libc::RTM_NEWLINK) => {
                vec![addresses::parse_link(raw).is_some()]
            }
            (_, k) if k == i32::from(libc::RTM_NEWADDR) => {
                vec![addresses::parse_address(raw).is_some()]
            }
            _ => Vec::new(),
        };
        parsed += results.into_iter().filter(|ok| *ok).count();
    }
    parsed
}

/// Every recorded buffer, and the sets its NEWSET replies declare.
fn corpus() -> (Vec<Vec<u8>>, BTreeMap<String, Set>) {
    let mut buffers = Vec::new();
    for text in [
        include_str!("../tests/replies/nftables.hex"),
        include_str!("../tests/replies/notifications.hex"),
        include_str!("../tests/replies/addresses.hex"),
        include_str!("../tests/replies/conntrack.hex"),
    ] {
        buffers.extend(recorded(text));
    }
    let mut sets = BTreeMap::new();
    for buffer in &buffers {
        for message in Message::all(buffer) {
            if let Ok((_, set)) = reply::parse_set(message) {
                sets.insert(set.name.clone(), set);
            }
        }
    }
    (buffers, sets)
}

#[test]
fn recorded_replies_are_read() {
    let (buffers, sets) = corpus();
    assert!(buffers.len() > 200, "{} buffers", buffers.len());
    assert!(sets.len() > 10, "{} sets", sets.len());
    // Unchanged, every parser reads its messages: the seeds are real replies.
    let parsed: usize = buffers.iter().map(|b| parse_all(b, &sets)).sum();
    assert!(parsed > 1000, "{parsed} messages parsed");
}

#[test]
fn mutated_replies_never_crash_a_parser() {
    let (buffers, sets) = corpus();
    let case = (
        0..buffers.len(),
        proptest::collection::vec(mutation(), 1..6),
    );
    let mut runner = TestRunner::new(Config {
        cases: 3000,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case, |(index, mutations)| {
        let mut buffer = buffers[index].clone();
        for mutation in &mutations {
            mutate(&mut buffer, mutation, &buffers);
        }
        parse_all(&buffer, &sets);
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
