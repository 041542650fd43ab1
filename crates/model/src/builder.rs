//! Building the proxy state, and keeping it built: a [`Builder`] remembers the objects of
//! the last snapshot and rebuilds only the Services whose Service or EndpointSlices are
//! not the same objects any more, as kube-proxy's change trackers do.
//!
//! Invariant: after every [`Builder::update`], [`Builder::build`] equals what a fresh
//! builder makes of the same snapshot, and the returned [`Delta`] names every service
//! port whose state differs from the previous build. Services are built in groups (one
//! Service with its EndpointSlices, keyed by namespace and name); groups only meet where
//! two of them declare the same address and port or NodePort, and then every group is
//! built again in name order, so the later one loses the address exactly as in a
//! full build.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use compact_str::CompactString;
use ipnet::IpNet;

use crate::config::{DetectLocalMode, NodePortAddress, ProxyConfig};
use crate::diag::{Diagnostic, ObjectRef};
use crate::endpoint::{Endpoint, SliceInfo};
use crate::manifest::Snapshot;
use crate::net::parse_cidr;
use crate::object::{Decoded, Grouped};
use crate::seen::Seen;
use crate::service::ServiceInfo;
use crate::state::{
    Build, CategorizedEndpoints, LocalTraffic, NodeFacts, NodePortAddresses, NodePortChoice,
    ProxyState, ServicePortName, ServicePortState, claim, in_family, net_in_family, node_facts,
    unique,
};
use crate::topology::categorize_endpoints;
use crate::{IpFamily, Protocol};

/// Namespace and name of a Service: the key of its group.
type GroupKey = (CompactString, CompactString);

/// Something a service port takes for itself; two Services declaring the same one
/// conflict.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Claim {
    Address(IpAddr, Protocol, u16),
    NodePort(Protocol, u16),
}

/// What every service port of a build depends on besides its own objects.
#[derive(Debug, PartialEq, Eq)]
struct Context {
    node: NodeFacts,
    service_cidrs: Vec<IpNet>,
    diagnostics: Vec<Diagnostic>,
}

/// One Service (or several copies of it, from manifests) and its EndpointSlices.
#[derive(Debug, Default)]
struct Group {
    services: Vec<Decoded<ServiceInfo>>,
    slices: Vec<Decoded<SliceInfo>>,
    /// What the decoded Service declares, whether or not it won it.
    declared: Vec<Claim>,
    diagnostics: Vec<Diagnostic>,
}

/// A group's usable objects, and what it declares.
struct Parts {
    service: Option<Arc<ServiceInfo>>,
    /// What the Service declares.
    declared: Vec<Claim>,
    slices: Vec<Arc<SliceInfo>>,
    diagnostics: Vec<Diagnostic>,
}

/// The addresses and NodePorts taken so far in one family, with their owner.
#[derive(Default)]
struct Claims {
    addresses: HashMap<(IpAddr, Protocol, u16), Rc<str>>,
    node_ports: HashMap<(Protocol, u16), Rc<str>>,
}

/// What one update changed in the build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// Node-level state changed (or this is the first build): everything may differ.
    All,
    /// Only these service ports changed.
    Ports {
        /// IPv4.
        ipv4: PortChanges,
        /// IPv6.
        ipv6: PortChanges,
    },
}

impl Delta {
    /// Whether the build is the same as before.
    pub fn is_empty(&self) -> bool {
        match self {
            Delta::All => false,
            Delta::Ports { ipv4, ipv6 } => ipv4.is_empty() && ipv6.is_empty(),
        }
    }

    /// The changes of one family (`None`: everything).
    pub fn family(&self, family: IpFamily) -> Option<&PortChanges> {
        match (self, family) {
            (Delta::All, _) => None,
            (Delta::Ports { ipv4, .. }, IpFamily::V4) => Some(ipv4),
            (Delta::Ports { ipv6, .. }, IpFamily::V6) => Some(ipv6),
        }
    }
}

/// The service ports of one family that changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortChanges {
    /// The previous state of every service port that changed or went away.
    pub removed: Vec<ServicePortState>,
    /// Every service port that changed or is new; its state is in the build.
    pub added: Vec<ServicePortName>,
}

impl PortChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty()
    }
}

/// Keeps a [`Build`] up to date with successive snapshots.
#[derive(Debug)]
pub struct Builder {
    config: ProxyConfig,
    context: Option<Context>,
    /// The objects of the last snapshot, by address: an object that is still there is
    /// unchanged (the watch caches replace an object on every change). Holding them
    /// keeps their addresses from being reused.
    services: Seen<ServiceInfo>,
    slices: Seen<SliceInfo>,
    groups: BTreeMap<GroupKey, Group>,
    /// How many groups declare each claim.
    declared: HashMap<Claim, u32>,
    build: Build,
}

/// Builds both families' proxy state from a snapshot.
pub fn build(snapshot: &Snapshot, config: &ProxyConfig) -> Build {
    let mut builder = Builder::new(config.clone());
    builder.update(snapshot);
    builder.build
}

impl Builder {
    /// A builder that has seen nothing yet.
    pub fn new(config: ProxyConfig) -> Builder {
        Builder {
            config,
            context: None,
            services: Seen::default(),
            slices: Seen::default(),
            groups: BTreeMap::new(),
            declared: HashMap::new(),
            build: Build {
                ipv4: empty_state(IpFamily::V4),
                ipv6: empty_state(IpFamily::V6),
                diagnostics: Vec::new(),
            },
        }
    }

    /// The settings it builds with.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// The build of the last snapshot.
    pub fn build(&self) -> &Build {
        &self.build
    }

    /// Brings the build up to `snapshot` and says what changed.
    pub fn update(&mut self, snapshot: &Snapshot) -> Delta {
        let mut diagnostics = Vec::new();
        let node = node_facts(snapshot, &self.config, &mut diagnostics);
        let service_cidrs = service_cidrs(snapshot, &self.config, &mut diagnostics);
        let context = Context {
            node,
            service_cidrs,
            diagnostics,
        };
        let context_changed = self.context.as_ref() != Some(&context);
        if context_changed {
            for family in [IpFamily::V4, IpFamily::V6] {
                let state = family_state(family, &self.config, &context);
                let slot = self.build.family_mut(family);
                let services = std::mem::take(&mut slot.services);
                *slot = ProxyState { services, ..state };
            }
            self.context = Some(context);
        }

        let mut dirty = BTreeSet::new();
        track(
            &mut self.services,
            &snapshot.services,
            &mut self.groups,
            &mut dirty,
        );
        track(
            &mut self.slices,
            &snapshot.endpoint_slices,
            &mut self.groups,
            &mut dirty,
        );

        // Rebuilding only the dirty groups is exact when none of them shares a claim
        // with another group, before or after the change.
        let mut parts: BTreeMap<GroupKey, Parts> = BTreeMap::new();
        let mut everything = context_changed;
        let mut claimed_now = HashSet::new();
        for key in dirty.iter().filter(|_| !context_changed) {
            let Some(group) = self.groups.get(key) else {
                continue;
            };
            let new = group_parts(group);
            let declarers = |c: &Claim| self.declared.get(c).copied().unwrap_or(0);
            for claim in &new.declared {
                everything |= declarers(claim) > u32::from(group.declared.contains(claim));
                everything |= !claimed_now.insert(claim.clone());
            }
            everything |= group.declared.iter().any(|c| declarers(c) > 1);
            parts.insert(key.clone(), new);
        }
        let keys: Vec<GroupKey> = if everything {
            self.groups.keys().cloned().collect()
        } else {
            parts.keys().cloned().collect()
        };
        let delta = self.rebuild(keys, parts, context_changed);
        for key in &dirty {
            if self
                .groups
                .get(key)
                .is_some_and(|g| g.services.is_empty() && g.slices.is_empty())
            {
                self.groups.remove(key);
            }
        }
        if context_changed { Delta::All } else { delta }
    }

    /// Builds the groups `keys` (in name order) again with shared claims, and puts their
    /// service ports and diagnostics in place of the old ones. Groups not in `parts`
    /// have their parts gathered on the way.
    fn rebuild(
        &mut self,
        keys: Vec<GroupKey>,
        mut parts: BTreeMap<GroupKey, Parts>,
        context_changed: bool,
    ) -> Delta {
        let Some(context) = &self.context else {
            return Delta::All;
        };
        let mut claims = [Claims::default(), Claims::default()];
        let mut ports: [BTreeMap<GroupKey, Vec<ServicePortState>>; 2] = Default::default();
        let mut diagnostics_changed = false;
        for key in keys {
            let mut new = match parts.remove(&key) {
                Some(new) => new,
                None => group_parts(self.groups.entry(key.clone()).or_default()),
            };
            let group = self.groups.entry(key.clone()).or_default();
            let declared = std::mem::take(&mut new.declared);
            for claim in std::mem::replace(&mut group.declared, declared) {
                if let Some(count) = self.declared.get_mut(&claim) {
                    *count -= 1;
                    if *count == 0 {
                        self.declared.remove(&claim);
                    }
                }
            }
            for claim in &group.declared {
                *self.declared.entry(claim.clone()).or_default() += 1;
            }
            for (index, family) in [IpFamily::V4, IpFamily::V6].into_iter().enumerate() {
                let list = match &new.service {
                    Some(service) => service_ports(
                        family,
                        &self.config,
                        &context.node,
                        service,
                        &new.slices,
                        &mut claims[index],
                        &mut new.diagnostics,
                    ),
                    None => Vec::new(),
                };
                // A group without ports in a family, before or now, changes nothing there
                // (a first build would otherwise note every group in both families).
                let services = &self.build.family(family).services;
                if !list.is_empty() || holds_group(services, &key) {
                    ports[index].insert(key.clone(), list);
                }
            }
            new.diagnostics.sort();
            new.diagnostics.dedup();
            if group.diagnostics != new.diagnostics {
                group.diagnostics = new.diagnostics;
                diagnostics_changed = true;
            }
        }
        if diagnostics_changed || context_changed {
            let mut all: Vec<Diagnostic> = context.diagnostics.clone();
            all.extend(
                self.groups
                    .values()
                    .flat_map(|g| g.diagnostics.iter().cloned()),
            );
            all.sort();
            all.dedup();
            self.build.diagnostics = all;
        }
        let [v4, v6] = ports;
        Delta::Ports {
            ipv4: replace_groups(&mut self.build.ipv4.services, v4, !context_changed),
            ipv6: replace_groups(&mut self.build.ipv6.services, v6, !context_changed),
        }
    }
}

impl Build {
    fn family(&self, family: IpFamily) -> &ProxyState {
        match family {
            IpFamily::V4 => &self.ipv4,
            IpFamily::V6 => &self.ipv6,
        }
    }

    fn family_mut(&mut self, family: IpFamily) -> &mut ProxyState {
        match family {
            IpFamily::V4 => &mut self.ipv4,
            IpFamily::V6 => &mut self.ipv6,
        }
    }
}

/// Finds the objects of `current` that `seen` does not hold and the ones it holds that
/// are gone, and moves them into or out of `seen` and their group, which is dirty.
fn track<T: GroupMember>(
    seen: &mut Seen<T>,
    current: &[Decoded<T>],
    groups: &mut BTreeMap<GroupKey, Group>,
    dirty: &mut BTreeSet<GroupKey>,
) {
    let (gone, added) = seen.changes(current);
    let key = |object: &Decoded<T>| {
        let (namespace, name) = object.group();
        (CompactString::from(namespace), CompactString::from(name))
    };
    for at in gone {
        if let Some(object) = seen.forget(at) {
            let key = key(&object);
            T::members(groups.entry(key.clone()).or_default()).retain(|o| !o.same(&object));
            dirty.insert(key);
        }
    }
    for object in added {
        seen.hold(object.clone());
        let key = key(&object);
        T::members(groups.entry(key.clone()).or_default()).push(object);
        dirty.insert(key);
    }
}

/// A decoded object of a group.
trait GroupMember: Grouped + Sized {
    /// The group's objects of its kind.
    fn members(group: &mut Group) -> &mut Vec<Decoded<Self>>;
}

impl GroupMember for ServiceInfo {
    fn members(group: &mut Group) -> &mut Vec<Decoded<ServiceInfo>> {
        &mut group.services
    }
}

impl GroupMember for SliceInfo {
    fn members(group: &mut Group) -> &mut Vec<Decoded<SliceInfo>> {
        &mut group.slices
    }
}

/// The group (namespace and Service name) of a service port, and of a group key.
fn group_of(port: &ServicePortState) -> (&str, &str) {
    (&port.name.namespace, &port.name.name)
}

fn as_group(key: &GroupKey) -> (&str, &str) {
    (&key.0, &key.1)
}

/// Whether `services` (sorted by name) holds a port of the group `key`.
fn holds_group(services: &[ServicePortState], key: &GroupKey) -> bool {
    let at = services.partition_point(|p| group_of(p) < as_group(key));
    services
        .get(at)
        .is_some_and(|p| group_of(p) == as_group(key))
}

/// Puts each group's new service ports in place of its old ones in `services` (sorted
/// by name, so a group's ports are next to each other), and says which changed when
/// `report` (a build of everything reports nothing).
fn replace_groups(
    services: &mut Vec<ServicePortState>,
    mut groups: BTreeMap<GroupKey, Vec<ServicePortState>>,
    report: bool,
) -> PortChanges {
    let mut changes = PortChanges::default();
    for new in groups.values_mut() {
        new.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let mut note = |previous: &[ServicePortState], new: &[ServicePortState]| {
        // Ports of a group that kept their state are not reported.
        if report && previous != new {
            for p in previous.iter().filter(|p| !new.contains(p)) {
                changes.removed.push(p.clone());
            }
            for p in new.iter().filter(|p| !previous.contains(p)) {
                changes.added.push(p.name.clone());
            }
        }
    };
    let ranges: Vec<std::ops::Range<usize>> = groups
        .keys()
        .map(|key| {
            let start = services.partition_point(|p| group_of(p) < as_group(key));
            let len = services[start..]
                .iter()
                .take_while(|p| group_of(p) == as_group(key))
                .count();
            start..start + len
        })
        .collect();
    if ranges
        .iter()
        .zip(groups.values())
        .all(|(at, new)| at.len() == new.len())
    {
        // Every group keeps its number of ports (an endpoint changed, say): swap them in
        // place, instead of moving every port of the cluster into a new list.
        for (at, new) in ranges.into_iter().zip(groups.into_values()) {
            note(&services[at.clone()], &new);
            for (slot, port) in services[at].iter_mut().zip(new) {
                *slot = port;
            }
        }
        return changes;
    }
    let old = std::mem::take(services);
    // At most the old and the new ports: one allocation, not a doubling series (a first
    // build puts every port of the cluster here).
    let mut merged = Vec::with_capacity(old.len() + groups.values().map(Vec::len).sum::<usize>());
    let mut old = old.into_iter();
    let mut taken = 0;
    for (at, new) in ranges.into_iter().zip(groups.into_values()) {
        merged.extend(old.by_ref().take(at.start - taken));
        let previous: Vec<ServicePortState> = old.by_ref().take(at.len()).collect();
        taken = at.end;
        note(&previous, &new);
        merged.extend(new);
    }
    merged.extend(old);
    *services = merged;
    changes
}

fn empty_state(family: IpFamily) -> ProxyState {
    ProxyState {
        family,
        node_ips: Vec::new(),
        node_port_addresses: NodePortAddresses::Addresses(Vec::new()),
        node_port_choices: Vec::new(),
        local_traffic: LocalTraffic::Unknown,
        masquerade_all: false,
        masquerade_mark: 0,
        service_counters: false,
        service_cidrs: Vec::new(),
        services: Vec::new(),
    }
}

/// The configured Service CIDRs and those of the ServiceCIDR objects.
fn service_cidrs(
    snapshot: &Snapshot,
    config: &ProxyConfig,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<IpNet> {
    let mut service_cidrs = config.service_cidrs.clone();
    for object in &snapshot.service_cidrs {
        let reference = ObjectRef {
            kind: "ServiceCIDR".to_owned(),
            namespace: String::new(),
            name: object.metadata.name.clone().unwrap_or_default(),
        };
        for text in object
            .spec
            .as_ref()
            .and_then(|s| s.cidrs.as_ref())
            .into_iter()
            .flatten()
        {
            match parse_cidr(text) {
                Ok(cidr) => service_cidrs.push(cidr),
                Err(e) => diagnostics.push(Diagnostic::invalid(&reference, e)),
            }
        }
    }
    service_cidrs
}

/// A group's decoded Services (of which one copy must remain) and EndpointSlices (in
/// name order, so that the first slice listing an endpoint is the first in name order).
fn group_parts(group: &Group) -> Parts {
    let mut diagnostics = Vec::new();
    let service = unique_infos(&group.services, "Service", &mut diagnostics).pop();
    let slices = unique_infos(&group.slices, "EndpointSlice", &mut diagnostics);
    Parts {
        declared: declared_claims(service.as_deref()),
        service,
        slices,
        diagnostics,
    }
}

/// The decoded objects, one copy per name (see [`unique`]), sorted by name; the others
/// are reported.
fn unique_infos<I: Grouped + PartialEq>(
    objects: &[Decoded<I>],
    kind: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<Arc<I>> {
    let mut infos = Vec::new();
    for object in objects {
        match object.info() {
            Ok(info) => infos.push(Arc::clone(info)),
            Err(diagnostic) => diagnostics.push(diagnostic.clone()),
        }
    }
    let namespace = |i: &Arc<I>| i.group().0.to_owned();
    unique(
        infos,
        |i| (namespace(i), i.name().to_owned()),
        |i| ObjectRef::new(kind, &namespace(i), i.name()),
        diagnostics,
    )
}

/// Every address and NodePort a Service asks for, in any family.
fn declared_claims(service: Option<&ServiceInfo>) -> Vec<Claim> {
    let Some(service) = service else {
        return Vec::new();
    };
    let mut claims = Vec::new();
    for port in &service.ports {
        let addresses = service
            .cluster_ips
            .iter()
            .chain(&service.external_ips)
            .chain(&service.load_balancer_ips);
        claims.extend(addresses.map(|ip| Claim::Address(*ip, port.protocol, port.port)));
        claims.extend(
            port.node_port
                .map(|node_port| Claim::NodePort(port.protocol, node_port)),
        );
    }
    claims.sort();
    claims.dedup();
    claims
}

/// Where NodePorts are accepted in `family`, as kube-proxy's nftables mode decides it:
/// `primary` (the default) is the node's primary IP; a CIDR takes every address of the
/// namespace's interfaces inside it (the node IPs when those are not known), and a
/// CIDR of length 0 (or `all`) every local address; loopback addresses (`localhost`)
/// are never taken. With the candidates and what became of each.
fn node_port_addresses(
    family: IpFamily,
    config: &ProxyConfig,
    node_ips: &[IpAddr],
    local_addresses: Option<&[IpAddr]>,
) -> (NodePortAddresses, Vec<NodePortChoice>) {
    let entries = if config.node_port_addresses.is_empty() {
        &[NodePortAddress::Primary][..]
    } else {
        &config.node_port_addresses[..]
    };
    // `all` and `localhost` in this family.
    let (everything, loopback) = match family {
        IpFamily::V4 => (
            IpNet::new_assert(IpAddr::from([0, 0, 0, 0]), 0),
            IpNet::new_assert(IpAddr::from([127, 0, 0, 0]), 8),
        ),
        IpFamily::V6 => (
            IpNet::new_assert(IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED), 0),
            IpNet::new_assert(IpAddr::from(std::net::Ipv6Addr::LOCALHOST), 128),
        ),
    };
    let cidrs: Vec<IpNet> = entries
        .iter()
        .filter_map(|e| match e {
            NodePortAddress::Cidr(cidr) if net_in_family(family)(cidr) => Some(*cidr),
            NodePortAddress::All => Some(everything),
            NodePortAddress::Localhost => Some(loopback),
            _ => None,
        })
        .collect();
    if cidrs.iter().any(|c| c.prefix_len() == 0) {
        return (NodePortAddresses::All, Vec::new());
    }
    let primary = entries
        .contains(&NodePortAddress::Primary)
        .then(|| node_ips.first().copied())
        .flatten();
    let mut candidates: Vec<IpAddr> = if cidrs.is_empty() {
        Vec::new()
    } else {
        local_addresses
            .unwrap_or(node_ips)
            .iter()
            .copied()
            .filter(in_family(family))
            .collect()
    };
    candidates.extend(primary);
    candidates.sort();
    candidates.dedup();
    let mut taken = Vec::new();
    let mut choices = Vec::new();
    for address in candidates {
        let inside = cidrs.iter().find(|c| c.contains(&address));
        let (ok, reason) = if address.is_loopback() {
            // NodePorts on loopback need route_localnet tricks that nftables mode does
            // not do (upstream serves them only through its gated user-space proxy).
            (
                false,
                "loopback: localhost NodePorts are not served".to_owned(),
            )
        } else if Some(address) == primary {
            (true, "the node's primary IP (primary)".to_owned())
        } else if let Some(cidr) = inside {
            (true, format!("inside {cidr}"))
        } else {
            (false, "outside every nodePortAddresses CIDR".to_owned())
        };
        if ok {
            taken.push(address);
        }
        choices.push(NodePortChoice {
            address,
            taken: ok,
            reason,
        });
    }
    (NodePortAddresses::Addresses(taken), choices)
}

/// The node-level part of one family's state (everything but the service ports).
fn family_state(family: IpFamily, config: &ProxyConfig, context: &Context) -> ProxyState {
    let node = &context.node;
    let node_ips: Vec<IpAddr> = node.ips.iter().copied().filter(in_family(family)).collect();

    let (node_port_addresses, node_port_choices) =
        node_port_addresses(family, config, &node_ips, node.local_addresses.as_deref());

    let first_cidr = |cidrs: &[IpNet]| {
        cidrs
            .iter()
            .find(|c| net_in_family(family)(c))
            .map_or(LocalTraffic::Unknown, |c| LocalTraffic::Cidr(*c))
    };
    let local_traffic = match &config.detect_local {
        DetectLocalMode::ClusterCidr => first_cidr(&config.cluster_cidrs),
        DetectLocalMode::NodeCidr => first_cidr(&node.pod_cidrs),
        DetectLocalMode::BridgeInterface(name) => LocalTraffic::Interface(name.clone()),
        DetectLocalMode::InterfaceNamePrefix(prefix) => {
            LocalTraffic::InterfacePrefix(prefix.clone())
        }
    };

    let mut cidrs: Vec<IpNet> = context
        .service_cidrs
        .iter()
        .copied()
        .filter(net_in_family(family))
        .collect();
    cidrs.sort();
    cidrs.dedup();

    ProxyState {
        family,
        node_ips,
        node_port_addresses,
        node_port_choices,
        local_traffic,
        masquerade_all: config.masquerade_all,
        masquerade_mark: config.masquerade_mark(),
        service_counters: config.service_counters,
        service_cidrs: cidrs,
        services: Vec::new(),
    }
}

/// The service ports of one Service in one family. Addresses and NodePorts already in
/// `claims` are left out with a diagnostic; a port that loses its ClusterIP is left out
/// whole.
fn service_ports(
    family: IpFamily,
    config: &ProxyConfig,
    node: &NodeFacts,
    service: &ServiceInfo,
    slices: &[Arc<SliceInfo>],
    claims: &mut Claims,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<ServicePortState> {
    let Some(cluster_ip) = service.cluster_ips.iter().copied().find(in_family(family)) else {
        return Vec::new();
    };
    let object = ObjectRef::new("Service", &service.namespace, &service.name);
    let service_slices: Vec<&SliceInfo> = slices
        .iter()
        .map(|s| &**s)
        .filter(|s| s.family == family)
        .collect();
    let owner: Rc<str> = format!("{}/{}", service.namespace, service.name).into();
    let mut ports = Vec::new();
    for port in &service.ports {
        let name = ServicePortName {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            port: port.name.clone(),
            protocol: port.protocol,
        };
        let (protocol, number) = (port.protocol.lower(), port.port);
        let mut claim_address = |ip: IpAddr, what: &str| {
            claim(&mut claims.addresses, (ip, port.protocol, number), &owner).map_err(|other| {
                diagnostics.push(Diagnostic::invalid(
                    &object,
                    format!("{what} {ip}:{number}/{protocol} is already used by Service {other}"),
                ))
            })
        };
        if claim_address(cluster_ip, "ClusterIP").is_err() {
            continue;
        }
        let mut claimed_ips = |ips: &[IpAddr], what: &str| -> Vec<IpAddr> {
            ips.iter()
                .copied()
                .filter(in_family(family))
                .filter(|ip| claim_address(*ip, what).is_ok())
                .collect()
        };
        let external_ips = claimed_ips(&service.external_ips, "externalIP");
        let load_balancer_ips = claimed_ips(&service.load_balancer_ips, "load balancer IP");
        let node_port = port.node_port.filter(|node_port| {
            claim(&mut claims.node_ports, (port.protocol, *node_port), &owner)
                .map_err(|other| {
                    diagnostics.push(Diagnostic::invalid(
                        &object,
                        format!(
                            "nodePort {node_port}/{protocol} is already used by Service {other}"
                        ),
                    ))
                })
                .is_ok()
        });

        let mut endpoints: Vec<Endpoint> = Vec::new();
        let mut seen: HashSet<(IpAddr, u16)> = HashSet::new();
        for slice in &service_slices {
            let Some(slice_port) = slice
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)
            else {
                continue;
            };
            for endpoint in &slice.endpoints {
                // The first slice (in name order) listing an endpoint wins.
                if !seen.insert((endpoint.ip, slice_port.port)) {
                    continue;
                }
                endpoints.push(Endpoint {
                    ip: endpoint.ip,
                    port: slice_port.port,
                    ready: endpoint.ready,
                    serving: endpoint.serving,
                    terminating: endpoint.terminating,
                    is_local: endpoint.node_name.as_deref() == Some(config.node_name.as_str()),
                    hints: endpoint.hints.clone(),
                });
            }
        }
        endpoints.sort();

        let mut state = ServicePortState {
            name,
            cluster_ip,
            port: port.port,
            node_port,
            external_ips,
            load_balancer_ips,
            load_balancer_source_ranges: service
                .source_ranges
                .iter()
                .copied()
                .filter(net_in_family(family))
                .collect(),
            internal_policy_local: service.internal_policy_local,
            external_policy_local: service.external_policy_local,
            affinity_timeout: service.affinity_timeout,
            health_check_node_port: service.health_check_node_port,
            endpoints: CategorizedEndpoints::default(),
        };
        state.endpoints = categorize_endpoints(
            &endpoints,
            state.uses_cluster_endpoints(),
            state.uses_local_endpoints(),
            &config.node_name,
            node.zone.as_deref(),
        );
        if port.protocol == Protocol::Udp {
            state.endpoints.udp_serving = endpoints
                .into_iter()
                .filter(|e| e.serving || e.ready)
                .collect();
        }
        ports.push(state);
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Services `a`, `b` and `c`, each with one endpoint.
    fn objects() -> Snapshot {
        let mut yaml = String::new();
        for (index, name) in ["a", "b", "c"].iter().enumerate() {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\n\
                 spec: {{clusterIP: 172.30.0.{index}, ports: [{{port: 80}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {name}-1, namespace: ns, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 addressType: IPv4\nports: [{{port: 80}}]\nendpoints:\n- addresses: [10.180.0.{index}]\n"
            ));
        }
        let mut snapshot = Snapshot::default();
        let report = snapshot.add_manifest("objects.yaml", &yaml);
        assert!(report.errors.is_empty(), "{report:?}");
        snapshot
    }

    #[test]
    fn the_nodeport_keywords_all_and_localhost_are_read_as_kube_proxy_reads_them() {
        let node = [IpAddr::from([192, 168, 50, 10])];
        let local = [
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from([192, 168, 50, 10]),
            IpAddr::from([10, 0, 0, 5]),
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ];
        let entries = |text: &str| {
            let mut config = ProxyConfig::new("node");
            config.node_port_addresses = text
                .split(',')
                .map(|e| crate::config::parse_node_port_address(e).unwrap())
                .collect();
            config
        };
        // `primary` beside `localhost`: the primary IP only; loopback is named, not taken.
        let config = entries("primary,localhost");
        let (addresses, choices) = node_port_addresses(IpFamily::V4, &config, &node, Some(&local));
        assert_eq!(addresses, NodePortAddresses::Addresses(node.to_vec()));
        let loopback = choices.iter().find(|c| c.address.is_loopback()).unwrap();
        assert!(!loopback.taken && loopback.reason.contains("localhost NodePorts"));
        assert!(
            config
                .node_port_addresses
                .iter()
                .any(NodePortAddress::names_loopback)
        );
        // `all`: every local address of both families, and it names no loopback.
        let config = entries("all");
        for family in [IpFamily::V4, IpFamily::V6] {
            let (addresses, _) = node_port_addresses(family, &config, &node, Some(&local));
            assert_eq!(addresses, NodePortAddresses::All);
        }
        assert!(!config.node_port_addresses[0].names_loopback());
        // A CIDR naming loopback asks for it; 0.0.0.0/0 does not.
        assert!(entries("127.0.0.1/32").node_port_addresses[0].names_loopback());
        assert!(!entries("0.0.0.0/0").node_port_addresses[0].names_loopback());
        assert!(crate::config::parse_node_port_address("loopback").is_err());
    }

    #[test]
    fn objects_listed_twice_or_moved_are_tracked_as_a_whole_build_sees_them() {
        let all = objects();
        let config = ProxyConfig::new("node");
        let mut builder = Builder::new(config.clone());
        // Places of `all`'s objects, per step: objects replaced, inserted, removed and
        // moved, and a repeated place lists one object twice.
        let steps: [&[usize]; 12] = [
            &[0, 1],
            &[0, 0],
            &[0, 2],
            &[2, 0],
            &[2, 2, 1],
            &[2, 0, 1],
            &[1, 1, 1],
            &[0, 1, 2],
            &[0, 2],
            &[0, 1, 2],
            &[1, 2],
            &[2, 1],
        ];
        for places in steps {
            let snapshot = Snapshot {
                services: places.iter().map(|p| all.services[*p].clone()).collect(),
                endpoint_slices: places
                    .iter()
                    .map(|p| all.endpoint_slices[*p].clone())
                    .collect(),
                ..Snapshot::default()
            };
            builder.update(&snapshot);
            let whole = build(&snapshot, &config);
            assert_eq!(builder.build().ipv4, whole.ipv4, "after {places:?}");
            assert_eq!(builder.build().ipv6, whole.ipv6, "after {places:?}");
        }
    }
}
