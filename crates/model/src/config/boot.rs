//! What the VM boots: the kernel, its initrd and command line, and how to enter it.

use std::path::{Path, PathBuf};

use crate::config::FieldError;

/// The longest command line (with its NUL) a kernel accepts.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Where the kernel image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelImage {
    /// A file on the host: an ELF `vmlinux` or a `bzImage`.
    File(PathBuf),
    /// An image compiled into the VMM (the test guest).
    Embedded {
        /// Name shown in messages.
        name: &'static str,
        /// The ELF image.
        bytes: &'static [u8],
    },
}

impl std::fmt::Display for KernelImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelImage::File(p) => write!(f, "{}", p.display()),
            KernelImage::Embedded { name, .. } => write!(f, "<embedded {name}>"),
        }
    }
}

/// Which entry point to use in the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH when the ELF has the PVH note, else the Linux 64-bit entry.
    #[default]
    Auto,
    /// PVH only (fails if the image lacks the note).
    Pvh,
    /// The Linux 64-bit boot protocol (`startup_64` with a zero page).
    Linux,
}

/// The boot source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootConfig {
    /// The kernel.
    pub kernel: KernelImage,
    /// An initial ramdisk, passed to the guest as-is.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Entry point choice.
    pub protocol: BootProtocol,
    /// A `System.map` to name guest addresses (crash reports, introspection);
    /// without it, a kernel ELF's own symbol table serves.
    pub symbols: Option<PathBuf>,
}

impl BootConfig {
    /// Boots `kernel` with an empty command line.
    pub fn new(kernel: KernelImage) -> Self {
        Self {
            kernel,
            initrd: None,
            cmdline: String::new(),
            protocol: BootProtocol::Auto,
            symbols: None,
        }
    }
}

/// A boot source that cannot boot.
#[derive(Debug, thiserror::Error)]
pub enum BootConfigError {
    #[error("{field} {path:?}: cannot read it: {source}")]
    Unreadable {
        field: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{field} {path:?}: not a regular file")]
    NotAFile { field: &'static str, path: String },
    #[error("boot_args: {len} bytes, longer than the {max} bytes a kernel accepts", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong { len: usize },
    #[error("boot_args: contains a NUL byte")]
    CmdlineNul,
}

impl FieldError for BootConfigError {
    fn field(&self) -> &'static str {
        match self {
            Self::Unreadable { field, .. } | Self::NotAFile { field, .. } => field,
            Self::CmdlineTooLong { .. } | Self::CmdlineNul => "boot_args",
        }
    }
}

impl BootConfig {
    /// Checks that the files can be read and the command line fits.
    pub fn validate(&self) -> Result<(), BootConfigError> {
        if let KernelImage::File(path) = &self.kernel {
            check_readable("kernel_image_path", path)?;
        }
        if let Some(path) = &self.initrd {
            check_readable("initrd_path", path)?;
        }
        if let Some(path) = &self.symbols {
            check_readable("symbols", path)?;
        }
        check_cmdline(&self.cmdline)
    }
}

/// The command line fits a kernel's buffer and has no NUL.
pub fn check_cmdline(cmdline: &str) -> Result<(), BootConfigError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootConfigError::CmdlineTooLong { len: cmdline.len() });
    }
    if cmdline.contains('\0') {
        return Err(BootConfigError::CmdlineNul);
    }
    Ok(())
}

/// `path` is a regular file this process can open.
pub fn check_readable(field: &'static str, path: &Path) -> Result<(), BootConfigError> {
    let unreadable = |source| BootConfigError::Unreadable {
        field,
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    if !file.metadata().map_err(unreadable)?.is_file() {
        return Err(BootConfigError::NotAFile {
            field,
            path: path.display().to_string(),
        });
    }
    Ok(())
}
