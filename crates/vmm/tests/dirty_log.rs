//! What introspection gets from a running VM, in process: the dirty page log, the
//! guest's memory, and a crashed VM kept paused for inspection.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vigil_model::config::{ConsoleConfig, KernelImage, OnCrash, VmConfig};
use vigil_vmm::{ControlError, RunState, VmOutcome};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const TIMEOUT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn config(cmdline: &str, memory_mib: u64, console: &Path) -> VmConfig {
    let mut config = VmConfig::new(KernelImage::Embedded {
        name: "vigil-test-guest",
        bytes: vigil_test_guest::ELF,
    });
    config.boot.cmdline = cmdline.into();
    config.machine.mem_size_mib = memory_mib;
    config.console = ConsoleConfig::File(console.to_path_buf());
    config
}

fn console_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "vigil-vmm-inspect-{}-{name}.log",
        std::process::id()
    ))
}

/// Waits until the console file shows `wanted`; panics with what it shows if not.
fn wait_console(path: &Path, wanted: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(wanted) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {wanted:?} on the console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn dirty_log_reports_the_pages_the_guest_wrote() {
    let console = console_path("dirty");
    // `user` keeps the guest busy at CPL3 (about 0.3 s here) while logging is
    // turned on; `memory` then writes the first and last page of each RAM region.
    let vm = vigil_vmm::builder::build(&config("test=user,memory,hang", 256, &console))
        .expect("build the VM");
    let running = vm.start().expect("start the VM");
    let control = running.control();
    let inspect = running.inspect();
    let pages = (256 * MIB / 4096) as usize;

    wait_console(&console, "user: running at cpl3");
    let t = Instant::now();
    let reader = inspect.dirty_log().subscribe().unwrap();
    let first = reader.take().unwrap();
    let first_ms = t.elapsed().as_secs_f64() * 1e6;
    assert!(first.is_all());
    assert_eq!(first.count(), pages, "every page counts as dirty at first");
    assert!(first.is_dirty(0x1234_5678 % (256 * MIB)));
    assert!(!first.is_dirty(256 * MIB), "outside RAM");

    wait_console(&console, "TEST memory PASS");
    let t = Instant::now();
    let written = reader.take().unwrap();
    let fetch_ms = t.elapsed().as_secs_f64() * 1e6;
    let listed: Vec<u64> = written.dirty_pages().collect();
    eprintln!(
        "after test=memory: {} dirty pages: {:x?}",
        written.count(),
        &listed[..listed.len().min(40)]
    );
    assert!(!written.is_all());
    assert_eq!(listed.len(), written.count());
    // The last page of RAM, which `memory` wrote (and restored).
    assert!(written.is_dirty(256 * MIB - 4096), "{listed:x?}");
    // Pages far above what the guest touches.
    for gpa in [64 * MIB, 128 * MIB, 200 * MIB] {
        assert!(!written.is_dirty(gpa), "{gpa:#x} in {listed:x?}");
    }
    assert!(written.count() < 1000, "{listed:x?}");

    // The guest now halts with interrupts off: little or nothing changes.
    std::thread::sleep(Duration::from_millis(200));
    let settle = reader.take().unwrap();
    let t = Instant::now();
    let idle = reader.take().unwrap();
    let idle_ms = t.elapsed().as_secs_f64() * 1e6;
    let idle_pages: Vec<u64> = idle.dirty_pages().collect();
    eprintln!(
        "halted guest: {} then {} dirty pages {idle_pages:x?}; 256 MiB: first call {first_ms:.0} µs, \
         fetch {fetch_ms:.0} µs, idle fetch {idle_ms:.0} µs",
        settle.count(),
        idle.count()
    );
    assert!(idle.count() <= 4, "{idle_pages:x?}");

    // The guest's memory, as introspection reads it: the ELF's first bytes land
    // at 1 MiB, where it is linked.
    let mem = inspect.guest_memory();
    assert_eq!(
        mem.iter()
            .map(vm_memory::GuestMemoryRegion::len)
            .sum::<u64>(),
        256 * MIB
    );
    let mut word = [0u8; 4];
    mem.read_slice(&mut word, GuestAddress(0x10_0000)).unwrap();

    // The VMM's own writes count (KVM logs only the guest's): a host write to a
    // page the guest never touches is in the next take, and only there.
    mem.write_obj(0x5a5a_u16, GuestAddress(200 * MIB + 0x10))
        .unwrap();
    let host = reader.take().unwrap();
    assert!(
        host.is_dirty(200 * MIB),
        "{:x?}",
        host.dirty_pages().collect::<Vec<_>>()
    );
    assert!(!reader.take().unwrap().is_dirty(200 * MIB));

    // Gone, then back: the snapshots' own reader and the metrics' (the write
    // rate) stay (KVM keeps logging; turning it off with the last reader is
    // tracker.rs's unit test), and a new reader's first take is a full log again.
    drop(reader);
    assert_eq!(inspect.dirty_log().readers(), 2);
    let reader = inspect.dirty_log().subscribe().unwrap();
    assert!(reader.take().unwrap().is_all());
    assert!(!reader.take().unwrap().is_all());
    drop(reader);

    control.stop(libc::SIGTERM);
    assert!(matches!(running.wait(), VmOutcome::Stopped(libc::SIGTERM)));
    let _ = std::fs::remove_file(&console);
}

#[test]
fn dirty_log_covers_both_ram_slots_around_the_mmio_hole() {
    let console = console_path("dirty-high");
    // 3 GiB below the MMIO hole (slot 0), 128 MiB from 4 GiB (slot 1).
    let vm = vigil_vmm::builder::build(&config("test=user,memory,hang", 3200, &console))
        .expect("build the VM");
    let running = vm.start().expect("start the VM");
    let control = running.control();
    wait_console(&console, "user: running at cpl3");
    let reader = running.inspect().dirty_log().subscribe().unwrap();
    let first = reader.take().unwrap();
    assert_eq!(first.count(), (3200 * MIB / 4096) as usize);
    assert!(first.is_dirty(0x1_07ff_f000));
    assert!(!first.is_dirty(0xc000_0000), "the MMIO hole is not RAM");
    wait_console(&console, "TEST memory PASS");
    let t = Instant::now();
    let written = reader.take().unwrap();
    let fetch_us = t.elapsed().as_secs_f64() * 1e6;
    let listed: Vec<u64> = written.dirty_pages().collect();
    eprintln!("3200 MiB: fetch {fetch_us:.0} µs, dirty {listed:x?}");
    for gpa in [0xbfff_f000, 0x1_0000_0000, 0x1_07ff_f000] {
        assert!(written.is_dirty(gpa), "{gpa:#x} not in {listed:x?}");
    }
    assert!(!written.is_dirty(0x1_0400_0000), "{listed:x?}");
    control.stop(libc::SIGTERM);
    assert!(matches!(running.wait(), VmOutcome::Stopped(libc::SIGTERM)));
    let _ = std::fs::remove_file(&console);
}

#[test]
fn a_crashed_vm_is_kept_paused_for_inspection() {
    let console = console_path("crash");
    let mut config = config("test=serial,triple-fault", 64, &console);
    config.machine.vcpu_count = 2;
    config.on_crash = OnCrash::Pause;
    let running = vigil_vmm::builder::build(&config)
        .expect("build the VM")
        .start()
        .expect("start the VM");
    let control = running.control();
    let inspect = running.inspect();
    let deadline = Instant::now() + TIMEOUT;
    while control.crashed().is_none() {
        assert!(Instant::now() < deadline, "no crash");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(control.state(), RunState::Paused);
    let why = control.crashed().unwrap();
    assert_eq!(why, "vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)");
    let err = control.resume().unwrap_err();
    assert!(matches!(err, ControlError::Crashed(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "the VM crashed (vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)); it is kept for inspection and cannot resume"
    );

    // The waiting thread hears of the crash at once and parks the other vCPU.
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        running.wait_reporting(&mut |report| {
            let _ = tx.send(report.render(&|_| None));
        })
    });
    let report = rx
        .recv_timeout(TIMEOUT)
        .expect("the crash reported at once");
    assert!(
        report.starts_with("vCPU 0 crashed: triple fault"),
        "{report}"
    );
    // Pause works (every vCPU is parked already); the state stays Paused.
    control.pause().unwrap();
    assert_eq!(control.state(), RunState::Paused);
    // Nothing runs: after the first dirty log, the next one is empty.
    let reader = inspect.dirty_log().subscribe().unwrap();
    assert!(reader.take().unwrap().is_all());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(reader.take().unwrap().count(), 0);
    assert!(control.resume().is_err());
    assert!(!waiter.is_finished(), "the VM stays until it is stopped");

    control.stop(libc::SIGTERM);
    match waiter.join().unwrap() {
        VmOutcome::Crashed(r) => assert_eq!(r.vcpu, 0),
        other => panic!("ended as {other:?}"),
    }
    assert!(rx.try_recv().is_err(), "one crash, one report");
    let _ = std::fs::remove_file(&console);
}
