//! Change detection: which objects of a snapshot are new since the one before, and
//! which are gone. Objects are shared (`Arc`), and the watch caches and the manifest
//! loader hand an unchanged object over as the same allocation, so its address is its
//! identity: a changed object is a new address.
//!
//! Invariant: after the caller has forgotten what [`Seen::changes`] calls gone and held
//! what it calls new, the held objects are exactly those of the snapshot, once each.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use crate::object::{Decoded, Grouped};

/// Objects by their address.
type ByAddress<T> = HashMap<usize, Decoded<T>, BuildHasherDefault<AddressHasher>>;

/// Addresses, hashed as [`ByAddress`] does.
type Addresses = HashSet<usize, BuildHasherDefault<AddressHasher>>;

/// The objects of one kind in the last snapshot: by address, and, when none was there
/// twice, their addresses in snapshot order. The watch caches keep their order, so a
/// snapshot after a change differs from the last one in a few places, and comparing in
/// order finds them without hashing every address.
#[derive(Debug)]
pub(crate) struct Seen<T> {
    by_address: ByAddress<T>,
    order: Option<Vec<usize>>,
}

impl<T> Default for Seen<T> {
    fn default() -> Self {
        Seen {
            by_address: ByAddress::default(),
            order: None,
        }
    }
}

/// What a snapshot changed of one kind: the addresses gone, the objects new.
pub(crate) type Changes<T> = (Vec<usize>, Vec<Decoded<T>>);

impl<T: Grouped> Seen<T> {
    /// What `current` changed since the snapshot before: the addresses of the objects
    /// gone and the objects new (in order when it can, else by hashing). The caller
    /// [`Seen::forget`]s the one and [`Seen::hold`]s the other.
    pub(crate) fn changes(&mut self, current: &[Decoded<T>]) -> Changes<T> {
        match self.changed_in_order(current) {
            Some(changes) => changes,
            None => self.changed(current),
        }
    }

    /// Takes out the object at `address`, gone from the snapshot.
    pub(crate) fn forget(&mut self, address: usize) -> Option<Decoded<T>> {
        self.by_address.remove(&address)
    }

    /// Keeps `object`, new in the snapshot.
    pub(crate) fn hold(&mut self, object: Decoded<T>) {
        self.by_address.insert(object.address(), object);
    }

    /// The changes of `current`, found by comparing it with the last snapshot in order:
    /// after the places both begin and end with, place by place when as many objects
    /// are left on both sides, else all that are left. `None` unless the last snapshot
    /// had its order recorded, and when an object is now in two places.
    fn changed_in_order(&mut self, current: &[Decoded<T>]) -> Option<Changes<T>> {
        let order = self.order.as_mut()?;
        let same = |(was, object): (&usize, &Decoded<T>)| *was == object.address();
        let head = order.iter().zip(current).take_while(|p| same(*p)).count();
        let tail = order[head..]
            .iter()
            .rev()
            .zip(current[head..].iter().rev())
            .take_while(|p| same(*p))
            .count();
        let between = head..order.len() - tail;
        let new = &current[head..current.len() - tail];
        let (olds, news): (Vec<usize>, Vec<&Decoded<T>>) = if between.len() == new.len() {
            order[between.clone()]
                .iter()
                .zip(new)
                .filter(|p| !same(*p))
                .map(|(was, object)| (*was, object))
                .unzip()
        } else {
            (order[between.clone()].to_vec(), new.iter().collect())
        };
        let was: Addresses = olds.into_iter().collect();
        let mut now = Addresses::default();
        for object in &news {
            let at = object.address();
            // Held before but not among the places compared: it is also in another place.
            if !now.insert(at) || (self.by_address.contains_key(&at) && !was.contains(&at)) {
                return None;
            }
        }
        let gone = was.iter().filter(|at| !now.contains(at)).copied().collect();
        let added = news
            .into_iter()
            .filter(|object| !was.contains(&object.address()))
            .cloned()
            .collect();
        order.splice(between, new.iter().map(Decoded::address));
        Some((gone, added))
    }

    /// The changes of `current`, found by hashing every address; records the order for
    /// the next snapshot when no object is in two places.
    fn changed(&mut self, current: &[Decoded<T>]) -> Changes<T> {
        let mut present = Addresses::with_capacity_and_hasher(current.len(), Default::default());
        let mut added = Vec::new();
        for object in current {
            let at = object.address();
            if present.insert(at) && !self.by_address.contains_key(&at) {
                added.push(object.clone());
            }
        }
        self.order = (present.len() == current.len())
            .then(|| current.iter().map(Decoded::address).collect());
        // Every present object was seen; when as many were seen, none is gone.
        if added.is_empty() && present.len() == self.by_address.len() {
            return (Vec::new(), added);
        }
        let gone = self
            .by_address
            .keys()
            .filter(|at| !present.contains(*at))
            .copied()
            .collect();
        (gone, added)
    }
}

/// Hashes an object's address: addresses are distinct and aligned, so dropping the
/// always-zero low bits and multiplying spreads them well, at a fraction of SipHash's
/// cost (every sync hashes the address of every object in the snapshot, twice).
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 << 8 | u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, address: usize) {
        let spread = (address as u64 >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = spread ^ (spread >> 32);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Snapshot;
    use crate::service::ServiceInfo;

    fn services(names: &[&str]) -> Vec<Decoded<ServiceInfo>> {
        let mut snapshot = Snapshot::default();
        for name in names {
            let yaml = format!(
                "kind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
                 spec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n"
            );
            let report = snapshot.add_manifest("t", &yaml);
            assert!(report.errors.is_empty());
        }
        snapshot.services
    }

    /// Takes in `current`; the names of the objects gone and new.
    fn step(
        seen: &mut Seen<ServiceInfo>,
        current: &[Decoded<ServiceInfo>],
    ) -> (Vec<String>, Vec<String>) {
        let (gone, added) = seen.changes(current);
        let mut gone: Vec<String> = gone
            .into_iter()
            .filter_map(|at| seen.forget(at))
            .map(|o| o.name().to_owned())
            .collect();
        let mut new: Vec<String> = added.iter().map(|o| o.name().to_owned()).collect();
        added.into_iter().for_each(|o| seen.hold(o));
        gone.sort();
        new.sort();
        let mut held: Vec<usize> = seen.by_address.keys().copied().collect();
        let mut want: Vec<usize> = current.iter().map(Decoded::address).collect();
        held.sort_unstable();
        want.sort_unstable();
        want.dedup();
        assert_eq!(held, want, "held exactly the snapshot's objects");
        (gone, new)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn new_and_gone_objects_are_found_by_identity() {
        let mut seen = Seen::default();
        let first = services(&["a", "b", "c", "d"]);
        assert_eq!(
            step(&mut seen, &first),
            (vec![], names(&["a", "b", "c", "d"]))
        );
        // The same objects again: nothing, found in order.
        assert!(seen.order.is_some());
        assert_eq!(step(&mut seen, &first.clone()), (vec![], vec![]));
        // b decoded anew (an update) in its place; d gone; e appended.
        let renewed = services(&["b", "e"]);
        let next = vec![
            first[0].clone(),
            renewed[0].clone(),
            first[2].clone(),
            renewed[1].clone(),
        ];
        assert_eq!(
            step(&mut seen, &next),
            (names(&["b", "d"]), names(&["b", "e"]))
        );
        // Reordered: nothing changed.
        let mut reordered = next.clone();
        reordered.reverse();
        assert_eq!(step(&mut seen, &reordered), (vec![], vec![]));
        // An equal object decoded again is a change: identity, not content.
        let again = services(&["a"]);
        let swapped = vec![
            again[0].clone(),
            next[1].clone(),
            next[2].clone(),
            next[3].clone(),
        ];
        assert_eq!(step(&mut seen, &swapped), (names(&["a"]), names(&["a"])));
    }

    #[test]
    fn an_object_in_two_places_is_counted_once_and_order_is_not_trusted() {
        let mut seen = Seen::default();
        let objects = services(&["a", "b"]);
        let twice = vec![objects[0].clone(), objects[1].clone(), objects[0].clone()];
        assert_eq!(step(&mut seen, &twice), (vec![], names(&["a", "b"])));
        assert!(seen.order.is_none());
        assert_eq!(step(&mut seen, &objects), (vec![], vec![]));
        assert!(seen.order.is_some());
        // In two places after an in-order snapshot: detected, and nothing is lost.
        assert_eq!(step(&mut seen, &twice), (vec![], vec![]));
        assert_eq!(step(&mut seen, &objects[..1]), (names(&["b"]), vec![]));
    }
}
