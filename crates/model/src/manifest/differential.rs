//! The fast paths against the YAML parser, on generated manifests: every scalar style,
//! quoted scalars continued at the margin, `items:` and `- ` inside strings and block
//! scalars, comments, CRLF, a byte-order mark, tabs, anchors and several documents.
//!
//! Invariant checked: whatever the transcoder ([`yaml::transcode`]) or the parallel List
//! reader ([`Snapshot::add_list_in_parallel`], forced on small texts) does not decline,
//! it reads exactly as the parser does: the same objects and the same diagnostics, word
//! for word.

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::*;

/// A scalar style, as the generator writes a value.
#[derive(Debug, Clone, Copy)]
enum Style {
    Plain,
    Single,
    Double,
    /// Quoted, its lines continued at the margin (which the parser accepts).
    SingleAtMargin,
    DoubleAtMargin,
    Literal,
    Folded,
}

fn style() -> impl Strategy<Value = Style> {
    prop_oneof![
        8 => Just(Style::Plain),
        2 => Just(Style::Single),
        2 => Just(Style::Double),
        1 => Just(Style::SingleAtMargin),
        1 => Just(Style::DoubleAtMargin),
        1 => Just(Style::Literal),
        1 => Just(Style::Folded),
    ]
}

/// Lines that look like structure, to be held inside strings and block scalars.
const TRICKY_LINES: &[&str] = &[
    "items:",
    "- kind: Service",
    "- apiVersion: v1",
    "  metadata: {name: evil, namespace: ns}",
    "kind: List",
    "---",
    "...",
    "# not a comment",
    "key: value",
    "",
    "a\tb",
    "it's",
    "say \"hi\"",
    "back\\slash",
    "é ü ✓",
    "items: [x]",
    "-",
];

/// A value's text: single-line words most of the time, some multi-line tricky ones.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => prop_oneof![
            Just("web".to_owned()),
            Just("10.96.0.1".to_owned()),
            Just("fd00::1".to_owned()),
            Just("80".to_owned()),
            Just("yes".to_owned()),
            Just("~".to_owned()),
            Just("10Gi".to_owned()),
            Just("TCP".to_owned()),
            Just("".to_owned()),
            "[a-z][a-z0-9-]{0,12}",
        ],
        // Spellings only the deserializer reads (the fast paths decline them).
        1 => prop_oneof![
            Just("080".to_owned()),
            Just("0x50".to_owned()),
            Just("-1".to_owned()),
            Just("1.5".to_owned()),
        ],
        3 => proptest::collection::vec(proptest::sample::select(TRICKY_LINES), 1..5)
            .prop_map(|lines| lines.join("\n")),
        // What a List's items look like, inside a string.
        2 => Just(FAKE_ITEMS.to_owned()),
    ]
}

const FAKE_ITEMS: &str = "look\nitems:\n- kind: Service\n  metadata: {name: fake, namespace: ns}\n\
                          - kind: Service\n  metadata: {name: fake2, namespace: ns}\n";

/// `text` written as a value in `style`, for a key at column `indent`.
fn scalar(text: &str, style: Style, indent: usize) -> String {
    let pad = " ".repeat(indent + 2);
    let lines: Vec<&str> = text.split('\n').collect();
    match style {
        Style::Plain => lines.join(&format!("\n{pad}")),
        Style::Single | Style::SingleAtMargin => {
            let join = if matches!(style, Style::Single) {
                format!("\n{pad}")
            } else {
                "\n".to_owned()
            };
            format!(
                "'{}'",
                lines
                    .iter()
                    .map(|l| l.replace('\'', "''"))
                    .collect::<Vec<_>>()
                    .join(&join)
            )
        }
        Style::Double | Style::DoubleAtMargin => {
            let join = if matches!(style, Style::Double) {
                format!("\n{pad}")
            } else {
                "\n".to_owned()
            };
            let escaped: Vec<String> = lines
                .iter()
                .map(|l| l.replace('\\', "\\\\").replace('"', "\\\""))
                .collect();
            format!("\"{}\"", escaped.join(&join))
        }
        Style::Literal | Style::Folded => {
            let indicator = if matches!(style, Style::Literal) {
                "|"
            } else {
                ">-"
            };
            let body: Vec<String> = lines.iter().map(|l| format!("{pad}{l}")).collect();
            format!("{indicator}\n{}", body.join("\n"))
        }
    }
}

/// A mapping entry's value: a scalar, a nested mapping, a sequence of mappings, or flow.
#[derive(Debug, Clone)]
enum Node {
    Scalar(String, Style),
    Map(Vec<(String, Node)>),
    Seq(Vec<Node>),
    Flow(String),
    Alias,
}

/// A value and its style: a text of several lines mostly quoted or in a block (as plain
/// it would rarely parse), and now and then plain anyway.
fn styled_text() -> impl Strategy<Value = (String, Style)> {
    (text(), style(), proptest::bool::weighted(0.1)).prop_map(|(text, style, anyway)| {
        let style = match style {
            Style::Plain if text.contains('\n') && !anyway => Style::Double,
            other => other,
        };
        (text, style)
    })
}

fn node(depth: u32) -> BoxedStrategy<Node> {
    let leaf = prop_oneof![
        8 => styled_text().prop_map(|(t, s)| Node::Scalar(t, s)),
        1 => prop_oneof![
            Just("{a: 1, b: [x, y]}".to_owned()),
            Just("[80, \"443\", 0x50]".to_owned()),
            Just("{name: x, namespace: ns}".to_owned()),
            Just("[a,\n- b]".to_owned()),
        ].prop_map(Node::Flow),
        1 => Just(Node::Alias),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    prop_oneof![
        4 => leaf,
        2 => proptest::collection::vec((key(), node(depth - 1)), 1..4).prop_map(Node::Map),
        1 => proptest::collection::vec(node(depth - 1), 1..3).prop_map(Node::Seq),
    ]
    .boxed()
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("name".to_owned()),
        Just("namespace".to_owned()),
        Just("port".to_owned()),
        Just("protocol".to_owned()),
        Just("items".to_owned()),
        Just("kind".to_owned()),
        Just("note".to_owned()),
        "[a-z]{1,8}",
    ]
}

/// The writer's choices beyond the nodes.
#[derive(Debug, Clone)]
struct Decor {
    /// A comment line before each entry that draws `true`.
    comments: Vec<bool>,
    /// A tab instead of the space after a key's colon.
    tabs: bool,
    /// The anchor that aliases refer to, on the first scalar.
    anchor: bool,
}

fn decor() -> impl Strategy<Value = Decor> {
    (
        proptest::collection::vec(proptest::bool::weighted(0.2), 32),
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(comments, tabs, anchor)| Decor {
            comments,
            tabs,
            anchor,
        })
}

struct Writer<'a> {
    out: String,
    decor: &'a Decor,
    entries: usize,
    anchored: bool,
}

impl Writer<'_> {
    fn comment(&mut self, indent: usize) {
        self.entries += 1;
        if self
            .decor
            .comments
            .get(self.entries % 32)
            .copied()
            .unwrap_or(false)
        {
            self.out
                .push_str(&format!("{}# entry {}\n", " ".repeat(indent), self.entries));
        }
    }

    fn separator(&self) -> &'static str {
        if self.decor.tabs { ":\t" } else { ": " }
    }

    /// `entries` as a block mapping at column `indent`; the first line's indentation is
    /// already written when `continued` (after `- `).
    fn map(&mut self, entries: &[(String, Node)], indent: usize, continued: bool) {
        for (at, (key, value)) in entries.iter().enumerate() {
            if at > 0 || !continued {
                self.comment(indent);
                self.out.push_str(&" ".repeat(indent));
            }
            self.out.push_str(key);
            self.value(value, indent);
        }
    }

    fn value(&mut self, value: &Node, indent: usize) {
        match value {
            Node::Scalar(text, style) => {
                let anchor = if self.decor.anchor && !self.anchored {
                    self.anchored = true;
                    "&a "
                } else {
                    ""
                };
                let written = scalar(text, *style, indent);
                self.out.push_str(self.separator());
                self.out.push_str(anchor);
                self.out.push_str(&written);
                self.out.push('\n');
            }
            Node::Flow(flow) => {
                self.out.push_str(self.separator());
                self.out.push_str(flow);
                self.out.push('\n');
            }
            Node::Alias => {
                self.out.push_str(self.separator());
                self.out
                    .push_str(if self.anchored { "*a\n" } else { "null\n" });
            }
            Node::Map(entries) => {
                self.out.push_str(":\n");
                self.map(entries, indent + 2, false);
            }
            Node::Seq(nodes) => {
                self.out.push_str(":\n");
                self.seq(nodes, indent);
            }
        }
    }

    /// `nodes` as a block sequence whose dashes are at column `indent` (as kubectl writes
    /// a List's items at the margin).
    fn seq(&mut self, nodes: &[Node], indent: usize) {
        for node in nodes {
            self.comment(indent);
            self.out.push_str(&" ".repeat(indent));
            self.out.push_str("- ");
            match node {
                Node::Map(entries) => self.map(entries, indent + 2, true),
                Node::Scalar(text, style) => {
                    self.out.push_str(&scalar(text, *style, indent));
                    self.out.push('\n');
                }
                Node::Flow(flow) => {
                    self.out.push_str(flow);
                    self.out.push('\n');
                }
                Node::Alias | Node::Seq(_) => self.out.push_str("x\n"),
            }
        }
    }
}

/// A Kubernetes-like object: kind, metadata with annotations (where the tricky strings
/// go), and a spec with ports, each field possibly in any style.
fn object() -> impl Strategy<Value = Vec<(String, Node)>> {
    let kind = prop_oneof![
        4 => Just("Service"),
        2 => Just("EndpointSlice"),
        1 => Just("Node"),
        1 => Just("ConfigMap"),
        1 => Just(""),
    ];
    let port = (styled_text(), node(0)).prop_map(|((port, style), extra)| {
        Node::Map(vec![
            ("port".to_owned(), Node::Scalar(port, style)),
            (
                "protocol".to_owned(),
                Node::Scalar("TCP".to_owned(), Style::Plain),
            ),
            ("name".to_owned(), extra),
        ])
    });
    (
        kind,
        style(),
        "[a-z]{1,6}",
        proptest::collection::vec((key(), node(1)), 0..3),
        proptest::collection::vec(port, 0..3),
        proptest::collection::vec((key(), node(1)), 0..2),
    )
        .prop_map(|(kind, kind_style, name, annotations, ports, extra)| {
            let metadata = Node::Map(vec![
                ("name".to_owned(), Node::Scalar(name, Style::Plain)),
                (
                    "namespace".to_owned(),
                    Node::Scalar("ns".to_owned(), Style::Plain),
                ),
                ("annotations".to_owned(), Node::Map(annotations)),
            ]);
            let mut spec = vec![
                (
                    "clusterIP".to_owned(),
                    Node::Scalar("10.96.0.10".to_owned(), Style::Plain),
                ),
                ("ports".to_owned(), Node::Seq(ports)),
            ];
            spec.extend(extra);
            vec![
                (
                    "apiVersion".to_owned(),
                    Node::Scalar("v1".to_owned(), Style::Plain),
                ),
                ("kind".to_owned(), Node::Scalar(kind.to_owned(), kind_style)),
                ("metadata".to_owned(), metadata),
                ("spec".to_owned(), Node::Map(spec)),
            ]
        })
}

/// A document: a List (keys in kubectl's order or not, its items at the margin, a
/// tricky annotation of its own) or one object.
fn document() -> impl Strategy<Value = Vec<(String, Node)>> {
    let list = (
        proptest::collection::vec(object(), 0..8),
        prop_oneof![Just("List"), Just("ServiceList"), Just("Service")],
        proptest::collection::vec((key(), node(1)), 0..2),
        any::<bool>(),
    )
        .prop_map(|(items, kind, annotations, sorted)| {
            let items = (
                "items".to_owned(),
                Node::Seq(items.into_iter().map(Node::Map).collect()),
            );
            let kind = (
                "kind".to_owned(),
                Node::Scalar(kind.to_owned(), Style::Plain),
            );
            let metadata = (
                "metadata".to_owned(),
                Node::Map(vec![("annotations".to_owned(), Node::Map(annotations))]),
            );
            let version = (
                "apiVersion".to_owned(),
                Node::Scalar("v1".to_owned(), Style::Plain),
            );
            if sorted {
                vec![version, items, kind, metadata]
            } else {
                vec![version, kind, metadata, items]
            }
        });
    prop_oneof![2 => list, 1 => object()]
}

/// A whole file: documents, then the writer's choices of separators, line ends and BOM.
fn manifest() -> impl Strategy<Value = String> {
    (
        prop_oneof![3 => proptest::collection::vec(document(), 1..2), 1 => proptest::collection::vec(document(), 2..4)],
        decor(),
        proptest::bool::weighted(0.15),
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.2),
    )
        .prop_map(|(documents, decor, crlf, bom, markers)| {
            let mut writer = Writer { out: String::new(), decor: &decor, entries: 0, anchored: false };
            for (at, document) in documents.iter().enumerate() {
                if at > 0 || markers {
                    writer.out.push_str(if at % 2 == 0 { "---\n" } else { "--- # next\n" });
                }
                writer.anchored = false;
                writer.map(document, 0, false);
            }
            let mut text = writer.out;
            if crlf {
                text = text.replace('\n', "\r\n");
            }
            if bom {
                text.insert(0, '\u{feff}');
            }
            text
        })
}

/// A read's objects and diagnostics, as text to compare.
fn shown(document: &Document) -> String {
    let said: Vec<String> = document
        .diagnostics
        .iter()
        .map(ToString::to_string)
        .collect();
    format!("{:?}\n{said:#?}", document.snapshot)
}

/// How often the fast paths took a text, over all cases.
static TRANSCODED: AtomicUsize = AtomicUsize::new(0);
static CUT: AtomicUsize = AtomicUsize::new(0);
static PARSED: AtomicUsize = AtomicUsize::new(0);

fn check(text: &str) -> Result<(), TestCaseError> {
    let parsed = parse(text).map(|documents| {
        let mut all = Document::default();
        documents.into_iter().for_each(|d| all.append(d));
        shown(&all)
    });
    if parsed.is_ok() {
        PARSED.fetch_add(1, Ordering::Relaxed);
    }
    let mut transcoded = Transcoded::default();
    if yaml::transcode(text, &mut transcoded).is_ok() {
        TRANSCODED.fetch_add(1, Ordering::Relaxed);
        let fast = shown(&transcoded.documents);
        prop_assert_eq!(
            Ok(fast),
            parsed.as_ref().map_err(ToString::to_string).cloned(),
            "transcoded:\n{}",
            text
        );
    }
    for parts in [2, 3, 7] {
        let mut read = Document::default();
        if read
            .snapshot
            .add_list_in_parallel(text, parts, &mut read.diagnostics)
            .is_ok()
        {
            CUT.fetch_add(1, Ordering::Relaxed);
            prop_assert_eq!(
                Ok(shown(&read)),
                parsed.as_ref().map_err(ToString::to_string).cloned(),
                "read in {} parts:\n{}",
                parts,
                text
            );
        }
    }
    Ok(())
}

#[test]
fn generated_manifests_read_the_same_by_every_path() {
    let mut runner = TestRunner::new(Config {
        cases: 1500,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(failure) = runner.run(&manifest(), |text| check(&text)) {
        panic!("{failure}");
    }
    let (parsed, transcoded, cut) = (
        PARSED.load(Ordering::Relaxed),
        TRANSCODED.load(Ordering::Relaxed),
        CUT.load(Ordering::Relaxed),
    );
    eprintln!("of 1500 manifests: {parsed} parsed, {transcoded} transcoded, {cut} parallel reads");
    // Not vacuous: the fast paths take a good part of what the parser reads.
    assert!(
        parsed > 500 && transcoded * 4 > parsed && cut > 100,
        "{parsed} {transcoded} {cut}"
    );
}
