//! The configuration a VM accumulates before it starts: each API body (or each
//! key of a configuration file) is checked and stored here, and
//! [`PreBoot::to_vm_config`] turns the whole into a [`VmConfig`] at InstanceStart.
//! A body that fails its checks leaves what was stored untouched. The checks are
//! the configuration's own (`vigil_model`): each body is translated into its
//! resource and validated as `vigil run` validates its flags.

use vigil_model::config::machine::MAX_VCPUS;
use vigil_model::config::{
    BalloonConfigError, ConfigError, HostLimits, VmConfig, MAX_VIRTIO_DEVICES,
};
use vigil_model::firecracker::{
    Balloon, BodyError, BootSource, CpuConfig, DocumentError, Drive, Entropy, FullVmConfig,
    MachineConfig, NetworkInterface, SerialDevice, Vsock,
};

use crate::model::MachineConfigUpdate;
use vigil_mmds::MmdsConfig;

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
    /// `PUT /cpu-config`: a custom CPU template.
    pub cpu_config: Option<CpuConfig>,
    /// `PUT /serial`: the console's output file, over `--console`.
    pub serial_out: Option<std::path::PathBuf>,
    /// Vigil's own keys of a configuration file: `vcpu-scheduling`, `rt-timer`,
    /// `memory-compression`.
    pub vcpu_scheduling: Vec<vigil_model::config::rt::VcpuSchedBody>,
    pub rt_timer: Option<vigil_model::config::RtTimerConfig>,
    pub memory_compression: Option<vigil_model::config::MemoryCompression>,
    /// `PUT /mmds/config`.
    pub mmds: Option<MmdsConfig>,
}

/// A configuration request the VM cannot take, naming the field and the value.
#[derive(Debug, thiserror::Error)]
pub enum PreBootError {
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("{field} {id:?}: differs from the id in the path, {path_id:?}")]
    IdMismatch {
        field: &'static str,
        id: String,
        path_id: String,
    },
    #[error("no balloon device: PUT /balloon first")]
    NoBalloon,
    #[error("stats_polling_interval_s {seconds}: statistics were turned {was} by PUT /balloon; PATCH changes the interval, not whether")]
    StatsSwitch { seconds: u64, was: &'static str },
    #[error("no boot source: PUT /boot-source with a kernel_image_path before InstanceStart")]
    NoBootSource,
    #[error(transparent)]
    Document(#[from] DocumentError),
}

impl From<ConfigError> for PreBootError {
    fn from(e: ConfigError) -> Self {
        PreBootError::Body(BodyError::Config(e))
    }
}

/// What the API checks a body against before boot: this host's memory. KVM's
/// vCPU limit is checked when the VM is built.
fn limits() -> HostLimits {
    HostLimits::read(MAX_VCPUS)
}

impl PreBoot {
    /// `PUT /boot-source`.
    pub fn set_boot_source(&mut self, b: BootSource) -> Result<(), PreBootError> {
        b.to_config().validate().map_err(ConfigError::from)?;
        self.boot_source = Some(b);
        Ok(())
    }

    /// `PUT /machine-config`.
    pub fn set_machine(&mut self, m: MachineConfig) -> Result<(), PreBootError> {
        let machine = m.to_config()?;
        machine.validate(&limits()).map_err(ConfigError::from)?;
        self.check_balloon_fits(self.balloon.as_ref(), m.mem_size_mib)?;
        self.machine = m;
        Ok(())
    }

    /// `PATCH /machine-config`.
    pub fn patch_machine(&mut self, u: MachineConfigUpdate) -> Result<(), PreBootError> {
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
    pub fn put_drive(&mut self, path_id: &str, d: Drive) -> Result<(), PreBootError> {
        if d.drive_id != path_id {
            return Err(PreBootError::IdMismatch {
                field: "drive_id",
                id: d.drive_id,
                path_id: path_id.into(),
            });
        }
        if d.is_root_device {
            if let Some(other) = self
                .drives
                .iter()
                .find(|o| o.is_root_device && o.drive_id != d.drive_id)
            {
                return Err(BodyError::SecondRoot(other.drive_id.clone()).into());
            }
        }
        d.to_config()?;
        self.check_device_count(usize::from(
            !self.drives.iter().any(|o| o.drive_id == d.drive_id),
        ))?;
        match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(old) => *old = d,
            None => self.drives.push(d),
        }
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`: adds an interface or replaces the one with
    /// that id.
    pub fn put_net(&mut self, path_id: &str, n: NetworkInterface) -> Result<(), PreBootError> {
        if n.iface_id != path_id {
            return Err(PreBootError::IdMismatch {
                field: "iface_id",
                id: n.iface_id,
                path_id: path_id.into(),
            });
        }
        let index = self
            .nets
            .iter()
            .position(|o| o.iface_id == n.iface_id)
            .unwrap_or(self.nets.len());
        // The interfaces as they would be with this one: the VM's checks
        // (duplicate taps and MACs) apply to the whole set.
        let mut nets = self.nets.clone();
        match nets.get_mut(index) {
            Some(old) => *old = n.clone(),
            None => nets.push(n.clone()),
        }
        let configs = nets
            .iter()
            .enumerate()
            .map(|(i, net)| net.to_config(i))
            .collect::<Result<Vec<_>, _>>()?;
        vigil_model::config::net::validate_all(&configs).map_err(ConfigError::from)?;
        self.check_device_count(usize::from(index == self.nets.len()))?;
        self.nets = nets;
        Ok(())
    }

    /// `PUT /vsock`.
    pub fn set_vsock(&mut self, v: Vsock) -> Result<(), PreBootError> {
        v.to_config()?;
        self.check_device_count(usize::from(self.vsock.is_none()))?;
        self.vsock = Some(v);
        Ok(())
    }

    fn check_balloon_fits(&self, b: Option<&Balloon>, memory_mib: u64) -> Result<(), PreBootError> {
        match b {
            Some(b) if b.amount_mib > memory_mib => {
                Err(ConfigError::from(BalloonConfigError::TooBig {
                    size: b.amount_mib,
                    memory: memory_mib,
                })
                .into())
            }
            _ => Ok(()),
        }
    }

    /// `PUT /balloon`.
    pub fn set_balloon(&mut self, b: Balloon) -> Result<(), PreBootError> {
        b.to_config()?;
        self.check_balloon_fits(Some(&b), self.machine.mem_size_mib)?;
        self.check_device_count(usize::from(self.balloon.is_none()))?;
        self.balloon = Some(b);
        Ok(())
    }

    /// `PATCH /balloon` before boot.
    pub fn patch_balloon_amount(&mut self, amount_mib: u64) -> Result<(), PreBootError> {
        let mut b = self.balloon.clone().ok_or(PreBootError::NoBalloon)?;
        b.amount_mib = amount_mib;
        self.set_balloon(b)
    }

    /// `PATCH /balloon/statistics` before boot.
    pub fn patch_balloon_stats(&mut self, seconds: u64) -> Result<(), PreBootError> {
        let mut b = self.balloon.clone().ok_or(PreBootError::NoBalloon)?;
        if (b.stats_polling_interval_s == 0) != (seconds == 0) {
            return Err(PreBootError::StatsSwitch {
                seconds,
                was: if b.stats_polling_interval_s == 0 {
                    "off"
                } else {
                    "on"
                },
            });
        }
        b.stats_polling_interval_s = seconds;
        self.set_balloon(b)
    }

    /// `PUT /entropy`.
    pub fn set_entropy(&mut self, e: Entropy) -> Result<(), PreBootError> {
        e.to_config()?;
        self.check_device_count(usize::from(self.entropy.is_none()))?;
        self.entropy = Some(e);
        Ok(())
    }

    /// `PUT /cpu-config`.
    pub fn set_cpu_config(&mut self, c: CpuConfig) -> Result<(), PreBootError> {
        c.to_config()?;
        self.cpu_config = Some(c);
        Ok(())
    }

    /// `PUT /serial`.
    pub fn set_serial(&mut self, s: SerialDevice) -> Result<(), PreBootError> {
        self.serial_out = s.console()?;
        Ok(())
    }

    fn check_device_count(&self, adding: usize) -> Result<(), PreBootError> {
        let count = self.drives.len()
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.balloon.is_some())
            + usize::from(self.entropy.is_some())
            + adding;
        if count > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices { count }.into());
        }
        Ok(())
    }

    /// `PUT /mmds/config`: the interfaces named must be configured already.
    pub fn set_mmds(&mut self, m: MmdsConfig) -> Result<(), PreBootError> {
        m.validate(self.nets.iter().map(|n| n.iface_id.as_str()))
            .map_err(BodyError::from)?;
        self.mmds = Some(m);
        Ok(())
    }

    /// Takes a whole configuration file: it must describe a VM that boots
    /// (validated as a whole, as `vigil run` and the daemon validate it).
    pub fn from_file(file: &FullVmConfig) -> Result<(Self, VmConfig), PreBootError> {
        let config = file.to_vm_config(&limits())?;
        let pre = PreBoot {
            boot_source: file.boot_source.clone(),
            machine: file.machine_config.clone().unwrap_or_default(),
            drives: file.drives.clone(),
            nets: file.network_interfaces.clone(),
            vsock: file.vsock.clone(),
            balloon: file.balloon.clone(),
            entropy: file.entropy.clone(),
            cpu_config: file.cpu_config.clone(),
            vcpu_scheduling: file.vcpu_scheduling.clone(),
            rt_timer: file.rt_timer,
            memory_compression: file.memory_compression,
            serial_out: None,
            mmds: file.mmds_config.clone(),
        };
        Ok((pre, config))
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
            cpu_config: self.cpu_config.clone(),
            logger: None,
            metrics: None,
            vcpu_scheduling: self.vcpu_scheduling.clone(),
            rt_timer: self.rt_timer,
            memory_compression: self.memory_compression,
            mmds_config: self.mmds.clone(),
        }
    }

    /// The VM to build: fails when no boot source was given.
    pub fn to_vm_config(&self) -> Result<VmConfig, PreBootError> {
        if self.boot_source.is_none() {
            return Err(PreBootError::NoBootSource);
        }
        let mut config = self.to_full().to_vm_config(&limits())?;
        if let Some(path) = &self.serial_out {
            config.console = vigil_model::config::ConsoleConfig::File(path.clone());
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_checks_name_the_field_and_leave_the_config() {
        let mut p = PreBoot::default();
        let mut m = MachineConfig {
            vcpu_count: 0,
            ..Default::default()
        };
        assert_eq!(
            p.set_machine(m.clone()).unwrap_err().to_string(),
            format!("vcpu_count 0: a VM needs at least one vCPU (1 to {MAX_VCPUS})")
        );
        m.vcpu_count = 2;
        m.smt = true;
        assert!(p
            .set_machine(m.clone())
            .unwrap_err()
            .to_string()
            .starts_with("smt true"));
        m.smt = false;
        m.huge_pages = "2M".into();
        assert!(p
            .set_machine(m.clone())
            .unwrap_err()
            .to_string()
            .starts_with("huge_pages \"2M\""));
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
        // The test binary itself, read-only: it cannot be opened for writing
        // while it runs.
        let drive = |id: &str, root| Drive {
            drive_id: id.into(),
            is_root_device: root,
            path_on_host: Some(exe.clone()),
            is_read_only: Some(true),
            ..Default::default()
        };
        p.put_drive("data", drive("data", false)).unwrap();
        p.put_drive("rootfs", drive("rootfs", true)).unwrap();
        let e = p.put_drive("other", drive("other", true)).unwrap_err();
        assert!(
            e.to_string()
                .contains("\"rootfs\" already is the root device"),
            "{e}"
        );
        let e = p.put_drive("x", drive("y", false)).unwrap_err();
        assert!(e.to_string().starts_with("drive_id \"y\": differs"), "{e}");
        let c = p.to_vm_config().unwrap();
        assert_eq!(c.boot.cmdline, "console=ttyS0 root=/dev/vda ro");
        assert_eq!(c.drives[0].id, "rootfs");
        assert!(c.drives[0].read_only);
        assert_eq!(c.drives[1].id, "data");
    }

    #[test]
    fn no_boot_source_is_an_error() {
        let e = PreBoot::default().to_vm_config().unwrap_err();
        assert!(e.to_string().contains("PUT /boot-source"), "{e}");
    }
}
