//! The command line checked, before anything is created: every refusal names the
//! flag and the value.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::cgroup::Cgroup;
use crate::jail::Device;
use crate::limits::Limit;
use crate::Args;

/// The longest --id (Firecracker's limit).
const MAX_ID_LEN: usize = 64;

/// What the jailer will do, every value checked.
pub struct Plan {
    pub id: String,
    /// --exec-file, canonical.
    pub exec_file: PathBuf,
    /// Its file name: the jail's folder, the binary's name in the jail, argv[0].
    pub exec_name: OsString,
    pub uid: u32,
    pub gid: u32,
    /// --chroot-base-dir, absolute.
    pub base_dir: PathBuf,
    /// --netns, opened.
    pub netns: Option<(PathBuf, File)>,
    pub daemonize: bool,
    pub new_pid_ns: bool,
    pub cgroup: Option<Cgroup>,
    pub limits: Vec<Limit>,
    /// The host's device nodes to make in the jail.
    pub devices: Vec<Device>,
    pub exec_args: Vec<OsString>,
}

impl Plan {
    /// Checks `args`; reads the host (the exec file, /dev, the cgroup hierarchy) but
    /// changes nothing.
    pub fn new(args: Args) -> anyhow::Result<Plan> {
        check_id(&args.id)?;
        let (exec_file, exec_name) = check_exec_file(&args.exec_file)?;
        let uid = parse_id_number("--uid", &args.uid)?;
        let gid = parse_id_number("--gid", &args.gid)?;
        let base_dir = check_base_dir(&args.chroot_base_dir)?;
        check_unused(
            &base_dir.join(&exec_name).join(&args.id),
            &exec_name,
            &args.id,
        )?;
        let netns = match args.netns {
            Some(path) => {
                let file = File::open(&path)
                    .with_context(|| format!("--netns {}: cannot open it", path.display()))?;
                Some((path, file))
            }
            None => None,
        };
        let cgroup = Cgroup::plan(
            &args.cgroup_version,
            &args.cgroups,
            args.parent_cgroup.as_deref(),
            Path::new(&exec_name),
            &args.id,
        )?;
        let limits = crate::limits::parse(&args.resource_limits)?;
        let devices = crate::jail::host_devices()?;
        Ok(Plan {
            id: args.id,
            exec_file,
            exec_name,
            uid,
            gid,
            base_dir,
            netns,
            daemonize: args.daemonize,
            new_pid_ns: args.new_pid_ns,
            cgroup,
            limits,
            devices,
            exec_args: args.exec_args,
        })
    }

    /// `<chroot-base-dir>/<exec file name>/<id>`: what the operator removes.
    pub fn jail_dir(&self) -> PathBuf {
        self.base_dir.join(&self.exec_name).join(&self.id)
    }

    /// The jail's `/`.
    pub fn root(&self) -> PathBuf {
        self.jail_dir().join("root")
    }
}

/// The jail folder may exist (holding what the operator put there for the VMM), but
/// not hold what an earlier run made: a jail serves one run.
fn check_unused(jail: &Path, exec_name: &OsStr, id: &str) -> anyhow::Result<()> {
    let root = jail.join("root");
    let mut pid_file = exec_name.to_owned();
    pid_file.push(".pid");
    for left in [
        root.join(exec_name),
        root.join(pid_file),
        root.join("dev/kvm"),
    ] {
        if left.symlink_metadata().is_ok() {
            bail!(
                "--id {id}: {} is there: {} is the jail of an earlier run with this id (remove it first)",
                left.display(),
                jail.display()
            );
        }
    }
    Ok(())
}

fn check_id(id: &str) -> anyhow::Result<()> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        bail!(
            "--id {id:?}: must be 1 to {MAX_ID_LEN} characters long (it has {})",
            id.len()
        );
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_alphanumeric() && *c != '-') {
        bail!("--id {id:?}: {c:?} is not allowed (only letters, digits and '-')");
    }
    Ok(())
}

fn parse_id_number(flag: &str, value: &str) -> anyhow::Result<u32> {
    value
        .parse()
        .map_err(|_| anyhow::anyhow!("{flag} {value:?}: not a number from 0 to {}", u32::MAX))
}

/// The canonical path of the exec file and its file name; it must be an
/// executable that runs with nothing else in the jail.
fn check_exec_file(path: &Path) -> anyhow::Result<(PathBuf, OsString)> {
    let flag = || format!("--exec-file {}", path.display());
    let exec_file =
        std::fs::canonicalize(path).with_context(|| format!("{}: cannot find it", flag()))?;
    let meta = std::fs::metadata(&exec_file).with_context(flag)?;
    if !meta.is_file() {
        bail!("{}: not a file", flag());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        bail!("{}: not executable", flag());
    }
    // The name as given, not the canonical one: a link named `firecracker` to
    // `vigil` keeps the name that makes Vigil behave as Firecracker.
    let name = path
        .file_name()
        .with_context(|| format!("{}: has no file name", flag()))?
        .to_owned();
    match elf_interpreter(&exec_file) {
        Ok(None) => {}
        Ok(Some(loader)) => bail!(
            "{}: dynamically linked (it asks for the loader {loader}), but the jail holds no \
             libraries; link it statically (Vigil's .cargo/config.toml does: crt-static)",
            flag()
        ),
        Err(e) => bail!("{}: {e}", flag()),
    }
    Ok((exec_file, name))
}

/// The program interpreter (dynamic loader) an ELF executable names, if any; an
/// error for anything that is not a little-endian 64-bit ELF file (a script
/// would need its interpreter in the jail).
fn elf_interpreter(path: &Path) -> std::io::Result<Option<String>> {
    const PT_INTERP: u32 = 3;
    let not_elf = || std::io::Error::other("not a 64-bit ELF executable");
    let file = File::open(path)?;
    let mut header = [0u8; 64];
    file.read_exact_at(&mut header, 0).map_err(|_| not_elf())?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(not_elf());
    }
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (
        u64_at(&header, 0x20),
        u64::from(u16_at(&header, 0x36)),
        u64::from(u16_at(&header, 0x38)),
    );
    if phentsize < 0x38 {
        return Err(not_elf());
    }
    let mut ph = [0u8; 0x38];
    for i in 0..phnum {
        file.read_exact_at(&mut ph, phoff + i * phentsize)?;
        if u32::from_le_bytes(ph[..4].try_into().unwrap()) == PT_INTERP {
            let (offset, size) = (u64_at(&ph, 8), u64_at(&ph, 0x20).min(4096));
            let mut interp = vec![0u8; size as usize];
            file.read_exact_at(&mut interp, offset)?;
            let end = interp.iter().position(|b| *b == 0).unwrap_or(interp.len());
            return Ok(Some(String::from_utf8_lossy(&interp[..end]).into_owned()));
        }
    }
    Ok(None)
}

/// --chroot-base-dir made absolute: canonical if it exists (then it must be a
/// folder); created later if it does not.
fn check_base_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let flag = || format!("--chroot-base-dir {}", dir.display());
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => std::fs::canonicalize(dir).with_context(flag),
        Ok(_) => bail!("{}: not a folder", flag()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::path::absolute(dir).with_context(flag)
        }
        Err(e) => Err(e).with_context(flag),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        check_id("551e7604-e35c-42b3-b825-416853441234").unwrap();
        check_id(&"a".repeat(64)).unwrap();
        let e = check_id(&"a".repeat(65)).unwrap_err().to_string();
        assert!(e.contains("1 to 64 characters long (it has 65)"), "{e}");
        let e = check_id("").unwrap_err().to_string();
        assert!(e.starts_with("--id \"\""), "{e}");
        let e = check_id("a/../b").unwrap_err().to_string();
        assert_eq!(
            e,
            "--id \"a/../b\": '/' is not allowed (only letters, digits and '-')"
        );
        assert!(check_id("a_b").is_err());
        assert!(check_id("a.b").is_err());
    }

    #[test]
    fn uids() {
        assert_eq!(parse_id_number("--uid", "1000").unwrap(), 1000);
        let e = parse_id_number("--gid", "-1").unwrap_err().to_string();
        assert_eq!(e, "--gid \"-1\": not a number from 0 to 4294967295");
        assert!(parse_id_number("--uid", "4294967296").is_err());
    }

    #[test]
    fn static_and_dynamic_executables() {
        // This test binary is linked as the workspace links (statically, by
        // .cargo/config.toml); /bin/sh is a dynamic one on every Debian.
        let me = std::env::current_exe().unwrap();
        assert_eq!(elf_interpreter(&me).unwrap(), None);
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        let loader = elf_interpreter(&sh).unwrap().expect("/bin/sh is dynamic");
        assert!(loader.contains("ld-linux"), "{loader}");
        let e = check_exec_file(Path::new("/bin/sh"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dynamically linked"), "{e}");
        let e = check_exec_file(Path::new("/nonexistent/vigil"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--exec-file /nonexistent/vigil: cannot find it");
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let e = check_exec_file(Path::new(manifest))
            .unwrap_err()
            .to_string();
        assert_eq!(e, format!("--exec-file {manifest}: not executable"));
    }
}
