//! The per-VM API fuzzed from its own OpenAPI document (`GET
//! /vigil/openapi.yaml`) by schemathesis (property-based: valid and invalid
//! bodies, paths, parameters and methods for every operation): with the VMM
//! waiting for its configuration, and with the test guest running. Every
//! answer must be one the document allows (no 5xx, a documented status,
//! content type and body), and the VMM must come out of it serving, with the
//! running guest still counting. Skipped, saying so, where `python3 -m
//! schemathesis.cli` is not installed (`.ci/run` installs it).
//!
//! `VIGIL_API_FUZZ_SECONDS` (30 per run by default) and `VIGIL_API_FUZZ_SEED`
//! (fixed by default, so that a failure is reproducible) change the run.

mod common;

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::http::{request, wait_for};
use common::{scratch, Console, TIMEOUT};

/// The checks of every answer: schemathesis' names.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance";

/// `python3 -m schemathesis.cli`, or `None` (and a message) when it is not
/// installed.
fn schemathesis() -> Option<Command> {
    let installed = Command::new("python3")
        .args(["-m", "schemathesis.cli", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!(
            "SKIP: the API fuzz run needs schemathesis (pip install schemathesis; .ci/run pins it)"
        );
        return None;
    }
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "schemathesis.cli"]);
    Some(cmd)
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?}: expected a whole number"))
        })
        .unwrap_or(default)
}

/// Schemathesis speaks HTTP over TCP only: a loopback port whose connections
/// are each spliced to the API's Unix socket. Returns the port.
fn forward_to(sock: &Path) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let port = listener.local_addr().unwrap().port();
    let sock = sock.to_path_buf();
    std::thread::spawn(move || {
        for tcp in listener.incoming().map_while(Result::ok) {
            match UnixStream::connect(&sock) {
                Ok(unix) => splice(tcp, unix),
                // The VMM is gone: the client sees the connection closed, and
                // the test finds the process ended.
                Err(_) => drop(tcp),
            }
        }
    });
    port
}

fn splice(tcp: TcpStream, unix: UnixStream) {
    let (mut tcp_in, mut unix_out) = (tcp.try_clone().unwrap(), unix.try_clone().unwrap());
    let (mut unix_in, mut tcp_out) = (unix, tcp);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut tcp_in, &mut unix_out);
        let _ = unix_out.shutdown(Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut unix_in, &mut tcp_out);
        let _ = tcp_out.shutdown(Shutdown::Write);
    });
}

/// Runs schemathesis against the API on `sock`, every operation but those
/// `excluded` (operation ids); panics with its report when it found anything.
/// Returns its report.
fn fuzz(st: Command, sock: &Path, dir: &Path, excluded: &[&str]) -> String {
    fuzz_with(st, sock, dir, None, CHECKS, excluded)
}

/// As [`fuzz`], from the API description at `schema` (a file; Vigil's own
/// document when `None`) with schemathesis' `checks`.
fn fuzz_with(
    mut st: Command,
    sock: &Path,
    dir: &Path,
    schema: Option<&Path>,
    checks: &str,
    excluded: &[&str],
) -> String {
    let port = forward_to(sock);
    let base = format!("http://127.0.0.1:{port}");
    let seconds = setting("VIGIL_API_FUZZ_SECONDS", 30);
    let seed = setting("VIGIL_API_FUZZ_SEED", 20260522);
    let schema = match schema {
        Some(file) => file.display().to_string(),
        None => format!("{base}{}", vigil_api::api::OPENAPI_PATH),
    };
    st.current_dir(dir)
        .arg("run")
        .arg(schema)
        .args(["--url", &base, "--checks", checks, "--workers", "1"])
        .args(["--max-time", &seconds.to_string()])
        .args(["--seed", &seed.to_string(), "--request-timeout", "20"]);
    for id in excluded {
        st.args(["--exclude-operation-id", id]);
    }
    let out = st.output().expect("run schemathesis");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("schemathesis (seed {seed}, {seconds} s):\n{report}");
    assert!(
        out.status.success(),
        "schemathesis found answers the document does not allow (seed {seed}):\n{report}"
    );
    report
}

/// `vigil run ARGS` in `dir` (where the files the fuzzed requests name land),
/// its API on `dir/api.sock`.
fn vigil_in(dir: &Path, args: &[&str]) -> (Console, PathBuf) {
    let sock = dir.join("api.sock");
    let mut cmd = common::vigil();
    cmd.current_dir(dir)
        .args(["run", "--api-sock"])
        .arg(&sock)
        .args(args);
    let console = Console::spawn_command(cmd);
    wait_for(&sock, TIMEOUT);
    (console, sock)
}

/// The VMM is still there and serving after the run.
fn still_serving(vigil: &mut Console, sock: &Path, report: &str) -> serde_json::Value {
    assert!(
        vigil.running(),
        "the VMM ended during the fuzz run\n{}\n{report}",
        vigil.poll()
    );
    let answer = request(sock, "GET", "/", "");
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.json()
}

#[test]
fn the_api_before_boot_answers_every_generated_request_as_documented() {
    let Some(st) = schemathesis() else {
        return;
    };
    let dir = scratch("api-fuzz-preboot");
    let (mut vigil, sock) = vigil_in(&dir, &[]);
    let report = fuzz(st, &sock, &dir, &[]);
    // Nothing it sent can have booted a VM: no kernel it could name exists.
    assert_eq!(
        still_serving(&mut vigil, &sock, &report)["state"],
        "Not started"
    );
    drop(vigil);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_api_of_a_running_vm_answers_every_generated_request_as_documented() {
    let Some(st) = schemathesis() else {
        return;
    };
    let dir = scratch("api-fuzz-running");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|mut f| f.write_all(&[7u8; 1 << 20]))
        .unwrap();
    let disk_arg = format!("path={},id=disk", disk.display());
    let (mut vigil, sock) = vigil_in(
        &dir,
        &[
            "--kernel",
            vigil_test_guest::ELF_PATH,
            "--cmdline",
            "test=counter",
            "--memory",
            "64",
            "--disk",
            &disk_arg,
            "--rng",
            "--balloon",
            "size_mib=0,stats_s=1",
        ],
    );
    vigil.wait_for(&["counter: 3"], TIMEOUT);
    // Every operation but PUT /actions, whose SendCtrlAltDel ends the test
    // guest (and with it the VMM) as asked.
    let report = fuzz(st, &sock, &dir, &["putAction"]);
    let state = still_serving(&mut vigil, &sock, &report)["state"].clone();
    // It may have paused the VM: the guest counts on once resumed.
    if state == "Paused" {
        let a = request(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
        assert_eq!(a.status, 204, "{a:?}");
    }
    let last = vigil
        .poll()
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("counter: ")?.parse::<u64>().ok())
        .expect("the guest counted");
    vigil.wait_for(&[&format!("counter: {}", last + 2)], TIMEOUT);
    assert!(!vigil.seen.contains("FAIL"), "{}", vigil.seen);
    drop(vigil);
    std::fs::remove_dir_all(&dir).ok();
}

/// Firecracker's own API description drives the fuzzing: every operation, with
/// the bodies Firecracker's clients are generated from. Served or refused (the
/// README's table), no request gets a 5xx, a status that description does not
/// allow, or an answer its schemas reject. Two documented differences are
/// applied to a copy: `vcpu_count` goes up to 254, not 32; and the content-type
/// check is left out, since Firecracker's 204 answers carry no body either.
#[test]
fn firecrackers_own_description_answered_as_it_says() {
    let Some(st) = schemathesis() else {
        return;
    };
    let theirs = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/firecracker-api/firecracker.yaml");
    let Ok(text) = std::fs::read_to_string(&theirs) else {
        eprintln!("SKIP: {} not found", theirs.display());
        return;
    };
    let vcpu_limit = "        minimum: 1\n        maximum: 32\n";
    assert_eq!(
        text.matches(vcpu_limit).count(),
        1,
        "vcpu_count's limit moved"
    );
    let dir = scratch("api-fuzz-firecracker");
    let schema = dir.join("firecracker.yaml");
    std::fs::write(
        &schema,
        text.replace(vcpu_limit, "        minimum: 1\n        maximum: 254\n"),
    )
    .unwrap();
    let (mut vigil, sock) = vigil_in(&dir, &[]);
    let checks = "not_a_server_error,status_code_conformance,response_schema_conformance";
    let report = fuzz_with(st, &sock, &dir, Some(&schema), checks, &[]);
    assert_eq!(
        still_serving(&mut vigil, &sock, &report)["state"],
        "Not started"
    );
    drop(vigil);
    std::fs::remove_dir_all(&dir).ok();
}
