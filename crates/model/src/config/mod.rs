//! A VM's configuration, one struct per resource, validated once.
//!
//! Every front end (the `vigil run` flags, the per-VM API's bodies, a
//! Firecracker configuration file, the daemon's `POST /vms`) builds a
//! [`VmConfig`] and calls [`VmConfig::validate`]; nothing past that point checks
//! user input again. Errors are neutral: each names its field the way the
//! configuration document does (`vcpu_count 0: ...`), and a front end renames the
//! field to its own spelling with [`FieldError::named`] (`--cpus 0: ...`).

pub mod balloon;
pub mod boot;
pub mod compression;
pub mod drive;
pub mod introspect;
pub mod machine;
pub mod net;
pub mod rate_limit;
pub mod rt;
pub mod vsock;

use std::path::PathBuf;

pub use balloon::{BalloonConfig, BalloonConfigError};
pub use boot::{BootConfig, BootConfigError, BootProtocol, KernelImage};
pub use compression::{
    CompressionAlgo, MemoryCompression, MemoryCompressionError, MemoryPolicyUpdate,
};
pub use drive::{DriveConfig, DriveConfigError, IoEngine};
pub use introspect::{IntrospectConfig, IntrospectConfigError, Policy};
pub use machine::{CpuTemplate, HugePages, MachineConfig, MachineConfigError};
pub use net::{NetConfig, NetConfigError};
pub use rate_limit::{BucketUpdate, LimitUpdate, RateLimit};
pub use rt::{RtTimerConfig, RtTimerConfigError, SchedConfigError, SchedPolicy, VcpuSched};
pub use vsock::{VsockConfig, VsockConfigError};

/// An error about one field: its message starts with the field's name as the
/// configuration document spells it (`vcpu_count`, `path_on_host`).
pub trait FieldError: std::fmt::Display {
    /// The field at fault.
    fn field(&self) -> &'static str;

    /// The message with the field called `name` instead: a flag (`--cpus`) or a
    /// flag's key (`--disk id=`, which takes the value without a space). A string
    /// value, quoted in the neutral message as JSON surfaces show it, is shown
    /// bare, as it was typed: `--kernel /a b/vmlinux: ...`.
    fn named(&self, name: &str) -> String {
        let message = self.to_string();
        let rest = message.strip_prefix(self.field()).unwrap_or(&message);
        let rest = unquote_value(rest);
        if name.ends_with('=') {
            format!("{name}{}", rest.trim_start())
        } else {
            format!("{name}{rest}")
        }
    }
}

/// ` "a \"b\"": why` -> ` a "b": why`: the leading value of a message, unquoted
/// when it is a quoted string (Rust's `{:?}`); anything else as it is.
fn unquote_value(rest: &str) -> String {
    let Some(quoted) = rest.strip_prefix(" \"") else {
        return rest.to_owned();
    };
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, 't')) => value.push('\t'),
                Some((_, e)) => value.push(e),
                None => break,
            },
            '"' => return format!(" {value}{}", &quoted[i + 1..]),
            c => value.push(c),
        }
    }
    rest.to_owned()
}

/// Where the serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// The VMM's stdin and stdout.
    #[default]
    Stdio,
    /// Output to a file, no input.
    File(PathBuf),
    /// Discarded.
    None,
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

/// Most virtio devices a VM can have (one I/O APIC line each, GSI 5 to 23).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// A whole VM's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// The kernel, its initrd and command line.
    pub boot: BootConfig,
    /// vCPUs, memory, CPUID.
    pub machine: MachineConfig,
    /// virtio-blk disks, in the order the guest sees them.
    pub drives: Vec<DriveConfig>,
    /// virtio-net interfaces on taps, in the order the guest sees them.
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device bridged to Unix sockets.
    pub vsock: Option<VsockConfig>,
    /// A virtio-balloon device.
    pub balloon: Option<BalloonConfig>,
    /// A virtio-rng device, with its rate limit.
    pub rng: Option<RateLimit>,
    /// The serial console.
    pub console: ConsoleConfig,
    /// What a vCPU crash does.
    pub on_crash: OnCrash,
    /// How the host schedules the vCPU threads (entries as given; see
    /// [`VcpuSched::resolve`]).
    pub vcpu_sched: Vec<VcpuSched>,
    /// The RT timer device, with its limits.
    pub rt_timer: Option<RtTimerConfig>,
    /// Put the virtio devices on a PCI bus (virtio-pci, MSI-X) instead of
    /// virtio-mmio (`--enable-pci`).
    pub pci: bool,
    /// Cold guest memory compressed inside the VMM (`--memory-compression`);
    /// none: off.
    pub memory_compression: Option<MemoryCompression>,
    /// The most microseconds the device event loop polls the virtio rings
    /// after its last work instead of sleeping (`--io-poll-us`; 0: never).
    pub io_poll_us: u32,
}

/// `io_poll_us` unless set: long enough to catch the next request of a driver
/// that keeps one in flight on a nested host, whose exits take tens of µs.
pub const DEFAULT_IO_POLL_US: u32 = 200;
/// The largest `io_poll_us`.
pub const MAX_IO_POLL_US: u32 = 10_000;

/// What the host allows, read once and passed to validation.
#[derive(Clone, Copy, Debug)]
pub struct HostLimits {
    /// KVM's vCPU limit (`KVM_CAP_MAX_VCPUS`).
    pub kvm_max_vcpus: u32,
    /// Physical memory of the host in bytes.
    pub host_memory_bytes: u64,
}

impl HostLimits {
    /// This host's memory (`/proc/meminfo`) with KVM's vCPU limit as given; a
    /// process that does not open KVM (the daemon) passes [`machine::MAX_VCPUS`].
    pub fn read(kvm_max_vcpus: u32) -> Self {
        Self {
            kvm_max_vcpus,
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

/// A configuration that cannot be built, by resource.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Boot(#[from] BootConfigError),
    #[error(transparent)]
    Machine(#[from] MachineConfigError),
    #[error(transparent)]
    Drive(#[from] DriveConfigError),
    #[error(transparent)]
    Net(#[from] NetConfigError),
    #[error(transparent)]
    Vsock(#[from] VsockConfigError),
    #[error(transparent)]
    Balloon(#[from] BalloonConfigError),
    #[error(transparent)]
    Sched(#[from] SchedConfigError),
    #[error(transparent)]
    RtTimer(#[from] RtTimerConfigError),
    #[error(transparent)]
    MemoryCompression(#[from] MemoryCompressionError),
    #[error(
        "memory_compression: works on 4 KiB guest pages; turn huge_pages off (--huge-pages none)"
    )]
    CompressionWithHugePages,
    #[error("devices {count}: Vigil has interrupt lines for at most {MAX_VIRTIO_DEVICES} virtio devices")]
    TooManyDevices { count: usize },
    #[error("io_poll_us {us}: at most {MAX_IO_POLL_US} (10 ms); 0 turns polling off")]
    IoPoll { us: u32 },
}

impl FieldError for ConfigError {
    fn field(&self) -> &'static str {
        match self {
            ConfigError::Boot(e) => e.field(),
            ConfigError::Machine(e) => e.field(),
            ConfigError::Drive(e) => e.field(),
            ConfigError::Net(e) => e.field(),
            ConfigError::Vsock(e) => e.field(),
            ConfigError::Balloon(e) => e.field(),
            ConfigError::Sched(e) => e.field(),
            ConfigError::RtTimer(e) => e.field(),
            ConfigError::MemoryCompression(e) => e.field(),
            ConfigError::CompressionWithHugePages => "memory_compression",
            ConfigError::TooManyDevices { .. } => "devices",
            ConfigError::IoPoll { .. } => "io_poll_us",
        }
    }
}

impl ConfigError {
    /// The key of the configuration document the field is in: `machine-config`,
    /// `drives`, ...
    pub fn resource(&self) -> &'static str {
        match self {
            ConfigError::Boot(_) => "boot-source",
            ConfigError::Machine(_) => "machine-config",
            ConfigError::Drive(_) => "drives",
            ConfigError::Net(_) => "network-interfaces",
            ConfigError::Vsock(_) => "vsock",
            ConfigError::Balloon(_) => "balloon",
            ConfigError::Sched(_) => "vcpu-scheduling",
            ConfigError::RtTimer(_) => "rt-timer",
            ConfigError::MemoryCompression(_) | ConfigError::CompressionWithHugePages => {
                "memory-compression"
            }
            ConfigError::TooManyDevices { .. } => "devices",
            ConfigError::IoPoll { .. } => "io_poll_us",
        }
    }
}

impl VmConfig {
    /// Points the interfaces that reach MMDS at `store` (the one the process's
    /// API fills), which takes their MMDS configuration.
    pub fn share_mmds(&mut self, store: &vigil_mmds::Mmds) {
        for net in &mut self.nets {
            if let Some(own) = net.mmds.replace(store.clone()) {
                if let Some(config) = own.config() {
                    store.set_config(config);
                }
            }
        }
    }

    /// A config for `kernel` with Vigil's defaults: 1 vCPU, 128 MiB, console on stdio.
    pub fn new(kernel: KernelImage) -> Self {
        Self {
            boot: BootConfig::new(kernel),
            machine: MachineConfig::default(),
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            balloon: None,
            rng: None,
            console: ConsoleConfig::Stdio,
            on_crash: OnCrash::Exit,
            vcpu_sched: Vec::new(),
            rt_timer: None,
            pci: false,
            memory_compression: None,
            io_poll_us: DEFAULT_IO_POLL_US,
        }
    }

    /// How many virtio devices it has.
    pub fn virtio_devices(&self) -> usize {
        self.drives.len()
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.balloon.is_some())
            + usize::from(self.rng.is_some())
    }

    /// Checks everything that depends on user input against `limits`.
    pub fn validate(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        self.machine.validate(limits)?;
        self.boot.validate()?;
        for (i, drive) in self.drives.iter().enumerate() {
            drive.validate()?;
            if self.drives[..i].iter().any(|d| d.id == drive.id) {
                return Err(DriveConfigError::DuplicateId(drive.id.clone()).into());
            }
        }
        if let Some(balloon) = &self.balloon {
            balloon.validate(self.machine.mem_size_mib)?;
        }
        net::validate_all(&self.nets)?;
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        VcpuSched::resolve(&self.vcpu_sched, self.machine.vcpu_count)?;
        if let Some(rt_timer) = &self.rt_timer {
            rt_timer.validate()?;
        }
        if let Some(compression) = &self.memory_compression {
            compression.validate()?;
            if self.machine.huge_pages != HugePages::None {
                return Err(ConfigError::CompressionWithHugePages);
            }
        }
        if self.io_poll_us > MAX_IO_POLL_US {
            return Err(ConfigError::IoPoll {
                us: self.io_poll_us,
            });
        }
        let count = self.virtio_devices();
        if count > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices { count });
        }
        Ok(())
    }
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

    fn err(c: &VmConfig) -> ConfigError {
        c.validate(&LIMITS).unwrap_err()
    }

    #[test]
    fn defaults_are_valid() {
        embedded().validate(&LIMITS).unwrap();
    }

    #[test]
    fn errors_are_neutral_and_front_ends_name_them() {
        let mut c = embedded();
        c.machine.vcpu_count = 0;
        let e = err(&c);
        assert_eq!(
            e.to_string(),
            "vcpu_count 0: a VM needs at least one vCPU (1 to 254)"
        );
        assert_eq!(e.resource(), "machine-config");
        assert_eq!(
            e.named("--cpus"),
            "--cpus 0: a VM needs at least one vCPU (1 to 254)"
        );
        c.machine.vcpu_count = 300;
        let e = err(&c).named("--cpus");
        assert!(
            e.starts_with("--cpus 300: above this host's limit of 254"),
            "{e}"
        );
        c.machine.vcpu_count = 8;
        let tight = HostLimits {
            kvm_max_vcpus: 4,
            ..LIMITS
        };
        assert!(c
            .validate(&tight)
            .unwrap_err()
            .to_string()
            .contains("limit of 4"));

        c.machine.vcpu_count = 1;
        c.machine.mem_size_mib = 0;
        assert!(err(&c).named("--memory").starts_with("--memory 0"));
        c.machine.mem_size_mib = 1;
        assert_eq!(
            err(&c).named("--memory"),
            "--memory 1 MiB: the guest needs at least 2 MiB"
        );
        c.machine.mem_size_mib = 9000;
        assert_eq!(
            err(&c).to_string(),
            "mem_size_mib 9000 MiB: larger than this host's 8192 MiB of RAM"
        );
        c.machine.mem_size_mib = 128;
        c.boot.initrd = Some("/nonexistent/initrd.img".into());
        let e = err(&c).named("--initrd");
        assert!(
            e.starts_with("--initrd /nonexistent/initrd.img: cannot read it"),
            "{e}"
        );
        c.boot.initrd = Some("/".into());
        assert_eq!(err(&c).named("--initrd"), "--initrd /: not a regular file");
    }

    #[test]
    fn kernel_file_must_exist() {
        let c = VmConfig::new(KernelImage::File("/nonexistent/vmlinux".into()));
        let e = c.validate(&LIMITS).unwrap_err();
        assert_eq!(e.resource(), "boot-source");
        assert!(
            e.named("--kernel")
                .starts_with("--kernel /nonexistent/vmlinux: cannot read it: No such file"),
            "{e}"
        );
    }

    #[test]
    fn cmdline_limits() {
        let mut c = embedded();
        c.boot.cmdline = "a".repeat(5000);
        assert_eq!(
            err(&c).named("--cmdline"),
            "--cmdline: 5000 bytes, longer than the 2047 bytes a kernel accepts"
        );
        c.boot.cmdline = "a\0b".into();
        assert!(matches!(
            err(&c),
            ConfigError::Boot(BootConfigError::CmdlineNul)
        ));
    }

    fn drive(id: &str) -> DriveConfig {
        DriveConfig {
            id: id.into(),
            path: "/dev/null".into(),
            ..Default::default()
        }
    }

    #[test]
    fn drive_checks_name_the_value() {
        let mut c = embedded();
        c.drives = vec![drive("a"), drive("b")];
        c.validate(&LIMITS).unwrap();
        c.drives[1].id = "a".into();
        assert_eq!(
            err(&c).named("--disk id="),
            "--disk id=a: used by two disks"
        );
        c.drives[1].id = "x".repeat(21);
        assert!(err(&c)
            .to_string()
            .contains("longer than the 20 bytes virtio-blk allows"));
        c.drives[1] = drive("b");
        for n in [0, 17] {
            c.drives[1].num_queues = n;
            assert_eq!(
                err(&c).named("--disk num_queues="),
                format!("--disk num_queues={n}: expected 1 to 16 request queues")
            );
        }
        c.drives[1].num_queues = 16;
        c.validate(&LIMITS).unwrap();
        c.drives[1].path = "/".into();
        assert_eq!(
            err(&c).to_string(),
            "path_on_host \"/\": a directory, not a disk image"
        );
        c.drives = (0..20).map(|i| drive(&format!("d{i}"))).collect();
        assert_eq!(
            err(&c).to_string(),
            "devices 20: Vigil has interrupt lines for at most 19 virtio devices"
        );
    }

    #[test]
    fn balloon_fits_the_machine() {
        let mut c = embedded();
        c.machine.mem_size_mib = 64;
        c.balloon = Some(BalloonConfig {
            target_mib: 65,
            ..Default::default()
        });
        assert_eq!(
            err(&c).named("--balloon size_mib="),
            "--balloon size_mib=65: more than the guest's 64 MiB"
        );
    }

    #[test]
    fn vsock_checks_name_the_value() {
        let mut c = embedded();
        c.vsock = Some(VsockConfig {
            cid: 2,
            uds: "/tmp/v.sock".into(),
        });
        assert!(err(&c)
            .named("--vsock cid=")
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
        assert!(err(&c).to_string().contains("longer"));
    }

    #[test]
    fn net_checks_name_the_value() {
        use crate::mac::MacAddr;
        let mut c = embedded();
        c.nets = vec![NetConfig::new("vg0", 0), NetConfig::new("vg1", 1)];
        c.validate(&LIMITS).unwrap();
        c.nets[1].tap = "vg0".into();
        assert_eq!(
            err(&c).named("--net tap="),
            "--net tap=vg0: used by two interfaces"
        );
        c.nets[1] = NetConfig::new("vg1", 0);
        assert_eq!(
            err(&c).named("--net mac="),
            "--net mac=02:76:69:67:00:00: used by two interfaces"
        );
        c.nets[1] = NetConfig::new("a-very-long-interface", 1);
        assert!(err(&c)
            .named("--net tap=")
            .starts_with("--net tap=a-very-long-interface: longer than"));
        c.nets[1] = NetConfig::new("a/b", 1);
        assert!(err(&c).named("--net tap=").starts_with("--net tap=a/b:"));
        assert!(err(&c).to_string().starts_with("host_dev_name \"a/b\":"));
        c.nets[1] = NetConfig::new("vg1", 1);
        c.nets[1].mac = MacAddr([1, 2, 3, 4, 5, 6]);
        assert!(err(&c)
            .named("--net mac=")
            .starts_with("--net mac=01:02:03:04:05:06: a multicast address"));
    }
}
