//! What a Kubernetes watch has delivered, kept by key and converted to what a feed needs of each
//! object. The initial list, and every re-list after a broken watch, is built aside and swapped
//! in whole when it completes, so a reader never sees half a list. Used by the agent's mesh
//! membership (pods, Services, EndpointSlices, by UID) and policy feed (the policy resources).

use std::collections::BTreeMap;

use kube::runtime::watcher::Event;
use tracing::info;

#[derive(Debug)]
pub struct Listed<K, T> {
    /// Whether the initial list has completed.
    pub synced: bool,
    pub items: BTreeMap<K, T>,
    /// A re-list in progress.
    relisting: Option<BTreeMap<K, T>>,
}

impl<K, T> Default for Listed<K, T> {
    fn default() -> Self {
        Listed {
            synced: false,
            items: BTreeMap::new(),
            relisting: None,
        }
    }
}

impl<K: Ord, T: PartialEq> Listed<K, T> {
    /// Follows one watch event: `key` names an object (`None`: it cannot be kept, and is
    /// ignored), `convert` gives what is kept of it (`None`: nothing, and whatever was kept under
    /// its key goes). Returns whether the items may have changed: most updates of an object
    /// change nothing that is kept.
    pub fn apply_event<O>(
        &mut self,
        event: Event<O>,
        key: impl Fn(&O) -> Option<K>,
        convert: impl Fn(&O) -> Option<T>,
    ) -> bool {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                if let Some(items) = self.relisting.as_mut() {
                    record(items, key(&object), convert(&object));
                }
                false
            }
            Event::InitDone => match self.relisting.take() {
                Some(items) => {
                    self.items = items;
                    self.synced = true;
                    true
                }
                None => false,
            },
            Event::Apply(object) => record(&mut self.items, key(&object), convert(&object)),
            Event::Delete(object) => {
                key(&object).is_some_and(|key| self.items.remove(&key).is_some())
            }
        }
    }

    /// The resource turned out not to be served: nothing of it exists, which is a complete list.
    /// Returns whether that changed anything.
    pub fn set_empty_and_synced(&mut self) -> bool {
        self.relisting = None;
        let changed = !self.synced || !self.items.is_empty();
        self.synced = true;
        self.items.clear();
        changed
    }
}

/// Objects kept by UID.
impl<T: PartialEq> Listed<String, T> {
    /// Follows one watch event, with `convert` giving an object's contribution (`None`: none),
    /// logging when `what` (the objects, in the log) has synced; returns whether the items may
    /// have changed.
    pub fn on_event<O: kube::Resource>(
        &mut self,
        event: Event<O>,
        what: &str,
        convert: impl Fn(&O) -> Option<T>,
    ) -> bool {
        let listing_done = matches!(event, Event::InitDone);
        let changed = self.apply_event(event, |object| object.meta().uid.clone(), convert);
        if listing_done && changed {
            info!(count = self.items.len(), "{what} synced");
        }
        changed
    }
}

/// Records what an object contributes now under its key; returns whether that differs from
/// before.
fn record<K: Ord, T: PartialEq>(
    items: &mut BTreeMap<K, T>,
    key: Option<K>,
    contribution: Option<T>,
) -> bool {
    let Some(key) = key else {
        return false;
    };
    match contribution {
        Some(contribution) => {
            let unchanged = items.get(&key) == Some(&contribution);
            items.insert(key, contribution);
            !unchanged
        }
        None => items.remove(&key).is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Item = (&'static str, Option<u32>);

    fn apply(listed: &mut Listed<&'static str, u32>, event: Event<Item>) -> bool {
        listed.apply_event(event, |(key, _)| Some(*key), |(_, value)| *value)
    }

    #[test]
    fn a_relist_is_swapped_in_whole_and_changes_are_reported_only_when_real() {
        let mut listed = Listed::default();
        assert!(!apply(&mut listed, Event::Init));
        assert!(!apply(&mut listed, Event::InitApply(("a", Some(1)))));
        assert!(!apply(&mut listed, Event::InitApply(("b", None))));
        assert!(
            !listed.synced && listed.items.is_empty(),
            "half a list is not shown"
        );
        assert!(apply(&mut listed, Event::InitDone));
        assert!(listed.synced);
        assert_eq!(listed.items, BTreeMap::from([("a", 1)]));

        assert!(
            !apply(&mut listed, Event::Apply(("a", Some(1)))),
            "no change"
        );
        assert!(apply(&mut listed, Event::Apply(("a", Some(2)))));
        assert!(
            apply(&mut listed, Event::Apply(("a", None))),
            "nothing kept any more"
        );
        assert!(!apply(&mut listed, Event::Delete(("a", None))));
        assert!(apply(&mut listed, Event::Apply(("c", Some(3)))));

        // A re-list: the old items stay until it completes, then only what it listed remains.
        assert!(!apply(&mut listed, Event::Init));
        assert!(!apply(&mut listed, Event::InitApply(("d", Some(4)))));
        assert_eq!(listed.items, BTreeMap::from([("c", 3)]));
        assert!(apply(&mut listed, Event::InitDone));
        assert_eq!(listed.items, BTreeMap::from([("d", 4)]));
        assert!(
            !apply(&mut listed, Event::InitDone),
            "no re-list in progress"
        );

        assert!(listed.set_empty_and_synced());
        assert!(listed.items.is_empty() && listed.synced);
        assert!(!listed.set_empty_and_synced(), "already empty");
    }
}
