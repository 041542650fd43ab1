//! The command line: kube-proxy-compatible flags, validated into a [`ProxyConfig`].
//!
//! Invariant: flags override the `--config` file, which overrides the defaults; every
//! value is checked here, so a bad flag ends the process before anything runs.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;
use ipnet::IpNet;
use nftproxy_model::config::{parse_detect_local, parse_duration, parse_node_port_address};
use nftproxy_model::{
    ConfigError, KubeProxyConfiguration, NodePortAddress, ProxyConfig, parse_cidr, parse_ip,
};

/// nftproxy: a kube-proxy replacement that programs nf_tables over netlink.
#[derive(Debug, Parser)]
#[command(name = "nftproxy", version, about)]
pub struct Args {
    /// Print the ruleset nftproxy would program, in `nft -f` syntax, and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Program this network namespace once and exit.
    #[arg(long, conflicts_with = "dry_run")]
    pub once: bool,
    /// Remove everything nftproxy wrote and exit.
    #[arg(long, conflicts_with_all = ["dry_run", "once"])]
    pub cleanup: bool,
    /// With --dry-run: print the transaction against the kernel's current tables.
    #[arg(long, requires = "dry_run")]
    pub diff: bool,
    /// Manifest files or directories (*.yaml, *.yml, *.json), or `-` for standard input.
    #[arg(long, num_args = 1.., value_name = "PATH")]
    pub manifests: Vec<PathBuf>,
    /// A KubeProxyConfiguration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(long, visible_alias = "hostname-override", value_name = "NAME")]
    pub node_name: Option<String>,
    /// A node IP; repeat for more (default: from the Node object).
    #[arg(long, value_name = "IP", value_parser = ip_arg)]
    pub node_ip: Vec<IpAddr>,
    /// The cluster's pod CIDR(s); repeat or comma-separate for dual-stack.
    #[arg(long, value_name = "CIDR", value_delimiter = ',', value_parser = cidr_arg)]
    pub cluster_cidr: Vec<IpNet>,
    /// Service CIDR(s): unallocated addresses inside them are dropped.
    #[arg(long, value_name = "CIDR", value_delimiter = ',', value_parser = cidr_arg)]
    pub service_cidr: Vec<IpNet>,
    /// Where NodePorts are accepted: `primary` or CIDRs (`0.0.0.0/0` for all).
    #[arg(long, value_name = "ADDR", value_delimiter = ',', value_parser = node_port_arg)]
    pub nodeport_addresses: Vec<NodePortAddress>,
    /// Masquerade all traffic sent to ClusterIPs.
    #[arg(long)]
    pub masquerade_all: bool,
    /// The packet mark bit that requests masquerading (0-31).
    #[arg(long, value_name = "BIT", value_parser = clap::value_parser!(u8).range(0..=31))]
    pub masquerade_bit: Option<u8>,
    /// How local pod traffic is recognised: ClusterCIDR, NodeCIDR, BridgeInterface,
    /// InterfaceNamePrefix.
    #[arg(long, value_name = "MODE")]
    pub detect_local_mode: Option<String>,
    /// Bridge interface for --detect-local-mode=BridgeInterface.
    #[arg(long, value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,
    /// Interface prefix for --detect-local-mode=InterfaceNamePrefix.
    #[arg(long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,
    /// Longest time between syncs (Go duration, e.g. 30s).
    #[arg(long, value_name = "DURATION")]
    pub sync_period: Option<String>,
    /// Shortest time between syncs (Go duration, e.g. 1s).
    #[arg(long, value_name = "DURATION")]
    pub min_sync_period: Option<String>,
    /// Kubeconfig file for the API server (in-cluster config by default).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// API server URL (overrides the kubeconfig).
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

fn ip_arg(text: &str) -> Result<IpAddr, String> {
    parse_ip(text)
}

fn cidr_arg(text: &str) -> Result<IpNet, String> {
    parse_cidr(text)
}

fn node_port_arg(text: &str) -> Result<NodePortAddress, String> {
    parse_node_port_address(text).map_err(|e| e.to_string())
}

impl Args {
    /// Resolves defaults, the config file and flags into a [`ProxyConfig`]. Returns the
    /// config and the config-file fields nftproxy does not use.
    pub fn proxy_config(
        &self,
        file: Option<&KubeProxyConfiguration>,
    ) -> Result<ProxyConfig, ConfigError> {
        let mut config = ProxyConfig::new(default_node_name());
        if let Some(file) = file {
            config.apply_file(file)?;
        }
        if let Some(name) = &self.node_name {
            config.node_name = name.clone();
        }
        if !self.node_ip.is_empty() {
            config.node_ips = self.node_ip.clone();
        }
        if !self.cluster_cidr.is_empty() {
            config.cluster_cidrs = self.cluster_cidr.clone();
        }
        config
            .service_cidrs
            .extend(self.service_cidr.iter().copied());
        if !self.nodeport_addresses.is_empty() {
            config.node_port_addresses = self.nodeport_addresses.clone();
        }
        if self.masquerade_all {
            config.masquerade_all = true;
        }
        if let Some(bit) = self.masquerade_bit {
            config.masquerade_bit = bit;
        }
        if let Some(mode) = &self.detect_local_mode {
            config.detect_local = parse_detect_local(
                mode,
                self.pod_bridge_interface.as_deref(),
                self.pod_interface_name_prefix.as_deref(),
            )?;
        }
        if let Some(period) = &self.sync_period {
            config.sync_period = parse_duration("--sync-period", period)?;
        }
        if let Some(period) = &self.min_sync_period {
            config.min_sync_period = parse_duration("--min-sync-period", period)?;
        }
        Ok(config)
    }
}

/// kube-proxy's default node name: the lower-cased host name.
fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_lowercase())
        .unwrap_or_default()
}
