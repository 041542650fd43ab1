//! nft's `typeof` userdata: how a set records the expressions its key and data came from,
//! so that `nft list` prints `typeof ip daddr . tcp dport` as it was written.
//!
//! Invariant: `typeof_exprs(typeof_udata(exprs)) == exprs` for the expressions nftproxy
//! keys sets by.

use super::*;

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
