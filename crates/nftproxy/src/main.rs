//! The nftproxy binary: parses the command line, reads its inputs and runs the
//! requested mode.
//!
//! Invariant: no rule logic lives here; this file wires sources, `model`, `render`, the
//! reconciler and the kernel backend together, and maps failures to exit codes (2 for
//! bad flags, 1 for errors).

mod cli;
mod explain;
mod source;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nftproxy_model::{Build, KubeProxyConfiguration, ProxyConfig, Severity, build};
use nftproxy_netlink::NetlinkBackend;
use nftproxy_nft::{Backend, Family, Op, Table, Transaction};
use nftproxy_proxier::runner::{self, Input, Timing};
use nftproxy_proxier::{Reconciler, ReconcilerOptions};
use nftproxy_render::TABLE_NAME;
use tracing::{debug, error, info, warn};

use crate::cli::{Args, Command};

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
    init_tracing(args.verbose);
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

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
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
    let config = args
        .proxy_config(file.as_ref())
        .map_err(|e| Failure::Usage(e.to_string()))?;

    if args.cleanup {
        return cleanup();
    }
    if let Some(Command::Explain(explain)) = &args.command {
        let built = if args.manifests.is_empty() || explain.live {
            None
        } else {
            Some(load_build(&args.manifests, &config).map_err(Failure::Error)?)
        };
        let text = explain::run(explain, built.as_ref().map(|l| &l.build), &config.node_ips)
            .map_err(Failure::Error)?;
        return emit(&text);
    }
    if config.node_name.is_empty() {
        return Err(Failure::Usage("no node name: pass --node-name".to_owned()));
    }
    if args.manifests.is_empty() {
        return Err(if args.dry_run || args.once {
            Failure::Usage("--dry-run and --once need --manifests PATH...".to_owned())
        } else {
            Failure::Error(
                "watching the API server is not available in this build; pass --manifests PATH..."
                    .to_owned(),
            )
        });
    }
    let stdin = args.manifests.iter().any(|p| p.as_os_str() == "-");
    if stdin && !(args.dry_run || args.once) {
        return Err(Failure::Usage(
            "--manifests - (standard input) can only be read once: use it with --dry-run or --once"
                .to_owned(),
        ));
    }

    let loaded = load_build(&args.manifests, &config).map_err(Failure::Error)?;
    let desired = nftproxy_render::render_all(&loaded.build);
    if args.dry_run && !args.diff {
        let text: Vec<String> = desired.iter().map(ToString::to_string).collect();
        emit(&text.join("\n"))?;
        return loaded.outcome();
    }

    let backend = NetlinkBackend::open().map_err(error)?;
    let mut reconciler = Reconciler::new(backend, TABLE_NAME, reconciler_options());
    if args.dry_run {
        let plans = reconciler.plans(&desired);
        let text: String = plans.iter().map(ToString::to_string).collect();
        emit(if text.is_empty() {
            "# the kernel already holds this ruleset: nothing to do\n"
        } else {
            &text
        })?;
        return loaded.outcome();
    }
    if args.once {
        let report = reconciler.sync(&desired).map_err(error)?;
        info!(
            operations = report.operations,
            transactions = report.transactions,
            "programmed this network namespace"
        );
        return loaded.outcome();
    }
    watch_files(reconciler, args.manifests.clone(), config, desired)
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

/// The proxy state built from the manifests, and how many documents were skipped
/// because they are not YAML.
struct Built {
    build: Build,
    broken: usize,
}

impl Built {
    /// After the valid part was printed or programmed: a skipped document makes the
    /// one-shot modes exit non-zero, so that scripts notice.
    fn outcome(&self) -> Result<(), Failure> {
        match self.broken {
            0 => Ok(()),
            n => Err(Failure::Error(format!(
                "{n} manifest document(s) could not be parsed and were left out"
            ))),
        }
    }
}

/// Loads the manifests and builds the proxy state, logging what was left out.
fn load_build(paths: &[PathBuf], config: &ProxyConfig) -> Result<Built, String> {
    let loaded = source::load(paths).map_err(|e| e.to_string())?;
    for broken in &loaded.errors {
        error!("skipping document {broken}");
    }
    let built = build(&loaded.snapshot, config);
    let mut diagnostics = loaded.diagnostics;
    diagnostics.extend(built.diagnostics.iter().cloned());
    diagnostics.sort();
    for diagnostic in &diagnostics {
        match diagnostic.severity {
            Severity::Invalid => warn!("skipping {diagnostic}"),
            Severity::Ignored => debug!("ignoring {diagnostic}"),
        }
    }
    Ok(Built {
        build: built,
        broken: loaded.errors.len(),
    })
}

/// Before Linux 6.2 a chain cannot be deleted in the same transaction as the map
/// elements that pointed at it.
fn reconciler_options() -> ReconcilerOptions {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    ReconcilerOptions {
        defer_chain_deletes: version < (6, 2),
    }
}

/// `--cleanup`: removes nftproxy's tables from this network namespace.
fn cleanup() -> Result<(), Failure> {
    let mut backend = NetlinkBackend::open().map_err(error)?;
    for family in [Family::Ip, Family::Ip6] {
        if backend.list(family, TABLE_NAME).map_err(error)?.is_some() {
            let mut tx = Transaction::new(family, TABLE_NAME);
            tx.ops.push(Op::DeleteTable);
            backend.apply(&tx).map_err(error)?;
            info!(%family, "removed table {family} {TABLE_NAME}");
        }
    }
    Ok(())
}

/// The long-running file mode: re-syncs when the manifests change (checked every
/// `minSyncPeriod`), at least every `syncPeriod`, until SIGTERM or SIGINT. The rules are
/// left in place on exit, as kube-proxy leaves them.
fn watch_files(
    mut reconciler: Reconciler<NetlinkBackend>,
    paths: Vec<PathBuf>,
    config: ProxyConfig,
    initial: Vec<Table>,
) -> Result<(), Failure> {
    let timing = Timing {
        min_sync_period: config.min_sync_period,
        sync_period: config.sync_period,
    };
    let mut fingerprint = source::fingerprint(&paths).ok();
    let mut first = Some(initial);
    let input = move || {
        if let Some(tables) = first.take() {
            return Input::Changed(tables);
        }
        let now = match source::fingerprint(&paths) {
            Ok(now) => now,
            Err(e) => return Input::Unavailable(e.to_string()),
        };
        if fingerprint == Some(now) {
            return Input::Unchanged;
        }
        fingerprint = Some(now);
        info!("manifests changed");
        // A broken document is most likely a file caught half-written: rather than
        // drop its Services, keep the rules as they are until it parses again.
        match load_build(&paths, &config) {
            Ok(loaded) if loaded.broken == 0 => {
                Input::Changed(nftproxy_render::render_all(&loaded.build))
            }
            Ok(loaded) => Input::Unavailable(format!(
                "{} manifest document(s) could not be parsed",
                loaded.broken
            )),
            Err(e) => Input::Unavailable(e),
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(error)?;
    runtime.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(error)?;
        let shutdown = async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            info!("shutting down; the rules stay in place");
        };
        runner::run(&mut reconciler, timing, input, shutdown).await;
        Ok(())
    })
}
