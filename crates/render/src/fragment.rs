//! One service port's share of a table (its elements in the shared sets and maps, its
//! destinations' endpoints, and with affinity its chains and sets), and the [`Renderer`]
//! that keeps tables up to date by taking old shares out and putting new ones in.
//!
//! Invariant: a renderer's tables equal [`crate::render`] of the build it was last
//! updated with, and the [`Scope`] an update returns names every object that differs
//! from the tables before. Two service ports may put the same element in a shared set
//! (one ClusterIP for several ports, one endpoint behind several Services); the element
//! stays until the last of them takes it out. A shard's map, chain and rules follow the
//! endpoint counts in use (see [`crate::balance`]).

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use nftproxy_model::{Build, Delta, IpFamily, PortChanges, ProxyState, ServicePortState};
use nftproxy_nft::{Chain, Element, Family, Scope, Scopes, Set, Table, Value};

use crate::balance::{self, Shard, Usages};
use crate::services::{self, Fragment};
use crate::{hairpin, nft_family, skeleton};

/// Elements put in by more than one service port, with how many holders beyond the
/// first.
type ExtraHolders = HashMap<(Cow<'static, str>, Vec<Value>), u32>;

/// What service ports share in a table: elements, and the balancers' rules.
#[derive(Debug, Default)]
struct Shared {
    extra: ExtraHolders,
    usages: Usages,
    /// Hairpin elements rendered, holders counted, by shard.
    hairpin: [u32; crate::balance::SHARD_BITS as usize + 1],
}

/// A whole table's elements by set, in render order, added per set in one pass
/// ([`nftproxy_nft::Elements::extend_new`]): hundreds of thousands of inserts, each a
/// walk of a large tree, were most of rendering a large cluster.
type Gathered = HashMap<Cow<'static, str>, Vec<Arc<Element>>>;

/// Adds a service port's objects to `table`, noting them in `scope` if given.
/// With `gathered`, the elements go there instead of into the table.
fn put(
    table: &mut Table,
    shared: &mut Shared,
    fragment: Fragment,
    mut scope: Option<&mut Scope>,
    gathered: Option<&mut Gathered>,
) {
    let Fragment {
        sets,
        chains,
        mut elements,
        destinations,
        hairpin,
    } = fragment;
    for (bits, element) in hairpin {
        let holders = &mut shared.hairpin[usize::from(bits)];
        *holders += 1;
        if *holders == 1 {
            hairpin::keep(table, bits, true, scope.as_deref_mut());
        }
        elements.push((Cow::Borrowed(hairpin::set(bits)), element));
    }
    let mut changed = BTreeSet::new();
    for destination in &destinations {
        let usage @ (shard, _) = destination.usage();
        let uses = shared.usages.entry(usage).or_default();
        *uses += 1;
        if *uses == 1 {
            let counted = destination.counted();
            balance::keep_shard(
                table,
                &shared.usages,
                (shard, counted),
                scope.as_deref_mut(),
            );
            changed.insert(shard);
        }
        elements.extend(destination.elements());
    }
    put_objects(
        table,
        &mut shared.extra,
        sets,
        chains,
        elements,
        scope.as_deref_mut(),
        gathered,
    );
    rebuild_shards(table, &shared.usages, changed, scope);
}

/// A new chain for each shard in use whose rules changed.
fn rebuild_shards(
    table: &mut Table,
    usages: &Usages,
    changed: BTreeSet<Shard>,
    mut scope: Option<&mut Scope>,
) {
    for shard in changed {
        let Some(chain) = balance::chain(table.family, shard, usages) else {
            continue;
        };
        if let Some(scope) = scope.as_deref_mut() {
            scope.chains.insert(chain.name.clone());
        }
        table.add_chain(chain);
    }
}

fn put_objects(
    table: &mut Table,
    extra: &mut ExtraHolders,
    sets: Vec<Set>,
    chains: Vec<Chain>,
    elements: Vec<(Cow<'static, str>, Element)>,
    mut scope: Option<&mut Scope>,
    mut gathered: Option<&mut Gathered>,
) {
    for set in sets {
        if let Some(scope) = scope.as_deref_mut() {
            scope.sets.insert(set.name.clone());
        }
        table.add_set(set);
    }
    for chain in chains {
        if let Some(scope) = scope.as_deref_mut() {
            scope.chains.insert(chain.name.clone());
        }
        table.add_chain(chain);
    }
    for (set, element) in elements {
        if let Some(scope) = scope.as_deref_mut() {
            let keys = scope.elements.entry(set.to_string()).or_default();
            keys.insert(element.key());
        }
        let element = Arc::new(element);
        if let Some(gathered) = gathered.as_deref_mut() {
            gathered.entry(set).or_default().push(element);
            continue;
        }
        let Some(elements) = table.sets.get_mut(set.as_ref()).map(|s| &mut s.elements) else {
            continue;
        };
        if !elements.insert_new(Arc::clone(&element)) {
            debug_assert_eq!(
                elements.get(&element.key()),
                Some(&*element),
                "one key, two meanings in {set}"
            );
            *extra.entry((set, element.key())).or_default() += 1;
        }
    }
}

/// Removes a service port's objects from `table` (shared elements only with their last
/// holder; a shard's rule with the last destination of its count, and its chain and
/// map with the last destination), noting them in `scope`.
fn take(table: &mut Table, shared: &mut Shared, fragment: Fragment, scope: &mut Scope) {
    let mut elements = fragment.elements;
    for destination in &fragment.destinations {
        elements.extend(destination.elements());
    }
    let shards: Vec<u8> = fragment.hairpin.iter().map(|(bits, _)| *bits).collect();
    elements.extend(
        fragment
            .hairpin
            .into_iter()
            .map(|(bits, element)| (Cow::Borrowed(hairpin::set(bits)), element)),
    );
    take_objects(
        table,
        &mut shared.extra,
        fragment.sets,
        fragment.chains,
        elements,
        scope,
    );
    for bits in shards {
        let holders = &mut shared.hairpin[usize::from(bits)];
        *holders -= 1;
        if *holders == 0 {
            hairpin::keep(table, bits, false, Some(scope));
        }
    }
    let mut changed = BTreeSet::new();
    for destination in &fragment.destinations {
        let usage @ (shard, _) = destination.usage();
        let Some(uses) = shared.usages.get_mut(&usage) else {
            continue;
        };
        *uses -= 1;
        if *uses > 0 {
            continue;
        }
        shared.usages.remove(&usage);
        let counted = destination.counted();
        balance::keep_shard(table, &shared.usages, (shard, counted), Some(scope));
        changed.insert(shard);
    }
    rebuild_shards(table, &shared.usages, changed, Some(scope));
}

fn take_objects(
    table: &mut Table,
    extra: &mut ExtraHolders,
    sets: Vec<Set>,
    chains: Vec<Chain>,
    elements: Vec<(Cow<'static, str>, Element)>,
    scope: &mut Scope,
) {
    for set in sets {
        table.sets.remove(&set.name);
        scope.sets.insert(set.name);
    }
    for chain in chains {
        table.chains.remove(&chain.name);
        scope.chains.insert(chain.name);
    }
    for (set, element) in elements {
        let holder = (set, element.key());
        match extra.get_mut(&holder) {
            Some(count) if *count > 1 => *count -= 1,
            Some(_) => {
                extra.remove(&holder);
            }
            None => {
                if let Some(s) = table.sets.get_mut(holder.0.as_ref()) {
                    s.elements.remove(&holder.1);
                }
            }
        }
        scope
            .elements
            .entry(holder.0.into_owned())
            .or_default()
            .insert(holder.1);
    }
}

/// A family's whole table, with what its service ports share counted.
fn render_counted(state: &ProxyState) -> (Table, Shared) {
    let mut table = skeleton::table(state);
    let mut shared = Shared::default();
    let mut gathered = Gathered::new();
    for service_port in &state.services {
        let fragment = fragment(state, service_port);
        put(&mut table, &mut shared, fragment, None, Some(&mut gathered));
    }
    for (set, elements) in gathered {
        let Some(held) = table.sets.get_mut(set.as_ref()).map(|s| &mut s.elements) else {
            continue;
        };
        for element in held.extend_new(elements) {
            debug_assert_eq!(
                held.get(&element.key()),
                Some(&*element),
                "one key, two meanings in {set}"
            );
            *shared
                .extra
                .entry((set.clone(), element.key()))
                .or_default() += 1;
        }
    }
    (table, shared)
}

/// A service port's objects.
fn fragment(state: &ProxyState, service_port: &ServicePortState) -> Fragment {
    let mut fragment = Fragment::default();
    services::add_service_port(&mut fragment, state, service_port);
    fragment
}

/// Renders one family's table.
pub fn render(state: &ProxyState) -> Table {
    render_counted(state).0
}

/// Keeps the tables of successive builds, changing only what each [`Delta`] names.
#[derive(Debug, Default)]
pub struct Renderer {
    /// The IPv4 table, then the IPv6 table when that family is active.
    tables: Vec<Table>,
    /// Per table, what its service ports share.
    shared: Vec<Shared>,
}

impl Renderer {
    /// A renderer without tables; its first update renders everything.
    pub fn new() -> Renderer {
        Renderer::default()
    }

    /// The tables of the last update.
    pub fn tables(&self) -> &[Table] {
        &self.tables
    }

    /// Brings the tables to `build`, of which `delta` says what changed since the last
    /// update, and says which objects of each family's table may differ.
    pub fn update(&mut self, build: &Build, delta: &Delta) -> Scopes {
        let mut scopes = Scopes::everything();
        for state in [&build.ipv4, &build.ipv6] {
            let family = nft_family(state.family);
            let at = self.tables.iter().position(|t| t.family == family);
            let active = state.family == IpFamily::V4 || state.is_active();
            match (at, active, delta.family(state.family)) {
                (None, false, _) => scopes.insert(family, Scope::default()),
                (Some(at), false, _) => {
                    self.tables.remove(at);
                    self.shared.remove(at);
                }
                (Some(at), true, Some(changes)) => {
                    let scope = self.apply(at, state, changes);
                    scopes.insert(family, scope);
                }
                (at, true, _) => {
                    let (table, shared) = render_counted(state);
                    match at {
                        Some(at) => {
                            self.tables[at] = table;
                            self.shared[at] = shared;
                        }
                        None => {
                            // IPv4 is always first.
                            let at = usize::from(family == Family::Ip6 && !self.tables.is_empty());
                            self.tables.insert(at, table);
                            self.shared.insert(at, shared);
                        }
                    }
                }
            }
        }
        scopes
    }

    fn apply(&mut self, at: usize, state: &ProxyState, changes: &PortChanges) -> Scope {
        let (table, shared) = (&mut self.tables[at], &mut self.shared[at]);
        let mut scope = Scope::default();
        for old in &changes.removed {
            take(table, shared, fragment(state, old), &mut scope);
        }
        for name in &changes.added {
            if let Ok(found) = state.services.binary_search_by(|p| p.name.cmp(name)) {
                put(
                    table,
                    shared,
                    fragment(state, &state.services[found]),
                    Some(&mut scope),
                    None,
                );
            }
        }
        scope
    }
}
