//! The nftproxy rule layout: a family's [`ProxyState`] rendered into one nftables
//! [`Table`] (`table ip nftproxy` / `table ip6 nftproxy`).
//!
//! Invariant: rendering is a pure, total function of the state — same state, same
//! table, byte for byte — and every chain or set a rule or element names exists in the
//! same table. Bad input never reaches here; `model` filtered it.
//!
//! The layout follows upstream kube-proxy's nftables mode (1.36 shape: inline
//! masquerade mark, a set of hairpin connections, no endpoint chains without affinity) and
//! departs from it where the kernel's costs say so; `rules-golden/README.md` explains
//! each departure.

mod balance;
pub mod counters;
mod fragment;
mod hairpin;
mod names;
mod services;
mod skeleton;
mod stmts;

use nftproxy_model::{Build, IpFamily, Protocol, ProxyState};
use nftproxy_nft::{Family, L4Proto, Table, Value};

pub use balance::SHARD_BITS;
pub use fragment::{Renderer, render};
pub use names::{PortName, hash_and_truncate, parse_port_name};

/// The name of nftproxy's tables (one per family).
pub const TABLE_NAME: &str = "nftproxy";

/// Renders the tables for every active family: IPv4 always, IPv6 when it has input.
pub fn render_all(build: &Build) -> Vec<Table> {
    let mut tables = vec![render(&build.ipv4)];
    if build.ipv6.is_active() {
        tables.push(render(&build.ipv6));
    }
    tables
}

pub(crate) fn family(state: &ProxyState) -> Family {
    nft_family(state.family)
}

/// The nftables family of an IP family's table.
pub fn nft_family(family: IpFamily) -> Family {
    match family {
        IpFamily::V4 => Family::Ip,
        IpFamily::V6 => Family::Ip6,
    }
}

pub(crate) fn l4proto(protocol: Protocol) -> L4Proto {
    match protocol {
        Protocol::Tcp => L4Proto::Tcp,
        Protocol::Udp => L4Proto::Udp,
        Protocol::Sctp => L4Proto::Sctp,
    }
}

/// `ip . proto . port`, the key of the address-keyed maps.
pub(crate) fn address_key(ip: std::net::IpAddr, protocol: Protocol, port: u16) -> Vec<Value> {
    vec![
        Value::Addr(ip),
        Value::Proto(l4proto(protocol)),
        Value::Port(port),
    ]
}

/// Comments are capped at 128 bytes by nft's userdata handling.
pub(crate) fn comment(text: String) -> String {
    let mut text = text;
    cut(&mut text, 128);
    text
}

/// Cuts `text` to at most `max` bytes, at a character boundary (validated names are
/// ASCII, but nothing here relies on it).
pub(crate) fn cut(text: &mut String, max: usize) {
    if text.len() > max {
        let at = (0..=max)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_names_are_cut_at_a_character_boundary() {
        // "é" is two bytes: byte 128 falls inside one.
        let long = format!("a{}", "é".repeat(100));
        let cut_comment = comment(long.clone());
        assert!(cut_comment.len() <= 128 && long.starts_with(&cut_comment));
        assert_eq!(cut_comment.len(), 127);
        let name = hash_and_truncate(&"ü/".repeat(200));
        assert!(name.len() <= 240 && name.ends_with("..."), "{name}");
    }
}
