//! A hostile driver on the virtio-mmio register file: reads and writes of any
//! offset, width and value, guest memory changes and queue processing, in any
//! order, against any of the virtio devices (virtio-net on a socket pair,
//! virtio-vsock on a socket in the temporary directory). Checks the transport's
//! invariants after every step.

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vigil_model::config::{BalloonConfig, DriveConfig, NetConfig, VsockConfig};
use vigil_devices::bus::BusDevice;
use vigil_devices::virtio::net::tap::Tap;
use vigil_devices::virtio::balloon::Balloon;
use vigil_devices::virtio::block::Block;
use vigil_devices::virtio::mmio::{status, MmioTransport};
use vigil_devices::virtio::net::Net;
use vigil_devices::virtio::rng::Rng;
use vigil_devices::virtio::vsock::Vsock;
use vigil_devices::virtio::{Interrupt, VirtioDevice};
use vigil_fuzz::{memory, scratch_dir, Addr, Image, AVAIL_RING, DESC_TABLE, USED_RING};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// The registers of virtio 1.1, 4.2.2, so most accesses hit one.
const REGS: [u16; 25] = [
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64, 0x70,
    0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4, 0xfc, 0x100, 0x108,
];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Offset {
    Reg(u8),
    Any(u16),
}

impl Offset {
    fn get(self) -> u64 {
        match self {
            Offset::Reg(i) => u64::from(REGS[usize::from(i) % REGS.len()]),
            Offset::Any(o) => u64::from(o % 0x1000),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        at: Offset,
        width: u8,
    },
    Write {
        at: Offset,
        width: u8,
        value: u64,
    },
    /// The usual driver bring-up, so runs reach DRIVER_OK quickly.
    BringUp {
        size_log2: u8,
    },
    Notify {
        queue: u8,
    },
    Process {
        queue: u8,
    },
    Poke {
        at: Addr,
        bytes: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Device {
    /// One to four request queues (`VIRTIO_BLK_F_MQ` above one).
    Block {
        read_only: bool,
        queues: u8,
    },
    Rng,
    /// On socket pairs (no root), whose host ends may be closed; two queue
    /// pairs and a control queue when `pairs` is odd.
    Net {
        host_closed: bool,
        pairs: u8,
    },
    Vsock,
    /// Statistics and free page reporting on: four queues.
    Balloon,
}

#[derive(Arbitrary, Debug)]
struct Input {
    device: Device,
    ops: Vec<Op>,
}

static IMAGE: OnceLock<Image> = OnceLock::new();

fn width(w: u8) -> usize {
    [4, 4, 4, 1, 2, 8, 0, 3][usize::from(w % 8)]
}

fn write32(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn bring_up(t: &mut MmioTransport, size: u32) {
    write32(t, 0x70, 0);
    write32(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    write32(t, 0x24, 1);
    write32(t, 0x20, 1);
    write32(
        t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    write32(t, 0x30, 0);
    write32(t, 0x38, size);
    for (reg, addr) in [(0x80, DESC_TABLE), (0x90, AVAIL_RING), (0xa0, USED_RING)] {
        write32(t, reg, addr as u32);
        write32(t, reg + 4, 0);
    }
    write32(t, 0x44, 1);
    write32(
        t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
}

fuzz_target!(|input: Input| {
    let mem = memory();
    // Kept open for the whole input (unless the input closes it).
    let mut _host_end = None;
    let device: Box<dyn VirtioDevice> = match input.device {
        Device::Block { read_only, queues } => {
            let image = IMAGE.get_or_init(|| Image::new(64 * 512));
            image.reset();
            Box::new(
                Block::new(&DriveConfig {
                    path: image.path.clone(),
                    read_only,
                    id: "fuzz".into(),
                    rate_limit: Default::default(),
                    num_queues: u16::from(queues % 4) + 1,
                    ..Default::default()
                })
                .unwrap(),
            )
        }
        Device::Rng => Box::new(Rng::new(Default::default())),
        Device::Net { host_closed, pairs } => {
            let pairs = usize::from(pairs % 2) + 1;
            let (taps, hosts): (Vec<_>, Vec<_>) = (0..pairs).map(|_| Tap::pair().unwrap()).unzip();
            if !host_closed {
                _host_end = Some(hosts);
            }
            let config = NetConfig {
                id: None,
                tap: String::new(),
                mac: vigil_model::MacAddr([2, 0, 0, 0, 0, 1]),
                rx_rate_limit: Default::default(),
                tx_rate_limit: Default::default(),
                mmds: None,
                queue_pairs: pairs as u16,
            };
            Box::new(Net::with_taps(taps, &config))
        }
        Device::Vsock => {
            let uds = scratch_dir().join("v.sock");
            Box::new(Vsock::new(&VsockConfig { cid: 3, uds }).unwrap())
        }
        Device::Balloon => Box::new(Balloon::new(BalloonConfig {
            target_mib: 1,
            stats_interval: Some(std::time::Duration::ZERO),
            free_page_reporting: true,
            free_page_hinting: true,
            deflate_on_oom: true,
        })),
    };
    let device_type = device.device_type();
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let queues = device.queue_max_sizes().len();
    let evts = (0..queues)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let mut t = MmioTransport::new(device, mem.clone(), irq.clone(), evts).unwrap();

    for op in input.ops.iter().take(256) {
        match op {
            Op::Read { at, width: w } => {
                let mut b = vec![0u8; width(*w)];
                t.read(at.get(), &mut b);
            }
            Op::Write {
                at,
                width: w,
                value,
            } => {
                let b = value.to_le_bytes();
                let n = width(*w);
                let offset = at.get();
                t.write(offset, &b[..n.min(8)]);
                if offset == 0x70 && n == 4 && *value as u32 == 0 {
                    assert_eq!(t.status(), 0, "reset");
                    assert_eq!(irq.status(), 0, "reset clears the interrupt status");
                }
            }
            Op::BringUp { size_log2 } => bring_up(&mut t, 1 << (size_log2 % 10)),
            Op::Notify { queue } => write32(&mut t, 0x50, u32::from(*queue % 5)),
            Op::Process { queue } => {
                let _ = t.process_queue(usize::from(*queue % 5));
            }
            Op::Poke { at, bytes } => {
                let _ = mem.write(bytes, GuestAddress(at.get()));
            }
        }
        // Invariants a driver may rely on, whatever it did.
        assert_eq!(read32(&mut t, 0x00), 0x7472_6976);
        assert_eq!(read32(&mut t, 0x04), 2);
        assert_eq!(read32(&mut t, 0x08), device_type);
        let s = t.status();
        assert_eq!(read32(&mut t, 0x70), s);
        if s & status::DRIVER_OK != 0 && s & status::FAILED == 0 {
            assert_ne!(
                s & status::FEATURES_OK,
                0,
                "DRIVER_OK without FEATURES_OK: {s:#x}"
            );
        }
        assert_eq!(irq.status() & !3, 0, "unknown interrupt bits");
    }
});
