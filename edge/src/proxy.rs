//! The edge's way to the master: every call for a module the edge does not run goes over
//! its link (the master runs it, or passes it on to the edge that does). And where a client
//! of this edge's systems would do better to go while the master controls them.

use std::sync::{Arc, Mutex};

use tether_common::link::Link;
use tether_common::protocol::ControlOwner;
use tether_common::proxy::Links;
use tether_common::runtime::ExecError;

use crate::control::EdgeControl;
use crate::replica::Replica;

/// The edge's link to the master, as it comes and goes.
pub struct EdgeLinks {
    link: Mutex<Option<Link>>,
    master_api: Mutex<Option<String>>,
    control: EdgeControl,
    replica: Arc<Replica>,
}

/// The `via` of calls that came from the master.
pub const FROM_MASTER: &str = "master";

impl EdgeLinks {
    /// No link yet.
    pub fn new(control: EdgeControl, replica: Arc<Replica>) -> Self {
        EdgeLinks {
            link: Mutex::new(None),
            master_api: Mutex::new(None),
            control,
            replica,
        }
    }

    /// The current link to the master (or none).
    pub fn set_link(&self, link: Option<Link>) {
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = link;
    }

    /// Records the master's API address as it announced it.
    pub fn set_master_api(&self, url: String) {
        *self.master_api.lock().unwrap_or_else(|p| p.into_inner()) = Some(url);
    }
}

impl Links for EdgeLinks {
    fn link_to(&self, _edge: Option<&str>, via: Option<&str>) -> Result<Link, ExecError> {
        if via == Some(FROM_MASTER) {
            // The master sent a call for a module it thinks this edge runs; sending it
            // back would loop.
            return Err(ExecError::NotHere(
                "the master sent a call for a module this edge does not run now (control is changing hands)"
                    .into(),
            ));
        }
        self.link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|link| !link.is_closed())
            .ok_or_else(|| {
                ExecError::Unavailable(
                    "the master runs the module and is unreachable: the link is down".into(),
                )
            })
    }

    fn preferred_server(&self, system: &str) -> Option<String> {
        // The replica holds this edge's systems only, and the master controls them all
        // or none; any other system is the master's.
        let ours = self.replica.snapshot().0.systems.contains_key(system);
        if ours && self.control.view().state.owner != ControlOwner::Master {
            return None;
        }
        self.master_api
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn holds_every_system(&self) -> bool {
        true
    }
}
