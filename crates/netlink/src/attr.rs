//! Netlink attributes read from received bytes: the one walker every hand-written parser
//! of this crate (notifications, conntrack entries, interface addresses) uses.
//!
//! Invariant: an attribute is handed out only when its header and its whole payload lie
//! inside the bytes given; the walk ends at the first one that does not (a length below
//! the header's 4 bytes, or past the end), so no parser reads out of bounds or loops.

/// The attribute type bits (without `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER`).
const NLA_TYPE_MASK: u16 = 0x3fff;
/// An attribute's header: length and type, 16 bits each.
const NLA_HDRLEN: usize = 4;

/// The attributes of `bytes`, in order, as (type without flags, payload).
pub(crate) fn attributes(bytes: &[u8]) -> Attributes<'_> {
    Attributes { rest: bytes }
}

/// See [`attributes`].
pub(crate) struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attributes<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<(u16, &'a [u8])> {
        let header = self.rest.get(..NLA_HDRLEN)?;
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let kind = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        let Some(payload) = self.rest.get(NLA_HDRLEN..len).filter(|_| len >= NLA_HDRLEN) else {
            self.rest = &[];
            return None;
        };
        // The next attribute starts at a 4-byte boundary; the last may lack its padding.
        self.rest = self.rest.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
        Some((kind, payload))
    }
}

/// The payload of the first attribute of type `kind`, if any.
pub(crate) fn find(bytes: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(bytes).find_map(|(k, payload)| (k == kind).then_some(payload))
}

/// A string attribute's text: up to its first NUL.
pub(crate) fn text(payload: &[u8]) -> String {
    let text = payload.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = ((NLA_HDRLEN + payload.len()) as u16).to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(out.len().div_ceil(4) * 4, 0);
        out
    }

    #[test]
    fn attributes_are_read_within_their_bounds_only() {
        let mut bytes = attribute(1, b"abc");
        bytes.extend(attribute(0x8002, &[7; 8]));
        let read: Vec<_> = attributes(&bytes).collect();
        assert_eq!(read, [(1, &b"abc"[..]), (2, &[7u8; 8][..])]);
        assert_eq!(find(&bytes, 2), Some(&[7u8; 8][..]));
        assert_eq!(text(find(&bytes, 1).expect("found")), "abc");
        // The last attribute without its padding is still whole.
        assert_eq!(attributes(&bytes[..7]).count(), 1);
        // A length past the end, or below the header, ends the walk.
        let mut long = attribute(1, b"abcd");
        long[0] = 200;
        assert_eq!(attributes(&long).count(), 0);
        let mut short = attribute(1, b"abcd");
        short[0] = 2;
        short.extend(attribute(3, b"x"));
        assert_eq!(attributes(&short).count(), 0);
        assert_eq!(attributes(&[1, 0]).count(), 0);
    }
}
