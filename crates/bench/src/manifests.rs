//! The manifest path as users run it: `nftproxy --dry-run` and `nftproxy --once` of a
//! synthetic cluster written to a file as `kubectl get -o json` (and `-o yaml`) prints a
//! List, each timed from start to exit, with the process's peak RSS; beside them the
//! daemon's first sync of the same objects from an API server, in the same run.
//!
//! Invariant: everything programs this worker's network namespace, which the worker's
//! parent made for it, and each `--once` starts from no tables; the files are deleted
//! before the worker returns.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::daemon::{Start, nftproxy_binary};
use crate::synth::{self, CLUSTER_CIDR, NODE_IP, NODE_NAME};
use crate::worker::status_field;

/// One run of the binary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// Start to exit.
    pub seconds: f64,
    /// Peak RSS (VmHWM, sampled every 2 ms until the process exits).
    pub rss_kb: u64,
}

/// `--dry-run` and `--once` of one manifest file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRuns {
    /// `json` or `yaml`.
    pub format: String,
    /// The file's size.
    pub bytes: u64,
    /// `--dry-run`, its output discarded.
    pub dry_run: Run,
    /// `--once` into a network namespace without nftproxy's tables.
    pub once: Run,
}

/// The manifest path of one cluster, and the daemon's path beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestReport {
    /// Services.
    pub services: u32,
    /// Endpoints per Service.
    pub endpoints: u32,
    /// The daemon's start to the end of its first sync, the same objects listed from an
    /// API server.
    pub daemon: Start,
    /// One per file format.
    pub files: Vec<FileRuns>,
}

/// The cluster's objects as `kubectl get -o json` prints them in a List.
fn list(services: u32, endpoints: u32) -> Result<Value, String> {
    let mut items = Vec::new();
    for spec in synth::specs(services, endpoints) {
        let mut service = serde_json::to_value(synth::service(&spec)).map_err(|e| e.to_string())?;
        service["apiVersion"] = "v1".into();
        service["kind"] = "Service".into();
        let mut slice =
            serde_json::to_value(synth::endpoint_slice(&spec)).map_err(|e| e.to_string())?;
        slice["apiVersion"] = "discovery.k8s.io/v1".into();
        slice["kind"] = "EndpointSlice".into();
        items.extend([service, slice]);
    }
    Ok(serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}))
}

/// Writes `value` in YAML's block style, as `kubectl get -o yaml` does: a map's entries
/// one per line, a sequence's items after `- `, scalars and empty collections in their
/// JSON spelling (which YAML reads the same).
fn write_yaml(
    out: &mut impl Write,
    value: &Value,
    indent: usize,
    inline: bool,
) -> std::io::Result<()> {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (n, (key, value)) in map.iter().enumerate() {
                if n > 0 || !inline {
                    write!(out, "{:indent$}", "")?;
                }
                write!(out, "{key}:")?;
                match value {
                    Value::Object(m) if !m.is_empty() => {
                        writeln!(out)?;
                        write_yaml(out, value, indent + 2, false)?;
                    }
                    Value::Array(a) if !a.is_empty() => {
                        writeln!(out)?;
                        write_yaml(out, value, indent, false)?;
                    }
                    _ => writeln!(out, " {value}")?,
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                write!(out, "{:indent$}- ", "")?;
                match item {
                    Value::Object(m) if !m.is_empty() => write_yaml(out, item, indent + 2, true)?,
                    _ => writeln!(out, "{item}")?,
                }
            }
        }
        _ => writeln!(out, "{value}")?,
    }
    Ok(())
}

/// Writes `list` to `path` in `format`; returns the file's size.
fn write_manifest(path: &Path, list: &Value, format: &str) -> Result<u64, String> {
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut out = BufWriter::new(std::fs::File::create(path).map_err(io)?);
    if format == "yaml" {
        write_yaml(&mut out, list, 0, false).map_err(io)?;
    } else {
        serde_json::to_writer(&mut out, list).map_err(|e| e.to_string())?;
    }
    out.flush().map_err(io)?;
    Ok(std::fs::metadata(path).map_err(io)?.len())
}

/// Runs `nftproxy MODE` on the manifest until it exits.
fn measure(binary: &Path, mode: &str, manifest: &Path) -> Result<Run, String> {
    let started = Instant::now();
    let mut child = Command::new(binary)
        .arg(mode)
        .args(["--node-name", NODE_NAME, "--node-ip", &NODE_IP.to_string()])
        .args(["--cluster-cidr", CLUSTER_CIDR, "--manifests"])
        .arg(manifest)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("nftproxy {mode}: {e}"))?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut rss_kb = 0;
    let status = loop {
        // VmHWM only grows: the last reading before the exit is the peak so far.
        if let Ok(status) = std::fs::read_to_string(&status_path) {
            rss_kb = rss_kb.max(status_field(&status, "VmHWM"));
        }
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(status) => break status,
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("nftproxy {mode} of the manifest: {status}"));
    }
    Ok(Run { seconds, rss_kb })
}

/// Runs `nftproxy --cleanup`: the next `--once` is a cold load.
fn clean(binary: &Path) -> Result<(), String> {
    let status = Command::new(binary)
        .arg("--cleanup")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("nftproxy --cleanup: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("nftproxy --cleanup: {status}"))
    }
}

/// The daemon's first sync, then `--dry-run` and `--once` of the same `services` ×
/// `endpoints` from a JSON and a YAML manifest.
pub fn run(services: u32, endpoints: u32) -> Result<ManifestReport, String> {
    let binary = nftproxy_binary()?;
    let daemon = crate::daemon::cold_start(services, endpoints)?;
    let list = list(services, endpoints)?;
    let mut files = Vec::new();
    for format in ["json", "yaml"] {
        let manifest = std::env::temp_dir().join(format!(
            "nftproxy-bench-{}-{services}x{endpoints}.{format}",
            std::process::id()
        ));
        let measured = (|| {
            let bytes = write_manifest(&manifest, &list, format)?;
            let dry_run = measure(&binary, "--dry-run", &manifest)?;
            clean(&binary)?;
            let once = measure(&binary, "--once", &manifest)?;
            Ok::<_, String>(FileRuns {
                format: format.to_owned(),
                bytes,
                dry_run,
                once,
            })
        })();
        let _ = std::fs::remove_file(&manifest);
        files.push(measured?);
    }
    Ok(ManifestReport {
        services,
        endpoints,
        daemon,
        files,
    })
}
