//! Services decoded and validated: addresses per family, ports, policies, affinity.
//!
//! Invariant: a decoded Service has parsed, canonical addresses, ports in range, names
//! that fit nftables' limits once hashed, and known enum values; any violation leaves the
//! whole Service out with one diagnostic (a half-programmed Service would be worse).

use std::net::IpAddr;

use compact_str::CompactString;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;

use crate::Protocol;
use crate::diag::{Diagnostic, ObjectRef, ValueError, namespace_of};
use crate::net::{parse_cidr, parse_ip};

/// Services with this label belong to another service proxy.
const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Source ranges may also come from this annotation when the field is empty.
const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// Default `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// Largest allowed affinity timeout (one day), as the API server validates it.
const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortInfo {
    pub name: CompactString,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
/// A Service decoded: what nftproxy reads of it, validated.
pub struct ServiceInfo {
    pub(crate) namespace: CompactString,
    pub(crate) name: CompactString,
    pub(crate) cluster_ips: Vec<IpAddr>,
    pub(crate) ports: Vec<PortInfo>,
    pub(crate) external_ips: Vec<IpAddr>,
    pub(crate) load_balancer_ips: Vec<IpAddr>,
    pub(crate) source_ranges: Vec<IpNet>,
    pub(crate) internal_policy_local: bool,
    pub(crate) external_policy_local: bool,
    pub(crate) affinity_timeout: Option<u32>,
    pub(crate) health_check_node_port: Option<u16>,
}

/// Checks a DNS-label-like name (lower-case alphanumerics and `-`, plus `.` for longer
/// subdomain names), so that chain names and comments built from it stay within
/// nftables' limits and never need quoting.
pub(crate) fn check_name(what: &str, name: &str, max: usize) -> Result<(), ValueError> {
    let allowed = |b: u8| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (max > 63 && b == b'.')
    };
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if name.is_empty() || name.len() > max {
        return Err(ValueError::NameLength {
            what: what.to_owned(),
            len: name.len(),
            max,
        });
    }
    if !name.bytes().all(allowed)
        || !edge_ok(name.as_bytes().first())
        || !edge_ok(name.as_bytes().last())
    {
        return Err(ValueError::DnsName {
            what: what.to_owned(),
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Checks a port name (IANA service name: at most 15 characters, `a-z0-9-`); empty is
/// allowed for a single unnamed port.
pub(crate) fn check_port_name(name: &str) -> Result<(), ValueError> {
    if name.is_empty() {
        return Ok(());
    }
    if name.len() > 15
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || !name.bytes().any(|b| b.is_ascii_lowercase())
    {
        return Err(ValueError::PortName(crate::net::cut(name)));
    }
    Ok(())
}

/// Checks a port number from the API (an `i32`).
pub(crate) fn port_number(value: i32) -> Result<u16, ValueError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(ValueError::Port(value))
}

pub(crate) fn object_ref(service: &Service) -> ObjectRef {
    ObjectRef {
        kind: "Service".to_owned(),
        namespace: namespace_of(&service.metadata),
        name: service
            .metadata
            .name
            .clone()
            .unwrap_or_else(|| "<unnamed>".to_owned()),
    }
}

pub(crate) fn decode_service(service: &Service) -> Result<ServiceInfo, Diagnostic> {
    let object = object_ref(service);
    let invalid = |reason: String| Diagnostic::invalid(&object, reason);
    let meta = &service.metadata;
    if meta
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
    {
        return Err(Diagnostic::ignored(
            &object,
            format!("labelled {SERVICE_PROXY_NAME_LABEL}"),
        ));
    }
    check_name("namespace", &object.namespace, 63).map_err(|e| invalid(e.to_string()))?;
    check_name("name", &object.name, 63).map_err(|e| invalid(e.to_string()))?;
    let spec = service
        .spec
        .clone()
        .ok_or_else(|| invalid("no spec".to_owned()))?;
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    match service_type {
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        "ExternalName" => return Err(Diagnostic::ignored(&object, "type ExternalName")),
        other => return Err(invalid(format!("unknown type {other:?}"))),
    }

    let mut cluster_ip_texts = spec.cluster_ips.clone().unwrap_or_default();
    if cluster_ip_texts.is_empty() {
        cluster_ip_texts.extend(spec.cluster_ip.clone());
    }
    if cluster_ip_texts.iter().any(|ip| ip == "None") {
        return Err(Diagnostic::ignored(&object, "headless (clusterIP: None)"));
    }
    cluster_ip_texts.retain(|ip| !ip.is_empty());
    if cluster_ip_texts.is_empty() {
        return Err(Diagnostic::ignored(&object, "no ClusterIP allocated"));
    }
    let cluster_ips =
        parse_ips(&cluster_ip_texts).map_err(|e| invalid(format!("clusterIPs: {e}")))?;
    if cluster_ips.len() > 2
        || (cluster_ips.len() == 2 && cluster_ips[0].is_ipv4() == cluster_ips[1].is_ipv4())
    {
        return Err(invalid(
            "clusterIPs must hold at most one address per family".to_owned(),
        ));
    }

    let mut ports: Vec<PortInfo> = Vec::with_capacity(spec.ports.as_ref().map_or(0, Vec::len));
    for port in spec.ports.iter().flatten() {
        let name = port.name.clone().unwrap_or_default();
        check_port_name(&name).map_err(|e| invalid(e.to_string()))?;
        let protocol = Protocol::parse(port.protocol.as_deref())
            .map_err(|e| invalid(format!("port {name:?}: {e}")))?;
        let number = port_number(port.port).map_err(|e| invalid(format!("port {name:?}: {e}")))?;
        let node_port = match (service_type, port.node_port) {
            ("NodePort" | "LoadBalancer", Some(n)) => {
                Some(port_number(n).map_err(|e| invalid(format!("port {name:?}: nodePort: {e}")))?)
            }
            _ => None,
        };
        if ports.iter().any(|p| p.name == name) {
            return Err(invalid(format!("port name {name:?} appears twice")));
        }
        ports.push(PortInfo {
            name: name.into(),
            protocol,
            port: number,
            node_port,
        });
    }

    let external_ips = parse_ips(spec.external_ips.as_deref().unwrap_or_default())
        .map_err(|e| invalid(format!("externalIPs: {e}")))?;
    let mut load_balancer_ips = Vec::new();
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for entry in ingress.into_iter().flatten() {
        // ipMode Proxy: the load balancer delivers to the node itself, not to the VIP.
        if entry.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        if let Some(ip) = entry.ip.as_deref().filter(|ip| !ip.is_empty()) {
            load_balancer_ips
                .push(parse_ip(ip).map_err(|e| invalid(format!("loadBalancer ingress: {e}")))?);
        }
    }

    let mut range_texts = spec.load_balancer_source_ranges.clone().unwrap_or_default();
    if range_texts.is_empty()
        && let Some(annotation) = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
    {
        range_texts = annotation.split(',').map(str::to_owned).collect();
    }
    let mut source_ranges = Vec::new();
    for range in range_texts.iter().filter(|r| !r.trim().is_empty()) {
        source_ranges.push(
            parse_cidr(range).map_err(|e| invalid(format!("loadBalancerSourceRanges: {e}")))?,
        );
    }

    let policy = |field: &str, value: Option<&str>| match value {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(invalid(format!(
            "{field} {other:?} (want Cluster or Local)"
        ))),
    };
    let internal_policy_local = policy(
        "internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    )?;
    // The API server only honours externalTrafficPolicy where external traffic exists.
    let externally_accessible_type = service_type != "ClusterIP" || !external_ips.is_empty();
    let external_policy_local = policy(
        "externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    )? && externally_accessible_type;

    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let seconds = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match seconds {
                None => Some(DEFAULT_AFFINITY_TIMEOUT),
                Some(s) => Some(
                    u32::try_from(s)
                        .ok()
                        .filter(|s| (1..=MAX_AFFINITY_TIMEOUT).contains(s))
                        .ok_or_else(|| {
                            invalid(format!(
                                "sessionAffinity timeoutSeconds {s} is not in 1..86400"
                            ))
                        })?,
                ),
            }
        }
        Some(other) => {
            return Err(invalid(format!(
                "sessionAffinity {other:?} (want None or ClientIP)"
            )));
        }
    };
    let health_check_node_port = match spec.health_check_node_port {
        Some(port) if service_type == "LoadBalancer" && external_policy_local => {
            Some(port_number(port).map_err(|e| invalid(format!("healthCheckNodePort: {e}")))?)
        }
        _ => None,
    };

    Ok(ServiceInfo {
        namespace: object.namespace.into(),
        name: object.name.into(),
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        source_ranges,
        internal_policy_local,
        external_policy_local,
        affinity_timeout,
        health_check_node_port,
    })
}

/// The addresses of `texts`, each once, in order.
fn parse_ips(texts: &[String]) -> Result<Vec<IpAddr>, ValueError> {
    let mut ips = Vec::with_capacity(texts.len());
    for text in texts {
        let ip = parse_ip(text)?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_against_kubernetes_rules() {
        assert!(check_name("name", "redis", 63).is_ok());
        assert!(check_name("name", &"a".repeat(64), 63).is_err());
        assert!(check_name("name", "Redis", 63).is_err());
        assert!(check_name("name", "a.b", 63).is_err());
        assert!(check_name("name", "a.b", 253).is_ok());
        assert!(check_port_name("http-alt").is_ok());
        assert!(check_port_name("8080").is_err());
        assert!(check_port_name("this-name-is-too-long").is_err());
        assert!(port_number(0).is_err());
        assert!(port_number(65_536).is_err());
        assert_eq!(port_number(65_535), Ok(65_535));
    }
}
