//! Decoding Kubernetes manifests (multi-document YAML or JSON, `kind: List` included)
//! into a [`Snapshot`] of the objects nftproxy reads.
//!
//! Invariant: text that is not YAML at all fails the whole source with its line; a
//! document that is YAML but not a valid object is left out with a diagnostic naming
//! it, and every other document is still decoded.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde_json::Value;

use crate::diag::{Diagnostic, ObjectRef};

/// The input objects of one sync: everything nftproxy reads from the API (or files).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Services.
    pub services: Vec<Service>,
    /// EndpointSlices.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Nodes (only the one named like this node is used).
    pub nodes: Vec<Node>,
    /// ServiceCIDRs: the ranges ClusterIPs are allocated from.
    pub service_cidrs: Vec<ServiceCIDR>,
}

/// A source whose text is not YAML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}:{line}:{column}: {message}")]
pub struct ManifestError {
    /// The file name (or `-` for standard input).
    pub source_name: String,
    /// 1-based line of the error; 0 when unknown.
    pub line: u64,
    /// 1-based column of the error; 0 when unknown.
    pub column: u64,
    /// What the YAML parser said.
    pub message: String,
}

impl Snapshot {
    /// Decodes every document of `text` and adds the objects nftproxy reads. Objects of
    /// other kinds (Deployments, ConfigMaps, …) are skipped silently.
    pub fn add_manifest(
        &mut self,
        source_name: &str,
        text: &str,
    ) -> Result<Vec<Diagnostic>, ManifestError> {
        let documents: Vec<Value> =
            serde_saphyr::from_multiple_with_options(text, parser_options()).map_err(|error| {
                ManifestError {
                    source_name: source_name.to_owned(),
                    line: error.location().map(|l| l.line()).unwrap_or(0),
                    column: error.location().map(|l| l.column()).unwrap_or(0),
                    message: parser_message(&error.to_string()),
                }
            })?;
        let mut diagnostics = Vec::new();
        for document in documents {
            self.add_value(document, &mut diagnostics);
        }
        Ok(diagnostics)
    }

    fn add_value(&mut self, value: Value, diagnostics: &mut Vec<Diagnostic>) {
        let Value::Object(mut map) = value else {
            // An empty document (`---` at the end of a file) or a scalar: nothing to read.
            return;
        };
        let kind = map
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if kind == "List" || (kind.ends_with("List") && map.contains_key("items")) {
            if let Some(Value::Array(items)) = map.remove("items") {
                for item in items {
                    self.add_value(item, diagnostics);
                }
            }
            return;
        }
        let object = object_ref(&kind, &map);
        let value = Value::Object(map);
        let decoded = match kind.as_str() {
            "Service" => decode(value).map(|s| self.services.push(s)),
            "EndpointSlice" => decode(value).map(|s| self.endpoint_slices.push(s)),
            "Node" => decode(value).map(|n| self.nodes.push(n)),
            "ServiceCIDR" => decode(value).map(|c| self.service_cidrs.push(c)),
            _ => Ok(()),
        };
        if let Err(reason) = decoded {
            diagnostics.push(Diagnostic::invalid(&object, reason));
        }
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

fn decode<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| format!("cannot decode: {e}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_and_lists_are_read_and_other_kinds_ignored() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1}\n---\n\
                    apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: b}\n---\n";
        let mut snapshot = Snapshot::default();
        let diagnostics = snapshot.add_manifest("t.yaml", text).unwrap();
        assert!(diagnostics.is_empty());
        assert_eq!(snapshot.services.len(), 2);
    }

    #[test]
    fn a_wrongly_typed_object_is_named_and_the_rest_kept() {
        let text = "kind: Service\nmetadata: {name: bad, namespace: ns}\nspec: {ports: 7}\n---\n\
                    kind: Service\nmetadata: {name: good}\n";
        let mut snapshot = Snapshot::default();
        let diagnostics = snapshot.add_manifest("t.yaml", text).unwrap();
        assert_eq!(snapshot.services.len(), 1);
        assert_eq!(diagnostics.len(), 1);
        assert!(
            diagnostics[0]
                .to_string()
                .starts_with("Service ns/bad: cannot decode")
        );
    }

    #[test]
    fn large_dumps_are_read() {
        let document = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\n";
        let text = vec![document; 5_000].join("---\n");
        let mut snapshot = Snapshot::default();
        let diagnostics = snapshot.add_manifest("big.yaml", &text).unwrap();
        assert!(diagnostics.is_empty(), "{:?}", diagnostics.first());
        assert_eq!(snapshot.services.len(), 5_000);
    }

    #[test]
    fn broken_yaml_names_the_line() {
        let text = "kind: Service\nmetadata:\n  name: [unclosed\n";
        let error = Snapshot::default()
            .add_manifest("f.yaml", text)
            .unwrap_err();
        assert_eq!(error.source_name, "f.yaml");
        assert!(error.line >= 3, "{error}");
    }
}
