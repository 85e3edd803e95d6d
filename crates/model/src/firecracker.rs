//! Firecracker's configuration document: the bodies of its API's `PUT`
//! requests and of its configuration file (`--config-file`, the daemon's
//! `POST /vms`), with Firecracker's field names, and their translation into
//! Vigil's [`VmConfig`]. What Firecracker accepts and Vigil does not offer is
//! refused here, naming the field; everything else is checked by
//! [`VmConfig::validate`], once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{
    self, BalloonConfig, BootConfig, BucketUpdate, ConfigError, DriveConfig, FieldError, IoEngine,
    KernelImage, LimitUpdate, NetConfig, RateLimit, VmConfig, VsockConfig,
};
use crate::cpu::{BitModifier, CpuModifiers, CpuidModifier, MsrModifier, Reg};
pub use crate::json::{parse, JsonError};
use crate::mac::{BadMac, MacAddr};
use vigil_mmds::{Mmds, MmdsConfig, MmdsConfigError};

/// The kernel command line when `boot_args` is not given.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1";

/// `PUT /boot-source`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// `PUT /machine-config`: every optional field not given takes its default.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Accepted either way: Vigil always tracks guest memory writes (diff
    /// snapshots need them).
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default = "huge_pages_none")]
    pub huge_pages: String,
}

fn huge_pages_none() -> String {
    "None".into()
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: huge_pages_none(),
        }
    }
}

/// Firecracker's token bucket: `size` tokens, refilled in `refill_time` ms, plus a
/// `one_time_burst` spent first.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

/// Firecracker's rate limiter: a bandwidth bucket (bytes) and an operations bucket.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// Vigil's: request queues (`VIRTIO_BLK_F_MQ` above 1); absent: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
    /// Vigil's: receive/transmit queue pairs (`VIRTIO_NET_F_MQ` above 1, on a
    /// multi-queue tap); absent: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_pairs: Option<u16>,
}

/// `PUT /vsock`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u64,
    pub uds_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /balloon`, and what `GET /balloon` answers.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    pub amount_mib: u64,
    pub deflate_on_oom: bool,
    #[serde(default)]
    pub stats_polling_interval_s: u64,
    #[serde(default)]
    pub free_page_hinting: bool,
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `PUT /entropy`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /serial`: where the serial console's output goes.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SerialDevice {
    /// A file (created, or truncated) or a named pipe; without it, the VMM's
    /// standard output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    /// Refused: Vigil does not limit the console's output rate yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

impl SerialDevice {
    /// Where the console goes: `None` keeps the VMM's own choice (`--console`).
    pub fn console(&self) -> Result<Option<PathBuf>, BodyError> {
        if self.rate_limiter.is_some() {
            return Err(BodyError::SerialRateLimiter);
        }
        match self.serial_out_path.as_deref() {
            Some("") => Err(BodyError::SerialPathEmpty),
            Some(p) => Ok(Some(PathBuf::from(p))),
            None => Ok(None),
        }
    }
}

/// `PUT /cpu-config`: a custom CPU template, as Firecracker's
/// `cpu-template-helper` writes them. The aarch64 keys are refused when not
/// empty: Vigil runs x86_64 guests.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvm_capabilities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub msr_modifiers: Vec<MsrModifierBody>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reg_modifiers: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_features: Vec<serde_json::Value>,
}

/// One CPUID leaf and subleaf of a [`CpuConfig`].
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    pub leaf: String,
    pub subleaf: String,
    pub flags: u32,
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// One register of a [`CpuidLeafModifier`]: `bitmap` is `0b` and 32 of `0`,
/// `1` (force the bit) or `x` (leave it), most significant first.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    pub register: String,
    pub bitmap: String,
}

/// One MSR of a [`CpuConfig`]: `bitmap` is `0b` and 64 of `0`, `1` or `x`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MsrModifierBody {
    pub addr: String,
    pub bitmap: String,
}

/// A number as a custom template writes it: `0x` hex, `0b` binary or decimal.
fn template_number(field: &str, text: &str) -> Result<u32, BodyError> {
    let parsed = if let Some(hex) = text.strip_prefix("0x") {
        u32::from_str_radix(hex, 16)
    } else if let Some(bin) = text.strip_prefix("0b") {
        u32::from_str_radix(bin, 2)
    } else {
        text.parse()
    };
    parsed.map_err(|_| BodyError::CpuConfig {
        field: field.into(),
        value: text.into(),
        why: "expected a 32-bit number in hex (0x), binary (0b) or decimal".into(),
    })
}

/// A bitmap of `bits` bits: `0b`, then one of `0`, `1`, `x` per bit, most
/// significant first (underscores ignored).
fn template_bitmap(field: &str, text: &str, bits: u32) -> Result<BitModifier<u64>, BodyError> {
    let bad = |why: String| BodyError::CpuConfig {
        field: field.into(),
        value: text.into(),
        why,
    };
    let digits: Vec<char> = text
        .strip_prefix("0b")
        .ok_or_else(|| bad("expected 0b and then one 0, 1 or x per bit".into()))?
        .chars()
        .filter(|c| *c != '_')
        .collect();
    if digits.len() != bits as usize {
        return Err(bad(format!(
            "{} bits, expected {bits} (0, 1 or x each)",
            digits.len()
        )));
    }
    let mut m = BitModifier::default();
    for (i, c) in digits.iter().enumerate() {
        let bit = 1u64 << (bits as usize - 1 - i);
        match c {
            '1' => m.set |= bit,
            '0' => m.clear |= bit,
            'x' | 'X' => {}
            other => return Err(bad(format!("{other:?} is not 0, 1 or x"))),
        }
    }
    Ok(m)
}

impl CpuConfig {
    /// The template as Vigil applies it.
    pub fn to_config(&self) -> Result<CpuModifiers, BodyError> {
        let aarch64 = |field: &str| BodyError::CpuConfig {
            field: field.into(),
            value: "[...]".into(),
            why: "aarch64 only; Vigil runs x86_64 guests (leave it empty)".into(),
        };
        if !self.reg_modifiers.is_empty() {
            return Err(aarch64("reg_modifiers"));
        }
        if !self.vcpu_features.is_empty() {
            return Err(aarch64("vcpu_features"));
        }
        let mut out = CpuModifiers::default();
        for cap in &self.kvm_capabilities {
            // "!N" drops N from the capabilities a template requires: Vigil checks
            // the ones it needs itself, so only the required ones are kept.
            let (number, required) = match cap.strip_prefix('!') {
                Some(n) => (n, false),
                None => (cap.as_str(), true),
            };
            let n: u32 = number.parse().map_err(|_| BodyError::CpuConfig {
                field: "kvm_capabilities".into(),
                value: cap.clone(),
                why: "expected a KVM capability number, \"!\" before it to remove it".into(),
            })?;
            if required {
                out.required_kvm_caps.push(n);
            }
        }
        for leaf in &self.cpuid_modifiers {
            let number = template_number("cpuid_modifiers.leaf", &leaf.leaf)?;
            let subleaf = template_number("cpuid_modifiers.subleaf", &leaf.subleaf)?;
            for r in &leaf.modifiers {
                let reg = match r.register.as_str() {
                    "eax" => Reg::Eax,
                    "ebx" => Reg::Ebx,
                    "ecx" => Reg::Ecx,
                    "edx" => Reg::Edx,
                    other => {
                        return Err(BodyError::CpuConfig {
                            field: "cpuid_modifiers.modifiers.register".into(),
                            value: other.into(),
                            why: "expected eax, ebx, ecx or edx".into(),
                        })
                    }
                };
                let bits = template_bitmap("cpuid_modifiers.modifiers.bitmap", &r.bitmap, 32)?;
                out.cpuid.push(CpuidModifier {
                    leaf: number,
                    subleaf,
                    flags: leaf.flags,
                    reg,
                    bits: BitModifier {
                        set: bits.set as u32,
                        clear: bits.clear as u32,
                    },
                });
            }
        }
        for msr in &self.msr_modifiers {
            out.msrs.push(MsrModifier {
                addr: template_number("msr_modifiers.addr", &msr.addr)?,
                bits: template_bitmap("msr_modifiers.bitmap", &msr.bitmap, 64)?,
            });
        }
        Ok(out)
    }
}

/// `PUT /logger`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(default)]
    pub show_level: bool,
    #[serde(default)]
    pub show_log_origin: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: String,
    #[serde(default)]
    pub emit_id: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

/// A Firecracker configuration file (`--config-file`), and `GET /vm/config`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfig {
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfig>,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Entropy>,
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<CpuConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// Vigil's own: how the host schedules the vCPU threads (`--vcpu-sched`).
    #[serde(
        rename = "vcpu-scheduling",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub vcpu_scheduling: Vec<config::rt::VcpuSchedBody>,
    /// Vigil's own: the RT timer device (`--rt-timer`).
    #[serde(rename = "rt-timer", default, skip_serializing_if = "Option::is_none")]
    pub rt_timer: Option<config::RtTimerConfig>,
    /// Vigil's own: cold guest memory compressed inside the VMM
    /// (`--memory-compression`): `{"idle_ms": 30000, "algo": "lz4"}`.
    #[serde(
        rename = "memory-compression",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_compression: Option<config::MemoryCompression>,
    /// MMDS: its version, address and the interfaces that reach it.
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<MmdsConfig>,
}

/// A body Vigil cannot take: what Firecracker allows and Vigil does not offer,
/// or a value that fails Vigil's checks of its resource.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("smt true: Vigil does not offer simultaneous multithreading (use false)")]
    Smt,
    #[error("cpu_template {0:?}: Vigil has no Firecracker CPU templates (use \"None\"; Vigil's own template hides what its host cannot run)")]
    CpuTemplate(String),
    #[error("huge_pages {0:?}: Vigil does not back guest memory with hugetlbfs pages (\"Transparent\" gives 2 MiB pages where the host allows; or \"None\")")]
    HugePages(String),
    #[error("{field} {value:?}: {why}")]
    CpuConfig {
        field: String,
        value: String,
        why: String,
    },
    #[error("mem_size_mib {0}: too large")]
    MemoryTooLarge(u64),
    #[error("socket: Vigil has no vhost-user-block; give path_on_host")]
    DriveSocket,
    #[error("path_on_host: required")]
    DrivePathMissing,
    #[error("cache_type {0:?}: expected \"Unsafe\" or \"Writeback\"")]
    CacheType(String),
    #[error("io_engine {0:?}: expected \"Sync\" or \"Async\"")]
    IoEngine(String),
    #[error("partuuid {0:?}: only a root device (is_root_device true) has one")]
    PartuuidNotRoot(String),
    #[error("mtu {0}: Vigil's virtio-net does not advertise an MTU (leave it out)")]
    Mtu(u32),
    #[error("guest_mac {0}")]
    Mac(BadMac),
    #[error("is_root_device true: drive {0:?} already is the root device")]
    SecondRoot(String),
    #[error("rate_limiter: Vigil does not limit the serial console's output (leave it out)")]
    SerialRateLimiter,
    #[error("serial_out_path \"\": empty (leave it out for the VMM's standard output)")]
    SerialPathEmpty,
    #[error(
        "{field}: size {size} per refill_time {refill_time} ms is less than one token a second"
    )]
    SlowBucket {
        field: String,
        size: u64,
        refill_time: u64,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Mmds(#[from] MmdsConfigError),
}

impl BodyError {
    /// The field at fault, as the body spells it.
    pub fn field(&self) -> &str {
        match self {
            Self::Smt => "smt",
            Self::CpuTemplate(_) => "cpu_template",
            Self::HugePages(_) => "huge_pages",
            Self::CpuConfig { field, .. } => field,
            Self::MemoryTooLarge(_) => "mem_size_mib",
            Self::DriveSocket => "socket",
            Self::DrivePathMissing => "path_on_host",
            Self::CacheType(_) => "cache_type",
            Self::IoEngine(_) => "io_engine",
            Self::PartuuidNotRoot(_) => "partuuid",
            Self::Mtu(_) => "mtu",
            Self::Mac(_) => "guest_mac",
            Self::SecondRoot(_) => "is_root_device",
            Self::SerialRateLimiter => "rate_limiter",
            Self::SerialPathEmpty => "serial_out_path",
            Self::SlowBucket { field, .. } => field,
            Self::Config(e) => e.field(),
            Self::Mmds(e) => match e {
                MmdsConfigError::NotLinkLocal(_) => "ipv4_address",
                _ => "network_interfaces",
            },
        }
    }
}

/// A configuration document Vigil cannot boot: the key of the resource at fault
/// (`machine-config`, `drives["rootfs"]`), and why.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("{key}: {error}")]
    Body { key: String, error: BodyError },
    #[error("boot-source: missing (a VM needs a kernel_image_path)")]
    NoBootSource,
}

/// One Firecracker token bucket as Vigil's `(rate per second, burst, one-time
/// burst)`: `size` tokens refilled in `refill_time` ms, and `one_time_burst`
/// spent first. A bucket with a zero size or refill time limits nothing, as in
/// Firecracker.
fn bucket(field: &str, b: &TokenBucket) -> Result<Option<(u64, u64, u64)>, BodyError> {
    if b.size == 0 || b.refill_time == 0 {
        return Ok(None);
    }
    let rate = u128::from(b.size) * 1000 / u128::from(b.refill_time);
    if rate == 0 {
        return Err(BodyError::SlowBucket {
            field: field.to_owned(),
            size: b.size,
            refill_time: b.refill_time,
        });
    }
    let rate = u64::try_from(rate).unwrap_or(u64::MAX);
    Ok(Some((rate, b.size, b.one_time_burst.unwrap_or(0))))
}

/// A Firecracker rate limiter as a Vigil [`RateLimit`]; `field` names it in errors.
pub fn rate_limit(field: &str, r: Option<&RateLimiter>) -> Result<RateLimit, BodyError> {
    let Some(r) = r else {
        return Ok(RateLimit::default());
    };
    let one = |name: &str, b: Option<&TokenBucket>| {
        b.map(|b| bucket(&format!("{field}.{name}"), b))
            .transpose()
            .map(Option::flatten)
    };
    let bandwidth = one("bandwidth", r.bandwidth.as_ref())?;
    let ops = one("ops", r.ops.as_ref())?;
    Ok(RateLimit {
        bandwidth: bandwidth.map(|(rate, burst, _)| (rate, Some(burst))),
        ops: ops.map(|(rate, burst, _)| (rate, Some(burst))),
        one_time_burst: (
            bandwidth.map_or(0, |(.., once)| once),
            ops.map_or(0, |(.., once)| once),
        ),
    })
}

/// A Firecracker rate limiter in a `PATCH` body as a change to a running
/// limiter, as Firecracker applies it: a bucket left out stays as it is, one with
/// a zero `size` or `refill_time` is removed, any other replaces it (full).
/// `field` names it in errors.
pub fn limit_update(field: &str, r: Option<&RateLimiter>) -> Result<LimitUpdate, BodyError> {
    let Some(r) = r else {
        return Ok(LimitUpdate::default());
    };
    let one = |name: &str, b: Option<&TokenBucket>| -> Result<BucketUpdate, BodyError> {
        let Some(b) = b else {
            return Ok(BucketUpdate::Keep);
        };
        Ok(match bucket(&format!("{field}.{name}"), b)? {
            None => BucketUpdate::Remove,
            Some((rate, burst, one_time_burst)) => BucketUpdate::Set {
                rate,
                burst,
                one_time_burst,
            },
        })
    };
    Ok(LimitUpdate {
        bandwidth: one("bandwidth", r.bandwidth.as_ref())?,
        ops: one("ops", r.ops.as_ref())?,
    })
}

/// `stored` as a `PATCH` with `update` leaves it (for `GET /vm/config`): a bucket
/// given replaces the stored one, a zero one removes it.
pub fn merge_rate_limiter(
    stored: Option<RateLimiter>,
    update: Option<&RateLimiter>,
) -> Option<RateLimiter> {
    let Some(update) = update else {
        return stored;
    };
    let mut merged = stored.unwrap_or_default();
    let limits = |b: &TokenBucket| b.size != 0 && b.refill_time != 0;
    if let Some(b) = update.bandwidth {
        merged.bandwidth = limits(&b).then_some(b);
    }
    if let Some(b) = update.ops {
        merged.ops = limits(&b).then_some(b);
    }
    Some(merged)
}

impl BootSource {
    /// The boot source as Vigil boots it (its files are checked by
    /// [`BootConfig::validate`]).
    pub fn to_config(&self) -> BootConfig {
        let mut boot = BootConfig::new(KernelImage::File(PathBuf::from(&self.kernel_image_path)));
        boot.initrd = self.initrd_path.as_deref().map(PathBuf::from);
        boot.cmdline = self
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.into());
        boot
    }
}

impl MachineConfig {
    /// The machine as Vigil builds it: what Firecracker offers and Vigil does
    /// not is refused.
    pub fn to_config(&self) -> Result<config::MachineConfig, BodyError> {
        if self.smt {
            return Err(BodyError::Smt);
        }
        match self.cpu_template.as_deref() {
            None | Some("None") => {}
            Some(t) => return Err(BodyError::CpuTemplate(t.to_owned())),
        }
        let huge_pages = match self.huge_pages.as_str() {
            "None" => config::HugePages::None,
            "Transparent" => config::HugePages::Transparent,
            other => return Err(BodyError::HugePages(other.to_owned())),
        };
        if self.mem_size_mib > (u64::MAX >> 20) {
            return Err(BodyError::MemoryTooLarge(self.mem_size_mib));
        }
        Ok(config::MachineConfig {
            vcpu_count: self.vcpu_count,
            mem_size_mib: self.mem_size_mib,
            huge_pages,
            ..Default::default()
        })
    }
}

impl Drive {
    /// The disk as Vigil attaches it.
    pub fn to_config(&self) -> Result<DriveConfig, BodyError> {
        if self.socket.is_some() {
            return Err(BodyError::DriveSocket);
        }
        let path = self
            .path_on_host
            .as_deref()
            .ok_or(BodyError::DrivePathMissing)?;
        match self.cache_type.as_deref() {
            None | Some("Unsafe") | Some("Writeback") => {}
            Some(v) => return Err(BodyError::CacheType(v.to_owned())),
        }
        let io_engine = match self.io_engine.as_deref() {
            None | Some("Sync") => IoEngine::Sync,
            Some("Async") => IoEngine::Async,
            Some(v) => return Err(BodyError::IoEngine(v.to_owned())),
        };
        if let Some(uuid) = self.partuuid.as_ref().filter(|_| !self.is_root_device) {
            return Err(BodyError::PartuuidNotRoot(uuid.clone()));
        }
        let drive = DriveConfig {
            id: self.drive_id.clone(),
            path: PathBuf::from(path),
            read_only: self.is_read_only.unwrap_or(false),
            rate_limit: rate_limit("rate_limiter", self.rate_limiter.as_ref())?,
            io_engine,
            num_queues: self.num_queues.unwrap_or(1),
            ..Default::default()
        };
        drive.validate().map_err(ConfigError::from)?;
        Ok(drive)
    }
}

impl NetworkInterface {
    /// The interface as Vigil attaches it, the `index`th of the VM (its default MAC).
    pub fn to_config(&self, index: usize) -> Result<NetConfig, BodyError> {
        if let Some(mtu) = self.mtu {
            return Err(BodyError::Mtu(mtu));
        }
        let net = NetConfig {
            id: Some(self.iface_id.clone()),
            tap: self.host_dev_name.clone(),
            mac: match &self.guest_mac {
                Some(m) => m.parse().map_err(BodyError::Mac)?,
                None => MacAddr::for_interface(index),
            },
            rx_rate_limit: rate_limit("rx_rate_limiter", self.rx_rate_limiter.as_ref())?,
            tx_rate_limit: rate_limit("tx_rate_limiter", self.tx_rate_limiter.as_ref())?,
            mmds: None,
            queue_pairs: self.queue_pairs.unwrap_or(1),
        };
        net.validate().map_err(ConfigError::from)?;
        Ok(net)
    }
}

impl Vsock {
    /// The vsock device as Vigil attaches it.
    pub fn to_config(&self) -> Result<VsockConfig, BodyError> {
        let vsock = VsockConfig {
            cid: self.guest_cid,
            uds: PathBuf::from(&self.uds_path),
        };
        vsock.validate().map_err(ConfigError::from)?;
        Ok(vsock)
    }
}

impl Balloon {
    /// The balloon as Vigil attaches it (its size is checked against the
    /// machine by [`VmConfig::validate`]).
    pub fn to_config(&self) -> Result<BalloonConfig, BodyError> {
        Ok(BalloonConfig {
            target_mib: self.amount_mib,
            stats_interval: (self.stats_polling_interval_s > 0)
                .then(|| Duration::from_secs(self.stats_polling_interval_s)),
            free_page_reporting: self.free_page_reporting,
            free_page_hinting: self.free_page_hinting,
            deflate_on_oom: self.deflate_on_oom,
        })
    }
}

impl Entropy {
    /// The entropy device's rate limit.
    pub fn to_config(&self) -> Result<RateLimit, BodyError> {
        rate_limit("rate_limiter", self.rate_limiter.as_ref())
    }
}

impl FullVmConfig {
    /// The VM the document describes, validated against `limits`; the error
    /// names the key and the field at fault. The root device becomes the guest's
    /// first disk (`/dev/vda`) and is named on the command line, as in Firecracker.
    pub fn to_vm_config(&self, limits: &config::HostLimits) -> Result<VmConfig, DocumentError> {
        let body = |key: String| move |error: BodyError| DocumentError::Body { key, error };
        let boot = self
            .boot_source
            .as_ref()
            .ok_or(DocumentError::NoBootSource)?;
        let mut config = VmConfig::new(KernelImage::File(PathBuf::new()));
        config.boot = boot.to_config();
        if let Some(m) = &self.machine_config {
            config.machine = m.to_config().map_err(body("machine-config".into()))?;
        }
        if let Some(c) = &self.cpu_config {
            config.machine.cpu_modifiers = c.to_config().map_err(body("cpu-config".into()))?;
        }
        let roots: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        if let [first, second, ..] = roots.as_slice() {
            return Err(DocumentError::Body {
                key: format!("drives[{:?}]", second.drive_id),
                error: BodyError::SecondRoot(first.drive_id.clone()),
            });
        }
        let drives = roots
            .iter()
            .copied()
            .chain(self.drives.iter().filter(|d| !d.is_root_device));
        for d in drives {
            if d.is_root_device {
                let root = match &d.partuuid {
                    Some(uuid) => format!("root=PARTUUID={uuid}"),
                    None => "root=/dev/vda".into(),
                };
                let mode = if d.is_read_only.unwrap_or(false) {
                    "ro"
                } else {
                    "rw"
                };
                config.boot.cmdline = format!("{} {root} {mode}", config.boot.cmdline);
            }
            config.drives.push(
                d.to_config()
                    .map_err(body(format!("drives[{:?}]", d.drive_id)))?,
            );
        }
        config.boot.cmdline = config.boot.cmdline.trim().to_string();
        for (i, n) in self.network_interfaces.iter().enumerate() {
            let key = format!("network-interfaces[{:?}]", n.iface_id);
            config.nets.push(n.to_config(i).map_err(body(key))?);
        }
        config.vsock = self
            .vsock
            .as_ref()
            .map(|v| v.to_config().map_err(body("vsock".into())))
            .transpose()?;
        config.balloon = self
            .balloon
            .as_ref()
            .map(|b| b.to_config().map_err(body("balloon".into())))
            .transpose()?;
        config.rng = self
            .entropy
            .as_ref()
            .map(|e| e.to_config().map_err(body("entropy".into())))
            .transpose()?;
        for (i, b) in self.vcpu_scheduling.iter().enumerate() {
            let entry =
                config::VcpuSched::try_from(b.clone()).map_err(|e| DocumentError::Body {
                    key: format!("vcpu-scheduling[{i}]"),
                    error: BodyError::Config(e.into()),
                })?;
            config.vcpu_sched.push(entry);
        }
        config.rt_timer = self.rt_timer;
        config.memory_compression = self.memory_compression.map(|c| c.normalized());
        if let Some(m) = &self.mmds_config {
            m.validate(self.network_interfaces.iter().map(|n| n.iface_id.as_str()))
                .map_err(|e| body("mmds-config".into())(e.into()))?;
            // A store of its own until the process shares the one its API
            // fills (VmConfig::share_mmds).
            let mmds = Mmds::new(0);
            mmds.set_config(m.clone());
            for (n, net) in self.network_interfaces.iter().zip(&mut config.nets) {
                if m.network_interfaces.contains(&n.iface_id) {
                    net.mmds = Some(mmds.clone());
                }
            }
        }
        config.validate(limits).map_err(|e| DocumentError::Body {
            key: e.resource().into(),
            error: BodyError::Config(e),
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostLimits;

    const LIMITS: HostLimits = HostLimits {
        kvm_max_vcpus: 1024,
        host_memory_bytes: 8 << 30,
    };

    #[test]
    fn token_buckets_become_rates_per_second() {
        let r = RateLimiter {
            bandwidth: Some(TokenBucket {
                size: 1000,
                one_time_burst: Some(500),
                refill_time: 100,
            }),
            ops: Some(TokenBucket {
                size: 0,
                one_time_burst: None,
                refill_time: 100,
            }),
        };
        let l = rate_limit("rate_limiter", Some(&r)).unwrap();
        assert_eq!(l.bandwidth, Some((10_000, Some(1000))));
        assert_eq!(l.one_time_burst, (500, 0));
        assert_eq!(l.ops, None);
        let u = limit_update("rate_limiter", Some(&r)).unwrap();
        assert_eq!(
            u.bandwidth,
            BucketUpdate::Set {
                rate: 10_000,
                burst: 1000,
                one_time_burst: 500
            }
        );
        assert_eq!(u.ops, BucketUpdate::Remove);
        let keep = limit_update("rate_limiter", Some(&RateLimiter::default())).unwrap();
        assert!(keep.is_keep());
        assert!(limit_update("rate_limiter", None).unwrap().is_keep());
        let slow = RateLimiter {
            ops: Some(TokenBucket {
                size: 1,
                one_time_burst: None,
                refill_time: 5000,
            }),
            ..Default::default()
        };
        let e = rate_limit("rate_limiter", Some(&slow)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("rate_limiter.ops: size 1 per refill_time 5000 ms"),
            "{e}"
        );
        assert_eq!(e.field(), "rate_limiter.ops");
        let e = limit_update("rx_rate_limiter", Some(&slow)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("rx_rate_limiter.ops: size 1 per refill_time 5000 ms"),
            "{e}"
        );
    }

    /// A scratch disk image this test may open for writing.
    fn image(name: &str) -> String {
        let path = std::env::temp_dir().join(format!("vigil-model-{}-{name}", std::process::id()));
        std::fs::write(&path, [0u8; 512]).unwrap();
        path.display().to_string()
    }

    fn document(kernel: &str) -> FullVmConfig {
        let data = image("data");
        parse(
            serde_json::json!({
                "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
                "drives": [
                    {"drive_id": "data", "path_on_host": data, "is_root_device": false},
                    {"drive_id": "rootfs", "path_on_host": kernel, "is_root_device": true,
                     "is_read_only": true},
                ],
                "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "vg0"}],
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn a_document_becomes_a_validated_vm_config() {
        let exe = std::env::current_exe().unwrap().display().to_string();
        let c = document(&exe).to_vm_config(&LIMITS).unwrap();
        assert_eq!(c.machine.vcpu_count, 2);
        assert_eq!(c.boot.cmdline, "console=ttyS0 root=/dev/vda ro");
        assert_eq!(c.drives[0].id, "rootfs");
        assert!(c.drives[0].read_only);
        assert_eq!(c.drives[1].id, "data");
        assert_eq!(c.drives[1].num_queues, 1);
        assert_eq!(c.nets[0].mac, MacAddr::for_interface(0));
        let mut d = document(&exe);
        d.drives[0].num_queues = Some(4);
        assert_eq!(d.to_vm_config(&LIMITS).unwrap().drives[1].num_queues, 4);
        assert_eq!(c.nets[0].queue_pairs, 1);
        d.network_interfaces[0].queue_pairs = Some(2);
        assert_eq!(d.to_vm_config(&LIMITS).unwrap().nets[0].queue_pairs, 2);
    }

    #[test]
    fn mmds_config_reaches_the_interfaces_it_names_and_the_shared_store() {
        let exe = std::env::current_exe().unwrap().display().to_string();
        let mut d = document(&exe);
        d.network_interfaces
            .push(parse(br#"{"iface_id": "eth1", "host_dev_name": "vg1"}"#).unwrap());
        d.mmds_config =
            Some(parse(br#"{"version": "V2", "network_interfaces": ["eth1"]}"#).unwrap());
        let mut c = d.to_vm_config(&LIMITS).unwrap();
        assert!(c.nets[0].mmds.is_none());
        let store = Mmds::new(100);
        c.share_mmds(&store);
        assert_eq!(c.nets[1].mmds.as_ref(), Some(&store));
        assert_eq!(store.config(), d.mmds_config);

        d.mmds_config = Some(parse(br#"{"network_interfaces": ["eth9"]}"#).unwrap());
        let e = d.to_vm_config(&LIMITS).unwrap_err().to_string();
        assert!(
            e.starts_with("mmds-config: network_interfaces \"eth9\""),
            "{e}"
        );
    }

    #[test]
    fn vigil_keys_schedule_vcpus_and_add_the_rt_timer() {
        let exe = std::env::current_exe().unwrap().display().to_string();
        let mut d = document(&exe);
        d.vcpu_scheduling = parse(
            br#"[{"policy": "fifo", "priority": 20, "cpus": [1]},
                 {"vcpu": 1, "policy": "deadline", "runtime_ns": 1000000, "period_ns": 4000000}]"#,
        )
        .unwrap();
        d.rt_timer = Some(config::RtTimerConfig::default());
        d.memory_compression =
            parse(br#"{"idle_ms": 2000, "rss_mib": 96, "algo": "zstd"}"#).unwrap();
        assert!(parse::<config::MemoryCompression>(br#"{"idle": 2000}"#).is_err());
        let c = d.to_vm_config(&LIMITS).unwrap();
        assert_eq!(
            c.memory_compression,
            Some(config::MemoryCompression {
                idle_ms: Some(2000),
                rss_mib: Some(96),
                algo: config::CompressionAlgo::Zstd
            })
        );
        // A target out of range is named with its resource.
        let mut bad = document(&exe);
        bad.memory_compression = parse(br#"{"rss_mib": 0}"#).unwrap();
        let e = bad.to_vm_config(&LIMITS).unwrap_err().to_string();
        assert!(e.contains("memory_compression rss_mib=0"), "{e}");
        let plan = config::VcpuSched::resolve(&c.vcpu_sched, 2).unwrap();
        assert_eq!(plan[0].policy, config::SchedPolicy::Fifo { priority: 20 });
        assert_eq!(plan[1].policy.bandwidth(), 0.25);
        assert!(c.rt_timer.is_some());
        // A third vCPU is not in this machine: the key and the entry are named.
        d.vcpu_scheduling = parse(br#"[{"vcpu": 2, "policy": "other"}]"#).unwrap();
        let e = d.to_vm_config(&LIMITS).unwrap_err().to_string();
        assert_eq!(
            e,
            "vcpu-scheduling: vcpu_sched vcpu=2: the VM has 2 vCPU(s), 0 to 1"
        );
        d.vcpu_scheduling = parse(br#"[{"policy": "rr"}]"#).unwrap();
        let e = d.to_vm_config(&LIMITS).unwrap_err().to_string();
        assert_eq!(e, "vcpu-scheduling[0]: vcpu_sched priority: required");
    }

    #[test]
    fn document_errors_name_the_key_and_field() {
        let exe = std::env::current_exe().unwrap().display().to_string();
        let refused = |edit: &dyn Fn(&mut FullVmConfig)| {
            let mut d = document(&exe);
            edit(&mut d);
            d.to_vm_config(&LIMITS).unwrap_err().to_string()
        };
        assert_eq!(
            refused(&|d| d.machine_config.as_mut().unwrap().vcpu_count = 0),
            "machine-config: vcpu_count 0: a VM needs at least one vCPU (1 to 254)"
        );
        assert_eq!(
            refused(&|d| d.machine_config.as_mut().unwrap().smt = true),
            "machine-config: smt true: Vigil does not offer simultaneous multithreading (use false)"
        );
        assert!(refused(
            &|d| d.boot_source.as_mut().unwrap().kernel_image_path = "/nonexistent".into()
        )
        .starts_with("boot-source: kernel_image_path \"/nonexistent\": cannot read it"));
        assert_eq!(
            refused(&|d| d.drives[0].is_root_device = true),
            "drives[\"rootfs\"]: is_root_device true: drive \"data\" already is the root device"
        );
        assert_eq!(
            refused(&|d| d.drives[1].drive_id = "data".into()),
            "drives: drive_id \"data\": used by two disks"
        );
        assert_eq!(
            refused(&|d| d.drives[0].num_queues = Some(0)),
            "drives[\"data\"]: num_queues 0: expected 1 to 16 request queues"
        );
        assert_eq!(
            refused(&|d| d.network_interfaces[0].guest_mac = Some("nope".into())),
            "network-interfaces[\"eth0\"]: guest_mac \"nope\": not a MAC address (aa:bb:cc:dd:ee:ff)"
        );
        assert_eq!(
            refused(&|d| d.network_interfaces[0].queue_pairs = Some(17)),
            "network-interfaces[\"eth0\"]: queue_pairs 17: expected 1 to 16"
        );
        assert_eq!(
            refused(&|d| d.boot_source = None),
            "boot-source: missing (a VM needs a kernel_image_path)"
        );
        let e = parse::<FullVmConfig>(br#"{"machine-config": {"vcpu_count": "two"}}"#).unwrap_err();
        assert!(
            e.0.starts_with("machine-config.vcpu_count: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn a_custom_cpu_template_becomes_bit_modifiers() {
        let body: CpuConfig = serde_json::from_str(
            r#"{
                "kvm_capabilities": ["121", "!56"],
                "cpuid_modifiers": [{
                    "leaf": "0x1", "subleaf": "0b0", "flags": 0,
                    "modifiers": [{"register": "ecx", "bitmap": "0bxxxxxxxxxx0xxxxxxxxxxxxxxxxxxxx1"}]
                }],
                "msr_modifiers": [{"addr": "3221225731",
                    "bitmap": "0b0000000000000000000000000000000000000000000000000000_0000_0010_1010"}]
            }"#,
        )
        .unwrap();
        let m = body.to_config().unwrap();
        assert_eq!(m.required_kvm_caps, [121]);
        assert_eq!(
            m.cpuid,
            [CpuidModifier {
                leaf: 1,
                subleaf: 0,
                flags: 0,
                reg: Reg::Ecx,
                bits: BitModifier {
                    set: 1,
                    clear: 1 << 21
                },
            }]
        );
        assert_eq!(m.msrs[0].addr, 0xc000_0103);
        assert_eq!(m.msrs[0].bits.set, 0x2a);
        assert_eq!(m.msrs[0].bits.clear, !0x2a);
    }

    #[test]
    fn custom_cpu_template_errors_name_the_field_and_value() {
        let refused = |json: &str| {
            serde_json::from_str::<CpuConfig>(json)
                .unwrap()
                .to_config()
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refused(r#"{"msr_modifiers": [{"addr": "0xzz", "bitmap": "0b1"}]}"#),
            "msr_modifiers.addr \"0xzz\": expected a 32-bit number in hex (0x), binary (0b) or decimal"
        );
        assert_eq!(
            refused(r#"{"msr_modifiers": [{"addr": "0x10", "bitmap": "0b101"}]}"#),
            "msr_modifiers.bitmap \"0b101\": 3 bits, expected 64 (0, 1 or x each)"
        );
        let leaf = |register: &str, bitmap: &str| {
            format!(
                r#"{{"cpuid_modifiers": [{{"leaf": "1", "subleaf": "0", "flags": 0,
                    "modifiers": [{{"register": "{register}", "bitmap": "{bitmap}"}}]}}]}}"#
            )
        };
        let x32 = format!("0b{}", "x".repeat(31));
        assert_eq!(
            refused(&leaf("esi", &format!("{x32}x"))),
            "cpuid_modifiers.modifiers.register \"esi\": expected eax, ebx, ecx or edx"
        );
        assert_eq!(
            refused(&leaf("eax", &format!("{x32}2"))),
            format!("cpuid_modifiers.modifiers.bitmap \"{x32}2\": '2' is not 0, 1 or x")
        );
        assert_eq!(
            refused(r#"{"kvm_capabilities": ["!x"]}"#),
            "kvm_capabilities \"!x\": expected a KVM capability number, \"!\" before it to remove it"
        );
        assert!(refused(r#"{"reg_modifiers": [{}]}"#).contains("aarch64 only"));
    }
}
