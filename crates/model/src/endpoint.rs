//! EndpointSlices decoded into endpoints: one address, its conditions, node and hints.
//!
//! Invariant: a decoded slice has only addresses of its own family and ports in range;
//! a slice that breaks that is left out whole, with a diagnostic.

use std::net::IpAddr;
use std::sync::Arc;

use compact_str::CompactString;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::diag::{Diagnostic, ObjectRef, namespace_of};
use crate::net::parse_ip;
use crate::service::{check_name, check_port_name, port_number};
use crate::{IpFamily, Protocol};

/// The label that ties an EndpointSlice to its Service.
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Slices of headless Services carry this label; kube-proxy never reads them.
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The API server refuses slices with more endpoints or ports than these; a larger one
/// did not come from it and would cost a rule per endpoint.
const MAX_ENDPOINTS: usize = 1_000;
const MAX_PORTS: usize = 100;

/// One backend of a service port, as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// Address.
    pub ip: IpAddr,
    /// Target port (from the EndpointSlice port with the service port's name).
    pub port: u16,
    /// `conditions.ready` (absent means ready).
    pub ready: bool,
    /// `conditions.serving` (absent means ready).
    pub serving: bool,
    /// `conditions.terminating` (absent means not terminating).
    pub terminating: bool,
    /// Whether the endpoint runs on this node.
    pub is_local: bool,
    /// Topology hints; most endpoints have none, and those that have share them with
    /// their slice's copy (every service port of a large cluster holds its endpoints up
    /// to twice: Cluster and Local).
    pub hints: Option<Arc<Hints>>,
}

/// An endpoint's topology hints.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hints {
    /// `hints.forZones` names.
    pub zones: Vec<String>,
    /// `hints.forNodes` names.
    pub nodes: Vec<String>,
}

impl Endpoint {
    /// `hints.forZones` names.
    pub fn zone_hints(&self) -> &[String] {
        self.hints.as_deref().map_or(&[], |h| &h.zones)
    }

    /// `hints.forNodes` names.
    pub fn node_hints(&self) -> &[String] {
        self.hints.as_deref().map_or(&[], |h| &h.nodes)
    }
}

/// An endpoint of a slice before it is paired with a service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SliceEndpoint {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Shared by the endpoints of a slice on the same node.
    pub node_name: Option<Arc<str>>,
    pub hints: Option<Arc<Hints>>,
}

/// A port of a slice: name, protocol, number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlicePort {
    pub name: CompactString,
    pub protocol: Protocol,
    pub port: u16,
}

/// A decoded EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    pub(crate) name: CompactString,
    pub(crate) namespace: CompactString,
    pub(crate) service_name: CompactString,
    pub(crate) family: IpFamily,
    pub(crate) ports: Vec<SlicePort>,
    pub(crate) endpoints: Vec<SliceEndpoint>,
}

pub(crate) fn decode_slice(slice: &EndpointSlice) -> Result<SliceInfo, Diagnostic> {
    let meta = &slice.metadata;
    let object = ObjectRef {
        kind: "EndpointSlice".to_owned(),
        namespace: namespace_of(meta),
        name: meta.name.clone().unwrap_or_else(|| "<unnamed>".to_owned()),
    };
    let invalid = |reason: String| Diagnostic::invalid(&object, reason);
    let labels = meta.labels.clone().unwrap_or_default();
    if labels.contains_key(HEADLESS_LABEL) {
        return Err(Diagnostic::ignored(&object, "headless Service"));
    }
    check_name("namespace", &object.namespace, 63).map_err(|e| invalid(e.to_string()))?;
    check_name("name", &object.name, 253).map_err(|e| invalid(e.to_string()))?;
    let service_name = labels
        .get(SERVICE_NAME_LABEL)
        .cloned()
        .ok_or_else(|| invalid(format!("no {SERVICE_NAME_LABEL} label")))?;
    check_name(SERVICE_NAME_LABEL, &service_name, 63).map_err(|e| invalid(e.to_string()))?;
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => {
            return Err(Diagnostic::ignored(
                &object,
                "FQDN addresses are not proxied",
            ));
        }
        other => return Err(invalid(format!("unknown addressType {other:?}"))),
    };

    let endpoint_count = slice.endpoints.as_ref().map_or(0, Vec::len);
    let port_count = slice.ports.as_ref().map_or(0, Vec::len);
    if endpoint_count > MAX_ENDPOINTS || port_count > MAX_PORTS {
        return Err(invalid(format!(
            "{endpoint_count} endpoints and {port_count} ports; the API allows at most \
             {MAX_ENDPOINTS} and {MAX_PORTS}"
        )));
    }

    // Decoded slices are kept for the whole cluster: sized exactly, not by doubling.
    let mut ports: Vec<SlicePort> = Vec::with_capacity(port_count);
    for port in slice.ports.iter().flatten() {
        let name = port.name.clone().unwrap_or_default();
        check_port_name(&name).map_err(|e| invalid(e.to_string()))?;
        let protocol = Protocol::parse(port.protocol.as_deref())
            .map_err(|e| invalid(format!("port {name:?}: {e}")))?;
        // A port without a number serves "all ports": nothing a ClusterIP can map to.
        let Some(number) = port.port else { continue };
        let number = port_number(number).map_err(|e| invalid(format!("port {name:?}: {e}")))?;
        if ports
            .iter()
            .any(|p| p.name == name && p.protocol == protocol)
        {
            return Err(invalid(format!("port name {name:?} appears twice")));
        }
        ports.push(SlicePort {
            name: name.into(),
            protocol,
            port: number,
        });
    }

    let mut endpoints = Vec::with_capacity(endpoint_count);
    let mut node_names: Vec<Arc<str>> = Vec::new();
    for endpoint in slice.endpoints.iter().flatten() {
        // kube-proxy only ever uses the first address of an endpoint.
        let Some(address) = endpoint.addresses.first() else {
            continue;
        };
        let ip = parse_ip(address).map_err(|e| invalid(e.to_string()))?;
        if IpFamily::of(&ip) != family {
            return Err(invalid(format!(
                "address {ip} does not belong to addressType {}",
                slice.address_type
            )));
        }
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        let ready = conditions.ready.unwrap_or(true);
        let hints = endpoint.hints.as_ref().map(|hints| Hints {
            zones: hints
                .for_zones
                .iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            nodes: hints
                .for_nodes
                .iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        });
        let node_name = endpoint.node_name.as_deref().map(|name| {
            match node_names.iter().find(|known| &***known == name) {
                Some(known) => Arc::clone(known),
                None => {
                    let new: Arc<str> = Arc::from(name);
                    node_names.push(Arc::clone(&new));
                    new
                }
            }
        });
        endpoints.push(SliceEndpoint {
            ip,
            ready,
            serving: conditions.serving.unwrap_or(ready),
            terminating: conditions.terminating.unwrap_or(false),
            node_name,
            hints: hints.filter(|h| *h != Hints::default()).map(Arc::new),
        });
    }

    Ok(SliceInfo {
        name: object.name.into(),
        namespace: object.namespace.into(),
        service_name: service_name.into(),
        family,
        ports,
        endpoints,
    })
}
