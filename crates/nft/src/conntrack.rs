//! Conntrack vocabulary: a tracked flow's original and reply tuples, and the [`Conntrack`]
//! trait the kernel backend implements (list one protocol's flows, delete flows), with
//! [`FakeConntrack`] for tests above the netlink layer.
//!
//! Invariant: a [`Flow`] names a kernel entry exactly (both tuples and the zone), so that
//! deleting it can never remove another flow.

use std::net::IpAddr;

use crate::types::{Family, L4Proto};

/// One direction of a flow: addresses and ports as seen on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tuple {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

/// A conntrack entry. After DNAT, the reply tuple's source is the backend that answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Flow {
    /// The transport protocol.
    pub protocol: L4Proto,
    /// As the first packet arrived.
    pub original: Tuple,
    /// As the answers are expected.
    pub reply: Tuple,
    /// The conntrack zone (0 unless something assigned one).
    pub zone: u16,
}

/// The kernel's connection tracking table.
pub trait Conntrack {
    /// Why an operation failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Every tracked flow of `protocol` in `family`.
    fn flows(&mut self, family: Family, protocol: L4Proto) -> Result<Vec<Flow>, Self::Error>;

    /// Deletes these flows; returns how many existed (and now do not).
    fn delete(&mut self, flows: &[Flow]) -> Result<usize, Self::Error>;
}

/// An in-memory conntrack table.
#[derive(Debug, Default)]
pub struct FakeConntrack {
    /// The flows it holds.
    pub flows: Vec<Flow>,
}

impl Conntrack for FakeConntrack {
    type Error = std::convert::Infallible;

    fn flows(&mut self, family: Family, protocol: L4Proto) -> Result<Vec<Flow>, Self::Error> {
        Ok(self
            .flows
            .iter()
            .filter(|f| f.protocol == protocol && Family::of(&f.original.src) == family)
            .copied()
            .collect())
    }

    fn delete(&mut self, flows: &[Flow]) -> Result<usize, Self::Error> {
        let before = self.flows.len();
        self.flows.retain(|f| !flows.contains(f));
        Ok(before - self.flows.len())
    }
}
