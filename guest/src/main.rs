//! Vigil's test guest: a freestanding x86_64 kernel booted through PVH. It reports the
//! machine it finds (CPUs, memory, timer frequencies) on the serial port, runs the
//! scenarios named by `test=` on its command line, and exits through isa-debug-exit.
//! See README.md for the boot protocol and the output format.

#![no_std]
#![no_main]

mod acpi;
mod apic;
mod balloon;
mod boot;
mod bootinfo;
mod cpu;
mod density;
mod introspect;
mod mem;
mod mmds;
mod mobility;
mod module;
mod net;
mod paging;
mod pci;
mod probe;
mod rt;
mod scenarios;
mod serial;
mod virtio;
mod vsock;

use bootinfo::BootInfo;
use serial::{Line, Out, Serial};

/// What the scenarios need to know about the machine.
pub struct Machine {
    pub info: BootInfo,
    pub cpus: acpi::Cpus,
    pub tsc_khz: u64,
    pub lapic_khz: u64,
}

impl Machine {
    /// The TSC frequency for minimum delays: when unknown, 10 GHz, so that no delay is
    /// ever shorter than asked.
    pub fn delay_tsc_khz(&self) -> u64 {
        if self.tsc_khz == 0 {
            10_000_000
        } else {
            self.tsc_khz
        }
    }

    /// The number `key=` holds (`min` to `max`), else `default`; a bad value is
    /// said in `detail`.
    pub fn number(
        &self,
        key: &str,
        min: u64,
        max: u64,
        default: Option<u64>,
        detail: &mut Line,
    ) -> Result<Option<u64>, ()> {
        match self.info.param_number(key.as_bytes(), min, max) {
            Ok(v) => Ok(v.or(default)),
            Err(value) => {
                detail
                    .str(key)
                    .str("=")
                    .bytes(value)
                    .str(": expected ")
                    .dec(min)
                    .str(" to ")
                    .dec(max);
                Err(())
            }
        }
    }
}

/// Entered from boot.rs on the boot stack, in long mode, with the PVH start info address.
#[no_mangle]
extern "C" fn kmain(start_info: u32) -> ! {
    serial::init();
    Serial
        .str("vigil-test-guest ")
        .str(env!("VIGIL_TEST_GUEST_VERSION"))
        .str("\n");
    cpu::init();
    apic::init();

    let info = BootInfo::parse(u64::from(start_info));
    let cpus = acpi::discover(info.rsdp);
    Serial
        .str("cpus: ")
        .dec(cpus.ids().len() as u64)
        .str(" apic_ids=")
        .dec_list(cpus.ids())
        .str("\n");
    Serial
        .str("memory: ")
        .dec(info.ram_kib())
        .str(" KiB in ")
        .dec(info.ram().len() as u64)
        .str(" regions, top=")
        .hex(info.ram_top())
        .str("\n");
    let (tsc_khz, lapic_khz) = apic::frequencies();
    Serial
        .str("timer: tsc_khz=")
        .dec(tsc_khz)
        .str(" lapic_khz=")
        .dec(lapic_khz)
        .str("\n");

    let machine = Machine {
        info,
        cpus,
        tsc_khz,
        lapic_khz,
    };
    let (mut passed, mut failed) = (0u64, 0u64);
    for name in machine.info.scenarios() {
        let mut detail = Line::new();
        let pass = scenarios::run(name, &machine, &mut detail);
        Serial
            .str("TEST ")
            .bytes(name)
            .str(if pass { " PASS" } else { " FAIL" });
        if !detail.as_bytes().is_empty() {
            Serial.str(" ").bytes(detail.as_bytes());
        }
        Serial.str("\n");
        if pass {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    Serial
        .str("DONE passed=")
        .dec(passed)
        .str(" failed=")
        .dec(failed)
        .str("\n");
    cpu::exit(if failed == 0 { 0 } else { 1 })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    Serial.str("PANIC");
    if let Some(location) = info.location() {
        Serial
            .str(" at ")
            .str(location.file())
            .str(":")
            .dec(u64::from(location.line()));
    }
    Serial.str("\n");
    cpu::exit(2)
}
