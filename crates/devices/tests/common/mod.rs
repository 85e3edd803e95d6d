//! Shared helpers for the virtio device tests: guest memory, a driver-side split
//! queue, descriptor chains and scratch image files.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vigil_devices::bus::BusDevice;
use vigil_devices::virtio::mmio::MmioTransport;
use vigil_devices::virtio::{Interrupt, VirtioDevice};
use vigil_devices::GuestMemoryMmap;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Guest memory of `size` bytes at address 0.
pub fn memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// An image file in the temporary directory, removed on drop.
pub struct TempImage(pub PathBuf);

impl TempImage {
    pub fn new(bytes: &[u8]) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vigil-devices-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, bytes).unwrap();
        TempImage(path)
    }

    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

/// The driver's side of one split queue at guest address 0: writes chains into the
/// descriptor table and publishes them in the available ring.
///
/// The descriptor table and available ring are `MockSplitQueue`'s; the used ring
/// is placed here, after the available ring, because `MockSplitQueue` (0.18) puts
/// it inside the available ring (its ring `end()` counts entries, not bytes).
pub struct Driver<'a> {
    pub vq: MockSplitQueue<'a, GuestMemoryMmap>,
    pub mem: &'a GuestMemoryMmap,
    pub used_addr: u64,
    size: u16,
    next_desc: u16,
    published: u16,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, 0, size)
    }

    /// A driver whose rings start at `base` (several queues of one device).
    pub fn at(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let vq = MockSplitQueue::create(mem, GuestAddress(base), size);
        let avail_end = vq.avail_addr().0 + 4 + 2 * u64::from(size) + 2;
        let used_addr = avail_end.next_multiple_of(4);
        mem.write_slice(&[0; 4], GuestAddress(used_addr)).unwrap();
        Self {
            vq,
            mem,
            used_addr,
            size,
            next_desc: 0,
            published: 0,
        }
    }

    /// A ready queue programmed with this driver's ring addresses.
    pub fn queue(&self) -> Queue {
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.set_used_ring_address(
            Some(self.used_addr as u32),
            Some((self.used_addr >> 32) as u32),
        );
        q
    }

    /// Writes `descs` (address, length, flags other than NEXT) as one chain and
    /// makes it available. Returns its head index.
    pub fn add(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let (flags, next) = if last {
                (flags, 0)
            } else {
                (flags | F_NEXT, (idx + 1) % self.size)
            };
            self.write_desc(idx, addr, len, flags, next);
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Writes one raw descriptor at `idx`.
    pub fn write_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.vq
            .desc_table()
            .store(
                idx,
                RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
            )
            .unwrap();
    }

    /// Puts `head` in the next available ring slot and bumps the index.
    pub fn publish(&mut self, head: u16) {
        let slot = self.published % self.size;
        self.vq
            .avail()
            .ring()
            .ref_at(slot as usize)
            .unwrap()
            .store(head);
        self.published = self.published.wrapping_add(1);
        self.vq.avail().idx().store(self.published);
    }

    /// Sets the available index without adding entries (a hostile driver).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.published = idx;
        self.vq.avail().idx().store(idx);
    }

    /// The used ring index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used_addr + 2)).unwrap()
    }

    /// Used ring entry `i`: (descriptor head, bytes written).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.used_addr + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }
}

/// A transport around `device` over `mem`, its interrupt, and (clones of) its
/// queue notification eventfds.
pub fn transport(
    device: Box<dyn VirtioDevice>,
    mem: &GuestMemoryMmap,
) -> (MmioTransport, Arc<Interrupt>, Vec<EventFd>) {
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let evts: Vec<EventFd> = (0..device.queue_max_sizes().len())
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let clones = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let t = MmioTransport::new(device, mem.clone(), irq.clone(), evts).unwrap();
    (t, irq, clones)
}

/// Programs queue 0 of `t` with `d`'s rings and size (before DRIVER_OK).
pub fn program_queue(t: &mut MmioTransport, d: &Driver, size: u16) {
    let split = |a: u64| (a as u32, (a >> 32) as u32);
    write32(t, 0x30, 0);
    write32(t, 0x38, u32::from(size));
    for (reg, addr) in [
        (0x80, d.vq.desc_table_addr().0),
        (0x90, d.vq.avail_addr().0),
        (0xa0, d.used_addr),
    ] {
        let (lo, hi) = split(addr);
        write32(t, reg, lo);
        write32(t, reg + 4, hi);
    }
    write32(t, 0x44, 1);
}

/// The whole driver initialisation (virtio 1.1, 3.1.1): acknowledge, negotiate
/// VERSION_1, set up queue 0 from `d`, DRIVER_OK. Returns the status read back.
pub fn bring_up(t: &mut MmioTransport, d: &Driver, size: u16) -> u32 {
    write32(t, 0x70, 0);
    write32(t, 0x70, 1);
    write32(t, 0x70, 1 | 2);
    write32(t, 0x24, 1);
    write32(t, 0x20, 1); // VIRTIO_F_VERSION_1
    write32(t, 0x70, 1 | 2 | 8);
    assert_eq!(read32(t, 0x70), 1 | 2 | 8, "FEATURES_OK accepted");
    program_queue(t, d, size);
    write32(t, 0x70, 1 | 2 | 8 | 4);
    read32(t, 0x70)
}

/// The driver's initialisation with `features` acknowledged and queue `i` set
/// up from `queues[i]` with `size` entries, then DRIVER_OK.
pub fn bring_up_queues(t: &mut MmioTransport, features: u64, queues: &[&Driver], size: u16) {
    write32(t, 0x70, 0);
    write32(t, 0x70, 1);
    write32(t, 0x70, 1 | 2);
    for sel in 0..2 {
        write32(t, 0x24, sel);
        write32(t, 0x20, (features >> (32 * sel)) as u32);
    }
    write32(t, 0x70, 1 | 2 | 8);
    assert_eq!(read32(t, 0x70), 1 | 2 | 8, "FEATURES_OK accepted");
    for (i, d) in queues.iter().enumerate() {
        write32(t, 0x30, i as u32);
        write32(t, 0x38, u32::from(size));
        for (reg, addr) in [
            (0x80, d.vq.desc_table_addr().0),
            (0x90, d.vq.avail_addr().0),
            (0xa0, d.used_addr),
        ] {
            write32(t, reg, addr as u32);
            write32(t, reg + 4, (addr >> 32) as u32);
        }
        write32(t, 0x44, 1);
    }
    write32(t, 0x70, 1 | 2 | 8 | 4);
    assert_eq!(read32(t, 0x70), 1 | 2 | 8 | 4, "DRIVER_OK");
}

pub fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

pub fn write32(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Lets `dev` take what completed on its host fd `fd` (an io_uring's
/// eventfd), waiting for the fd to signal, until `n` chains of `q` are used;
/// fails after 10 s.
pub fn wait_used(
    dev: &mut impl VirtioDevice,
    fd: std::os::fd::RawFd,
    d: &Driver,
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    n: u16,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while d.used_idx() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} completed",
            d.used_idx()
        );
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        dev.process_fd(
            fd,
            vmm_sys_util::epoll::EventSet::IN,
            std::slice::from_mut(q),
            mem,
        )
        .expect("device broken");
    }
}
