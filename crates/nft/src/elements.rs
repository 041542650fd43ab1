//! A set's elements: each one's key, data, verdict and comment in one compact value,
//! kept in key order and shared between copies of a table.
//!
//! Invariant: an element's key encoding orders as its key does, so [`Elements`] iterate
//! in key order whatever the insertion order; copying a table costs a pointer per
//! element, and equal elements of two copies can be made to share one allocation.

use std::borrow::Borrow;
use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::Arc;

use crate::types::{Value, Verdict, decode, encode};

/// A set's elements in key order. Each is reference-counted, so that the copy of a
/// table the reconciler keeps (what the kernel holds) shares them with the rendered
/// one instead of doubling the largest part of both.
#[derive(Debug, Clone, Default)]
pub struct Elements(BTreeSet<Keyed>);

/// An element ordered, compared and looked up by its key alone (its encoding, which
/// orders as the key does).
#[derive(Debug, Clone)]
struct Keyed(Arc<Element>);

impl PartialEq for Keyed {
    fn eq(&self, other: &Keyed) -> bool {
        self.0.key_bytes() == other.0.key_bytes()
    }
}

impl Eq for Keyed {}

impl PartialOrd for Keyed {
    fn partial_cmp(&self, other: &Keyed) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Keyed {
    fn cmp(&self, other: &Keyed) -> std::cmp::Ordering {
        key_order(self.0.key_bytes(), other.0.key_bytes())
    }
}

/// The byte order of two encoded keys, as `a.cmp(b)`. Most keys differ in their first
/// eight bytes (a tag and an address), which compare as one big-endian word: building a
/// table compares keys millions of times, and `memcmp` over a dozen bytes took a quarter
/// of a 10,000-Service build and render.
fn key_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    if let (Some(a8), Some(b8)) = (a.first_chunk::<8>(), b.first_chunk::<8>()) {
        let order = u64::from_be_bytes(*a8).cmp(&u64::from_be_bytes(*b8));
        if order.is_ne() {
            return order;
        }
    }
    a.cmp(b)
}

impl Borrow<[u8]> for Keyed {
    fn borrow(&self) -> &[u8] {
        self.0.key_bytes()
    }
}

impl Elements {
    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The element with this key.
    pub fn get(&self, key: &[Value]) -> Option<&Element> {
        self.0.get(encode(key).as_slice()).map(|k| &*k.0)
    }

    /// The element with this key, to share.
    pub fn get_shared(&self, key: &[Value]) -> Option<&Arc<Element>> {
        self.0.get(encode(key).as_slice()).map(|k| &k.0)
    }

    /// Whether an element has this key.
    pub fn contains_key(&self, key: &[Value]) -> bool {
        self.0.contains(encode(key).as_slice())
    }

    /// Adds an element, replacing the one with the same key (which it returns).
    pub fn insert(&mut self, element: impl Into<Arc<Element>>) -> Option<Arc<Element>> {
        self.0.replace(Keyed(element.into())).map(|k| k.0)
    }

    /// Adds an element unless one has its key; whether it was added.
    pub fn insert_new(&mut self, element: impl Into<Arc<Element>>) -> bool {
        self.0.insert(Keyed(element.into()))
    }

    /// [`Elements::insert_new`] of each in turn, in one pass (see [`Elements::extend`]):
    /// of several with one key the first stays, and one the set already holds stays.
    /// Returns the elements left out, in key order.
    pub fn extend_new(&mut self, mut added: Vec<Arc<Element>>) -> Vec<Arc<Element>> {
        // Stable: the first of equal keys stays first.
        added.sort_by(|a, b| key_order(a.key_bytes(), b.key_bytes()));
        let mut left_out = Vec::new();
        let mut kept: Vec<Arc<Element>> = Vec::with_capacity(added.len());
        for element in added {
            let held = kept
                .last()
                .is_some_and(|last| last.key_bytes() == element.key_bytes())
                || self.0.contains(element.key_bytes());
            if held {
                left_out.push(element);
            } else {
                kept.push(element);
            }
        }
        let mut kept: BTreeSet<Keyed> = kept.into_iter().map(Keyed).collect();
        self.0.append(&mut kept);
        left_out
    }

    /// Takes out the element with this key.
    pub fn remove(&mut self, key: &[Value]) -> Option<Arc<Element>> {
        self.0.take(encode(key).as_slice()).map(|k| k.0)
    }

    /// The elements in key order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &Element> + ExactSizeIterator {
        self.0.iter().map(|k| &*k.0)
    }

    /// (encoded key, element) in key order: the encodings compare as the keys do.
    pub(crate) fn keyed(&self) -> impl Iterator<Item = (&[u8], &Element)> {
        self.0.iter().map(|k| (k.0.key_bytes(), &*k.0))
    }

    /// (encoded key, element) in key order, from the first whose key comes after `key`
    /// (from the first when `None`).
    pub(crate) fn keyed_after<'a>(
        &'a self,
        key: Option<&[u8]>,
    ) -> impl Iterator<Item = (&'a [u8], &'a Element)> {
        let from = key.map_or(Bound::Unbounded, Bound::Excluded);
        self.0
            .range::<[u8], _>((from, Bound::Unbounded))
            .map(|k| (k.0.key_bytes(), &*k.0))
    }

    /// Takes `other`'s copy of every element both hold alike.
    pub(crate) fn share(&mut self, other: &Elements) {
        if *self == *other {
            self.clone_from(other);
            return;
        }
        let mine = std::mem::take(&mut self.0);
        let mut theirs = other.0.iter().peekable();
        self.0 = mine
            .into_iter()
            .map(|Keyed(element)| {
                while theirs
                    .next_if(|t| t.0.key_bytes() < element.key_bytes())
                    .is_some()
                {}
                match theirs.peek() {
                    Some(t) if *t.0 == *element => Keyed(Arc::clone(&t.0)),
                    _ => Keyed(element),
                }
            })
            .collect();
    }
}

impl PartialEq for Elements {
    fn eq(&self, other: &Elements) -> bool {
        self.len() == other.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|(a, b)| Arc::ptr_eq(&a.0, &b.0) || a.0 == b.0)
    }
}

impl Eq for Elements {}

/// As [`Elements::insert`] of each in turn (of two with one key, the later stays), but
/// built in one pass: sorted runs make a B-tree in linear time, where an insert each
/// (keys in hash or render order) walks the tree and misses the cache every time, which
/// was most of rendering or reading back a table of 250,000 endpoints. The tree is built
/// anew: for a few elements into a large set, insert each.
impl<E: Into<Arc<Element>>> Extend<E> for Elements {
    fn extend<I: IntoIterator<Item = E>>(&mut self, iter: I) {
        let mut added: BTreeSet<Keyed> = iter.into_iter().map(|e| Keyed(e.into())).collect();
        // Of a key in both, `append` keeps the receiver's: the added one.
        added.append(&mut self.0);
        self.0 = added;
    }
}

impl<E: Into<Arc<Element>>> FromIterator<E> for Elements {
    fn from_iter<I: IntoIterator<Item = E>>(iter: I) -> Elements {
        let mut elements = Elements::default();
        elements.extend(iter);
        elements
    }
}

/// A set or map element: a key, and a map element's value (verdict or data).
///
/// A large table holds hundreds of thousands of these, so the key and data fields are
/// kept as bytes (an IPv4 address takes 5 bytes, not a 20-byte [`Value`]), inside the
/// element when they fit; the rarer verdict and comment sit in a box of their own. An
/// IPv4 element is then 24 bytes and, shared, one 48-byte allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(Repr);

/// An element's fields (the key's encoding, then a data-map element's value's), and
/// its verdict and comment. Kept canonical, so that the derived equality is the
/// element's: `Annotated` only with a verdict or a comment, and `Inline` whenever the
/// fields fit.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Repr {
    /// Fields that fit in the element, and no verdict or comment: every IPv4 set and
    /// data-map element of the layout (an endpoint map element takes 21 bytes).
    Inline {
        len: u8,
        key_len: u8,
        bytes: [u8; INLINE],
    },
    /// Longer fields (IPv6), and no verdict or comment.
    Spilled { key_len: u32, bytes: Box<[u8]> },
    /// A verdict or a comment besides: at most a few per Service.
    Annotated(Box<Annotated>),
}

/// The most field bytes kept in the element: the enum stays as small as a boxed slice,
/// its key length and its tag.
const INLINE: usize = 21;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Annotated {
    /// `Inline` or `Spilled`.
    fields: Repr,
    verdict: Option<Box<Verdict>>,
    comment: Option<Box<str>>,
}

impl Repr {
    /// Encoded `fields`, of which the first `key_len` bytes are the key.
    fn plain(fields: Vec<u8>, key_len: usize) -> Repr {
        let key_len = key_len.min(fields.len());
        match (u8::try_from(fields.len()), u8::try_from(key_len)) {
            (Ok(len), Ok(key_len)) if fields.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..fields.len()].copy_from_slice(&fields);
                Repr::Inline {
                    len,
                    key_len,
                    bytes,
                }
            }
            _ => Repr::Spilled {
                key_len: u32::try_from(key_len).unwrap_or(u32::MAX),
                bytes: fields.into_boxed_slice(),
            },
        }
    }

    /// Plain `fields` (`Inline` or `Spilled`) with `verdict` and `comment`, in
    /// canonical form.
    fn annotated(fields: Repr, verdict: Option<Box<Verdict>>, comment: Option<Box<str>>) -> Repr {
        if verdict.is_none() && comment.is_none() {
            fields
        } else {
            Repr::Annotated(Box::new(Annotated {
                fields,
                verdict,
                comment,
            }))
        }
    }

    /// The plain fields, the verdict and the comment.
    fn into_parts(self) -> (Repr, Option<Box<Verdict>>, Option<Box<str>>) {
        match self {
            Repr::Annotated(annotated) => {
                let Annotated {
                    fields,
                    verdict,
                    comment,
                } = *annotated;
                (fields, verdict, comment)
            }
            plain => (plain, None, None),
        }
    }

    /// The encoded fields, and where the key ends in them.
    fn fields(&self) -> (&[u8], usize) {
        match self {
            Repr::Inline {
                len,
                key_len,
                bytes,
            } => (&bytes[..usize::from(*len)], usize::from(*key_len)),
            Repr::Spilled { key_len, bytes } => {
                let key_len = usize::try_from(*key_len).map_or(bytes.len(), |n| n.min(bytes.len()));
                (bytes, key_len)
            }
            Repr::Annotated(annotated) => annotated.fields.fields(),
        }
    }

    fn annotations(&self) -> (Option<&Verdict>, Option<&str>) {
        match self {
            Repr::Annotated(annotated) => {
                (annotated.verdict.as_deref(), annotated.comment.as_deref())
            }
            _ => (None, None),
        }
    }
}

impl Element {
    /// A set element.
    pub fn new(key: Vec<Value>) -> Element {
        Element::mapped(key, Vec::new())
    }

    /// A data-map element.
    pub fn mapped(key: Vec<Value>, data: Vec<Value>) -> Element {
        let mut fields = encode(&key);
        let key_len = fields.len();
        for value in data {
            value.encode_into(&mut fields);
        }
        Element(Repr::plain(fields, key_len))
    }

    /// A verdict-map element.
    pub fn with_verdict(key: Vec<Value>, verdict: Verdict) -> Element {
        let Element(fields) = Element::new(key);
        Element(Repr::annotated(fields, Some(Box::new(verdict)), None))
    }

    /// The same element with a comment.
    pub fn with_comment(mut self, comment: impl Into<String>) -> Element {
        self.set_comment(Some(comment.into()));
        self
    }

    /// The key (one value per key field).
    pub fn key(&self) -> Vec<Value> {
        decode(self.key_bytes()).map(|(_, value)| value).collect()
    }

    /// The value of a data-map element (one value per value field); empty otherwise.
    pub fn data(&self) -> Vec<Value> {
        decode(self.data_bytes()).map(|(_, value)| value).collect()
    }

    /// The verdict of a verdict-map element.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.0.annotations().0
    }

    /// The comment.
    pub fn comment(&self) -> Option<&str> {
        self.0.annotations().1
    }

    /// Puts or removes the comment.
    pub fn set_comment(&mut self, comment: Option<String>) {
        // An empty placeholder, for the moment the parts are apart: no allocation.
        let placeholder = Repr::Spilled {
            key_len: 0,
            bytes: Box::default(),
        };
        let (fields, verdict, _) = std::mem::replace(&mut self.0, placeholder).into_parts();
        self.0 = Repr::annotated(fields, verdict, comment.map(String::into_boxed_str));
    }

    /// The key, encoded: ordered as the key.
    pub(crate) fn key_bytes(&self) -> &[u8] {
        let (fields, key_len) = self.0.fields();
        &fields[..key_len]
    }

    fn data_bytes(&self) -> &[u8] {
        let (fields, key_len) = self.0.fields();
        &fields[key_len..]
    }

    /// The key's last field (a slot map element's slot) and where it starts in the
    /// key's encoding.
    fn last_key_field(&self) -> Option<(usize, Value)> {
        decode(self.key_bytes()).last()
    }

    /// Where the key's last field starts in its encoding.
    fn slot_start(&self) -> usize {
        self.last_key_field().map_or(0, |(at, _)| at)
    }

    /// Everything but the key: what a slot map's slot holds. Payloads compare and order
    /// as their data, verdicts and comments do.
    pub(crate) fn payload(&self) -> Payload<'_> {
        (self.data_bytes(), self.verdict(), self.comment())
    }

    /// The last key field: a slot map element's slot.
    pub(crate) fn slot(&self) -> Option<Value> {
        self.last_key_field().map(|(_, value)| value)
    }

    /// The same payload in another slot of the same key prefix.
    pub(crate) fn in_slot(&self, slot: Value) -> Element {
        let mut fields = self.key_bytes()[..self.slot_start()].to_vec();
        slot.encode_into(&mut fields);
        let key_len = fields.len();
        fields.extend_from_slice(self.data_bytes());
        let (verdict, comment) = self.0.annotations();
        Element(Repr::annotated(
            Repr::plain(fields, key_len),
            verdict.cloned().map(Box::new),
            comment.map(Box::from),
        ))
    }
}

/// An element's data (encoded), verdict and comment.
pub(crate) type Payload<'a> = (&'a [u8], Option<&'a Verdict>, Option<&'a str>);

/// A slot map's elements grouped by key prefix (everything but the slot, encoded), in
/// key order.
pub(crate) fn slot_groups(elements: &Elements) -> Vec<(&[u8], Vec<&Element>)> {
    let mut groups: Vec<(&[u8], Vec<&Element>)> = Vec::new();
    for element in elements.values() {
        let prefix = &element.key_bytes()[..element.slot_start()];
        match groups.last_mut() {
            Some((at, group)) if *at == prefix => group.push(element),
            _ => groups.push((prefix, vec![element])),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DataType, Family, Set, Table};

    fn port(n: u16) -> Vec<Value> {
        vec![Value::Port(n)]
    }

    #[test]
    fn elements_are_kept_by_key_whatever_their_other_fields() {
        let mut elements = Elements::default();
        assert!(elements.insert_new(Element::new(port(80))));
        assert!(!elements.insert_new(Element::new(port(80)).with_comment("other")));
        assert_eq!(elements.get(&port(80)), Some(&Element::new(port(80))));
        let replaced = elements.insert(Element::new(port(80)).with_comment("new"));
        assert_eq!(replaced.as_deref(), Some(&Element::new(port(80))));
        assert!(elements.insert_new(Element::new(port(22))));
        let keys: Vec<_> = elements.values().map(Element::key).collect();
        assert_eq!(keys, [port(22), port(80)]);
        assert_eq!(elements.remove(&port(22)).map(|e| e.key()), Some(port(22)));
        assert!(!elements.contains_key(&port(22)));
        assert_eq!(elements.len(), 1);
    }

    #[test]
    fn extending_is_inserting_each_in_turn() {
        let batch = || {
            [443, 80, 22, 80, 8080]
                .into_iter()
                .enumerate()
                .map(|(i, p)| Element::new(port(p)).with_comment(format!("#{i}")))
        };
        let mut inserted: Elements = [Element::new(port(22)), Element::new(port(53))]
            .into_iter()
            .collect();
        let mut extended = inserted.clone();
        for element in batch() {
            inserted.insert(element);
        }
        extended.extend(batch());
        assert_eq!(extended, inserted);
        // Of two with one key the later stays: the batch's over the set's, #3 over #1.
        let comments: Vec<_> = extended.values().map(Element::comment).collect();
        assert_eq!(
            comments,
            [Some("#2"), None, Some("#3"), Some("#0"), Some("#4")]
        );
    }

    #[test]
    fn extending_with_new_elements_is_inserting_each_unless_held() {
        let batch = || {
            [443, 80, 22, 80]
                .into_iter()
                .enumerate()
                .map(|(i, p)| Arc::new(Element::new(port(p)).with_comment(format!("#{i}"))))
        };
        let mut inserted: Elements = [Element::new(port(22))].into_iter().collect();
        let mut extended = inserted.clone();
        let refused: Vec<_> = batch()
            .filter(|e| !inserted.insert_new(Arc::clone(e)))
            .collect();
        assert_eq!(extended.extend_new(batch().collect()), refused);
        assert_eq!(extended, inserted);
        let comments: Vec<_> = extended.values().map(Element::comment).collect();
        assert_eq!(comments, [None, Some("#1"), Some("#0")]);
    }

    #[test]
    fn keys_order_as_their_bytes() {
        let keys: Vec<Vec<u8>> = [
            &[][..],
            &[0],
            &[0, 1, 2, 3, 4, 5, 6],
            &[0, 1, 2, 3, 4, 5, 6, 7],
            &[0, 1, 2, 3, 4, 5, 6, 7, 0],
            &[0, 1, 2, 3, 4, 5, 6, 8],
            &[0, 1, 2, 3, 4, 5, 7],
            &[255, 0, 0, 0, 0, 0, 0, 0, 1],
            &[1, 255, 255, 255, 255, 255, 255, 255, 255, 0],
        ]
        .iter()
        .map(|k| k.to_vec())
        .collect();
        for a in &keys {
            for b in &keys {
                assert_eq!(key_order(a, b), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn short_fields_live_in_the_element_and_long_ones_beside_it() {
        // An IPv4 endpoint map element (destination . port . index : endpoint . port).
        let v4 = |last: u8| Value::Addr([10, 0, 0, last].into());
        let short = Element::mapped(
            vec![v4(1), Value::Port(80), Value::Number(3)],
            vec![v4(2), Value::Port(8080)],
        );
        assert!(matches!(short.0, Repr::Inline { .. }));
        let v6 = Value::Addr("fd00::1".parse().unwrap());
        let long = Element::mapped(vec![v6, Value::Port(80), Value::Number(3)], vec![v6]);
        assert!(matches!(long.0, Repr::Spilled { .. }));
        for element in [&short, &long] {
            let copy = Element::mapped(element.key(), element.data());
            assert_eq!(&copy, element);
        }
        assert_eq!(short.data(), [v4(2), Value::Port(8080)]);
        assert_eq!(long.key(), [v6, Value::Port(80), Value::Number(3)]);
        // As small as a boxed slice beside its key length and tag.
        assert_eq!(std::mem::size_of::<Element>(), 24);
        let noted = short.clone().with_comment("ns/name");
        assert!(matches!(noted.0, Repr::Annotated(_)));
        assert_eq!((noted.key(), noted.data()), (short.key(), short.data()));
        let mut plain = noted;
        plain.set_comment(None);
        assert_eq!(plain, short, "back to the inline form");
    }

    #[test]
    fn sharing_takes_the_other_copy_of_each_equal_element_only() {
        let table = |comment: &str| {
            let mut t = Table::new(Family::Ip, "t");
            t.add_set(Set::new("s", vec![DataType::InetService]));
            for (n, c) in [(1, ""), (2, comment), (3, "")] {
                t.add_element("s", Element::new(port(n)).with_comment(c));
            }
            t
        };
        let (mut mine, theirs) = (table("a"), table("b"));
        let before = mine.clone();
        mine.share_elements(&theirs);
        assert_eq!(mine, before);
        let shared = |n| {
            Arc::ptr_eq(
                mine.sets["s"].elements.get_shared(&port(n)).unwrap(),
                theirs.sets["s"].elements.get_shared(&port(n)).unwrap(),
            )
        };
        assert!(shared(1) && shared(3));
        assert!(!shared(2));
    }

    #[test]
    fn element_sets_are_equal_by_content_and_copies_share_it() {
        let a: Elements = [Element::new(port(1)), Element::new(port(2))]
            .into_iter()
            .collect();
        let b: Elements = [Element::new(port(2)), Element::new(port(1))]
            .into_iter()
            .collect();
        assert_eq!(a, b);
        let c: Elements = [
            Element::new(port(1)),
            Element::new(port(2)).with_comment("x"),
        ]
        .into_iter()
        .collect();
        assert_ne!(a, c);
        let copy = a.clone();
        assert!(Arc::ptr_eq(
            copy.get_shared(&port(1)).unwrap(),
            a.get_shared(&port(1)).unwrap()
        ));
        assert!(!Arc::ptr_eq(
            b.get_shared(&port(1)).unwrap(),
            a.get_shared(&port(1)).unwrap()
        ));
    }
}
