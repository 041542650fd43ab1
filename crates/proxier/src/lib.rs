//! nftproxy's sync machinery: the [`Proxier`] pipeline from the cluster's objects to the
//! kernel, the [`Reconciler`] in it that turns desired tables into minimal kernel
//! transactions, the [`runner`] loop that decides when to sync, and the health and
//! metrics it reports.
//!
//! Invariant: nothing here talks to the kernel or the API directly; the kernel is a
//! [`Backend`](nftproxy_nft::Backend), the input a caller-supplied source.

pub mod conntrack;
pub mod health;
pub mod metrics;
pub mod probe;
mod proxier;
mod reconciler;
pub mod runner;

pub use proxier::{Desired, Proxier};
pub use reconciler::{Reconciler, ReconcilerOptions, SyncError, SyncReport};

/// What the sync loop reports to the HTTP endpoints: health and metrics.
#[derive(Debug)]
pub struct Monitor {
    /// `/healthz` and `/livez`.
    pub health: health::Health,
    /// `/metrics`.
    pub metrics: metrics::Metrics,
}

impl Monitor {
    /// Health with kube-proxy's timeout for `sync_period`, starting now, and fresh
    /// metrics.
    pub fn new(sync_period: std::time::Duration) -> Monitor {
        Monitor {
            health: health::Health::new(sync_period, std::time::SystemTime::now()),
            metrics: metrics::Metrics::new(),
        }
    }
}
