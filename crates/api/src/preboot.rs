//! The configuration a VM accumulates before it starts: each API body (or each
//! key of a configuration file) is checked and stored here, and
//! [`PreBoot::to_vm_config`] turns the whole into a [`VmConfig`] at InstanceStart.
//! A body that fails its checks leaves what was stored untouched.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vigil_vmm::config::{
    default_mac, BalloonConfig, BlockConfig, KernelImage, NetConfig, RateLimit, VmConfig,
    VsockConfig, MAX_VCPUS, MIN_MEMORY_MIB,
};

use crate::model::{
    Balloon, BootSource, Drive, Entropy, FullVmConfig, MachineConfig, MachineConfigUpdate,
    NetworkInterface, RateLimiter, TokenBucket, Vsock,
};

/// The kernel command line when `boot_args` is not given.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1";
/// Longest drive id: the virtio-blk serial the guest reads is 20 bytes.
pub const MAX_DRIVE_ID: usize = 20;

/// What has been configured so far.
#[derive(Clone, Debug, Default)]
pub struct PreBoot {
    pub boot_source: Option<BootSource>,
    pub machine: MachineConfig,
    pub drives: Vec<Drive>,
    pub nets: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
    pub balloon: Option<Balloon>,
    pub entropy: Option<Entropy>,
}

fn check_file(field: &str, path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err(format!("{field}: empty path"));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(format!("{field} {path:?}: not a regular file")),
        Err(e) => return Err(format!("{field} {path:?}: cannot read it: {e}")),
    }
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| format!("{field} {path:?}: cannot open it: {e}"))
}

/// One Firecracker token bucket as Vigil's `(rate per second, burst)`; a bucket
/// with a zero size or refill time limits nothing, as in Firecracker.
fn bucket(field: &str, b: &TokenBucket) -> Result<Option<(u64, Option<u64>)>, String> {
    if b.size == 0 || b.refill_time == 0 {
        return Ok(None);
    }
    let rate = u128::from(b.size) * 1000 / u128::from(b.refill_time);
    if rate == 0 {
        return Err(format!(
            "{field}: size {} per refill_time {} ms is less than one token a second",
            b.size, b.refill_time
        ));
    }
    let rate = u64::try_from(rate).unwrap_or(u64::MAX);
    let burst = b.size.saturating_add(b.one_time_burst.unwrap_or(0));
    Ok(Some((rate, Some(burst))))
}

/// A Firecracker rate limiter as a Vigil [`RateLimit`]; `field` names it in errors.
pub fn rate_limit(field: &str, r: Option<&RateLimiter>) -> Result<RateLimit, String> {
    let Some(r) = r else {
        return Ok(RateLimit::default());
    };
    Ok(RateLimit {
        bandwidth: r
            .bandwidth
            .as_ref()
            .map(|b| bucket(&format!("{field}.bandwidth"), b))
            .transpose()?
            .flatten(),
        ops: r
            .ops
            .as_ref()
            .map(|b| bucket(&format!("{field}.ops"), b))
            .transpose()?
            .flatten(),
    })
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("guest_mac {s:?}: not a MAC address (aa:bb:cc:dd:ee:ff)");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

fn check_machine(m: &MachineConfig) -> Result<(), String> {
    if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
        return Err(format!(
            "vcpu_count {}: must be 1 to {MAX_VCPUS}",
            m.vcpu_count
        ));
    }
    if m.mem_size_mib < MIN_MEMORY_MIB {
        return Err(format!(
            "mem_size_mib {}: a VM needs at least {MIN_MEMORY_MIB} MiB",
            m.mem_size_mib
        ));
    }
    if m.mem_size_mib > (u64::MAX >> 20) {
        return Err(format!("mem_size_mib {}: too large", m.mem_size_mib));
    }
    if m.smt {
        return Err("smt true: Vigil does not offer simultaneous multithreading (use false)".into());
    }
    match m.cpu_template.as_deref() {
        None | Some("None") => {}
        Some(t) => {
            return Err(format!(
                "cpu_template {t:?}: Vigil has no Firecracker CPU templates (use \"None\"; Vigil's own template hides what its host cannot run)"
            ))
        }
    }
    if m.track_dirty_pages {
        return Err("track_dirty_pages true: Vigil does not track dirty pages yet (use false)".into());
    }
    if m.huge_pages != "None" {
        return Err(format!(
            "huge_pages {:?}: Vigil backs guest memory with 4 KiB pages only (use \"None\")",
            m.huge_pages
        ));
    }
    Ok(())
}

fn drive_to_block(d: &Drive) -> Result<BlockConfig, String> {
    if d.socket.is_some() {
        return Err(format!(
            "drive {:?}: socket: Vigil has no vhost-user-block; give path_on_host",
            d.drive_id
        ));
    }
    let path = d
        .path_on_host
        .as_deref()
        .ok_or_else(|| format!("drive {:?}: path_on_host is required", d.drive_id))?;
    Ok(BlockConfig {
        path: PathBuf::from(path),
        read_only: d.is_read_only.unwrap_or(false),
        id: d.drive_id.clone(),
        rate_limit: rate_limit("rate_limiter", d.rate_limiter.as_ref())?,
        read_limit: RateLimit::default(),
        write_limit: RateLimit::default(),
    })
}

fn check_drive(d: &Drive) -> Result<(), String> {
    if d.drive_id.is_empty() || d.drive_id.len() > MAX_DRIVE_ID {
        return Err(format!(
            "drive_id {:?}: must be 1 to {MAX_DRIVE_ID} bytes (it is the serial the guest reads)",
            d.drive_id
        ));
    }
    drive_to_block(d)?;
    if let Some(path) = &d.path_on_host {
        if path.is_empty() {
            return Err("path_on_host: empty path".into());
        }
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("path_on_host {path:?}: cannot read it: {e}"))?;
        if meta.is_dir() {
            return Err(format!("path_on_host {path:?}: a directory, not a disk image"));
        }
    }
    match d.cache_type.as_deref() {
        None | Some("Unsafe") | Some("Writeback") => {}
        Some(v) => return Err(format!("cache_type {v:?}: expected \"Unsafe\" or \"Writeback\"")),
    }
    match d.io_engine.as_deref() {
        None | Some("Sync") => {}
        Some("Async") => tracing::warn!(
            drive = d.drive_id,
            "io_engine \"Async\": Vigil serves virtio-blk synchronously on its device thread"
        ),
        Some(v) => return Err(format!("io_engine {v:?}: expected \"Sync\" or \"Async\"")),
    }
    if d.partuuid.is_some() && !d.is_root_device {
        return Err(format!(
            "partuuid {:?}: only a root device (is_root_device true) has one",
            d.partuuid.as_deref().unwrap_or_default()
        ));
    }
    Ok(())
}

fn net_to_config(n: &NetworkInterface, index: usize) -> Result<NetConfig, String> {
    Ok(NetConfig {
        tap: n.host_dev_name.clone(),
        mac: match &n.guest_mac {
            Some(m) => parse_mac(m)?,
            None => default_mac(index),
        },
        rx_rate_limit: rate_limit("rx_rate_limiter", n.rx_rate_limiter.as_ref())?,
        tx_rate_limit: rate_limit("tx_rate_limiter", n.tx_rate_limiter.as_ref())?,
    })
}

impl PreBoot {
    /// `PUT /boot-source`.
    pub fn set_boot_source(&mut self, b: BootSource) -> Result<(), String> {
        check_file("kernel_image_path", &b.kernel_image_path)?;
        if let Some(initrd) = &b.initrd_path {
            check_file("initrd_path", initrd)?;
        }
        if let Some(args) = &b.boot_args {
            if args.contains('\0') {
                return Err("boot_args: contains a NUL byte".into());
            }
        }
        self.boot_source = Some(b);
        Ok(())
    }

    /// `PUT /machine-config`.
    pub fn set_machine(&mut self, m: MachineConfig) -> Result<(), String> {
        check_machine(&m)?;
        self.check_balloon_fits(self.balloon.as_ref(), m.mem_size_mib)?;
        self.machine = m;
        Ok(())
    }

    /// `PATCH /machine-config`.
    pub fn patch_machine(&mut self, u: MachineConfigUpdate) -> Result<(), String> {
        let mut m = self.machine.clone();
        m.vcpu_count = u.vcpu_count.unwrap_or(m.vcpu_count);
        m.mem_size_mib = u.mem_size_mib.unwrap_or(m.mem_size_mib);
        m.smt = u.smt.unwrap_or(m.smt);
        if u.cpu_template.is_some() {
            m.cpu_template = u.cpu_template;
        }
        m.track_dirty_pages = u.track_dirty_pages.unwrap_or(m.track_dirty_pages);
        m.huge_pages = u.huge_pages.unwrap_or(m.huge_pages);
        self.set_machine(m)
    }

    /// `PUT /drives/{id}`: adds a drive or replaces the one with that id.
    pub fn put_drive(&mut self, path_id: &str, d: Drive) -> Result<(), String> {
        if d.drive_id != path_id {
            return Err(format!(
                "drive_id {:?}: differs from the id in the path, {path_id:?}",
                d.drive_id
            ));
        }
        check_drive(&d)?;
        if d.is_root_device {
            if let Some(other) = self
                .drives
                .iter()
                .find(|o| o.is_root_device && o.drive_id != d.drive_id)
            {
                return Err(format!(
                    "is_root_device true: drive {:?} already is the root device",
                    other.drive_id
                ));
            }
        }
        self.check_device_count(usize::from(!self.drives.iter().any(|o| o.drive_id == d.drive_id)))?;
        match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(old) => *old = d,
            None => self.drives.push(d),
        }
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`: adds an interface or replaces the one with
    /// that id.
    pub fn put_net(&mut self, path_id: &str, n: NetworkInterface) -> Result<(), String> {
        if n.iface_id != path_id {
            return Err(format!(
                "iface_id {:?}: differs from the id in the path, {path_id:?}",
                n.iface_id
            ));
        }
        if let Some(mtu) = n.mtu {
            return Err(format!(
                "mtu {mtu}: Vigil's virtio-net does not advertise an MTU (leave it out)"
            ));
        }
        let index = self
            .nets
            .iter()
            .position(|o| o.iface_id == n.iface_id)
            .unwrap_or(self.nets.len());
        let config = net_to_config(&n, index)?;
        if n.host_dev_name.is_empty() || n.host_dev_name.len() > 15 {
            return Err(format!(
                "host_dev_name {:?}: must be 1 to 15 bytes (a Linux interface name)",
                n.host_dev_name
            ));
        }
        for (i, other) in self.nets.iter().enumerate() {
            if other.iface_id == n.iface_id {
                continue;
            }
            if other.host_dev_name == n.host_dev_name {
                return Err(format!(
                    "host_dev_name {:?}: already used by interface {:?}",
                    n.host_dev_name, other.iface_id
                ));
            }
            if net_to_config(other, i).is_ok_and(|o| o.mac == config.mac) {
                return Err(format!(
                    "guest_mac {:?}: already used by interface {:?}",
                    n.guest_mac.as_deref().unwrap_or_default(),
                    other.iface_id
                ));
            }
        }
        if config.mac[0] & 1 != 0 || config.mac == [0; 6] {
            return Err(format!(
                "guest_mac {:?}: a multicast or all-zero address",
                n.guest_mac.as_deref().unwrap_or_default()
            ));
        }
        self.check_device_count(usize::from(index == self.nets.len()))?;
        match self.nets.get_mut(index) {
            Some(old) => *old = n,
            None => self.nets.push(n),
        }
        Ok(())
    }

    /// `PUT /vsock`.
    pub fn set_vsock(&mut self, v: Vsock) -> Result<(), String> {
        if v.guest_cid < 3 || v.guest_cid >= u64::from(u32::MAX) {
            return Err(format!(
                "guest_cid {}: must be 3 to {} (0 to 2 are reserved)",
                v.guest_cid,
                u32::MAX - 1
            ));
        }
        if v.uds_path.is_empty() || v.uds_path.len() + 11 > 107 {
            return Err(format!(
                "uds_path {:?}: must be 1 to 96 bytes (a Unix socket path, with room for _<port>)",
                v.uds_path
            ));
        }
        self.check_device_count(usize::from(self.vsock.is_none()))?;
        self.vsock = Some(v);
        Ok(())
    }

    fn check_balloon_fits(&self, b: Option<&Balloon>, memory_mib: u64) -> Result<(), String> {
        match b {
            Some(b) if b.amount_mib > memory_mib => Err(format!(
                "amount_mib {}: more than the guest's {memory_mib} MiB (mem_size_mib)",
                b.amount_mib
            )),
            _ => Ok(()),
        }
    }

    /// `PUT /balloon`.
    pub fn set_balloon(&mut self, b: Balloon) -> Result<(), String> {
        if b.free_page_hinting {
            return Err("free_page_hinting true: Vigil offers free page reporting, not hinting (use free_page_reporting)".into());
        }
        self.check_balloon_fits(Some(&b), self.machine.mem_size_mib)?;
        self.check_device_count(usize::from(self.balloon.is_none()))?;
        self.balloon = Some(b);
        Ok(())
    }

    /// `PATCH /balloon` before boot.
    pub fn patch_balloon_amount(&mut self, amount_mib: u64) -> Result<(), String> {
        let mut b = self
            .balloon
            .clone()
            .ok_or("no balloon device: PUT /balloon first")?;
        b.amount_mib = amount_mib;
        self.set_balloon(b)
    }

    /// `PATCH /balloon/statistics` before boot.
    pub fn patch_balloon_stats(&mut self, seconds: u64) -> Result<(), String> {
        let mut b = self
            .balloon
            .clone()
            .ok_or("no balloon device: PUT /balloon first")?;
        if (b.stats_polling_interval_s == 0) != (seconds == 0) {
            return Err(format!(
                "stats_polling_interval_s {seconds}: statistics were turned {} by PUT /balloon; PATCH changes the interval, not whether",
                if b.stats_polling_interval_s == 0 { "off" } else { "on" }
            ));
        }
        b.stats_polling_interval_s = seconds;
        self.set_balloon(b)
    }

    /// `PUT /entropy`.
    pub fn set_entropy(&mut self, e: Entropy) -> Result<(), String> {
        rate_limit("rate_limiter", e.rate_limiter.as_ref())?;
        self.check_device_count(usize::from(self.entropy.is_none()))?;
        self.entropy = Some(e);
        Ok(())
    }

    fn check_device_count(&self, adding: usize) -> Result<(), String> {
        let count = self.drives.len()
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.balloon.is_some())
            + usize::from(self.entropy.is_some())
            + adding;
        if count > vigil_vmm::config::MAX_VIRTIO_DEVICES {
            return Err(format!(
                "{count} devices: Vigil has interrupt lines for at most {}",
                vigil_vmm::config::MAX_VIRTIO_DEVICES
            ));
        }
        Ok(())
    }

    /// Applies every device and machine key of a configuration file, in
    /// Firecracker's order; the error names the key and the field.
    pub fn apply_file(&mut self, file: &FullVmConfig) -> Result<(), String> {
        if let Some(m) = &file.machine_config {
            self.set_machine(m.clone())
                .map_err(|e| format!("machine-config: {e}"))?;
        }
        if let Some(b) = &file.boot_source {
            self.set_boot_source(b.clone())
                .map_err(|e| format!("boot-source: {e}"))?;
        }
        for d in &file.drives {
            self.put_drive(&d.drive_id, d.clone())
                .map_err(|e| format!("drives[{:?}]: {e}", d.drive_id))?;
        }
        for n in &file.network_interfaces {
            self.put_net(&n.iface_id, n.clone())
                .map_err(|e| format!("network-interfaces[{:?}]: {e}", n.iface_id))?;
        }
        if let Some(v) = &file.vsock {
            self.set_vsock(v.clone()).map_err(|e| format!("vsock: {e}"))?;
        }
        if let Some(b) = &file.balloon {
            self.set_balloon(b.clone())
                .map_err(|e| format!("balloon: {e}"))?;
        }
        if let Some(e) = &file.entropy {
            self.set_entropy(e.clone())
                .map_err(|e| format!("entropy: {e}"))?;
        }
        Ok(())
    }

    /// What `GET /vm/config` shows.
    pub fn to_full(&self) -> FullVmConfig {
        FullVmConfig {
            boot_source: self.boot_source.clone(),
            machine_config: Some(self.machine.clone()),
            drives: self.drives.clone(),
            network_interfaces: self.nets.clone(),
            vsock: self.vsock.clone(),
            balloon: self.balloon.clone(),
            entropy: self.entropy.clone(),
            logger: None,
            metrics: None,
        }
    }

    /// The VM to build: fails when no boot source was given.
    pub fn to_vm_config(&self) -> Result<VmConfig, String> {
        let boot = self
            .boot_source
            .as_ref()
            .ok_or("no boot source: PUT /boot-source with a kernel_image_path before InstanceStart")?;
        let mut config = VmConfig::new(KernelImage::File(PathBuf::from(&boot.kernel_image_path)));
        config.initrd = boot.initrd_path.as_deref().map(PathBuf::from);
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.into());
        config.vcpus = self.machine.vcpu_count;
        config.memory_mib = self.machine.mem_size_mib;
        // The root device is the guest's first disk (/dev/vda), as in Firecracker.
        let mut drives: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(self.drives.iter().filter(|d| !d.is_root_device));
        for d in drives {
            if d.is_root_device {
                let root = match &d.partuuid {
                    Some(uuid) => format!("root=PARTUUID={uuid}"),
                    None => "root=/dev/vda".into(),
                };
                let mode = if d.is_read_only.unwrap_or(false) { "ro" } else { "rw" };
                cmdline = format!("{cmdline} {root} {mode}");
            }
            config
                .disks
                .push(drive_to_block(d).map_err(|e| format!("drives: {e}"))?);
        }
        config.cmdline = cmdline.trim().to_string();
        for (i, n) in self.nets.iter().enumerate() {
            config
                .nets
                .push(net_to_config(n, i).map_err(|e| format!("network-interfaces: {e}"))?);
        }
        config.vsock = self.vsock.as_ref().map(|v| VsockConfig {
            cid: v.guest_cid,
            uds: Path::new(&v.uds_path).to_path_buf(),
        });
        config.balloon = self.balloon.as_ref().map(|b| BalloonConfig {
            target_mib: b.amount_mib,
            stats_interval: (b.stats_polling_interval_s > 0)
                .then(|| Duration::from_secs(b.stats_polling_interval_s)),
            free_page_reporting: b.free_page_reporting,
            deflate_on_oom: b.deflate_on_oom,
        });
        config.rng = match &self.entropy {
            Some(e) => Some(rate_limit("entropy.rate_limiter", e.rate_limiter.as_ref())?),
            None => None,
        };
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(l.bandwidth, Some((10_000, Some(1500))));
        assert_eq!(l.ops, None);
        let slow = RateLimiter {
            ops: Some(TokenBucket {
                size: 1,
                one_time_burst: None,
                refill_time: 5000,
            }),
            ..Default::default()
        };
        let e = rate_limit("rate_limiter", Some(&slow)).unwrap_err();
        assert!(e.starts_with("rate_limiter.ops: size 1 per refill_time 5000 ms"), "{e}");
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("02:00:00:00:00:0a").unwrap(), [2, 0, 0, 0, 0, 10]);
        for bad in ["", "02:00", "02:00:00:00:00:0g", "02:00:00:00:00:00:00", "2:0:0:0:0:0"] {
            assert!(parse_mac(bad).unwrap_err().contains(bad), "{bad}");
        }
    }

    #[test]
    fn machine_checks_name_the_field_and_leave_the_config() {
        let mut p = PreBoot::default();
        let mut m = MachineConfig {
            vcpu_count: 0,
            ..Default::default()
        };
        assert_eq!(
            p.set_machine(m.clone()).unwrap_err(),
            format!("vcpu_count 0: must be 1 to {MAX_VCPUS}")
        );
        m.vcpu_count = 2;
        m.smt = true;
        assert!(p.set_machine(m.clone()).unwrap_err().starts_with("smt true"));
        m.smt = false;
        m.huge_pages = "2M".into();
        assert!(p.set_machine(m.clone()).unwrap_err().starts_with("huge_pages \"2M\""));
        assert_eq!(p.machine, MachineConfig::default());
        m.huge_pages = "None".into();
        p.set_machine(m).unwrap();
        assert_eq!(p.machine.vcpu_count, 2);
    }

    #[test]
    fn root_drive_goes_first_and_onto_the_command_line() {
        let mut p = PreBoot::default();
        let exe = std::env::current_exe().unwrap().display().to_string();
        p.set_boot_source(BootSource {
            kernel_image_path: exe.clone(),
            boot_args: Some("console=ttyS0".into()),
            initrd_path: None,
        })
        .unwrap();
        let drive = |id: &str, root| Drive {
            drive_id: id.into(),
            is_root_device: root,
            path_on_host: Some(exe.clone()),
            is_read_only: Some(root),
            ..Default::default()
        };
        p.put_drive("data", drive("data", false)).unwrap();
        p.put_drive("rootfs", drive("rootfs", true)).unwrap();
        let e = p.put_drive("other", drive("other", true)).unwrap_err();
        assert!(e.contains("\"rootfs\" already is the root device"), "{e}");
        let e = p.put_drive("x", drive("y", false)).unwrap_err();
        assert!(e.starts_with("drive_id \"y\": differs"), "{e}");
        let c = p.to_vm_config().unwrap();
        assert_eq!(c.cmdline, "console=ttyS0 root=/dev/vda ro");
        assert_eq!(c.disks[0].id, "rootfs");
        assert!(c.disks[0].read_only);
        assert_eq!(c.disks[1].id, "data");
    }

    #[test]
    fn no_boot_source_is_an_error() {
        let e = PreBoot::default().to_vm_config().unwrap_err();
        assert!(e.contains("PUT /boot-source"), "{e}");
    }
}
