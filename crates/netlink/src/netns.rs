//! Running code in another network namespace, a fresh one or one made with `ip netns
//! add`: how tests and tools program a kernel ruleset without touching the host's.
//!
//! Invariant: only a thread started here ever changes namespace, before it runs the
//! closure; the caller's thread (a runtime's worker, say) never moves.
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

/// Runs `work` on a new thread inside the named network namespace (`ip netns add NAME`
/// creates `/run/netns/NAME`) and returns its result. Sockets it opens belong to that
/// namespace, also when other threads use them later.
pub fn in_named_netns<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    spawn_in_named_netns(name, work)?
        .join()
        .map_err(|_| io::Error::other("the thread in the named network namespace panicked"))
}

/// Starts `work` on a new thread inside the named network namespace, once the thread
/// is in it; the thread's handle.
pub fn spawn_in_named_netns<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<std::thread::JoinHandle<T>> {
    let path = format!("/run/netns/{name}");
    let (entered, outcome) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let result = enter(&path);
        let ok = result.is_ok();
        let _ = entered.send(result);
        // The spawner returned an error for this thread, which must not run `work`:
        // it would run in the caller's namespace.
        if !ok {
            std::panic::resume_unwind(Box::new("not in the namespace"));
        }
        work()
    });
    match outcome.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(io::Error::other(
            "the thread for the named network namespace ended",
        )),
    }
}

/// Moves the calling thread into the network namespace at `path`: only ever called on
/// a thread of this module's own.
fn enter(path: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    // SAFETY: `file` is an open namespace file descriptor for the duration of the call;
    // setns affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The addresses configured on the interfaces of the calling thread's network namespace:
/// what `fib … type local` matches.
pub fn local_addresses() -> io::Result<Vec<std::net::IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a valid out-pointer; on success it owns a list freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addresses = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*cursor };
        if !entry.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` points at a sockaddr of the family it declares.
            let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in>() };
                addresses.push(std::net::IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in6>() };
                addresses.push(std::net::IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}
