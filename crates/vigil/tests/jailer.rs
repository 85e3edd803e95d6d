//! `vigil-jailer` end to end: the test guest boots under it, and the host sees the
//! VMM confined as asked (user, root, namespaces, cgroup, limits, descriptors, a
//! network namespace, detached); bad values are refused with nothing created.
//! Jailing needs root and /dev/kvm: without them those tests say SKIP.

mod common;

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::http::{request, wait_for};
use common::{scratch, Console, TIMEOUT};
use serde_json::json;

const JAILER: &str = env!("CARGO_BIN_EXE_vigil-jailer");
const VIGIL: &str = env!("CARGO_BIN_EXE_vigil");
/// The user and group the jailed VMM runs as: any numbers do, these are nobody's.
const UID: u32 = 4242;
const GID: u32 = 4343;

fn can_jail() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: jailing needs root and /dev/kvm");
        return false;
    }
    true
}

/// One jail of the test's; its folder and cgroups are removed when it is dropped
/// (the jailer leaves them to the operator).
struct Jail {
    base: PathBuf,
    id: String,
    /// Cgroup folders to remove, innermost first.
    cgroups: Vec<PathBuf>,
}

impl Jail {
    fn new(name: &str) -> Jail {
        Jail {
            base: scratch(&format!("jail-{name}")),
            id: format!("{name}-{}", std::process::id()),
            cgroups: Vec::new(),
        }
    }

    /// The jail's `/` on the host.
    fn root(&self) -> PathBuf {
        self.base.join("vigil").join(&self.id).join("root")
    }

    /// `vigil-jailer` for this jail with `flags`, then `-- VMM_ARGS`.
    fn command(&self, flags: &[&str], vmm_args: &[&str]) -> Command {
        let mut cmd = Command::new(JAILER);
        cmd.args(["--id", &self.id, "--exec-file", VIGIL])
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(&self.base)
            .args(flags)
            .arg("--")
            .args(vmm_args);
        cmd
    }

    /// The VMM's process id, from the pid file the jailer writes in the jail.
    fn vmm_pid(&self) -> u32 {
        let file = self.root().join("vigil.pid");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(pid) = fs::read_to_string(&file).ok().and_then(|s| s.parse().ok()) {
                return pid;
            }
            assert!(Instant::now() < deadline, "no {}", file.display());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Puts the test guest into the jail and boots its `counter` scenario through
    /// the VMM's API, as Firecracker's users do: paths are the jail's.
    fn boot_counter(&self, console: &mut Console) {
        let sock = self.root().join("run/api.sock");
        wait_for(&sock, TIMEOUT);
        let kernel = self.root().join("guest.elf");
        fs::copy(vigil_test_guest::ELF_PATH, &kernel).unwrap();
        std::os::unix::fs::chown(&kernel, Some(UID), Some(GID)).unwrap();
        for (path, body) in [
            (
                "/boot-source",
                json!({"kernel_image_path": "/guest.elf", "boot_args": "test=counter"}),
            ),
            ("/actions", json!({"action_type": "InstanceStart"})),
        ] {
            let a = request(&sock, "PUT", path, &body.to_string());
            assert_eq!(a.status, 204, "PUT {path}: {}", a.body);
        }
        console.wait_for(&["counter: 3"], TIMEOUT);
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.base);
        for dir in &self.cgroups {
            // A cgroup empties a moment after its last process has gone.
            for _ in 0..100 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// A field of /proc/PID/status, such as `Uid`.
fn status_field(pid: u32, name: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in\n{status}"))
        .trim()
        .to_string()
}

/// Where each of the process's descriptors points.
fn fds(pid: u32) -> Vec<(u32, String)> {
    let mut fds: Vec<(u32, String)> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect();
    fds.sort();
    fds
}

fn namespace(pid: &str, kind: &str) -> String {
    fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The cgroup files the confinement test sets: a core file always, and a file of
/// each of pids, memory and cpu that the host's cgroup v2 hierarchy offers. `None`
/// (with a message) where no writable cgroup v2 hierarchy is mounted.
fn cgroup_files() -> Option<(PathBuf, Vec<(&'static str, &'static str)>)> {
    let Some(root) = vigil_jailer::mounted_v2_root().unwrap() else {
        eprintln!("SKIP (cgroup part): no cgroup v2 hierarchy is mounted");
        return None;
    };
    let control = root.join("cgroup.subtree_control");
    if fs::OpenOptions::new().write(true).open(&control).is_err() {
        eprintln!("SKIP (cgroup part): {} is not writable", control.display());
        return None;
    }
    let offered = fs::read_to_string(root.join("cgroup.controllers")).unwrap();
    let mut files = vec![("cgroup.max.descendants", "2")];
    for (controller, file, value) in [
        ("pids", "pids.max", "64"),
        ("memory", "memory.max", "268435456"),
        ("cpu", "cpu.max", "50000 100000"),
    ] {
        if offered.split_whitespace().any(|c| c == controller) {
            files.push((file, value));
        } else {
            eprintln!("note: the host's cgroup v2 hierarchy has no {controller} controller");
        }
    }
    Some((root, files))
}

#[test]
fn the_test_guest_boots_in_the_jail() {
    if !can_jail() {
        return;
    }
    let jail = Jail::new("boot");
    let child = jail
        .command(&[], &["run", "--console", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let jailer_pid = child.id();
    let r = common::finish(child, TIMEOUT);
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("DONE passed=0 failed=0"), "{r}");
    // Without --new-pid-ns the jailer became the VMM: the same process.
    assert_eq!(jail.vmm_pid(), jailer_pid);

    // The jail holds what the help says, owned as it says.
    let root = jail.root();
    let meta = fs::metadata(&root).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (UID, GID));
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    let copy = fs::metadata(root.join("vigil")).unwrap();
    assert_eq!(copy.len(), fs::metadata(VIGIL).unwrap().len());
    assert_eq!((copy.uid(), copy.permissions().mode() & 0o7777), (0, 0o755));
    for dev in ["/dev/kvm", "/dev/net/tun", "/dev/userfaultfd"] {
        let Ok(host) = fs::metadata(dev) else {
            assert!(!root.join(&dev[1..]).exists(), "{dev}: the host has none");
            continue;
        };
        let node = fs::metadata(root.join(&dev[1..])).unwrap();
        assert!(node.file_type().is_char_device(), "{dev}");
        assert_eq!(node.rdev(), host.rdev(), "{dev}: the host's numbers");
        assert_eq!((node.uid(), node.gid()), (UID, GID), "{dev}");
        assert_eq!(node.permissions().mode() & 0o777, 0o600, "{dev}");
    }
    assert!(root.join("run").is_dir());
}

#[test]
fn a_jail_the_operator_prepared() {
    if !can_jail() {
        return;
    }
    let jail = Jail::new("prepared");
    let root = jail.root();
    fs::create_dir_all(&root).unwrap();
    fs::copy(vigil_test_guest::ELF_PATH, root.join("guest.elf")).unwrap();
    let names = |dir: &Path| {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    // A step that fails once the jail is built (a limit above the kernel's
    // nr_open, a value it refuses for a cgroup file) removes what the jailer made,
    // and only that.
    let out = jail
        .command(&["--resource-limit", "no-file=1099511627776"], &["run"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--resource-limit no-file=1099511627776: cannot set it"),
        "{stderr}"
    );
    assert_eq!(names(&root), ["guest.elf"]);
    if let Some((cgroups, _)) = cgroup_files() {
        let parent = format!("vigil-test-prepared-{}", std::process::id());
        let out = jail
            .command(
                &[
                    "--parent-cgroup",
                    &parent,
                    "--cgroup",
                    "cgroup.max.descendants=many",
                ],
                &["run"],
            )
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("--cgroup cgroup.max.descendants=many: cannot write \"many\" to"),
            "{stderr}"
        );
        assert_eq!(names(&root), ["guest.elf"]);
        assert!(!cgroups.join(&parent).exists(), "the cgroup stayed");
    }
    // The VMM boots at once the kernel the operator put into the jail.
    let child = jail
        .command(
            &[],
            &[
                "run",
                "--kernel",
                "/guest.elf",
                "--cmdline",
                "test=serial,timer",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let r = common::finish(child, TIMEOUT);
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("DONE passed=2 failed=0"), "{r}");
    assert_eq!(
        names(&root),
        ["dev", "guest.elf", "run", "vigil", "vigil.pid"]
    );
    let meta = fs::metadata(&root).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (UID, GID));
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
}

#[test]
fn the_jailed_vmm_is_confined() {
    if !can_jail() {
        return;
    }
    let mut jail = Jail::new("confined");
    let mut flags: Vec<String> = [
        "--new-pid-ns",
        "--resource-limit",
        "no-file=512",
        "--resource-limit",
        "fsize=1048576",
        "--resource-limit",
        "core=0",
    ]
    .map(String::from)
    .to_vec();
    let cgroup = cgroup_files().map(|(root, files)| {
        let parent = format!("vigil-test-{}", std::process::id());
        flags.extend(["--parent-cgroup".into(), parent.clone()]);
        for (file, value) in &files {
            flags.extend(["--cgroup".into(), format!("{file}={value}")]);
        }
        let dir = root.join(&parent).join(&jail.id);
        jail.cgroups = vec![dir.clone(), root.join(&parent)];
        (format!("/{parent}/{}", jail.id), dir, files)
    });
    // A descriptor the jailer inherits (not close-on-exec): the VMM must not have it.
    let marker_path = jail.base.join("marker");
    let marker = File::create(&marker_path).unwrap();
    // SAFETY: clears FD_CLOEXEC on a descriptor this test owns.
    let cleared = unsafe { libc::fcntl(marker.as_raw_fd(), libc::F_SETFD, 0) };
    assert_eq!(cleared, 0);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut console =
        Console::spawn_command(jail.command(&flags, &["run", "--api-sock", "/run/api.sock"]));
    drop(marker);
    jail.boot_counter(&mut console);
    let pid = jail.vmm_pid();

    // A child of the jailer, process 1 of its own PID namespace.
    assert_ne!(pid, console.pid());
    assert!(
        status_field(pid, "NSpid").ends_with("\t1"),
        "{}",
        status_field(pid, "NSpid")
    );
    // The user and group asked for, no other group, no capability, no way back.
    assert_eq!(
        status_field(pid, "Uid"),
        format!("{UID}\t{UID}\t{UID}\t{UID}")
    );
    assert_eq!(
        status_field(pid, "Gid"),
        format!("{GID}\t{GID}\t{GID}\t{GID}")
    );
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Its root is the jail (the same folder: a pivot_root in its own mount
    // namespace shows as `/`), holding nothing else.
    let (its_root, jail_root) = (
        fs::metadata(format!("/proc/{pid}/root")).unwrap(),
        fs::metadata(jail.root()).unwrap(),
    );
    assert_eq!(
        (its_root.dev(), its_root.ino()),
        (jail_root.dev(), jail_root.ino())
    );
    let mut seen: Vec<String> = fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    seen.sort();
    assert_eq!(seen, ["dev", "guest.elf", "run", "vigil", "vigil.pid"]);
    // Mount and PID namespaces of its own; the network namespace is the host's.
    let me = std::process::id().to_string();
    for kind in ["mnt", "pid"] {
        assert_ne!(
            namespace(&pid.to_string(), kind),
            namespace(&me, kind),
            "{kind}"
        );
    }
    assert_eq!(namespace(&pid.to_string(), "net"), namespace(&me, "net"));
    // The limits asked for, soft and hard.
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    for (name, value) in [
        ("Max open files", "512"),
        ("Max file size", "1048576"),
        ("Max core file size", "0"),
    ] {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        let fields: Vec<&str> = line[name.len()..].split_whitespace().collect();
        assert_eq!(fields[..2], [value, value], "{line}");
    }
    // Standard input and outputs are the jailer's (the test's pipes); nothing the
    // jailer inherited beyond them reached the VMM.
    let vmm_fds = fds(pid);
    for (fd, target) in &vmm_fds {
        if *fd < 3 {
            assert!(target.starts_with("pipe:"), "fd {fd}: {target}");
        }
        assert!(!target.contains("marker"), "the marker leaked: {vmm_fds:?}");
    }
    // The cgroup: the VMM is in it, and its files hold what was given.
    if let Some((name, dir, files)) = &cgroup {
        let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            cgroups.lines().any(|l| l == format!("0::{name}")),
            "{cgroups}"
        );
        for (file, value) in files {
            let held = fs::read_to_string(dir.join(file)).unwrap();
            assert_eq!(held.trim(), *value, "{file}");
        }
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|p| p == pid.to_string()), "{procs}");
    }

    // SIGTERM to the jailer reaches the VMM, which stops; the jailer exits with
    // its status.
    // SAFETY: signals our own child.
    unsafe { libc::kill(console.pid() as i32, libc::SIGTERM) };
    let r = console.finish(TIMEOUT);
    assert_eq!(r.code, Some(143), "{r}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the VMM is gone"
    );
}

#[test]
fn a_daemon_in_a_network_namespace() {
    if !can_jail() {
        return;
    }
    let netns = format!("vigil-jail-{}", std::process::id());
    let ip = |args: &[&str]| Command::new("ip").args(args).output();
    match ip(&["netns", "add", &netns]) {
        Ok(out) if out.status.success() => {}
        other => {
            eprintln!("SKIP: `ip netns add` failed: {other:?}");
            return;
        }
    }
    struct Netns<'a>(&'a str);
    impl Drop for Netns<'_> {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", self.0]).output();
        }
    }
    let _netns = Netns(&netns);
    let handle = format!("/var/run/netns/{netns}");
    let jail = Jail::new("daemon");
    let out = jail
        .command(
            &["--netns", &handle, "--daemonize"],
            &["run", "--api-sock", "/run/api.sock"],
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let pid = jail.vmm_pid();
    wait_for(&jail.root().join("run/api.sock"), TIMEOUT);

    let net = fs::metadata(&handle).unwrap().ino();
    assert_eq!(namespace(&pid.to_string(), "net"), format!("net:[{net}]"));
    assert_eq!(
        status_field(pid, "Uid"),
        format!("{UID}\t{UID}\t{UID}\t{UID}")
    );
    // Detached: standard input and outputs on /dev/null, a session of its own
    // that it does not lead (so it can acquire no terminal).
    for (fd, target) in fds(pid).iter().take(3) {
        assert_eq!(target, "/dev/null", "fd {fd}");
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let session: i32 = fields[3].parse().unwrap();
    // SAFETY: getsid(0) has no preconditions.
    assert_ne!(session, unsafe { libc::getsid(0) });
    assert_ne!(session, pid as i32);

    // SAFETY: the VMM's pid, read from its pid file just now; it is running.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + TIMEOUT;
    // Gone, or a zombie where this machine's init does not reap orphans.
    while fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").unwrap().1.starts_with('Z'))
    {
        assert!(Instant::now() < deadline, "the VMM did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn bad_values_are_refused_and_nothing_is_created() {
    let dir = scratch("jail-refusals");
    let base = dir.join("base");
    let base_arg = base.to_str().unwrap();
    let id = format!("refused-{}", std::process::id());
    let long_id = "a".repeat(65);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--id", "a_b"],
            "--id \"a_b\": '_' is not allowed (only letters, digits and '-')",
        ),
        (
            vec!["--id", &long_id],
            "must be 1 to 64 characters long (it has 65)",
        ),
        (
            vec!["--exec-file", "/nonexistent/vigil"],
            "--exec-file /nonexistent/vigil: cannot find it",
        ),
        (vec!["--exec-file", "/bin/sh"], "dynamically linked"),
        (vec!["--uid", "x"], "--uid \"x\": not a number"),
        (
            vec!["--cgroup-version", "1"],
            "--cgroup-version 1: not supported",
        ),
        (
            vec!["--cgroup", "memory.max"],
            "--cgroup \"memory.max\": not FILE=VALUE",
        ),
        (
            vec!["--cgroup", "../pids.max=1"],
            "\"../pids.max\" is not a cgroup file name",
        ),
        (
            vec!["--parent-cgroup", "../up", "--cgroup", "pids.max=1"],
            "--parent-cgroup ../up: must be a relative path",
        ),
        (
            vec!["--resource-limit", "nofile=64"],
            "\"nofile\" is not one of fsize, no-file, nproc, as, memlock, core",
        ),
        (
            vec!["--resource-limit", "fsize=big"],
            "\"big\" is neither a number nor unlimited",
        ),
        (
            vec!["--netns", "/nonexistent/netns"],
            "--netns /nonexistent/netns: cannot open it",
        ),
    ];
    for (flags, message) in cases {
        // The flags given replace the defaults of the same name.
        let mut args = [
            ("--id", id.as_str()),
            ("--exec-file", VIGIL),
            ("--uid", "4242"),
            ("--gid", "4343"),
            ("--chroot-base-dir", base_arg),
        ];
        let mut rest = Vec::new();
        for pair in flags.chunks(2) {
            match args.iter_mut().find(|(f, _)| *f == pair[0]) {
                Some(slot) => slot.1 = pair[1],
                None => rest.extend_from_slice(pair),
            }
        }
        let out = Command::new(JAILER)
            .args(args.iter().flat_map(|(f, v)| [*f, *v]))
            .args(rest)
            .args(["--", "run"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {stderr}");
        assert!(
            stderr.starts_with("vigil-jailer: error: "),
            "{flags:?}: {stderr}"
        );
        assert!(stderr.contains(message), "{flags:?}: {stderr}");
        assert!(!base.exists(), "{flags:?} created {}", base.display());
    }
    if let Some(root) = vigil_jailer::mounted_v2_root().unwrap() {
        assert!(!root.join("vigil").join(&id).exists());
    }

    // A jail an earlier run with the same id left is refused, not reused.
    let old = base.join("vigil").join(&id).join("root");
    fs::create_dir_all(&old).unwrap();
    fs::write(old.join("vigil"), "an earlier run's VMM").unwrap();
    let out = Command::new(JAILER)
        .args([
            "--id",
            &id,
            "--exec-file",
            VIGIL,
            "--uid",
            "1",
            "--gid",
            "1",
        ])
        .args(["--chroot-base-dir", base_arg, "--", "run"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let expected = format!(
        "--id {id}: {} is there: {} is the jail of an earlier run with this id",
        old.join("vigil").display(),
        old.parent().unwrap().display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert_eq!(fs::read_dir(&old).unwrap().count(), 1);

    // A command line that cannot be parsed: clap's usage error, status 2.
    let out = Command::new(JAILER).args(["--id", &id]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--exec-file <PATH>"));
    fs::remove_dir_all(&dir).unwrap();
}
