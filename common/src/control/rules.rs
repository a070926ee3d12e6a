//! The negotiation rules of DESIGN.md ("Control"), as one pure function: what the master
//! decides when an edge connects (and reports whether it is controlling).

use super::Owner;

/// What the master knows when an edge has connected and reported its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Situation {
    /// The edge reports its modules loaded and running (it is controlling).
    pub edge_controlling: bool,
    /// The edge's restore window is open now.
    pub window_open: bool,
    /// The master has not finished booting (it has not loaded this edge's modules).
    pub master_loading: bool,
    /// The master is running this edge's modules.
    pub master_running: bool,
}

/// The rule that decided, in DESIGN.md's order; its text is the audit reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// 1: the edge is controlling.
    EdgeControlling,
    /// 2: the restore window is open.
    WindowOpen,
    /// 3: the master is still loading.
    MasterLoading,
    /// 4: the master is running the edge's modules.
    MasterRunning,
    /// 5: otherwise the edge (the master only wins when it already has control).
    Otherwise,
}

impl Rule {
    /// Why, in words, for logs and the audit log.
    pub fn reason(self) -> &'static str {
        match self {
            Rule::EdgeControlling => "rule 1: the edge connected while controlling",
            Rule::WindowOpen => "rule 2: the edge connected inside its restore window",
            Rule::MasterLoading => "rule 3: the edge connected while the master was loading",
            Rule::MasterRunning => "rule 4: the master is running the edge's modules",
            Rule::Otherwise => "rule 5: the edge connected and the master was not in control",
        }
    }
}

/// Decides the owner of an edge's modules; the first rule that applies wins.
pub fn negotiate(situation: Situation) -> (Owner, Rule) {
    if situation.edge_controlling {
        (Owner::Edge, Rule::EdgeControlling)
    } else if situation.window_open {
        (Owner::Edge, Rule::WindowOpen)
    } else if situation.master_loading {
        (Owner::Edge, Rule::MasterLoading)
    } else if situation.master_running {
        (Owner::Master, Rule::MasterRunning)
    } else {
        (Owner::Edge, Rule::Otherwise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every combination of the four inputs, written out with the owner and rule expected:
    /// the table a reader checks against DESIGN.md.
    #[test]
    fn every_combination_has_its_expected_owner() {
        use Owner::{Edge, Master};
        use Rule::*;
        // (edge_controlling, window_open, master_loading, master_running) => owner, rule
        let table = [
            ((false, false, false, false), Edge, Otherwise),
            ((false, false, false, true), Master, MasterRunning),
            ((false, false, true, false), Edge, MasterLoading),
            ((false, false, true, true), Edge, MasterLoading),
            ((false, true, false, false), Edge, WindowOpen),
            ((false, true, false, true), Edge, WindowOpen),
            ((false, true, true, false), Edge, WindowOpen),
            ((false, true, true, true), Edge, WindowOpen),
            ((true, false, false, false), Edge, EdgeControlling),
            ((true, false, false, true), Edge, EdgeControlling),
            ((true, false, true, false), Edge, EdgeControlling),
            ((true, false, true, true), Edge, EdgeControlling),
            ((true, true, false, false), Edge, EdgeControlling),
            ((true, true, false, true), Edge, EdgeControlling),
            ((true, true, true, false), Edge, EdgeControlling),
            ((true, true, true, true), Edge, EdgeControlling),
        ];
        assert_eq!(table.len(), 16);
        for ((edge_controlling, window_open, master_loading, master_running), owner, rule) in table
        {
            let situation = Situation {
                edge_controlling,
                window_open,
                master_loading,
                master_running,
            };
            assert_eq!(negotiate(situation), (owner, rule), "{situation:?}");
        }
    }

    #[test]
    fn the_master_wins_only_when_it_already_runs_the_modules() {
        for bits in 0..16u8 {
            let situation = Situation {
                edge_controlling: bits & 1 != 0,
                window_open: bits & 2 != 0,
                master_loading: bits & 4 != 0,
                master_running: bits & 8 != 0,
            };
            if negotiate(situation).0 == Owner::Master {
                assert!(situation.master_running && !situation.edge_controlling);
            }
        }
    }
}
