//! The debug API's writes into the guest (`vigil run --debug-api`): how tests
//! tamper with a guest that cannot tamper with itself.

use super::{lock, Introspector};
use crate::translate;

impl Introspector {
    /// Writes `bytes` into the guest at `address` (guest-physical with `physical`,
    /// else guest-virtual through vCPU `vcpu`'s page tables), for tests of the
    /// monitor (`PUT /vigil/debug/memory`).
    pub fn debug_write_memory(
        &self,
        vcpu: u32,
        address: u64,
        physical: bool,
        bytes: &[u8],
    ) -> Result<(), String> {
        use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
        let cpu = if physical {
            None
        } else {
            let cpus = self.cpus()?;
            Some(
                *cpus
                    .iter()
                    .find(|c| c.vcpu == vcpu)
                    .ok_or_else(|| format!("vcpu {vcpu}: the VM has {} vCPUs", cpus.len()))?,
            )
        };
        // Translate every byte's page first: all of it is written, or none.
        let mut pieces = Vec::new();
        let mut done = 0usize;
        while done < bytes.len() {
            let va = address.wrapping_add(done as u64);
            let pa = match &cpu {
                None => va,
                Some(c) => {
                    translate(&self.mem, c.cr3, c.la57(), va)
                        .map_err(|e| format!("address {va:#x}: {e}"))?
                        .paddr
                }
            };
            let n = ((0x1000 - (va & 0xfff)) as usize).min(bytes.len() - done);
            pieces.push((pa, done, n));
            done += n;
        }
        if let Some(&(pa, _, n)) = pieces.iter().find(|(pa, _, n)| {
            !self
                .mem
                .check_range(GuestAddress(*pa), *n, Permissions::Write)
        }) {
            return Err(format!("address {pa:#x} (+{n} bytes): outside guest RAM"));
        }
        for &(pa, at, n) in &pieces {
            self.mem
                .write_slice(&bytes[at..at + n], GuestAddress(pa))
                .map_err(|_| format!("address {pa:#x} (+{n} bytes): outside guest RAM"))?;
        }
        // KVM's dirty log does not see this write (the host wrote the mapping, the
        // guest did not): record its pages, after the bytes are in, for the next
        // check to re-hash.
        lock(&self.shared.host_dirty).extend(pieces.iter().map(|&(pa, _, _)| pa & !0xfff));
        Ok(())
    }

    /// Writes an MSR of vCPU `vcpu` from the host (`PUT /vigil/debug/msr`): not
    /// subject to the MSR guard, so only the periodic check sees it.
    pub fn debug_write_msr(&self, vcpu: u32, index: u32, value: u64) -> Result<(), String> {
        self.vm
            .write_msr(vcpu, index, value)
            .map_err(|e| e.to_string())
    }
}
