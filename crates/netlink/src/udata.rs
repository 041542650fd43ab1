//! Userdata: the type-length-value entries libnftnl and nft keep with a table, chain,
//! rule, set or element (comments, a set's `typeof` and byte orders), written and read
//! here in safe Rust.
//!
//! Invariant: written userdata fits libnftnl's 256-byte limit (longer is cut); reading
//! stops at the first entry that runs past the end.

use nftnl_sys as sys;

use crate::lower;

/// libnftnl's userdata buffer limit (NFT_USERDATA_MAXLEN).
pub(crate) const USERDATA_MAX: usize = 256;

/// The entry kinds nftproxy writes or reads.
pub(crate) const TABLE_COMMENT: u8 = sys::NFTNL_UDATA_TABLE_COMMENT as u8;
pub(crate) const RULE_COMMENT: u8 = sys::NFTNL_UDATA_RULE_COMMENT as u8;
pub(crate) const SET_COMMENT: u8 = sys::NFTNL_UDATA_SET_COMMENT as u8;
pub(crate) const SET_KEY_TYPEOF: u8 = sys::NFTNL_UDATA_SET_KEY_TYPEOF as u8;
pub(crate) const SET_DATA_TYPEOF: u8 = sys::NFTNL_UDATA_SET_DATA_TYPEOF as u8;
pub(crate) const SET_KEY_BYTEORDER: u8 = sys::NFTNL_UDATA_SET_KEYBYTEORDER as u8;
pub(crate) const SET_DATA_BYTEORDER: u8 = sys::NFTNL_UDATA_SET_DATABYTEORDER as u8;
pub(crate) const SET_DATA_INTERVAL: u8 = sys::NFTNL_UDATA_SET_DATA_INTERVAL as u8;
pub(crate) const SET_ELEM_COMMENT: u8 = sys::NFTNL_UDATA_SET_ELEM_COMMENT as u8;

/// Userdata TLVs (type, length, value) as libnftnl lays them out.
pub(crate) fn userdata(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, value) in entries {
        let len = u8::try_from(value.len()).unwrap_or(u8::MAX);
        out.push(*kind);
        out.push(len);
        out.extend_from_slice(&value[..usize::from(len)]);
    }
    out.truncate(USERDATA_MAX);
    out
}

/// A comment's entry value: its text and a NUL.
pub(crate) fn comment_bytes(comment: &str) -> Vec<u8> {
    let mut bytes = comment.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// The value of userdata entry `kind`, if present before any damaged entry.
pub(crate) fn entry(data: &[u8], kind: u8) -> Option<&[u8]> {
    lower::tlvs(data)
        .map_while(Result::ok)
        .find_map(|(entry_kind, value)| (entry_kind == kind).then_some(value))
}

/// The comment in entry `kind`, if any.
pub(crate) fn comment_of(data: &[u8], kind: u8) -> Option<String> {
    let value = entry(data, kind)?;
    let text = value.strip_suffix(&[0]).unwrap_or(value);
    Some(String::from_utf8_lossy(text).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userdata_round_trips() {
        let data = userdata(&[(0, &comment_bytes("hello")), (7, &[1, 2])]);
        assert_eq!(data, [0, 6, b'h', b'e', b'l', b'l', b'o', 0, 7, 2, 1, 2]);
        assert_eq!(comment_of(&data, 0).as_deref(), Some("hello"));
        assert_eq!(entry(&data, 7), Some(&[1u8, 2][..]));
        assert_eq!(entry(&data, 3), None);
        // An entry running past the end is not read.
        assert_eq!(entry(&[7, 9, 1], 7), None);
    }
}
