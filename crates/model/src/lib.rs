//! What a node must do for its Services, in Kubernetes terms and without nftables: the
//! decoded input objects ([`Snapshot`]), the resolved settings ([`ProxyConfig`]), and the
//! per-family [`ProxyState`] that `render` turns into rules.
//!
//! Invariant: nothing here fails on a bad object. Each one that cannot be used is left
//! out with a [`Diagnostic`] naming it, and everything else is still built.

mod builder;
pub mod config;
mod diag;
mod endpoint;
pub mod manifest;
mod net;
mod object;
mod seen;
mod service;
mod state;
mod topology;
mod yaml;

pub use builder::{Builder, Delta, PortChanges, build};
/// The string type of Kubernetes names here: names are short, and one kept inline
/// is one allocation fewer per name at 10,000 Services.
pub use compact_str::CompactString;
pub use config::{
    ConfigError, DaemonConfig, DetectLocalMode, KubeProxyConfiguration, NodePortAddress,
    ProxyConfig,
};
pub use diag::{Diagnostic, ObjectRef, Severity, ValueError};
pub use endpoint::{Endpoint, Hints, SliceInfo};
pub use manifest::{ManifestError, ManifestReport, Snapshot};
pub use net::{parse_cidr, parse_ip};
pub use object::{Decoded, DecodedEndpointSlice, DecodedService, Grouped, Rejected};
pub use service::ServiceInfo;
pub use state::{
    Build, CategorizedEndpoints, HealthCheck, LocalTraffic, NodePortAddresses, NodePortChoice,
    ProxyState, ServicePortName, ServicePortState,
};
pub use topology::categorize_endpoints;

/// An IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    /// IPv4
    V4,
    /// IPv6
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(addr: &std::net::IpAddr) -> IpFamily {
        if addr.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }
}

/// A Service port protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP
    Tcp,
    /// UDP
    Udp,
    /// SCTP
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`); absent means TCP.
    pub fn parse(value: Option<&str>) -> Result<Protocol, ValueError> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(ValueError::Protocol(net::cut(other))),
        }
    }

    /// The lower-case name, as used in chain names.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}
