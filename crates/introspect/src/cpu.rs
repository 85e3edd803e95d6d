//! A vCPU's protection-relevant registers, as plain numbers, and the bits of them
//! the integrity monitor watches.

use serde::{Deserialize, Serialize};

use crate::hex;

/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG: paging enabled.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.UMIP: `sgdt`/`sidt`/`sldt`/`smsw`/`str` fault at CPL > 0.
pub const CR4_UMIP: u64 = 1 << 11;
/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// CR4.SMEP: the kernel cannot execute user pages.
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP: the kernel cannot touch user pages (outside `stac`/`clac`).
pub const CR4_SMAP: u64 = 1 << 21;
/// EFER.SCE: `syscall`/`sysret` enabled.
pub const EFER_SCE: u64 = 1 << 0;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE: the NX bit of page-table entries is honoured.
pub const EFER_NXE: u64 = 1 << 11;

/// A descriptor-table register (IDTR, GDTR): guest-virtual base and limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRegister {
    /// Guest-virtual address of the table.
    #[serde(with = "hex::u64")]
    pub base: u64,
    /// The offset of the table's last byte (size - 1).
    pub limit: u16,
}

impl std::fmt::Display for TableRegister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "base {:#x} limit {:#x}", self.base, self.limit)
    }
}

/// One vCPU's registers that the integrity monitor baselines and checks. The
/// integration layer fills it from `KVM_GET_SREGS` and `KVM_GET_MSRS`
/// (`MSR_EFER` comes with the special registers; LSTAR `0xc0000082`, STAR
/// `0xc0000081`, CSTAR `0xc0000083`, SFMASK `0xc0000084`, SYSENTER_CS/ESP/EIP
/// `0x174`/`0x175`/`0x176`). Numbers are written as `"0x..."` strings in JSON
/// (kernel addresses do not fit a JavaScript number); reading also accepts
/// plain numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuState {
    /// The vCPU index (0 is the boot CPU).
    pub vcpu: u32,
    #[serde(with = "hex::u64")]
    pub cr0: u64,
    #[serde(with = "hex::u64")]
    pub cr3: u64,
    #[serde(with = "hex::u64")]
    pub cr4: u64,
    #[serde(with = "hex::u64")]
    pub efer: u64,
    pub idt: TableRegister,
    pub gdt: TableRegister,
    #[serde(with = "hex::u64")]
    pub lstar: u64,
    #[serde(with = "hex::u64")]
    pub star: u64,
    #[serde(with = "hex::u64")]
    pub cstar: u64,
    #[serde(with = "hex::u64")]
    pub sfmask: u64,
    #[serde(with = "hex::u64")]
    pub sysenter_cs: u64,
    #[serde(with = "hex::u64")]
    pub sysenter_esp: u64,
    #[serde(with = "hex::u64")]
    pub sysenter_eip: u64,
}

impl CpuState {
    /// Whether the vCPU runs in long mode with paging (CR0.PG and EFER.LMA):
    /// only then do its CR3 and descriptor-table bases mean 64-bit virtual
    /// addresses. An application processor the guest has not started yet is not.
    pub fn long_mode(&self) -> bool {
        self.cr0 & CR0_PG != 0 && self.efer & EFER_LMA != 0
    }

    /// Whether the vCPU uses 5-level paging (CR4.LA57).
    pub fn la57(&self) -> bool {
        self.cr4 & CR4_LA57 != 0
    }

    /// Whether the vCPU is in long mode with its system call entry set up
    /// (EFER.SCE, LSTAR and SFMASK): a kernel's last step in bringing a CPU up.
    /// A kernel that boots straight into long mode is there long before it has
    /// set its IDT, syscall MSRs and EFER.SCE; Linux brings an application
    /// processor into long mode on a bring-up IDT, and sets its syscall MSRs in
    /// `syscall_init`, after it loaded the shared IDT, its GDT and CR4's pinned
    /// bits. SFMASK too: Linux writes it last (after LSTAR, CSTAR and
    /// SYSENTER_*), the test guest sets EFER.SCE last, and every kernel that
    /// uses `syscall` masks at least IF with it.
    pub fn syscall_ready(&self) -> bool {
        self.long_mode() && self.efer & EFER_SCE != 0 && self.lstar != 0 && self.sfmask != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let cpu = CpuState {
            vcpu: 1,
            cr0: 0x8005_0033,
            cr3: 0x10_0000,
            cr4: CR4_SMEP | CR4_LA57,
            efer: EFER_SCE | EFER_LMA | EFER_NXE | (1 << 8),
            idt: TableRegister {
                base: 0xffff_fe00_0000_0000,
                limit: 0xfff,
            },
            gdt: TableRegister {
                base: 0xffff_fe00_0000_1000,
                limit: 0x7f,
            },
            lstar: 0xffff_ffff_8140_0040,
            ..CpuState::default()
        };
        let json = serde_json::to_value(cpu).unwrap();
        assert_eq!(json["lstar"], "0xffffffff81400040");
        assert_eq!(json["idt"]["base"], "0xfffffe0000000000");
        assert_eq!(json["idt"]["limit"], 0xfff);
        assert_eq!(serde_json::from_value::<CpuState>(json).unwrap(), cpu);
        assert!(cpu.long_mode() && cpu.la57());
        // Plain numbers are read too; a bad string is an error naming it.
        let mut v = serde_json::to_value(cpu).unwrap();
        v["cr3"] = serde_json::json!(4096);
        assert_eq!(
            serde_json::from_value::<CpuState>(v.clone()).unwrap().cr3,
            4096
        );
        v["cr3"] = serde_json::json!("0xzz");
        let e = serde_json::from_value::<CpuState>(v).unwrap_err();
        assert!(e.to_string().contains("0xzz"), "{e}");
        assert!(!CpuState::default().long_mode());
    }

    #[test]
    fn the_syscall_entry_is_set_up_last() {
        let up = CpuState {
            cr0: 0x8000_0001,
            efer: EFER_SCE | EFER_LMA | (1 << 8),
            lstar: 0x10_13a3,
            sfmask: 0x4_7700,
            ..CpuState::default()
        };
        assert!(up.long_mode());
        assert!(up.syscall_ready());
        // The test guest's order: STAR, LSTAR, SFMASK, then EFER.SCE.
        assert!(!CpuState::syscall_ready(&CpuState { lstar: 0, ..up }));
        assert!(!CpuState::syscall_ready(&CpuState { sfmask: 0, ..up }));
        assert!(!CpuState::syscall_ready(&CpuState {
            efer: up.efer & !EFER_SCE,
            ..up
        }));
        assert!(!CpuState::syscall_ready(&CpuState { cr0: 1, ..up }));
    }
}
