//! Diagnostics for objects that were left out, each naming the object and the reason.

use std::fmt;

/// The object a diagnostic is about: `Kind namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// `Service`, `EndpointSlice`, `Node`, …
    pub kind: String,
    /// Namespace; empty for cluster-scoped objects.
    pub namespace: String,
    /// Name; `<unnamed>` when the object has none.
    pub name: String,
}

impl ObjectRef {
    /// `kind namespace/name`; an empty namespace for cluster-scoped objects.
    pub fn new(kind: &str, namespace: &str, name: &str) -> ObjectRef {
        ObjectRef {
            kind: kind.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// The namespace of a namespaced object: `default` when the object names none, as the
/// API server defaults it.
pub(crate) fn namespace_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> String {
    meta.namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned())
}

/// Names in hostile input can be megabytes long or hold control and bidirectional
/// formatting characters; a log line shows the start, with those characters escaped so
/// that one name cannot forge or hide another line.
fn shorten(name: &str) -> std::borrow::Cow<'_, str> {
    const SHOWN: usize = 100;
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if name.len() <= SHOWN && !name.contains(unsafe_char) {
        return name.into();
    }
    let mut shown = String::new();
    for (index, c) in name.char_indices() {
        if index >= SHOWN {
            shown.push_str("...");
            break;
        }
        if unsafe_char(c) {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown.into()
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = shorten(&self.name);
        if self.namespace.is_empty() {
            write!(f, "{} {name}", self.kind)
        } else {
            write!(f, "{} {}/{name}", self.kind, shorten(&self.namespace))
        }
    }
}

/// How much a diagnostic matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Deliberately not proxied (headless, ExternalName, another proxy's Service): not a
    /// problem, reported at debug level.
    Ignored,
    /// Invalid: the object (or the named part of it) was left out; reported as a warning.
    Invalid,
}

/// One object (or part of one) left out of the proxy state.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Diagnostic {
    /// The object.
    pub object: ObjectRef,
    /// Whether this is a problem.
    pub severity: Severity,
    /// Why it was left out.
    pub reason: String,
}

impl Diagnostic {
    pub(crate) fn invalid(object: &ObjectRef, reason: impl std::fmt::Display) -> Diagnostic {
        Diagnostic {
            object: object.clone(),
            severity: Severity::Invalid,
            reason: reason.to_string(),
        }
    }

    pub(crate) fn ignored(object: &ObjectRef, reason: impl Into<String>) -> Diagnostic {
        Diagnostic {
            object: object.clone(),
            severity: Severity::Ignored,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_shortened_and_escaped_for_logs() {
        let object = |name: &str| ObjectRef {
            kind: "Service".to_owned(),
            namespace: "ns".to_owned(),
            name: name.to_owned(),
        };
        assert_eq!(object("redis").to_string(), "Service ns/redis");
        assert_eq!(
            object("a\nWARN forged\u{202e}").to_string(),
            "Service ns/a\\nWARN forged\\u{202e}"
        );
        let long = object(&"é".repeat(1_000)).to_string();
        assert!(long.ends_with("...") && long.len() < 120, "{long}");
    }
}

/// A value nftproxy cannot use, in an object or on the command line; the caller says
/// where it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Not an IP address.
    #[error("invalid IP address {0:?}")]
    Ip(String),
    /// Not a CIDR.
    #[error("invalid CIDR {0:?}")]
    Cidr(String),
    /// A protocol Kubernetes does not define.
    #[error("unknown protocol {0:?} (want TCP, UDP or SCTP)")]
    Protocol(String),
    /// A port number out of range.
    #[error("port {0} is not in 1..65535")]
    Port(i32),
    /// A name too short or too long for nftables' chain names and comments.
    #[error("{what} is {len} characters long; 1 to {max} are allowed")]
    NameLength {
        /// Which name.
        what: String,
        /// Its length.
        len: usize,
        /// The longest allowed.
        max: usize,
    },
    /// A name with characters a DNS name cannot have.
    #[error("{what} {name:?} is not a valid DNS name")]
    DnsName {
        /// Which name.
        what: String,
        /// The name.
        name: String,
    },
    /// A port name that is not an IANA service name (at most 15 of `a-z0-9-`).
    #[error("port name {0:?} is not a valid IANA service name")]
    PortName(String),
    /// An object that does not decode as its kind.
    #[error("cannot decode: {0}")]
    Decode(String),
}
