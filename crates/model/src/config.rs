//! Proxy settings: the `KubeProxyConfiguration` file as users already write it, and the
//! resolved [`ProxyConfig`] the rest of nftproxy reads.
//!
//! Invariant: a `ProxyConfig` is always valid (parsed CIDRs, a mark bit in range,
//! positive sync periods); every check happens when it is built, with an error naming
//! the field.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::net::{parse_cidr, parse_ip};

/// A setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file is not YAML or does not have the expected shape.
    #[error("{0}")]
    Parse(String),
    /// A field has a value nftproxy cannot use.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, spelled as in the file (or the flag).
        field: String,
        /// Why.
        reason: String,
    },
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        reason: reason.to_string(),
    }
}

/// The fields of `kubeproxy.config.k8s.io` `KubeProxyConfiguration` that nftproxy reads.
/// Both the v1alpha1 layout (`nftables.masqueradeAll`) and the flatter newer one
/// (`masqueradeAll`, `syncPeriod` at top level) are accepted.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct KubeProxyConfiguration {
    pub kind: Option<String>,
    pub mode: Option<String>,
    pub hostname_override: Option<String>,
    pub bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocalConfiguration>,
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i64>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
    pub nftables: Option<ModeConfiguration>,
    pub linux: Option<LinuxConfiguration>,
    pub client_connection: Option<ClientConnectionConfiguration>,
    /// nftproxy's own: remove what kube-proxy left on the node once synced.
    pub cleanup_kube_proxy: Option<bool>,
    /// nftproxy's own: count connections per Service port and endpoint in the kernel.
    pub service_counters: Option<bool>,
    pub conntrack: Option<ConntrackConfiguration>,
    /// Everything else (iptables, ipvs, …): accepted and reported as unused.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// `detectLocal`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct DetectLocalConfiguration {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

/// `nftables` (v1alpha1).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct ModeConfiguration {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i64>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
}

/// `clientConnection`: only the kubeconfig path is used (qps, burst and contentType are
/// the Go client's business).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct ClientConnectionConfiguration {
    pub kubeconfig: Option<String>,
}

/// `linux` (v1alpha2).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct LinuxConfiguration {
    pub masquerade_all: Option<bool>,
    pub conntrack: Option<ConntrackConfiguration>,
}

/// `conntrack` (v1alpha1; `linux.conntrack` in v1alpha2): durations in Go's syntax
/// (`24h0m0s`), as the file carries them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct ConntrackConfiguration {
    pub max_per_core: Option<i64>,
    pub min: Option<i64>,
    pub tcp_established_timeout: Option<String>,
    pub tcp_close_wait_timeout: Option<String>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<String>,
    pub udp_stream_timeout: Option<String>,
}

impl KubeProxyConfiguration {
    /// Parses the YAML text of a configuration file.
    pub fn parse(text: &str) -> Result<KubeProxyConfiguration, ConfigError> {
        let config: Option<KubeProxyConfiguration> = serde_saphyr::from_str(text).map_err(|e| {
            let line = e
                .location()
                .map(|l| format!("line {}: ", l.line()))
                .unwrap_or_default();
            ConfigError::Parse(format!(
                "{line}{}",
                e.to_string().lines().next().unwrap_or("")
            ))
        })?;
        let config = config.unwrap_or_default();
        if let Some(kind) = &config.kind
            && kind != "KubeProxyConfiguration"
        {
            return Err(invalid(
                "kind",
                format!("{kind:?} is not KubeProxyConfiguration"),
            ));
        }
        if let Some(mode) = &config.mode
            && !mode.is_empty()
            && mode != "nftables"
        {
            return Err(invalid(
                "mode",
                format!("{mode:?}: nftproxy only implements nftables mode"),
            ));
        }
        Ok(config)
    }

    /// Top-level fields nftproxy does not use (so the caller can say so once).
    pub fn unused_fields(&self) -> Vec<&str> {
        // Fields that every file carries or that only matter to the API client.
        const EXPECTED: [&str; 3] = ["apiVersion", "featureGates", "logging"];
        self.other
            .keys()
            .map(String::as_str)
            .filter(|k| !EXPECTED.contains(k))
            .collect()
    }
}

/// One `nodePortAddresses` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePortAddress {
    /// `primary`: the node's primary IP of each family.
    Primary,
    /// Node IPs inside this CIDR; `0.0.0.0/0` or `::/0` means every local address.
    Cidr(IpNet),
    /// `all`: every local address of both families (`0.0.0.0/0` and `::/0`).
    All,
    /// `localhost`: the loopback addresses of both families. Like kube-proxy's nftables
    /// mode without its `KubeProxyNFTablesLocalhostNodePorts` gate, nftproxy does not
    /// serve NodePorts there: the entry is accepted, said once, and takes no address.
    Localhost,
}

impl NodePortAddress {
    /// Whether this entry asks for NodePorts on a loopback address by name or by a CIDR
    /// narrower than everything (`127.0.0.1/32`, `::1/128`; `0.0.0.0/0` does not ask).
    pub fn names_loopback(&self) -> bool {
        match self {
            NodePortAddress::Localhost => true,
            NodePortAddress::Cidr(cidr) => {
                cidr.prefix_len() > 0
                    && [
                        IpAddr::from([127, 0, 0, 1]),
                        IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                    ]
                    .iter()
                    .any(|loopback| cidr.contains(loopback))
            }
            NodePortAddress::Primary | NodePortAddress::All => false,
        }
    }
}

/// How traffic from local pods is recognised (`detectLocalMode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectLocalMode {
    /// Source inside `clusterCIDR`.
    ClusterCidr,
    /// Source inside the Node's `spec.podCIDRs`.
    NodeCidr,
    /// Arriving on this bridge interface.
    BridgeInterface(String),
    /// Arriving on an interface whose name starts with this prefix.
    InterfaceNamePrefix(String),
}

/// Resolved settings that shape the rules: everything the proxy state is built from
/// besides the cluster's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// This node's name (matches `EndpointSlice` `nodeName` and the Node object).
    pub node_name: String,
    /// Node IPs given explicitly; when empty they come from the Node object.
    pub node_ips: Vec<IpAddr>,
    /// Pod CIDRs of the cluster (at most one per family is used).
    pub cluster_cidrs: Vec<IpNet>,
    /// Service CIDRs given explicitly (ServiceCIDR objects add to them).
    pub service_cidrs: Vec<IpNet>,
    /// Where NodePorts are accepted; empty means `primary`.
    pub node_port_addresses: Vec<NodePortAddress>,
    /// How local pod traffic is recognised.
    pub detect_local: DetectLocalMode,
    /// Masquerade all traffic to ClusterIPs.
    pub masquerade_all: bool,
    /// The bit of the packet mark that requests masquerading (0–31).
    pub masquerade_bit: u8,
    /// Count new connections per Service port, outcome and endpoint in the kernel
    /// (`serviceCounters`, nftproxy's own field; off by default: the counters of the
    /// balancers' map elements make a cold load about a fifth slower).
    pub service_counters: bool,
}

/// Resolved settings of the long-running process that shape no rule: when it syncs,
/// where it serves health and metrics, how it reaches the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Longest time between syncs.
    pub sync_period: Duration,
    /// Shortest time between syncs.
    pub min_sync_period: Duration,
    /// Where `/healthz` and `/livez` are served; `None` turns them off.
    pub healthz_bind_address: Option<SocketAddr>,
    /// Where `/metrics` is served; `None` turns it off.
    pub metrics_bind_address: Option<SocketAddr>,
    /// The kubeconfig file for the API client (`clientConnection.kubeconfig`).
    pub kubeconfig: Option<PathBuf>,
    /// Remove kube-proxy's rules from the node after the first successful sync
    /// (`cleanupKubeProxy`, nftproxy's own field).
    pub cleanup_kube_proxy: bool,
    /// What the kernel's connection tracking is set to at start (`conntrack`).
    pub conntrack: ConntrackSettings,
}

/// kube-proxy's `conntrack` settings, resolved: what the daemon asks of the kernel's
/// connection tracking at start. Zero (a count, a duration) leaves the kernel's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackSettings {
    /// `nf_conntrack_max` per CPU.
    pub max_per_core: u32,
    /// The least `nf_conntrack_max`, whatever the CPU count.
    pub min: u32,
    /// `nf_conntrack_tcp_timeout_established`.
    pub tcp_established_timeout: Duration,
    /// `nf_conntrack_tcp_timeout_close_wait`.
    pub tcp_close_wait_timeout: Duration,
    /// `nf_conntrack_tcp_be_liberal` (only ever turned on).
    pub tcp_be_liberal: bool,
    /// `nf_conntrack_udp_timeout`.
    pub udp_timeout: Duration,
    /// `nf_conntrack_udp_timeout_stream`.
    pub udp_stream_timeout: Duration,
}

impl Default for ConntrackSettings {
    /// kube-proxy's defaults.
    fn default() -> ConntrackSettings {
        ConntrackSettings {
            max_per_core: 32_768,
            min: 131_072,
            tcp_established_timeout: Duration::from_secs(24 * 3600),
            tcp_close_wait_timeout: Duration::from_secs(3600),
            tcp_be_liberal: false,
            udp_timeout: Duration::ZERO,
            udp_stream_timeout: Duration::ZERO,
        }
    }
}

impl ConntrackSettings {
    /// The `nf_conntrack_max` wanted on a machine with `cpus` CPUs: `max_per_core` for
    /// each, at least `min`; `None` (leave it) when `max_per_core` is 0.
    pub fn max(&self, cpus: usize) -> Option<u64> {
        (self.max_per_core > 0).then(|| {
            let scaled = u64::from(self.max_per_core).saturating_mul(cpus as u64);
            scaled.max(u64::from(self.min))
        })
    }

    /// The per-network-namespace sysctls wanted, by their name under
    /// `net/netfilter/`, in kube-proxy's order: the timeouts in seconds, 1 for liberal.
    pub fn namespace_sysctls(&self) -> Vec<(&'static str, u64)> {
        [
            (
                "nf_conntrack_tcp_timeout_established",
                self.tcp_established_timeout.as_secs(),
            ),
            (
                "nf_conntrack_tcp_timeout_close_wait",
                self.tcp_close_wait_timeout.as_secs(),
            ),
            (
                "nf_conntrack_tcp_be_liberal",
                u64::from(self.tcp_be_liberal),
            ),
            ("nf_conntrack_udp_timeout", self.udp_timeout.as_secs()),
            (
                "nf_conntrack_udp_timeout_stream",
                self.udp_stream_timeout.as_secs(),
            ),
        ]
        .into_iter()
        .filter(|(_, value)| *value > 0)
        .collect()
    }

    /// Applies the file's section on top of the current values.
    fn apply_file(&mut self, file: &ConntrackConfiguration) -> Result<(), ConfigError> {
        if let Some(n) = file.max_per_core {
            self.max_per_core = parse_count("conntrack.maxPerCore", n)?;
        }
        if let Some(n) = file.min {
            self.min = parse_count("conntrack.min", n)?;
        }
        let durations = [
            (
                "conntrack.tcpEstablishedTimeout",
                &file.tcp_established_timeout,
                &mut self.tcp_established_timeout,
            ),
            (
                "conntrack.tcpCloseWaitTimeout",
                &file.tcp_close_wait_timeout,
                &mut self.tcp_close_wait_timeout,
            ),
            (
                "conntrack.udpTimeout",
                &file.udp_timeout,
                &mut self.udp_timeout,
            ),
            (
                "conntrack.udpStreamTimeout",
                &file.udp_stream_timeout,
                &mut self.udp_stream_timeout,
            ),
        ];
        for (field, text, value) in durations {
            if let Some(text) = text {
                *value = parse_duration_or_zero(field, text)?;
            }
        }
        if let Some(liberal) = file.tcp_be_liberal {
            self.tcp_be_liberal = liberal;
        }
        Ok(())
    }
}

/// A count of the `conntrack` section: 0 to 2^31 - 1, as kube-proxy's int32 fields.
fn parse_count(field: &str, value: i64) -> Result<u32, ConfigError> {
    u32::try_from(value)
        .ok()
        .filter(|n| i32::try_from(*n).is_ok())
        .ok_or_else(|| invalid(field, format!("{value} is not between 0 and 2147483647")))
}

/// kube-proxy's default `healthzBindAddress` port.
pub const HEALTHZ_PORT: u16 = 10256;
/// kube-proxy's default `metricsBindAddress` port.
pub const METRICS_PORT: u16 = 10249;

impl ProxyConfig {
    /// Defaults as kube-proxy's nftables mode has them.
    pub fn new(node_name: impl Into<String>) -> ProxyConfig {
        ProxyConfig {
            node_name: node_name.into(),
            node_ips: Vec::new(),
            cluster_cidrs: Vec::new(),
            service_cidrs: Vec::new(),
            node_port_addresses: Vec::new(),
            detect_local: DetectLocalMode::ClusterCidr,
            masquerade_all: false,
            masquerade_bit: 14,
            service_counters: false,
        }
    }

    /// The masquerade mark: `1 << masquerade_bit`.
    pub fn masquerade_mark(&self) -> u32 {
        1u32 << self.masquerade_bit
    }

    /// Applies the fields of a configuration file on top of the current values.
    pub fn apply_file(&mut self, file: &KubeProxyConfiguration) -> Result<(), ConfigError> {
        if let Some(name) = file.hostname_override.as_deref().filter(|n| !n.is_empty()) {
            self.node_name = name.to_owned();
        }
        if let Some(addr) = file.bind_address.as_deref().filter(|a| !a.is_empty()) {
            let ip = parse_ip(addr).map_err(|e| invalid("bindAddress", e))?;
            // 0.0.0.0 / :: (the default) say nothing about the node's address.
            if !ip.is_unspecified() && self.node_ips.is_empty() {
                self.node_ips.push(ip);
            }
        }
        if let Some(cidrs) = &file.cluster_cidr {
            self.cluster_cidrs = parse_cidr_list("clusterCIDR", cidrs)?;
        }
        if let Some(addresses) = &file.node_port_addresses {
            self.node_port_addresses = addresses
                .iter()
                .map(|a| parse_node_port_address(a))
                .collect::<Result<_, _>>()?;
        }
        let detect = file.detect_local.clone().unwrap_or_default();
        if let Some(mode) = &file.detect_local_mode {
            self.detect_local = parse_detect_local(
                mode,
                detect.bridge_interface.as_deref(),
                detect.interface_name_prefix.as_deref(),
            )?;
        }
        let nft = file.nftables.clone().unwrap_or_default();
        if let Some(all) = nft
            .masquerade_all
            .or(file.masquerade_all)
            .or(file.linux.as_ref().and_then(|l| l.masquerade_all))
        {
            self.masquerade_all = all;
        }
        if let Some(counters) = file.service_counters {
            self.service_counters = counters;
        }
        if let Some(bit) = nft.masquerade_bit.or(file.masquerade_bit) {
            self.masquerade_bit = u8::try_from(bit)
                .ok()
                .filter(|b| *b <= 31)
                .ok_or_else(|| invalid("masqueradeBit", format!("{bit} is not in 0..31")))?;
        }
        Ok(())
    }
}

impl Default for DaemonConfig {
    /// kube-proxy's defaults.
    fn default() -> DaemonConfig {
        DaemonConfig {
            sync_period: Duration::from_secs(30),
            min_sync_period: Duration::from_secs(1),
            healthz_bind_address: Some(SocketAddr::from(([0, 0, 0, 0], HEALTHZ_PORT))),
            metrics_bind_address: Some(SocketAddr::from(([127, 0, 0, 1], METRICS_PORT))),
            kubeconfig: None,
            cleanup_kube_proxy: false,
            conntrack: ConntrackSettings::default(),
        }
    }
}

impl DaemonConfig {
    /// Applies the fields of a configuration file on top of the current values.
    pub fn apply_file(&mut self, file: &KubeProxyConfiguration) -> Result<(), ConfigError> {
        let nft = file.nftables.clone().unwrap_or_default();
        if let Some(period) = nft.sync_period.as_ref().or(file.sync_period.as_ref()) {
            self.sync_period = parse_duration("syncPeriod", period)?;
        }
        if let Some(period) = nft
            .min_sync_period
            .as_ref()
            .or(file.min_sync_period.as_ref())
        {
            self.min_sync_period = parse_duration_or_zero("minSyncPeriod", period)?;
        }
        if let Some(address) = &file.healthz_bind_address {
            self.healthz_bind_address =
                parse_bind_address("healthzBindAddress", address, HEALTHZ_PORT)?;
        }
        if let Some(address) = &file.metrics_bind_address {
            self.metrics_bind_address =
                parse_bind_address("metricsBindAddress", address, METRICS_PORT)?;
        }
        if let Some(path) = file
            .client_connection
            .as_ref()
            .and_then(|c| c.kubeconfig.as_deref())
            .filter(|p| !p.is_empty())
        {
            self.kubeconfig = Some(PathBuf::from(path));
        }
        if let Some(cleanup) = file.cleanup_kube_proxy {
            self.cleanup_kube_proxy = cleanup;
        }
        let linux = file.linux.as_ref().and_then(|l| l.conntrack.as_ref());
        if let Some(conntrack) = linux.or(file.conntrack.as_ref()) {
            self.conntrack.apply_file(conntrack)?;
        }
        Ok(())
    }
}

/// Parses a server bind address as kube-proxy accepts it: `IP:PORT`, `[IPv6]:PORT`,
/// `:PORT` (every address), or a bare IP (the default port). Empty or port 0 turns the
/// server off (`None`).
pub fn parse_bind_address(
    field: &str,
    text: &str,
    default_port: u16,
) -> Result<Option<SocketAddr>, ConfigError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || invalid(field, format!("{text:?} is not IP:PORT"));
    let address = if let Some(port) = text.strip_prefix(':') {
        SocketAddr::from(([0, 0, 0, 0], port.parse().map_err(|_| bad())?))
    } else if let Ok(address) = text.parse::<SocketAddr>() {
        address
    } else {
        SocketAddr::new(parse_ip(text).map_err(|_| bad())?, default_port)
    };
    Ok((address.port() != 0).then_some(address))
}

/// Parses a comma-separated CIDR list (`10.244.0.0/16,fd00:10::/64`).
pub fn parse_cidr_list(field: &str, text: &str) -> Result<Vec<IpNet>, ConfigError> {
    text.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| parse_cidr(part).map_err(|e| invalid(field, e)))
        .collect()
}

/// Parses one `nodePortAddresses` entry: `primary` or a CIDR.
pub fn parse_node_port_address(text: &str) -> Result<NodePortAddress, ConfigError> {
    match text.trim() {
        "primary" => Ok(NodePortAddress::Primary),
        "all" => Ok(NodePortAddress::All),
        "localhost" => Ok(NodePortAddress::Localhost),
        cidr => parse_cidr(cidr)
            .map(NodePortAddress::Cidr)
            .map_err(|e| invalid("nodePortAddresses", e)),
    }
}

/// Parses `detectLocalMode` with the interface settings it may need.
pub fn parse_detect_local(
    mode: &str,
    bridge: Option<&str>,
    prefix: Option<&str>,
) -> Result<DetectLocalMode, ConfigError> {
    let interface = |field: &str, value: Option<&str>| {
        let name = value.unwrap_or_default();
        // IFNAMSIZ is 16 including the terminating NUL; quotes would end the nft string.
        if name.is_empty() || name.len() > 15 || name.contains(['"', '*', ' ']) {
            Err(invalid(field, format!("{name:?} is not an interface name")))
        } else {
            Ok(name.to_owned())
        }
    };
    match mode {
        "" | "ClusterCIDR" => Ok(DetectLocalMode::ClusterCidr),
        "NodeCIDR" => Ok(DetectLocalMode::NodeCidr),
        "BridgeInterface" => Ok(DetectLocalMode::BridgeInterface(interface(
            "detectLocal.bridgeInterface",
            bridge,
        )?)),
        "InterfaceNamePrefix" => Ok(DetectLocalMode::InterfaceNamePrefix(interface(
            "detectLocal.interfaceNamePrefix",
            prefix,
        )?)),
        other => Err(invalid(
            "detectLocalMode",
            format!(
                "{other:?} (want ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix)"
            ),
        )),
    }
}

/// Parses a Go-style duration (`30s`, `1m30s`, `500ms`, `1h`) greater than zero.
pub fn parse_duration(field: &str, text: &str) -> Result<Duration, ConfigError> {
    let duration = parse_duration_or_zero(field, text)?;
    if duration.is_zero() {
        return Err(invalid(field, "must be greater than zero"));
    }
    Ok(duration)
}

/// Like [`parse_duration`], zero (`0`, `0s`) included: a `minSyncPeriod` of zero syncs
/// on every change, as kube-proxy allows.
pub fn parse_duration_or_zero(field: &str, text: &str) -> Result<Duration, ConfigError> {
    let bad = || invalid(field, format!("{text:?} is not a duration like 30s or 1m"));
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return Err(bad()),
        };
        total += Duration::from_secs_f64(number * seconds);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_configuration_is_read_in_both_layouts() {
        let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                    mode: nftables\nclusterCIDR: 10.244.0.0/16,fd00:10::/64\n\
                    nodePortAddresses: [primary, 192.168.0.0/16]\n\
                    nftables: {masqueradeBit: 15, syncPeriod: 1m, minSyncPeriod: 2s}\n\
                    masqueradeAll: true\nconntrack: {maxPerCore: 0}\nserviceCounters: true\n\
                    iptables: {masqueradeAll: false}\n";
        let file = KubeProxyConfiguration::parse(text).unwrap();
        let mut config = ProxyConfig::new("n");
        assert!(!config.service_counters, "off by default");
        config.apply_file(&file).unwrap();
        assert!(config.service_counters);
        assert_eq!(config.cluster_cidrs.len(), 2);
        assert_eq!(config.masquerade_mark(), 0x8000);
        assert!(config.masquerade_all);
        let mut daemon = DaemonConfig::default();
        daemon.apply_file(&file).unwrap();
        assert_eq!(daemon.sync_period, Duration::from_secs(60));
        assert_eq!(daemon.min_sync_period, Duration::from_secs(2));
        assert_eq!(config.node_port_addresses[0], NodePortAddress::Primary);
        assert_eq!(
            daemon.conntrack.max(64),
            None,
            "maxPerCore 0 leaves the maximum"
        );
        assert_eq!(file.unused_fields(), vec!["iptables"]);
    }

    #[test]
    fn conntrack_has_kube_proxys_defaults_and_reads_both_layouts() {
        let defaults = ConntrackSettings::default();
        // 32768 per core, at least 131072.
        assert_eq!(defaults.max(2), Some(131_072));
        assert_eq!(defaults.max(8), Some(262_144));
        assert_eq!(
            defaults.namespace_sysctls(),
            [
                ("nf_conntrack_tcp_timeout_established", 86_400),
                ("nf_conntrack_tcp_timeout_close_wait", 3_600),
            ],
            "UDP timeouts of 0 and liberal off leave the kernel's values"
        );
        let v1alpha1 = "conntrack: {maxPerCore: 100000, min: 0, tcpEstablishedTimeout: 2h0m0s,\n\
                        tcpCloseWaitTimeout: 0s, tcpBeLiberal: true, udpTimeout: 45s,\n\
                        udpStreamTimeout: 3m}\n";
        let v1alpha2 = format!("linux:\n  {}", v1alpha1.replace('\n', "\n  "));
        for text in [v1alpha1, v1alpha2.as_str()] {
            let file = KubeProxyConfiguration::parse(text).unwrap();
            let mut daemon = DaemonConfig::default();
            daemon.apply_file(&file).unwrap();
            assert_eq!(daemon.conntrack.max(2), Some(200_000), "{text}");
            assert_eq!(
                daemon.conntrack.namespace_sysctls(),
                [
                    ("nf_conntrack_tcp_timeout_established", 7_200),
                    ("nf_conntrack_tcp_be_liberal", 1),
                    ("nf_conntrack_udp_timeout", 45),
                    ("nf_conntrack_udp_timeout_stream", 180),
                ],
                "{text}"
            );
            assert!(file.unused_fields().is_empty());
        }
        for (text, field) in [
            ("conntrack: {maxPerCore: -1}", "conntrack.maxPerCore"),
            ("conntrack: {min: 4294967296}", "conntrack.min"),
            (
                "conntrack: {tcpEstablishedTimeout: 1d}",
                "conntrack.tcpEstablishedTimeout",
            ),
            (
                "conntrack: {udpStreamTimeout: soon}",
                "conntrack.udpStreamTimeout",
            ),
        ] {
            let file = KubeProxyConfiguration::parse(text).unwrap();
            let error = DaemonConfig::default().apply_file(&file).unwrap_err();
            assert!(
                error.to_string().starts_with(&format!("{field}: ")),
                "{error}"
            );
        }
    }

    #[test]
    fn bind_addresses_and_the_kubeconfig_come_from_the_file() {
        let defaults = DaemonConfig::default();
        assert_eq!(
            defaults.healthz_bind_address,
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert_eq!(
            defaults.metrics_bind_address,
            Some("127.0.0.1:10249".parse().unwrap())
        );
        let file = KubeProxyConfiguration::parse(
            "healthzBindAddress: \"10.0.0.1\"\nmetricsBindAddress: \"\"\n\
             clientConnection:\n  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf\n  qps: 5\n",
        )
        .unwrap();
        let mut config = defaults;
        config.apply_file(&file).unwrap();
        assert_eq!(
            config.healthz_bind_address,
            Some("10.0.0.1:10256".parse().unwrap())
        );
        assert_eq!(config.metrics_bind_address, None);
        assert_eq!(
            config.kubeconfig.as_deref(),
            Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        assert!(file.unused_fields().is_empty());
        for (text, want) in [
            (":9000", Some("0.0.0.0:9000")),
            ("[::1]:9000", Some("[::1]:9000")),
            ("127.0.0.1:0", None),
        ] {
            let got = parse_bind_address("f", text, 1).unwrap();
            assert_eq!(got, want.map(|w| w.parse().unwrap()), "{text}");
        }
        let error = parse_bind_address("metricsBindAddress", "localhost:x", 1).unwrap_err();
        assert!(
            error.to_string().starts_with("metricsBindAddress:"),
            "{error}"
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let file = KubeProxyConfiguration::parse("masqueradeBit: 40\n").unwrap();
        let error = ProxyConfig::new("n").apply_file(&file).unwrap_err();
        assert!(error.to_string().starts_with("masqueradeBit:"), "{error}");
        let file = KubeProxyConfiguration::parse("clusterCIDR: 10.0.0.0/99\n").unwrap();
        let error = ProxyConfig::new("n").apply_file(&file).unwrap_err();
        assert!(error.to_string().starts_with("clusterCIDR:"), "{error}");
        assert!(KubeProxyConfiguration::parse("mode: ipvs\n").is_err());
    }

    #[test]
    fn go_durations() {
        assert_eq!(
            parse_duration("f", "1m30s").unwrap(),
            Duration::from_secs(90)
        );
        assert_eq!(
            parse_duration("f", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert!(parse_duration("f", "5 minutes").is_err());
        assert!(parse_duration("f", "0s").is_err());
        assert_eq!(parse_duration_or_zero("f", "0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration_or_zero("f", "0s").unwrap(), Duration::ZERO);
        assert!(parse_duration_or_zero("f", "-1s").is_err());
    }
}
