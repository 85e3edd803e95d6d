//! A hostile driver's virtio-balloon: inflate and deflate requests with page numbers
//! in RAM, in the hole, past the end and anywhere, split across descriptors at any
//! byte; free page reports of any address and length; statistics buffers of any
//! content; config writes; device resets; and raw hostile queues. Guest memory is
//! the small one of the other targets (64 KiB, a hole, 4 KiB).
//!
//! The device must not panic or hang, must never break on a well-formed queue, must
//! only give back buffers the driver posted (and each once), and must discard
//! exactly the pages the guest named: a page it inflated, or that a report covers
//! whole, reads as zero; every other page keeps its content.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vigil_model::config::BalloonConfig;
use vigil_devices::virtio::balloon::{Balloon, PAGE_SIZE};
use vigil_devices::virtio::{QueueOutcome, VirtioDevice};
use vigil_fuzz::{memory, Addr, Len, QueueInput, Rings, DATA, HIGH, HIGH_LEN, LOW};
use virtio_queue::Queue;
use vigil_devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 16;
/// Queues: inflate, deflate, statistics, free page reporting.
const QUEUES: usize = 4;
/// The rings of queue `i`: three small areas in one KiB.
fn rings(i: usize) -> Rings {
    let base = 0x8000 + 0x400 * i as u64;
    Rings {
        desc: base,
        avail: base + 0x100,
        used: base + 0x200,
    }
}
/// Pages whose content is checked: the top of low memory and the high region.
const CHECKED: [u64; 5] = [0xc, 0xd, 0xe, 0xf, HIGH / PAGE_SIZE];
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Pfn {
    /// A page at or near guest memory (RAM, the hole, just past the end), but
    /// not one holding the request itself.
    Near(u8),
    Any(u32),
}

impl Pfn {
    fn get(self) -> u32 {
        match self {
            // Not DATA's pages (2 and 3), which hold the page numbers themselves.
            Pfn::Near(p) => match u32::from(p) % ((HIGH + HIGH_LEN) / PAGE_SIZE) as u32 {
                n @ 0..=1 => n,
                n => n + 2,
            },
            Pfn::Any(p) => p,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// Page numbers on the inflate (true) or deflate queue, in two descriptors
    /// split at this byte.
    Pages {
        inflate: bool,
        pfns: Vec<Pfn>,
        split: u16,
    },
    /// A free page report: one descriptor per range.
    Report(Vec<(Addr, Len)>),
    /// A statistics buffer.
    Stats(Vec<u8>),
    /// A raw hostile queue (descriptors, ring and memory from the input).
    Raw {
        queue: u8,
        input: QueueInput,
    },
    Config {
        offset: u8,
        bytes: Vec<u8>,
    },
    Reset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    stats_due_at_once: bool,
    steps: Vec<Step>,
}

fn pattern(page: u64) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (page as u8) ^ (i as u8) ^ 0x5a)
        .collect()
}

struct Driver {
    queues: Vec<Queue>,
    /// Chains posted on each queue and not yet used: head -> its descriptors.
    posted: Vec<BTreeMap<u16, Vec<u16>>>,
    seen: Vec<u16>,
    /// A raw step may have left rings and memory in any state, or the guest gave
    /// back the pages of its own rings: stop checking the device.
    tainted: bool,
}

impl Driver {
    fn new(mem: &GuestMemoryMmap, tainted: bool) -> Self {
        let queues = (0..QUEUES)
            .map(|i| {
                mem.write_obj(0u32, GuestAddress(rings(i).avail)).unwrap();
                mem.write_obj(0u32, GuestAddress(rings(i).used)).unwrap();
                rings(i).queue(mem, QSIZE)
            })
            .collect();
        Driver {
            queues,
            posted: vec![BTreeMap::new(); QUEUES],
            seen: vec![0; QUEUES],
            tainted,
        }
    }

    /// Writes a chain of `descs` on queue `q` (in free descriptors) and makes it
    /// available; `None` when the queue has no room.
    fn post(&mut self, mem: &GuestMemoryMmap, q: usize, descs: &[(u64, u32, u16)]) -> Option<()> {
        let in_use: BTreeSet<u16> = self.posted[q].values().flatten().copied().collect();
        let free: Vec<u16> = (0..QSIZE)
            .filter(|i| !in_use.contains(i))
            .take(descs.len())
            .collect();
        if descs.is_empty() || free.len() < descs.len() {
            return None;
        }
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let next = free.get(i + 1).copied();
            let flags = if next.is_some() {
                flags | F_NEXT
            } else {
                flags
            };
            rings(q).desc(mem, free[i], addr, len, flags, next.unwrap_or(0));
        }
        rings(q).publish(mem, QSIZE, free[0]);
        self.posted[q].insert(free[0], free);
        Some(())
    }

    fn process(&mut self, dev: &mut Balloon, mem: &GuestMemoryMmap, q: usize) {
        for _ in 0..4 {
            let again = match dev.process_queue(q, &mut self.queues[q], mem) {
                Ok(QueueOutcome::Done(_)) => false,
                Ok(QueueOutcome::RetryAfter(wait, _)) => wait.is_zero(),
                Err(e) => {
                    assert!(self.tainted, "broken on a well-formed queue: {e:?}");
                    false
                }
            };
            self.check_used(mem, q);
            if !again {
                break;
            }
        }
    }

    fn check_used(&mut self, mem: &GuestMemoryMmap, q: usize) {
        let now = rings(q).used_idx(mem);
        let new = now.wrapping_sub(self.seen[q]);
        if !self.tainted {
            assert!(new <= QSIZE, "{new} used entries");
            for i in 0..new {
                let (id, len) = rings(q).used(mem, QSIZE, self.seen[q].wrapping_add(i));
                assert_eq!(len, 0, "the balloon writes nothing");
                let chain = u16::try_from(id)
                    .ok()
                    .and_then(|id| self.posted[q].remove(&id));
                assert!(
                    chain.is_some(),
                    "queue {q}: used id {id} was not posted (or used twice)"
                );
            }
        }
        self.seen[q] = now;
    }

    /// The guest gives back `pages`: if they hold its own rings, or the page
    /// numbers the device is reading (DATA's pages), it is on its own.
    fn giving_back(&mut self, pages: impl IntoIterator<Item = u64>) {
        let ring_pages = rings(0).desc / PAGE_SIZE..=rings(QUEUES - 1).used / PAGE_SIZE;
        let list_pages = DATA / PAGE_SIZE..=(DATA + 4096) / PAGE_SIZE;
        if pages
            .into_iter()
            .any(|p| ring_pages.contains(&p) || list_pages.contains(&p))
        {
            self.tainted = true;
        }
    }
}

/// The pages a report of `len` bytes at `addr` covers whole, if it lies in RAM (a
/// range that does not is refused whole).
fn whole_pages(addr: u64, len: u32) -> std::ops::Range<u64> {
    let end = addr.saturating_add(u64::from(len));
    let in_ram = [(0, LOW), (HIGH, HIGH + HIGH_LEN)]
        .iter()
        .any(|&(start, stop)| start <= addr && end <= stop);
    let first = addr.div_ceil(PAGE_SIZE);
    let last = if in_ram { end / PAGE_SIZE } else { first };
    first..last.max(first)
}

fuzz_target!(|input: Input| {
    let mem = memory();
    for &page in &CHECKED {
        mem.write_slice(&pattern(page), GuestAddress(page * PAGE_SIZE))
            .unwrap();
    }
    let mut dev = Balloon::new(BalloonConfig {
        target_mib: 1,
        stats_interval: Some(if input.stats_due_at_once {
            Duration::ZERO
        } else {
            Duration::from_secs(3600)
        }),
        free_page_reporting: true,
        free_page_hinting: false,
        deflate_on_oom: true,
    });
    assert_eq!(dev.queue_max_sizes().len(), QUEUES);
    let mut d = Driver::new(&mem, false);
    // Pages the guest gave back: they read as zero (nothing writes them again).
    let mut discarded = BTreeSet::new();
    for step in input.steps.iter().take(32) {
        match step {
            Step::Pages {
                inflate,
                pfns,
                split,
            } => {
                let pfns: Vec<u32> = pfns.iter().take(1024).map(|p| p.get()).collect();
                let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
                mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
                let total = bytes.len() as u64;
                let k = u64::from(*split) % (total + 1);
                let descs = [(DATA, k as u32, 0), (DATA + k, (total - k) as u32, 0)];
                let q = if *inflate { 0 } else { 1 };
                let before = dev.counters();
                if *inflate {
                    d.giving_back(pfns.iter().map(|&p| u64::from(p)));
                }
                if d.post(&mem, q, &descs).is_some() {
                    d.process(&mut dev, &mem, q);
                    let after = dev.counters();
                    let named = if *inflate {
                        after.0 - before.0
                    } else {
                        after.1 - before.1
                    };
                    if !d.tainted {
                        assert_eq!(named + after.3 - before.3, pfns.len() as u64);
                    }
                    if *inflate {
                        discarded.extend(pfns.iter().map(|&p| u64::from(p)));
                    }
                }
            }
            Step::Report(ranges) => {
                let descs: Vec<(u64, u32, u16)> = ranges
                    .iter()
                    .take(8)
                    .map(|(a, l)| (a.get(), l.get(), F_WRITE))
                    .collect();
                // A chain ends where it passes 4 GiB in all (virtio 1.2, 2.7.5.2).
                let mut total = 0u32;
                let legal = descs
                    .iter()
                    .take_while(|&&(_, l, _)| total.checked_add(l).map(|t| total = t).is_some());
                let legal: Vec<_> = legal.collect();
                let pages = || legal.iter().flat_map(|&&(a, l, _)| whole_pages(a, l));
                d.giving_back(pages());
                if d.post(&mem, 3, &descs).is_some() {
                    d.process(&mut dev, &mem, 3);
                    discarded.extend(pages());
                }
            }
            Step::Stats(bytes) => {
                let bytes = &bytes[..bytes.len().min(0x1000)];
                mem.write_slice(bytes, GuestAddress(DATA)).unwrap();
                if d.post(&mem, 2, &[(DATA, bytes.len() as u32, 0)]).is_some() {
                    d.process(&mut dev, &mem, 2);
                    assert!(dev.stats().len() <= 64);
                }
            }
            Step::Raw { queue, input } => {
                d.tainted = true;
                let q = usize::from(*queue) % QUEUES;
                d.queues[q] = input.install(&mem);
                for (round, &bump) in input.rounds.iter().take(4).chain([&0]).enumerate() {
                    if round > 0 {
                        QueueInput::bump(&mem, bump);
                    }
                    let _ = dev.process_queue(q, &mut d.queues[q], &mem);
                }
            }
            Step::Config { offset, bytes } => {
                dev.write_config(u64::from(*offset % 16), &bytes[..bytes.len().min(8)]);
                let mut back = [0u8; 8];
                dev.read_config(u64::from(*offset % 16), &mut back);
            }
            Step::Reset => {
                dev.reset();
                d = Driver::new(&mem, d.tainted);
            }
        }
        if d.tainted {
            continue;
        }
        for &page in &CHECKED {
            let mut now = vec![0u8; PAGE_SIZE as usize];
            mem.read_slice(&mut now, GuestAddress(page * PAGE_SIZE))
                .unwrap();
            if discarded.contains(&page) {
                assert!(
                    now.iter().all(|&b| b == 0),
                    "page {page:#x} given back, not zero"
                );
            } else {
                assert!(
                    now == pattern(page),
                    "page {page:#x} changed, never given back"
                );
            }
        }
    }
});
