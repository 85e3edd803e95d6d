//! `vigil snapshot inspect`: what a snapshot's state file holds, after the same
//! checks a load makes of the file; `vigil snapshot merge`: a diff's memory file
//! onto its base.

use std::fmt::Write;
use std::path::Path;

use std::io::IsTerminal;

use vigil_devices::virtio::persist::DeviceState;
use vigil_introspect::live::{MonitorState, STATE_EXTENSION};
use vigil_vmm::snapshot::{file, MemoryKind};

/// The report `vigil snapshot inspect` prints.
pub fn inspect(path: &Path, mem: Option<&Path>) -> anyhow::Result<String> {
    let (header, state) = file::read_state(path)?;
    let memory: u64 = state.memory.iter().map(|r| r.bytes).sum();
    // The bytes of data in the RAM image, and of the packed pages after it.
    let data = match mem {
        Some(mem) => {
            let (f, _) = file::open_memory(mem, &state)?;
            let data: u64 = file::data_ranges(&f, mem)?
                .iter()
                .map(|(a, b)| b.min(&memory).saturating_sub(*a))
                .sum();
            let len = f.metadata().map_or(memory, |m| m.len());
            Some((data, len - memory))
        }
        None => None,
    };
    let m = &state.machine;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "{}: Vigil snapshot, format version {}, {} bytes of state, CRC-64 {:#018x} (checked)",
        path.display(),
        header.version,
        header.state_bytes,
        header.checksum
    );
    let _ = writeln!(out, "saved by: Vigil {}", state.vigil_version);
    let _ = writeln!(
        out,
        "machine: {} vCPUs, {} MiB; kernel {}{}",
        m.vcpu_count,
        m.mem_size_mib,
        m.kernel,
        m.symbols
            .as_ref()
            .map(|s| format!(", symbols {}", s.display()))
            .unwrap_or_default()
    );
    let ranges: Vec<String> = state
        .memory
        .iter()
        .map(|r| format!("{:#x}+{:#x}", r.guest_address, r.bytes))
        .collect();
    let _ = writeln!(
        out,
        "memory: {memory} bytes ({}){}",
        ranges.join(", "),
        match (mem, data) {
            (Some(mem), Some((data, 0))) =>
                format!("; {} has that size, {data} bytes of data", mem.display()),
            (Some(mem), Some((data, packed))) => format!(
                "; {} has that size, {data} bytes of data, then {packed} bytes of packed pages (checked)",
                mem.display()
            ),
            _ => String::new(),
        }
    );
    let _ = writeln!(
        out,
        "memory file: {}",
        match state.memory_kind {
            MemoryKind::Full => "Full",
            MemoryKind::Diff =>
                "Diff (only the pages written since the previous snapshot: load it with that \
                 snapshot's memory file merged with this one, vigil snapshot merge)",
        }
    );
    if !state.memory_held.is_empty() {
        let _ = writeln!(
            out,
            "memory held compressed at the capture: {} pages (a Vigil with \
             --memory-compression loads them straight into its pool)",
            state.memory_held.count()
        );
    }
    if state.memory_packed > 0 {
        let _ = writeln!(
            out,
            "packed pages: {} kept compressed after the RAM image of the memory file \
             (load it with the File backend: a page-fault handler serves the RAM image only)",
            state.memory_packed
        );
    }
    let clock = &state.kvm.clock;
    let _ = writeln!(
        out,
        "kvm clock: {} ns{}",
        clock.clock,
        state.kvm.clock_read_at().map_or(String::new(), |t| format!(
            ", read at real time {t} ns (clock_realtime can load it)"
        ))
    );
    for v in &state.vcpus {
        let cpl = v.sregs.cs.selector & 3;
        let mode = if v.sregs.efer & (1 << 10) != 0 {
            "long mode"
        } else if v.sregs.cr0 & 1 != 0 {
            "protected mode"
        } else {
            "real mode"
        };
        let _ = writeln!(
            out,
            "vcpu {}: RIP {:#x} RSP {:#x} CPL {cpl}, {mode}, {} MSRs, TSC {} kHz, {} CPUID entries",
            v.id,
            v.regs.rip,
            v.regs.rsp,
            v.msrs.len(),
            v.tsc_khz.map_or("unknown".into(), |k| k.to_string()),
            v.cpuid.len()
        );
    }
    for (i, t) in state.virtio.iter().enumerate() {
        let what = match &t.device {
            DeviceState::Block(b) => format!("block {:?} at {}", b.id, b.path.display()),
            DeviceState::Net(n) => match &n.iface_id {
                Some(id) => format!("net {id:?} on tap {:?}", n.tap),
                None => format!("net on tap {:?}", n.tap),
            },
            DeviceState::Vsock(_) => "vsock".into(),
            DeviceState::Balloon(b) => format!("balloon, target {} pages", b.num_pages),
            DeviceState::Rng(_) => "rng".into(),
        };
        let on_pci = state.pci.get(i).map_or(String::new(), |p| {
            let word = |at: usize| {
                p.config
                    .get(at..at + 4)
                    .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            };
            let bar = u64::from(word(0x14)) << 32 | u64::from(word(0x10) & !0xf);
            format!(
                "; on PCI, BAR {bar:#x}, {} MSI-X vectors",
                p.msix_table.len()
            )
        });
        let _ = writeln!(
            out,
            "virtio {i}: {what}; status {:#x}, {} queues{on_pci}",
            t.device_status,
            t.queues.len()
        );
    }
    for (name, value) in &state.extensions {
        let line = if name == STATE_EXTENSION {
            introspection(value)?
        } else {
            "kept for another layer, not read by this Vigil".into()
        };
        let _ = writeln!(out, "{name}: {line}");
    }
    Ok(out)
}

/// The carried integrity monitor, checked as a load checks it.
fn introspection(value: &serde_json::Value) -> anyhow::Result<String> {
    let state = MonitorState::from_json(value)?;
    let s = &state.settings;
    let monitor = format!(
        "the integrity monitor, every {} ms, policy {}",
        s.period().as_millis(),
        s.policy().as_str()
    );
    let Some(c) = &state.baseline else {
        return Ok(format!("{monitor}; no baseline taken yet"));
    };
    let b = &c.baseline;
    Ok(format!(
        "{monitor}; its baseline: {} vCPUs, kernel text {} pages{}, syscall table {} entries, KASLR slide {:#x} ({}); {} locations reported",
        b.vcpus.len(),
        b.text.pages.len(),
        b.rodata
            .as_ref()
            .map(|r| format!(", read-only data {} pages", r.pages.len()))
            .unwrap_or_default(),
        b.syscall_table.as_ref().map_or(0, |t| t.entries.len()),
        b.layout.slide,
        c.kaslr_slide_from,
        c.reported.len()
    ))
}

/// Merges the diff memory file `diff` onto `base` in place; returns what it did.
pub fn merge(base: &Path, diff: &Path) -> anyhow::Result<String> {
    // Progress on a terminal, every 64 MiB.
    let tty = std::io::stderr().is_terminal();
    let mut shown = 0u64;
    let info = file::merge_memory(base, diff, &mut |copied, total| {
        if tty && (copied - shown >= 64 << 20 || copied == total) {
            shown = copied;
            eprint!("\rmerged {} of {} MiB", copied >> 20, total >> 20);
        }
    })?;
    if tty && shown > 0 {
        eprintln!();
    }
    Ok(format!(
        "merged {}: {} bytes in {} ranges onto {} ({} bytes){}",
        diff.display(),
        info.copied,
        info.ranges,
        base.display(),
        info.bytes,
        if info.unpacked > 0 {
            format!(
                "; {} packed pages of the base unpacked into it",
                info.unpacked
            )
        } else {
            String::new()
        }
    ))
}
