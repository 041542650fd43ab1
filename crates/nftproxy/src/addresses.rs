//! The node's interface addresses, where NodePorts are accepted when `nodePortAddresses`
//! names CIDRs: given on the command line, read once from this network namespace (the
//! one-shot modes), or read and then followed from rtnetlink notifications (the daemon).
//!
//! Invariant: the addresses handed to a build are the namespace's as last read, and a
//! change is never missed: the listener raises `pending` after it has taken in an
//! announcement, and the addresses are read after `pending` is lowered.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nftproxy_model::Build;
use nftproxy_netlink::{AddressWatch, InterfaceAddress, InterfaceAddresses, interface_addresses};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// Where the interface addresses come from, and the last ones read.
pub struct LocalAddresses {
    /// Set when the namespace's addresses are followed.
    follow: Option<Follow>,
    /// The last addresses read (or given); `None` when they could not be read.
    known: Option<Vec<InterfaceAddress>>,
}

/// The listener thread's signal: an announcement arrived and the addresses are to be
/// read again, over the socket opened at start (a change never needs a new descriptor).
struct Follow {
    pending: Arc<AtomicBool>,
    notify: Arc<Notify>,
    reader: InterfaceAddresses,
}

impl LocalAddresses {
    /// `given` addresses when there are any, else the namespace's, read once.
    pub fn once(given: &[IpAddr]) -> LocalAddresses {
        if !given.is_empty() {
            return LocalAddresses::given(given);
        }
        LocalAddresses {
            follow: None,
            known: read(interface_addresses()),
        }
    }

    /// `given` addresses when there are any, else the namespace's, followed from the
    /// kernel's announcements by a thread of their own.
    pub fn followed(given: &[IpAddr]) -> LocalAddresses {
        if !given.is_empty() {
            return LocalAddresses::given(given);
        }
        let mut follow = listen()
            .map_err(|e| warn!(error = %e, "cannot listen for address changes; read at start only"))
            .ok();
        let known = match &mut follow {
            Some(follow) => read(follow.reader.read()),
            None => read(interface_addresses()),
        };
        LocalAddresses { follow, known }
    }

    fn given(addresses: &[IpAddr]) -> LocalAddresses {
        let known = addresses
            .iter()
            .map(|address| InterfaceAddress {
                address: *address,
                interface: "--local-address".to_owned(),
            })
            .collect();
        LocalAddresses {
            follow: None,
            known: Some(known),
        }
    }

    /// The addresses for a snapshot.
    pub fn addresses(&self) -> Option<Vec<IpAddr>> {
        self.known
            .as_ref()
            .map(|known| known.iter().map(|a| a.address).collect())
    }

    /// Resolves when the kernel announced an address change (never when not followed).
    /// Cancel-safe.
    pub async fn changed(&self) {
        let Some(follow) = &self.follow else {
            return std::future::pending().await;
        };
        let notified = follow.notify.notified();
        if !follow.pending.load(Ordering::SeqCst) {
            notified.await;
        }
    }

    /// When an announcement arrived, reads the addresses again and logs what came and
    /// went. Whether they changed.
    pub fn refresh(&mut self) -> bool {
        let Some(follow) = &mut self.follow else {
            return false;
        };
        if !follow.pending.swap(false, Ordering::SeqCst) {
            return false;
        }
        let now = read(follow.reader.read());
        let before = self.known.as_deref().unwrap_or_default();
        let after = now.as_deref().unwrap_or_default();
        for gone in before.iter().filter(|a| !after.contains(a)) {
            info!(address = %gone.address, interface = %gone.interface, "interface address removed");
        }
        for new in after.iter().filter(|a| !before.contains(a)) {
            info!(address = %new.address, interface = %new.interface, "interface address added");
        }
        let changed = self.known != now;
        self.known = now;
        changed
    }

    /// At debug level: every candidate NodePort address of `build`, and why it was
    /// taken or left out.
    pub fn log_choices(&self, build: &Build) {
        let interface = |address: &IpAddr| {
            self.known
                .iter()
                .flatten()
                .find(|a| a.address == *address)
                .map_or("node IP", |a| a.interface.as_str())
                .to_owned()
        };
        for state in [&build.ipv4, &build.ipv6] {
            for choice in &state.node_port_choices {
                let verdict = if choice.taken { "taken" } else { "left out" };
                debug!(
                    address = %choice.address,
                    interface = %interface(&choice.address),
                    reason = %choice.reason,
                    "NodePort address candidate {verdict}"
                );
            }
        }
    }
}

/// Starts the thread that waits for the kernel's announcements (on a socket of its own,
/// opened there: a netlink socket stays with the thread that opened it).
fn listen() -> Result<Follow, String> {
    let pending = Arc::new(AtomicBool::new(false));
    let notify = Arc::new(Notify::new());
    let (raised, told) = (pending.clone(), notify.clone());
    let (opened, outcome) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("address-watch".to_owned())
        .spawn(move || {
            let mut watch = match AddressWatch::open() {
                Ok(watch) => {
                    let _ = opened.send(Ok(()));
                    watch
                }
                Err(e) => {
                    let _ = opened.send(Err(e.to_string()));
                    return;
                }
            };
            let mut failing = false;
            loop {
                match watch.wait() {
                    Ok(()) => {
                        failing = false;
                        raised.store(true, Ordering::SeqCst);
                        told.notify_one();
                    }
                    Err(e) => {
                        if !std::mem::replace(&mut failing, true) {
                            warn!(error = %e, "waiting for address changes failed; retrying");
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        })
        .map_err(|e| e.to_string())?;
    outcome
        .recv()
        .map_err(|_| "the address listener ended".to_owned())??;
    let reader = InterfaceAddresses::open().map_err(|e| e.to_string())?;
    Ok(Follow {
        pending,
        notify,
        reader,
    })
}

/// The namespace's addresses, as `read` gave them; `None` (with a warning) when they
/// could not be read.
fn read(
    read: Result<Vec<InterfaceAddress>, nftproxy_netlink::Error>,
) -> Option<Vec<InterfaceAddress>> {
    read.map_err(
        |e| warn!(error = %e, "cannot read the interface addresses; the node IPs stand in"),
    )
    .ok()
}
