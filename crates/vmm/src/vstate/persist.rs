//! The KVM state of a VM and of its vCPUs: read for a snapshot, written back
//! into a freshly created VM and vCPUs to restore one.
//!
//! vCPU state is read on the vCPU's own thread, with the VM paused; a vCPU that
//! left `KVM_RUN` for a port or MMIO access has that instruction half done (KVM
//! finishes it on the next `KVM_RUN`), so it is first run once with
//! `immediate_exit` set, which completes it without entering the guest.

use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::snapshot::state::{KvmVmState, VcpuSnapshot};

/// Why KVM state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: it is in the middle of an I/O instruction that needs the VMM again; resume the VM briefly and try again")]
    IoInFlight { vcpu: u32 },
    #[error("vCPU {vcpu}: MSR {index:#x}: KVM refused the value {value:#x}")]
    Msr { vcpu: u32, index: u32, value: u64 },
    #[error("this host's XSAVE area is {0} bytes (AMX state?); snapshots carry the 4096 bytes KVM_GET_XSAVE gives, so they are refused here")]
    XsaveSize(i32),
    #[error(
        "vCPU {vcpu}: {entries} CPUID entries, more than the {KVM_MAX_CPUID_ENTRIES} KVM takes"
    )]
    Cpuid { vcpu: u32, entries: usize },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |source| KvmStateError::Kvm { what, source }
}

/// KVM_GET_XSAVE and KVM_SET_XSAVE move 4 KiB; a host whose XSAVE area is
/// larger needs KVM_GET_XSAVE2, not done here: refuse rather than lose state.
pub fn check_xsave_size(vm: &VmFd) -> Result<(), KvmStateError> {
    match vm.check_extension_int(kvm_ioctls::Cap::Xsave2) {
        size if size > 4096 => Err(KvmStateError::XsaveSize(size)),
        _ => Ok(()),
    }
}

/// The irqchip (both PICs, the I/O APIC), the PIT and the KVM clock.
pub fn save_vm(vm: &VmFd) -> Result<KvmVmState, KvmStateError> {
    let chip = |chip_id| {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map(|()| chip)
            .map_err(kvm("read the irqchip"))
    };
    Ok(KvmVmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("read the PIT"))?,
        clock: vm.get_clock().map_err(kvm("read the KVM clock"))?,
    })
}

/// Writes a saved irqchip, PIT and clock into a VM that has both (made by
/// `create_vm`), before its vCPUs run.
pub fn restore_vm(vm: &VmFd, s: &KvmVmState) -> Result<(), KvmStateError> {
    vm.set_pit2(&s.pit).map_err(kvm("write the PIT"))?;
    // The time goes back, and with KVM_CLOCK_REALTIME (kept only when the
    // load asked for `clock_realtime`) KVM adds the real time since it was
    // read; the other flags say how it was read, and KVM refuses them.
    let clock = kvm_bindings::kvm_clock_data {
        clock: s.clock.clock,
        flags: s.clock.flags & kvm_bindings::KVM_CLOCK_REALTIME,
        realtime: s.clock.realtime,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("write the KVM clock"))?;
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip).map_err(kvm("write the irqchip"))?;
    }
    Ok(())
}

/// Reads every MSR of `indices` that KVM can read (it stops at the first it
/// cannot: that one is skipped and the rest read on).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, KvmStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| KvmStateError::Kvm {
            what: "read MSRs (too many entries)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("read MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        // `read` were read; the next one cannot be: skip it.
        rest = &rest[(read + 1).min(rest.len())..];
        if read < chunk.len() {
            tracing::debug!(msr = chunk[read], "KVM cannot read this MSR; not saved");
        }
    }
    Ok(out)
}

/// Reads one vCPU's state, on its own thread, with the VM paused. `msrs` is
/// KVM's list of MSRs to save.
pub(crate) fn save_vcpu(
    id: u32,
    fd: &mut VcpuFd,
    msrs: &[u32],
) -> Result<VcpuSnapshot, KvmStateError> {
    fd.set_kvm_immediate_exit(1);
    let run = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match run {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => return Err(kvm("complete the vCPU's last instruction")(e)),
        Ok(()) => return Err(KvmStateError::IoInFlight { vcpu: id }),
    }
    Ok(VcpuSnapshot {
        id,
        cpuid: fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("read CPUID"))?
            .as_slice()
            .to_vec(),
        tsc_khz: fd.get_tsc_khz().ok(),
        regs: fd.get_regs().map_err(kvm("read registers"))?,
        sregs: fd.get_sregs().map_err(kvm("read special registers"))?,
        xsave: fd.get_xsave().map_err(kvm("read XSAVE state"))?,
        xcrs: fd.get_xcrs().map_err(kvm("read XCRs"))?,
        debugregs: fd.get_debug_regs().map_err(kvm("read debug registers"))?,
        lapic: fd.get_lapic().map_err(kvm("read the local APIC"))?,
        msrs: read_msrs(fd, msrs)?,
        events: fd.get_vcpu_events().map_err(kvm("read pending events"))?,
        mp_state: fd.get_mp_state().map_err(kvm("read the MP state"))?,
    })
}

/// Writes a saved state into a vCPU just created, in the order KVM needs: CPUID
/// first (it decides which MSRs and XSAVE features exist), the local APIC before
/// the MSRs (the TSC deadline lives in both), pending events last.
pub(crate) fn restore_vcpu(fd: &VcpuFd, s: &VcpuSnapshot) -> Result<(), KvmStateError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| KvmStateError::Cpuid {
        vcpu: s.id,
        entries: s.cpuid.len(),
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
    if let Some(khz) = s.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz)
                .map_err(kvm("set the TSC frequency the guest had"))?;
        }
    }
    fd.set_mp_state(s.mp_state)
        .map_err(kvm("set the MP state"))?;
    fd.set_regs(&s.regs).map_err(kvm("set registers"))?;
    fd.set_sregs(&s.sregs)
        .map_err(kvm("set special registers"))?;
    // SAFETY: KVM reads the XSAVE area's size from `s.xsave`, a whole 4 KiB
    // `kvm_xsave`, and the caller checked (`check_xsave_size`) that this host's
    // area is no larger; KVM checks the content against this vCPU's CPUID.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm("set XSAVE state"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm("set XCRs"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(kvm("set debug registers"))?;
    fd.set_lapic(&s.lapic).map_err(kvm("set the local APIC"))?;
    for chunk in s.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| KvmStateError::Kvm {
            what: "set MSRs (too many entries)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let written = fd.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
        if let Some(refused) = chunk.get(written) {
            return Err(KvmStateError::Msr {
                vcpu: s.id,
                index: refused.index,
                value: refused.data,
            });
        }
    }
    fd.set_vcpu_events(&s.events)
        .map_err(kvm("set pending events"))?;
    Ok(())
}
