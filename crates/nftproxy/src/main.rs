//! The nftproxy binary: parses the command line, reads its inputs and runs the
//! requested mode.
//!
//! Invariant: no rule logic lives here; this file wires the sources and the `proxier`
//! pipeline over the kernel backend together, and maps failures to exit codes (2 for
//! bad flags, 1 for errors).

mod addresses;
mod cli;
mod conntrack_settings;
mod counters;
mod daemon;
mod explain;
mod health_check;
mod http;
mod kube_proxy;
mod open_files;
mod source;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use nftproxy_model::{
    Build, DaemonConfig, KubeProxyConfiguration, NodePortAddress, ProxyConfig, Severity,
};
use nftproxy_netlink::{ConntrackSocket, NetlinkBackend};
use nftproxy_nft::{Backend, Family, Op, Transaction};
use nftproxy_proxier::{Desired, Monitor, Proxier, ReconcilerOptions, probe};
use nftproxy_render::TABLE_NAME;
use tracing::{debug, error, info, warn};

use crate::addresses::LocalAddresses;
use crate::cli::{Args, Command, LogFormat};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => match error.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                error.exit()
            }
            _ => {
                let message = error.to_string();
                let reason = message.lines().next().unwrap_or("invalid arguments");
                eprintln!("nftproxy: {}", reason.trim_start_matches("error: "));
                return ExitCode::from(2);
            }
        },
    };
    init_tracing(args.verbose, args.logging_format);
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(reason)) => {
            eprintln!("nftproxy: {reason}");
            ExitCode::from(2)
        }
        Err(Failure::Error(reason)) => {
            eprintln!("nftproxy: {reason}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    /// The command line asks for something impossible (exit 2).
    Usage(String),
    /// Running failed (exit 1).
    Error(String),
}

fn error(e: impl std::fmt::Display) -> Failure {
    Failure::Error(e.to_string())
}

/// Logs go to standard error: text for people (with a time stamp only when not on a
/// terminal, where the reader has the time already), or one JSON object per event.
/// Other crates' debug output (hyper, kube) stays off unless RUST_LOG asks for it.
fn init_tracing(verbose: u8, format: LogFormat) {
    // kube-client logs every failed request at error level; the watchers report an
    // outage once, with what happens next, so its own lines stay off by default.
    let default = match verbose {
        0 => "info,kube_client=off",
        1 => {
            "info,kube_client=off,nftproxy=debug,nftproxy_proxier=debug,nftproxy_kube_source=debug"
        }
        _ => "debug,nftproxy=trace,nftproxy_proxier=trace,nftproxy_kube_source=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text if terminal => builder.with_ansi(true).without_time().init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}

fn run(args: &Args) -> Result<(), Failure> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::Error(format!("{}: {e}", path.display())))?;
            let file = KubeProxyConfiguration::parse(&text)
                .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
            for field in file.unused_fields() {
                warn!("{}: {field} is not used by nftproxy", path.display());
            }
            Some(file)
        }
        None => None,
    };
    let (config, daemon) = args
        .config(file.as_ref())
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if config
        .node_port_addresses
        .iter()
        .any(NodePortAddress::names_loopback)
    {
        warn!(
            "nodePortAddresses names a loopback address: NodePorts are not served on \
             localhost (kube-proxy's nftables mode serves them only through the user-space \
             proxy of its alpha KubeProxyNFTablesLocalhostNodePorts gate, which nftproxy does \
             not have yet); the other entries apply"
        );
    }

    if args.cleanup {
        return cleanup();
    }
    if args.dry_run && args.cleanup_kube_proxy {
        let mut backend = NetlinkBackend::reader().map_err(error)?;
        let removals = kube_proxy::plan(&mut backend).map_err(error)?;
        return emit(&kube_proxy::describe(&removals));
    }
    if args.init_only {
        let applied = set_conntrack(&daemon.conntrack);
        let failed = applied
            .iter()
            .filter(|a| !a.global && matches!(a.outcome, conntrack_settings::Outcome::Failed(_)))
            .count();
        if failed > 0 {
            return Err(Failure::Error(format!(
                "{failed} conntrack settings of this network namespace could not be set"
            )));
        }
        return Ok(());
    }
    if let Some(Command::Top(top)) = &args.command {
        let connections = counters::Counters::default().read().map_err(error)?;
        return emit(&counters::top_text(&connections, top.limit));
    }
    if let Some(Command::Explain(explain)) = &args.command {
        let built = if args.manifests.is_empty() || explain.live {
            None
        } else {
            let local = LocalAddresses::once(&args.local_address);
            Some(load_build(&args.manifests, &config, &local).map_err(Failure::Error)?)
        };
        let text = explain::run(
            explain,
            built.as_ref().map(|l| l.desired.built()),
            &config.node_ips,
        )
        .map_err(Failure::Error)?;
        return emit(&text);
    }
    if config.node_name.is_empty() {
        return Err(Failure::Usage("no node name: pass --node-name".to_owned()));
    }
    if args.manifests.is_empty() {
        return run_api(args, config, &daemon);
    }
    if args.kubeconfig.is_some() || args.master.is_some() {
        return Err(Failure::Usage(
            "--manifests and --kubeconfig/--master are two different sources: pass one".to_owned(),
        ));
    }
    let stdin = args.manifests.iter().any(|p| p.as_os_str() == "-");
    if stdin && !(args.dry_run || args.once) {
        return Err(Failure::Usage(
            "--manifests - (standard input) can only be read once: use it with --dry-run or --once"
                .to_owned(),
        ));
    }

    let local = LocalAddresses::once(&args.local_address);
    let loaded = load_build(&args.manifests, &config, &local).map_err(Failure::Error)?;
    if !(args.dry_run || args.once) {
        let runtime = daemon::runtime().map_err(error)?;
        let Built {
            desired, snapshot, ..
        } = loaded;
        return run_daemon(&runtime, desired, &daemon, |monitor, connections| {
            let _entered = runtime.enter();
            let files = daemon::Files::new(
                args.manifests.clone(),
                daemon.min_sync_period,
                daemon::AfterSync::new(monitor, connections, daemon.cleanup_kube_proxy),
                snapshot,
                LocalAddresses::followed(&args.local_address),
            );
            daemon::Mode::Files(files)
        });
    }
    one_shot(args, loaded, daemon.cleanup_kube_proxy)
}

/// The API mode: the daemon, or `--dry-run` / `--once` of the cluster as it is now.
fn run_api(args: &Args, config: ProxyConfig, daemon: &DaemonConfig) -> Result<(), Failure> {
    let runtime = daemon::runtime().map_err(error)?;
    let client = runtime
        .block_on(nftproxy_kube_source::client(
            daemon.kubeconfig.as_deref(),
            args.master.as_deref(),
        ))
        .map_err(|e| Failure::Error(nftproxy_kube_source::cause_chain(&e)))?;
    if args.dry_run || args.once {
        let mut snapshot = runtime
            .block_on(daemon::initial_snapshot(client, &config.node_name))
            .map_err(Failure::Error)?;
        let local = LocalAddresses::once(&args.local_address);
        snapshot.local_addresses = local.addresses();
        let desired = build_logged(&snapshot, Vec::new(), config);
        local.log_choices(desired.built());
        let built = Built {
            desired,
            broken: 0,
            snapshot,
        };
        return one_shot(args, built, daemon.cleanup_kube_proxy);
    }
    let node_name = config.node_name.clone();
    run_daemon(
        &runtime,
        Desired::new(config),
        daemon,
        |monitor, connections| {
            let _entered = runtime.enter();
            let source = nftproxy_kube_source::KubeSource::start(
                client,
                &node_name,
                nftproxy_kube_source::NODE_WAIT,
            );
            let local = LocalAddresses::followed(&args.local_address);
            let after = daemon::AfterSync::new(monitor, connections, daemon.cleanup_kube_proxy);
            daemon::Mode::Api(daemon::Api::new(source, after, local))
        },
    )
}

/// The long-running mode over `desired` and the source `mode` makes, reporting to a new
/// monitor, its HTTP servers' connections capped by the open-files limit (raised first).
fn run_daemon(
    runtime: &tokio::runtime::Runtime,
    desired: Desired,
    config: &DaemonConfig,
    mode: impl FnOnce(Arc<Monitor>, Arc<http::Connections>) -> daemon::Mode,
) -> Result<(), Failure> {
    let monitor = Arc::new(Monitor::new(config.sync_period));
    // As kube-proxy at start; what cannot be set is logged, and the daemon goes on.
    set_conntrack(&config.conntrack);
    let connections = http::Connections::new(
        http::Caps::for_open_files(raise_open_files()),
        monitor.metrics.clone(),
    );
    let counters = desired
        .config()
        .service_counters
        .then(|| Arc::new(counters::Counters::default()));
    let proxier = with_conntrack(kernel_proxier(desired, monitor.clone(), true)?);
    let mode = mode(monitor, connections.clone());
    daemon::run(runtime, proxier, config, counters, connections, mode).map_err(Failure::Error)
}

/// Sets the kernel's connection tracking as `settings` say, once the kernel has loaded
/// it (a scratch rule matching `ct state` has it loaded); what became of each value.
fn set_conntrack(
    settings: &nftproxy_model::config::ConntrackSettings,
) -> Vec<conntrack_settings::Applied> {
    let cpus = conntrack_settings::cpus();
    if settings.max(cpus).is_none() && settings.namespace_sysctls().is_empty() {
        return Vec::new();
    }
    let loaded = NetlinkBackend::open()
        .map_err(|e| e.to_string())
        .and_then(|mut backend| probe::load_conntrack(&mut backend).map_err(|e| e.to_string()));
    if let Err(error) = loaded {
        warn!(%error, "cannot have the kernel load connection tracking; setting it anyway");
    }
    conntrack_settings::apply(settings, cpus, &conntrack_settings::Paths::default())
}

/// Raises the open-files limit and logs it; the limit in force.
fn raise_open_files() -> u64 {
    let (files, error) = open_files::raise();
    let hard = files.hard.map_or("unlimited".to_owned(), |h| h.to_string());
    match error {
        None => info!(soft = files.soft, hard, now = files.now, "open files limit"),
        Some(error) => {
            warn!(soft = files.soft, hard, %error, "cannot raise the open files limit");
        }
    }
    files.now
}

/// The pipeline over this network namespace's kernel; when it is to `write`, with the
/// options the kernel's behaviour needs, probed first (a dry run writes nothing, not even
/// the probe's scratch table, and plans for a kernel that deletes a chain together with
/// the map elements naming it).
fn kernel_proxier(
    desired: Desired,
    monitor: Arc<Monitor>,
    write: bool,
) -> Result<daemon::KernelProxier, Failure> {
    let mut backend = NetlinkBackend::open().map_err(error)?;
    let options = if write {
        let chain_deletes = probe::chain_deletes(&mut backend);
        info!("kernel probe: {chain_deletes}");
        chain_deletes.options()
    } else {
        ReconcilerOptions::default()
    };
    Ok(Proxier::new(desired, backend, monitor).with_options(options))
}

/// `proxier`, deleting stale UDP flows after each sync (the modes that write; `--dry-run
/// --diff` needs no conntrack socket). Without one (it needs the same capability as the
/// rules, so this is rare) stale UDP flows stay.
fn with_conntrack(proxier: daemon::KernelProxier) -> daemon::KernelProxier {
    match ConntrackSocket::open() {
        Ok(conntrack) => proxier.with_conntrack(conntrack),
        Err(e) => {
            warn!(error = %e, "cannot open the conntrack socket; stale UDP flows stay");
            proxier
        }
    }
}

/// `--dry-run` (with or without `--diff`) and `--once` of an already built state; after
/// `--once`, what kube-proxy left is removed when `cleanup_kube_proxy`.
fn one_shot(args: &Args, loaded: Built, cleanup_kube_proxy: bool) -> Result<(), Failure> {
    let Built {
        desired, broken, ..
    } = loaded;
    if args.dry_run && !args.diff {
        let text: Vec<String> = desired.tables().iter().map(ToString::to_string).collect();
        emit(&text.join("\n"))?;
        return skipped(broken);
    }
    let monitor = Arc::new(Monitor::new(DaemonConfig::default().sync_period));
    let mut proxier = kernel_proxier(desired, monitor.clone(), !args.dry_run)?;
    if args.dry_run {
        let plans = proxier.plans().map_err(error)?;
        let text: String = plans.iter().map(ToString::to_string).collect();
        emit(if text.is_empty() {
            "# the kernel already holds this ruleset: nothing to do\n"
        } else {
            &text
        })?;
        return skipped(broken);
    }
    let report = with_conntrack(proxier).sync_once().map_err(error)?;
    info!(
        operations = report.operations,
        transactions = report.transactions,
        "programmed this network namespace"
    );
    if cleanup_kube_proxy {
        let mut backend = NetlinkBackend::open().map_err(error)?;
        monitor
            .metrics
            .kube_proxy_cleaned(kube_proxy::clean(&mut backend));
    }
    skipped(broken)
}

/// After the valid part was printed or programmed: `broken` skipped documents make the
/// one-shot modes exit non-zero, so that scripts notice.
fn skipped(broken: usize) -> Result<(), Failure> {
    match broken {
        0 => Ok(()),
        n => Err(Failure::Error(format!(
            "{n} manifest document(s) could not be parsed and were left out"
        ))),
    }
}

/// Writes to standard output; a reader that went away (`| head`) is not an error.
fn emit(text: &str) -> Result<(), Failure> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(error(e)),
        _ => Ok(()),
    }
}

/// The desired tables built from the manifests, how many documents were skipped
/// because they are not YAML, and the objects they were built from.
struct Built {
    desired: Desired,
    broken: usize,
    snapshot: nftproxy_model::Snapshot,
}

/// Loads the manifests and builds the proxy state over the `local` interface addresses,
/// logging what was left out and where NodePorts are accepted.
fn load_build(
    paths: &[PathBuf],
    config: &ProxyConfig,
    local: &LocalAddresses,
) -> Result<Built, String> {
    let mut loaded = source::load(paths).map_err(|e| e.to_string())?;
    loaded.errors.iter().for_each(log_broken);
    loaded.snapshot.local_addresses = local.addresses();
    let desired = build_logged(&loaded.snapshot, loaded.diagnostics, config.clone());
    local.log_choices(desired.built());
    Ok(Built {
        desired,
        broken: loaded.errors.len(),
        snapshot: loaded.snapshot,
    })
}

/// Builds the desired tables and logs what was left out (with the source's own
/// diagnostics).
fn build_logged(
    snapshot: &nftproxy_model::Snapshot,
    diagnostics: Vec<nftproxy_model::Diagnostic>,
    config: ProxyConfig,
) -> Desired {
    let mut desired = Desired::new(config);
    desired.update(snapshot);
    log_diagnostics(diagnostics, desired.built());
    desired
}

/// A document that is not YAML.
fn log_broken(error: &nftproxy_model::ManifestError) {
    error!("skipping document {error}");
}

/// Logs what was left out: the source's own diagnostics and the build's.
fn log_diagnostics(mut diagnostics: Vec<nftproxy_model::Diagnostic>, built: &Build) {
    diagnostics.extend(built.diagnostics.iter().cloned());
    diagnostics.sort();
    diagnostics.iter().for_each(log_diagnostic);
}

/// One thing left out: a warning when it was invalid, a debug line when it was ignored.
fn log_diagnostic(diagnostic: &nftproxy_model::Diagnostic) {
    match diagnostic.severity {
        Severity::Invalid => warn!("skipping {diagnostic}"),
        Severity::Ignored => debug!("ignoring {diagnostic}"),
    }
}

/// `--cleanup`: removes nftproxy's tables from this network namespace (and a kernel
/// probe's scratch table, left if a start was killed during the probe).
fn cleanup() -> Result<(), Failure> {
    let mut backend = NetlinkBackend::open().map_err(error)?;
    let tables = [
        (Family::Ip, TABLE_NAME),
        (Family::Ip6, TABLE_NAME),
        (Family::Ip, probe::PROBE_TABLE),
    ];
    for (family, table) in tables {
        if backend.table_exists(family, table).map_err(error)? {
            let mut tx = Transaction::new(family, table);
            tx.ops.push(Op::DeleteTable);
            backend.apply(&tx).map_err(error)?;
            info!(%family, "removed table {family} {table}");
        }
    }
    Ok(())
}
