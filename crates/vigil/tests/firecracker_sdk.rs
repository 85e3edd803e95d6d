//! A Firecracker SDK from crates.io (fctools, on which platform tools build)
//! drives Vigil through a link named `firecracker`, unchanged: it starts the
//! process with `--metadata` and `--mmds-size-limit`, configures and boots the
//! test guest through the API (an interface on a tap, MMDS V2, a balloon, an
//! entropy device, logger and metrics files), the guest reads the metadata over
//! its interface and sees the SDK's patch, then the SDK pauses, snapshots,
//! resumes and kills the VM, and restores the snapshot in a new process whose
//! guest counts on from where it was. Needs root and /dev/net/tun (skipped
//! otherwise).

mod common;

use std::io::{BufRead, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::time::Instant;

use common::tap::{can_use_tun, in_netns, TestTap};
use common::{scratch, TIMEOUT};
use fctools::process_spawner::DirectProcessSpawner;
use fctools::runtime::tokio::TokioRuntime;
use fctools::vm::api::VmApi;
use fctools::vm::configuration::{InitMethod, VmConfiguration, VmConfigurationData};
use fctools::vm::models::{
    BalloonDevice, BootSource, CreateSnapshot, EntropyDevice, LoggerSystem, MachineConfiguration,
    MetricsSystem, MmdsConfiguration, MmdsVersion, NetworkInterface, SnapshotType,
};
use fctools::vm::shutdown::{VmShutdownAction, VmShutdownMethod};
use fctools::vm::snapshot::PrepareVmFromSnapshotOptions;
use fctools::vm::{Vm, VmState};
use fctools::vmm::arguments::{VmmApiSocket, VmmArguments, VmmLogLevel};
use fctools::vmm::executor::unrestricted::UnrestrictedVmmExecutor;
use fctools::vmm::installation::VmmInstallation;
use fctools::vmm::ownership::VmmOwnershipModel;
use fctools::vmm::resource::system::ResourceSystem;
use fctools::vmm::resource::{CreatedResourceType, MovedResourceType, ResourceType};
use serde_json::json;

type SdkVm = Vm<UnrestrictedVmmExecutor, DirectProcessSpawner, TokioRuntime>;

/// The guest's console as the SDK hands it over: stdout read line by line on
/// a thread, stderr drained (a full pipe would stall the VMM), stdin kept.
struct SdkConsole {
    lines: Receiver<String>,
    stdin: std::fs::File,
    seen: String,
}

impl SdkConsole {
    fn take(vm: &mut SdkVm) -> SdkConsole {
        let pipes = vm.take_pipes().expect("the SDK keeps the VMM's pipes");
        let fd = |r: std::io::Result<OwnedFd>| std::fs::File::from(r.expect("a pipe's fd"));
        let stdout = fd(pipes.stdout.into_inner().into_owned_fd());
        let mut stderr = fd(pipes.stderr.into_inner().into_owned_fd());
        let stdin = fd(pipes.stdin.into_inner().into_owned_fd());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::stderr()));
        SdkConsole {
            lines,
            stdin,
            seen: String::new(),
        }
    }

    /// The first line from now on that starts with `prefix`.
    fn wait_for(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(e) => panic!("no {prefix:?} ({e}); the console:\n{}", self.seen),
            }
        }
    }

    fn counter(&mut self) -> u64 {
        let line = self.wait_for("counter: ");
        line["counter: ".len()..].trim().parse().unwrap()
    }
}

fn kill(method: VmShutdownMethod) -> [VmShutdownAction; 1] {
    [VmShutdownAction {
        method,
        timeout: Some(TIMEOUT),
        graceful: false,
    }]
}

fn executor(
    sock: PathBuf,
    metadata: Option<fctools::vmm::resource::Resource>,
) -> UnrestrictedVmmExecutor {
    let mut args = VmmArguments::new(VmmApiSocket::Enabled(sock)).mmds_size_limit(4096);
    if let Some(metadata) = metadata {
        args = args.metadata(metadata);
    }
    UnrestrictedVmmExecutor::new(args)
}

async fn lifecycle(dir: &Path, tap: &str) {
    let firecracker = dir.join("firecracker");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vigil"), &firecracker).unwrap();
    let installation = VmmInstallation::new(&firecracker, &firecracker, &firecracker);
    let metadata = dir.join("metadata.json");
    std::fs::write(
        &metadata,
        json!({"latest": {"meta-data": {"ami-id": "ami-12345", "tags": {"team": "vigil"}}}})
            .to_string(),
    )
    .unwrap();

    let mut resources = ResourceSystem::new(
        DirectProcessSpawner,
        TokioRuntime,
        VmmOwnershipModel::Shared,
    );
    let moved = ResourceType::Moved(MovedResourceType::HardLinkedOrCopied);
    let kernel = resources
        .create_resource(vigil_test_guest::ELF_PATH, moved)
        .unwrap();
    let metadata = resources.create_resource(&metadata, moved).unwrap();
    let log_file = dir.join("vmm.log");
    let logs = resources
        .create_resource(&log_file, ResourceType::Created(CreatedResourceType::File))
        .unwrap();
    let metrics_file = dir.join("metrics.json");
    let metrics = resources
        .create_resource(
            &metrics_file,
            ResourceType::Created(CreatedResourceType::File),
        )
        .unwrap();
    let data = VmConfigurationData {
        boot_source: BootSource {
            kernel_image: kernel,
            boot_args: Some("test=mmds,counter".into()),
            initrd: None,
        },
        drives: vec![],
        machine_configuration: MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: Some(false),
            track_dirty_pages: Some(true),
            huge_pages: None,
        },
        cpu_template: None,
        network_interfaces: vec![NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: tap.into(),
            guest_mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }],
        balloon_device: Some(BalloonDevice {
            amount_mib: 0,
            deflate_on_oom: true,
            stats_polling_interval_s: None,
        }),
        vsock_device: None,
        logger_system: Some(LoggerSystem {
            logs: Some(logs),
            level: Some(VmmLogLevel::Info),
            ..Default::default()
        }),
        metrics_system: Some(MetricsSystem { metrics }),
        mmds_configuration: Some(MmdsConfiguration {
            version: MmdsVersion::V2,
            network_interfaces: vec!["eth0".into()],
            ipv4_address: None,
        }),
        entropy_device: Some(EntropyDevice::default()),
    };
    let mut vm = SdkVm::prepare(
        executor(dir.join("fc.sock"), Some(metadata)),
        resources,
        installation,
        VmConfiguration::New {
            init_method: InitMethod::ViaApiCalls,
            data,
        },
    )
    .await
    .unwrap();
    vm.start(TIMEOUT).await.expect("the SDK boots the VM");
    let mut console = SdkConsole::take(&mut vm);

    // The guest reads what --metadata put in the store, over its interface
    // (V2: a session token first), then waits for the SDK's patch.
    console.wait_for("mmds: ready patch");
    let store: serde_json::Value = vm.get_mmds().await.unwrap();
    assert_eq!(
        store["latest"]["meta-data"]["ami-id"], "ami-12345",
        "{store}"
    );
    vm.update_mmds(json!({"latest": {"meta-data": {"ami-id": "ami-patched"}}}))
        .await
        .unwrap();
    console.stdin.write_all(b"g").unwrap();
    console.wait_for("TEST mmds PASS version=V2");
    for line in [
        "mmds: get status=401",
        "mmds: get-token status=200 body=ami-12345",
        "mmds: after-patch status=200 body=ami-patched",
    ] {
        assert!(console.seen.contains(line), "{}", console.seen);
    }

    // What the SDK asks of a running VM.
    let info = vm.get_info().await.unwrap();
    assert!(!info.is_paused, "{info:?}");
    let machine = vm.get_machine_configuration().await.unwrap();
    assert_eq!((machine.vcpu_count, machine.mem_size_mib), (1, 128));
    let balloon = vm.get_balloon_device().await.unwrap();
    assert_eq!(balloon.amount_mib, 0);
    let version = vm.get_firecracker_version().await.unwrap();
    assert!(
        version.starts_with(|c: char| c.is_ascii_digit()),
        "{version}"
    );
    vm.flush_metrics().await.unwrap();
    let metrics: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&metrics_file)
            .unwrap()
            .lines()
            .last()
            .expect("a metrics line after FlushMetrics"),
    )
    .unwrap();
    assert!(metrics.is_object(), "{metrics}");

    // Pause, a full snapshot, resume: the guest goes on.
    let before = console.counter();
    vm.pause().await.unwrap();
    assert_eq!(vm.get_state(), VmState::Paused);
    assert!(vm.get_info().await.unwrap().is_paused);
    let snapshot = CreateSnapshot {
        snapshot_type: Some(SnapshotType::Full),
        snapshot: vm
            .get_resource_system_mut()
            .create_resource(dir.join("vm.snap"), ResourceType::Produced)
            .unwrap(),
        mem_file: vm
            .get_resource_system_mut()
            .create_resource(dir.join("vm.mem"), ResourceType::Produced)
            .unwrap(),
    };
    let snapshot = vm.create_snapshot(snapshot).await.unwrap();
    assert_eq!(
        std::fs::metadata(&snapshot.mem_file_path).unwrap().len(),
        128 << 20
    );
    vm.resume().await.unwrap();
    assert!(console.counter() > before);
    vm.shutdown(kill(VmShutdownMethod::PauseThenKill))
        .await
        .unwrap();
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(!log.is_empty(), "the logger file got the VMM's log");

    // A new VMM from the snapshot: the guest counts on, no boot again.
    let mut restored = snapshot
        .prepare_vm(
            &mut vm,
            PrepareVmFromSnapshotOptions {
                executor: executor(dir.join("restored.sock"), None),
                process_spawner: DirectProcessSpawner,
                runtime: TokioRuntime,
                moved_resource_type: MovedResourceType::HardLinkedOrCopied,
                ownership_model: VmmOwnershipModel::Shared,
                enable_diff_snapshots: None,
                resume_vm: Some(true),
            },
        )
        .await
        .unwrap();
    restored
        .start(TIMEOUT)
        .await
        .expect("the SDK restores the VM");
    let mut console = SdkConsole::take(&mut restored);
    let next = console.counter();
    assert!(next > before, "counted on from {before}: {next}");
    assert_eq!(console.counter(), next + 1);
    assert!(!console.seen.contains("TEST"), "{}", console.seen);
    restored
        .shutdown(kill(VmShutdownMethod::Kill))
        .await
        .unwrap();
    restored.cleanup().await.unwrap();
    vm.cleanup().await.unwrap();
}

#[test]
fn a_firecracker_sdk_drives_the_whole_lifecycle() {
    in_netns(|| {
        if !can_use_tun() {
            return;
        }
        let name = format!("vgsdk{}", std::process::id() % 10_000);
        let tap = TestTap::create(&name).expect("a tap in the test's namespace");
        let dir = scratch("firecracker-sdk");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(lifecycle(&dir, tap.name()));
        std::fs::remove_dir_all(&dir).ok();
    });
}
