//! How the host schedules each vCPU thread: its policy (`SchedPolicy`), the CPUs
//! it may run on, the admission check before either changes, and the RT timer's
//! short boosts to SCHED_FIFO.

use std::io;
use std::sync::{Mutex, MutexGuard};

use vigil_model::config::{SchedPolicy, VcpuSched};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a scheduling plan was refused or could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error("vCPU {vcpu}: cpus={cpu}: {why}")]
    Cpu { vcpu: u32, cpu: String, why: String },
    #[error("vCPU {vcpu}: {policy} ({bandwidth:.3} of a CPU) does not fit on CPUs {cpus}: SCHED_DEADLINE reservations there take {taken:.3} already, this VM's others {ours:.3}, of {limit:.3} ({count} CPUs x {share:.2}, the kernel's sched_rt_runtime_us/sched_rt_period_us)")]
    Bandwidth {
        vcpu: u32,
        policy: String,
        bandwidth: f64,
        cpus: String,
        taken: f64,
        ours: f64,
        limit: f64,
        count: usize,
        share: f64,
    },
    #[error("vCPU {vcpu}: {policy} asks {bandwidth:.3} of a CPU; one thread may take at most {share:.2} of a CPU (the kernel's sched_rt_runtime_us/sched_rt_period_us)")]
    OverOneCpu {
        vcpu: u32,
        policy: String,
        bandwidth: f64,
        share: f64,
    },
    #[error("vCPU {vcpu}: the kernel refused {policy}: {source}{hint}")]
    Apply {
        vcpu: u32,
        policy: String,
        source: io::Error,
        hint: &'static str,
    },
    #[error("vCPU {0} has not started")]
    NotStarted(u32),
}

/// What the host gives real-time threads.
#[derive(Clone, Debug)]
pub struct HostRt {
    /// The CPUs this process may run on.
    pub cpus: Vec<u32>,
    /// The share of each CPU real-time and deadline threads may take
    /// (`sched_rt_runtime_us / sched_rt_period_us`; 1 when unlimited).
    pub share: f64,
}

impl HostRt {
    /// Reads this process's CPUs and the kernel's RT limit.
    pub fn read() -> Self {
        let read = |f: &str| -> Option<i64> {
            std::fs::read_to_string(format!("/proc/sys/kernel/{f}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let share = match (read("sched_rt_runtime_us"), read("sched_rt_period_us")) {
            (Some(r), Some(p)) if r >= 0 && p > 0 => r as f64 / p as f64,
            _ => 1.0,
        };
        Self {
            cpus: get_affinity(0).unwrap_or_default(),
            share,
        }
    }
}

/// `0-3,6`: a CPU list as the kernel writes them.
pub fn cpu_list(cpus: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

fn sched_attr(policy: &SchedPolicy) -> libc::sched_attr {
    let (sched_policy, priority, runtime, deadline, period) = match *policy {
        SchedPolicy::Other => (libc::SCHED_OTHER, 0, 0, 0, 0),
        SchedPolicy::Fifo { priority } => (libc::SCHED_FIFO, priority, 0, 0, 0),
        SchedPolicy::Rr { priority } => (libc::SCHED_RR, priority, 0, 0, 0),
        SchedPolicy::Deadline {
            runtime_ns,
            deadline_ns,
            period_ns,
        } => (6, 0, runtime_ns, deadline_ns, period_ns),
    };
    libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: sched_policy as u32,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: u32::from(priority),
        sched_runtime: runtime,
        sched_deadline: deadline,
        sched_period: period,
    }
}

/// Sets thread `tid`'s policy (0: the calling thread).
pub fn set_policy(tid: i32, policy: &SchedPolicy) -> io::Result<()> {
    let attr = sched_attr(policy);
    // SAFETY: sched_setattr reads `attr.size` bytes of a valid, initialized
    // sched_attr that outlives the call; it writes nothing of ours.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &attr, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Thread `tid`'s scheduling attributes.
fn get_attr(tid: i32) -> io::Result<libc::sched_attr> {
    let mut attr = sched_attr(&SchedPolicy::Other);
    // SAFETY: sched_getattr writes at most `size` bytes into `attr`, a valid
    // sched_attr of that size that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr,
            std::mem::size_of::<libc::sched_attr>() as u32,
            0,
        )
    };
    if r == 0 {
        Ok(attr)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The CPUs thread `tid` may run on.
pub fn get_affinity(tid: i32) -> io::Result<Vec<u32>> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of(cpu_set_t) bytes into `set`.
    let r = unsafe { libc::sched_getaffinity(tid, std::mem::size_of_val(&set), &mut set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as u32)
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's size.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu as usize, &set) })
        .collect())
}

/// Lets thread `tid` run on `cpus` only.
pub fn set_affinity(tid: i32, cpus: &[u32]) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as u32) {
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's size.
        unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    }
    // SAFETY: the kernel reads size_of(cpu_set_t) bytes of `set`, which lives
    // for the call.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The CPU share every SCHED_DEADLINE thread of the host takes, except the
/// threads in `exclude`.
fn host_deadline_bandwidth(exclude: &[i32]) -> f64 {
    let mut total = 0.0;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    for p in procs.flatten() {
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if exclude.contains(&tid) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            // Field 41 (policy); fields after the command's closing parenthesis
            // start at field 3.
            let policy = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(38));
            if policy == Some("6") {
                if let Ok(a) = get_attr(tid) {
                    if a.sched_period > 0 {
                        total += a.sched_runtime as f64 / a.sched_period as f64;
                    }
                }
            }
        }
    }
    total
}

/// Checks `plan` (one entry per vCPU) against the host: pinned CPUs exist
/// and are allowed, and every SCHED_DEADLINE reservation fits beside those the
/// host has already (the threads in `own` are this VM's, replaced by the plan).
pub fn admit(plan: &[VcpuSched], host: &HostRt, own: &[i32]) -> Result<(), SchedError> {
    for (v, e) in plan.iter().enumerate() {
        if let Some(cpus) = &e.cpus {
            if let Some(cpu) = cpus.iter().find(|c| !host.cpus.contains(c)) {
                return Err(SchedError::Cpu {
                    vcpu: v as u32,
                    cpu: cpu_list(cpus),
                    why: format!(
                        "CPU {cpu} is not one this process may use ({})",
                        cpu_list(&host.cpus)
                    ),
                });
            }
        }
    }
    if !plan
        .iter()
        .any(|e| matches!(e.policy, SchedPolicy::Deadline { .. }))
    {
        return Ok(());
    }
    let taken = host_deadline_bandwidth(own);
    let limit = host.share * host.cpus.len() as f64;
    let mut ours = 0.0;
    for (v, e) in plan.iter().enumerate() {
        let b = e.policy.bandwidth();
        if b == 0.0 {
            continue;
        }
        // One thread runs on one CPU at a time, within the kernel's share of it.
        if b > host.share {
            return Err(SchedError::OverOneCpu {
                vcpu: v as u32,
                policy: e.policy.describe(),
                bandwidth: b,
                share: host.share,
            });
        }
        if taken + ours + b > limit + 1e-9 {
            return Err(SchedError::Bandwidth {
                vcpu: v as u32,
                policy: e.policy.describe(),
                bandwidth: b,
                cpus: cpu_list(&host.cpus),
                taken,
                ours,
                limit,
                count: host.cpus.len(),
                share: host.share,
            });
        }
        ours += b;
    }
    Ok(())
}

/// One vCPU thread's scheduling.
#[derive(Debug, Default)]
struct Slot {
    /// The thread (0 until it starts, and after it ends).
    tid: i32,
    /// Its policy and CPUs when not boosted.
    normal: VcpuSched,
    /// Raised by the RT timer, to this SCHED_FIFO priority.
    boost: Option<u8>,
}

/// The scheduling of a VM's vCPU threads, shared by the threads themselves
/// (each applies its own when it starts), the API (changes while running) and
/// the RT timer (boosts).
#[derive(Debug)]
pub struct VcpuScheduler {
    slots: Vec<Mutex<Slot>>,
    host: HostRt,
}

impl VcpuScheduler {
    /// Admits `plan` (one resolved entry per vCPU) on this host.
    pub fn new(plan: Vec<VcpuSched>) -> Result<Self, SchedError> {
        let host = HostRt::read();
        admit(&plan, &host, &[])?;
        Ok(Self {
            slots: plan
                .into_iter()
                .map(|normal| {
                    Mutex::new(Slot {
                        normal,
                        ..Slot::default()
                    })
                })
                .collect(),
            host,
        })
    }

    /// Applies `e` to thread `tid`, CPUs first where a pinned policy follows a
    /// reservation (the kernel refuses SCHED_DEADLINE on a pinned thread).
    fn apply(&self, vcpu: u32, tid: i32, e: &VcpuSched) -> Result<(), SchedError> {
        let err = |source: io::Error| {
            let hint = match source.raw_os_error() {
                Some(libc::EPERM) => " (real-time policies need CAP_SYS_NICE or RLIMIT_RTPRIO)",
                Some(libc::EBUSY) => {
                    " (the kernel's deadline admission: the reservations do not fit now)"
                }
                _ => "",
            };
            SchedError::Apply {
                vcpu,
                policy: e.policy.describe(),
                source,
                hint,
            }
        };
        let cpus = e.cpus.as_deref().unwrap_or(&self.host.cpus);
        set_affinity(tid, &self.host.cpus).map_err(err)?;
        set_policy(tid, &e.policy).map_err(err)?;
        if cpus != self.host.cpus.as_slice() {
            set_affinity(tid, cpus).map_err(err)?;
        }
        Ok(())
    }

    /// Called by vCPU `vcpu`'s thread (`tid`) before its first `KVM_RUN`.
    pub fn thread_started(&self, vcpu: u32, tid: i32) -> Result<(), SchedError> {
        let Some(slot) = self.slots.get(vcpu as usize) else {
            return Ok(());
        };
        let mut slot = lock(slot);
        slot.tid = tid;
        if slot.normal.policy == SchedPolicy::Other && slot.normal.cpus.is_none() {
            return Ok(());
        }
        let normal = slot.normal.clone();
        self.apply(vcpu, tid, &normal)
    }

    /// Called by vCPU `vcpu`'s thread as it ends.
    pub fn thread_exiting(&self, vcpu: u32) {
        if let Some(slot) = self.slots.get(vcpu as usize) {
            lock(slot).tid = 0;
        }
    }

    /// The CPUs this process may use that no vCPU is pinned to (all of them when
    /// the pinned vCPUs cover every CPU).
    pub fn free_cpus(&self) -> Vec<u32> {
        let pinned: Vec<u32> = self
            .current()
            .into_iter()
            .filter_map(|e| e.cpus)
            .flatten()
            .collect();
        let free: Vec<u32> = self
            .host
            .cpus
            .iter()
            .copied()
            .filter(|c| !pinned.contains(c))
            .collect();
        if free.is_empty() {
            self.host.cpus.clone()
        } else {
            free
        }
    }

    /// Each vCPU's policy and CPUs when not boosted.
    pub fn current(&self) -> Vec<VcpuSched> {
        self.slots.iter().map(|s| lock(s).normal.clone()).collect()
    }

    /// Admits and applies `plan` (one resolved entry per vCPU) to the running
    /// threads; on a refusal midway, the vCPUs already changed go back.
    pub fn set(&self, plan: Vec<VcpuSched>) -> Result<(), SchedError> {
        let mut slots: Vec<MutexGuard<'_, Slot>> = self.slots.iter().map(lock).collect();
        let own: Vec<i32> = slots.iter().map(|s| s.tid).filter(|&t| t != 0).collect();
        admit(&plan, &self.host, &own)?;
        let old: Vec<VcpuSched> = slots.iter().map(|s| s.normal.clone()).collect();
        for (v, e) in plan.iter().enumerate() {
            let tid = slots[v].tid;
            if tid == 0 {
                return Err(SchedError::NotStarted(v as u32));
            }
            // A new policy ends a boost: the RT timer's next expiry raises it again.
            if let Err(error) = self.apply(v as u32, tid, e) {
                for (w, previous) in old.iter().enumerate().take(v) {
                    let _ = self.apply(w as u32, slots[w].tid, previous);
                    slots[w].normal = previous.clone();
                }
                return Err(error);
            }
            slots[v].boost = None;
            slots[v].normal = e.clone();
        }
        Ok(())
    }

    /// Raises vCPU `vcpu` to SCHED_FIFO `priority`, unless its own policy ranks
    /// as high already (a reservation, or a real-time priority at least as
    /// high): true when raised now.
    pub fn boost(&self, vcpu: u32, priority: u8) -> bool {
        let Some(slot) = self.slots.get(vcpu as usize) else {
            return false;
        };
        let mut slot = lock(slot);
        let outranks = match slot.normal.policy {
            SchedPolicy::Other => false,
            SchedPolicy::Fifo { priority: p } | SchedPolicy::Rr { priority: p } => p >= priority,
            SchedPolicy::Deadline { .. } => true,
        };
        if slot.tid == 0 || slot.boost.is_some() || outranks {
            return false;
        }
        match set_policy(slot.tid, &SchedPolicy::Fifo { priority }) {
            Ok(()) => {
                slot.boost = Some(priority);
                true
            }
            Err(e) => {
                tracing::warn!(vcpu, "rt timer: cannot raise the vCPU thread: {e}");
                false
            }
        }
    }

    /// Returns vCPU `vcpu` to its own policy after a boost: true when it was boosted.
    pub fn unboost(&self, vcpu: u32) -> bool {
        let Some(slot) = self.slots.get(vcpu as usize) else {
            return false;
        };
        let mut slot = lock(slot);
        if slot.boost.take().is_none() || slot.tid == 0 {
            return false;
        }
        if let Err(e) = set_policy(slot.tid, &slot.normal.policy) {
            tracing::error!(
                vcpu,
                "rt timer: cannot return the vCPU thread to {}: {e}",
                slot.normal.policy.describe()
            );
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(policy: SchedPolicy, cpus: Option<Vec<u32>>) -> VcpuSched {
        VcpuSched {
            vcpu: None,
            policy,
            cpus,
        }
    }

    fn deadline(runtime_ms: u64, period_ms: u64) -> SchedPolicy {
        SchedPolicy::Deadline {
            runtime_ns: runtime_ms * 1_000_000,
            deadline_ns: period_ms * 1_000_000,
            period_ns: period_ms * 1_000_000,
        }
    }

    #[test]
    fn cpu_lists_read_like_the_kernels() {
        assert_eq!(cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(cpu_list(&[3]), "3");
    }

    #[test]
    fn admission_names_the_vcpu_cpu_and_numbers() {
        let host = HostRt {
            cpus: vec![0, 1],
            share: 0.95,
        };
        let far = entry(SchedPolicy::Other, Some(vec![7]));
        let e = admit(&[entry(SchedPolicy::Other, None), far], &host, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vCPU 1: cpus=7: CPU 7 is not one this process may use (0-1)"
        );
        let whole = entry(deadline(10, 10), None);
        let e = admit(&[whole], &host, &[]).unwrap_err().to_string();
        assert_eq!(e, "vCPU 0: deadline:10ms/10ms/10ms asks 1.000 of a CPU; one thread may take at most 0.95 of a CPU (the kernel's sched_rt_runtime_us/sched_rt_period_us)");
        // Three reservations of 0.6 do not fit in 2 x 0.95 (whatever else the host runs).
        let plan = vec![entry(deadline(6, 10), None); 4];
        let e = admit(&plan, &host, &[]).unwrap_err().to_string();
        assert!(e.contains("of 1.900 (2 CPUs x 0.95"), "{e}");
        assert!(admit(&plan[..1], &host, &[]).is_ok());
    }
}
