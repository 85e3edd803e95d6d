//! The jail each VM runs in (the daemon's default; `--no-jailer` runs VMs as
//! the daemon's own children): `vigil-jailer --id ID --exec-file VMM --uid U
//! --gid G --chroot-base-dir <state>/jails --new-pid-ns [--cgroup F=V]... --
//! run --api-sock /run/api.sock --config-file /config.json ...`.
//!
//! Before the jailer starts, the daemon makes the jail's root
//! (`<state>/jails/<vmm name>/<id>/root`) and puts in it every file the VM's
//! configuration names, under fixed names (so that a VM migrating between two
//! jailing daemons finds its files where its source's VMM had them), and a
//! `config.json` naming those:
//!
//! | field | in the jail | how |
//! |---|---|---|
//! | `boot-source.kernel_image_path`, `.initrd_path`, a read-only drive | `/kernel`, `/initrd`, `/drive-N` | a hard link when on the jails' file system and readable by the jail's user (the file is left as it is), else a copy (at most 256 MiB; owned by the jail's user, mode 0400) |
//! | a writable drive, `logger.log_path`, `metrics.metrics_path` | `/drive-N`, `/logger.log`, `/metrics.json` | a hard link, handed to the jail's user (one inode: the host file changes owner too); a log or metrics file missing is created first. On another file system: refused (a copy would lose what the VM writes) |
//! | `vsock.uds_path` | `/vsock.sock` | the VMM creates it; the host path becomes a symbolic link to it |
//!
//! The files the daemon reads after the VM (its findings, its traced calls)
//! are created in the VM's folder, handed to the jail's user and hard-linked
//! into the jail, so the daemon reads them where it always did.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::SupervisorError;

/// How VMs are jailed (`--jailer`, `--jail-uid`, `--jail-gid`, `--jail-cgroup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSettings {
    /// The `vigil-jailer` binary.
    pub jailer: PathBuf,
    /// The user and group each VMM runs as.
    pub uid: u32,
    pub gid: u32,
    /// `FILE=VALUE` settings of each VM's cgroup v2 (`--cgroup` of the jailer).
    pub cgroups: Vec<String>,
}

/// The user and group VMs run as by default: `nobody`/`nogroup`, which own no
/// file of the host.
pub const DEFAULT_JAIL_ID: u32 = 65534;

/// The VM's API socket, as the jailed VMM sees it.
pub(super) const API_SOCKET: &str = "/run/api.sock";
/// Its configuration, as it sees it.
pub(super) const CONFIG: &str = "/config.json";
/// The migration CA the VMs leaving check their destination against.
pub(super) const MIGRATION_CA: &str = "/migration-ca.pem";
/// The certificate and key a VM arriving waits behind.
pub(super) const MIGRATION_CERT: &str = "/migration-cert.pem";
pub(super) const MIGRATION_KEY: &str = "/migration-key.pem";
/// The vsock socket the VMM creates.
const VSOCK: &str = "vsock.sock";

/// The largest read-only file copied into a jail when it cannot be linked.
const MAX_COPY: u64 = 256 << 20;

/// A VM's jail on the host.
#[derive(Debug, Clone)]
pub(super) struct Jail {
    /// `<state>/jails/<vmm name>/<id>`: the daemon removes it with the VM.
    pub(super) dir: PathBuf,
    /// The cgroup the jailer makes for it (with `--jail-cgroup`).
    pub(super) cgroup: Option<PathBuf>,
}

/// Whether a file the VM names is only read, or also written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

impl Jail {
    /// VM `id`'s jail under `base` (`<state>/jails`) for `vmm`.
    pub(super) fn new(
        base: &Path,
        vmm: &Path,
        id: &str,
        settings: &JailSettings,
    ) -> Result<Jail, SupervisorError> {
        // The jailer's ids are Firecracker's: no `_`, which the daemon's allow.
        if id.contains('_') {
            return Err(SupervisorError::JailId(id.into()));
        }
        let name = vmm.file_name().unwrap_or(vmm.as_os_str());
        let cgroup = if settings.cgroups.is_empty() {
            None
        } else {
            // The jailer's default parent: the exec file's name.
            vigil_jailer::mounted_v2_root()
                .ok()
                .flatten()
                .map(|root| root.join(name).join(id))
        };
        Ok(Jail {
            dir: base.join(name).join(id),
            cgroup,
        })
    }

    /// The jail's `/` on the host.
    pub(super) fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// `path` inside the jail (absolute, as the VMM sees it) on the host.
    pub(super) fn host_path(&self, path: &str) -> PathBuf {
        self.root().join(path.trim_start_matches('/'))
    }

    /// Removes what an earlier run of this id left (its process is gone: the
    /// caller checked its socket), so that the jailer finds a fresh jail.
    pub(super) fn clear(&self) -> io::Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        if let Some(cgroup) = &self.cgroup {
            match fs::remove_dir(cgroup) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes the jail, its cgroup and the link at `config`'s vsock socket
    /// (the VMM has ended; the cgroup may take a moment to empty after a SIGKILL).
    pub(super) async fn remove(&self, config: &serde_json::Value) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("cannot remove the jail {}: {e}", self.dir.display());
            }
        }
        if let Some(link) = config["vsock"]["uds_path"].as_str() {
            if fs::read_link(link).is_ok_and(|target| target.starts_with(&self.dir)) {
                let _ = fs::remove_file(link);
            }
        }
        if let Some(cgroup) = &self.cgroup {
            for _ in 0..50 {
                match fs::remove_dir(cgroup) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await
                    }
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        tracing::warn!("cannot remove the cgroup {}: {e}", cgroup.display());
                        break;
                    }
                    _ => break,
                }
            }
        }
    }

    /// Makes the jail's root and puts in it the files `config` names; returns
    /// the configuration as the VMM sees it. `vm_dir` holds the files the daemon
    /// reads after the VM (`linked`: their names, hard-linked into the jail's
    /// `/`); `copied`: host files (certificates) copied to a path in the jail.
    pub(super) fn prepare(
        &self,
        settings: &JailSettings,
        config: &serde_json::Value,
        vm_dir: &Path,
        linked: &[&str],
        copied: &[(PathBuf, &str)],
    ) -> Result<serde_json::Value, SupervisorError> {
        let root = self.root();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(folder("cannot create", &root))?;
        let place = Placer {
            settings,
            root: &root,
            dev: fs::metadata(&root)
                .map_err(folder("cannot read", &root))?
                .dev(),
        };
        let mut config = config.clone();
        let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        if let Some(boot) = config.get_mut("boot-source") {
            for (field, name) in [("kernel_image_path", "kernel"), ("initrd_path", "initrd")] {
                if let Some(host) = boot.get(field).and_then(text) {
                    place.file(&format!("boot-source.{field}"), &host, name, Access::Read)?;
                    boot[field] = format!("/{name}").into();
                }
            }
        }
        if let Some(drives) = config.get_mut("drives").and_then(|d| d.as_array_mut()) {
            for (i, drive) in drives.iter_mut().enumerate() {
                if let Some(host) = drive.get("path_on_host").and_then(text) {
                    let access = match drive.get("is_read_only").and_then(|r| r.as_bool()) {
                        Some(true) => Access::Read,
                        _ => Access::Write,
                    };
                    let name = format!("drive-{i}");
                    let field = format!("drives[{}].path_on_host", drive["drive_id"]);
                    place.file(&field, &host, &name, access)?;
                    drive["path_on_host"] = format!("/{name}").into();
                }
            }
        }
        for (section, field, name) in [
            ("logger", "log_path", "logger.log"),
            ("metrics", "metrics_path", "metrics.json"),
        ] {
            if let Some(s) = config.get_mut(section) {
                if let Some(host) = s.get(field).and_then(text) {
                    place.file(&format!("{section}.{field}"), &host, name, Access::Write)?;
                    s[field] = format!("/{name}").into();
                }
            }
        }
        if let Some(vsock) = config.get_mut("vsock") {
            if let Some(host) = vsock.get("uds_path").and_then(text) {
                place.vsock_link(&host)?;
                vsock["uds_path"] = format!("/{VSOCK}").into();
            }
        }
        for name in linked {
            let path = vm_dir.join(name);
            create_owned(&path, settings).map_err(folder("cannot create", &path))?;
            let to = root.join(name);
            fs::hard_link(&path, &to).map_err(folder("cannot link into the jail", &to))?;
        }
        for (from, to) in copied {
            place.copy(from, &self.host_path(to))?;
        }
        let bytes = serde_json::to_vec_pretty(&config).map_err(SupervisorError::EncodeConfig)?;
        let path = self.host_path(CONFIG);
        new_owned(&path, settings)
            .and_then(|mut file| io::Write::write_all(&mut file, &bytes))
            .map_err(folder("cannot write", &path))?;
        Ok(config)
    }
}

fn folder(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SupervisorError {
    let path = path.to_path_buf();
    move |source| SupervisorError::Folder { what, path, source }
}

/// Puts host files into one jail.
struct Placer<'a> {
    settings: &'a JailSettings,
    root: &'a Path,
    /// The jail's file system.
    dev: u64,
}

impl Placer<'_> {
    fn refuse(&self, field: &str, host: &str, why: String) -> SupervisorError {
        SupervisorError::JailFile {
            field: field.into(),
            path: host.into(),
            why,
        }
    }

    /// Puts `host` (named by `field`) into the jail as `/name`.
    fn file(
        &self,
        field: &str,
        host: &str,
        name: &str,
        access: Access,
    ) -> Result<(), SupervisorError> {
        let to = self.root.join(name);
        if access == Access::Write && fs::symlink_metadata(host).is_err() {
            // A log or metrics file the VMM would create: created here, for it.
            create_owned(Path::new(host), self.settings)
                .map_err(|e| self.refuse(field, host, format!("cannot create it: {e}")))?;
        }
        let meta = fs::metadata(host)
            .map_err(|e| self.refuse(field, host, format!("cannot read it: {e}")))?;
        let same_fs = meta.dev() == self.dev;
        match access {
            Access::Read if same_fs && self.readable(&meta) => fs::hard_link(host, &to),
            Access::Read if meta.len() <= MAX_COPY => {
                return self.copy(Path::new(host), &to);
            }
            Access::Read => {
                return Err(self.refuse(
                    field,
                    host,
                    format!(
                        "{} MiB on another file system than the jails ({}), or not readable by the jail's user {}: too big to copy (at most {} MiB); put it on that file system, readable by that user, or run the daemon with --no-jailer",
                        meta.len() >> 20,
                        self.root.display(),
                        self.settings.uid,
                        MAX_COPY >> 20
                    ),
                ))
            }
            Access::Write if same_fs => fs::hard_link(host, &to).and_then(|()| {
                std::os::unix::fs::chown(&to, Some(self.settings.uid), Some(self.settings.gid))
            }),
            Access::Write => {
                return Err(self.refuse(
                    field,
                    host,
                    format!(
                        "the VM writes it, and it is on another file system than the jails ({}): it cannot be linked in, and a copy would lose what the VM writes; put it on that file system (--state-dir's), or run the daemon with --no-jailer",
                        self.root.display()
                    ),
                ))
            }
        }
        .map_err(|e| self.refuse(field, host, format!("cannot link it into the jail as {}: {e}", to.display())))
    }

    /// Whether the jail's user may read the file as it is.
    fn readable(&self, meta: &fs::Metadata) -> bool {
        let mode = meta.permissions().mode();
        mode & 0o004 != 0
            || (meta.uid() == self.settings.uid && mode & 0o400 != 0)
            || (meta.gid() == self.settings.gid && mode & 0o040 != 0)
    }

    /// A copy of `from` at `to`, the jail user's alone (mode 0400).
    fn copy(&self, from: &Path, to: &Path) -> Result<(), SupervisorError> {
        let mut source = fs::File::open(from).map_err(folder("cannot read", from))?;
        let mut copy = new_owned(to, self.settings).map_err(folder("cannot create", to))?;
        io::copy(&mut source, &mut copy).map_err(folder("cannot copy into", to))?;
        copy.set_permissions(fs::Permissions::from_mode(0o400))
            .map_err(folder("cannot write", to))
    }

    /// Makes `host` a link to the vsock socket the VMM creates in the jail
    /// (replacing a socket or link an earlier VM left there).
    fn vsock_link(&self, host: &str) -> Result<(), SupervisorError> {
        let field = "vsock.uds_path";
        if let Ok(meta) = fs::symlink_metadata(host) {
            let kind = meta.file_type();
            if !(kind.is_symlink() || std::os::unix::fs::FileTypeExt::is_socket(&kind)) {
                return Err(self.refuse(field, host, "is there and is not a socket".into()));
            }
            fs::remove_file(host)
                .map_err(|e| self.refuse(field, host, format!("cannot replace it: {e}")))?;
        }
        std::os::unix::fs::symlink(self.root.join(VSOCK), host)
            .map_err(|e| self.refuse(field, host, format!("cannot link it to the jail: {e}")))
    }
}

/// Creates `path` (empty unless it exists), mode 0600, the jail user's.
fn create_owned(path: &Path, settings: &JailSettings) -> io::Result<()> {
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    std::os::unix::fs::chown(path, Some(settings.uid), Some(settings.gid))
}

/// A new file at `path`, mode 0600, the jail user's.
fn new_owned(path: &Path, settings: &JailSettings) -> io::Result<fs::File> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    std::os::unix::fs::fchown(&file, Some(settings.uid), Some(settings.gid))?;
    Ok(file)
}
