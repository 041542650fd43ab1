//! The process's open-files limit, raised from its soft value to its hard one when the
//! daemon starts: container runtimes give a soft limit of 1,024 (containerd 2.x) and a far
//! higher hard one, which Go programs such as kube-proxy raise to on their own and a Rust
//! program does not.
//!
//! Invariant: a limit is only ever raised, never lowered; when it cannot be raised the
//! limit in force is what the caller gets, and what the HTTP servers' caps follow.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// What the kernel takes as the highest open-files limit when the hard limit is
/// unlimited (`fs.nr_open`'s default).
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// The open-files limit before and after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit found.
    pub soft: u64,
    /// The hard limit (`None`: unlimited).
    pub hard: Option<u64>,
    /// The soft limit in force now.
    pub now: u64,
}

/// Raises the soft open-files limit to the hard one (to `fs.nr_open` when the hard
/// limit is unlimited); why it could not be raised, with the limit in force.
pub fn raise() -> (OpenFiles, Option<std::io::Error>) {
    let found = getrlimit(Resource::Nofile);
    let hard = found.maximum;
    let soft = found.current.unwrap_or(u64::MAX);
    let target = hard.unwrap_or_else(nr_open);
    let mut files = OpenFiles {
        soft,
        hard,
        now: soft,
    };
    if soft >= target {
        return (files, None);
    }
    let raised = Rlimit {
        current: Some(target),
        maximum: hard,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            files.now = target;
            (files, None)
        }
        Err(error) => (files, Some(error.into())),
    }
}

/// The kernel's ceiling for an open-files limit.
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(NR_OPEN_DEFAULT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one_and_never_lowered() {
        let (files, error) = raise();
        assert!(error.is_none(), "{error:?}");
        assert!(files.now >= files.soft);
        let in_force = getrlimit(Resource::Nofile);
        assert_eq!(in_force.current, Some(files.now));
        assert_eq!(in_force.maximum, files.hard);
        // Raised already: nothing changes.
        let (again, _) = raise();
        assert_eq!(again.soft, again.now);
        assert_eq!(again.now, files.now);
    }
}
