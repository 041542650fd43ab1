//! One service port's share of a table (its chains, its affinity sets, its elements in
//! the shared maps), and the [`Renderer`] that keeps tables up to date by taking old
//! shares out and putting new ones in.
//!
//! Invariant: a renderer's tables equal [`crate::render`] of the build it was last
//! updated with, and the [`Scope`] an update returns names every object that differs
//! from the tables before. Two service ports may put the same element in a shared set
//! (one ClusterIP for several ports, one endpoint behind several Services); the element
//! stays until the last of them takes it out.

use std::collections::HashMap;

use nftproxy_model::{Build, Delta, IpFamily, PortChanges, ProxyState, ServicePortState};
use nftproxy_nft::{Chain, Element, Family, Scope, Scopes, Set, Table, Value};

use crate::{nft_family, services, skeleton};

/// What one service port adds to its family's table.
#[derive(Debug, Default)]
pub(crate) struct Fragment {
    sets: Vec<Set>,
    chains: Vec<Chain>,
    elements: Vec<(&'static str, Element)>,
}

impl Fragment {
    pub(crate) fn add_set(&mut self, set: Set) {
        self.sets.push(set);
    }

    pub(crate) fn add_chain(&mut self, chain: Chain) {
        self.chains.push(chain);
    }

    /// An element of one of the skeleton's shared sets or maps.
    pub(crate) fn add_element(&mut self, set: &'static str, element: Element) {
        self.elements.push((set, element));
    }
}

/// Elements put in by more than one service port, with how many holders beyond the
/// first.
type ExtraHolders = HashMap<(&'static str, Vec<Value>), u32>;

/// Adds a service port's objects to `table`, noting them in `scope` if given.
fn put(
    table: &mut Table,
    extra: &mut ExtraHolders,
    fragment: Fragment,
    mut scope: Option<&mut Scope>,
) {
    for set in fragment.sets {
        if let Some(scope) = scope.as_deref_mut() {
            scope.sets.insert(set.name.clone());
        }
        table.add_set(set);
    }
    for chain in fragment.chains {
        if let Some(scope) = scope.as_deref_mut() {
            scope.chains.insert(chain.name.clone());
        }
        table.add_chain(chain);
    }
    for (set, element) in fragment.elements {
        if let Some(scope) = scope.as_deref_mut() {
            let keys = scope.elements.entry(set.to_owned()).or_default();
            keys.insert(element.key.clone());
        }
        if let Some(existing) = table
            .sets
            .get(set)
            .and_then(|s| s.elements.get(&element.key))
        {
            debug_assert_eq!(existing, &element, "one key, two meanings in {set}");
            *extra.entry((set, element.key)).or_default() += 1;
        } else {
            table.add_element(set, element);
        }
    }
}

/// Removes a service port's objects from `table` (shared elements only with their last
/// holder), noting them in `scope`.
fn take(table: &mut Table, extra: &mut ExtraHolders, fragment: Fragment, scope: &mut Scope) {
    for set in fragment.sets {
        table.sets.remove(&set.name);
        scope.sets.insert(set.name);
    }
    for chain in fragment.chains {
        table.chains.remove(&chain.name);
        scope.chains.insert(chain.name);
    }
    for (set, element) in fragment.elements {
        let holder = (set, element.key);
        match extra.get_mut(&holder) {
            Some(count) if *count > 1 => *count -= 1,
            Some(_) => {
                extra.remove(&holder);
            }
            None => {
                if let Some(s) = table.sets.get_mut(set) {
                    s.elements.remove(&holder.1);
                }
            }
        }
        scope
            .elements
            .entry(set.to_owned())
            .or_default()
            .insert(holder.1);
    }
}

/// A family's whole table, with its shared elements counted.
fn render_counted(state: &ProxyState) -> (Table, ExtraHolders) {
    let mut table = skeleton::table(state);
    let mut extra = ExtraHolders::new();
    for service_port in &state.services {
        put(&mut table, &mut extra, fragment(state, service_port), None);
    }
    (table, extra)
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
    /// Per table, its shared elements' extra holders.
    extra: Vec<ExtraHolders>,
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
                    self.extra.remove(at);
                }
                (Some(at), true, Some(changes)) => {
                    let scope = self.apply(at, state, changes);
                    scopes.insert(family, scope);
                }
                (at, true, _) => {
                    let (table, extra) = render_counted(state);
                    match at {
                        Some(at) => {
                            self.tables[at] = table;
                            self.extra[at] = extra;
                        }
                        None => {
                            // IPv4 is always first.
                            let at = usize::from(family == Family::Ip6 && !self.tables.is_empty());
                            self.tables.insert(at, table);
                            self.extra.insert(at, extra);
                        }
                    }
                }
            }
        }
        scopes
    }

    fn apply(&mut self, at: usize, state: &ProxyState, changes: &PortChanges) -> Scope {
        let (table, extra) = (&mut self.tables[at], &mut self.extra[at]);
        let mut scope = Scope::default();
        for old in &changes.removed {
            take(table, extra, fragment(state, old), &mut scope);
        }
        for name in &changes.added {
            if let Ok(found) = state.services.binary_search_by(|p| p.name.cmp(name)) {
                put(
                    table,
                    extra,
                    fragment(state, &state.services[found]),
                    Some(&mut scope),
                );
            }
        }
        scope
    }
}
