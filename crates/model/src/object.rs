//! Services and EndpointSlices as the caches keep them: decoded once, when they arrive,
//! so the API objects themselves (several times larger) are dropped at once, and every
//! later build reads the decoded form, as kube-proxy's change trackers do.
//!
//! Invariant: a [`Decoded`] is a pure function of its API object, and cloning it shares
//! the decoded object (one allocation, one address); a changed API object decodes to a
//! new allocation, which is how [`crate::Builder`] tells what changed.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::diag::{Diagnostic, namespace_of};
use crate::endpoint::{SERVICE_NAME_LABEL, SliceInfo, decode_slice};
use crate::service::{ServiceInfo, decode_service};

/// A Service or EndpointSlice decoded, or the reason it cannot be used.
#[derive(Debug)]
pub struct Decoded<T>(Result<Arc<T>, Arc<Rejected>>);

/// A decoded Service.
pub type DecodedService = Decoded<ServiceInfo>;
/// A decoded EndpointSlice.
pub type DecodedEndpointSlice = Decoded<SliceInfo>;

/// An object that cannot be used: the group it would belong to, and why not.
#[derive(Debug)]
pub struct Rejected {
    group: (String, String),
    diagnostic: Diagnostic,
}

/// What the builder needs of a decoded object besides its contents.
pub trait Grouped {
    /// Namespace and name of the Service it belongs to (for a Service, its own).
    fn group(&self) -> (&str, &str);
    /// Its own name.
    fn name(&self) -> &str;
}

impl Grouped for ServiceInfo {
    fn group(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

impl Grouped for SliceInfo {
    fn group(&self) -> (&str, &str) {
        (&self.namespace, &self.service_name)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

impl<T> Clone for Decoded<T> {
    fn clone(&self) -> Decoded<T> {
        Decoded(match &self.0 {
            Ok(info) => Ok(Arc::clone(info)),
            Err(rejected) => Err(Arc::clone(rejected)),
        })
    }
}

impl<T: Grouped> Decoded<T> {
    /// Namespace and name of the Service the object belongs to.
    pub fn group(&self) -> (&str, &str) {
        match &self.0 {
            Ok(info) => info.group(),
            Err(rejected) => (&rejected.group.0, &rejected.group.1),
        }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        match &self.0 {
            Ok(info) => info.name(),
            Err(rejected) => &rejected.diagnostic.object.name,
        }
    }

    /// The decoded object, or why it is left out.
    pub(crate) fn info(&self) -> Result<&Arc<T>, &Diagnostic> {
        self.0.as_ref().map_err(|rejected| &rejected.diagnostic)
    }

    /// The address of the shared allocation: the same for clones, new for every decode.
    pub(crate) fn address(&self) -> usize {
        match &self.0 {
            Ok(info) => Arc::as_ptr(info) as usize,
            Err(rejected) => Arc::as_ptr(rejected) as usize,
        }
    }

    /// Whether both are the same decode (clones of one another).
    pub(crate) fn same(&self, other: &Decoded<T>) -> bool {
        self.address() == other.address()
    }
}

fn decoded<T>(
    result: Result<T, Diagnostic>,
    group: impl FnOnce() -> (String, String),
) -> Decoded<T> {
    Decoded(match result {
        Ok(info) => Ok(Arc::new(info)),
        Err(diagnostic) => Err(Arc::new(Rejected {
            group: group(),
            diagnostic,
        })),
    })
}

impl From<&Service> for DecodedService {
    fn from(service: &Service) -> DecodedService {
        let meta = &service.metadata;
        decoded(decode_service(service), || {
            (namespace_of(meta), meta.name.clone().unwrap_or_default())
        })
    }
}

impl From<&EndpointSlice> for DecodedEndpointSlice {
    fn from(slice: &EndpointSlice) -> DecodedEndpointSlice {
        let meta = &slice.metadata;
        decoded(decode_slice(slice), || {
            let service = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
            (namespace_of(meta), service.cloned().unwrap_or_default())
        })
    }
}
