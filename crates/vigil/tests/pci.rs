//! `--enable-pci` end to end: the test guest finds PCI bus 0 through the ACPI
//! MCFG, enumerates it, finds the virtio devices there (and none on
//! virtio-mmio), sizes their BARs, and runs the virtio scenarios unchanged over
//! virtio-pci, a used buffer raising an MSI-X vector; `vigil firecracker
//! --enable-pci` does the same, and a snapshot of such a VM is refused by name.

mod common;

use std::path::Path;

use common::mobility::{ok, TIMEOUT};
use common::{run, scratch, Console};
use serde_json::json;

/// The test guest's write pattern (guest/README.md).
fn pattern_byte(sector: usize, i: usize) -> u8 {
    ((sector * 31 + i * 7 + 0x5a) & 0xff) as u8
}

fn pass_detail<'a>(r: &'a common::Run, name: &str) -> &'a str {
    let line = r.line(&format!("TEST {name} "));
    line.strip_prefix(&format!("TEST {name} PASS"))
        .unwrap_or_else(|| panic!("{name} did not pass: {line}\n{r}"))
        .trim()
}

fn disk(dir: &Path) -> String {
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    image.to_str().unwrap().to_owned()
}

#[test]
fn the_guest_drives_blk_rng_and_balloon_over_pci_with_msix() {
    let dir = scratch("pci-virtio");
    let image = disk(&dir);
    let r = run(
        &[
            "run",
            "--enable-pci",
            "--disk",
            &format!("path={image},id=vigil-disk0"),
            "--rng",
            "--balloon",
            "size_mib=16",
            "--cmdline",
            "test=pci,blk,rng,balloon,virtio-evil",
        ],
        TIMEOUT,
    );
    // Slot 0 is the host bridge; the devices follow in attach order (disks, rng,
    // balloon), each with a 32 KiB BAR in the PCI window; none on virtio-mmio.
    let pci = pass_detail(&r, "pci");
    assert!(
        pci.starts_with(
            "devices=1:2:0xc0008000/0x8000,2:4:0xc0010000/0x8000,3:5:0xc0018000/0x8000, mmio=0 \
             capacity=2048 id=vigil-disk0 flush=1 msix="
        ),
        "{r}"
    );
    assert_eq!(
        pass_detail(&r, "blk"),
        "capacity=2048 id=vigil-disk0 flush=1"
    );
    assert_eq!(pass_detail(&r, "rng"), "bytes=128");
    assert!(pass_detail(&r, "balloon").starts_with("pages=4096"), "{r}");
    // A hostile driver's broken requests are answered safely over PCI too.
    assert!(
        pass_detail(&r, "virtio-evil").ends_with("recovered=5"),
        "{r}"
    );
    assert_eq!(r.code, Some(0), "{r}");
    let bytes = std::fs::read(&image).unwrap();
    for s in 0..8 {
        for i in 0..512 {
            assert_eq!(
                bytes[s * 512 + i],
                pattern_byte(s, i),
                "sector {s} byte {i}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn without_the_flag_the_devices_stay_on_virtio_mmio() {
    let dir = scratch("pci-off");
    let image = disk(&dir);
    let r = run(
        &[
            "run",
            "--disk",
            &format!("path={image}"),
            "--cmdline",
            "test=pci",
        ],
        TIMEOUT,
    );
    // No MCFG, so no PCI devices: the guest finds its disk on virtio-mmio, and
    // the scenario fails for want of an MSI-X interrupt.
    assert!(
        r.line("TEST pci ")
            .starts_with("TEST pci FAIL devices= mmio=1 "),
        "{r}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Firecracker's `--enable-pci` is honoured; a snapshot of the PCI VM loads in
/// another process (which needs no flag: the state says PCI), whose guest
/// counts on.
#[test]
fn firecracker_enable_pci_boots_on_pci_and_its_snapshot_loads() {
    let dir = scratch("pci-firecracker");
    let image = disk(&dir);
    let sock = dir.join("fc.sock");
    let mut console = Console::spawn(&[
        "firecracker",
        "--api-sock",
        sock.to_str().unwrap(),
        "--enable-pci",
    ]);
    common::http::wait_for(&sock, TIMEOUT);
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": vigil_test_guest::ELF_PATH, "boot_args": "test=pci,counter"}),
    );
    ok(
        &sock,
        "PUT",
        "/drives/disk",
        json!({"drive_id": "disk", "path_on_host": image, "is_root_device": false, "is_read_only": false}),
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    console.wait_for(&["counter: 3"], TIMEOUT);
    let seen = &console.seen;
    assert!(
        seen.contains("TEST pci PASS devices=1:2:0xc0008000/0x8000, mmio=0 "),
        "{seen}"
    );
    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    let (state, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    ok(
        &sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": mem}),
    );
    ok(&sock, "PATCH", "/vm", json!({"state": "Resumed"}));
    console.wait_for(&["counter: 5"], TIMEOUT);
    drop(console);

    let sock = dir.join("restored.sock");
    let mut restored = Console::spawn(&["firecracker", "--api-sock", sock.to_str().unwrap()]);
    common::http::wait_for(&sock, TIMEOUT);
    ok(
        &sock,
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": true}),
    );
    let line = restored.wait_for(&["counter: "], TIMEOUT);
    let next: u64 = line["counter: ".len()..].trim().parse().unwrap();
    assert!(
        (4..=5).contains(&next),
        "counts on from the snapshot: {line}"
    );
    restored.wait_for(&[&format!("counter: {}", next + 2)], TIMEOUT);
    assert!(!restored.seen.contains("TEST"), "{}", restored.seen);
    std::fs::remove_dir_all(&dir).ok();
}
