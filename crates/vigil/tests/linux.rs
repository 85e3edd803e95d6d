//! Boots the small Linux 6.1 kernel from `../shared/guest-kernels` as far as this
//! machine's KVM lets it, and all the way to userspace where KVM is hardware-backed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::tap::{in_new_netns, TestTap};
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
        // Huge pages, so that Linux boots on them end to end too (on the build
        // machines they make its boot no faster: BENCHMARKS.md, "Huge pages").
        "--huge-pages",
        "thp",
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
    let rip = r.rip_line();
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

/// With `--on-crash pause`, the kernel that stops on `xrstor` stays, paused, for
/// inspection until it is stopped; RIP is named from the vmlinux's own symbols.
#[test]
fn linux_emulation_failure_is_kept_paused_with_on_crash_pause() {
    use common::http::{request, wait_for};
    let Some((vmlinux, _map)) = common::tiny_linux() else {
        return;
    };
    if hardware_kvm() {
        eprintln!("SKIP: hardware KVM runs xrstor; the kernel does not crash there");
        return;
    }
    let sock =
        std::env::temp_dir().join(format!("vigil-linux-oncrash-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut child = common::linux_kept_at_its_crash(&vmlinux, &sock)
        .spawn()
        .expect("spawn vigil");
    wait_for(&sock, Duration::from_secs(10));
    let deadline = std::time::Instant::now() + LINUX_TIMEOUT;
    loop {
        let info = request(&sock, "GET", "/", "").json();
        if info["state"] == "Paused" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "{info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "vigil stays up after the crash"
    );
    let resume = request(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(resume.status, 400, "{resume:?}");
    // SAFETY: the pid is our child's, which is still running.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let r = common::finish(child, Duration::from_secs(30));
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stdout.contains("Linux version 6.1."), "{r}");
    assert_eq!(
        r.stderr
            .matches("vCPU 0 crashed: emulation failure (KVM_EXIT_INTERNAL_ERROR")
            .count(),
        2,
        "the report at the crash and at the end: {r}"
    );
    assert!(r.stderr.contains("kept, paused, for inspection"), "{r}");
    let rip = r.rip_line();
    assert!(
        rip.contains("<fpu__"),
        "named from the vmlinux .symtab: {rip}\n{r}"
    );
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

/// A static `/init` (with libc) that mounts the ext4 disk on /dev/vda, reads the
/// file the host put there and writes one back, brings eth0 up and pings the host
/// side of the tap, then powers off.
const DEVICES_INIT_C: &str = r#"
#include <arpa/inet.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/ip_icmp.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

static void set_addr(int s, unsigned long req, const char *ip) {
    struct ifreq ifr = {0};
    struct sockaddr_in *a = (struct sockaddr_in *)&ifr.ifr_addr;
    strcpy(ifr.ifr_name, "eth0");
    a->sin_family = AF_INET;
    inet_pton(AF_INET, ip, &a->sin_addr);
    if (ioctl(s, req, &ifr)) printf("VIGIL-NET-FAIL ioctl %lx: %m\n", req);
}

static unsigned short csum(const void *p, int n) {
    const unsigned short *w = p;
    unsigned long sum = 0;
    for (; n > 1; n -= 2) sum += *w++;
    if (n) sum += *(const unsigned char *)w;
    sum = (sum >> 16) + (sum & 0xffff);
    return ~(sum + (sum >> 16));
}

static void disk(void) {
    char buf[128] = {0};
    mkdir("/mnt", 0755);
    if (mount("/dev/vda", "/mnt", "ext4", 0, 0)) { printf("VIGIL-MOUNT-FAIL %m\n"); return; }
    int fd = open("/mnt/hello.txt", O_RDONLY);
    if (fd < 0 || read(fd, buf, sizeof buf - 1) < 0) { printf("VIGIL-MOUNT-FAIL read: %m\n"); return; }
    close(fd);
    buf[strcspn(buf, "\n")] = 0;
    fd = open("/mnt/from-guest.txt", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, "written by the guest\n", 21) != 21) printf("VIGIL-MOUNT-FAIL write: %m\n");
    close(fd);
    if (umount("/mnt")) printf("VIGIL-MOUNT-FAIL umount: %m\n");
    else printf("VIGIL-MOUNT-OK %s\n", buf);
}

static void ping(void) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    set_addr(s, SIOCSIFADDR, GUEST_IP);
    set_addr(s, SIOCSIFNETMASK, "255.255.255.0");
    struct ifreq ifr = {0};
    strcpy(ifr.ifr_name, "eth0");
    ioctl(s, SIOCGIFFLAGS, &ifr);
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr)) printf("VIGIL-NET-FAIL up: %m\n");
    int r = socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
    struct timeval tv = {1, 0};
    setsockopt(r, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in host = {.sin_family = AF_INET};
    inet_pton(AF_INET, HOST_IP, &host.sin_addr);
    for (int seq = 1; seq <= 20; seq++) {
        struct icmphdr req = {.type = ICMP_ECHO, .un.echo = {.id = htons(0x7167), .sequence = htons(seq)}};
        req.checksum = csum(&req, sizeof req);
        sendto(r, &req, sizeof req, 0, (struct sockaddr *)&host, sizeof host);
        unsigned char reply[1500];
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        long n = recvfrom(r, reply, sizeof reply, 0, (struct sockaddr *)&from, &len);
        if (n < (long)(sizeof(struct iphdr) + sizeof(struct icmphdr))) continue;
        struct icmphdr *ic = (struct icmphdr *)(reply + ((struct iphdr *)reply)->ihl * 4);
        if (ic->type == ICMP_ECHOREPLY && from.sin_addr.s_addr == host.sin_addr.s_addr) {
            printf("VIGIL-PING-OK seq=%d from %s\n", seq, HOST_IP);
            return;
        }
    }
    printf("VIGIL-PING-FAIL no reply from %s\n", HOST_IP);
}

int main(void) {
    int con = open("/dev/console", O_RDWR);
    dup2(con, 1);
    dup2(con, 2);
    setvbuf(stdout, 0, _IONBF, 0);
    mkdir("/dev", 0755);
    mount("devtmpfs", "/dev", "devtmpfs", 0, 0);
    disk();
    ping();
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
"#;

const GUEST_IP: &str = "10.213.7.2";
const HOST_IP: &str = "10.213.7.1";

/// Compiles `source` into a static binary at `out`.
fn compile_static(source: &str, flags: &[&str], out: &Path) {
    let src = out.with_extension("c");
    std::fs::write(&src, source).unwrap();
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(out)
        .arg(&src)
        .args(flags)
        .status()
        .expect("gcc");
    assert!(status.success(), "gcc failed on {}", src.display());
}

fn build_initramfs(dir: &Path, init: &Path) -> PathBuf {
    let initramfs = dir.join("initramfs.cpio");
    write_initramfs(&std::fs::read(init).unwrap(), &initramfs);
    initramfs
}

fn hello_init(dir: &Path) -> PathBuf {
    let bin = dir.join("init-hello");
    compile_static(INIT_C, &["-nostdlib", "-fno-stack-protector"], &bin);
    bin
}

fn devices_init(dir: &Path) -> PathBuf {
    let bin = dir.join("init-devices");
    let (guest, host) = (
        format!("-DGUEST_IP=\"{GUEST_IP}\""),
        format!("-DHOST_IP=\"{HOST_IP}\""),
    );
    compile_static(DEVICES_INIT_C, &[&guest, &host], &bin);
    bin
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
            "--huge-pages",
            "thp",
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

/// With `--enable-pci` the kernel finds PCI bus 0 through ACPI alone (the MCFG,
/// its window reserved by a motherboard resource; the `PCI0` root bridge and its
/// BAR window), enumerates the virtio functions where Vigil placed them, and
/// binds virtio-blk over virtio-pci (this kernel has no `CONFIG_PCI_MSI`: on
/// INTA, routed by `_PRT`); nothing is declared on its command line.
#[test]
fn linux_finds_the_virtio_devices_on_pci() {
    let Some((vmlinux, _)) = common::tiny_linux() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("vigil-linux-pci-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rw = dir.join("rw.img");
    std::fs::File::create(&rw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let rw_arg = format!("path={}", rw.display());
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
            "--rng",
            "--enable-pci",
            "--huge-pages",
            "thp",
            "--cmdline",
            cmdline,
        ],
        &["[vda]"],
        Duration::from_secs(600),
    );
    std::fs::remove_dir_all(&dir).ok();
    assert!(!r.line("Command line: ").contains("virtio_mmio"), "{r}");
    for line in [
        "PCI: MMCONFIG at [mem 0xe0000000-0xe00fffff] reserved in ACPI motherboard resources",
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00])",
        "pci_bus 0000:00: root bus resource [mem 0xc0000000-0xcfffffff window]",
        "pci 0000:00:00.0: [1b36:0008] type 00 class 0x060000",
        "pci 0000:00:01.0: [1af4:1042] type 00 class 0x018000",
        "pci 0000:00:01.0: BAR 0 [mem 0xc0008000-0xc000ffff 64bit]",
        "pci 0000:00:02.0: [1af4:1044] type 00 class 0xff0000",
        "virtio_blk virtio0: [vda] 131072 512-byte logical blocks",
    ] {
        assert!(r.stdout.contains(line), "{line}\n{r}");
    }
    assert!(!r.stdout.contains("virtio-mmio: Registering"), "{r}");
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
    let initramfs = build_initramfs(&dir, &hello_init(&dir));
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
fn linux_mounts_a_disk_and_pings_over_a_tap_on_hardware_kvm() {
    let Some((vmlinux, map)) = common::tiny_linux() else {
        return;
    };
    if !hardware_kvm() {
        eprintln!(
            "SKIP: /dev/kvm here is kvm_pvm; Linux cannot reach user space on it (see \
             linux_boots_to_userspace_on_hardware_kvm)"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("vigil-linux-devices-{}", std::process::id()));
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    let greeting = format!("hello from the host {}", std::process::id());
    std::fs::write(content.join("hello.txt"), format!("{greeting}\n")).unwrap();
    let image = dir.join("disk.ext4");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&image)
        .arg("16M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(mkfs.success(), "mkfs.ext4 failed");
    let initramfs = build_initramfs(&dir, &devices_init(&dir));
    let cmdline = "console=ttyS0 earlyprintk=serial panic=-1";
    // The tap, its address and the VM live in a network namespace of their own.
    let booted = in_new_netns(|| {
        let tap = TestTap::create("vigil-lx0")?;
        tap.set_ipv4(HOST_IP.parse().unwrap())?;
        Ok::<_, std::io::Error>(boot_linux(
            &vmlinux,
            &map,
            &[
                "--initrd",
                initramfs.to_str().unwrap(),
                "--disk",
                &format!("path={}", image.display()),
                "--net",
                "tap=vigil-lx0",
            ],
            cmdline,
        ))
    });
    let r = match booted.and_then(|r| r) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "SKIP: no network namespace with a tap here (needs root and /dev/net/tun): {e}"
            );
            std::fs::remove_dir_all(&dir).ok();
            return;
        }
    };
    assert_early_boot(&r, cmdline);
    assert_eq!(
        r.line("VIGIL-MOUNT-OK"),
        format!("VIGIL-MOUNT-OK {greeting}"),
        "{r}"
    );
    assert!(r.line("VIGIL-PING-OK").ends_with(HOST_IP), "{r}");
    assert_eq!(r.code, Some(0), "init powered the VM off through ACPI: {r}");
    // What the guest wrote reached the image file.
    let cat = Command::new("debugfs")
        .args(["-R", "cat /from-guest.txt"])
        .arg(&image)
        .output()
        .expect("debugfs (e2fsprogs)");
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout),
        "written by the guest\n",
        "{}",
        String::from_utf8_lossy(&cat.stderr)
    );
}

#[test]
fn hardware_only_init_programs_compile() {
    // The programs the hardware-KVM tests boot, built here too so that they cannot
    // rot where those tests skip.
    let dir = std::env::temp_dir().join(format!("vigil-init-build-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for init in [hello_init(&dir), devices_init(&dir)] {
        let elf = std::fs::read(&init).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF", "{}", init.display());
    }
    std::fs::remove_dir_all(&dir).ok();
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
