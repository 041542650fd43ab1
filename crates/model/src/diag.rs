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

/// Names in hostile input can be megabytes long; a log line shows the start.
fn shorten(name: &str) -> std::borrow::Cow<'_, str> {
    const SHOWN: usize = 100;
    if name.len() <= SHOWN {
        return name.into();
    }
    let mut end = SHOWN;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &name[..end]).into()
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
    pub(crate) fn invalid(object: &ObjectRef, reason: impl Into<String>) -> Diagnostic {
        Diagnostic {
            object: object.clone(),
            severity: Severity::Invalid,
            reason: reason.into(),
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
