//! The manifest path as users run it: `nftproxy --dry-run` and `nftproxy --once` of a
//! synthetic cluster written to a file as `kubectl get -o json` prints a List, each timed
//! from start to exit, with the process's peak RSS.
//!
//! Invariant: `--once` programs this worker's network namespace, which the worker's
//! parent made for it; the file is deleted before the worker returns.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::daemon::nftproxy_binary;
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

/// `--dry-run` and `--once` of one cluster from its manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestReport {
    /// Services.
    pub services: u32,
    /// Endpoints per Service.
    pub endpoints: u32,
    /// The manifest's size.
    pub bytes: u64,
    /// `--dry-run`, its output discarded.
    pub dry_run: Run,
    /// `--once` into an empty network namespace.
    pub once: Run,
}

/// Writes the cluster as one JSON `List`.
fn write_manifest(path: &Path, services: u32, endpoints: u32) -> Result<u64, String> {
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = BufWriter::new(file);
    let io = |e: std::io::Error| e.to_string();
    write!(out, "{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[").map_err(io)?;
    for (n, spec) in synth::specs(services, endpoints).iter().enumerate() {
        if n > 0 {
            write!(out, ",").map_err(io)?;
        }
        let mut service = serde_json::to_value(synth::service(spec)).map_err(|e| e.to_string())?;
        service["apiVersion"] = "v1".into();
        service["kind"] = "Service".into();
        let mut slice =
            serde_json::to_value(synth::endpoint_slice(spec)).map_err(|e| e.to_string())?;
        slice["apiVersion"] = "discovery.k8s.io/v1".into();
        slice["kind"] = "EndpointSlice".into();
        serde_json::to_writer(&mut out, &service).map_err(|e| e.to_string())?;
        write!(out, ",").map_err(io)?;
        serde_json::to_writer(&mut out, &slice).map_err(|e| e.to_string())?;
    }
    writeln!(out, "]}}").map_err(io)?;
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

/// `--dry-run` then `--once` of `services` × `endpoints` from a manifest file.
pub fn run(services: u32, endpoints: u32) -> Result<ManifestReport, String> {
    let binary = nftproxy_binary()?;
    let manifest = std::env::temp_dir().join(format!(
        "nftproxy-bench-{}-{services}x{endpoints}.json",
        std::process::id()
    ));
    let measured = (|| {
        let bytes = write_manifest(&manifest, services, endpoints)?;
        let dry_run = measure(&binary, "--dry-run", &manifest)?;
        crate::worker::ip(&["link", "set", "lo", "up"])?;
        let once = measure(&binary, "--once", &manifest)?;
        Ok(ManifestReport {
            services,
            endpoints,
            bytes,
            dry_run,
            once,
        })
    })();
    let _ = std::fs::remove_file(&manifest);
    measured
}
