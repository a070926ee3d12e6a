//! The identities Tether's decisions are about, as types rather than strings and numbers:
//! an edge location ([`EdgeId`]), a master among several ([`MasterId`]), the unit a grant
//! is about ([`UnitId`]: an edge's modules, or in a cluster a system of no edge) and the
//! epoch of a grant ([`Epoch`]). A function that takes an `EdgeId` cannot be handed a module id or
//! `"edge:ID"` by mistake, and an epoch can be raised only by [`Epoch::next`], the one
//! step a compare-and-set on the stored grant takes.
//!
//! Each is `serde(transparent)`: on the wire, in redb and etcd, and in the API, it is the
//! plain string or number it always was.

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The epoch of a grant: raised on every change of who runs a location's modules, so
/// anything carrying an older one is refused. Epoch 0 is a new location's, held by its
/// edge.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// A new location's epoch.
    pub const ZERO: Epoch = Epoch(0);

    /// The epoch of the grant that supersedes one of this epoch.
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }

    /// The number, for metrics and headers.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<Epoch> for serde_json::Value {
    fn from(epoch: Epoch) -> serde_json::Value {
        epoch.0.into()
    }
}

/// Declares a string identity: cheap to compare and hash, looked up by `&str` in maps
/// (through `Borrow<str>`), shown as the bare id.
macro_rules! string_identity {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The id as configured.
            pub fn new(id: impl Into<String>) -> $name {
                $name(id.into())
            }

            /// The id as a string, for keys, paths and messages.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        /// Reads as the string it is, wherever a `&str` is taken (keys, paths,
        /// messages); the other way, a string becomes this identity only by `new` or
        /// `From`, where the reader sees it.
        impl std::ops::Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> $name {
                $name(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> $name {
                $name(id.to_owned())
            }
        }

        impl From<$name> for serde_json::Value {
            fn from(id: $name) -> serde_json::Value {
                serde_json::Value::String(id.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

string_identity!(
    /// An edge location: the id of its edge record, its certificate's name and its
    /// link's identity. Its modules are what a grant is about.
    EdgeId
);

string_identity!(
    /// One edge server of a location with several (`nodes = ["site-1a", "site-1b"]`): the
    /// id of its secret, its certificate and its link. A location without `nodes` is one
    /// node with the location's id.
    NodeId
);

string_identity!(
    /// A master among several (`master_id` in `[cluster]`): the holder named in its
    /// grants, claims and link keys, and in `executed_by`.
    MasterId
);

string_identity!(
    /// What one grant is about and one master runs at a time: an edge location's
    /// modules (the unit is the edge's id), or, in a cluster, modules of no edge
    /// (`system:ID`, or `module:ID` for a module no system lists). Edge ids are DNS names,
    /// so they never hold the colon that sets the others apart.
    UnitId
);

impl UnitId {
    /// The unit of a system of no edge.
    pub fn system(id: &str) -> UnitId {
        UnitId(format!("system:{id}"))
    }

    /// The unit of a module of no edge that no system lists.
    pub fn module(id: &str) -> UnitId {
        UnitId(format!("module:{id}"))
    }

    /// The edge location this unit is, if it is one.
    pub fn edge(&self) -> Option<EdgeId> {
        (!self.0.contains(':')).then(|| EdgeId(self.0.clone()))
    }
}

impl From<EdgeId> for UnitId {
    fn from(edge: EdgeId) -> UnitId {
        UnitId(edge.0)
    }
}

impl From<&EdgeId> for UnitId {
    fn from(edge: &EdgeId) -> UnitId {
        UnitId(edge.0.clone())
    }
}

impl PartialEq<EdgeId> for UnitId {
    fn eq(&self, edge: &EdgeId) -> bool {
        self.0 == edge.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_keep_their_plain_form_on_the_wire_and_in_json() {
        let epoch = Epoch(7);
        assert_eq!(serde_json::to_string(&epoch).unwrap(), "7");
        assert_eq!(
            postcard::to_allocvec(&epoch).unwrap(),
            postcard::to_allocvec(&7u64).unwrap()
        );
        let edge = EdgeId::new("site-1");
        assert_eq!(serde_json::to_string(&edge).unwrap(), "\"site-1\"");
        assert_eq!(
            postcard::to_allocvec(&edge).unwrap(),
            postcard::to_allocvec("site-1").unwrap()
        );
        let back: MasterId = serde_json::from_str("\"m1\"").unwrap();
        assert_eq!(back, "m1");
    }

    #[test]
    fn an_epoch_only_moves_up_and_never_wraps() {
        assert_eq!(Epoch::ZERO.next(), Epoch(1));
        assert!(Epoch(2).next() > Epoch(2));
        assert_eq!(Epoch(u64::MAX).next(), Epoch(u64::MAX));
    }

    #[test]
    fn a_unit_is_an_edge_or_a_unit_of_no_edge() {
        let edge = EdgeId::new("site-1");
        assert_eq!(UnitId::from(&edge).edge(), Some(edge));
        assert_eq!(UnitId::system("hall").as_str(), "system:hall");
        assert_eq!(UnitId::system("hall").edge(), None);
        assert_eq!(UnitId::module("h2").edge(), None);
    }

    #[test]
    fn a_map_of_identities_is_looked_up_by_str() {
        let mut map = std::collections::HashMap::new();
        map.insert(EdgeId::new("site-1"), 1);
        assert_eq!(map.get("site-1"), Some(&1));
    }
}
