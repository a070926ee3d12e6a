//! Which link leads to a module the master does not run: its edge's, if that edge is
//! connected. And where a client of an edge-controlled system would do better to go.

use std::sync::Arc;

use tether_common::control::ControlState;
use tether_common::link::Link;
use tether_common::protocol::ControlOwner;
use tether_common::proxy::Links;
use tether_common::runtime::ExecError;

use crate::control::Control;
use crate::edges::EdgeRegistry;
use crate::model::ModelService;

/// The master's links to its edges, for proxying.
pub struct MasterLinks {
    /// The edges and their links.
    pub registry: Arc<EdgeRegistry>,
    /// Who controls each edge location.
    pub control: Control,
    /// The data model.
    pub model: Arc<ModelService>,
}

impl Links for MasterLinks {
    fn link_to(&self, edge: Option<&str>, via: Option<&str>) -> Result<Link, ExecError> {
        let Some(edge) = edge else {
            return Err(ExecError::Unavailable(
                "the module belongs to the master, which is not running it".into(),
            ));
        };
        if via == Some(edge) {
            // The edge asked for its own module, which it does not run; neither does the
            // master, or the runtime would have answered. Sending it back would loop.
            return Err(ExecError::NotHere(format!(
                "neither edge {edge} nor the master runs the module now (control is changing hands)"
            )));
        }
        if via.is_some() && self.registry.holder(edge).as_deref() == via {
            // The pair's holder asked for its own module: the same loop, through its node.
            return Err(ExecError::NotHere(format!(
                "neither node {} of edge {edge} nor the master runs the module now (control is changing hands)",
                via.unwrap_or_default()
            )));
        }
        self.registry.link(edge).ok_or_else(|| {
            ExecError::Unavailable(format!(
                "edge {edge} runs the module and is unreachable: its link is down"
            ))
        })
    }

    fn preferred_server(&self, system: &str) -> Option<String> {
        let (model, _) = self.model.snapshot();
        let edge = model.systems.get(system)?.edge.clone()?;
        match self.control.state(&edge) {
            Some(ControlState {
                owner: ControlOwner::Edge,
                ..
            })
            | None => self.registry.api_url(&edge),
            Some(_) => None,
        }
    }

    fn holds_every_system(&self) -> bool {
        false
    }
}
