//! The command line: kube-proxy-compatible flags, validated into a [`ProxyConfig`] (what
//! shapes the rules) and a [`DaemonConfig`] (what only the long-running mode uses).
//!
//! Invariant: flags override the `--config` file, which overrides the defaults; every
//! value is checked here, so a bad flag ends the process before anything runs.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;
use ipnet::IpNet;
use nftproxy_model::config::{
    ConntrackSettings, HEALTHZ_PORT, METRICS_PORT, parse_bind_address, parse_detect_local,
    parse_duration, parse_duration_or_zero, parse_node_port_address,
};
use nftproxy_model::{
    ConfigError, DaemonConfig, KubeProxyConfiguration, NodePortAddress, ProxyConfig, parse_cidr,
    parse_ip,
};

/// nftproxy: a kube-proxy replacement that programs nf_tables over netlink.
#[derive(Debug, Parser)]
#[command(name = "nftproxy", version, about, long_about = LONG_ABOUT, after_help = EXAMPLES)]
pub struct Args {
    /// A subcommand instead of a proxy mode.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Print the ruleset nftproxy would program, in `nft -f` syntax, and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Program this network namespace once and exit.
    #[arg(long, conflicts_with = "dry_run")]
    pub once: bool,
    /// Remove everything nftproxy wrote and exit.
    #[arg(long, conflicts_with_all = ["dry_run", "once"])]
    pub cleanup: bool,
    /// Do the privileged setup and exit, as kube-proxy's --init-only: set the kernel's
    /// connection tracking as the `conntrack` section and the --conntrack-* flags say,
    /// for an init container, so that the daemon's needs NET_ADMIN only (exit 1 when a
    /// value of this network namespace could not be set; the machine's are only logged).
    #[arg(long, conflicts_with_all = ["dry_run", "once", "cleanup"])]
    pub init_only: bool,
    /// After the first successful sync (and on every start), remove what kube-proxy left
    /// on the node: its nftables tables, and the KUBE-* chains and the jumps to them in
    /// the tables iptables-nft manages. With --dry-run: print what would be removed.
    #[arg(long)]
    pub cleanup_kube_proxy: bool,
    /// With --dry-run: print the transaction against the kernel's current tables.
    #[arg(long, requires = "dry_run")]
    pub diff: bool,
    /// Manifest files or directories (*.yaml, *.yml, *.json), or `-` for standard input.
    #[arg(long, num_args = 1.., value_name = "PATH", global = true)]
    pub manifests: Vec<PathBuf>,
    /// A KubeProxyConfiguration file.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(
        long,
        visible_alias = "hostname-override",
        value_name = "NAME",
        global = true
    )]
    pub node_name: Option<String>,
    /// A node IP; repeat for more (default: from the Node object).
    #[arg(long, value_name = "IP", value_parser = parse_ip, global = true)]
    pub node_ip: Vec<IpAddr>,
    /// The cluster's pod CIDR(s); repeat or comma-separate for dual-stack.
    #[arg(long, value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr, global = true)]
    pub cluster_cidr: Vec<IpNet>,
    /// Service CIDR(s): unallocated addresses inside them are dropped.
    #[arg(long, value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr, global = true)]
    pub service_cidr: Vec<IpNet>,
    /// Where NodePorts are accepted: `primary` (the node's primary IP), CIDRs (every
    /// address of this network namespace's interfaces inside one), `all` (every local
    /// address), `localhost` (accepted and not served, as kube-proxy's nftables mode
    /// without its KubeProxyNFTablesLocalhostNodePorts gate) (default primary). Every mode, --dry-run, --once and explain included, reads the
    /// interface addresses of the namespace it runs in; the daemon follows their changes.
    #[arg(long, value_name = "ADDR", value_delimiter = ',', value_parser = node_port_arg, global = true)]
    pub nodeport_addresses: Vec<NodePortAddress>,
    /// An address of this node's interfaces, for CIDRs in --nodeport-addresses, instead
    /// of reading the network namespace's; repeat for more.
    #[arg(long, value_name = "IP", value_parser = parse_ip, global = true)]
    pub local_address: Vec<IpAddr>,
    /// Masquerade all traffic sent to ClusterIPs.
    #[arg(long, global = true)]
    pub masquerade_all: bool,
    /// Count new connections per Service port, outcome and endpoint in the kernel
    /// (element counters), for /metrics, `explain --live` and `top` (default off: they
    /// make a cold load about a fifth slower; `hack/deploy` turns them on).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = clap::ArgAction::Set, global = true)]
    pub service_counters: Option<bool>,
    /// The packet mark bit that requests masquerading, 0-31 (default 14: mark 0x4000).
    #[arg(long, value_name = "BIT", value_parser = clap::value_parser!(u8).range(0..=31), global = true)]
    pub masquerade_bit: Option<u8>,
    /// How local pod traffic is recognised: ClusterCIDR, NodeCIDR, BridgeInterface,
    /// InterfaceNamePrefix (default ClusterCIDR).
    #[arg(long, value_name = "MODE", global = true)]
    pub detect_local_mode: Option<String>,
    /// Bridge interface for --detect-local-mode=BridgeInterface.
    #[arg(long, value_name = "NAME", global = true)]
    pub pod_bridge_interface: Option<String>,
    /// Interface prefix for --detect-local-mode=InterfaceNamePrefix.
    #[arg(long, value_name = "PREFIX", global = true)]
    pub pod_interface_name_prefix: Option<String>,
    /// Longest time between syncs, a Go duration (default 30s).
    #[arg(long, value_name = "DURATION")]
    pub sync_period: Option<String>,
    /// Shortest time between syncs, a Go duration (default 1s).
    #[arg(long, value_name = "DURATION")]
    pub min_sync_period: Option<String>,
    /// Kubeconfig file for the API server (in-cluster config by default).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// nf_conntrack_max per CPU; 0 leaves the kernel's maximum (default 32768).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..), global = true)]
    pub conntrack_max_per_core: Option<i32>,
    /// The least nf_conntrack_max, whatever the CPU count (default 131072).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..), global = true)]
    pub conntrack_min: Option<i32>,
    /// Idle timeout of established TCP connections, a Go duration; 0 leaves the kernel's
    /// (default 24h0m0s).
    #[arg(long, value_name = "DURATION", global = true)]
    pub conntrack_tcp_timeout_established: Option<String>,
    /// Timeout of TCP connections in CLOSE_WAIT; 0 leaves the kernel's (default 1h0m0s).
    #[arg(long, value_name = "DURATION", global = true)]
    pub conntrack_tcp_timeout_close_wait: Option<String>,
    /// Accept TCP packets outside the window (nf_conntrack_tcp_be_liberal).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = clap::ArgAction::Set, global = true)]
    pub conntrack_tcp_be_liberal: Option<bool>,
    /// Idle timeout of UDP flows that saw one reply; 0 leaves the kernel's (default 0s).
    #[arg(long, value_name = "DURATION", global = true)]
    pub conntrack_udp_timeout: Option<String>,
    /// Idle timeout of UDP flows that saw more; 0 leaves the kernel's (default 0s).
    #[arg(long, value_name = "DURATION", global = true)]
    pub conntrack_udp_timeout_stream: Option<String>,
    /// API server URL (overrides the kubeconfig).
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,
    /// Where `/healthz` and `/livez` are served: IP:PORT, :PORT, or empty for off
    /// (default 0.0.0.0:10256).
    #[arg(long, value_name = "ADDR")]
    pub healthz_bind_address: Option<String>,
    /// Where `/metrics` is served: IP:PORT, :PORT, or empty for off (default
    /// 127.0.0.1:10249).
    #[arg(long, value_name = "ADDR")]
    pub metrics_bind_address: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub logging_format: LogFormat,
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

const LONG_ABOUT: &str = "A kube-proxy replacement that programs nf_tables over netlink.

Without --dry-run, --once or --cleanup it runs as the node's daemon: it watches the API \
server (or, with --manifests, the files) and keeps the tables `ip nftproxy` and \
`ip6 nftproxy` of this network namespace in sync, serving /healthz, /livez and /metrics, \
until SIGTERM or SIGINT (the rules stay in place).";

const EXAMPLES: &str = "Examples:
  # Print the rules for the bundled example Services
  nftproxy --dry-run --manifests hack/examples/seed/ --node-name node-a \\
           --node-ip 192.168.50.10 --cluster-cidr 10.244.0.0/16
  # What would change in this network namespace's kernel
  nftproxy --dry-run --diff --manifests hack/examples/seed/ --node-ip 192.168.50.10
  # Program it once, then remove it again
  nftproxy --once --manifests hack/examples/seed/ --node-ip 192.168.50.10
  nftproxy --cleanup
  # Where does a packet go?
  nftproxy explain --manifests hack/examples/seed/ --node-ip 192.168.50.10 \\
           --from 203.0.113.9 --to 192.168.50.10:31000/tcp
  # The busiest Services on this node, and those refusing connections
  nftproxy top
  # The daemon, as the DaemonSet runs it (in-cluster credentials)
  nftproxy --config /var/lib/nftproxy/config.conf";

/// Subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show which rules the first packet of a connection passes and where it ends up.
    Explain(ExplainArgs),
    /// List the Service ports with the most new connections, and those rejecting or
    /// dropping them, from this network namespace's kernel counters.
    Top(TopArgs),
}

/// `nftproxy top`.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Rows per list.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub limit: usize,
}

/// `nftproxy explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The packet's source address.
    #[arg(long, value_name = "IP", value_parser = parse_ip)]
    pub from: IpAddr,
    /// The destination: ADDR:PORT/PROTO (IPv6 as [ADDR]:PORT/PROTO; PROTO tcp, udp, sctp).
    #[arg(long, value_name = "ADDR:PORT/PROTO", value_parser = destination_arg)]
    pub to: Destination,
    /// The interface the packet arrives on (matters with interface-based detectLocalMode).
    #[arg(long, value_name = "NAME", default_value = "eth0")]
    pub iif: String,
    /// Trace the rules in this network namespace's kernel instead of the manifests, and
    /// print the connection counters of the Services the packet reaches.
    #[arg(long)]
    pub live: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
}

/// How logs are written (kube-proxy's `--logging-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event, for people.
    Text,
    /// One JSON object per event, for log collectors.
    Json,
}

/// How `explain` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// For people.
    Human,
    /// For scripts.
    Json,
}

/// A traced packet's destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination {
    /// Address.
    pub addr: IpAddr,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub proto: nftproxy_nft::L4Proto,
}

fn destination_arg(text: &str) -> Result<Destination, String> {
    let bad = || format!("{text:?} is not ADDR:PORT/PROTO, e.g. 10.96.0.10:53/udp");
    let (address, proto) = text.rsplit_once('/').ok_or_else(bad)?;
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => nftproxy_nft::L4Proto::Tcp,
        "udp" => nftproxy_nft::L4Proto::Udp,
        "sctp" => nftproxy_nft::L4Proto::Sctp,
        _ => return Err(bad()),
    };
    let (addr, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let addr = parse_ip(addr.trim_start_matches('[').trim_end_matches(']')).map_err(|_| bad())?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(bad)?;
    Ok(Destination { addr, port, proto })
}

fn node_port_arg(text: &str) -> Result<NodePortAddress, String> {
    parse_node_port_address(text).map_err(|e| e.to_string())
}

impl Args {
    /// Resolves defaults, the config file and flags into what shapes the rules and what
    /// only the daemon uses.
    pub fn config(
        &self,
        file: Option<&KubeProxyConfiguration>,
    ) -> Result<(ProxyConfig, DaemonConfig), ConfigError> {
        let mut config = ProxyConfig::new(default_node_name());
        let mut daemon = DaemonConfig::default();
        if let Some(file) = file {
            config.apply_file(file)?;
            daemon.apply_file(file)?;
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
        if let Some(counters) = self.service_counters {
            config.service_counters = counters;
        }
        if let Some(mode) = &self.detect_local_mode {
            config.detect_local = parse_detect_local(
                mode,
                self.pod_bridge_interface.as_deref(),
                self.pod_interface_name_prefix.as_deref(),
            )?;
        }
        if let Some(period) = &self.sync_period {
            daemon.sync_period = parse_duration("--sync-period", period)?;
        }
        if let Some(period) = &self.min_sync_period {
            daemon.min_sync_period = parse_duration_or_zero("--min-sync-period", period)?;
        }
        if let Some(address) = &self.healthz_bind_address {
            daemon.healthz_bind_address =
                parse_bind_address("--healthz-bind-address", address, HEALTHZ_PORT)?;
        }
        if let Some(address) = &self.metrics_bind_address {
            daemon.metrics_bind_address =
                parse_bind_address("--metrics-bind-address", address, METRICS_PORT)?;
        }
        if let Some(path) = &self.kubeconfig {
            daemon.kubeconfig = Some(path.clone());
        }
        if self.cleanup_kube_proxy {
            daemon.cleanup_kube_proxy = true;
        }
        self.conntrack(&mut daemon.conntrack)?;
        Ok((config, daemon))
    }

    /// The `--conntrack-*` flags over `settings`.
    fn conntrack(&self, settings: &mut ConntrackSettings) -> Result<(), ConfigError> {
        let counts = [
            (self.conntrack_max_per_core, &mut settings.max_per_core),
            (self.conntrack_min, &mut settings.min),
        ];
        for (flag, value) in counts {
            if let Some(n) = flag {
                // Non-negative: clap checked the range.
                *value = n.unsigned_abs();
            }
        }
        let durations = [
            (
                "--conntrack-tcp-timeout-established",
                &self.conntrack_tcp_timeout_established,
                &mut settings.tcp_established_timeout,
            ),
            (
                "--conntrack-tcp-timeout-close-wait",
                &self.conntrack_tcp_timeout_close_wait,
                &mut settings.tcp_close_wait_timeout,
            ),
            (
                "--conntrack-udp-timeout",
                &self.conntrack_udp_timeout,
                &mut settings.udp_timeout,
            ),
            (
                "--conntrack-udp-timeout-stream",
                &self.conntrack_udp_timeout_stream,
                &mut settings.udp_stream_timeout,
            ),
        ];
        for (flag, text, value) in durations {
            if let Some(text) = text {
                *value = parse_duration_or_zero(flag, text)?;
            }
        }
        if let Some(liberal) = self.conntrack_tcp_be_liberal {
            settings.tcp_be_liberal = liberal;
        }
        Ok(())
    }
}

/// kube-proxy's default node name: the lower-cased host name.
fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_lowercase())
        .unwrap_or_default()
}
