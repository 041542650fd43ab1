//! The connections of every HTTP server of the process (`/healthz`, `/metrics`, each
//! health-check node port), admitted within a cap per server and one for all of them,
//! so that clients anyone on the network can be never take the file descriptors and
//! memory the sync loop, netlink and the API client need.
//!
//! Invariant: at most [`Caps::per_server`] connections of one server and [`Caps::total`]
//! of all are admitted at once. A connection over a cap is admitted by closing the least
//! recently active one (of its server, or of all): idle and slow clients give way to a
//! client that just connected, which sends its request at once, and admitting never
//! waits, so an accept loop never stalls or spins on a full cap.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use nftproxy_proxier::metrics::Metrics;
use tokio::sync::oneshot;

/// The caps of a [`Connections`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Connections of all servers together.
    pub total: usize,
    /// Connections of one server.
    pub per_server: usize,
}

/// The most connections of all servers: each holds a buffer of up to 16 KiB and a task,
/// so this bounds their memory to a few tens of MiB whatever the open-files limit.
const MOST_TOTAL: usize = 1024;
/// The most connections of one server: a probe or a scrape needs one, a load balancer's
/// health checkers a few each; every one still sending its request head holds 16 KiB of
/// buffers.
const MOST_PER_SERVER: usize = 64;

impl Caps {
    /// The caps under an open-files limit of `open_files`: the HTTP servers' connections
    /// take at most half of it, so that the other half stays for what the sync needs
    /// (netlink sockets, the API server's connections, listeners, manifest files).
    pub fn for_open_files(open_files: u64) -> Caps {
        let half = usize::try_from(open_files / 2).unwrap_or(usize::MAX);
        let total = half.clamp(8, MOST_TOTAL);
        Caps {
            total,
            per_server: MOST_PER_SERVER.min(total),
        }
    }
}

/// One server's identity among the admitted connections, and its metrics label.
#[derive(Debug, Clone)]
pub struct Server {
    id: u64,
    label: &'static str,
}

impl Server {
    /// The server's label in the metrics (`healthz`, `metrics`, `health-check`).
    pub fn label(&self) -> &'static str {
        self.label
    }
}

/// The admitted connections of every server.
pub struct Connections {
    caps: Caps,
    metrics: Metrics,
    open: Mutex<Open>,
}

/// Every admitted connection, ordered by when it was last active.
#[derive(Default)]
struct Open {
    next_server: u64,
    /// Increases with every admission and request: the order of activity.
    next_stamp: u64,
    /// Stamp of last activity → (server, closer).
    by_activity: BTreeMap<u64, Admitted>,
    /// Server → the stamps of its connections.
    per_server: HashMap<u64, BTreeMap<u64, ()>>,
}

struct Admitted {
    server: u64,
    /// Never sent on: dropping it (with this entry) tells the connection's task to
    /// close the connection.
    _close: oneshot::Sender<()>,
}

impl Open {
    fn stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    fn insert(&mut self, stamp: u64, admitted: Admitted) {
        self.per_server
            .entry(admitted.server)
            .or_default()
            .insert(stamp, ());
        self.by_activity.insert(stamp, admitted);
    }

    fn remove(&mut self, stamp: u64) -> Option<Admitted> {
        let admitted = self.by_activity.remove(&stamp)?;
        if let Some(stamps) = self.per_server.get_mut(&admitted.server) {
            stamps.remove(&stamp);
            if stamps.is_empty() {
                self.per_server.remove(&admitted.server);
            }
        }
        Some(admitted)
    }

    fn count(&self, server: u64) -> usize {
        self.per_server.get(&server).map_or(0, BTreeMap::len)
    }

    /// The stamp of `server`'s least recently active connection.
    fn oldest_of(&self, server: u64) -> Option<u64> {
        self.per_server
            .get(&server)
            .and_then(|stamps| stamps.keys().next().copied())
    }
}

impl Connections {
    /// No connections yet.
    pub fn new(caps: Caps, metrics: Metrics) -> Arc<Connections> {
        Arc::new(Connections {
            caps,
            metrics,
            open: Mutex::new(Open::default()),
        })
    }

    /// The metrics the servers report to.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn open(&self) -> MutexGuard<'_, Open> {
        // Nothing panics while holding the lock (map operations only): a poisoned
        // lock still holds consistent maps.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new server's identity.
    pub fn server(&self, label: &'static str) -> Server {
        let mut open = self.open();
        open.next_server += 1;
        Server {
            id: open.next_server,
            label,
        }
    }

    /// Admits a connection of `server`, closing the least recently active one of the
    /// server, or of all, when a cap is reached. The slot is held as long as the
    /// connection; `closed` resolves when it is to be closed to make room.
    pub fn admit(self: &Arc<Self>, server: &Server) -> (Arc<Slot>, oneshot::Receiver<()>) {
        let (close, closed) = oneshot::channel();
        let mut displaced = Vec::new();
        let stamp = {
            let mut open = self.open();
            while open.count(server.id) >= self.caps.per_server {
                let Some(oldest) = open.oldest_of(server.id) else {
                    break;
                };
                displaced.extend(open.remove(oldest));
            }
            while open.by_activity.len() >= self.caps.total {
                let Some(oldest) = open.by_activity.keys().next().copied() else {
                    break;
                };
                displaced.extend(open.remove(oldest));
            }
            let stamp = open.stamp();
            open.insert(
                stamp,
                Admitted {
                    server: server.id,
                    _close: close,
                },
            );
            stamp
        };
        // Dropped outside the lock: each wakes a connection task that closes its socket
        // and counts itself as shed.
        drop(displaced);
        self.metrics.http_connections(server.label, 1);
        let slot = Slot {
            connections: self.clone(),
            label: server.label,
            stamp: Mutex::new(stamp),
        };
        (Arc::new(slot), closed)
    }

    /// How many connections are admitted now.
    #[cfg(test)]
    fn admitted(&self) -> usize {
        self.open().by_activity.len()
    }
}

/// An admitted connection: gives its place back when dropped.
pub struct Slot {
    connections: Arc<Connections>,
    label: &'static str,
    /// Its stamp in [`Open`]; changes with each request.
    stamp: Mutex<u64>,
}

impl Slot {
    /// A request arrived: the connection becomes the most recently active.
    pub fn active(&self) {
        let mut stamp = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        let mut open = self.connections.open();
        // Already displaced: it is being closed, and keeps no place.
        if let Some(admitted) = open.remove(*stamp) {
            *stamp = open.stamp();
            open.insert(*stamp, admitted);
        }
    }

    /// The server closed the connection on its own, for `reason`: counted.
    pub fn shed(&self, reason: &str) {
        self.connections
            .metrics
            .http_connection_shed(self.label, reason);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let stamp = *self.stamp.get_mut().unwrap_or_else(|e| e.into_inner());
        self.connections.open().remove(stamp);
        self.connections.metrics.http_connections(self.label, -1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connections(total: usize, per_server: usize) -> Arc<Connections> {
        Connections::new(Caps { total, per_server }, Metrics::new())
    }

    #[test]
    fn caps_follow_the_open_files_limit_within_bounds() {
        assert_eq!(
            Caps::for_open_files(1024),
            Caps {
                total: 512,
                per_server: 64
            }
        );
        assert_eq!(Caps::for_open_files(1 << 20).total, MOST_TOTAL);
        assert_eq!(
            Caps::for_open_files(10),
            Caps {
                total: 8,
                per_server: 8
            }
        );
    }

    #[test]
    fn over_the_servers_cap_its_least_recently_active_connection_closes() {
        let connections = connections(100, 2);
        let (a, b) = (connections.server("a"), connections.server("b"));
        let (first, mut first_closed) = connections.admit(&a);
        let (second, mut second_closed) = connections.admit(&a);
        let (_other, mut other_closed) = connections.admit(&b);
        // The first asks for something: the second is now the least recently active.
        first.active();
        let (_third, _) = connections.admit(&a);
        assert_eq!(
            second_closed.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(
            first_closed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        assert_eq!(
            other_closed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        // A displaced connection keeps no place, also when it is still active.
        second.active();
        assert_eq!(connections.admitted(), 3);
        drop(second);
        assert_eq!(connections.admitted(), 3);
        drop(first);
        assert_eq!(connections.admitted(), 2);
    }

    #[test]
    fn over_the_total_cap_the_least_recently_active_of_any_server_closes() {
        let connections = connections(3, 3);
        let (a, b) = (connections.server("a"), connections.server("b"));
        let mut held: Vec<_> = (0..3).map(|_| connections.admit(&a)).collect();
        let (_new, mut new_closed) = connections.admit(&b);
        let closed: Vec<bool> = held
            .iter_mut()
            .map(|(_, closed)| closed.try_recv() == Err(oneshot::error::TryRecvError::Closed))
            .collect();
        assert_eq!(closed, [true, false, false]);
        assert_eq!(
            new_closed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        assert_eq!(connections.admitted(), 3);
    }
}
