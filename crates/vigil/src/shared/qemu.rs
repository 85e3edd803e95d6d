//! QEMU microvm as the benchmarks and the tests run it beside Vigil: one
//! definition, for Intel and AMD hosts alike.

use std::path::Path;

/// The `-cpu` model: the host's CPU without `arch-capabilities`. KVM reports that
/// MSR (0x10a) on AMD hosts too, and QEMU 7.2 (Debian 12) aborts there when it
/// cannot set it ("failed to set MSR 0x10a"); on Intel, leaving it out only hides
/// the CPU's speculation-bug flags from the guest. `invtsc` makes QEMU publish the
/// timing leaf, as Vigil does, so that no guest spends time calibrating its clock.
pub const CPU: &str = "host,+invtsc,-arch-capabilities";

/// QEMU's exit status when the guest wrote 0 to the debug-exit port: (0 << 1) | 1.
pub const DEBUG_EXIT_SUCCESS: i32 = 1;

/// Arguments for `qemu-system-x86_64` to boot `kernel` (an ELF with a PVH entry)
/// on a microvm: KVM, `vcpus` vCPUs and `memory_mib` of RAM, COM1 on stdio, no
/// other default device, and QEMU's debug-exit device at port 0xf4, where Vigil
/// has its own. Without ACPI (`acpi: false`) QEMU lists its virtio-mmio devices on
/// the kernel command line, where the test guest looks for them. The caller adds
/// devices and `-append`.
pub fn microvm_args(kernel: &Path, memory_mib: u64, vcpus: u32, acpi: bool) -> Vec<String> {
    let machine = if acpi { "microvm" } else { "microvm,acpi=off" };
    [
        "-M",
        machine,
        "-accel",
        "kvm",
        "-cpu",
        CPU,
        "-m",
        &memory_mib.to_string(),
        "-smp",
        &vcpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
        &kernel.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
