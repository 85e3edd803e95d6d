//! Boots the small Linux 6.1 kernel from `../shared/guest-kernels` as far as this
//! machine's KVM lets it, and all the way to userspace where KVM is hardware-backed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{hardware_kvm, run, Run};
use vigil_vmm::arch::x86_64::layout::{e820_map, E820Type};

const MEMORY_MIB: u64 = 256;
const LINUX_TIMEOUT: Duration = Duration::from_secs(240);

/// The lines Linux prints for the e820 map Vigil builds.
fn expected_e820_lines() -> Vec<String> {
    e820_map(MEMORY_MIB << 20)
        .iter()
        .map(|e| {
            let kind = match e.kind {
                E820Type::Ram => "usable",
                E820Type::Reserved => "reserved",
            };
            format!(
                "BIOS-e820: [mem {:#018x}-{:#018x}] {kind}",
                e.addr,
                e.addr + e.size - 1
            )
        })
        .collect()
}

/// Boots `vmlinux` on 2 vCPUs and 256 MiB with `extra` options and `cmdline`.
fn boot_linux(vmlinux: &Path, map: &Path, extra: &[&str], cmdline: &str) -> Run {
    let memory = MEMORY_MIB.to_string();
    let base = [
        "run",
        "--kernel",
        vmlinux.to_str().unwrap(),
        "--symbols",
        map.to_str().unwrap(),
        "--cpus",
        "2",
        "--memory",
        &memory,
        "--cmdline",
        cmdline,
    ];
    run(&[&base[..], extra].concat(), LINUX_TIMEOUT)
}

fn assert_early_boot(r: &Run, cmdline: &str) {
    assert!(
        r.line("Linux version ").starts_with("Linux version 6.1."),
        "{r}"
    );
    assert_eq!(
        r.line("Command line: "),
        format!("Command line: {cmdline}"),
        "{r}"
    );
    let e820: Vec<&str> = r.lines_starting("BIOS-e820: ");
    assert_eq!(e820, expected_e820_lines(), "{r}");
    assert!(
        r.stdout
            .contains("ACPI: Using ACPI (MADT) for SMP configuration information"),
        "{r}"
    );
    assert!(
        r.stdout
            .contains("smpboot: Allowing 2 CPUs, 0 hotplug CPUs"),
        "{r}"
    );
    assert!(r.stdout.contains("Hypervisor detected: KVM"), "{r}");
}

/// On this machine's emulating KVM, offering XSAVE makes the kernel run `xrstor` at
/// CPL0, which the emulator lacks: a quick, deterministic crash to check reporting.
fn boot_until_emulation_failure(protocol: &str) {
    let Some((vmlinux, map)) = common::tiny_linux() else {
        return;
    };
    if hardware_kvm() {
        eprintln!("SKIP: hardware KVM runs xrstor; the emulation-failure report is checked on emulating hosts");
        return;
    }
    let cmdline = format!("console=ttyS0 earlyprintk=serial vigil.test=linux-{protocol}-7d3f");
    let r = boot_linux(
        &vmlinux,
        &map,
        &["--boot-protocol", protocol, "--cpu-template", "host"],
        &cmdline,
    );
    assert_early_boot(&r, &cmdline);
    assert_eq!(r.code, Some(3), "a guest crash: {r}");
    assert!(
        r.stderr
            .contains("vCPU 0 crashed: emulation failure (KVM_EXIT_INTERNAL_ERROR"),
        "{r}"
    );
    // RIP is named from the System.map, in the FPU set-up that runs xrstor.
    let rip = r
        .stderr
        .lines()
        .find(|l| l.trim_start().starts_with("RIP "))
        .expect("RIP line");
    assert!(rip.contains("<fpu__"), "{rip}\n{r}");
    assert!(r.stderr.contains("CS 0x0010 (CPL 0, 64-bit)"), "{r}");
}

#[test]
fn linux_pvh_boot_reports_the_platform_then_a_clean_crash() {
    boot_until_emulation_failure("pvh");
}

#[test]
fn linux_64bit_boot_protocol_reports_the_platform_then_a_clean_crash() {
    boot_until_emulation_failure("linux");
}

/// A static `/init` that says hello on the console and powers the machine off.
const INIT_C: &str = r#"
static long sys(long n, long a, long b, long c, long d) {
    long r;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return r;
}
void _start(void) {
    static const char msg[] = "VIGIL-USERSPACE-OK\n";
    long fd = sys(2, (long)"/dev/console", 1, 0, 0);
    sys(1, fd, (long)msg, sizeof msg - 1, 0);
    sys(169, 0xfee1dead, 672274793, 0x4321fedc, 0);
    for (;;) {}
}
"#;

/// Writes a newc cpio archive with `/init` and `/dev/console`.
fn write_initramfs(init: &[u8], out: &Path) {
    let mut cpio = Vec::new();
    let mut entry = |ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        cpio.extend_from_slice(header.as_bytes());
        cpio.extend_from_slice(name.as_bytes());
        cpio.push(0);
        while cpio.len() % 4 != 0 {
            cpio.push(0);
        }
        cpio.extend_from_slice(data);
        while cpio.len() % 4 != 0 {
            cpio.push(0);
        }
    };
    entry(1, "dev", 0o040755, (0, 0), &[]);
    entry(2, "dev/console", 0o020600, (5, 1), &[]);
    entry(3, "init", 0o100755, (0, 0), init);
    entry(0, "TRAILER!!!", 0, (0, 0), &[]);
    std::fs::write(out, cpio).unwrap();
}

fn build_initramfs(dir: &Path) -> PathBuf {
    let src = dir.join("init.c");
    let bin = dir.join("init");
    std::fs::write(&src, INIT_C).unwrap();
    let status = Command::new("gcc")
        .args(["-static", "-nostdlib", "-O2", "-fno-stack-protector", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("gcc");
    assert!(status.success(), "gcc failed");
    let initramfs = dir.join("initramfs.cpio");
    write_initramfs(&std::fs::read(&bin).unwrap(), &initramfs);
    initramfs
}

#[test]
fn linux_finds_the_virtio_devices_vigil_declares() {
    let Some((vmlinux, _)) = common::tiny_linux() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("vigil-linux-virtio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (rw, ro) = (dir.join("rw.img"), dir.join("ro.img"));
    std::fs::File::create(&rw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    std::fs::File::create(&ro)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let (rw_arg, ro_arg) = (
        format!("path={}", rw.display()),
        format!("path={},ro=on", ro.display()),
    );
    // This machine's KVM emulates the kernel's CPL0 code: offer it the paths the
    // emulator can run (see PLATFORM.md).
    let cmdline = "console=ttyS0 earlyprintk=serial noxsave clearcpuid=smap,smep,popcnt nopti";
    let r = common::run_until(
        &[
            "run",
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--memory",
            &MEMORY_MIB.to_string(),
            "--disk",
            &rw_arg,
            "--disk",
            &ro_arg,
            "--rng",
            "--cmdline",
            cmdline,
        ],
        &["[vda]", "[vdb]"],
        // The virtio drivers come late in this emulated boot (~1-2 min alone on a
        // build machine, several under load).
        Duration::from_secs(600),
    );
    std::fs::remove_dir_all(&dir).ok();
    // Declared on the command line (for kernels with VIRTIO_MMIO_CMDLINE_DEVICES)...
    for (i, base) in [0xd000_0000u64, 0xd000_1000, 0xd000_2000]
        .iter()
        .enumerate()
    {
        let word = format!("virtio_mmio.device=4K@{base:#x}:{}", 5 + i);
        assert!(r.line("Command line: ").contains(&word), "{word}\n{r}");
        let registered = format!(
            "virtio-mmio: Registering device virtio-mmio.{i} at {base:#x}-{:#x}, IRQ {}.",
            base + 0xfff,
            5 + i
        );
        assert!(r.stdout.contains(&registered), "{registered}\n{r}");
    }
    // ...and in the DSDT: the ACPI-enumerated devices are the ones that bind (the
    // command-line twins then find their windows taken), as on distribution kernels.
    assert!(
        r.stdout
            .contains("virtio_blk virtio0: [vda] 131072 512-byte logical blocks"),
        "{r}"
    );
    assert!(
        r.stdout
            .contains("virtio_blk virtio1: [vdb] 32768 512-byte logical blocks"),
        "{r}"
    );
}

#[test]
fn linux_boots_to_userspace_on_hardware_kvm() {
    let Some((vmlinux, map)) = common::tiny_linux() else {
        return;
    };
    if !hardware_kvm() {
        eprintln!(
            "SKIP: /dev/kvm here is kvm_pvm, which emulates guest kernel code and cannot carry \
             a user-space `syscall` into the kernel; this test runs where KVM is hardware-backed"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("vigil-linux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let initramfs = build_initramfs(&dir);
    let cmdline = "console=ttyS0 earlyprintk=serial panic=-1 vigil.test=linux-userspace-7d3f";
    let r = boot_linux(
        &vmlinux,
        &map,
        &["--initrd", initramfs.to_str().unwrap()],
        cmdline,
    );
    std::fs::remove_dir_all(&dir).ok();
    assert_early_boot(&r, cmdline);
    assert!(r.stdout.contains("smp: Brought up 1 node, 2 CPUs"), "{r}");
    assert!(r.stdout.contains("VIGIL-USERSPACE-OK"), "{r}");
    assert_eq!(r.code, Some(0), "init powered the VM off through ACPI: {r}");
}

#[test]
fn initramfs_archive_is_valid_cpio() {
    // The archive the hardware test boots, checked here with the cpio tool.
    let dir = std::env::temp_dir().join(format!("vigil-cpio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let archive = dir.join("a.cpio");
    write_initramfs(b"#!hello", &archive);
    let listing = Command::new("cpio")
        .args(["-itv", "-F"])
        .arg(&archive)
        .output();
    std::fs::remove_dir_all(&dir).ok();
    let Ok(listing) = listing else {
        eprintln!("SKIP: cpio not installed");
        return;
    };
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.status.success(), "{text}");
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert_eq!(names, vec!["dev", "dev/console", "init"], "{text}");
    assert!(text.contains("crw-------"), "{text}");
}
