//! Which host files a VM's configuration may name. The VMM opens (or creates)
//! every path in it with the daemon's rights, so a client of the API could
//! otherwise have any file the daemon can read attached to a guest as a disk.
//! The rule: each path is absolute, has no `..`, and resolves (symbolic links
//! followed, as the VMM would follow them) inside the VM's own folder
//! (`<state-dir>/vms/<id>/`, minus the files the daemon keeps there) or inside
//! a folder the operator allowed (`--allow-vm-path`). A path that does not
//! exist yet (a socket or log the VMM creates) is resolved through its nearest
//! existing parent. The answer to a path outside does not depend on whether it
//! exists.
//!
//! The check happens when the VM is created; a folder the operator allows must
//! not be writable by whoever should not choose what it holds (a link swapped
//! in after the check would be followed).

use std::path::{Component, Path, PathBuf};

use vigil_model::firecracker::FullVmConfig;

/// A path a configuration may not name: its field, the path, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config: {field} {path:?}: {why}")]
pub struct PathRefused {
    pub field: String,
    pub path: String,
    pub why: String,
}

/// Files the daemon keeps in a VM's folder; the VMM may not write over them.
const DAEMON_FILES: &[&str] = &[
    "config.json",
    "api.sock",
    "exit.json",
    crate::findings::FINDINGS_FILE,
    super::SYSCALLS_FILE,
];

/// The daemon's logs of a VM, rotated as `NAME.1`, `NAME.2`, ...
const DAEMON_LOGS: &[&str] = &[super::process::CONSOLE_LOG, super::process::VMM_LOG];

fn is_daemon_file(name: &str) -> bool {
    DAEMON_FILES.contains(&name)
        || DAEMON_LOGS.iter().any(|log| {
            name.strip_prefix(log)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
}

/// Every host path in `config`, with its field as the configuration spells it.
pub fn config_paths(config: &FullVmConfig) -> Vec<(String, &str)> {
    let mut paths = Vec::new();
    if let Some(boot) = &config.boot_source {
        paths.push((
            "boot-source.kernel_image_path".to_owned(),
            boot.kernel_image_path.as_str(),
        ));
        if let Some(initrd) = &boot.initrd_path {
            paths.push(("boot-source.initrd_path".to_owned(), initrd.as_str()));
        }
    }
    for drive in &config.drives {
        if let Some(path) = &drive.path_on_host {
            paths.push((
                format!("drives[{:?}].path_on_host", drive.drive_id),
                path.as_str(),
            ));
        }
    }
    if let Some(vsock) = &config.vsock {
        paths.push(("vsock.uds_path".to_owned(), vsock.uds_path.as_str()));
    }
    if let Some(path) = config.logger.as_ref().and_then(|l| l.log_path.as_ref()) {
        paths.push(("logger.log_path".to_owned(), path.as_str()));
    }
    if let Some(metrics) = &config.metrics {
        paths.push((
            "metrics.metrics_path".to_owned(),
            metrics.metrics_path.as_str(),
        ));
    }
    paths
}

/// Where `path` (absolute, without `..`) leads: itself resolved when it
/// exists, else its nearest existing parent resolved and the rest appended.
/// `None` when that cannot be resolved (a link to nowhere, a folder it cannot
/// read).
fn resolve(path: &Path) -> Option<PathBuf> {
    let mut existing = path;
    let mut rest = Vec::new();
    // A link to nowhere exists as a link: it is resolved (and fails), not
    // skipped, since the VMM would create its target.
    while std::fs::symlink_metadata(existing).is_err() {
        rest.push(existing.file_name()?);
        existing = existing.parent()?;
    }
    let mut resolved = std::fs::canonicalize(existing).ok()?;
    resolved.extend(rest.iter().rev());
    Some(resolved)
}

/// The folders a VM's configuration may name files in.
#[derive(Debug, Clone)]
pub struct PathPolicy {
    /// `<state-dir>/vms`, resolved.
    vms: PathBuf,
    /// The operator's folders (`--allow-vm-path`), resolved.
    allowed: Vec<PathBuf>,
}

impl PathPolicy {
    /// `vms` and `allowed` must exist (the daemon resolves them at start).
    pub fn new(vms: PathBuf, allowed: Vec<PathBuf>) -> Self {
        Self { vms, allowed }
    }

    /// Checks every path of VM `id`'s configuration; the first refused is the error.
    pub fn check(&self, id: &str, config: &FullVmConfig) -> Result<(), PathRefused> {
        let own = self.vms.join(id);
        for (field, path) in config_paths(config) {
            let refuse = |why: String| PathRefused {
                field: field.clone(),
                path: path.to_owned(),
                why,
            };
            let p = Path::new(path);
            if !p.is_absolute() {
                return Err(refuse(
                    "not an absolute path (the VMM does not run in the caller's folder)".into(),
                ));
            }
            if p.components().any(|c| c == Component::ParentDir) {
                return Err(refuse("must not contain \"..\"".into()));
            }
            let resolved = resolve(p);
            let inside = |root: &Path| resolved.as_deref().is_some_and(|r| r.starts_with(root));
            if inside(&own) {
                let resolved = resolved.as_deref().unwrap_or(p);
                let name = resolved.file_name().and_then(|n| n.to_str());
                if resolved.parent() == Some(own.as_path()) && name.is_some_and(is_daemon_file) {
                    return Err(refuse(format!(
                        "{} is the daemon's own file in the VM's folder; pick another name",
                        resolved.display()
                    )));
                }
                continue;
            }
            if self.allowed.iter().any(|root| inside(root)) {
                continue;
            }
            let allowed = if self.allowed.is_empty() {
                "no --allow-vm-path given".to_owned()
            } else {
                let list: Vec<String> = self
                    .allowed
                    .iter()
                    .map(|a| a.display().to_string())
                    .collect();
                format!("--allow-vm-path {}", list.join(", "))
            };
            let via = match &resolved {
                Some(r) if r.as_path() != p => format!(" (it leads to {})", r.display()),
                _ => String::new(),
            };
            return Err(refuse(format!(
                "outside the VM's folder ({}) and the folders the daemon allows ({allowed}){via}: a VM may name only files there",
                own.display()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vigil-paths-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("state/vms")).unwrap();
        std::fs::create_dir_all(dir.join("images")).unwrap();
        std::fs::canonicalize(dir).unwrap()
    }

    fn config(value: serde_json::Value) -> FullVmConfig {
        serde_json::from_value(value).unwrap()
    }

    fn kernel(path: &Path) -> FullVmConfig {
        config(serde_json::json!({"boot-source": {"kernel_image_path": path}}))
    }

    #[test]
    fn every_path_field_is_checked() {
        let c = config(serde_json::json!({
            "boot-source": {"kernel_image_path": "/k", "initrd_path": "/i"},
            "drives": [{"drive_id": "root", "is_root_device": true, "path_on_host": "/d"}],
            "vsock": {"guest_cid": 3, "uds_path": "/v"},
            "logger": {"log_path": "/l"},
            "metrics": {"metrics_path": "/m"},
        }));
        let fields: Vec<(String, &str)> = config_paths(&c);
        assert_eq!(
            fields,
            [
                ("boot-source.kernel_image_path".to_owned(), "/k"),
                ("boot-source.initrd_path".to_owned(), "/i"),
                ("drives[\"root\"].path_on_host".to_owned(), "/d"),
                ("vsock.uds_path".to_owned(), "/v"),
                ("logger.log_path".to_owned(), "/l"),
                ("metrics.metrics_path".to_owned(), "/m"),
            ]
        );
    }

    #[test]
    fn inside_the_vms_folder_or_an_allowed_one() {
        let dir = scratch("rule");
        let images = dir.join("images");
        std::fs::write(images.join("kernel"), b"k").unwrap();
        let policy = PathPolicy::new(dir.join("state/vms"), vec![images.clone()]);
        // An allowed folder, and a file there that does not exist yet.
        assert_eq!(policy.check("a", &kernel(&images.join("kernel"))), Ok(()));
        assert_eq!(policy.check("a", &kernel(&images.join("new/x"))), Ok(()));
        // The VM's own folder (not created yet), but not the daemon's files.
        let own = dir.join("state/vms/a");
        assert_eq!(policy.check("a", &kernel(&own.join("vsock.sock"))), Ok(()));
        for name in [
            "config.json",
            "console.log",
            "console.log.2",
            "vmm.log",
            "exit.json",
        ] {
            let e = policy.check("a", &kernel(&own.join(name))).unwrap_err();
            assert!(e.why.contains("the daemon's own file"), "{name}: {e}");
        }
        // Another VM's folder is not this one's.
        let e = policy
            .check("a", &kernel(&dir.join("state/vms/b/disk")))
            .unwrap_err();
        assert!(e.why.starts_with("outside the VM's folder"), "{e}");

        // Outside: the same answer whether the file exists or not.
        let shadow = policy
            .check("a", &kernel(Path::new("/etc/shadow")))
            .unwrap_err();
        let absent = policy
            .check("a", &kernel(Path::new("/etc/no-such-file")))
            .unwrap_err();
        assert_eq!(
            shadow.to_string(),
            format!(
                "config: boot-source.kernel_image_path \"/etc/shadow\": outside the VM's folder ({}) and the folders the daemon allows (--allow-vm-path {}): a VM may name only files there",
                own.display(),
                images.display()
            )
        );
        assert_eq!(shadow.why, absent.why);
        // Relative paths and `..`.
        let e = policy
            .check("a", &kernel(Path::new("images/kernel")))
            .unwrap_err();
        assert!(e.why.contains("not an absolute path"), "{e}");
        let e = policy
            .check("a", &kernel(&images.join("../../../etc/passwd")))
            .unwrap_err();
        assert!(e.why.contains("\"..\""), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn links_are_followed_where_they_lead() {
        let dir = scratch("links");
        let images = dir.join("images");
        std::os::unix::fs::symlink("/etc/passwd", images.join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc", images.join("etc")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/target", images.join("dangling")).unwrap();
        std::fs::write(images.join("real"), b"x").unwrap();
        std::os::unix::fs::symlink(images.join("real"), images.join("inside")).unwrap();
        let policy = PathPolicy::new(dir.join("state/vms"), vec![images.clone()]);
        let e = policy
            .check("a", &kernel(&images.join("escape")))
            .unwrap_err();
        assert!(
            e.why
                .ends_with("(it leads to /etc/passwd): a VM may name only files there"),
            "{e}"
        );
        // Through a linked folder, to a file that does not exist yet.
        let e = policy
            .check("a", &kernel(&images.join("etc/new")))
            .unwrap_err();
        assert!(e.why.contains("(it leads to /etc/new)"), "{e}");
        // A link to nowhere: its target would be created where it points.
        let e = policy
            .check("a", &kernel(&images.join("dangling")))
            .unwrap_err();
        assert!(e.why.starts_with("outside"), "{e}");
        // A link that stays inside is fine.
        assert_eq!(policy.check("a", &kernel(&images.join("inside"))), Ok(()));
        let _ = std::fs::remove_dir_all(dir);
    }
}
