//! The nftproxy binary: parses the command line, reads its inputs and runs the
//! requested mode.
//!
//! Invariant: no rule logic lives here; this file wires sources, `model`, `render` and
//! output together, and maps failures to exit codes (2 for bad flags, 1 for errors).

mod cli;
mod source;

use std::process::ExitCode;

use clap::Parser;
use nftproxy_model::{KubeProxyConfiguration, Severity, build};
use tracing::{debug, warn};

use crate::cli::Args;

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
    if config.node_name.is_empty() {
        return Err(Failure::Usage("no node name: pass --node-name".to_owned()));
    }

    if !args.dry_run {
        return Err(Failure::Error(
            "only --dry-run is available in this build; --once, --cleanup and the long-running modes \
             come with the kernel backend"
                .to_owned(),
        ));
    }
    if args.manifests.is_empty() {
        return Err(Failure::Usage(
            "--dry-run needs --manifests PATH...".to_owned(),
        ));
    }
    if args.diff {
        return Err(Failure::Error(
            "--diff needs the kernel backend, which this build lacks".to_owned(),
        ));
    }

    let (snapshot, mut diagnostics) =
        source::load(&args.manifests).map_err(|e| Failure::Error(e.to_string()))?;
    let built = build(&snapshot, &config);
    diagnostics.extend(built.diagnostics.iter().cloned());
    diagnostics.sort();
    for diagnostic in &diagnostics {
        match diagnostic.severity {
            Severity::Invalid => warn!("skipping {diagnostic}"),
            Severity::Ignored => debug!("ignoring {diagnostic}"),
        }
    }
    let tables = nftproxy_render::render_all(&built);
    let text: Vec<String> = tables.iter().map(ToString::to_string).collect();
    print!("{}", text.join("\n"));
    Ok(())
}
