//! The jail on disk (its folders, the VMM's binary, device nodes) and entering it:
//! a new mount namespace whose root is the jail.

use std::ffi::{CString, OsStr};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{
    chown, DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::Path;

use anyhow::{bail, Context};

use crate::plan::Plan;
use crate::process::sys;
use crate::Made;

/// Device nodes the VMM opens, made in the jail with the host's numbers: /dev/kvm
/// (which the jailer requires), /dev/net/tun (TAP network devices) and
/// /dev/userfaultfd (memory filled on demand), the last two where the host has them.
const DEVICES: [(&str, bool); 3] = [
    ("/dev/kvm", true),
    ("/dev/net/tun", false),
    ("/dev/userfaultfd", false),
];

/// Folders in the jail, owned by the VMM's user: `/` (so that the VMM may create
/// files there), /dev and /dev/net for the device nodes, /run for API sockets.
const FOLDERS: [&str; 4] = ["", "dev", "dev/net", "run"];

/// A host device node to recreate in the jail.
#[derive(Debug)]
pub struct Device {
    /// Its path, on the host and in the jail.
    path: &'static str,
    rdev: libc::dev_t,
}

/// The device nodes of [`DEVICES`] the host has.
pub fn host_devices() -> anyhow::Result<Vec<Device>> {
    let mut found = Vec::new();
    for (path, required) in DEVICES {
        match fs::metadata(path) {
            Ok(meta) if meta.file_type().is_char_device() => found.push(Device {
                path,
                rdev: meta.rdev(),
            }),
            Ok(_) => bail!("{path} is not a character device on this host"),
            Err(e) if required => {
                return Err(e)
                    .with_context(|| format!("{path}: the VMM needs it, and the host has none"))
            }
            Err(_) => {}
        }
    }
    Ok(found)
}

/// Creates the jail: its folders (those missing), a copy of the exec file, the
/// device nodes. Records in `made` what it created.
pub fn build(plan: &Plan, made: &mut Made) -> anyhow::Result<()> {
    // <chroot-base-dir>/<exec file name>, shared by the jails: kept.
    let shared = plan.base_dir.join(&plan.exec_name);
    fs::create_dir_all(&shared).with_context(|| format!("cannot create {}", shared.display()))?;
    make_dir(&plan.jail_dir(), 0o755, made)?;
    let root = plan.root();
    for folder in FOLDERS {
        let dir = root.join(folder);
        make_dir(&dir, 0o700, made)?;
        // One the operator made (the root holding a kernel) becomes private too.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private (mode 0700)", dir.display()))?;
        give(&dir, plan)?;
    }
    copy_exec_file(&plan.exec_file, &root.join(&plan.exec_name), made)?;
    for device in &plan.devices {
        let node = root.join(device.path.trim_start_matches('/'));
        let c_node = c_path(&node)?;
        // SAFETY: mknod reads the NUL-terminated path, which lives across the call.
        sys(unsafe { libc::mknod(c_node.as_ptr(), libc::S_IFCHR | 0o600, device.rdev) })
            .with_context(|| format!("cannot make the device node {}", node.display()))?;
        made.paths.push(node.clone());
        give(&node, plan)?;
    }
    tracing::info!("jail {} built", root.display());
    Ok(())
}

/// Makes `path` the VMM's user's and group's.
fn give(path: &Path, plan: &Plan) -> anyhow::Result<()> {
    chown(path, Some(plan.uid), Some(plan.gid)).with_context(|| {
        format!(
            "cannot give {} to {}:{}",
            path.display(),
            plan.uid,
            plan.gid
        )
    })
}

/// Creates the folder `dir` unless it exists.
fn make_dir(dir: &Path, mode: u32, made: &mut Made) -> anyhow::Result<()> {
    match DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {
            made.paths.push(dir.to_owned());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
}

/// Copies the VMM's binary into the jail: a copy, not a hard link, as Firecracker's
/// jailer does (another file system may hold it, and two VMs then share no page of
/// it). Owned by root, so that the VMM cannot change it; never setuid.
fn copy_exec_file(from: &Path, to: &Path, made: &mut Made) -> anyhow::Result<()> {
    let why = || format!("cannot copy {} to {}", from.display(), to.display());
    let mut source = File::open(from).with_context(why)?;
    let mode = source.metadata().with_context(why)?.mode() & 0o755;
    let mut copy = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .with_context(why)?;
    made.paths.push(to.to_owned());
    std::io::copy(&mut source, &mut copy).with_context(why)?;
    Ok(())
}

/// Enters the jail `root`: a new mount namespace, whose root becomes `root`
/// (pivot_root, then the old root is detached), as Firecracker's jailer does.
pub fn enter(root: &Path) -> anyhow::Result<()> {
    let c_root = c_path(root)?;
    // SAFETY: unshare takes flags only.
    sys(unsafe { libc::unshare(libc::CLONE_NEWNS) })
        .context("cannot enter a new mount namespace")?;
    // Nothing done below may reach the host's mounts: propagation from here to there
    // is cut (the host's later mounts may still come in; the old root is detached
    // below anyway).
    // SAFETY: the path is a NUL-terminated literal; the other pointers may be null.
    sys(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_SLAVE | libc::MS_REC,
            std::ptr::null(),
        )
    })
    .context("cannot make the mounts of the new mount namespace slaves")?;
    // pivot_root needs the new root to be a mount point.
    // SAFETY: both paths are the NUL-terminated c_root, which lives across the call.
    sys(unsafe {
        libc::mount(
            c_root.as_ptr(),
            c_root.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    })
    .with_context(|| format!("cannot bind-mount {} on itself", root.display()))?;
    std::env::set_current_dir(root).with_context(|| format!("cannot enter {}", root.display()))?;
    // pivot_root(".", "."): the old root is stacked on the new one, then detached;
    // no folder for it is needed in the jail.
    // SAFETY: both paths are NUL-terminated literals.
    let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    match sys(pivoted as libc::c_int) {
        Ok(_) => {
            // SAFETY: the path is a NUL-terminated literal.
            sys(unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) })
                .context("cannot detach the old root")?;
        }
        // The initial ramfs (a host booted without a root file system, some
        // container runtimes) cannot be pivoted away from (EINVAL); a chroot there
        // still confines the VMM, which keeps no privilege to leave it.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(
                "pivot_root into {} failed ({e}); using chroot",
                root.display()
            );
            // SAFETY: the path is a NUL-terminated literal.
            sys(unsafe { libc::chroot(c".".as_ptr()) })
                .with_context(|| format!("cannot chroot into {}", root.display()))?;
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot pivot_root into {}", root.display()))
        }
    }
    std::env::set_current_dir("/").context("cannot enter the jail's /")?;
    tracing::info!("in the jail {}", root.display());
    Ok(())
}

/// Writes `/<exec file name>.pid` in the jail: the VMM's process id as the host
/// sees it (for Firecracker's tools, which read it there).
pub fn write_pid_file(exec_name: &OsStr, pid: u32) -> anyhow::Result<()> {
    let mut name = exec_name.to_owned();
    name.push(".pid");
    let path = Path::new("/").join(name);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| f.write_all(pid.to_string().as_bytes()))
        .with_context(|| {
            format!(
                "cannot write the VMM's pid to {} in the jail",
                path.display()
            )
        })
}

fn c_path(path: &Path) -> anyhow::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} holds a NUL byte", path.display()))
}
