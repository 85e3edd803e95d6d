//! Findings (`vigil_model::finding::Finding`: one difference from the baseline,
//! or its end) and the memory that reports each difference once: a location's value reported is not
//! reported again, and a location back at its baseline value gives one
//! "restored" finding.

use std::collections::{HashMap, VecDeque};

pub use vigil_model::finding::Finding;
use vigil_model::{Priority, Rule};
use vigil_vmm::symbols::SymbolTable;

use crate::paging::WalkError;

/// A symbol names an address only up to this far past its start; further than
/// that (module space, with only the kernel's map) the address has no symbol.
pub const MAX_SYMBOL_OFFSET: u64 = 1 << 20;
/// How many distinct new values of one location are remembered as reported.
pub(super) const REMEMBERED_VALUES: usize = 16;

/// Names addresses with the kernel's symbols (link-time addresses, moved by the
/// slide).
pub(super) struct Symbolizer<'a> {
    pub(super) map: Option<&'a SymbolTable>,
    pub(super) slide: i64,
}

impl Symbolizer<'_> {
    pub(super) fn name(&self, addr: u64) -> Option<String> {
        let (name, off) = self.map?.lookup(addr.wrapping_sub(self.slide as u64))?;
        (off <= MAX_SYMBOL_OFFSET).then(|| format!("{name}+{off:#x}"))
    }
}

/// A location under watch: rule, vCPU, where.
pub(super) type Key = (Rule, Option<u32>, String);

/// The values reported for one location, most recent last.
#[derive(Debug, Default)]
pub(super) struct Reported {
    pub(super) values: VecDeque<String>,
}

/// A location reported and not restored since, with the values reported (most
/// recent last): what a checker that goes on elsewhere (a snapshot restored, a
/// migrated VM) needs so as not to report them again
/// ([`super::Checker::reported`], [`super::Checker::resume`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedLocation {
    pub rule: Rule,
    pub vcpu: Option<u32>,
    pub location: String,
    pub values: Vec<String>,
}

/// One check's findings and the memory of what was reported.
pub(super) struct Round<'a> {
    pub(super) out: Vec<Finding>,
    pub(super) reported: &'a mut HashMap<Key, Reported>,
}

impl Round<'_> {
    /// A location that differs from its baseline: reported unless this value was.
    pub(super) fn differs(&mut self, f: Finding) {
        let r = self
            .reported
            .entry((f.rule, f.vcpu, f.location.clone()))
            .or_default();
        if r.values.contains(&f.to) {
            // Reported already; keep it the most recent.
            r.values.retain(|v| v != &f.to);
            r.values.push_back(f.to);
            return;
        }
        if r.values.len() == REMEMBERED_VALUES {
            r.values.pop_front();
        }
        r.values.push_back(f.to.clone());
        self.out.push(f);
    }

    /// A location at its baseline value `baseline`: if a difference was reported,
    /// one "restored" finding. `location` is only built when something was
    /// reported.
    pub(super) fn same(
        &mut self,
        rule: Rule,
        vcpu: Option<u32>,
        location: impl FnOnce() -> String,
        baseline: impl FnOnce() -> String,
    ) {
        if self.reported.is_empty() {
            return;
        }
        let key = (rule, vcpu, location());
        let Some(r) = self.reported.remove(&key) else {
            return;
        };
        if rule == Rule::IntegrityReadFailed {
            return;
        }
        let (rule, vcpu, location) = key;
        let from = r.values.back().cloned().unwrap_or_default();
        let to = baseline();
        let who = vcpu.map(|v| format!("vCPU {v}: ")).unwrap_or_default();
        self.out.push(Finding {
            rule,
            priority: Priority::Notice,
            mitre: rule.mitre(),
            vcpu,
            message: format!("{who}{location} is back at its baseline value {to} (was {from})"),
            location,
            from,
            to,
            from_symbol: None,
            symbol: None,
            restored: true,
        });
    }

    pub(super) fn read_failed(&mut self, vcpu: Option<u32>, location: String, error: &WalkError) {
        let who = vcpu.map(|v| format!("vCPU {v}: ")).unwrap_or_default();
        self.differs(finding(
            Rule::IntegrityReadFailed,
            vcpu,
            location.clone(),
            "readable".into(),
            "unreadable".into(),
            None,
            None,
            format!("{who}{location} cannot be read for the integrity check: {error}"),
        ));
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn finding(
    rule: Rule,
    vcpu: Option<u32>,
    location: String,
    from: String,
    to: String,
    from_symbol: Option<String>,
    symbol: Option<String>,
    message: String,
) -> Finding {
    Finding {
        rule,
        priority: rule.default_priority(),
        mitre: rule.mitre(),
        vcpu,
        location,
        from,
        to,
        from_symbol,
        symbol,
        restored: false,
        message,
    }
}

pub(super) fn with_sym(addr: u64, sym: &Option<String>) -> String {
    match sym {
        Some(s) => format!("{addr:#x} ({s})"),
        None => format!("{addr:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_introspection_rule_has_a_readme_row() {
        let readme = include_str!("../../README.md");
        for r in Rule::ALL.into_iter().filter(|r| r.is_introspection()) {
            assert!(
                readme.contains(&format!("`{}`", r.as_str())),
                "README lacks {}",
                r.as_str()
            );
            if let Some(m) = r.mitre() {
                assert!(readme.contains(m.technique));
            }
        }
    }
}
