//! The adaptive migration policy: from the host's pressure, sampled every
//! `--sample-interval`, whether to move a VM away, which, where and how.
//!
//! A sample is hot when the host's CPU or memory PSI (`some avg10`) is above its
//! threshold. A hotspot is `hits` hot samples of the last `window`, and the
//! short prediction (the trend of the last three samples, one interval ahead)
//! must still be hot, so a spike that is already fading moves nothing. Then the
//! VM cheapest to move goes (the predicted total time from its memory and dirty
//! rate, as the VM's metrics measure it, at the assumed link speed), to the
//! next peer daemon in turn, by pre-copy when the rounds are predicted to
//! converge within the downtime target, with auto-converge when the guest
//! dirties less than the link carries, else by post-copy. After a decision the policy waits `cooldown`. Every
//! decision, acted on or not (`--migrate-dry-run`), is a `policy_action` event
//! with its reasons and predicted costs.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use vigil_events::HostSample;

/// Another daemon VMs may go to: its TCP API and bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDaemon {
    pub addr: String,
    pub token: String,
}

/// `--migrate-*`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySettings {
    pub peers: Vec<PeerDaemon>,
    /// Host CPU PSI `some avg10` (%) above which a sample is hot.
    pub cpu_pressure: f64,
    /// Host memory PSI `some avg10` (%) above which a sample is hot.
    pub memory_pressure: f64,
    /// Samples looked at.
    pub window: usize,
    /// Hot samples among them that make a hotspot.
    pub hits: usize,
    /// Decide and report, do not move anything.
    pub dry_run: bool,
    /// Bytes per second the link to a peer is assumed to carry.
    pub link_bytes_per_s: f64,
    /// The downtime target of the migrations it starts.
    pub downtime: Duration,
    /// How long after a decision the next may come.
    pub cooldown: Duration,
}

impl PolicySettings {
    /// The defaults, with these peers.
    pub fn with_peers(peers: Vec<PeerDaemon>) -> Self {
        Self {
            peers,
            cpu_pressure: 50.0,
            memory_pressure: 20.0,
            window: 6,
            hits: 4,
            dry_run: false,
            link_bytes_per_s: 1e9,
            downtime: Duration::from_millis(100),
            cooldown: Duration::from_secs(60),
        }
    }
}

/// A VM that could move.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: String,
    pub memory_bytes: u64,
    /// Bytes of guest memory written per second (0 when not measured).
    pub dirty_bytes_per_s: f64,
}

/// How a migration is expected to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Plain pre-copy converges within the downtime target.
    PreCopy,
    /// The guest dirties memory too fast: slow its vCPUs as rounds go.
    AutoConverge,
    /// The guest dirties memory faster than the link carries: throttling it
    /// enough would nearly stop it, so it moves at once and its pages follow.
    PostCopy,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::PreCopy => "pre-copy",
            Method::AutoConverge => "auto-converge",
            Method::PostCopy => "post-copy",
        }
    }

    /// What the VM is told.
    pub fn migration_method(self) -> vigil_model::migration::MigrationMethod {
        use vigil_model::migration::MigrationMethod;
        match self {
            Method::PreCopy | Method::AutoConverge => MigrationMethod::Precopy,
            Method::PostCopy => MigrationMethod::Postcopy,
        }
    }
}

/// The predicted cost of moving one VM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub method: Method,
    pub rounds: u32,
    pub bytes: f64,
    pub total: Duration,
    pub downtime: Duration,
}

/// Rounds pre-copy may take before it counts as not converging.
const MAX_ROUNDS: u32 = 30;

/// Pre-copy as a geometric series: each round sends what the last dirtied
/// (`memory * q^n` with `q = dirty / link`), until the rest fits the downtime.
pub fn plan(memory: f64, dirty: f64, link: f64, downtime: Duration) -> Plan {
    let fits = link * downtime.as_secs_f64();
    let (mut method, mut rounds) = (Method::PreCopy, series(memory, dirty / link, fits));
    if rounds.2 > fits && dirty >= link {
        // Every page once, after a pause for the state alone (not counted).
        return Plan {
            method: Method::PostCopy,
            rounds: 0,
            bytes: memory,
            total: Duration::from_secs_f64(memory / link),
            downtime: Duration::ZERO,
        };
    }
    if rounds.2 > fits {
        // Auto-converge holds the guest until it dirties at most half the link:
        // the rounds go as if at q = 1/2, and the pause meets the target.
        method = Method::AutoConverge;
        rounds = series(memory, 0.5, fits);
    }
    let (rounds, before, left) = rounds;
    Plan {
        method,
        rounds,
        bytes: before + left,
        total: Duration::from_secs_f64((before + left) / link),
        downtime: Duration::from_secs_f64(left / link),
    }
}

/// Rounds at ratio `q` until what is left fits (at most [`MAX_ROUNDS`]): how
/// many, the bytes they send, and what is left for the pause.
fn series(memory: f64, q: f64, fits: f64) -> (u32, f64, f64) {
    let (mut rounds, mut sent, mut left) = (0, 0.0, memory);
    while left > fits && rounds < MAX_ROUNDS {
        sent += left;
        left *= q;
        rounds += 1;
    }
    (rounds, sent, left)
}

/// One decision: move `vm` to `to`, as `plan` predicts, for `reasons`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub vm: String,
    pub to: PeerDaemon,
    pub plan: Plan,
    pub reasons: Vec<String>,
    /// The rule whose pressure made the hotspot.
    pub trigger: vigil_events::Rule,
}

/// The policy's memory: recent samples, the last decision, the next peer.
pub struct Policy {
    settings: PolicySettings,
    /// (hot, pressure relative to its threshold: 1.0 is the threshold).
    recent: VecDeque<(bool, f64, vigil_events::Rule)>,
    last: Option<Instant>,
    next_peer: usize,
}

impl Policy {
    pub fn new(settings: PolicySettings) -> Self {
        Self {
            settings,
            recent: VecDeque::new(),
            last: None,
            next_peer: 0,
        }
    }

    pub fn settings(&self) -> &PolicySettings {
        &self.settings
    }

    /// Takes one sample; a decision when a VM should move now.
    pub fn observe(
        &mut self,
        now: Instant,
        host: &HostSample,
        vms: &[Candidate],
    ) -> Option<Decision> {
        use vigil_events::Rule;
        let s = &self.settings;
        let cpu = host.psi_cpu_some_avg10.unwrap_or(0.0) / s.cpu_pressure;
        let memory = host.psi_memory_some_avg10.unwrap_or(0.0) / s.memory_pressure;
        let (level, rule) = if memory >= cpu {
            (memory, Rule::HostMemoryPressure)
        } else {
            (cpu, Rule::HostCpuPressure)
        };
        self.recent.push_back((level > 1.0, level, rule));
        while self.recent.len() > s.window {
            self.recent.pop_front();
        }
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < s.cooldown)
        {
            return None;
        }
        let hot = self.recent.iter().filter(|(h, _, _)| *h).count();
        if self.recent.len() < s.window || hot < s.hits {
            return None;
        }
        // The trend of the last three samples, one interval ahead.
        let last: Vec<f64> = self.recent.iter().rev().take(3).map(|r| r.1).collect();
        let slope = (last[0] - last[last.len() - 1]) / (last.len() - 1).max(1) as f64;
        let predicted = last[0] + slope;
        if predicted <= 1.0 {
            return None;
        }
        if s.peers.is_empty() {
            return None;
        }
        let (vm, plan) = vms
            .iter()
            .map(|v| {
                let p = plan(
                    v.memory_bytes as f64,
                    v.dirty_bytes_per_s,
                    s.link_bytes_per_s,
                    s.downtime,
                );
                (v, p)
            })
            .min_by(|a, b| a.1.total.cmp(&b.1.total))?;
        let to = s.peers[self.next_peer % s.peers.len()].clone();
        let (what, threshold, value) = match rule {
            Rule::HostMemoryPressure => ("memory", s.memory_pressure, host.psi_memory_some_avg10),
            _ => ("CPU", s.cpu_pressure, host.psi_cpu_some_avg10),
        };
        let reasons = vec![
            format!(
                "host {what} pressure {:.1}% (threshold {threshold}%) in {hot} of the last {} samples",
                value.unwrap_or(0.0),
                s.window
            ),
            format!("the trend predicts {:.1}% next", predicted * threshold),
            format!(
                "{} is the cheapest of {} VMs to move: {} MiB, {:.0} MiB/s dirtied",
                vm.id,
                vms.len(),
                vm.memory_bytes >> 20,
                vm.dirty_bytes_per_s / (1u64 << 20) as f64
            ),
        ];
        self.last = Some(now);
        self.next_peer += 1;
        Some(Decision {
            vm: vm.id.clone(),
            to,
            plan,
            reasons,
            trigger: rule,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(cpu: f64) -> HostSample {
        HostSample {
            at: vigil_events::Timestamp::now(),
            psi_cpu_some_avg10: Some(cpu),
            psi_memory_some_avg10: Some(0.0),
            psi_io_some_avg10: None,
        }
    }

    fn vms() -> Vec<Candidate> {
        vec![
            Candidate {
                id: "big".into(),
                memory_bytes: 4 << 30,
                dirty_bytes_per_s: 0.0,
            },
            Candidate {
                id: "small".into(),
                memory_bytes: 256 << 20,
                dirty_bytes_per_s: 0.0,
            },
        ]
    }

    fn policy() -> Policy {
        Policy::new(PolicySettings::with_peers(vec![PeerDaemon {
            addr: "10.0.0.2:7070".into(),
            token: "t".into(),
        }]))
    }

    /// Feeds `cpu` readings one second apart; the decisions made.
    fn feed(p: &mut Policy, start: Instant, cpu: &[f64]) -> Vec<(usize, Decision)> {
        cpu.iter()
            .enumerate()
            .filter_map(|(i, &c)| {
                p.observe(start + Duration::from_secs(i as u64), &host(c), &vms())
                    .map(|d| (i, d))
            })
            .collect()
    }

    #[test]
    fn a_spike_moves_nothing_a_lasting_hotspot_moves_the_cheapest_vm() {
        let start = Instant::now();
        let mut p = policy();
        // Two hot samples of six: no hotspot.
        assert!(feed(&mut p, start, &[10.0, 90.0, 95.0, 10.0, 10.0, 10.0, 10.0]).is_empty());
        // Four of six, rising: the fourth hot sample decides.
        let mut p = policy();
        let d = feed(&mut p, start, &[10.0, 10.0, 60.0, 70.0, 80.0, 90.0, 95.0]);
        assert_eq!(d.len(), 1, "{d:?}");
        let (at, decision) = &d[0];
        assert_eq!(*at, 5);
        assert_eq!(decision.vm, "small");
        assert_eq!(decision.to.addr, "10.0.0.2:7070");
        assert_eq!(decision.trigger, vigil_events::Rule::HostCpuPressure);
        assert_eq!(decision.plan.method, Method::PreCopy);
        assert!(
            decision.reasons[0].contains("in 4 of the last 6 samples"),
            "{:?}",
            decision.reasons
        );
    }

    #[test]
    fn a_fading_hotspot_moves_nothing_and_a_decision_waits_out_its_cooldown() {
        let start = Instant::now();
        let mut p = policy();
        // Hot four times, but falling fast: the trend predicts it cools.
        assert!(feed(&mut p, start, &[10.0, 10.0, 99.0, 80.0, 60.0, 51.0, 10.0]).is_empty());
        // Lasting: one decision, then none during the cooldown.
        let mut p = policy();
        let hot = [90.0; 40];
        let d = feed(&mut p, start, &hot);
        assert_eq!(d.len(), 1, "{d:?}");
    }

    #[test]
    fn plans_converge_or_need_auto_converge_or_postcopy() {
        let link = 1e9;
        let idle = plan(1e9, 0.0, link, Duration::from_millis(100));
        assert_eq!(idle.method, Method::PreCopy);
        assert_eq!(idle.rounds, 1);
        assert!(idle.downtime <= Duration::from_millis(100));
        let busy = plan(1e9, 0.5e9, link, Duration::from_millis(100));
        assert_eq!(busy.method, Method::PreCopy);
        assert!(busy.rounds > 1 && busy.total > idle.total);
        let warm = plan(1e9, 0.95e9, link, Duration::from_millis(100));
        assert_eq!(warm.method, Method::AutoConverge);
        assert!(warm.downtime <= Duration::from_millis(100));
        let hot = plan(1e9, 2e9, link, Duration::from_millis(100));
        assert_eq!(hot.method, Method::PostCopy);
        assert_eq!(hot.bytes, 1e9, "every page once");
    }
}
