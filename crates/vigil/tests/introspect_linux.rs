//! Introspection of a real Linux kernel (issue 5): the small Linux 6.1 kernel from
//! `../shared/guest-kernels`, kept paused where this machine's KVM stops it (the
//! `xrstor` of its FPU set-up, after `trap_init()` and `syscall_init()` have put
//! its IDT, GDT and LSTAR in place), looked at from outside through the API, then
//! tampered with through the debug API and each change reported by a check.
//!
//! On a hardware-backed KVM the kernel does not stop there, so that test skips.
//! Another boots it on two vCPUs, further: its second CPU is held to the boot
//! vCPU's values and gives no finding.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::http::{request, wait_for};
use common::{hardware_kvm, hex_u64, Console};
use serde_json::Value;
use vigil_vmm::symbols::SymbolTable;

/// Generous: the kernel reaches its `xrstor` within seconds here (about 20 s in a
/// debug build on a loaded machine).
const CRASH_TIMEOUT: Duration = Duration::from_secs(240);

fn hex(v: &Value) -> u64 {
    hex_u64(
        v.as_str()
            .unwrap_or_else(|| panic!("not a hex string: {v}")),
    )
}

/// A 64-bit interrupt gate (type 0xE, present, DPL 0) to `handler` through
/// code selector `selector`, as the CPU reads it from the IDT.
fn interrupt_gate(handler: u64, selector: u16, ist: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&selector.to_le_bytes());
    g[4] = ist & 7;
    g[5] = 0x8e;
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

/// Linux 6.1's exception vectors and the `asm_exc_*` entry points `idt_setup_traps`
/// and `idt_setup_early_traps` install. Vectors 18 (#MC) and 21 (#CP) are left out:
/// they are installed only with CONFIG_X86_MCE and CONFIG_X86_KERNEL_IBT, which the
/// tiny kernel lacks (its System.map has no `asm_exc_machine_check` or
/// `asm_exc_control_protection`), so those gates keep the early boot handlers
/// (`early_idt_handler_array+...`), like the reserved vectors 20 and 22 to 31.
const LINUX_GATES: &[(u8, &str)] = &[
    (0, "asm_exc_divide_error"),
    (1, "asm_exc_debug"),
    (2, "asm_exc_nmi"),
    (3, "asm_exc_int3"),
    (4, "asm_exc_overflow"),
    (5, "asm_exc_bounds"),
    (6, "asm_exc_invalid_op"),
    (7, "asm_exc_device_not_available"),
    (8, "asm_exc_double_fault"),
    (9, "asm_exc_coproc_segment_overrun"),
    (10, "asm_exc_invalid_tss"),
    (11, "asm_exc_segment_not_present"),
    (12, "asm_exc_stack_segment"),
    (13, "asm_exc_general_protection"),
    (14, "asm_exc_page_fault"),
    (15, "asm_exc_spurious_interrupt_bug"),
    (16, "asm_exc_coprocessor_error"),
    (17, "asm_exc_alignment_check"),
    (19, "asm_exc_simd_coprocessor_error"),
];

/// The system calls whose entry point in Linux 6.1's `syscall_64.tbl` is not
/// `__x64_sys_<name>`.
const ENTRY_POINTS: &[(&str, &str)] = &[
    ("stat", "__x64_sys_newstat"),
    ("fstat", "__x64_sys_newfstat"),
    ("lstat", "__x64_sys_newlstat"),
    ("sendfile", "__x64_sys_sendfile64"),
    ("uname", "__x64_sys_newuname"),
    ("umount2", "__x64_sys_umount"),
];

/// The one finding of `rule` among `findings`.
fn one<'a>(findings: &'a Value, rule: &str) -> &'a Value {
    let all: Vec<&Value> = findings
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {findings}"))
        .iter()
        .filter(|f| f["rule"] == rule)
        .collect();
    assert_eq!(all.len(), 1, "one {rule} finding: {findings:#}");
    all[0]
}

/// `PUT /vigil/introspect/check`, returning what is new.
fn check(sock: &Path) -> Value {
    let a = request(sock, "PUT", "/vigil/introspect/check", "");
    assert_eq!(a.status, 200, "{a:?}");
    a.json()
}

fn put(sock: &Path, path: &str, body: &str) {
    let a = request(sock, "PUT", path, body);
    assert!(a.status / 100 == 2, "PUT {path} {body}: {a:?}");
}

#[test]
fn linux_kernel_state_is_found_and_tampering_is_reported() {
    let Some((vmlinux, map_path)) = common::tiny_linux() else {
        return;
    };
    if hardware_kvm() {
        eprintln!(
            "SKIP: hardware KVM runs xrstor; the kernel does not stop early, so this test (which introspects it where this machine's emulating KVM stops it) does not apply"
        );
        return;
    }
    let map = SymbolTable::load(&map_path).expect("read System.map");
    let sym = |name: &str| -> u64 {
        map.address_of(name)
            .unwrap_or_else(|| panic!("{name} not in {}", map_path.display()))
    };
    let started = Instant::now();
    let sock = std::env::temp_dir().join(format!(
        "vigil-introspect-linux-{}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&sock);
    let mut child = common::linux_kept_at_its_crash(&vmlinux, &sock)
        .arg("--symbols")
        .arg(&map_path)
        .arg("--debug-api")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vigil");
    // Wait for the crash report on stderr, gathering it on a thread.
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let mut seen = String::new();
    let deadline = Instant::now() + CRASH_TIMEOUT;
    while !seen.contains("kept, paused") {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(s) => seen.push_str(&s),
            Err(_) => {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("vigil ended ({status}) before the crash: {seen}");
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("no crash within {CRASH_TIMEOUT:?}: {seen}");
                }
            }
        }
    }
    let crashed_after = started.elapsed();
    eprintln!("the kernel stopped on its emulation failure after {crashed_after:.1?}");
    assert!(
        seen.contains("vCPU 0 crashed: emulation failure (KVM_EXIT_INTERNAL_ERROR"),
        "{seen}"
    );
    wait_for(&sock, Duration::from_secs(10));

    // What the kernel looks like, through GET /vigil/introspect/state.
    let a = request(&sock, "GET", "/vigil/introspect/state", "");
    assert_eq!(a.status, 200, "{a:?}");
    let state = a.json();
    let cpu0 = &state["cpus"][0];
    assert_eq!(cpu0["vcpu"], 0, "{cpu0}");
    assert_eq!(cpu0["lstar_symbol"], "entry_SYSCALL_64+0x0", "{cpu0}");
    // A PVH boot of the vmlinux ELF starts the kernel where it was linked: nothing
    // decompresses or relocates it, so there is no KASLR and the slide is 0.
    assert_eq!(state["kaslr_slide"], 0, "{state:#}");
    assert_eq!(
        hex(&cpu0["lstar"]),
        sym("entry_SYSCALL_64"),
        "LSTAR is System.map's entry_SYSCALL_64 plus the slide (0)"
    );
    for p in ["wp", "nxe", "sce"] {
        assert!(
            cpu0["protections"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == p),
            "{p}: {cpu0}"
        );
    }
    assert_eq!(state["notes"], serde_json::json!([]), "{state:#}");

    // The exception gates at the asm_exc_* handlers.
    let idt = state["idt"].as_array().expect("idt");
    assert_eq!(idt.len(), 32, "{state:#}");
    for &(vector, handler) in LINUX_GATES {
        let g = &idt[usize::from(vector)];
        assert_eq!(g["vector"], vector, "{g}");
        assert_eq!(g["present"], true, "{g}");
        assert_eq!(g["linux_handler"], handler, "{g}");
        assert_eq!(g["symbol"], format!("{handler}+0x0"), "{g}");
        assert_eq!(hex(&g["handler"]), sym(handler), "{g}");
    }
    // Every gate for which the view names a Linux handler, and whose handler this
    // kernel has, points at it.
    for g in idt {
        if let Some(h) = g["linux_handler"].as_str() {
            if map.address_of(h).is_some() {
                assert_eq!(g["symbol"], format!("{h}+0x0"), "{g}");
            }
        }
    }

    // The system call table: 451 entries at __x64_sys_* functions.
    let table = state["syscall_table"].as_array().expect("syscall_table");
    assert_eq!(table.len(), 451, "Linux 6.1 has system calls 0 to 450");
    for (nr, e) in table.iter().enumerate() {
        assert_eq!(e["nr"], nr, "{e}");
        let s = e["symbol"]
            .as_str()
            .unwrap_or_else(|| panic!("no symbol: {e}"));
        assert!(
            s.starts_with("__x64_sys_") && s.ends_with("+0x0"),
            "sys_call_table[{nr}]: {e}"
        );
        if let Some(name) = e["name"].as_str() {
            // A named call is its entry point in syscall_64.tbl (mostly
            // __x64_sys_<name>) or, where not built in, ni_syscall.
            let entry = ENTRY_POINTS
                .iter()
                .find(|(n, _)| *n == name)
                .map_or_else(|| format!("__x64_sys_{name}"), |(_, sym)| sym.to_string());
            assert!(
                s == format!("{entry}+0x0") || s == "__x64_sys_ni_syscall+0x0",
                "sys_call_table[{nr}]: {e}"
            );
        } else {
            // 335..=423 are unused in the x86-64 table.
            assert_eq!(s, "__x64_sys_ni_syscall+0x0", "sys_call_table[{nr}]: {e}");
        }
    }
    assert_eq!(table[0]["symbol"], "__x64_sys_read+0x0");
    assert_eq!(table[1]["symbol"], "__x64_sys_write+0x0");
    assert_eq!(table[335]["symbol"], "__x64_sys_ni_syscall+0x0");

    // Baseline now.
    put(&sock, "/vigil/introspect", r#"{"period_ms": 3600000}"#);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = request(&sock, "GET", "/vigil/introspect", "").json();
        if s["baseline_taken"] == true {
            break s;
        }
        assert!(Instant::now() < deadline, "no baseline: {s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status["kaslr_slide"], 0, "{status}");
    assert_eq!(status["kaslr_slide_from"], "lstar", "{status}");
    let a = request(&sock, "GET", "/vigil/introspect/baseline", "");
    assert_eq!(a.status, 200, "{a:?}");
    let baseline = a.json();
    for region in ["text", "rodata"] {
        let h = baseline[region]["hash"].as_str().unwrap_or_default();
        assert_eq!(
            h.len(),
            64,
            "{region} SHA-256: {}",
            baseline[region]["name"]
        );
        assert!(
            !baseline[region]["pages"].as_array().unwrap().is_empty(),
            "{region}"
        );
    }
    assert_eq!(
        hex(&baseline["layout"]["text"]["start"]),
        sym("_stext"),
        "text from _stext"
    );
    assert_eq!(
        hex(&baseline["syscall_table"]["addr"]),
        sym("sys_call_table")
    );
    assert_eq!(
        baseline["syscall_table"]["entries"]
            .as_array()
            .unwrap()
            .len(),
        451
    );
    assert_eq!(check(&sock), serde_json::json!([]), "nothing changed yet");

    // Tamper 1: sys_call_table[0] (read) -> __x64_sys_ni_syscall.
    let ni = sym("__x64_sys_ni_syscall");
    put(
        &sock,
        "/vigil/debug/memory",
        &format!(
            r#"{{"address": "{:#x}", "vcpu": 0, "bytes": "{}"}}"#,
            sym("sys_call_table"),
            vigil_introspect::hex::bytes(&ni.to_le_bytes())
        ),
    );
    let found = check(&sock);
    let f = one(&found, "syscall_table_modified");
    assert_eq!(f["location"], "sys_call_table[0] (read)", "{f}");
    assert_eq!(f["from_symbol"], "__x64_sys_read+0x0", "{f}");
    assert_eq!(f["symbol"], "__x64_sys_ni_syscall+0x0", "{f}");
    assert_eq!(hex(&f["to"]), ni, "{f}");
    assert_eq!(found.as_array().unwrap().len(), 1, "{found:#}");

    // Tamper 2: IDT gate 14 (#PF) -> asm_exc_general_protection, a whole gate
    // encoded as Linux writes it (interrupt gate, __KERNEL_CS = 0x10, IST 0),
    // written at the IDTR base (Linux's read-only alias of idt_table in the
    // cpu_entry_area) through vCPU 0's page tables.
    let idt_base = hex(&cpu0["idt"]["base"]);
    let gp = sym("asm_exc_general_protection");
    put(
        &sock,
        "/vigil/debug/memory",
        &format!(
            r#"{{"address": "{:#x}", "vcpu": 0, "bytes": "{}"}}"#,
            idt_base + 14 * 16,
            vigil_introspect::hex::bytes(&interrupt_gate(gp, 0x10, 0))
        ),
    );
    let found = check(&sock);
    let f = one(&found, "idt_entry_modified");
    assert_eq!(f["location"], "IDT vector 14", "{f}");
    assert_eq!(f["vcpu"], 0, "{f}");
    assert_eq!(f["from_symbol"], "asm_exc_page_fault+0x0", "{f}");
    assert_eq!(f["symbol"], "asm_exc_general_protection+0x0", "{f}");
    assert_eq!(found.as_array().unwrap().len(), 1, "{found:#}");

    // Tamper 3: the first byte of do_sys_open -> int3. The host's write is not in
    // KVM's dirty log; the introspector re-hashes the pages it wrote itself.
    let target = sym("do_sys_open");
    // Its guest-physical page, from the baseline's page list.
    let page = baseline["text"]["pages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| hex(&p["vaddr"]) == target & !0xfff)
        .map(|p| hex(&p["paddr"]))
        .expect("do_sys_open's page in the baseline");
    put(
        &sock,
        "/vigil/debug/memory",
        &format!(r#"{{"address": "{target:#x}", "vcpu": 0, "bytes": "cc"}}"#),
    );
    let found = check(&sock);
    let f = one(&found, "kernel_text_modified");
    let loc = f["location"].as_str().unwrap();
    assert!(
        loc.starts_with(&format!("kernel text page {page:#x} (")),
        "the page of do_sys_open ({page:#x}): {f}"
    );
    assert_eq!(found.as_array().unwrap().len(), 1, "{found:#}");

    // Tamper 4: LSTAR -> __x64_sys_ni_syscall, from the host (not through the
    // guard on guest wrmsr): the periodic check's register comparison sees it.
    put(
        &sock,
        "/vigil/debug/msr",
        &format!(r#"{{"vcpu": 0, "index": "0xc0000082", "value": "{ni:#x}"}}"#),
    );
    let found = check(&sock);
    let f = one(&found, "syscall_msr_changed");
    assert_eq!(f["location"], "LSTAR", "{f}");
    assert_eq!(f["vcpu"], 0, "{f}");
    assert_eq!(f["from_symbol"], "entry_SYSCALL_64+0x0", "{f}");
    assert_eq!(f["symbol"], "__x64_sys_ni_syscall+0x0", "{f}");
    assert_eq!(found.as_array().unwrap().len(), 1, "{found:#}");

    // All four in the log, in order.
    let all = request(&sock, "GET", "/vigil/introspect/findings?since=0", "").json();
    let rules: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rule"].as_str().unwrap())
        .collect();
    assert_eq!(
        rules,
        [
            "syscall_table_modified",
            "idt_entry_modified",
            "kernel_text_modified",
            "syscall_msr_changed"
        ],
        "{all:#}"
    );

    // SIGTERM ends the kept VM; the exit status is the crash's.
    // SAFETY: the pid is our child's, which is still running.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vigil did not end on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().unwrap();
    assert_eq!(code, Some(3), "the guest crashed: {stderr}");
    let _ = std::fs::remove_file(&sock);
    eprintln!("done in {:.1?}", started.elapsed());
}

/// `vigil bench introspect` names the kernel it could not find and how to give one.
#[test]
fn bench_introspect_names_a_missing_kernel() {
    let r = common::run(
        &["bench", "introspect", "--kernel", "/nonexistent/vmlinux"],
        Duration::from_secs(30),
    );
    assert_ne!(r.code, Some(0), "{r}");
    assert!(
        r.stderr
            .contains("kernel /nonexistent/vmlinux: not found (give --kernel PATH"),
        "{r}"
    );
}

/// A short `vigil bench introspect` prints its three tables.
#[test]
fn bench_introspect_prints_its_tables() {
    let Some((vmlinux, map)) = common::tiny_linux() else {
        return;
    };
    if hardware_kvm() {
        eprintln!("SKIP: the benchmark keeps the kernel at an emulation failure that hardware KVM does not have");
        return;
    }
    let r = common::run(
        &[
            "bench",
            "introspect",
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--symbols",
            map.to_str().unwrap(),
            "--seconds",
            "1",
            "--syscalls",
            "200",
            "--runs",
            "1",
        ],
        CRASH_TIMEOUT,
    );
    assert_eq!(r.code, Some(0), "{r}");
    for row in [
        "| monitor off |",
        "| monitor every 1s |",
        "| monitor every 100ms |",
        "| monitor every 10ms |",
        "| without the dirty log (every page re-hashed) |",
        "| untraced |",
        "| entry breakpoint only, filter keeps nothing (`--trace-filter write`) |",
        "| traced to a file, entry and return (`--trace-syscalls`, 200 records) |",
    ] {
        assert!(r.stdout.contains(row), "{row}: {r}");
    }
}

/// The same kernel on two vCPUs, let further (its FPU on FXSAVE, the
/// instructions this machine's KVM lacks hidden), the monitor started after the
/// boot CPU's set-up: its second CPU, which Linux brings up through a bring-up
/// IDT and its own GDT, joins the checks held to the boot vCPU's values and
/// gives no finding. Linux's per-CPU differences (each CPU's GDT and TSS, the
/// CPU number in the CPUNODE descriptor's limit) are exactly those the rule
/// leaves to each CPU.
#[test]
fn a_linux_application_processor_is_held_to_the_boot_vcpu_without_a_finding() {
    let Some((vmlinux, map_path)) = common::tiny_linux() else {
        return;
    };
    let dir = common::scratch("introspect-linux-smp");
    let sock = dir.join("api.sock");
    let mut console = Console::spawn(&[
        "run",
        "--kernel",
        vmlinux.to_str().unwrap(),
        "--cpus",
        "2",
        "--memory",
        "256",
        "--cmdline",
        "console=ttyS0 earlyprintk=serial noxsave clearcpuid=smap,smep,popcnt nopti",
        "--symbols",
        map_path.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    wait_for(&sock, CRASH_TIMEOUT);
    // After trap_init and init_IRQ (the boot CPU's IDT, GDT and syscall MSRs in
    // place), before smp_init.
    console.wait_for(&["Mount-cache hash table"], CRASH_TIMEOUT);
    put(
        &sock,
        "/vigil/introspect",
        r#"{"period_ms": 100, "baseline_after_ms": 0}"#,
    );
    console.wait_for(&["smp: Bringing up secondary CPUs"], CRASH_TIMEOUT);
    let deadline = Instant::now() + CRASH_TIMEOUT;
    let baseline = loop {
        let a = request(&sock, "GET", "/vigil/introspect/baseline", "");
        if a.status == 200 && a.json()["vcpus"].as_array().map(Vec::len) == Some(2) {
            break a.json();
        }
        assert!(
            Instant::now() < deadline,
            "vCPU 1 never joined: {a:?}\n{}",
            console.poll()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let ap = &baseline["vcpus"][1];
    assert_eq!(
        (&ap["cpu"]["vcpu"], &ap["expected_from"]),
        (&Value::from(1), &Value::from(0)),
        "{ap}"
    );
    // A few more checks, then nothing about vCPU 1 (the boot vCPU's own
    // findings, Linux patching its text while booting, are not this test's).
    for _ in 0..3 {
        check(&sock);
    }
    let findings = request(&sock, "GET", "/vigil/introspect/findings?since=0", "").json();
    let ap_findings: Vec<&Value> = findings
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["vcpu"] == 1)
        .collect();
    assert!(ap_findings.is_empty(), "vCPU 1: {ap_findings:#?}");
    let state = request(&sock, "GET", "/vigil/introspect/state", "").json();
    let (bsp, ap) = (&state["cpus"][0], &state["cpus"][1]);
    assert_eq!(ap["lstar_symbol"], "entry_SYSCALL_64+0x0", "{ap}");
    assert_eq!(ap["idt"], bsp["idt"], "one IDT: {state}");
    assert_ne!(
        ap["gdt"]["base"], bsp["gdt"]["base"],
        "per-CPU GDTs: {state}"
    );
    drop(console);
    let _ = std::fs::remove_dir_all(&dir);
}
