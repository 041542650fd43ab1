//! YAML documents as JSON text, so that the YAML of a cluster's manifests (`kubectl get
//! -o yaml`) decodes at the speed of JSON: the parser's events are written out as JSON,
//! and [`crate::manifest`] decodes that text straight into typed objects. A large List
//! is cut into runs of whole items ([`cut_list`]) that threads read side by side.
//!
//! Invariant: a text is either transcoded whole into exactly the values the YAML
//! deserializer (serde-saphyr, as [`crate::manifest`] configures it) would give, or
//! declined whole, and then parsed the slow way. What only the deserializer's finer rules
//! decide is declined, never guessed: tags, anchors and aliases, merge keys, duplicate
//! keys, a `%YAML` directive, floats, numbers with a sign, leading zeros or another base,
//! nesting near its depth limit, and anything the parser refuses.

use std::borrow::Cow;
use std::fmt::Write;

// The deserializer's own parser, so that both read the same events.
use serde_saphyr::granit_parser::{Event, Options, Parser, ScalarStyle, StrInput};

/// The text holds something only the full deserializer reads as it means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Declined;

/// Where a stream's documents go, in order.
pub(crate) trait Sink {
    /// An element of the top-level mapping's `items` sequence, as JSON.
    fn item(&mut self, json: &str);
    /// The end of a document whose root is a mapping: its fields but `items`, as a JSON
    /// object; its `kind`, when that is a string; whether it had `items` (each handed to
    /// [`Sink::item`] before).
    fn document(&mut self, fields: &str, kind: Option<&str>, items: bool);
}

/// The deserializer refuses deeper nesting (its budget's `max_depth`, 64); declined
/// before that.
const MAX_DEPTH: usize = 60;

/// Transcodes every document of `text` into `sink`. On `Err`, what `sink` received is
/// to be thrown away.
pub(crate) fn transcode(text: &str, sink: &mut impl Sink) -> Result<(), Declined> {
    // Comments are still checked, but not handed out as events: another crate of the
    // build (kube's client) turns on the parser's `comments` feature.
    Transcoder::new(text).stream(sink)
}

/// Transcodes `run`, a block sequence at the margin (a run of a List's items, cut by
/// [`cut_list`]), handing each element to [`Sink::item`].
pub(crate) fn transcode_items(run: &str, sink: &mut impl Sink) -> Result<(), Declined> {
    let mut transcoder = Transcoder::new(run);
    let mut item = String::new();
    transcoder.expect(Event::StreamStart)?;
    transcoder.expect(Event::DocumentStart(false, None))?;
    // The parser puts the sequence, and so its first item, at the run's first byte.
    let Event::SequenceStart(_, 0, None) = transcoder.next()? else {
        return Err(Declined);
    };
    if transcoder.at != Some(0) {
        return Err(Declined);
    }
    loop {
        match transcoder.next()? {
            Event::SequenceEnd => break,
            event => {
                item.clear();
                transcoder.node(event, &mut item, 2)?;
                sink.item(&item);
            }
        }
    }
    transcoder.expect(Event::DocumentEnd)?;
    transcoder.expect(Event::StreamEnd)
}

/// A one-document List as `kubectl get -o yaml` writes it, cut for reading on several
/// threads: the root without its items' text, and runs of whole items.
pub(crate) struct Cut<'a> {
    /// The text with `items:` left empty.
    root: String,
    /// The items' text, cut before an item's `- ` at the margin; in order.
    pub(crate) runs: Vec<&'a str>,
    /// Where the `items:` line starts, in the text and in `root`.
    items_key: usize,
    /// Where the text after the items resumes in `root`.
    resume: usize,
}

/// Cuts `text` into its root and up to `parts` runs of items of about one size, when it
/// is one document with an `items:` line at the margin followed by lines starting with
/// `- ` there. The lines only suggest the cut: [`transcode_root`] and
/// [`transcode_items`] accept it only where the parser itself puts the root's `items`
/// key, the end of its value, and each run's first item; should a cut fall inside a
/// scalar spread over lines at the margin, one of them declines, and the caller reads the
/// text whole.
pub(crate) fn cut_list(text: &str, parts: usize) -> Option<Cut<'_>> {
    let mut offset = 0;
    // Where the `items:` line starts, where the items' text begins (after that line)
    // and where it ends (at the root's next key).
    let mut items_key = 0;
    let mut begin = None;
    let mut end = text.len();
    let mut starts = Vec::new();
    for line in text.split_inclusive('\n') {
        let at = offset;
        offset += line.len();
        if line.starts_with("---") || line.starts_with("...") || line.starts_with('%') {
            return None;
        }
        let content = line.trim_end_matches(['\n', '\r']);
        if begin.is_none() {
            if content == "items:" {
                items_key = at;
                begin = Some(offset);
            }
            continue;
        }
        if end < text.len() {
            continue;
        }
        let blank = content.trim().is_empty() || content.starts_with('#');
        if content == "-" || content.starts_with("- ") {
            starts.push(at);
        } else if starts.is_empty() && !blank {
            return None;
        } else if !(blank || content.starts_with(' ')) {
            end = at;
        }
    }
    let begin = begin?;
    let share = (end - begin) / parts.max(1) + 1;
    let mut runs = Vec::new();
    let mut run_start = *starts.first()?;
    for &start in &starts[1..] {
        if start - run_start >= share {
            runs.push(&text[run_start..start]);
            run_start = start;
        }
    }
    runs.push(&text[run_start..end]);
    if runs.len() < 2 {
        return None;
    }
    let root = format!("{}{}", &text[..begin], &text[end..]);
    Some(Cut {
        root,
        runs,
        items_key,
        resume: begin,
    })
}

/// Transcodes the root of a [`Cut`], checking that the parser reads it as the cut
/// assumed: the root's `items` key where the `items:` line starts, an empty value, and
/// the root's next key (if any) where the text after the items resumes. The root meets
/// no items of its own; [`Sink::document`] is told whether it had the key.
pub(crate) fn transcode_root(cut: &Cut<'_>, sink: &mut impl Sink) -> Result<(), Declined> {
    let mut transcoder = Transcoder::new(&cut.root);
    transcoder.cut = Some((cut.items_key, cut.resume));
    transcoder.stream(sink)?;
    // The check ran: the root had its `items` key where the cut put it.
    if transcoder.cut.is_some() {
        return Err(Declined);
    }
    Ok(())
}

struct Transcoder<'a> {
    events: Parser<'a, StrInput<'a>>,
    /// The keys of the mappings open now, outermost first: duplicates are declined (the
    /// deserializer refuses them).
    keys: Vec<Cow<'a, str>>,
    /// The byte offset where the last event starts, when the parser tells it.
    at: Option<usize>,
    /// For the root of a [`Cut`]: where its `items` key must start, and where the key
    /// after it (if any). Taken once checked.
    cut: Option<(usize, usize)>,
}

impl<'a> Transcoder<'a> {
    fn new(text: &'a str) -> Transcoder<'a> {
        // Comments are still checked, but not handed out as events: another crate of the
        // build (kube's client) turns on the parser's `comments` feature.
        let mut options = Options::default();
        options.set_emit_comments(false);
        Transcoder {
            events: Parser::new_from_str_with_options(text, options),
            keys: Vec::new(),
            at: None,
            cut: None,
        }
    }

    fn next(&mut self) -> Result<Event<'a>, Declined> {
        match self.events.next() {
            Some(Ok((event, span))) => {
                self.at = span.start.byte_offset();
                Ok(event)
            }
            _ => Err(Declined),
        }
    }

    /// The next event, which must be `event`.
    fn expect(&mut self, event: Event<'a>) -> Result<(), Declined> {
        if self.next()? == event {
            Ok(())
        } else {
            Err(Declined)
        }
    }

    fn stream(&mut self, sink: &mut impl Sink) -> Result<(), Declined> {
        let mut fields = String::new();
        let mut item = String::new();
        self.expect(Event::StreamStart)?;
        loop {
            match self.next()? {
                Event::StreamEnd => return Ok(()),
                Event::DocumentStart(_, None) => {}
                _ => return Err(Declined),
            }
            match self.next()? {
                Event::MappingStart(_, 0, None) => {
                    self.root(&mut fields, &mut item, sink)?;
                }
                // A scalar or a sequence holds no object; it is still read through, so
                // that whatever would make the deserializer refuse it is declined.
                other => {
                    item.clear();
                    self.node(other, &mut item, 0)?;
                }
            }
            self.expect(Event::DocumentEnd)?;
        }
    }

    /// A document's root mapping, its `MappingStart` read.
    fn root(
        &mut self,
        fields: &mut String,
        item: &mut String,
        sink: &mut impl Sink,
    ) -> Result<(), Declined> {
        fields.clear();
        fields.push('{');
        let mut kind = None;
        let mut items = false;
        let base = self.keys.len();
        // Set once a cut's `items` key is checked: where the next key must start.
        let mut resume = None;
        loop {
            let event = self.next()?;
            if let Some(resume) = resume.take()
                && !(event == Event::MappingEnd || self.at == Some(resume))
            {
                return Err(Declined);
            }
            let key = match event {
                Event::MappingEnd => break,
                event => self.key(event, base)?,
            };
            let key_at = self.at;
            let value = self.next()?;
            if key == "items" {
                if let Some((items_key, next)) = self.cut.take() {
                    // The parser reads the line's empty value as a plain `~`.
                    let empty = matches!(&value, Event::Scalar(text, style, 0, None)
                        if scalar(text, *style) == Ok(Scalar::Null));
                    if key_at != Some(items_key) || !empty {
                        return Err(Declined);
                    }
                    resume = Some(next);
                }
                items = true;
                self.items(value, item, sink)?;
                continue;
            }
            if key == "kind"
                && let Event::Scalar(text, style, 0, None) = &value
                && matches!(scalar(text, *style)?, Scalar::String)
            {
                kind = Some(text.clone());
            }
            if fields.len() > 1 {
                fields.push(',');
            }
            string(fields, &key);
            fields.push(':');
            self.node(value, fields, 1)?;
        }
        self.keys.truncate(base);
        fields.push('}');
        sink.document(fields, kind.as_deref(), items);
        Ok(())
    }

    /// The value of the root's `items`: each element of a sequence goes to the sink;
    /// anything else holds no items.
    fn items(
        &mut self,
        value: Event<'a>,
        item: &mut String,
        sink: &mut impl Sink,
    ) -> Result<(), Declined> {
        let Event::SequenceStart(_, 0, None) = value else {
            item.clear();
            return self.node(value, item, 1);
        };
        loop {
            match self.next()? {
                Event::SequenceEnd => return Ok(()),
                event => {
                    item.clear();
                    self.node(event, item, 2)?;
                    sink.item(item);
                }
            }
        }
    }

    /// A mapping key: a scalar that reads as a string.
    fn key(&mut self, event: Event<'a>, base: usize) -> Result<Cow<'a, str>, Declined> {
        let Event::Scalar(text, style, 0, None) = event else {
            return Err(Declined);
        };
        if !matches!(scalar(&text, style)?, Scalar::String) || text == "<<" {
            return Err(Declined);
        }
        if self.keys[base..].contains(&text) {
            return Err(Declined);
        }
        self.keys.push(text.clone());
        Ok(text)
    }

    /// The node that starts with `event`, as JSON appended to `out`.
    fn node(&mut self, event: Event<'a>, out: &mut String, depth: usize) -> Result<(), Declined> {
        if depth > MAX_DEPTH {
            return Err(Declined);
        }
        match event {
            Event::Scalar(text, style, 0, None) => {
                match scalar(&text, style)? {
                    Scalar::Null => out.push_str("null"),
                    Scalar::Bool(b) => out.push_str(if b { "true" } else { "false" }),
                    Scalar::Number => out.push_str(&text),
                    Scalar::String => string(out, &text),
                }
                Ok(())
            }
            Event::SequenceStart(_, 0, None) => {
                out.push('[');
                let mut first = true;
                loop {
                    match self.next()? {
                        Event::SequenceEnd => break,
                        event => {
                            if !std::mem::take(&mut first) {
                                out.push(',');
                            }
                            self.node(event, out, depth + 1)?;
                        }
                    }
                }
                out.push(']');
                Ok(())
            }
            Event::MappingStart(_, 0, None) => {
                out.push('{');
                let base = self.keys.len();
                loop {
                    let key = match self.next()? {
                        Event::MappingEnd => break,
                        event => self.key(event, base)?,
                    };
                    if self.keys.len() > base + 1 {
                        out.push(',');
                    }
                    string(out, &key);
                    out.push(':');
                    let value = self.next()?;
                    self.node(value, out, depth + 1)?;
                }
                self.keys.truncate(base);
                out.push('}');
                Ok(())
            }
            // Anchored or tagged nodes, aliases.
            _ => Err(Declined),
        }
    }
}

/// What an untagged scalar is to the deserializer.
#[derive(Debug, PartialEq, Eq)]
enum Scalar {
    Null,
    Bool(bool),
    /// A decimal integer that fits in 64 bits, written as it is.
    Number,
    String,
}

/// Resolves a scalar as the deserializer does with its default options: quoted and
/// block scalars are strings; a plain one is null (`~`, `null`, empty), a YAML 1.1
/// boolean (`yes`, `off`, `y`, any case), an integer, a float, or else a string. Only
/// unsigned decimals without a leading zero and strings that no number rule can match
/// (a letter first, an address, a digit followed by a letter no number holds, as in
/// `10Gi`) are taken; anything else number-like is declined.
fn scalar(text: &str, style: ScalarStyle) -> Result<Scalar, Declined> {
    if style != ScalarStyle::Plain {
        return Ok(Scalar::String);
    }
    if matches!(text, "" | "~" | "null" | "Null" | "NULL") {
        return Ok(Scalar::Null);
    }
    let is = |words: [&str; 4]| words.iter().any(|w| text.eq_ignore_ascii_case(w));
    if is(["true", "yes", "y", "on"]) {
        return Ok(Scalar::Bool(true));
    }
    if is(["false", "no", "n", "off"]) {
        return Ok(Scalar::Bool(false));
    }
    let bytes = text.as_bytes();
    let first = bytes[0];
    if first.is_ascii_digit() {
        if bytes.iter().all(u8::is_ascii_digit) {
            return if (first != b'0' || bytes.len() == 1) && text.parse::<u64>().is_ok() {
                Ok(Scalar::Number)
            } else {
                Err(Declined)
            };
        }
        // An IPv4 address: no number has two dots.
        let dots = bytes.iter().filter(|b| **b == b'.').count();
        if dots >= 2 && bytes.iter().all(|b| b.is_ascii_digit() || *b == b'.') {
            return Ok(Scalar::String);
        }
        // An IPv6 address: no number has a colon.
        if text.parse::<std::net::Ipv6Addr>().is_ok() {
            return Ok(Scalar::String);
        }
    }
    let unsigned = text.trim_start_matches(['+', '-']);
    let unsigned = unsigned.strip_prefix('.').unwrap_or(unsigned);
    let non_finite = ["inf", "infinity", "nan"]
        .iter()
        .any(|w| unsigned.eq_ignore_ascii_case(w));
    let numeric = |b: &u8| b.is_ascii_hexdigit() || b"xXoO._+-".contains(b);
    let number_like =
        matches!(first, b'0'..=b'9' | b'+' | b'-' | b'.') && bytes.iter().all(numeric);
    if non_finite || number_like {
        return Err(Declined);
    }
    Ok(Scalar::String)
}

/// `text` as a JSON string.
pub(crate) fn string(out: &mut String, text: &str) {
    out.push('"');
    let mut plain = 0;
    for (at, c) in text.char_indices() {
        let escape = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if c < ' ' => "",
            _ => continue,
        };
        out.push_str(&text[plain..at]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push_str(escape);
        }
        plain = at + c.len_utf8();
    }
    out.push_str(&text[plain..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the deserializer makes of a value, as its visitor is told.
    #[derive(Debug, PartialEq)]
    enum Meaning {
        Null,
        Bool(bool),
        Unsigned(u64),
        Signed(i64),
        Float,
        Text(String),
    }

    impl<'de> serde::Deserialize<'de> for Meaning {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Told;
            impl serde::de::Visitor<'_> for Told {
                type Value = Meaning;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a scalar")
                }
                fn visit_unit<E>(self) -> Result<Meaning, E> {
                    Ok(Meaning::Null)
                }
                fn visit_none<E>(self) -> Result<Meaning, E> {
                    Ok(Meaning::Null)
                }
                fn visit_bool<E>(self, b: bool) -> Result<Meaning, E> {
                    Ok(Meaning::Bool(b))
                }
                fn visit_u64<E>(self, n: u64) -> Result<Meaning, E> {
                    Ok(Meaning::Unsigned(n))
                }
                fn visit_i64<E>(self, n: i64) -> Result<Meaning, E> {
                    Ok(Meaning::Signed(n))
                }
                fn visit_f64<E>(self, _: f64) -> Result<Meaning, E> {
                    Ok(Meaning::Float)
                }
                fn visit_str<E>(self, s: &str) -> Result<Meaning, E> {
                    Ok(Meaning::Text(s.to_owned()))
                }
            }
            deserializer.deserialize_any(Told)
        }
    }

    /// The deserializer's meaning of `text` as a plain value; `None` when it refuses it.
    fn deserialized(text: &str) -> Option<Meaning> {
        let document: std::collections::BTreeMap<String, Meaning> =
            serde_saphyr::from_str(&format!("v: {text}\n")).ok()?;
        document.into_values().next()
    }

    /// Whether the parser reads `text` as a value's plain scalar, whole.
    fn is_plain(text: &str) -> bool {
        let document = format!("v: {text}\n");
        let mut events = Parser::new_from_str(&document).map(|e| e.map(|(event, _)| event));
        let value = events.by_ref().take_while(Result::is_ok).flatten().nth(4);
        matches!(value, Some(Event::Scalar(t, ScalarStyle::Plain, 0, None)) if t == text || text.is_empty())
    }

    /// Whether the transcoder's reading of a plain `text` is the deserializer's (or is
    /// declined, which leaves it to the deserializer).
    fn agrees(text: &str) -> Result<(), String> {
        if !is_plain(text) {
            return Ok(());
        }
        let said = scalar(text, ScalarStyle::Plain);
        let meant = deserialized(text);
        let same = match (&said, &meant) {
            (Err(Declined), _) => true,
            (Ok(Scalar::Null), Some(Meaning::Null)) => true,
            (Ok(Scalar::Bool(b)), Some(Meaning::Bool(m))) => b == m,
            (Ok(Scalar::Number), Some(Meaning::Unsigned(n))) => text.parse() == Ok(*n),
            (Ok(Scalar::Number), Some(Meaning::Signed(n))) => text.parse() == Ok(*n),
            (Ok(Scalar::String), Some(Meaning::Text(t))) => t == text,
            _ => false,
        };
        if same {
            Ok(())
        } else {
            Err(format!(
                "{text:?}: transcoded as {said:?}, deserialized as {meant:?}"
            ))
        }
    }

    /// Every spelling the transcoder resolves itself means what serde-saphyr (the
    /// version the workspace pins) makes of it: an upgrade that reads one differently
    /// fails here, not in a cluster.
    #[test]
    fn plain_scalars_mean_what_the_deserializer_says() {
        let spellings = [
            "",
            "~",
            "null",
            "Null",
            "NULL",
            "nULL",
            "true",
            "True",
            "TRUE",
            "tRUE",
            "false",
            "False",
            "FALSE",
            "yes",
            "Yes",
            "YES",
            "no",
            "No",
            "NO",
            "y",
            "Y",
            "n",
            "N",
            "on",
            "On",
            "ON",
            "off",
            "Off",
            "OFF",
            "0",
            "7",
            "80",
            "65535",
            "18446744073709551615",
            "18446744073709551616",
            "00",
            "080",
            "0x50",
            "0X50",
            "0o17",
            "0b101",
            "1_000",
            "+1",
            "-1",
            "-0",
            "1e3",
            "1E3",
            "1.5",
            ".5",
            "5.",
            ".inf",
            "-.Inf",
            "+.INF",
            ".nan",
            ".NaN",
            "10Gi",
            "500m",
            "1.2.3.4",
            "10.96.0.1",
            "::1",
            "fd00::1",
            "2001:db8::2",
            "fe80::1%eth0",
            "1:2",
            "1:20:30",
            "190:20:30",
            "0xZZ",
            "v1",
            "12abc",
            "1-2",
            "--",
            "-a",
            ".hidden",
            "1.2.3",
            "1..2",
            "+",
            "-",
            ".",
            "2024-01-01",
            "2001-12-14t21:59:43.10-05:00",
            "TCP",
            "IPv4",
            "ClusterIP",
            "Local",
            "http",
            "=",
            "<<",
            "a b",
            "x:y",
            "@at",
        ];
        let disagreements: Vec<String> = spellings.iter().filter_map(|s| agrees(s).err()).collect();
        assert!(disagreements.is_empty(), "{disagreements:#?}");
        // Not vacuous: the parser takes nearly all of them as plain scalars.
        let plain = spellings.iter().filter(|s| is_plain(s)).count();
        assert!(
            plain + 4 >= spellings.len(),
            "{plain} of {}",
            spellings.len()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The same for generated spellings: digits, signs, dots, colons, letters.
        #[test]
        fn generated_plain_scalars_mean_what_the_deserializer_says(
            text in "[0-9a-fA-FxXoObBeEnNyY.+_:~-]{1,10}",
        ) {
            prop_assert_eq!(agrees(&text), Ok(()));
        }
    }
}
