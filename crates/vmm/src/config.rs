//! What a VM is made of, validated once, before anything is built.
//!
//! Every check that can fail because of user input happens in [`VmConfig::validate`],
//! and its error names the option and the value at fault.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::arch::x86_64::cpuid::CpuFeature;
pub use vigil_devices::rate_limiter::RateLimit;
pub use vigil_devices::virtio::balloon::BalloonConfig;
pub use vigil_devices::virtio::block::BlockConfig;
pub use vigil_devices::virtio::net::NetConfig;
pub use vigil_devices::virtio::vsock::VsockConfig;

/// Where the kernel image comes from.
#[derive(Clone, Debug)]
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

/// Where the serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// The VMM's stdin and stdout.
    Stdio,
    /// Output to a file, no input.
    File(PathBuf),
    /// Discarded.
    None,
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

/// CPUID features to hide from the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CpuTemplate {
    /// Pass through what KVM supports, except on hosts whose KVM emulates guest
    /// kernel code (`kvm_pvm`), where instructions that emulator lacks are hidden.
    #[default]
    Auto,
    /// Pass through what KVM supports.
    Host,
}

/// How guest RAM is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HugePages {
    /// 4 KiB pages (`MADV_NOHUGEPAGE`): the VMM's resident memory grows only by
    /// the pages the guest touches.
    #[default]
    None,
    /// Transparent huge pages (`MADV_HUGEPAGE`), where the host allows them: KVM
    /// maps guest memory in 2 MiB pages, faster for guests that touch much of it;
    /// a touched byte makes its whole 2 MiB page resident.
    Transparent,
}

/// What a vCPU crash (triple fault, `KVM_EXIT_INTERNAL_ERROR`, entry failure, a
/// guest-reported crash) does to the VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnCrash {
    /// The VM ends at once with the crash report.
    #[default]
    Exit,
    /// The VM is kept, paused, so that its state can be inspected (API,
    /// introspection) until it is stopped; it cannot resume. It then ends with the
    /// crash report as with `Exit`.
    Pause,
}

/// A whole VM's configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The kernel.
    pub kernel: KernelImage,
    /// An initial ramdisk, passed to the guest as-is.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// The serial console.
    pub console: ConsoleConfig,
    /// A `System.map` to resolve guest addresses in crash reports.
    pub symbols: Option<PathBuf>,
    /// Entry point choice.
    pub boot_protocol: BootProtocol,
    /// Base CPUID template.
    pub cpu_template: CpuTemplate,
    /// Extra features to hide, on top of the template.
    pub cpuid_hide: Vec<CpuFeature>,
    /// virtio-blk disks, in the order the guest sees them.
    pub disks: Vec<BlockConfig>,
    /// A virtio-rng device, with its rate limit.
    pub rng: Option<RateLimit>,
    /// A virtio-balloon device.
    pub balloon: Option<BalloonConfig>,
    /// virtio-net interfaces on taps, in the order the guest sees them.
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device bridged to Unix sockets.
    pub vsock: Option<VsockConfig>,
    /// What a vCPU crash does.
    pub on_crash: OnCrash,
    /// How guest RAM is backed.
    pub huge_pages: HugePages,
}

/// What the host allows, read once and passed to validation.
#[derive(Clone, Copy, Debug)]
pub struct HostLimits {
    /// KVM's vCPU limit (`KVM_CAP_MAX_VCPUS`).
    pub kvm_max_vcpus: u32,
    /// Physical memory of the host in bytes.
    pub host_memory_bytes: u64,
}

/// Most vCPUs Vigil describes: xAPIC ids in the MADT are 8-bit and 0xff is broadcast.
pub const MAX_VCPUS: u32 = 254;

/// A configuration error, naming the option and value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--cpus 0: a VM needs at least one vCPU")]
    NoVcpus,
    #[error("--cpus {requested}: above this host's limit of {limit} (KVM allows {kvm}, Vigil's MADT {vigil})", limit = .kvm.min(&MAX_VCPUS), vigil = MAX_VCPUS)]
    TooManyVcpus { requested: u32, kvm: u32 },
    #[error("--memory 0: a VM needs memory")]
    NoMemory,
    #[error("--memory {requested} MiB: the guest needs at least {min} MiB")]
    TooLittleMemory { requested: u64, min: u64 },
    #[error("--memory {requested} MiB: larger than this host's {host} MiB of RAM")]
    TooMuchMemory { requested: u64, host: u64 },
    #[error("{option}{path}: cannot read it: {source}")]
    Unreadable {
        option: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{option}{path}: not a regular file")]
    NotAFile { option: &'static str, path: String },
    #[error("--cmdline: {len} bytes, longer than the {max} bytes a kernel accepts")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("--cmdline: contains a NUL byte")]
    CmdlineNul,
    #[error("--balloon size_mib={size}: more than the guest's {memory} MiB")]
    BalloonTooBig { size: u64, memory: u64 },
    #[error("--disk id={id}: used by two disks")]
    DuplicateDiskId { id: String },
    #[error("--net tap={tap}: {why}")]
    BadTapName { tap: String, why: &'static str },
    #[error("--net tap={tap}: used by two interfaces")]
    DuplicateTap { tap: String },
    #[error("--net mac={mac}: {why}")]
    BadMac { mac: String, why: &'static str },
    #[error("--vsock cid={cid}: {why}")]
    BadCid { cid: u64, why: &'static str },
    #[error("--vsock uds={path}: {why}")]
    BadUds { path: String, why: &'static str },
    #[error("{count} virtio devices: Vigil has interrupt lines for at most {max}")]
    TooManyDevices { count: usize, max: usize },
}

/// Most virtio devices a VM can have (one I/O APIC line each, GSI 5 to 23).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// Smallest VM Vigil builds: room for the boot structures, a kernel and its stack.
pub const MIN_MEMORY_MIB: u64 = 2;

impl VmConfig {
    /// A config for `kernel` with Vigil's defaults: 1 vCPU, 128 MiB, console on stdio.
    pub fn new(kernel: KernelImage) -> Self {
        Self {
            kernel,
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 128,
            console: ConsoleConfig::Stdio,
            symbols: None,
            boot_protocol: BootProtocol::Auto,
            cpu_template: CpuTemplate::Auto,
            cpuid_hide: Vec::new(),
            disks: Vec::new(),
            rng: None,
            balloon: None,
            nets: Vec::new(),
            vsock: None,
            on_crash: OnCrash::Exit,
            huge_pages: HugePages::None,
        }
    }

    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// Checks everything that depends on user input against `limits`.
    pub fn validate(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        match self.vcpus {
            0 => return Err(ConfigError::NoVcpus),
            n if n > limits.kvm_max_vcpus.min(MAX_VCPUS) => {
                return Err(ConfigError::TooManyVcpus {
                    requested: n,
                    kvm: limits.kvm_max_vcpus,
                })
            }
            _ => {}
        }
        match self.memory_mib {
            0 => return Err(ConfigError::NoMemory),
            m if m < MIN_MEMORY_MIB => {
                return Err(ConfigError::TooLittleMemory {
                    requested: m,
                    min: MIN_MEMORY_MIB,
                })
            }
            m if m.saturating_mul(1 << 20) > limits.host_memory_bytes => {
                return Err(ConfigError::TooMuchMemory {
                    requested: m,
                    host: limits.host_memory_bytes >> 20,
                })
            }
            _ => {}
        }
        if let KernelImage::File(path) = &self.kernel {
            check_readable("--kernel ", path)?;
        }
        if let Some(path) = &self.initrd {
            check_readable("--initrd ", path)?;
        }
        if let Some(path) = &self.symbols {
            check_readable("--symbols ", path)?;
        }
        if self.cmdline.len() >= crate::arch::x86_64::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong {
                len: self.cmdline.len(),
                max: crate::arch::x86_64::layout::CMDLINE_MAX_SIZE - 1,
            });
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        // Disk images are opened (and their errors reported) by the builder: they
        // may be block devices, and read-only ones need no write permission.
        for (i, disk) in self.disks.iter().enumerate() {
            if self.disks[..i].iter().any(|d| d.id == disk.id) {
                return Err(ConfigError::DuplicateDiskId {
                    id: disk.id.clone(),
                });
            }
        }
        if let Some(b) = self.balloon.filter(|b| b.target_mib > self.memory_mib) {
            return Err(ConfigError::BalloonTooBig {
                size: b.target_mib,
                memory: self.memory_mib,
            });
        }
        for (i, net) in self.nets.iter().enumerate() {
            validate_net(net)?;
            if self.nets[..i].iter().any(|n| n.tap == net.tap) {
                return Err(ConfigError::DuplicateTap {
                    tap: net.tap.clone(),
                });
            }
            if self.nets[..i].iter().any(|n| n.mac == net.mac) {
                return Err(ConfigError::BadMac {
                    mac: format_mac(&net.mac),
                    why: "used by two interfaces",
                });
            }
        }
        if let Some(vsock) = &self.vsock {
            validate_vsock(vsock)?;
        }
        let count = self.disks.len()
            + usize::from(self.rng.is_some())
            + usize::from(self.balloon.is_some())
            + self.nets.len()
            + usize::from(self.vsock.is_some());
        if count > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices {
                count,
                max: MAX_VIRTIO_DEVICES,
            });
        }
        Ok(())
    }
}

/// `02:76:69:67:00:NN` ("vig", locally administered): the MAC of interface `index`
/// when none is given.
pub fn default_mac(index: usize) -> [u8; 6] {
    [0x02, 0x76, 0x69, 0x67, (index >> 8) as u8, index as u8]
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn validate_net(net: &NetConfig) -> Result<(), ConfigError> {
    let bad = |why| ConfigError::BadTapName {
        tap: net.tap.clone(),
        why,
    };
    if net.tap.is_empty() {
        return Err(bad("an interface needs a name"));
    }
    if net.tap.len() > vigil_devices::virtio::net::tap::IFNAME_MAX {
        return Err(bad("longer than the 15 bytes of a Linux interface name"));
    }
    if net.tap == "." || net.tap == ".." {
        return Err(bad("not an interface name"));
    }
    if net
        .tap
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(bad(
            "an interface name has no '/', ':', spaces or control characters",
        ));
    }
    if net.mac[0] & 1 != 0 {
        return Err(ConfigError::BadMac {
            mac: format_mac(&net.mac),
            why: "a multicast address (the low bit of the first byte is set)",
        });
    }
    if net.mac == [0; 6] {
        return Err(ConfigError::BadMac {
            mac: format_mac(&net.mac),
            why: "the all-zero address",
        });
    }
    Ok(())
}

fn validate_vsock(vsock: &VsockConfig) -> Result<(), ConfigError> {
    let bad_cid = |why| ConfigError::BadCid {
        cid: vsock.cid,
        why,
    };
    if vsock.cid < 3 {
        return Err(bad_cid(
            "0 to 2 are reserved (2 is the host); use 3 or more",
        ));
    }
    if vsock.cid >= u64::from(u32::MAX) {
        return Err(bad_cid("above the 32-bit CIDs guests use"));
    }
    let bad_uds = |why| ConfigError::BadUds {
        path: vsock.uds.display().to_string(),
        why,
    };
    // sun_path holds 108 bytes; `_<port>` (up to 11 more) is appended for guest
    // connections.
    let len = vsock.uds.as_os_str().len();
    if len == 0 {
        return Err(bad_uds("needs a path"));
    }
    if len + 11 > 107 {
        return Err(bad_uds(
            "longer than a Unix socket path allows (96 bytes here)",
        ));
    }
    Ok(())
}

fn check_readable(option: &'static str, path: &Path) -> Result<(), ConfigError> {
    let file = File::open(path).map_err(|source| ConfigError::Unreadable {
        option,
        path: path.display().to_string(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| ConfigError::Unreadable {
        option,
        path: path.display().to_string(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ConfigError::NotAFile {
            option,
            path: path.display().to_string(),
        });
    }
    Ok(())
}

impl HostLimits {
    /// Reads the limits of this host from KVM and `/proc/meminfo`.
    pub fn probe(kvm: &kvm_ioctls::Kvm) -> Self {
        Self {
            kvm_max_vcpus: kvm.get_max_vcpus() as u32,
            host_memory_bytes: host_memory_bytes().unwrap_or(u64::MAX),
        }
    }
}

fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HostLimits = HostLimits {
        kvm_max_vcpus: 1024,
        host_memory_bytes: 8 << 30,
    };

    fn embedded() -> VmConfig {
        VmConfig::new(KernelImage::Embedded {
            name: "test",
            bytes: &[],
        })
    }

    #[test]
    fn defaults_are_valid() {
        embedded().validate(&LIMITS).unwrap();
    }

    #[test]
    fn errors_name_the_option_and_value() {
        let mut c = embedded();
        c.vcpus = 0;
        assert_eq!(
            c.validate(&LIMITS).unwrap_err().to_string(),
            "--cpus 0: a VM needs at least one vCPU"
        );
        c.vcpus = 300;
        let e = c.validate(&LIMITS).unwrap_err().to_string();
        assert!(
            e.starts_with("--cpus 300: above this host's limit of 254"),
            "{e}"
        );
        c.vcpus = 8;
        let tight = HostLimits {
            kvm_max_vcpus: 4,
            ..LIMITS
        };
        assert!(c
            .validate(&tight)
            .unwrap_err()
            .to_string()
            .contains("limit of 4"));

        c.vcpus = 1;
        c.memory_mib = 0;
        assert!(c
            .validate(&LIMITS)
            .unwrap_err()
            .to_string()
            .starts_with("--memory 0"));
        c.memory_mib = 9000;
        assert_eq!(
            c.validate(&LIMITS).unwrap_err().to_string(),
            "--memory 9000 MiB: larger than this host's 8192 MiB of RAM"
        );
        c.memory_mib = 128;
        c.initrd = Some("/nonexistent/initrd.img".into());
        let e = c.validate(&LIMITS).unwrap_err().to_string();
        assert!(
            e.starts_with("--initrd /nonexistent/initrd.img: cannot read it"),
            "{e}"
        );
        c.initrd = Some("/".into());
        assert_eq!(
            c.validate(&LIMITS).unwrap_err().to_string(),
            "--initrd /: not a regular file"
        );
    }

    #[test]
    fn kernel_file_must_exist() {
        let c = VmConfig::new(KernelImage::File("/nonexistent/vmlinux".into()));
        let e = c.validate(&LIMITS).unwrap_err().to_string();
        assert!(
            e.starts_with("--kernel /nonexistent/vmlinux: cannot read it: No such file"),
            "{e}"
        );
    }

    #[test]
    fn cmdline_limits() {
        let mut c = embedded();
        c.cmdline = "a".repeat(5000);
        assert!(c
            .validate(&LIMITS)
            .unwrap_err()
            .to_string()
            .contains("5000 bytes"));
        c.cmdline = "a\0b".into();
        assert!(matches!(c.validate(&LIMITS), Err(ConfigError::CmdlineNul)));
    }

    fn net(tap: &str, mac: [u8; 6]) -> NetConfig {
        NetConfig {
            tap: tap.into(),
            mac,
            rx_rate_limit: RateLimit::default(),
            tx_rate_limit: RateLimit::default(),
        }
    }

    #[test]
    fn vsock_checks_name_the_value() {
        let mut c = embedded();
        c.vsock = Some(VsockConfig {
            cid: 2,
            uds: "/tmp/v.sock".into(),
        });
        assert!(c
            .validate(&LIMITS)
            .unwrap_err()
            .to_string()
            .starts_with("--vsock cid=2: 0 to 2 are reserved"));
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds: "/tmp/v.sock".into(),
        });
        c.validate(&LIMITS).unwrap();
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds: "a".repeat(100).into(),
        });
        assert!(c
            .validate(&LIMITS)
            .unwrap_err()
            .to_string()
            .contains("longer"));
    }

    #[test]
    fn net_checks_name_the_value() {
        let mut c = embedded();
        c.nets = vec![net("vg0", default_mac(0)), net("vg1", default_mac(1))];
        c.validate(&LIMITS).unwrap();
        assert_eq!(format_mac(&default_mac(1)), "02:76:69:67:00:01");
        c.nets[1].tap = "vg0".into();
        assert_eq!(
            c.validate(&LIMITS).unwrap_err().to_string(),
            "--net tap=vg0: used by two interfaces"
        );
        c.nets[1] = net("vg1", default_mac(0));
        assert_eq!(
            c.validate(&LIMITS).unwrap_err().to_string(),
            "--net mac=02:76:69:67:00:00: used by two interfaces"
        );
        c.nets[1] = net("a-very-long-interface", default_mac(1));
        assert!(c
            .validate(&LIMITS)
            .unwrap_err()
            .to_string()
            .starts_with("--net tap=a-very-long-interface: longer than"));
        c.nets[1] = net("a/b", default_mac(1));
        assert!(c.validate(&LIMITS).is_err());
        c.nets[1] = net("vg1", [1, 2, 3, 4, 5, 6]);
        assert!(c
            .validate(&LIMITS)
            .unwrap_err()
            .to_string()
            .starts_with("--net mac=01:02:03:04:05:06: a multicast address"));
    }
}
