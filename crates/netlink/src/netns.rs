//! Running code in a fresh network namespace: how tests and tools program a kernel
//! ruleset without touching the host's.
//!
//! Invariant: only the thread that runs the closure changes namespace; it is a new
//! thread, so the caller's namespace is never changed.
#![allow(unsafe_code)]

use std::io;

/// Runs `work` on a new thread inside a new, empty network namespace (needs
/// CAP_SYS_ADMIN) and returns its result. Child processes it starts inherit the namespace.
pub fn in_new_netns<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare has no memory-safety preconditions; CLONE_NEWNET affects only
        // the calling thread, which is this fresh one.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(work())
    })
    .join()
    .map_err(|_| io::Error::other("the thread in the new network namespace panicked"))?
}

/// Moves the calling thread into the named network namespace (`ip netns add NAME`
/// creates `/run/netns/NAME`). Sockets it opens afterwards belong to that namespace.
pub fn enter(name: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{name}"))?;
    // SAFETY: `file` is an open namespace file descriptor for the duration of the call;
    // setns affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
