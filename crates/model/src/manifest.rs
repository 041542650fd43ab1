//! Decoding Kubernetes manifests (multi-document YAML or JSON, `kind: List` included)
//! into a [`Snapshot`] of the objects nftproxy reads.
//!
//! Invariant: one bad document never costs another. A document that is not YAML is
//! reported with its file, line and (where it can be read) the object it was meant to
//! be; a document that is YAML but not a valid object is left out with a diagnostic
//! naming it; every other document is still decoded. No file is held as a tree: one JSON
//! value is decoded object by object straight into typed objects, and a YAML List's
//! items one at a time.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;
use std::fmt::Write;
use std::net::IpAddr;

use crate::diag::{Diagnostic, ObjectRef, ValueError};
use crate::object::{DecodedEndpointSlice, DecodedService};
use crate::yaml;

/// The input objects of one sync: everything nftproxy reads from the API (or files).
///
/// Services and EndpointSlices are decoded as they arrive and shared, as the watch
/// caches hold them: a snapshot of a large cluster is cheap to take, and an object that
/// did not change is the same allocation in the next snapshot, which
/// [`crate::Builder`] uses to skip it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Services.
    pub services: Vec<DecodedService>,
    /// EndpointSlices.
    pub endpoint_slices: Vec<DecodedEndpointSlice>,
    /// Nodes (only the one named like this node is used).
    pub nodes: Vec<Node>,
    /// ServiceCIDRs: the ranges ClusterIPs are allocated from.
    pub service_cidrs: Vec<ServiceCIDR>,
    /// The addresses of the interfaces of the network namespace being programmed: with
    /// CIDRs in `nodePortAddresses`, NodePorts are accepted on those inside a CIDR, as
    /// kube-proxy does. `None` when not known; the node IPs stand in.
    pub local_addresses: Option<Vec<IpAddr>>,
}

/// A YAML document that could not be parsed; it was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}:{line}:{column}: {}{message}", .object.as_ref().map(|o| format!("{o}: ")).unwrap_or_default())]
pub struct ManifestError {
    /// The file name (or `-` for standard input).
    pub source_name: String,
    /// 1-based line of the error in the file; 0 when unknown.
    pub line: u64,
    /// 1-based column of the error; 0 when unknown.
    pub column: u64,
    /// The object the document appears to describe, read from its `kind:` and
    /// `metadata:` lines, when those came before the error.
    pub object: Option<ObjectRef>,
    /// What the YAML parser said.
    pub message: String,
}

/// What [`Snapshot::add_manifest`] left out.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ManifestReport {
    /// Objects that were read but are not valid (or not proxied).
    pub diagnostics: Vec<Diagnostic>,
    /// Documents that are not YAML.
    pub errors: Vec<ManifestError>,
}

impl Snapshot {
    /// Like [`Snapshot::add_manifest`] for text that may not be UTF-8: the first invalid
    /// byte is reported, and every invalid sequence reads as U+FFFD (which no name or
    /// address accepts, so the object holding it is named as invalid too).
    pub fn add_manifest_bytes(&mut self, source_name: &str, bytes: &[u8]) -> ManifestReport {
        let text = String::from_utf8_lossy(bytes);
        let mut report = self.add_manifest(source_name, &text);
        // Only a copy (`Owned`) means something was replaced: validate again for where.
        if let std::borrow::Cow::Owned(_) = text
            && let Err(error) = std::str::from_utf8(bytes)
        {
            let valid = &bytes[..error.valid_up_to()];
            let line_start = valid.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            report.errors.insert(
                0,
                ManifestError {
                    source_name: source_name.to_owned(),
                    line: 1 + valid.iter().filter(|b| **b == b'\n').count() as u64,
                    column: 1 + (valid.len() - line_start) as u64,
                    object: None,
                    message: "not UTF-8 text".to_owned(),
                },
            );
        }
        report
    }

    /// Decodes every document of `text` and adds the objects nftproxy reads. Objects of
    /// other kinds (Deployments, ConfigMaps, …) are skipped silently.
    ///
    /// No document is held whole as a tree: a List's items are decoded one by one, each
    /// into its typed object and then into the compact form the snapshot keeps, so the
    /// peak is one object however large the file.
    pub fn add_manifest(&mut self, source_name: &str, text: &str) -> ManifestReport {
        let mut report = ManifestReport::default();
        // `kubectl get -o json` and the API's own lists: one JSON value, which the JSON
        // parser reads many times faster than a YAML parser, straight into typed objects.
        if let Ok(raw) = serde_json::from_str::<&RawValue>(text) {
            self.add_json(raw, &mut report.diagnostics);
            return report;
        }
        // YAML that reads the same as JSON text (nearly all of it) is decoded as JSON; a
        // large List on every core.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        if text.len() >= PARALLEL_FROM
            && cores > 1
            && self
                .add_list_in_parallel(text, cores.min(8), &mut report.diagnostics)
                .is_ok()
        {
            return report;
        }
        let mut transcoded = Transcoded::default();
        if yaml::transcode(text, &mut transcoded).is_ok() {
            self.append(transcoded.documents, &mut report.diagnostics);
            return report;
        }
        if let Ok(documents) = parse(text) {
            for document in documents {
                self.append(document, &mut report.diagnostics);
            }
            return report;
        }
        // Something is broken: parse document by document to keep the rest.
        for (first_line, document) in split_documents(text) {
            match parse(document) {
                Ok(documents) => {
                    for document in documents {
                        self.append(document, &mut report.diagnostics);
                    }
                }
                Err(error) => {
                    let location = error.location();
                    report.errors.push(ManifestError {
                        source_name: source_name.to_owned(),
                        line: location.map_or(0, |l| l.line() + first_line - 1),
                        column: location.map_or(0, |l| l.column()),
                        object: guess_object(document),
                        message: parser_message(&error.to_string()),
                    });
                }
            }
        }
        report
    }

    /// A YAML List (`kubectl get -o yaml`) read on `parts` threads: runs of its items
    /// are transcoded and decoded on threads of their own ([`yaml::cut_list`]) and kept
    /// in order, so that the objects and diagnostics are those of one thread.
    fn add_list_in_parallel(
        &mut self,
        text: &str,
        parts: usize,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Result<(), yaml::Declined> {
        let cut = yaml::cut_list(text, parts).ok_or(yaml::Declined)?;
        let read = |run: &str| {
            let mut transcoded = Transcoded::default();
            yaml::transcode_items(run, &mut transcoded).map(|()| transcoded.items)
        };
        let (root, runs) = std::thread::scope(|scope| {
            let others: Vec<_> = cut.runs[1..]
                .iter()
                .map(|run| scope.spawn(move || read(run)))
                .collect();
            let mut runs = vec![read(cut.runs[0])];
            let mut root = CutRoot::default();
            let root = yaml::transcode_root(&cut, &mut root).map(|()| root);
            for other in others {
                runs.push(
                    other
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p)),
                );
            }
            (root, runs)
        });
        let root = root?;
        let mut items = Document::default();
        for run in runs {
            items.append(run?);
        }
        let mut document = Document::default();
        document.root(&root.fields, root.kind.as_deref(), Some(items));
        self.append(document, diagnostics);
        Ok(())
    }

    fn append(&mut self, document: Document, diagnostics: &mut Vec<Diagnostic>) {
        let Document {
            snapshot,
            diagnostics: found,
        } = document;
        self.services.extend(snapshot.services);
        self.endpoint_slices.extend(snapshot.endpoint_slices);
        self.nodes.extend(snapshot.nodes);
        self.service_cidrs.extend(snapshot.service_cidrs);
        diagnostics.extend(found);
    }

    /// One JSON value: an object of a kind nftproxy reads, a List of them, or anything
    /// else (skipped). Each object's text is scanned for its `kind` first, then decoded
    /// once, typed.
    fn add_json(&mut self, raw: &RawValue, diagnostics: &mut Vec<Diagnostic>) {
        if !raw.get().starts_with('{') {
            return;
        }
        let Ok(probe) = serde_json::from_str::<Probe<'_>>(raw.get()) else {
            // An object only a tree reads (a key twice: the last one counts): read as
            // the tree writes it.
            if let Ok(value) = serde_json::from_str::<Value>(raw.get())
                && let Ok(text) = RawValue::from_string(value.to_string())
            {
                self.add_json(&text, diagnostics);
            }
            return;
        };
        let kind = match probe.kind.map(RawValue::get) {
            None => String::new(),
            Some(text) => match serde_json::from_str::<Option<String>>(text) {
                Ok(Some(kind)) => kind,
                // `kind:` written without a value.
                Ok(None) => {
                    let object = json_object_ref("object", raw);
                    diagnostics.push(Diagnostic::invalid(&object, "kind is empty"));
                    return;
                }
                Err(_) => {
                    let object = json_object_ref("object", raw);
                    diagnostics.push(Diagnostic::invalid(&object, "kind is not a string"));
                    return;
                }
            },
        };
        if is_list(&kind, probe.items.is_some()) {
            let items = probe
                .items
                .and_then(|i| serde_json::from_str::<Vec<&RawValue>>(i.get()).ok());
            for item in items.unwrap_or_default() {
                self.add_json(item, diagnostics);
            }
            return;
        }
        if let Err(reason) = self.add_object(&kind, raw.get()) {
            diagnostics.push(Diagnostic::invalid(&json_object_ref(&kind, raw), reason));
        }
    }

    /// Decodes an object of `kind` from its JSON `text` and keeps it, if nftproxy reads
    /// it.
    fn add_object(&mut self, kind: &str, text: &str) -> Result<(), ValueError> {
        match kind {
            "Service" => decode::<Service>(text).map(|s| self.services.push((&s).into())),
            "EndpointSlice" => {
                decode::<EndpointSlice>(text).map(|s| self.endpoint_slices.push((&s).into()))
            }
            "Node" => decode(text).map(|n| self.nodes.push(n)),
            "ServiceCIDR" => decode(text).map(|c| self.service_cidrs.push(c)),
            _ => Ok(()),
        }
    }
}

/// Whether an object of `kind` is a list whose `items` are objects to read.
fn is_list(kind: &str, has_items: bool) -> bool {
    kind == "List" || (kind.ends_with("List") && has_items)
}

/// The fields of a JSON object that say what it is, each left as text.
#[derive(serde::Deserialize)]
struct Probe<'a> {
    /// Also when `null`, which an `Option` alone reads as absent.
    #[serde(default, borrow, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(default, borrow)]
    items: Option<&'a RawValue>,
}

/// A field that is there, whatever its value.
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    serde::Deserialize::deserialize(deserializer).map(Some)
}

/// An object decoded from its JSON text, with the decoder's message without its position.
fn decode<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ValueError> {
    serde_json::from_str(text).map_err(|error| {
        // The position is inside the object's own text, which names nothing to a reader.
        let message = error.to_string();
        let position = format!(" at line {} column {}", error.line(), error.column());
        let message = message.strip_suffix(&position).unwrap_or(&message);
        ValueError::Decode(message.to_owned())
    })
}

/// The object a JSON object names, read only when there is something to report.
fn json_object_ref(kind: &str, raw: &RawValue) -> ObjectRef {
    match serde_json::from_str(raw.get()) {
        Ok(Value::Object(map)) => object_ref(kind, &map),
        _ => object_ref(kind, &serde_json::Map::new()),
    }
}

/// The documents of a YAML text transcoded to JSON ([`yaml::transcode`]), decoded as
/// [`Streamed`] decodes the parsed ones: a List's items one by one, kept once its `kind`
/// says List.
#[derive(Default)]
struct Transcoded {
    /// Every document so far.
    documents: Document,
    /// The items of the document being read.
    items: Document,
}

impl yaml::Sink for Transcoded {
    fn item(&mut self, json: &str) {
        self.items.add_json_text(json);
    }

    fn document(&mut self, fields: &str, kind: Option<&str>, items: bool) {
        let read = std::mem::take(&mut self.items);
        self.documents.root(fields, kind, items.then_some(read));
    }
}

/// Lists smaller than this are read on one thread: the threads would cost more than they
/// save.
const PARALLEL_FROM: usize = 1 << 20;

/// The root of a List cut by [`yaml::cut_list`], its items left out: its fields and kind.
#[derive(Default)]
struct CutRoot {
    fields: String,
    kind: Option<String>,
}

impl yaml::Sink for CutRoot {
    fn item(&mut self, _: &str) {}

    fn document(&mut self, fields: &str, kind: Option<&str>, _: bool) {
        self.fields = fields.to_owned();
        self.kind = kind.map(str::to_owned);
    }
}

/// What one YAML document (or several) holds, decoded as it was read.
#[derive(Default)]
struct Document {
    snapshot: Snapshot,
    diagnostics: Vec<Diagnostic>,
}

impl Document {
    /// Adds what a JSON text (written by [`yaml`] or by [`JsonText`], so well-formed)
    /// holds.
    fn add_json_text(&mut self, json: &str) {
        if let Ok(raw) = serde_json::from_str::<&RawValue>(json) {
            self.snapshot.add_json(raw, &mut self.diagnostics);
        }
    }

    /// Adds everything `other` holds, after what this holds.
    fn append(&mut self, other: Document) {
        self.snapshot.append(other, &mut self.diagnostics);
    }

    /// The end of a document's root mapping, whichever way it was read: its fields but
    /// `items` (as a JSON object), its `kind` when that is a string, and its `items`'
    /// contents when it had them (each decoded as it came). A List keeps its items, any
    /// other object is its fields.
    fn root(&mut self, fields: &str, kind: Option<&str>, items: Option<Document>) {
        match items {
            Some(items) if kind.is_some_and(|kind| is_list(kind, true)) => self.append(items),
            _ => self.add_json_text(fields),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Document {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Parsed { items: false })
    }
}

/// Visits what the YAML deserializer parsed: a document (`items: false`), whose
/// mapping is read as the transcoder reads one ([`yaml::transcode`]), each value written
/// out as JSON text ([`JsonText`]) and decoded by the same code, so that both ways give
/// the same objects and the same diagnostics; or a root's `items` (`true`), each element
/// of a sequence decoded as it is read (kept only if the root turns out to be a List).
/// Anything else holds nothing nftproxy reads.
struct Parsed {
    items: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for Parsed {
    type Value = Document;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Document, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Parsed {
    type Value = Document;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a Kubernetes object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        if self.items {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Document::default());
        }
        let mut fields = String::from("{");
        let mut kind = None;
        let mut items = None;
        let mut value = String::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                items = Some(map.next_value_seed(Parsed { items: true })?);
                continue;
            }
            value.clear();
            map.next_value_seed(JsonText(&mut value))?;
            if key == "kind" && value.starts_with('"') {
                kind = serde_json::from_str::<String>(&value).ok();
            }
            if fields.len() > 1 {
                fields.push(',');
            }
            yaml::string(&mut fields, &key);
            fields.push(':');
            fields.push_str(&value);
        }
        fields.push('}');
        let mut document = Document::default();
        document.root(&fields, kind.as_deref(), items);
        Ok(document)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Document, A::Error> {
        let mut document = Document::default();
        if !self.items {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(document);
        }
        let mut item = String::new();
        while seq.next_element_seed(JsonText(&mut item))?.is_some() {
            document.add_json_text(&item);
            item.clear();
        }
        Ok(document)
    }

    fn visit_some<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Document, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_none<E>(self) -> Result<Document, E> {
        Ok(Document::default())
    }

    fn visit_unit<E>(self) -> Result<Document, E> {
        Ok(Document::default())
    }

    fn visit_bool<E>(self, _: bool) -> Result<Document, E> {
        Ok(Document::default())
    }

    fn visit_i64<E>(self, _: i64) -> Result<Document, E> {
        Ok(Document::default())
    }

    fn visit_u64<E>(self, _: u64) -> Result<Document, E> {
        Ok(Document::default())
    }

    fn visit_f64<E>(self, _: f64) -> Result<Document, E> {
        Ok(Document::default())
    }

    fn visit_str<E>(self, _: &str) -> Result<Document, E> {
        Ok(Document::default())
    }
}

/// Writes the value it is handed as JSON text, keys in the order they came: what a
/// `serde_json::Value` would hold (a float that is not finite is `null`), in the
/// transcoder's form.
struct JsonText<'out>(&'out mut String);

impl<'de> serde::de::DeserializeSeed<'de> for JsonText<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonText<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("any value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<(), E> {
        self.0.push_str(if value { "true" } else { "false" });
        Ok(())
    }

    fn visit_i64<E>(self, value: i64) -> Result<(), E> {
        let _ = write!(self.0, "{value}");
        Ok(())
    }

    fn visit_u64<E>(self, value: u64) -> Result<(), E> {
        let _ = write!(self.0, "{value}");
        Ok(())
    }

    fn visit_i128<E>(self, value: i128) -> Result<(), E> {
        let _ = write!(self.0, "{value}");
        Ok(())
    }

    fn visit_u128<E>(self, value: u128) -> Result<(), E> {
        let _ = write!(self.0, "{value}");
        Ok(())
    }

    fn visit_f64<E>(self, value: f64) -> Result<(), E> {
        match serde_json::Number::from_f64(value) {
            Some(number) => {
                let _ = write!(self.0, "{number}");
            }
            None => self.0.push_str("null"),
        }
        Ok(())
    }

    fn visit_str<E>(self, value: &str) -> Result<(), E> {
        yaml::string(self.0, value);
        Ok(())
    }

    fn visit_bytes<E>(self, value: &[u8]) -> Result<(), E> {
        self.0.push('[');
        for (at, byte) in value.iter().enumerate() {
            if at > 0 {
                self.0.push(',');
            }
            let _ = write!(self.0, "{byte}");
        }
        self.0.push(']');
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        self.0.push_str("null");
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.push_str("null");
        Ok(())
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_newtype_struct<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.0;
        out.push('[');
        let mut first = true;
        loop {
            let mark = out.len();
            if !std::mem::take(&mut first) {
                out.push(',');
            }
            if seq.next_element_seed(JsonText(out))?.is_none() {
                out.truncate(mark);
                break;
            }
        }
        out.push(']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.0;
        out.push('{');
        let mut first = true;
        while let Some(key) = map.next_key::<String>()? {
            if !std::mem::take(&mut first) {
                out.push(',');
            }
            yaml::string(out, &key);
            out.push(':');
            map.next_value_seed(JsonText(out))?;
        }
        out.push('}');
        Ok(())
    }
}

/// The YAML parser's limits: the defaults guard against hostile input (alias bombs,
/// deep nesting) but cap a file at 1,024 documents and 250,000 nodes, far below a large
/// cluster's `kubectl get -o yaml` dump. Those size limits are raised; the others stay.
fn parser_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 10_000_000;
    budget.max_nodes = 200_000_000;
    budget.max_events = 400_000_000;
    budget.max_total_scalar_bytes = 1 << 30;
    budget.max_reader_input_bytes = Some(1 << 30);
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

fn object_ref(kind: &str, map: &serde_json::Map<String, Value>) -> ObjectRef {
    let metadata = map.get("metadata");
    let field = |name: &str| {
        metadata
            .and_then(|m| m.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let namespace = match kind {
        "Node" | "ServiceCIDR" => String::new(),
        _ => field("namespace").unwrap_or_else(|| "default".to_owned()),
    };
    ObjectRef {
        kind: kind.to_owned(),
        namespace,
        name: field("name").unwrap_or_else(|| "<unnamed>".to_owned()),
    }
}

/// The parser's own words, without the location it repeats ("error: line 2 column 6: ").
fn parser_message(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    match first.split_once(": ") {
        Some((location, rest)) if location.starts_with("line ") => rest.to_owned(),
        _ => first.to_owned(),
    }
}

fn parse(text: &str) -> Result<Vec<Document>, serde_saphyr::Error> {
    serde_saphyr::from_multiple_with_options(text, parser_options())
}

/// The documents of a YAML stream as `(first line, text)`, split before each `---`
/// marker that starts a line. YAML forbids such a marker inside any scalar or
/// collection, so a split never cuts a well-formed document in two; directives (`%YAML`)
/// stay with the document they precede.
fn split_documents(text: &str) -> Vec<(u64, &str)> {
    let mut documents = Vec::new();
    let (mut start, mut start_line) = (0, 1);
    let mut offset = 0;
    for (index, line) in (1..).zip(text.split_inclusive('\n')) {
        let marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace));
        if marker && offset > start && !only_directives(&text[start..offset]) {
            documents.push((start_line, &text[start..offset]));
            (start, start_line) = (offset, index);
        }
        offset += line.len();
    }
    documents.push((start_line, &text[start..]));
    documents
}

fn only_directives(text: &str) -> bool {
    let mut lines = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let mut any = false;
    lines.all(|l| {
        any = true;
        l.starts_with('%')
    }) && any
}

/// The object a broken document was meant to be, from its top-level `kind:` line and
/// the direct children `name:` and `namespace:` of its `metadata:` block, so that the
/// error can name it like any other diagnostic.
fn guess_object(document: &str) -> Option<ObjectRef> {
    let scalar = |text: &str| {
        let text = text.split(" #").next().unwrap_or_default().trim();
        text.trim_matches(|c| c == '"' || c == '\'').to_owned()
    };
    let mut kind = None;
    let mut metadata = serde_json::Map::new();
    let mut in_metadata = false;
    let mut child_indent = None;
    for line in document.lines() {
        let indent = line.len() - line.trim_start().len();
        let content = line.trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if indent == 0 {
            in_metadata = content == "metadata:";
            child_indent = None;
            if let Some(value) = content.strip_prefix("kind:") {
                kind = Some(scalar(value));
            }
            // `metadata: {name: x, namespace: y}` on one line parses on its own.
            if let Some(Ok(Value::Object(flow))) = content
                .strip_prefix("metadata:")
                .map(serde_saphyr::from_str::<Value>)
            {
                metadata = flow;
            }
            continue;
        }
        if !in_metadata || *child_indent.get_or_insert(indent) != indent {
            continue;
        }
        for field in ["name", "namespace"] {
            if let Some(value) = content
                .strip_prefix(field)
                .and_then(|rest| rest.strip_prefix(':'))
            {
                metadata.insert(field.to_owned(), Value::String(scalar(value)));
            }
        }
    }
    let kind = kind.filter(|k| !k.is_empty())?;
    let mut map = serde_json::Map::new();
    map.insert("metadata".to_owned(), Value::Object(metadata));
    Some(object_ref(&kind, &map))
}

#[cfg(test)]
mod differential;

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> (Snapshot, ManifestReport) {
        let mut snapshot = Snapshot::default();
        let report = snapshot.add_manifest("t.yaml", text);
        (snapshot, report)
    }

    #[test]
    fn multi_document_and_lists_are_read_and_other_kinds_ignored() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1}\n---\n\
                    apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: b}\n---\n";
        let (snapshot, report) = read(text);
        assert!(report.diagnostics.is_empty() && report.errors.is_empty());
        assert_eq!(snapshot.services.len(), 2);
    }

    #[test]
    fn a_wrongly_typed_object_is_named_and_the_rest_kept() {
        let text = "kind: Service\nmetadata: {name: bad, namespace: ns}\nspec: {ports: 7}\n---\n\
                    kind: Service\nmetadata: {name: good}\n";
        let (snapshot, report) = read(text);
        assert_eq!(snapshot.services.len(), 1);
        assert_eq!(report.diagnostics.len(), 1);
        assert!(
            report.diagnostics[0]
                .to_string()
                .starts_with("Service ns/bad: cannot decode")
        );
    }

    #[test]
    fn items_count_only_in_a_list_whatever_comes_first() {
        let item = "{kind: Service, metadata: {name: item}}";
        for (text, items) in [
            // `kubectl get -o yaml` sorts the keys: `items` before `kind`.
            (format!("apiVersion: v1\nitems: [{item}]\nkind: List\n"), 1),
            (format!("kind: ServiceList\nitems: [{item}, {item}]\n"), 2),
            (
                format!("items: [{item}]\nkind: Service\nmetadata: {{name: s}}\n"),
                0,
            ),
            (format!("items: [{item}]\nkind: ConfigMap\n"), 0),
            ("kind: List\nitems: {kind: Service}\n".to_owned(), 0),
        ] {
            // The same as one JSON value.
            let value: Value = serde_saphyr::from_str(&text).expect("YAML");
            for text in [text, value.to_string()] {
                let (snapshot, report) = read(&text);
                assert!(report.diagnostics.is_empty() && report.errors.is_empty());
                let listed = snapshot
                    .services
                    .iter()
                    .filter(|s| s.name() == "item")
                    .count();
                assert_eq!(listed, items, "{text}");
            }
        }
    }

    #[test]
    fn a_json_list_is_read_and_its_bad_items_named_without_positions() {
        let text = r#"{"apiVersion": "v1", "items": [
            {"kind": "Service", "metadata": {"name": "a"}, "spec": {"clusterIP": "10.0.0.1"}},
            {"kind": "Service", "metadata": {"name": "bad", "namespace": "ns"}, "spec": {"ports": 7}},
            {"kind": 7, "metadata": {"name": "odd"}},
            {"kind": "EndpointSlice", "metadata": {"name": "a-1"}, "addressType": "IPv4", "endpoints": []},
            {"kind": "Service", "kind": "Service", "metadata": {"name": "twice"}},
            [1], null, "x"
        ], "kind": "List"}"#;
        let (snapshot, report) = read(text);
        assert!(report.errors.is_empty());
        let names: Vec<_> = snapshot.services.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["a", "twice"]);
        assert_eq!(snapshot.endpoint_slices.len(), 1);
        let said: Vec<_> = report.diagnostics.iter().map(ToString::to_string).collect();
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(said[0].starts_with("Service ns/bad: cannot decode: invalid type: integer `7`"));
        assert!(!said[0].contains(" at line "), "{}", said[0]);
        assert!(
            said[1].contains("default/odd: kind is not a string"),
            "{}",
            said[1]
        );
    }

    #[test]
    fn large_dumps_are_read() {
        let document = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\n";
        let text = vec![document; 5_000].join("---\n");
        let (snapshot, report) = read(&text);
        assert!(report.diagnostics.is_empty() && report.errors.is_empty());
        assert_eq!(snapshot.services.len(), 5_000);
    }

    #[test]
    fn a_broken_document_is_named_by_file_line_and_object_and_the_others_kept() {
        let text = "kind: Service\nmetadata: {name: before}\n---\n\
                    # a comment\nkind: Service\nmetadata:\n  labels:\n    name: not-this\n  \
                    name: broken\n  namespace: ns\nspec:\n  ports: [unclosed\n---\n\
                    kind: Service\nmetadata: {name: after}\n";
        let (snapshot, report) = read(text);
        let names: Vec<_> = snapshot.services.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["before", "after"]);
        assert_eq!(report.errors.len(), 1);
        let error = &report.errors[0];
        assert_eq!(error.source_name, "t.yaml");
        assert!((12..=13).contains(&error.line), "{error}");
        assert!(
            error.to_string().contains(": Service ns/broken: "),
            "{error}"
        );
    }

    #[test]
    fn documents_split_at_markers_only() {
        let text = "%YAML 1.2\n---\na: 1\n--- # c\nb: |\n  ---x\n----\n---\n";
        let lines: Vec<u64> = split_documents(text).iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [1, 4, 8]);
        assert_eq!(
            split_documents("x: 1\n")
                .iter()
                .map(|(_, t)| *t)
                .collect::<Vec<_>>(),
            ["x: 1\n"]
        );
    }

    #[test]
    fn invalid_utf8_is_located_and_the_rest_read() {
        let mut snapshot = Snapshot::default();
        let report = snapshot.add_manifest_bytes(
            "t.yaml",
            b"kind: Service\nmetadata: {name: a\xff}\n---\nkind: Service\nmetadata: {name: b}\n",
        );
        assert_eq!(report.errors.len(), 1);
        assert_eq!(report.errors[0].to_string(), "t.yaml:2:19: not UTF-8 text");
        assert_eq!(snapshot.services.len(), 2);
    }

    /// A YAML text read through [`yaml::transcode`] and through the parser, each as
    /// `Debug` text of the snapshot and diagnostics; `None` for the first when declined.
    fn both_ways(text: &str) -> (Option<String>, Result<String, serde_saphyr::Error>) {
        let mut transcoded = Transcoded::default();
        let fast = yaml::transcode(text, &mut transcoded).ok().map(|()| {
            let Document {
                snapshot,
                diagnostics,
            } = transcoded.documents;
            format!("{snapshot:?}\n{diagnostics:?}")
        });
        let slow = parse(text).map(|documents| {
            let (mut snapshot, mut diagnostics) = (Snapshot::default(), Vec::new());
            for document in documents {
                snapshot.append(document, &mut diagnostics);
            }
            format!("{snapshot:?}\n{diagnostics:?}")
        });
        (fast, slow)
    }

    #[test]
    fn yaml_transcoded_reads_as_parsed_or_is_declined() {
        let service = "kind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n";
        let cases = [
            // Taken: strings, YAML 1.1 booleans, nulls, unsigned decimals, addresses.
            (format!("{service}  clusterIP: 10.0.0.1\n  ports:\n  - port: 80\n    targetPort: http\n"), true),
            (format!("{service}  clusterIPs: [fd00::1, 2001:db8::2]\n  ipFamilies: [IPv6]\n"), true),
            (format!("{service}  publishNotReadyAddresses: yes\n  allocateLoadBalancerNodePorts: Off\n"), true),
            (format!("{service}  publishNotReadyAddresses: y\n  externalName: ~\n  type: null\n"), true),
            (format!("{service}  sessionAffinity: \"yes\"\n  externalName: 'x\n    y'\n"), true),
            (format!("{service}  loadBalancerClass: |\n    two\n    lines\n  type: >-\n    folded\n"), true),
            (format!("{service}  ports:\n  - port: 8080\n    nodePort: 99999999999999\n"), true),
            (format!("{service}  ports:\n  - port: 10Gi\n    name: \"a\\tb\\u0001\\\"\"\n"), true),
            ("kind: Node\nmetadata: {name: n, labels: {a: b}}\nspec: {podCIDRs: [10.1.0.0/24]}\n".to_owned(), true),
            ("- a\n- b\n---\nplain\n---\n".to_owned(), true),
            ("apiVersion: v1\nitems:\n- kind: Service\n  metadata: {name: a}\n- 7\nkind: List\n".to_owned(), true),
            ("items:\n- kind: Service\n  metadata: {name: a}\nkind: Service\nmetadata: {name: b}\n".to_owned(), true),
            ("kind: List\nitems: {a: 1}\n".to_owned(), true),
            // Declined: what only the deserializer's finer rules decide.
            (format!("{service}  ports:\n  - port: -80\n"), false),
            (format!("{service}  ports:\n  - port: 0x50\n"), false),
            (format!("{service}  ports:\n  - port: 080\n"), false),
            (format!("{service}  ports:\n  - port: 8_0\n"), false),
            (format!("{service}  ports:\n  - port: 1.5\n"), false),
            (format!("{service}  ports:\n  - port: .inf\n"), false),
            (format!("{service}  ports:\n  - port: -.NaN\n"), false),
            (format!("{service}  ports:\n  - port: !!str 80\n"), false),
            (format!("{service}  ports:\n  - &p {{port: 80}}\n  - *p\n"), false),
            (format!("{service}  ports:\n  - <<: {{port: 80}}\n"), false),
            (format!("{service}  ports:\n  - {{? [a]: 1}}\n"), false),
            ("%YAML 1.1\n---\nkind: Service\nmetadata: {name: s}\n".to_owned(), false),
            ("kind: Service\nkind: Service\n".to_owned(), false),
            (format!("{service}  ports:\n  - port: 80\n    port: 81\n"), false),
            (format!("{}1{}", "[".repeat(70), "]".repeat(70)), false),
            ("kind: Service\nspec: [unclosed\n".to_owned(), false),
        ];
        for (text, taken) in cases {
            let (fast, slow) = both_ways(&text);
            assert_eq!(fast.is_some(), taken, "{text}");
            if let Some(fast) = fast {
                assert_eq!(Ok(fast), slow.map_err(|e| e.to_string()), "{text}");
            }
        }
    }

    #[test]
    fn every_manifest_of_the_repository_transcoded_reads_as_parsed() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut files = Vec::new();
        for dir in ["rules-golden", "crates/nftproxy/tests/bad-input", "hack"] {
            for entry in std::fs::read_dir(root.join(dir)).expect("directory") {
                let path = entry.expect("entry").path();
                let input = path.join("input.yaml");
                if input.is_file() {
                    files.push(input);
                } else if path.extension().is_some_and(|e| e == "yaml") {
                    files.push(path);
                }
            }
        }
        let (mut documents, mut taken) = (0, 0);
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            for (_, document) in split_documents(&text) {
                let (fast, slow) = both_ways(document);
                documents += 1;
                let Some(fast) = fast else { continue };
                taken += 1;
                let slow = slow.map_err(|e| e.to_string());
                assert_eq!(Ok(fast), slow, "{}:\n{document}", file.display());
            }
        }
        // The golden cases are written as users write manifests: nearly all are taken.
        assert!(
            files.len() > 60 && taken * 10 > documents * 8,
            "{taken}/{documents} of {} files",
            files.len()
        );
    }

    /// `text` read as a List cut in `parts`, as `Debug` text like [`both_ways`]; `None`
    /// when declined.
    fn in_parallel(text: &str, parts: usize) -> Option<String> {
        let (mut snapshot, mut diagnostics) = (Snapshot::default(), Vec::new());
        snapshot
            .add_list_in_parallel(text, parts, &mut diagnostics)
            .ok()
            .map(|()| format!("{snapshot:?}\n{diagnostics:?}"))
    }

    #[test]
    fn a_list_read_in_parallel_reads_as_parsed_whole() {
        let item = |i: usize| {
            format!(
                "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: s{i}\n    \
                 namespace: ns\n  spec:\n    clusterIP: 10.0.{}.{}\n    ports:\n    - port: {}\n",
                i / 250,
                i % 250 + 1,
                // Every seventh is invalid: its diagnostic must keep its place.
                if i % 7 == 3 { 0 } else { 80 }
            )
        };
        let items: String = (0..200).map(item).collect();
        let list =
            format!("apiVersion: v1\nitems:\n{items}# a comment\n\nkind: List\nmetadata: {{}}\n");
        let (_, whole) = both_ways(&list);
        let whole = whole.map_err(|e| e.to_string());
        for parts in [2, 3, 8] {
            assert_eq!(
                in_parallel(&list, parts).ok_or("declined"),
                whole.as_deref().map(str::to_owned).map_err(|_| "parse"),
                "{parts} parts"
            );
        }
        assert!(
            whole.expect("parsed").contains("port 0"),
            "a diagnostic is compared"
        );
        // Not a List: the items are not kept, whatever thread read them.
        let service = list.replace("kind: List", "kind: Service");
        assert_eq!(
            in_parallel(&service, 2).ok_or(()),
            both_ways(&service).1.map_err(|_| ())
        );
        // Not cut: several documents, items indented, no items, one item.
        for text in [
            format!("{list}---\n{list}"),
            list.replace("\n- ", "\n  - ").replace("\n  ", "\n    "),
            "kind: List\nmetadata: {}\n".to_owned(),
            format!("items:\n{}kind: List\n", item(1)),
        ] {
            assert_eq!(in_parallel(&text, 2), None, "{text}");
        }
    }

    #[test]
    fn a_cut_inside_a_scalar_at_the_margin_is_declined() {
        let service = |name: &str| {
            format!("- kind: Service\n  metadata:\n    name: {name}\n    namespace: ns\n")
        };
        // The parser takes a scalar continued at the margin, `- ` and all, as one item's.
        for scalar in ["\"a\n- b\"", "'a\n- b'", "a\n- b", "[a,\n- b]"] {
            let text = format!(
                "items:\n{}- kind: Service\n  metadata:\n    labels: {{x: {scalar}}}\n{}kind: List\n",
                service("one"),
                service("three")
            );
            let whole = both_ways(&text).1.map_err(|e| e.to_string());
            // Cut at every `- `: the run that ends inside the scalar does not parse.
            assert_eq!(in_parallel(&text, 100), None, "{text}");
            for parts in [2, 3] {
                if let Some(parallel) = in_parallel(&text, parts) {
                    assert_eq!(Ok(parallel), whole, "{text}");
                }
            }
        }
    }

    #[test]
    fn both_paths_say_the_same_of_an_empty_kind_and_of_two_wrongly_typed_fields() {
        for (text, said) in [
            (
                "kind:\nmetadata: {name: a, namespace: ns}\n",
                "object ns/a: kind is empty",
            ),
            (
                "kind: Service\nmetadata: {name: b, namespace: ns}\nspec: {type: [x], ports: 7}\n",
                "Service ns/b: cannot decode: invalid type: sequence, expected a string",
            ),
        ] {
            let (fast, slow) = both_ways(text);
            let slow = slow.expect("parses");
            assert_eq!(fast.as_ref(), Some(&slow), "{text}");
            let (_, report) = read(text);
            let diagnostics: Vec<String> =
                report.diagnostics.iter().map(ToString::to_string).collect();
            assert_eq!(diagnostics, [said], "{text}");
        }
    }

    #[test]
    fn a_string_holding_an_items_line_is_not_taken_for_the_lists_items() {
        // The List's own metadata comes first, with a double-quoted annotation continued
        // at the margin that holds `items:` and items; the real items follow it.
        let item =
            |name: &str| format!("- kind: Service\n  metadata: {{name: {name}, namespace: ns}}\n");
        let fake: String = (0..3).map(|i| item(&format!("fake{i}"))).collect();
        let real: String = (0..20).map(|i| item(&format!("real{i}"))).collect();
        let text = format!(
            "apiVersion: v1\nkind: List\nmetadata:\n  annotations:\n    note: \"look\nitems:\n{fake}\"\nitems:\n{real}"
        );
        let (_, whole) = both_ways(&text);
        let whole = whole.expect("parses");
        assert!(
            whole.contains("real19") && !whole.contains("fake"),
            "{whole}"
        );
        for parts in [2, 3, 5, 50] {
            assert_eq!(in_parallel(&text, parts), None, "{parts} parts");
        }
        let (snapshot, report) = read(&text);
        assert!(report.diagnostics.is_empty() && report.errors.is_empty());
        let names: Vec<_> = snapshot
            .services
            .iter()
            .map(|s| s.name().to_owned())
            .collect();
        assert_eq!(names.len(), 20);
        assert!(names.iter().all(|n| n.starts_with("real")), "{names:?}");
    }

    #[test]
    fn a_document_without_kind_is_reported_without_object() {
        let (_, report) = read("a: [\n");
        assert_eq!(report.errors.len(), 1);
        assert_eq!(report.errors[0].object, None);
        assert!(report.errors[0].to_string().starts_with("t.yaml:"));
    }
}
