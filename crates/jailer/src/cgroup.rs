//! The VM's cgroup, in the unified (v2) hierarchy: `<root>/<parent-cgroup>/<id>`,
//! with the controllers its files need enabled on the way down, its files written,
//! and the jailer (so the VMM) moved in.

use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};

use crate::Made;

/// Where the kernel lists the mounted file systems.
const MOUNTS: &str = "/proc/self/mounts";

/// Files the jailer writes itself: giving them would break the move into the cgroup.
const RESERVED: [&str; 3] = ["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"];

/// One `--cgroup FILE=VALUE`.
#[derive(Debug, PartialEq)]
pub struct Setting {
    /// As given, for messages.
    arg: String,
    file: String,
    value: String,
}

impl Setting {
    fn parse(arg: &str) -> anyhow::Result<Setting> {
        let shape = || format!("--cgroup {arg:?}: not FILE=VALUE (such as memory.max=268435456)");
        let (file, value) = arg.split_once('=').with_context(shape)?;
        if file.is_empty() || value.is_empty() {
            bail!(shape());
        }
        let controller = file.split_once('.').map(|(c, _)| c).unwrap_or_default();
        if file.contains('/') || controller.is_empty() {
            bail!(
                "--cgroup {arg:?}: {file:?} is not a cgroup file name (CONTROLLER.NAME, such as memory.max)"
            );
        }
        if RESERVED.contains(&file) {
            bail!("--cgroup {arg:?}: the jailer writes {file} itself");
        }
        Ok(Setting {
            arg: arg.into(),
            file: file.into(),
            value: value.into(),
        })
    }

    /// The controller the file belongs to (`None` for the core `cgroup.*` files).
    fn controller(&self) -> Option<&str> {
        let (controller, _) = self.file.split_once('.')?;
        (controller != "cgroup").then_some(controller)
    }
}

/// The cgroup the VMM will run in.
#[derive(Debug)]
pub struct Cgroup {
    /// The cgroup v2 mount.
    root: PathBuf,
    /// --parent-cgroup, relative to `root`.
    parent: PathBuf,
    /// The VM's cgroup, made under `parent` (`None`: the process joins `parent`).
    leaf: Option<String>,
    settings: Vec<Setting>,
    /// The controllers `settings` need, each once.
    controllers: Vec<String>,
}

impl Cgroup {
    /// Checks the cgroup flags against the host's hierarchy. `None` when the
    /// process stays in its cgroup: no --cgroup and no (existing) --parent-cgroup.
    pub fn plan(
        version: &str,
        settings: &[String],
        parent: Option<&Path>,
        default_parent: &Path,
        id: &str,
    ) -> anyhow::Result<Option<Cgroup>> {
        match version {
            "2" => {}
            "1" => bail!(
                "--cgroup-version 1: not supported: Vigil's jailer uses the unified hierarchy \
                 (cgroup v2) alone; give --cgroup-version 2 (the default)"
            ),
            v => bail!("--cgroup-version {v:?}: not 1 or 2 (and only 2 is supported)"),
        }
        let settings: Vec<Setting> = settings
            .iter()
            .map(|s| Setting::parse(s))
            .collect::<anyhow::Result<_>>()?;
        if let Some(parent) = parent {
            check_parent(parent)?;
        }
        let flag = match (settings.first(), parent) {
            (Some(s), _) => format!("--cgroup {}", s.arg),
            (None, Some(p)) => format!("--parent-cgroup {}", p.display()),
            (None, None) => return Ok(None),
        };
        let root = mounted_v2_root()
            .with_context(|| flag.clone())?
            .with_context(|| {
                format!("{flag}: no cgroup v2 hierarchy is mounted (no cgroup2 line in {MOUNTS})")
            })?;
        let parent = parent.unwrap_or(default_parent).to_owned();
        if settings.is_empty() {
            // Firecracker's rule: without --cgroup, join --parent-cgroup as it is.
            if !root.join(&parent).is_dir() {
                tracing::warn!(
                    "{flag}: {} does not exist; the process stays in its cgroup",
                    root.join(&parent).display()
                );
                return Ok(None);
            }
            return Ok(Some(Cgroup {
                root,
                parent,
                leaf: None,
                settings,
                controllers: Vec::new(),
            }));
        }
        let available_file = root.join("cgroup.controllers");
        let available = fs::read_to_string(&available_file)
            .with_context(|| format!("{flag}: cannot read {}", available_file.display()))?;
        let mut controllers: Vec<String> = Vec::new();
        for s in &settings {
            let Some(c) = s.controller() else { continue };
            if !available.split_whitespace().any(|a| a == c) {
                bail!(
                    "--cgroup {}: the {c} controller is not available in the cgroup v2 hierarchy \
                     at {} (it offers: {}); a host that mounts cgroup v1 too may have bound {c} there",
                    s.arg,
                    root.display(),
                    available.trim()
                );
            }
            if !controllers.iter().any(|have| have == c) {
                controllers.push(c.into());
            }
        }
        let leaf = root.join(&parent).join(id);
        if leaf.exists() {
            bail!(
                "--id {id}: the cgroup {} already exists (left by an earlier run with this id: \
                 rmdir it first)",
                leaf.display()
            );
        }
        Ok(Some(Cgroup {
            root,
            parent,
            leaf: Some(id.into()),
            settings,
            controllers,
        }))
    }

    /// The cgroup's folder.
    pub fn path(&self) -> PathBuf {
        let parent = self.root.join(&self.parent);
        match &self.leaf {
            Some(leaf) => parent.join(leaf),
            None => parent,
        }
    }

    /// Creates the VM's cgroup (and the parents missing), enables the controllers
    /// from the root down and writes the files. Records what it created in `made`.
    pub fn create(&self, made: &mut Made) -> anyhow::Result<()> {
        let Some(leaf) = &self.leaf else {
            return Ok(());
        };
        let mut dir = self.root.clone();
        enable(&dir, &self.controllers)?;
        for part in self.parent.components() {
            dir.push(part);
            match fs::create_dir(&dir) {
                Ok(()) => made.cgroups.push(dir.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot create the cgroup {}", dir.display()))
                }
            }
            enable(&dir, &self.controllers)?;
        }
        dir.push(leaf);
        fs::create_dir(&dir)
            .with_context(|| format!("cannot create the cgroup {}", dir.display()))?;
        made.cgroups.push(dir.clone());
        for s in &self.settings {
            let file = dir.join(&s.file);
            fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .and_then(|mut f| f.write_all(s.value.as_bytes()))
                .with_context(|| {
                    format!(
                        "--cgroup {}: cannot write {:?} to {}",
                        s.arg,
                        s.value,
                        file.display()
                    )
                })?;
        }
        tracing::info!("cgroup {} made", dir.display());
        Ok(())
    }

    /// Moves this process (and so the VMM it becomes) into the cgroup.
    pub fn join(&self) -> anyhow::Result<()> {
        let procs = self.path().join("cgroup.procs");
        fs::write(&procs, std::process::id().to_string()).with_context(|| {
            format!(
                "cannot move the jailer into the cgroup ({})",
                procs.display()
            )
        })?;
        tracing::info!("moved into the cgroup {}", self.path().display());
        Ok(())
    }
}

/// --parent-cgroup must stay under the root.
fn check_parent(parent: &Path) -> anyhow::Result<()> {
    let inside = parent
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if parent.as_os_str().is_empty() || !inside {
        bail!(
            "--parent-cgroup {}: must be a relative path of plain names (no /, . or ..), \
             such as vigil or vms/tenant-a",
            parent.display()
        );
    }
    Ok(())
}

/// Makes `controllers` available to the children of the cgroup `dir`.
fn enable(dir: &Path, controllers: &[String]) -> anyhow::Result<()> {
    let file = dir.join("cgroup.subtree_control");
    let on =
        fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !on.split_whitespace().any(|o| o == c.as_str()))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let change = missing.join(" ");
    fs::write(&file, &change).map_err(|e| {
        let why = if e.raw_os_error() == Some(libc::EBUSY) {
            " (a cgroup with processes of its own cannot pass domain controllers such as \
             memory or io down: give a --parent-cgroup that holds none)"
        } else {
            ""
        };
        anyhow::anyhow!("cannot write {change:?} to {}: {e}{why}", file.display())
    })
}

/// Where the cgroup v2 hierarchy is mounted, if it is.
pub fn mounted_v2_root() -> anyhow::Result<Option<PathBuf>> {
    let mounts = fs::read_to_string(MOUNTS).with_context(|| format!("cannot read {MOUNTS}"))?;
    Ok(v2_root(&mounts))
}

/// The mount point of the first cgroup2 file system in `mounts` (the text of
/// /proc/self/mounts).
fn v2_root(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(dir)))
    })
}

/// A mount point as the kernel writes it, with space, tab, newline and backslash
/// as octal escapes (`\040`).
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings() {
        let s = Setting::parse("cpu.max=50000 100000").unwrap();
        assert_eq!(
            (s.file.as_str(), s.value.as_str()),
            ("cpu.max", "50000 100000")
        );
        assert_eq!(s.controller(), Some("cpu"));
        let s = Setting::parse("io.max=8:0 wbps=1048576").unwrap();
        assert_eq!(
            (s.file.as_str(), s.value.as_str()),
            ("io.max", "8:0 wbps=1048576")
        );
        assert_eq!(
            Setting::parse("cgroup.max.descendants=3")
                .unwrap()
                .controller(),
            None
        );
        for (bad, why) in [
            ("memory.max", "not FILE=VALUE"),
            ("memory.max=", "not FILE=VALUE"),
            ("=1", "not FILE=VALUE"),
            ("max=1", "is not a cgroup file name"),
            (".max=1", "is not a cgroup file name"),
            ("../memory.max=1", "is not a cgroup file name"),
            ("cgroup.procs=1", "the jailer writes cgroup.procs itself"),
        ] {
            let e = Setting::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--cgroup {bad:?}: ")), "{e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn versions_and_parents() {
        let plan = |version: &str, parent: Option<&str>| {
            Cgroup::plan(version, &[], parent.map(Path::new), Path::new("vigil"), "a")
        };
        let e = plan("1", None).unwrap_err().to_string();
        assert!(e.starts_with("--cgroup-version 1: not supported"), "{e}");
        let e = plan("3", None).unwrap_err().to_string();
        assert!(e.starts_with("--cgroup-version \"3\": not 1 or 2"), "{e}");
        assert!(plan("2", None).unwrap().is_none());
        for bad in ["/vigil", "../x", "a/../b", "./a", ""] {
            let e = plan("2", Some(bad)).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--parent-cgroup {bad}: ")), "{e}");
        }
    }

    #[test]
    fn the_v2_hierarchy_is_found_in_the_mounts() {
        let hybrid = "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            v2_root(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(v2_root(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(v2_root("proc /proc proc rw 0 0\n"), None);
        assert_eq!(
            v2_root("none /mnt/my\\040cgroups cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
        assert_eq!(unescape("a\\134b\\0"), "a\\b\\0");
    }
}
