//! nftproxy's sync machinery: the [`Reconciler`] that turns desired tables into minimal
//! kernel transactions, and the [`runner`] loop that decides when to sync.
//!
//! Invariant: nothing here talks to the kernel or the API directly; the kernel is a
//! [`Backend`](nftproxy_nft::Backend), the input a caller-supplied source.

mod reconciler;
pub mod runner;

pub use reconciler::{Reconciler, ReconcilerOptions, SyncError, SyncReport};
