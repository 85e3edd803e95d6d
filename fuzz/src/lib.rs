//! What the fuzz targets share: a small guest memory with a hole, a split queue
//! laid out from fuzz input, and a scratch disk image in memory.
//!
//! Addresses in the input are mostly "near" (inside or just past guest memory) so
//! the fuzzer reaches the devices' request handling instead of only bouncing off
//! address checks; "far" ones cover the rest of the 64-bit space.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use vigil_devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory: 64 KiB at 0, a 4 KiB hole, 4 KiB at 0x11000.
pub const LOW: u64 = 0x1_0000;
pub const HIGH: u64 = 0x1_1000;
pub const HIGH_LEN: u64 = 0x1000;
/// Where the queue's rings live (room for 256 entries each).
pub const DESC_TABLE: u64 = 0;
pub const AVAIL_RING: u64 = 0x1000;
pub const USED_RING: u64 = 0x1400;
/// Start of the area the input fills freely (headers, data, range lists).
pub const DATA: u64 = 0x2000;
/// The rings of a second queue, for devices with two (room for 256 entries each,
/// in the free area: a hostile driver's buffers may overlap them).
pub const RINGS_2: Rings = Rings {
    desc: 0x8000,
    avail: 0x9000,
    used: 0x9400,
};

/// Where one queue's rings are.
#[derive(Clone, Copy, Debug)]
pub struct Rings {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The rings of the first (or only) queue.
pub const RINGS: Rings = Rings {
    desc: DESC_TABLE,
    avail: AVAIL_RING,
    used: USED_RING,
};

impl Rings {
    /// A ready queue of `size` entries on these rings (which the caller filled).
    pub fn queue(self, mem: &GuestMemoryMmap, size: u16) -> Queue {
        let mut q = Queue::new(256).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    /// Writes descriptor `i`.
    pub fn desc(self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(self.desc + 16 * u64::from(i)))
            .unwrap();
    }

    /// The available ring's index.
    pub fn avail_idx(self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    /// Puts `head` in the available ring of a `size`-entry queue and bumps its index.
    pub fn publish(self, mem: &GuestMemoryMmap, size: u16, head: u16) {
        let idx = self.avail_idx(mem);
        let slot = self.avail + 4 + 2 * u64::from(idx % size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The used ring's index.
    pub fn used_idx(self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used ring entry `i` of a `size`-entry queue: (head, length).
    pub fn used(self, mem: &GuestMemoryMmap, size: u16, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % size);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW as usize),
        (GuestAddress(HIGH), HIGH_LEN as usize),
    ])
    .unwrap()
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// Anywhere from 0 to just past the high region.
    Near(u16),
    /// In the high region, near its end.
    High(u16),
    Far(u64),
}

impl Addr {
    pub fn get(self) -> u64 {
        match self {
            Addr::Near(a) => u64::from(a) % (HIGH + HIGH_LEN + 0x100),
            Addr::High(a) => HIGH + u64::from(a) % (HIGH_LEN + 0x20),
            Addr::Far(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    Small(u16),
    Any(u32),
}

impl Len {
    pub fn get(self) -> u32 {
        match self {
            Len::Small(n) => u32::from(n) % 0x2400,
            Len::Any(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug)]
pub struct Desc {
    pub addr: Addr,
    pub len: Len,
    /// NEXT, WRITE, INDIRECT and whatever else.
    pub flags: u16,
    pub next: u16,
}

/// A write of guest memory before the device runs.
#[derive(Arbitrary, Debug)]
pub struct Poke {
    pub at: Addr,
    pub bytes: Vec<u8>,
}

/// One queue as the driver left it: descriptors, available ring and memory.
#[derive(Arbitrary, Debug)]
pub struct QueueInput {
    /// log2 of the queue size (taken modulo 9: 1 to 256 entries).
    pub size_log2: u8,
    pub descs: Vec<Desc>,
    pub avail: Vec<u16>,
    /// How far the available index runs ahead of what was filled in.
    pub avail_extra: u8,
    pub pokes: Vec<Poke>,
    /// Times to run the device, with the available index bumped in between.
    pub rounds: Vec<u8>,
}

impl QueueInput {
    pub fn size(&self) -> u16 {
        1 << (self.size_log2 % 9)
    }

    /// Writes the queue into `mem` and returns it, ready.
    pub fn install(&self, mem: &GuestMemoryMmap) -> Queue {
        self.install_at(mem, RINGS)
    }

    /// The same, on `rings`.
    pub fn install_at(&self, mem: &GuestMemoryMmap, rings: Rings) -> Queue {
        let size = self.size();
        for p in &self.pokes {
            // Ignore what falls outside memory, as a guest's store would fault.
            let _ = mem.write(&p.bytes, GuestAddress(p.at.get()));
        }
        for (i, d) in self.descs.iter().take(usize::from(size)).enumerate() {
            rings.desc(mem, i as u16, d.addr.get(), d.len.get(), d.flags, d.next);
        }
        let n = self.avail.len().min(usize::from(size));
        for (i, head) in self.avail.iter().take(n).enumerate() {
            mem.write_obj(*head, GuestAddress(rings.avail + 4 + 2 * i as u64))
                .unwrap();
        }
        let idx = (n as u16).wrapping_add(u16::from(self.avail_extra % 4));
        mem.write_obj(0u16, GuestAddress(rings.avail)).unwrap();
        mem.write_obj(idx, GuestAddress(rings.avail + 2)).unwrap();
        mem.write_obj(0u32, GuestAddress(rings.used)).unwrap();
        rings.queue(mem, size)
    }

    /// Bumps the available index by `by` (a driver adding or replaying entries).
    pub fn bump(mem: &GuestMemoryMmap, by: u8) {
        Self::bump_at(mem, RINGS, by)
    }

    /// The same, on `rings`.
    pub fn bump_at(mem: &GuestMemoryMmap, rings: Rings, by: u8) {
        let idx = rings.avail_idx(mem);
        mem.write_obj(
            idx.wrapping_add(u16::from(by % 8)),
            GuestAddress(rings.avail + 2),
        )
        .unwrap();
    }
}

/// The used ring's index (first queue).
pub fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    RINGS.used_idx(mem)
}

/// Used ring entry `i` of a `size`-entry queue (first queue): (head, length).
pub fn used(mem: &GuestMemoryMmap, size: u16, i: u16) -> (u32, u32) {
    RINGS.used(mem, size, i)
}

/// A directory of this process's own in the temporary directory (for Unix
/// sockets), created on first use and removed when the process exits.
pub fn scratch_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    extern "C" fn remove() {
        if let Some(dir) = DIR.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vigil-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // SAFETY: registers a function that takes no arguments and does not unwind
        // (remove_dir_all reports errors, it does not panic).
        unsafe { libc::atexit(remove) };
        dir
    })
}

/// A disk image in memory (a memfd), reopened by path like a real image.
pub struct Image {
    file: File,
    pub path: PathBuf,
    pub len: u64,
}

impl Image {
    pub fn new(len: u64) -> Self {
        // SAFETY: a fresh memfd; the name is a valid C string.
        let fd = unsafe { libc::memfd_create(c"vigil-fuzz-disk".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: we own the new descriptor.
        let file = unsafe { File::from_raw_fd(fd) };
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let image = Image { file, path, len };
        image.reset();
        image
    }

    /// Back to a known pattern (the previous run may have written it).
    pub fn reset(&self) {
        use std::os::unix::fs::FileExt;
        self.file.set_len(0).unwrap();
        let pattern: Vec<u8> = (0..self.len).map(|i| (i / 512) as u8 ^ 0xa5).collect();
        self.file.write_all_at(&pattern, 0).unwrap();
    }

    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

/// The destination's `--migration-token` of the `migration_receive` target and
/// its seeds (`examples/seed_corpus.rs`).
pub const MIGRATION_TOKEN: &str = "fuzz-token";

/// Decoder inputs: the first byte chooses whether [`mend`] runs (even: it
/// does), the rest is the file or stream. A mutation almost always breaks a
/// checksum, which a decoder checks first: mended inputs reach what lies behind
/// it, the others the checks themselves.
pub fn split_mend(data: &[u8]) -> (bool, Vec<u8>) {
    match data.split_first() {
        Some((flags, rest)) => (flags & 1 == 0, rest.to_vec()),
        None => (false, Vec::new()),
    }
}

/// Gives each migration frame of `stream` (`kind u8, length u32 LE, payload,
/// CRC-32C u32 LE`) the CRC its bytes have, up to the first frame cut short.
pub fn mend_frames(stream: &mut [u8]) {
    const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let mut at = 0;
    while let Some(head) = stream.get(at..at + 5) {
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let end = at + 5 + len;
        let Some(crc) = stream
            .get(end..end + 4)
            .map(|_| CRC32C.checksum(&stream[at..end]))
        else {
            return;
        };
        stream[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        at = end + 4;
    }
}

/// Gives a snapshot state file (a 32-byte header, then the state) the length
/// and the CRC-64/XZ of the bytes after its header, when it has a header.
pub fn mend_state(file: &mut [u8]) {
    const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
    if file.len() < 32 {
        return;
    }
    let (head, body) = file.split_at_mut(32);
    head[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
    head[24..32].copy_from_slice(&CRC64.checksum(body).to_le_bytes());
}

/// Gives a memory file's packed section (the bytes after its RAM image, a
/// 32-byte footer last) the CRC-64/XZ its data and entries have.
pub fn mend_section(section: &mut [u8]) {
    const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
    if section.len() < 32 {
        return;
    }
    let end = section.len() - 32;
    let crc = CRC64.checksum(&section[..end]);
    section[end + 24..].copy_from_slice(&crc.to_le_bytes());
}

/// A restore of a decoded state up to what opens host resources (a snapshot's
/// load, a migration's arrival): the legacy devices' state, each virtio
/// transport's registers and queues, and whole transports of the devices that
/// open nothing on the host (rng, balloon) over `mem`, the guest memory the
/// state came with (none: those are skipped). Refusals are fine; a panic is
/// not.
pub fn restore_devices(state: &vigil_vmm::snapshot::VmState, mem: Option<&GuestMemoryMmap>) {
    use std::sync::Arc;
    use vigil_devices::legacy::{ConsoleOutput, Serial, I8042};
    use vigil_devices::persist::Persist;
    use vigil_devices::virtio::mmio::MmioTransport;
    use vigil_devices::virtio::persist::DeviceState;
    use vigil_devices::virtio::Interrupt;
    use vmm_sys_util::eventfd::EventFd;

    let irq = || EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    let _ = Serial::restore((irq(), ConsoleOutput::Sink), &state.serial);
    let _ = I8042::restore((Arc::new(|_| {}), irq()), &state.i8042);
    for transport in &state.virtio {
        let _ = transport.check_registers_only();
        let _ = transport.device.check_queues(&transport.queues);
        let (Some(mem), DeviceState::Rng(_) | DeviceState::Balloon(_)) = (mem, &transport.device)
        else {
            continue;
        };
        let Ok(device) = transport.restore_device() else {
            continue;
        };
        let queue_evts = transport.queues.iter().map(|_| irq()).collect();
        let interrupt = Arc::new(Interrupt::new(irq()));
        let _ = MmioTransport::restore(transport, device, mem.clone(), interrupt, queue_evts);
    }
}
