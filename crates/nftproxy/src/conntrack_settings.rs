//! kube-proxy's `conntrack` settings written to the kernel: `nf_conntrack_max` and the
//! hash size that goes with it, which hold for the whole machine, and the TCP and UDP
//! timeouts of this network namespace.
//!
//! Invariant: a value already as wanted is not written; one that cannot be written is
//! logged with the value wanted and never ends the process here (the caller decides
//! what a failure means); nothing else under `/proc/sys` or `/sys` is touched.

use std::path::{Path, PathBuf};

use nftproxy_model::config::ConntrackSettings;
use tracing::{info, warn};

/// Where the values live (a test points them at files of its own).
#[derive(Debug, Clone)]
pub struct Paths {
    /// `/proc/sys/net/netfilter`: this network namespace's view.
    pub netfilter: PathBuf,
    /// The conntrack module's hash size parameter.
    pub hashsize: PathBuf,
}

impl Default for Paths {
    fn default() -> Paths {
        Paths {
            netfilter: PathBuf::from("/proc/sys/net/netfilter"),
            hashsize: PathBuf::from("/sys/module/nf_conntrack/parameters/hashsize"),
        }
    }
}

/// What became of one wanted value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It was already so.
    Unchanged,
    /// Written; what it was before.
    Set(u64),
    /// Not written, and why.
    Failed(String),
}

/// One wanted value and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The sysctl (`nf_conntrack_tcp_timeout_established`) or parameter (`hashsize`).
    pub name: &'static str,
    /// The value wanted.
    pub wanted: u64,
    /// Whether it holds for the whole machine (only the host's network namespace and a
    /// writable `/sys` can set it) rather than for this network namespace.
    pub global: bool,
    /// What happened.
    pub outcome: Outcome,
}

/// The CPUs this process may run on, as kube-proxy counts them (Go's `runtime.NumCPU`:
/// the affinity mask, not a cgroup's CPU quota).
pub fn cpus() -> usize {
    rustix::thread::sched_getaffinity(None)
        .map(|set| set.count() as usize)
        .ok()
        .filter(|n| *n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
}

/// Writes what `settings` want on a machine of `cpus` CPUs, in kube-proxy's order, and
/// logs each change and each failure.
pub fn apply(settings: &ConntrackSettings, cpus: usize, paths: &Paths) -> Vec<Applied> {
    let mut applied = Vec::new();
    if let Some(max) = settings.max(cpus) {
        applied.push(Applied {
            name: "nf_conntrack_max",
            wanted: max,
            global: true,
            outcome: write_if_different(&paths.netfilter.join("nf_conntrack_max"), max),
        });
        // The hash table only ever grows to a quarter of the maximum, as kube-proxy
        // grows it (a smaller one is left alone).
        let quarter = max / 4;
        let outcome = match read(&paths.hashsize) {
            Ok(size) if size >= quarter => Outcome::Unchanged,
            Ok(size) => match write(&paths.hashsize, quarter) {
                Ok(()) => Outcome::Set(size),
                Err(error) => Outcome::Failed(error),
            },
            Err(error) => Outcome::Failed(error),
        };
        applied.push(Applied {
            name: "hashsize",
            wanted: quarter,
            global: true,
            outcome,
        });
    }
    for (name, wanted) in settings.namespace_sysctls() {
        applied.push(Applied {
            name,
            wanted,
            global: false,
            outcome: write_if_different(&paths.netfilter.join(name), wanted),
        });
    }
    for value in &applied {
        let (name, wanted) = (value.name, value.wanted);
        match &value.outcome {
            Outcome::Unchanged => {}
            Outcome::Set(was) => info!(name, value = wanted, was, "conntrack setting set"),
            Outcome::Failed(error) if value.global => warn!(
                name,
                wanted,
                %error,
                "cannot set a conntrack setting of the whole machine (it needs the host's \
                 network namespace and a writable /sys); leaving it as it is"
            ),
            Outcome::Failed(error) => warn!(
                name,
                wanted,
                %error,
                "cannot set a conntrack setting of this network namespace (/proc/sys is \
                 read-only in an unprivileged container: see hack/deploy's init container); \
                 leaving it as it is"
            ),
        }
    }
    applied
}

fn write_if_different(path: &Path, wanted: u64) -> Outcome {
    match read(path) {
        Ok(current) if current == wanted => Outcome::Unchanged,
        Ok(current) => match write(path, wanted) {
            Ok(()) => Outcome::Set(current),
            Err(error) => Outcome::Failed(error),
        },
        Err(error) => Outcome::Failed(error),
    }
}

fn read(path: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{}: {:?} is not a number", path.display(), text.trim()))
}

fn write(path: &Path, value: u64) -> Result<(), String> {
    std::fs::write(path, value.to_string()).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A fake /proc/sys/net/netfilter and hashsize with the kernel's defaults.
    fn fake_kernel(name: &str) -> Paths {
        let root =
            std::env::temp_dir().join(format!("nftproxy-conntrack-{}-{name}", std::process::id()));
        let netfilter = root.join("netfilter");
        std::fs::create_dir_all(&netfilter).unwrap();
        for (file, value) in [
            ("nf_conntrack_max", "65536"),
            ("nf_conntrack_tcp_timeout_established", "432000"),
            ("nf_conntrack_tcp_timeout_close_wait", "60"),
            ("nf_conntrack_tcp_be_liberal", "0"),
            ("nf_conntrack_udp_timeout", "30"),
            ("nf_conntrack_udp_timeout_stream", "120"),
        ] {
            std::fs::write(netfilter.join(file), format!("{value}\n")).unwrap();
        }
        std::fs::write(root.join("hashsize"), "16384\n").unwrap();
        Paths {
            netfilter,
            hashsize: root.join("hashsize"),
        }
    }

    fn value(paths: &Paths, name: &str) -> String {
        std::fs::read_to_string(paths.netfilter.join(name)).unwrap()
    }

    #[test]
    fn the_defaults_set_the_maximum_the_hash_and_the_tcp_timeouts_and_nothing_twice() {
        let paths = fake_kernel("defaults");
        let settings = ConntrackSettings::default();
        let applied = apply(&settings, 8, &paths);
        let outcomes: Vec<(&str, u64, Outcome)> = applied
            .iter()
            .map(|a| (a.name, a.wanted, a.outcome.clone()))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("nf_conntrack_max", 262_144, Outcome::Set(65_536)),
                ("hashsize", 65_536, Outcome::Set(16_384)),
                (
                    "nf_conntrack_tcp_timeout_established",
                    86_400,
                    Outcome::Set(432_000)
                ),
                (
                    "nf_conntrack_tcp_timeout_close_wait",
                    3_600,
                    Outcome::Set(60)
                ),
            ]
        );
        assert_eq!(
            value(&paths, "nf_conntrack_udp_timeout"),
            "30\n",
            "left alone"
        );
        // A second start finds everything in place.
        assert!(
            apply(&settings, 8, &paths)
                .iter()
                .all(|a| a.outcome == Outcome::Unchanged)
        );
        // A larger hash table is not shrunk.
        std::fs::write(&paths.hashsize, "1000000").unwrap();
        assert_eq!(apply(&settings, 8, &paths)[1].outcome, Outcome::Unchanged);
        let _ = std::fs::remove_dir_all(paths.netfilter.parent().unwrap());
    }

    #[test]
    fn what_cannot_be_written_is_reported_with_the_value_wanted_and_the_rest_goes_on() {
        let paths = fake_kernel("failing");
        // Outside the host's network namespace the maximum is not there to write, and
        // the hash size is refused.
        std::fs::remove_file(paths.netfilter.join("nf_conntrack_max")).unwrap();
        std::fs::remove_file(&paths.hashsize).unwrap();
        let settings = ConntrackSettings {
            udp_timeout: Duration::from_secs(45),
            ..ConntrackSettings::default()
        };
        let applied = apply(&settings, 2, &paths);
        assert!(
            matches!(&applied[0].outcome, Outcome::Failed(e) if e.contains("nf_conntrack_max"))
        );
        assert_eq!(applied[0].wanted, 131_072);
        assert!(applied[0].global && applied[1].global);
        assert!(matches!(applied[1].outcome, Outcome::Failed(_)));
        assert_eq!(
            value(&paths, "nf_conntrack_tcp_timeout_established"),
            "86400"
        );
        assert_eq!(value(&paths, "nf_conntrack_udp_timeout"), "45");
        let _ = std::fs::remove_dir_all(paths.netfilter.parent().unwrap());
    }
}
