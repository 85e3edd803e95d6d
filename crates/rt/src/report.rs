//! The analysis of a whole system as one report: each VM's interface and vCPU
//! parameters (as `vigil run` flags and as API bodies), their cores, and every "no"
//! explained with its numbers.

use std::fmt::Write;

use serde::Serialize;

use crate::compose::{place, Server};
use crate::demand::Witness;
use crate::interface::{find_interface, Interface, NoInterface};
use crate::model::{Scheduler, System, Vm};
use crate::time::{display_duration, format_duration, Nanos};

/// One vCPU's SCHED_DEADLINE parameters: the body of the API's per-vCPU request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VcpuSched {
    pub vcpu: u32,
    pub policy: &'static str,
    pub runtime_ns: Nanos,
    pub deadline_ns: Nanos,
    pub period_ns: Nanos,
}

impl VcpuSched {
    /// `--vcpu-sched vcpu=0,policy=deadline,runtime=2ms,deadline=10ms,period=10ms`.
    pub fn flag(&self) -> String {
        format!(
            "--vcpu-sched vcpu={},policy={},runtime={},deadline={},period={}",
            self.vcpu,
            self.policy,
            format_duration(self.runtime_ns),
            format_duration(self.deadline_ns),
            format_duration(self.period_ns)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InterfaceReport {
    pub period_ns: Nanos,
    pub budget_ns: Nanos,
    pub vcpus: u32,
    /// Θ/Π, in CPUs.
    pub bandwidth: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmReport {
    pub name: String,
    pub scheduler: Scheduler,
    pub tasks: usize,
    /// Σ C/T of its tasks.
    pub utilization: f64,
    pub schedulable: bool,
    pub interface: Option<InterfaceReport>,
    pub vcpu_sched: Vec<VcpuSched>,
    /// The host core of each vCPU, `null` where none is left.
    pub cores: Vec<Option<u32>>,
    pub flags: Vec<String>,
    pub explanation: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostReport {
    pub cores: u32,
    pub utilization_limit: f64,
    /// Σ runtime/period of every vCPU, and cores × limit, as the kernel's
    /// SCHED_DEADLINE admission computes them (2^-20 fixed point).
    pub total_bandwidth: f64,
    pub capacity: f64,
    pub core_load: Vec<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub schedulable: bool,
    pub host: HostReport,
    pub vms: Vec<VmReport>,
    /// Every reason the answer is no, one line each.
    pub problems: Vec<String>,
}

fn utilization(vm: &Vm) -> f64 {
    vm.tasks
        .iter()
        .map(|t| t.wcet as f64 / t.period as f64)
        .sum()
}

fn shown(t: u128) -> String {
    display_duration(u64::try_from(t).unwrap_or(u64::MAX))
}

fn explain(vm: &Vm, why: &NoInterface) -> String {
    match why {
        NoInterface::TooLong(reason) => format!("vm \"{}\": not decided: {reason}", vm.name),
        NoInterface::Demand {
            period,
            budget,
            vcpus,
            witness:
                Witness {
                    task,
                    t,
                    demand,
                    supply,
                },
            fp_single,
        } => {
            let task = vm.tasks.get(*task).map_or("?", |t| t.name.as_str());
            let mut line = format!(
                "vm \"{}\" task \"{task}\": at t={} demand {} > supply {} with Θ={} Π={}",
                vm.name,
                shown(*t),
                shown(*demand),
                shown(*supply),
                display_duration(*budget),
                display_duration(*period)
            );
            if *vcpus == 1 {
                line.push_str(" (the whole of one vCPU)");
            } else {
                let _ = write!(line, " m'={vcpus} (the whole of {vcpus} vCPUs, global EDF)");
            }
            if *fp_single {
                line.push_str("; fixed priorities are analysed on one vCPU only: use edf for more");
            } else if vm.max_vcpus > *vcpus && vm.scheduler == Scheduler::Edf {
                line.push_str("; more vCPUs were not tried");
            }
            line
        }
    }
}

/// Analyses `system`: each VM's interface, then the host composition.
pub fn analyze(system: &System) -> Report {
    let host = &system.host;
    let mut vms = Vec::new();
    let mut problems = Vec::new();
    let mut servers = Vec::new();
    for (v, vm) in system.vms.iter().enumerate() {
        let mut report = VmReport {
            name: vm.name.clone(),
            scheduler: vm.scheduler,
            tasks: vm.tasks.len(),
            utilization: utilization(vm),
            schedulable: false,
            interface: None,
            vcpu_sched: Vec::new(),
            cores: Vec::new(),
            flags: Vec::new(),
            explanation: None,
        };
        match find_interface(vm, host) {
            Ok(Interface {
                period,
                budget,
                vcpus,
                servers: budgets,
            }) => {
                report.schedulable = true;
                report.interface = Some(InterfaceReport {
                    period_ns: period,
                    budget_ns: budget,
                    vcpus,
                    bandwidth: budget as f64 / period as f64,
                });
                for (vcpu, runtime) in (0..).zip(budgets) {
                    let sched = VcpuSched {
                        vcpu,
                        policy: "deadline",
                        runtime_ns: runtime,
                        deadline_ns: period,
                        period_ns: period,
                    };
                    report.flags.push(sched.flag());
                    report.vcpu_sched.push(sched);
                    servers.push(Server {
                        vm: v,
                        vcpu,
                        runtime,
                        period,
                    });
                }
            }
            Err(why) => {
                let line = explain(vm, &why);
                problems.push(line.clone());
                report.explanation = Some(line);
            }
        }
        vms.push(report);
    }
    let placement = place(&servers, host.cores, host.utilization_limit_ppm);
    let limit = host.utilization_limit_ppm as f64 / 1e6;
    for (server, core) in servers.iter().zip(&placement.cores) {
        vms[server.vm].cores.push(*core);
        if core.is_none() {
            let loads: Vec<String> = placement
                .core_load_ppm
                .iter()
                .enumerate()
                .map(|(c, l)| format!("core {c} {:.3}", *l as f64 / 1e6))
                .collect();
            let line = format!(
                "vm \"{}\" vCPU {} (runtime {} per {}, {:.3} of a core) fits no core: {} of {limit:.3} each",
                vms[server.vm].name,
                server.vcpu,
                display_duration(server.runtime),
                display_duration(server.period),
                server.runtime as f64 / server.period as f64,
                loads.join(", ")
            );
            vms[server.vm].schedulable = false;
            vms[server.vm].explanation.get_or_insert(line.clone());
            problems.push(line);
        }
    }
    let bw = |b: u64| b as f64 / f64::from(1u32 << 20);
    if placement.total_bw > placement.capacity_bw {
        problems.push(format!(
            "the vCPUs need {:.3} CPUs of SCHED_DEADLINE bandwidth; the host admits {:.3} ({} cores × {limit})",
            bw(placement.total_bw),
            bw(placement.capacity_bw),
            host.cores
        ));
    }
    Report {
        schedulable: problems.is_empty(),
        host: HostReport {
            cores: host.cores,
            utilization_limit: limit,
            total_bandwidth: bw(placement.total_bw),
            capacity: bw(placement.capacity_bw),
            core_load: placement
                .core_load_ppm
                .iter()
                .map(|&l| l as f64 / 1e6)
                .collect(),
        },
        vms,
        problems,
    }
}

impl Report {
    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for vm in &self.vms {
            let _ = write!(
                out,
                "vm \"{}\" ({:?}, {} tasks, utilization {:.3}): ",
                vm.name, vm.scheduler, vm.tasks, vm.utilization
            );
            match &vm.interface {
                Some(i) => {
                    let _ = writeln!(
                        out,
                        "Π={} Θ={} m'={} bandwidth {:.3}",
                        display_duration(i.period_ns),
                        display_duration(i.budget_ns),
                        i.vcpus,
                        i.bandwidth
                    );
                }
                None => out.push_str("no interface\n"),
            }
            for (sched, core) in vm.vcpu_sched.iter().zip(&vm.cores) {
                let core = core.map_or("no core".to_string(), |c| format!("core {c}"));
                let _ = writeln!(out, "  vCPU {} on {core}: {}", sched.vcpu, sched.flag());
            }
        }
        let loads: Vec<String> = self
            .host
            .core_load
            .iter()
            .map(|l| format!("{l:.3}"))
            .collect();
        let _ = writeln!(
            out,
            "host: {} cores, limit {} each; vCPU bandwidth {:.3} of {:.3}; core loads {}",
            self.host.cores,
            self.host.utilization_limit,
            self.host.total_bandwidth,
            self.host.capacity,
            loads.join(" ")
        );
        if self.schedulable {
            out.push_str("schedulable: yes\n");
        } else {
            out.push_str("schedulable: no\n");
            for problem in &self.problems {
                let _ = writeln!(out, "  {problem}");
            }
        }
        out
    }
}
