//! A hostile driver's virtio-vsock device: packets on the transmit queue with
//! fuzzed headers (every op, wrong CIDs, lengths that lie, any port), laid out in
//! chains of any shape, interleaved with receive buffers of any size, host clients
//! that connect to the device's socket (`CONNECT <port>`) or not quite, host
//! servers behind `<uds>_<port>` that write, read and close, event-loop rounds over
//! the fds the device watches, device resets, and raw hostile transmit queues.
//!
//! The device must not panic or hang, must never break on a well-formed queue, and
//! every packet it gives the guest must be a sane one: from CID 2 to the guest's
//! CID, a stream packet of a known op, its length within the buffer and matching
//! the used length.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vigil_model::config::VsockConfig;
use vigil_devices::virtio::vsock::{Vsock, HDR_LEN, HOST_CID};
use vigil_devices::virtio::{DeviceBroken, QueueOutcome, VirtioDevice};
use vigil_fuzz::{memory, scratch_dir, QueueInput, DATA, RINGS, RINGS_2};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const GUEST_CID: u64 = 3;
/// Ports with a host server behind `<uds>_<port>`.
const SERVED_PORTS: [u32; 2] = [1234, 5000];
const TX_SIZE: u16 = 64;
const RX_SIZE: u16 = 16;
/// Transmit packets are written from DATA up to the second queue's rings.
const TX_AREA: (u64, u64) = (DATA, 0x8000);
/// Receive buffers: RX_SIZE slots of RX_SLOT bytes.
const RX_AREA: u64 = 0xa000;
const RX_SLOT: u64 = 0x600;
const MAX_PAYLOAD: usize = 1024;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

const OPS: [u16; 9] = [0, 1, 2, 3, 4, 5, 6, 7, 8];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Cid {
    Guest,
    Host,
    Any(u64),
}

impl Cid {
    fn get(self) -> u64 {
        match self {
            Cid::Guest => GUEST_CID,
            Cid::Host => HOST_CID,
            Cid::Any(c) => c,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Port {
    /// A port with a host server (as a destination), or one of a few.
    Known(u8),
    /// The ports the device gives host-initiated connections start at 2^30.
    HostSide(u8),
    Any(u32),
}

impl Port {
    fn get(self) -> u32 {
        match self {
            Port::Known(i) => {
                [SERVED_PORTS[0], SERVED_PORTS[1], 49152, 49153, 0][usize::from(i % 5)]
            }
            Port::HostSide(i) => (1 << 30) + u32::from(i % 4),
            Port::Any(p) => p,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum PayloadLen {
    /// The payload's real length.
    Exact,
    /// Off by a little either way.
    Off(i8),
    Any(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Layout {
    /// Header and payload in one descriptor.
    Whole,
    /// Split in two descriptors at this byte.
    Split(u16),
    /// One descriptor, this many bytes longer than what was written.
    Longer(u16),
    /// One descriptor marked device-writable.
    Writable,
}

/// A packet on the transmit queue. `None` in a field is the well-formed value,
/// so that empty and short inputs make sane packets.
#[derive(Arbitrary, Debug)]
struct Packet {
    /// `None`: the guest's CID.
    src_cid: Option<Cid>,
    /// `None`: the host's CID.
    dst_cid: Option<Cid>,
    src_port: Port,
    dst_port: Port,
    len: PayloadLen,
    /// Not 1 (stream): any other type.
    kind: Option<u16>,
    op: u8,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    payload: Vec<u8>,
    layout: Layout,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum RxLen {
    HeaderOnly,
    Small(u8),
    Full,
    Any(u16),
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// Packets on the transmit queue, then a notification.
    Send(Vec<Packet>),
    /// A raw hostile transmit queue (descriptors, ring and memory from the input).
    Raw(QueueInput),
    /// Receive buffers, then a notification of the receive queue.
    PostRx {
        count: u8,
        len: RxLen,
        device_readable: bool,
    },
    /// A host client connects to the device's socket and writes `CONNECT <port>\n`,
    /// or these bytes.
    HostConnect {
        port: Port,
        line: Option<Vec<u8>>,
    },
    HostWrite {
        conn: u8,
        data: Vec<u8>,
    },
    HostRead {
        conn: u8,
    },
    HostClose {
        conn: u8,
    },
    HostShutdown {
        conn: u8,
    },
    /// One event-loop round: every watched fd that is ready is processed.
    Events,
    Reset,
}

struct Host {
    dir: PathBuf,
    servers: Vec<UnixListener>,
}

static HOST: OnceLock<Host> = OnceLock::new();

fn host() -> &'static Host {
    HOST.get_or_init(|| {
        let dir = scratch_dir().to_path_buf();
        let servers = SERVED_PORTS
            .iter()
            .map(|port| {
                let path = dir.join(format!("v.sock_{port}"));
                std::fs::remove_file(&path).ok();
                let l = UnixListener::bind(&path).unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        Host { dir, servers }
    })
}

/// The driver's side: the three queues, and which receive slots are posted.
struct Driver {
    queues: Vec<Queue>,
    posted: [Option<u32>; RX_SIZE as usize],
    rx_seen: u16,
    /// A raw step may have left the rings in any state: stop checking the device.
    tainted: bool,
}

impl Driver {
    fn new(mem: &GuestMemoryMmap) -> Self {
        for rings in [RINGS, RINGS_2] {
            mem.write_obj(0u32, GuestAddress(rings.avail)).unwrap();
            mem.write_obj(0u32, GuestAddress(rings.used)).unwrap();
        }
        Driver {
            queues: vec![
                RINGS_2.queue(mem, RX_SIZE),
                RINGS.queue(mem, TX_SIZE),
                Queue::new(RX_SIZE).unwrap(),
            ],
            posted: [None; RX_SIZE as usize],
            rx_seen: 0,
            tainted: false,
        }
    }

    /// Writes `packets` into the transmit queue.
    fn send(&mut self, mem: &GuestMemoryMmap, packets: &[Packet]) {
        let mut at = TX_AREA.0;
        let mut desc = 0u16;
        for p in packets.iter().take(16) {
            let payload = &p.payload[..p.payload.len().min(MAX_PAYLOAD)];
            let len = match p.len {
                PayloadLen::Exact => payload.len() as u32,
                PayloadLen::Off(d) => (payload.len() as i64 + i64::from(d)).max(0) as u32,
                PayloadLen::Any(n) => n,
            };
            let mut hdr = [0u8; HDR_LEN];
            let src_cid = p.src_cid.unwrap_or(Cid::Guest).get();
            let dst_cid = p.dst_cid.unwrap_or(Cid::Host).get();
            hdr[0..8].copy_from_slice(&src_cid.to_le_bytes());
            hdr[8..16].copy_from_slice(&dst_cid.to_le_bytes());
            hdr[16..20].copy_from_slice(&p.src_port.get().to_le_bytes());
            hdr[20..24].copy_from_slice(&p.dst_port.get().to_le_bytes());
            hdr[24..28].copy_from_slice(&len.to_le_bytes());
            hdr[28..30].copy_from_slice(&p.kind.unwrap_or(1).to_le_bytes());
            let op = OPS
                .get(usize::from(p.op))
                .copied()
                .unwrap_or(u16::from(p.op));
            hdr[30..32].copy_from_slice(&op.to_le_bytes());
            hdr[32..36].copy_from_slice(&p.flags.to_le_bytes());
            hdr[36..40].copy_from_slice(&p.buf_alloc.to_le_bytes());
            hdr[40..44].copy_from_slice(&p.fwd_cnt.to_le_bytes());
            let total = (HDR_LEN + payload.len()) as u64;
            mem.write_slice(&hdr, GuestAddress(at)).unwrap();
            mem.write_slice(payload, GuestAddress(at + HDR_LEN as u64))
                .unwrap();
            let head = desc;
            let t = RINGS;
            match p.layout {
                Layout::Whole => t.desc(mem, desc, at, total as u32, 0, 0),
                Layout::Split(k) => {
                    let k = u64::from(k) % (total + 1);
                    t.desc(mem, desc, at, k as u32, F_NEXT, desc + 1);
                    desc += 1;
                    t.desc(mem, desc, at + k, (total - k) as u32, 0, 0);
                }
                Layout::Longer(extra) => {
                    t.desc(mem, desc, at, total as u32 + u32::from(extra), 0, 0)
                }
                Layout::Writable => t.desc(mem, desc, at, total as u32, F_WRITE, 0),
            }
            desc += 1;
            at += total.next_multiple_of(8);
            assert!(at <= TX_AREA.1);
            RINGS.publish(mem, TX_SIZE, head);
        }
    }

    /// Posts up to `count` receive buffers.
    fn post_rx(&mut self, mem: &GuestMemoryMmap, count: u8, len: RxLen, readable: bool) {
        let len = match len {
            RxLen::HeaderOnly => HDR_LEN as u32,
            RxLen::Small(n) => u32::from(n),
            RxLen::Full => RX_SLOT as u32,
            RxLen::Any(n) => u32::from(n) % (RX_SLOT as u32 + 1),
        };
        let flags = if readable { 0 } else { F_WRITE };
        for _ in 0..count % (RX_SIZE as u8 + 1) {
            let Some(slot) = self.posted.iter().position(Option::is_none) else {
                break;
            };
            let addr = RX_AREA + slot as u64 * RX_SLOT;
            mem.write_slice(&[0xee; RX_SLOT as usize], GuestAddress(addr))
                .unwrap();
            RINGS_2.desc(mem, slot as u16, addr, len, flags, 0);
            self.posted[slot] = Some(len);
            RINGS_2.publish(mem, RX_SIZE, slot as u16);
        }
    }

    /// Checks what the device put in the receive queue since the last call.
    fn check_rx(&mut self, mem: &GuestMemoryMmap) {
        let now = RINGS_2.used_idx(mem);
        let new = now.wrapping_sub(self.rx_seen);
        if self.tainted {
            self.rx_seen = now;
            return;
        }
        assert!(new <= RX_SIZE, "{new} used receive buffers");
        for i in 0..new {
            let (id, len) = RINGS_2.used(mem, RX_SIZE, self.rx_seen.wrapping_add(i));
            let slot = usize::try_from(id).ok().filter(|&s| s < RX_SIZE as usize);
            let Some(posted) = slot.and_then(|s| self.posted[s].take()) else {
                panic!("used receive id {id} was not posted");
            };
            assert!(len <= posted, "{len} bytes in a {posted}-byte buffer");
            if len == 0 {
                continue;
            }
            assert!(len as usize >= HDR_LEN, "a {len}-byte packet");
            let mut hdr = [0u8; HDR_LEN];
            let addr = RX_AREA + u64::from(id) * RX_SLOT;
            mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
            let u64_at = |o: usize| u64::from_le_bytes(hdr[o..o + 8].try_into().unwrap());
            let u32_at = |o: usize| u32::from_le_bytes(hdr[o..o + 4].try_into().unwrap());
            let u16_at = |o: usize| u16::from_le_bytes(hdr[o..o + 2].try_into().unwrap());
            assert_eq!(u64_at(0), HOST_CID, "src_cid");
            assert_eq!(u64_at(8), GUEST_CID, "dst_cid");
            assert_eq!(u16_at(28), 1, "type");
            let op = u16_at(30);
            assert!((1..=7).contains(&op), "op {op}");
            let plen = u32_at(24);
            assert_eq!(
                plen as usize + HDR_LEN,
                len as usize,
                "len {plen}, used {len}"
            );
            assert!(op == 5 || plen == 0, "op {op} with {plen} bytes");
        }
        self.rx_seen = now;
    }
}

fn outcome(result: Result<QueueOutcome, DeviceBroken>, tainted: bool) -> bool {
    match result {
        Ok(QueueOutcome::Done(_)) => false,
        Ok(QueueOutcome::RetryAfter(wait, _)) => {
            assert!(wait.is_zero(), "vsock has no rate limit");
            true
        }
        Err(e) => {
            assert!(tainted, "broken on a well-formed queue: {e:?}");
            false
        }
    }
}

/// A notification of queue `index`, then the calls the event loop makes while the
/// device asks to be called again (bounded).
fn notify(dev: &mut Vsock, d: &mut Driver, mem: &GuestMemoryMmap, index: usize) {
    for _ in 0..8 {
        let again = outcome(dev.process_queues(index, &mut d.queues, mem), d.tainted);
        d.check_rx(mem);
        if !again {
            break;
        }
    }
}

/// One event-loop round over the fds the device watches.
fn events(dev: &mut Vsock, d: &mut Driver, mem: &GuestMemoryMmap) {
    let mut fds: Vec<libc::pollfd> = dev
        .watched_fds()
        .iter()
        .map(|&(fd, set)| libc::pollfd {
            fd,
            events: set.bits() as i16,
            revents: 0,
        })
        .collect();
    // SAFETY: polls our array of pollfd, without waiting.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    for p in fds.iter().filter(|p| p.revents != 0) {
        let set = EventSet::from_bits_truncate(p.revents as u16 as u32);
        let result = dev.process_fd(p.fd, set, &mut d.queues, mem);
        outcome(result, d.tainted);
        d.check_rx(mem);
    }
}

fn accept_all(host: &Host, streams: &mut Vec<UnixStream>) {
    for l in &host.servers {
        while let Ok((s, _)) = l.accept() {
            s.set_nonblocking(true).unwrap();
            streams.push(s);
        }
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let host = host();
    let uds = host.dir.join("v.sock");
    let mem = memory();
    let mut dev = Vsock::new(&VsockConfig {
        cid: GUEST_CID,
        uds: uds.clone(),
    })
    .unwrap();
    let mut d = Driver::new(&mem);
    let mut streams: Vec<UnixStream> = Vec::new();
    let mut clients = 0;
    for step in steps.iter().take(32) {
        match step {
            Step::Send(packets) => {
                d.send(&mem, packets);
                notify(&mut dev, &mut d, &mem, 1);
            }
            Step::Raw(q) => {
                d.tainted = true;
                d.queues[1] = q.install(&mem);
                for (round, &bump) in q.rounds.iter().take(4).chain([&0]).enumerate() {
                    if round > 0 {
                        QueueInput::bump(&mem, bump);
                    }
                    notify(&mut dev, &mut d, &mem, 1);
                }
            }
            Step::PostRx {
                count,
                len,
                device_readable,
            } => {
                d.post_rx(&mem, *count, *len, *device_readable);
                notify(&mut dev, &mut d, &mem, 0);
            }
            Step::HostConnect { port, line } if clients < 8 => {
                clients += 1;
                if let Ok(mut s) = UnixStream::connect(&uds) {
                    let _ = match line {
                        Some(bytes) => s.write_all(&bytes[..bytes.len().min(64)]),
                        None => writeln!(s, "CONNECT {}", port.get()),
                    };
                    s.set_nonblocking(true).unwrap();
                    streams.push(s);
                }
            }
            Step::HostConnect { .. } => {}
            Step::HostWrite { conn, data } => {
                if let Some(s) = pick(&mut streams, *conn) {
                    let _ = s.write(&data[..data.len().min(4096)]);
                }
            }
            Step::HostRead { conn } => {
                if let Some(s) = pick(&mut streams, *conn) {
                    let mut buf = [0u8; 4096];
                    while !matches!(s.read(&mut buf), Ok(0) | Err(_)) {}
                }
            }
            Step::HostClose { conn } => {
                if !streams.is_empty() {
                    streams.swap_remove(usize::from(*conn) % streams.len());
                }
            }
            Step::HostShutdown { conn } => {
                if let Some(s) = pick(&mut streams, *conn) {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                }
            }
            Step::Events => events(&mut dev, &mut d, &mem),
            Step::Reset => {
                dev.reset();
                d = Driver::new(&mem);
            }
        }
        accept_all(host, &mut streams);
        let _ = dev.watched_fds();
    }
    // Nothing left behind for the next input.
    drop(dev);
    drop(streams);
    accept_all(host, &mut Vec::new());
});

fn pick(streams: &mut [UnixStream], i: u8) -> Option<&mut UnixStream> {
    let n = streams.len();
    (n > 0).then(|| &mut streams[usize::from(i) % n])
}
