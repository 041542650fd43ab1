//! Names of per-service chains and sets, in kube-proxy's hash-prefixed scheme
//! (`service-ULMVA6XW-ns1/svc1/tcp/p80`), so that admins' knowledge carries over.
//!
//! Invariant: a name is a pure function of the service port, and never
//! longer than 256 bytes: the hashed part is cut to 240 bytes, leaving room for the
//! longest prefix.

use data_encoding::BASE32;
use nftproxy_model::{Endpoint, ServicePortName};
use sha2::{Digest, Sha256};

/// nftables allows 256-byte names; the longest prefix we put in front is 16 bytes.
const HASHED_MAX: usize = 240;

/// `HASH-base`: the first 8 characters of base32(sha256(base)), then the base, cut to
/// 240 bytes with `...` when longer.
pub fn hash_and_truncate(base: &str) -> String {
    let digest = Sha256::digest(base.as_bytes());
    let encoded = BASE32.encode(&digest);
    let mut name = format!("{}-{base}", &encoded[..8]);
    if name.len() > HASHED_MAX {
        crate::cut(&mut name, HASHED_MAX - 3);
        name.push_str("...");
    }
    name
}

/// `ns/name/proto/port`
fn service_port_base(name: &ServicePortName) -> String {
    format!(
        "{}/{}/{}/{}",
        name.namespace,
        name.name,
        name.protocol.lower(),
        name.port
    )
}

/// The parts of a per-port chain or set name, `KIND-HASH-ns/name/proto/port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortName<'a> {
    /// `service`, `local`, `external`, `firewall` or `affinity`.
    pub kind: &'a str,
    /// The Service's namespace.
    pub namespace: &'a str,
    /// The Service's name.
    pub name: &'a str,
    /// The protocol, in lower case.
    pub protocol: &'a str,
    /// The port's name; empty for an unnamed port.
    pub port: &'a str,
}

/// A per-port chain or set name read back into its parts; `None` for any other name.
/// (The longest valid Kubernetes names stay under the 240 bytes where a name is cut.)
pub fn parse_port_name(name: &str) -> Option<PortName<'_>> {
    let (kind, hashed) = name.split_once('-')?;
    let (_, base) = hashed.split_once('-')?;
    let [namespace, name, protocol, port] = base.split('/').collect::<Vec<_>>()[..] else {
        return None;
    };
    Some(PortName {
        kind,
        namespace,
        name,
        protocol,
        port,
    })
}

/// Chain for Cluster-policy endpoints.
pub fn service_chain(name: &ServicePortName) -> String {
    format!("service-{}", hash_and_truncate(&service_port_base(name)))
}

/// Chain for Local-policy endpoints.
pub fn local_chain(name: &ServicePortName) -> String {
    format!("local-{}", hash_and_truncate(&service_port_base(name)))
}

/// Entry chain for NodePort, externalIP and load balancer traffic.
pub fn external_chain(name: &ServicePortName) -> String {
    format!("external-{}", hash_and_truncate(&service_port_base(name)))
}

/// Chain enforcing loadBalancerSourceRanges.
pub fn firewall_chain(name: &ServicePortName) -> String {
    format!("firewall-{}", hash_and_truncate(&service_port_base(name)))
}

/// A port's affinity set (ClientIP affinity only): its clients, each with the tag of an
/// endpoint it used within the timeout.
pub fn affinity_set(name: &ServicePortName) -> String {
    format!("affinity-{}", hash_and_truncate(&service_port_base(name)))
}

/// An endpoint's tag in its port's affinity set: the first four bytes of the SHA-256 of
/// `ip/port`, a function of the endpoint alone.
pub fn affinity_tag(endpoint: &Endpoint) -> u32 {
    let digest = Sha256::digest(format!("{}/{}", endpoint.ip, endpoint.port).as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nftproxy_model::Protocol;

    /// A ready endpoint on port 80.
    pub(crate) fn endpoint(ip: &str) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 80,
            ready: true,
            serving: true,
            terminating: false,
            is_local: false,
            hints: None,
        }
    }

    fn port(ns: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            namespace: ns.into(),
            name: name.into(),
            port: port.into(),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn hashes_match_kube_proxy() {
        assert_eq!(&hash_and_truncate("ns1/svc1/tcp/p80")[..8], "ULMVA6XW");
        assert_eq!(
            &hash_and_truncate("testing/service/tcp/http")[..8],
            "P4ZYZVCF"
        );
        assert_eq!(
            &hash_and_truncate("ns1/svc1/tcp/p80__10.180.0.1/80")[..8],
            "5OJB2KTY"
        );
        assert_eq!(
            service_chain(&port("ns1", "svc1", "p80")),
            "service-ULMVA6XW-ns1/svc1/tcp/p80"
        );
    }

    #[test]
    fn port_names_read_back_into_their_parts() {
        let name = port("ns1", "svc1", "p80");
        let chain = service_chain(&name);
        let parsed = parse_port_name(&chain).expect("a port chain");
        assert_eq!(
            (parsed.kind, parsed.namespace, parsed.name),
            ("service", "ns1", "svc1")
        );
        assert_eq!((parsed.protocol, parsed.port), ("tcp", "p80"));
        let unnamed = port("ns1", "svc1", "");
        assert_eq!(
            parse_port_name(&firewall_chain(&unnamed)).map(|p| p.port),
            Some("")
        );
        assert_eq!(parse_port_name("services"), None);
        assert_eq!(parse_port_name("load-balance-tcp-9"), None);
    }

    #[test]
    fn long_names_are_cut_within_the_nftables_limit() {
        let long = "a".repeat(300);
        let name = hash_and_truncate(&long);
        assert_eq!(name.len(), 240);
        assert!(name.ends_with("..."));
        assert!(format!("affinity-{name}").len() < 256);
    }
}
