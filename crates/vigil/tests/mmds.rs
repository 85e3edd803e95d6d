//! MMDS end to end: `vigil firecracker` configured through its API (an
//! interface on a tap, `PUT /mmds/config`, `PUT /mmds`), then the test guest's
//! `mmds` scenario reaches the metadata service through that interface (ARP,
//! TCP, HTTP) and prints what it got; `PATCH /mmds` after boot is seen by the
//! guest. Needs root and /dev/net/tun (for the tap); skipped otherwise.

mod common;

use std::path::Path;

use common::http::{request, wait_for};
use common::mobility::ok;
use common::tap::{can_use_tun, in_netns, TestTap};
use common::{scratch, Console, Run, TIMEOUT};
use serde_json::json;

fn refused(sock: &Path, method: &str, path: &str, body: serde_json::Value, needle: &str) {
    let a = request(sock, method, path, &body.to_string());
    assert_eq!(a.status, 400, "{method} {path} {body}: {a:?}");
    assert!(
        a.fault().contains(needle),
        "{method} {path}: {a:?} lacks {needle:?}"
    );
}

/// Boots the `mmds` scenario with MMDS `version` on a fresh tap; the store
/// holds `ami-id` "ami-12345", patched to "ami-patched" when the guest asks.
fn boot_mmds(version: &str) -> Option<Run> {
    if !can_use_tun() {
        return None;
    }
    let name = format!("vgmd{version}{}", std::process::id() % 10_000);
    let tap = match TestTap::create(&name) {
        Ok(tap) => tap,
        Err(e) => {
            eprintln!("SKIP: cannot create tap {name}: {e}");
            return None;
        }
    };
    let dir = scratch(&format!("mmds-{version}"));
    let sock = dir.join("api.sock");
    let mut console = Console::spawn(&[
        "firecracker",
        "--api-sock",
        sock.to_str().unwrap(),
        "--mmds-size-limit",
        "1024",
    ]);
    wait_for(&sock, TIMEOUT);
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": vigil_test_guest::ELF_PATH, "boot_args": "test=mmds"}),
    );
    refused(
        &sock,
        "PUT",
        "/mmds/config",
        json!({"network_interfaces": ["eth0"]}),
        "network_interfaces \"eth0\": the VM has no network interface",
    );
    ok(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": tap.name()}),
    );
    refused(
        &sock,
        "PUT",
        "/mmds/config",
        json!({"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}),
        "ipv4_address 10.0.0.1",
    );
    ok(
        &sock,
        "PUT",
        "/mmds/config",
        json!({"version": version, "network_interfaces": ["eth0"]}),
    );
    ok(
        &sock,
        "PUT",
        "/mmds",
        json!({"latest": {"meta-data": {"ami-id": "ami-12345", "tags": {"team": "vigil"}}}}),
    );
    refused(
        &sock,
        "PATCH",
        "/mmds",
        json!({"latest": {"big": "x".repeat(1024)}}),
        "over its limit of 1024 bytes",
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    refused(
        &sock,
        "PUT",
        "/mmds/config",
        json!({"network_interfaces": ["eth0"]}),
        "only be done before the VM starts",
    );
    console.wait_for(&["mmds: ready patch"], TIMEOUT);
    // Every frame the guest sent went to MMDS: none reached the tap.
    let metrics = request(&sock, "GET", "/vigil/metrics", "").json();
    let net = &metrics["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == "net")
        .unwrap_or_else(|| panic!("no net device: {metrics}"));
    assert_eq!(net["ops_out"], 0, "{net}");
    assert!(net["ops_other"].as_u64().unwrap() >= 10, "{net}");
    assert!(net["ops_in"].as_u64().unwrap() >= 10, "{net}");
    ok(
        &sock,
        "PATCH",
        "/mmds",
        json!({"latest": {"meta-data": {"ami-id": "ami-patched"}}}),
    );
    let store = request(&sock, "GET", "/mmds", "").json();
    assert_eq!(store["latest"]["meta-data"]["ami-id"], "ami-patched");
    console.send(b"g");
    let run = console.finish(TIMEOUT);
    drop(tap);
    assert_eq!(run.code, Some(0), "{run}");
    run.line("TEST mmds PASS");
    run.line("mmds: arp mac=06:01:23:45:67:01");
    Some(run)
}

#[test]
fn mmds_v1_answers_the_guest_and_sees_a_patch() {
    in_netns(|| {
        let Some(run) = boot_mmds("V1") else {
            return;
        };
        run.line("mmds: get status=200 body=ami-12345");
        run.line(r#"mmds: json status=200 body={"meta-data":{"ami-id":"ami-12345","tags":{"team":"vigil"}}}"#);
        run.line("mmds: list status=200 body=ami-id,tags/");
        run.line("mmds: missing status=404");
        run.line("mmds: after-patch status=200 body=ami-patched");
        run.line("TEST mmds PASS version=V1");
    });
}

#[test]
fn mmds_v2_needs_a_live_token() {
    in_netns(|| {
        let Some(run) = boot_mmds("V2") else {
            return;
        };
        run.line("mmds: get status=401");
        run.line("mmds: forwarded status=400");
        assert_eq!(
            run.lines_starting("mmds: token status=200 body=").len(),
            2,
            "{run}"
        );
        run.line("mmds: get-token status=200 body=ami-12345");
        run.line("mmds: expired status=401");
        run.line("mmds: after-patch status=200 body=ami-patched");
        run.line("TEST mmds PASS version=V2");
    });
}

/// A snapshot keeps which interfaces reach MMDS and how (not the data store,
/// as in Firecracker): the restored guest's next request reaches the loading
/// process's store, filled after the load.
#[test]
fn a_restored_guest_reaches_the_mmds_of_the_loading_process() {
    in_netns(|| {
        if !can_use_tun() {
            return;
        }
        let tap = TestTap::create(&format!("vgmr{}", std::process::id() % 10_000))
            .expect("a tap in the test's namespace");
        let dir = scratch("mmds-restore");
        let sock = dir.join("source.sock");
        let mut source = Console::spawn(&["firecracker", "--api-sock", sock.to_str().unwrap()]);
        wait_for(&sock, TIMEOUT);
        for (path, body) in [
            (
                "/boot-source",
                json!({"kernel_image_path": vigil_test_guest::ELF_PATH, "boot_args": "test=mmds"}),
            ),
            (
                "/network-interfaces/eth0",
                json!({"iface_id": "eth0", "host_dev_name": tap.name()}),
            ),
            (
                "/mmds/config",
                json!({"version": "V1", "network_interfaces": ["eth0"]}),
            ),
            (
                "/mmds",
                json!({"latest": {"meta-data": {"ami-id": "ami-12345"}}}),
            ),
            ("/actions", json!({"action_type": "InstanceStart"})),
        ] {
            ok(&sock, "PUT", path, body);
        }
        source.wait_for(&["mmds: ready patch"], TIMEOUT);
        ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
        let (state, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
        ok(
            &sock,
            "PUT",
            "/snapshot/create",
            json!({"snapshot_path": state, "mem_file_path": mem}),
        );
        drop(source);

        let sock = dir.join("restored.sock");
        let mut restored = Console::spawn(&["firecracker", "--api-sock", sock.to_str().unwrap()]);
        wait_for(&sock, TIMEOUT);
        ok(
            &sock,
            "PUT",
            "/snapshot/load",
            json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": true}),
        );
        assert_eq!(
            request(&sock, "GET", "/mmds", "").json(),
            json!({}),
            "no data carried"
        );
        ok(
            &sock,
            "PUT",
            "/mmds",
            json!({"latest": {"meta-data": {"ami-id": "ami-restored"}}}),
        );
        restored.send(b"g");
        let run = restored.finish(TIMEOUT);
        drop(tap);
        assert_eq!(run.code, Some(0), "{run}");
        run.line("mmds: after-patch status=200 body=ami-restored");
        run.line("TEST mmds PASS version=V1");
        std::fs::remove_dir_all(&dir).ok();
    });
}
