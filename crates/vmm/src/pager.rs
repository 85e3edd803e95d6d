//! The memory-compression pager of one VM (`--memory-compression`): guest
//! pages not written for a while are taken out of RAM into a pool inside the
//! VMM (LZ4, pages of zeros as a marker, identical pages stored once) and put
//! back when first touched again, by a vCPU or by any of the VMM's threads.
//!
//! Guest RAM is registered with a userfaultfd ([`LazyMemory`], missing and
//! write-protect modes). The codec is LZ4 (`lz4_flex`) or, with `algo=zstd`,
//! Zstandard at level 1. Two threads:
//!
//! - the fault server (`pager`) answers every fault: a missing page held in
//!   the pool is decompressed into the server's own buffer and copied in
//!   (`UFFDIO_COPY`), a held zero page mapped as zeros (`UFFDIO_ZEROPAGE`), a
//!   write to a page being compressed recorded and let through. It never reads
//!   or writes guest memory itself, so it never waits on a fault of its own.
//! - the scanner (`pager-scan`) picks cold pages and compresses them. Cold:
//!   not written for the idle time, by the guest or the VMM (the VM's dirty
//!   log, one more [`DirtyReader`]), and not put back by a fault since (a page
//!   read back is hot again and waits another idle time, twice as long each
//!   time it came back within an idle time of leaving, up to 8 times: a page
//!   the guest keeps reading stops going back and forth). Read-only use is not
//!   seen otherwise: this host's kernel has DAMON but no per-page accessed bit
//!   a VMM can read (no `/sys/kernel/mm/page_idle`), and DAMON's regions are
//!   too coarse and need a writable sysfs inside the jail.
//!
//! A write that races with compression is never lost: the scanner
//! write-protects a page (userfaultfd) before it reads it, so from then on a
//! write waits in the kernel. The server, answering such a write, marks the
//! page written under the table's lock and lifts the protection. The scanner
//! drops the page (`MADV_DONTNEED`) under that same lock only if it was not
//! marked: a write that came after the drop finds the page missing, waits for
//! it to be put back, and lands on the restored copy.
//!
//! With an RSS target (`rss=MiB`), the scanner also keeps guest memory's
//! footprint (its pages in RAM, [`DirtyLog::resident_own`], plus the pool)
//! under the target: when above, it takes the coldest pages first (the oldest
//! "last written or put back", each age halved for every doubling of its
//! backoff), idle for the full idle time or not, as many as it is over. Only
//! pages written or put back within the last two scans are spared (more for a
//! page with a backoff): a target below what the guest keeps writing cannot
//! be met. A page that did not compress waits twice as long each time too, so
//! a target out of reach does not cost a try of every such page every other
//! scan. The policy can change
//! while the VM runs ([`PagerPolicy`], `PATCH /vigil/memory`).
//!
//! Whoever reads all of guest memory (a snapshot, a migration) does so
//! through a [`MemoryReader`], which decompresses held pages into its own
//! buffer instead of faulting them back into RAM (a migration sends them
//! compressed, [`MemoryReader::read_packed`], and so does a Full snapshot,
//! after its memory file's RAM image); a snapshot lists the held pages, and a
//! VM loaded or received with the pager holds them again before it runs
//! ([`Pager::load`], [`Pager::adopt`]).
//!
//! The pool lives in this process only: if the VMM dies the held pages are
//! lost with it, exactly as guest RAM would be.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use vigil_metrics::PagerCounters;
use vigil_model::config::{CompressionAlgo, MemoryCompression};
use vigil_seccomp::ThreadKind;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::dirty_log::{DirtyLog, DirtyReader, DirtyTracker, PAGE_SIZE};
use crate::lazy_memory::{Fault, LazyMemory, LazyMemoryError};
use crate::snapshot::packed::PackedEntry;
use crate::snapshot::PageBits;
use crate::{thread_cpu_ns, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const PAGE: usize = PAGE_SIZE as usize;
/// A page that compresses to more than this stays in RAM (unless identical to
/// one held): the pool would save too little for the fault it costs.
const MAX_COMPRESSED: usize = PAGE * 3 / 4;
/// How long the fault server waits awake for the next fault after one.
const SPIN_AFTER_FAULT: Duration = Duration::from_micros(50);
/// Pages write-protected and compressed together.
const BATCH: usize = 256;
/// Pages of the table looked at under one hold of its lock.
const SCAN_SLICE: usize = 16 * 1024;
/// The longest time between scans with an RSS target: the footprint may
/// grow past it by what the guest writes in that time.
const TARGET_PERIOD: Duration = Duration::from_millis(250);
/// The idle time a page's backoff counts against with a target alone.
const TARGET_BACKOFF_IDLE: Duration = Duration::from_secs(1);

/// Compresses pages for the pool (the scanner's; Zstandard keeps its context).
enum Encoder {
    Lz4,
    Zstd(zstd::bulk::Compressor<'static>),
}

impl Encoder {
    fn new(algo: CompressionAlgo) -> std::io::Result<Self> {
        Ok(match algo {
            CompressionAlgo::Lz4 => Self::Lz4,
            CompressionAlgo::Zstd => Self::Zstd(zstd::bulk::Compressor::new(1)?),
        })
    }

    fn compress(&mut self, page: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Self::Lz4 => Ok(lz4_flex::block::compress(page)),
            Self::Zstd(c) => c.compress(page),
        }
    }
}

/// Puts compressed pages back (the fault server's).
enum Decoder {
    Lz4,
    Zstd(zstd::bulk::Decompressor<'static>),
}

impl Decoder {
    fn new(algo: CompressionAlgo) -> std::io::Result<Self> {
        Ok(match algo {
            CompressionAlgo::Lz4 => Self::Lz4,
            CompressionAlgo::Zstd => Self::Zstd(zstd::bulk::Decompressor::new()?),
        })
    }

    /// Decompresses `data` into `page`, which it must fill.
    fn decompress(&mut self, data: &[u8], page: &mut [u8]) -> Result<(), String> {
        let n = match self {
            Self::Lz4 => lz4_flex::block::decompress_into(data, page).map_err(|e| e.to_string()),
            Self::Zstd(d) => d
                .decompress_to_buffer(data, page)
                .map_err(|e| e.to_string()),
        }?;
        if n != page.len() {
            return Err(format!("{n} bytes, not a page"));
        }
        Ok(())
    }
}

/// Why the pager could not start.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    #[error("--memory-compression: {0} (needs userfaultfd with write-protect, Linux 5.7)")]
    Register(LazyMemoryError),
    #[error("--memory-compression: the dirty log: {0}")]
    DirtyLog(crate::DirtyLogError),
    #[error("--memory-compression: cannot start its threads: {0}")]
    Thread(std::io::Error),
    #[error("--memory-compression algo={algo:?}: {source}")]
    Codec {
        algo: CompressionAlgo,
        source: std::io::Error,
    },
    #[error("--memory-compression: cannot read the snapshot's memory file: {source}")]
    Load { source: std::io::Error },
    #[error("--memory-compression: cannot put the snapshot's pages in guest memory: {0}")]
    Fill(LazyMemoryError),
    #[error("--memory-compression: guest memory is loaded once, before the pager scans")]
    Loaded,
    #[error("memory_held: page {page} of {pages}: not a page of guest RAM")]
    Held { page: usize, pages: usize },
}

/// Where one held page's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// In guest RAM.
    Resident,
    /// Write-protected, being compressed; `written`: a write came meanwhile.
    Compressing { written: bool },
    /// Out of RAM: zeros.
    Zero,
    /// Out of RAM: pool entry `n`.
    Stored(u32),
}

struct Blob {
    hash: u64,
    refs: u32,
    data: Box<[u8]>,
}

/// The compressed pages, each distinct content once.
#[derive(Default)]
struct Pool {
    blobs: Vec<Blob>,
    free: Vec<u32>,
    by_hash: HashMap<u64, Vec<u32>>,
    bytes: u64,
    duplicates: u64,
}

impl Pool {
    /// The entry holding `data` (both codecs are deterministic: equal pages
    /// compress to equal bytes, and different ones cannot), shared when there
    /// is one.
    /// `Err` (the bytes back): not held, too large to be worth holding.
    fn insert(&mut self, hash: u64, data: Vec<u8>) -> Result<(u32, bool), Vec<u8>> {
        if let Some(ids) = self.by_hash.get(&hash) {
            for &id in ids {
                let blob = &mut self.blobs[id as usize];
                if *blob.data == *data {
                    blob.refs += 1;
                    self.duplicates += 1;
                    return Ok((id, true));
                }
            }
        }
        if data.len() > MAX_COMPRESSED {
            return Err(data);
        }
        self.bytes += data.len() as u64;
        let blob = Blob {
            hash,
            refs: 1,
            data: data.into_boxed_slice(),
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.blobs[id as usize] = blob;
                id
            }
            None => {
                self.blobs.push(blob);
                (self.blobs.len() - 1) as u32
            }
        };
        self.by_hash.entry(hash).or_default().push(id);
        Ok((id, false))
    }

    fn data(&self, id: u32) -> &[u8] {
        &self.blobs[id as usize].data
    }

    /// One page less refers to entry `id`; the last one frees it.
    fn release(&mut self, id: u32) {
        let blob = &mut self.blobs[id as usize];
        blob.refs -= 1;
        if blob.refs > 0 {
            self.duplicates -= 1;
            return;
        }
        let data = std::mem::take(&mut blob.data);
        self.bytes -= data.len() as u64;
        if let Some(ids) = self.by_hash.get_mut(&blob.hash) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.by_hash.remove(&blob.hash);
            }
        }
        self.free.push(id);
    }
}

/// The most a page's idle time doubles for coming back soon after it left.
const MAX_BACKOFF: u8 = 3;

/// Whether a page last hot at scan `last_hot` is cold at scan `scan`: idle
/// for `idle_scans`, doubled `backoff` times.
fn is_cold(scan: u32, last_hot: u32, idle_scans: u32, backoff: u8) -> bool {
    scan - last_hot >= idle_scans << backoff
}

/// A page put back at scan `scan` that left at scan `left`: one that came
/// back within an idle time is in use (read, as the dirty log cannot tell),
/// so it waits twice as long next time; one that stayed out that long waits
/// less again.
fn next_backoff(scan: u32, left: u32, idle_scans: u32, backoff: u8) -> u8 {
    if scan - left < idle_scans {
        (backoff + 1).min(MAX_BACKOFF)
    } else {
        backoff.saturating_sub(1)
    }
}

/// Every page's slot, when it was last written or put back (or, held, when
/// it left), how many times its idle time doubles, and the pool.
struct Table {
    slots: Vec<Slot>,
    last_hot: Vec<u32>,
    backoff: Vec<u8>,
    idle_scans: u32,
    scan: u32,
    pool: Pool,
    zeros: u64,
    stored: u64,
}

impl Table {
    /// Holds a page as `c` says (zeros as a marker, data in the pool, a
    /// duplicate once): the slot it takes and whether it was a duplicate,
    /// or `Err` with its bytes when they are too large to be worth holding.
    fn hold(&mut self, c: Compressed) -> Result<(Slot, bool), Vec<u8>> {
        match c {
            Compressed::Zero => {
                self.zeros += 1;
                Ok((Slot::Zero, false))
            }
            Compressed::Data(hash, data) => {
                let (id, duplicate) = self.pool.insert(hash, data)?;
                self.stored += 1;
                Ok((Slot::Stored(id), duplicate))
            }
        }
    }
}

/// The guest RAM regions, as page numbers.
struct Pages {
    /// (first guest-physical address, first page number, pages)
    regions: Vec<(u64, usize, usize)>,
    total: usize,
}

impl Pages {
    fn new(mem: &GuestMemoryMmap) -> Self {
        let mut regions = Vec::new();
        let mut total = 0;
        for r in mem.iter() {
            let pages = (r.len() / PAGE_SIZE) as usize;
            regions.push((r.start_addr().0, total, pages));
            total += pages;
        }
        Self { regions, total }
    }

    fn index(&self, gpa: u64) -> Option<usize> {
        self.regions.iter().find_map(|&(start, first, pages)| {
            let page = (gpa.checked_sub(start)? / PAGE_SIZE) as usize;
            (page < pages).then_some(first + page)
        })
    }

    /// Runs of pages consecutive in guest memory in `pages` (ascending page
    /// numbers), each as (first, count).
    fn runs(&self, pages: &[usize]) -> Vec<(usize, usize)> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &p in pages {
            match runs.last_mut() {
                Some((first, n))
                    if *first + *n == p
                        && self.gpa(*first) + *n as u64 * PAGE_SIZE == self.gpa(p) =>
                {
                    *n += 1
                }
                _ => runs.push((p, 1)),
            }
        }
        runs
    }

    fn gpa(&self, index: usize) -> u64 {
        let &(start, first, _) = self
            .regions
            .iter()
            .rfind(|&&(_, first, _)| first <= index)
            .unwrap_or(&(0, 0, 0));
        start + (index - first) as u64 * PAGE_SIZE
    }
}

struct Shared {
    lazy: LazyMemory,
    mem: GuestMemoryMmap,
    pages: Pages,
    table: Mutex<Table>,
    counters: Arc<PagerCounters>,
    stop: AtomicBool,
    /// Signalled with `stop`: the fault server leaves its wait at once.
    stop_event: EventFd,
    policy: PagerPolicy,
}

/// The policy of a running pager (idle time and RSS target), shared with
/// whoever may change it. A change wakes the scanner, which applies it from
/// its next scan; ages already counted are kept in scans, so a new scan
/// period stretches or shrinks them once.
#[derive(Clone)]
pub struct PagerPolicy(Arc<PolicyCell>);

struct PolicyCell {
    policy: Mutex<MemoryCompression>,
    scanner: OnceLock<Thread>,
}

impl PagerPolicy {
    fn new(policy: MemoryCompression) -> Self {
        Self(Arc::new(PolicyCell {
            policy: Mutex::new(policy),
            scanner: OnceLock::new(),
        }))
    }

    /// The policy now.
    pub fn get(&self) -> MemoryCompression {
        *self.0.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the policy (checked by the caller: see
    /// [`vigil_model::config::MemoryPolicyUpdate::apply`]; the codec is kept).
    pub fn set(&self, policy: MemoryCompression) {
        let _ = self.update(|_| Ok::<_, std::convert::Infallible>(policy));
    }

    /// Replaces the policy with what `change` makes of it, under one hold of
    /// its lock (two changes at once cannot undo each other); nothing changes
    /// on an error. The codec is kept. Returns the policy in force.
    pub fn update<E>(
        &self,
        change: impl FnOnce(MemoryCompression) -> Result<MemoryCompression, E>,
    ) -> Result<MemoryCompression, E> {
        let mut p = self.0.policy.lock().unwrap_or_else(|e| e.into_inner());
        *p = MemoryCompression {
            algo: p.algo,
            ..change(*p)?
        };
        let now = *p;
        drop(p);
        if let Some(t) = self.0.scanner.get() {
            t.unpark();
        }
        Ok(now)
    }
}

fn lock(m: &Mutex<Table>) -> MutexGuard<'_, Table> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The gauges, from the table (under its lock).
    fn publish(&self, t: &Table) {
        let c = &self.counters;
        c.pages_held.set(t.zeros + t.stored);
        c.zero_pages_held.set(t.zeros);
        c.duplicate_pages_held.set(t.pool.duplicates);
        c.pool_bytes.set(t.pool.bytes);
    }
}

/// A running pager; stopping it (dropping it) joins its threads. Stop it
/// only once nothing else can touch guest memory: a page still held is lost.
pub struct Pager {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// The scanner's, until it starts; meanwhile a load's.
    encoder: Option<Encoder>,
    /// A snapshot's memory was loaded (once only).
    loaded: bool,
}

impl Pager {
    /// The pager's policy, to read or change while it runs.
    pub fn policy(&self) -> PagerPolicy {
        self.shared.policy.clone()
    }

    /// Registers `mem` (anonymous, built here) and starts the pager's threads.
    pub fn start(
        config: MemoryCompression,
        mem: &GuestMemoryMmap,
        dirty: &DirtyTracker,
        counters: Arc<PagerCounters>,
    ) -> Result<Self, PagerError> {
        let mut pager = Self::new(config, mem, counters)?;
        pager.start_scanning(dirty)?;
        Ok(pager)
    }

    /// Registers `mem` (anonymous, built here) and starts answering its
    /// faults; no page leaves RAM before [`Pager::start_scanning`], except
    /// those [`Pager::load`] puts in the pool.
    pub fn new(
        config: MemoryCompression,
        mem: &GuestMemoryMmap,
        counters: Arc<PagerCounters>,
    ) -> Result<Self, PagerError> {
        let codec = |source| PagerError::Codec {
            algo: config.algo,
            source,
        };
        let encoder = Encoder::new(config.algo).map_err(codec)?;
        let decoder = Decoder::new(config.algo).map_err(codec)?;
        let lazy = LazyMemory::register_write_protect(mem).map_err(PagerError::Register)?;
        let pages = Pages::new(mem);
        let table = Table {
            slots: vec![Slot::Resident; pages.total],
            last_hot: vec![0; pages.total],
            backoff: vec![0; pages.total],
            idle_scans: 1,
            scan: 0,
            pool: Pool::default(),
            zeros: 0,
            stored: 0,
        };
        counters.enabled.set(1);
        let config = config.normalized();
        let shared = Arc::new(Shared {
            lazy,
            mem: mem.clone(),
            pages,
            table: Mutex::new(table),
            counters,
            stop: AtomicBool::new(false),
            stop_event: EventFd::new(libc::EFD_NONBLOCK).map_err(PagerError::Thread)?,
            policy: PagerPolicy::new(config),
        });
        let server = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("pager".into())
                .spawn(move || {
                    vigil_seccomp::confine(ThreadKind::Pager);
                    serve(&shared, decoder)
                })
                .map_err(PagerError::Thread)?
        };
        Ok(Self {
            shared,
            threads: vec![server],
            encoder: Some(encoder),
            loaded: false,
        })
    }

    /// Starts taking cold pages out: written ones are read from `dirty`'s
    /// log from now on. Once only; before any vCPU runs, so that every page
    /// it takes out is one whose writes it saw.
    pub fn start_scanning(&mut self, dirty: &DirtyTracker) -> Result<(), PagerError> {
        let Some(encoder) = self.encoder.take() else {
            return Ok(());
        };
        let reader = dirty.subscribe().map_err(PagerError::DirtyLog)?;
        let shared = self.shared.clone();
        let scanner = std::thread::Builder::new()
            .name("pager-scan".into())
            .spawn(move || {
                vigil_seccomp::confine(ThreadKind::Pager);
                scan(&shared, reader, encoder)
            })
            .map_err(PagerError::Thread)?;
        let _ = self.shared.policy.0.scanner.set(scanner.thread().clone());
        self.threads.push(scanner);
        let config = self.shared.policy.get();
        tracing::info!(idle = ?config.idle(), rss_mib = ?config.rss_mib, algo = ?config.algo, "memory compression on");
        Ok(())
    }

    /// Fills guest memory, still untouched, from a snapshot's memory `file`
    /// (guest RAM's ranges one after the other) before the VM runs: the pages
    /// the snapshot's pager held (`held`) go into the pool, compressed here,
    /// never into RAM, unless they no longer compress; the other pages with
    /// data are copied in; holes stay zeros; the pages the file keeps packed
    /// (`packed`, checked here) are adopted as they are ([`Pager::adopt`]).
    /// So a VM restored with the pager takes no more memory than the one
    /// saved did.
    pub fn load(
        &mut self,
        file: &File,
        data: &[(u64, u64)],
        held: &PageBits,
        packed: &[PackedEntry],
    ) -> Result<LoadInfo, PagerError> {
        let shared = &*self.shared;
        let encoder = match &mut self.encoder {
            Some(encoder) if !self.loaded => encoder,
            _ => return Err(PagerError::Loaded),
        };
        check_held(&shared.pages, held)?;
        let mut info = LoadInfo::default();
        let mut buf = vec![0u8; BATCH * PAGE];
        let load_error = |source| PagerError::Load { source };
        for &(start, end) in data {
            // Whole pages: a data range of a memory file written here is.
            let (start, end) = (start / PAGE_SIZE, end.div_ceil(PAGE_SIZE));
            let end = end.min(shared.pages.total as u64) as usize;
            let mut first = start as usize;
            while first < end {
                let n = BATCH.min(end - first);
                let chunk = &mut buf[..n * PAGE];
                file.read_exact_at(chunk, (first * PAGE) as u64)
                    .map_err(load_error)?;
                let mut t = lock(&shared.table);
                let t = &mut *t;
                // Runs of pages for RAM go in with one copy each.
                let mut run: Option<usize> = None;
                for k in 0..=n {
                    let to_ram = k < n
                        && !(held.contains(first + k) && {
                            // As the scanner would hold it; in RAM if it no
                            // longer compresses well enough.
                            let page = &chunk[k * PAGE..][..PAGE];
                            match pack(encoder, page).ok().map(|c| t.hold(c)) {
                                Some(Ok((slot, _))) => {
                                    t.slots[first + k] = slot;
                                    true
                                }
                                _ => false,
                            }
                        });
                    match (run, to_ram) {
                        (None, true) => run = Some(k),
                        (Some(from), false) => {
                            let gpa = shared.pages.gpa(first + from);
                            shared
                                .lazy
                                .copy(gpa, &chunk[from * PAGE..k * PAGE])
                                .map_err(PagerError::Fill)?;
                            info.copied += (k - from) as u64;
                            run = None;
                        }
                        _ => {}
                    }
                }
                shared.publish(t);
                first += n;
            }
        }
        let mut unpacker = Unpacker::default();
        let packed = packed
            .iter()
            .map(|e| {
                let gpa = shared.pages.gpa(e.page);
                unpacker
                    .check(gpa, e.algo, &e.data)
                    .map_err(|why| PagerError::Fill(LazyMemoryError::Page { gpa, why }))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.adopt(packed)?;
        let shared = &*self.shared;
        self.loaded = true;
        info.held = {
            let t = lock(&shared.table);
            t.zeros + t.stored
        };
        Ok(info)
    }

    /// Holds `packed` (pages a migration source's pager held, sent as its
    /// pool kept them and checked on arrival) before the VM runs: straight
    /// into the pool when the codecs agree, recompressed when not, into RAM
    /// when they do not compress enough here. Any copy of them in RAM (sent
    /// before they were packed) is dropped. Returns how many are held.
    pub fn adopt(&mut self, packed: Vec<PackedPage>) -> Result<u64, PagerError> {
        let encoder = self.encoder.as_mut().ok_or(PagerError::Loaded)?;
        let shared = &*self.shared;
        let algo = shared.policy.get().algo;
        let mut unpacker = Unpacker::default();
        let mut page = vec![0u8; PAGE];
        // Only pages in RAM need dropping: most never were.
        let backed = DirtyLog::backed(&shared.mem).ok();
        let mut stale = Vec::new();
        let mut to_ram = Vec::new();
        {
            let mut t = lock(&shared.table);
            let t = &mut *t;
            for p in packed {
                let Some(index) = shared.pages.index(p.gpa) else {
                    continue;
                };
                let mut unpack = |data: &[u8], page: &mut [u8]| {
                    unpacker
                        .unpack(p.algo, data, page)
                        .map_err(|why| PagerError::Fill(LazyMemoryError::Page { gpa: p.gpa, why }))
                };
                // In this pool's codec: as it came, or recompressed.
                let data = if p.algo == algo {
                    Ok(p.data)
                } else {
                    unpack(&p.data, &mut page)?;
                    encoder.compress(&page).map_err(|_| Vec::new())
                };
                match data.and_then(|d| t.hold(Compressed::Data(p.hash, d))) {
                    Ok((slot, _)) => t.slots[index] = slot,
                    Err(back) => {
                        if p.algo == algo {
                            unpack(&back, &mut page)?;
                        }
                        to_ram.push((p.gpa, page.clone()));
                    }
                }
                if backed.as_ref().is_none_or(|b| b.is_dirty(p.gpa)) {
                    stale.push(index);
                }
            }
            shared.publish(t);
        }
        for (first, n) in shared.pages.runs(&stale) {
            shared
                .lazy
                .drop_pages(shared.pages.gpa(first), n as u64 * PAGE_SIZE)
                .map_err(PagerError::Fill)?;
        }
        for (gpa, page) in to_ram {
            shared.lazy.copy(gpa, &page).map_err(PagerError::Fill)?;
        }
        let t = lock(&shared.table);
        Ok(t.zeros + t.stored)
    }

    /// Its counters.
    pub fn counters(&self) -> Arc<PagerCounters> {
        self.shared.counters.clone()
    }

    /// A reader of guest memory that takes held pages from the pool.
    pub fn reader(&self) -> MemoryReader {
        MemoryReader {
            mem: self.shared.mem.clone(),
            pager: Some(self.shared.clone()),
        }
    }
}

/// Checks `held` (a snapshot's `memory_held`, from outside): each page must
/// be one of guest RAM.
fn check_held(pages: &Pages, held: &PageBits) -> Result<(), PagerError> {
    match held.pages().last() {
        Some(page) if page >= pages.total => Err(PagerError::Held {
            page,
            pages: pages.total,
        }),
        _ => Ok(()),
    }
}

/// What [`Pager::load`] did, in pages.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadInfo {
    /// Copied into RAM.
    pub copied: u64,
    /// Held by the pager.
    pub held: u64,
}

/// A held page as a pool keeps it, compressed with `algo`: what a migration
/// sends of it, checked by an [`Unpacker`] on arrival.
pub struct PackedPage {
    pub gpa: u64,
    pub algo: CompressionAlgo,
    pub data: Vec<u8>,
    /// Of the page it unpacks to, as the pool hashes it.
    hash: u64,
}

/// Unpacks pages compressed by either codec; keeps a Zstandard context.
#[derive(Default)]
pub struct Unpacker {
    lz4: Option<Decoder>,
    zstd: Option<Decoder>,
}

impl Unpacker {
    /// Decompresses `data` into `page`, which it must fill exactly.
    pub fn unpack(
        &mut self,
        algo: CompressionAlgo,
        data: &[u8],
        page: &mut [u8],
    ) -> Result<(), String> {
        let slot = match algo {
            CompressionAlgo::Lz4 => &mut self.lz4,
            CompressionAlgo::Zstd => &mut self.zstd,
        };
        if slot.is_none() {
            *slot = Some(Decoder::new(algo).map_err(|e| e.to_string())?);
        }
        slot.as_mut().map_or(Ok(()), |d| d.decompress(data, page))
    }

    /// `data`, from outside (a migration stream), checked: it must unpack to
    /// exactly one page.
    pub fn check(
        &mut self,
        gpa: u64,
        algo: CompressionAlgo,
        data: &[u8],
    ) -> Result<PackedPage, String> {
        if data.len() > PAGE {
            return Err(format!("{} bytes, more than a page", data.len()));
        }
        let mut page = vec![0u8; PAGE];
        self.unpack(algo, data, &mut page)?;
        Ok(PackedPage {
            gpa,
            algo,
            data: data.to_vec(),
            hash: hash(&page),
        })
    }
}

/// Where [`MemoryReader::read_packed`] hands a held page: its index in the
/// buffer, the codec and the compressed bytes.
pub type PackedSink<'a> = dyn FnMut(usize, CompressionAlgo, &[u8]) + 'a;

/// Reads guest memory as the guest would see it, pages the pager holds
/// included, without putting those back in RAM: a held page is decompressed
/// into the reader's buffer. What a snapshot writes and a migration sends.
#[derive(Clone)]
pub struct MemoryReader {
    mem: GuestMemoryMmap,
    pager: Option<Arc<Shared>>,
}

impl MemoryReader {
    /// Reads `mem` as it is (no pager).
    pub fn plain(mem: GuestMemoryMmap) -> Self {
        Self { mem, pager: None }
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Fills `buf` from guest memory at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        self.read_with(gpa, buf, None)
    }

    /// As [`MemoryReader::read`], except that each held page with data goes
    /// to `packed` as the pool keeps it (its index in `buf`, the codec, the
    /// compressed bytes) instead of into `buf`, whose page is left as it was:
    /// what a migration sends compressed.
    pub fn read_packed(
        &self,
        gpa: u64,
        buf: &mut [u8],
        packed: &mut PackedSink<'_>,
    ) -> Result<(), String> {
        self.read_with(gpa, buf, Some(packed))
    }

    fn read_with(
        &self,
        gpa: u64,
        buf: &mut [u8],
        mut packed: Option<&mut PackedSink<'_>>,
    ) -> Result<(), String> {
        let plain = |buf: &mut [u8], gpa: u64| {
            self.mem
                .read_slice(buf, GuestAddress(gpa))
                .map_err(|e| format!("{gpa:#x}+{:#x}: {e}", buf.len()))
        };
        let Some(shared) = &self.pager else {
            return plain(buf, gpa);
        };
        if !gpa.is_multiple_of(PAGE_SIZE) || !buf.len().is_multiple_of(PAGE) {
            return plain(buf, gpa);
        }
        let algo = shared.policy.get().algo;
        let mut unpacker = Unpacker::default();
        // Pages not held are read from RAM, a run at a time. One read may
        // race with the scanner taking a page out: it faults, and the page
        // comes back as it was.
        let mut run: Option<usize> = None;
        let pages = buf.len() / PAGE;
        for k in 0..=pages {
            let at = gpa + (k * PAGE) as u64;
            let taken = k < pages && {
                let t = lock(&shared.table);
                let page = &mut buf[k * PAGE..][..PAGE];
                match shared.pages.index(at).map(|i| t.slots[i]) {
                    Some(Slot::Stored(id)) => {
                        match packed.as_mut() {
                            Some(packed) => packed(k, algo, t.pool.data(id)),
                            None => unpacker
                                .unpack(algo, t.pool.data(id), page)
                                .map_err(|e| format!("held page {at:#x}: {e}"))?,
                        }
                        true
                    }
                    Some(Slot::Zero) => {
                        page.fill(0);
                        true
                    }
                    _ => false,
                }
            };
            match (run, taken || k == pages) {
                (None, false) => run = Some(k),
                (Some(from), true) => {
                    plain(&mut buf[from * PAGE..k * PAGE], gpa + (from * PAGE) as u64)?;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The pages held now, numbered through the RAM ranges (none without a
    /// pager).
    pub fn held(&self) -> PageBits {
        let Some(shared) = &self.pager else {
            return PageBits::default();
        };
        let mut held = Vec::new();
        for start in (0..shared.pages.total).step_by(SCAN_SLICE) {
            let t = lock(&shared.table);
            let end = (start + SCAN_SLICE).min(shared.pages.total);
            held.extend(
                (start..end).filter(|&i| matches!(t.slots[i], Slot::Zero | Slot::Stored(_))),
            );
        }
        PageBits::from_pages(held)
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.stop_event.write(1);
        for t in self.threads.drain(..) {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Maps the zero page at every page of `mem` the host never backed, first
/// thing on the scanner's thread (the VM may be running: a page touched
/// meanwhile is left as it is, a fault waiting on one is woken): a first touch
/// of those is then the kernel's alone (a read sees zeros, a write copies
/// them), not a round trip through the pager's thread. Only shared zero-page
/// entries: no memory but page tables. On an error, those pages are simply
/// served by the pager.
fn map_untouched_zeros(shared: &Shared) {
    let (lazy, mem) = (&shared.lazy, &shared.mem);
    let backed = match DirtyLog::backed(mem) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(
                "memory compression: /proc/self/pagemap: {e}; untouched pages go through the pager"
            );
            return;
        }
    };
    // Pages held from the start (a restored VM's) are not backed either, and
    // must fault to come back. Nothing else takes pages out meanwhile.
    let held: Vec<bool> = {
        let t = lock(&shared.table);
        t.slots.iter().map(|s| *s != Slot::Resident).collect()
    };
    let untouched =
        |gpa: u64| !backed.is_dirty(gpa) && !shared.pages.index(gpa).is_some_and(|i| held[i]);
    for r in mem.iter() {
        let (start, end) = (r.start_addr().0, r.start_addr().0 + r.len());
        let mut gpa = start;
        while gpa < end {
            if !untouched(gpa) {
                gpa += PAGE_SIZE;
                continue;
            }
            // At most 64 MiB at a time, so that a stop is not kept waiting.
            let first = gpa;
            while gpa < end && untouched(gpa) && gpa - first < 64 << 20 {
                gpa += PAGE_SIZE;
            }
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = lazy.map_zeros(first, gpa - first) {
                tracing::warn!("memory compression: {e}; untouched pages go through the pager");
                return;
            }
        }
    }
}

/// Adds the CPU time the calling thread spent since `*last` to the counters.
fn account_cpu(counters: &PagerCounters, last: &mut u64) {
    let now = thread_cpu_ns();
    counters.cpu_ns.add(now.saturating_sub(*last));
    *last = now;
}

/// The fault server's loop: see the module's comment.
fn serve(shared: &Shared, mut decoder: Decoder) {
    let mut buf = vec![0u8; PAGE];
    let mut cpu = thread_cpu_ns();
    // Until then, after a fault, the next is waited for awake.
    let mut spin_until = Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        let spinning = Instant::now() < spin_until;
        let wait = if spinning {
            Duration::ZERO
        } else {
            Duration::from_secs(1)
        };
        let faults = match shared.lazy.fault_events(wait, Some(&shared.stop_event)) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("memory compression: {e}; faults are no longer served");
                return;
            }
        };
        if faults.is_empty() {
            if spinning {
                std::hint::spin_loop();
            } else {
                account_cpu(&shared.counters, &mut cpu);
            }
            continue;
        }
        // A guest touching held pages one after another faults again within
        // microseconds: waiting awake for a little spares waking this thread
        // for each, which costs tens of microseconds on a nested VM.
        spin_until = Instant::now() + SPIN_AFTER_FAULT;
        for fault in faults {
            let start = Instant::now();
            let Some(index) = shared.pages.index(fault.gpa) else {
                continue;
            };
            let r = if fault.write_protected {
                let mut t = lock(&shared.table);
                if let Slot::Compressing { written } = &mut t.slots[index] {
                    *written = true;
                }
                drop(t);
                // Held pages are missing: this only wakes the writer, whose
                // retry faults on the missing page.
                shared.lazy.unprotect(fault.gpa, PAGE_SIZE).map(|()| false)
            } else {
                restore(shared, &mut decoder, index, fault, &mut buf)
            };
            match r {
                Ok(true) => shared.counters.fault_in.record(start.elapsed()),
                Ok(false) => {}
                Err(e) => tracing::error!("memory compression: {e}"),
            }
        }
        account_cpu(&shared.counters, &mut cpu);
    }
}

/// Puts page `index` back for a missing fault on it; true when it was held.
fn restore(
    shared: &Shared,
    decoder: &mut Decoder,
    index: usize,
    fault: Fault,
    buf: &mut [u8],
) -> Result<bool, LazyMemoryError> {
    let gpa = fault.gpa;
    let mut t = lock(&shared.table);
    let t = &mut *t;
    match t.slots[index] {
        Slot::Stored(id) => {
            decoder
                .decompress(t.pool.data(id), buf)
                .map_err(|e| LazyMemoryError::Page {
                    gpa,
                    why: format!("its compressed copy does not decompress: {e}"),
                })?;
            shared.lazy.copy(gpa, buf)?;
            t.pool.release(id);
            t.stored -= 1;
        }
        Slot::Zero => {
            shared.lazy.zero(gpa)?;
            t.zeros -= 1;
        }
        // Never backed, or given back by the balloon: zeros, as the kernel
        // would have filled it without the userfaultfd; a page of its own
        // for a write, which would otherwise fault again to copy the zero
        // page.
        Slot::Resident | Slot::Compressing { .. } if fault.write => {
            buf.fill(0);
            return shared.lazy.copy(gpa, buf).map(|()| false);
        }
        Slot::Resident | Slot::Compressing { .. } => return shared.lazy.zero(gpa).map(|()| false),
    }
    t.slots[index] = Slot::Resident;
    t.backoff[index] = next_backoff(t.scan, t.last_hot[index], t.idle_scans, t.backoff[index]);
    t.last_hot[index] = t.scan;
    shared.counters.pages_restored.inc();
    shared.publish(t);
    Ok(true)
}

/// A fast 64-bit hash of a page (collisions are settled by comparing bytes).
fn hash(page: &[u8]) -> u64 {
    page.chunks_exact(8).fold(0xcbf2_9ce4_8422_2325, |h, w| {
        let w = u64::from_le_bytes(w.try_into().unwrap_or_default());
        (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
    })
}

/// What the scanner made of one page it read.
enum Compressed {
    Zero,
    Data(u64, Vec<u8>),
}

/// `page` as the pool would hold it: zeros, or its hash and compressed bytes.
fn pack(encoder: &mut Encoder, page: &[u8]) -> std::io::Result<Compressed> {
    if page.iter().all(|&b| b == 0) {
        return Ok(Compressed::Zero);
    }
    Ok(Compressed::Data(hash(page), encoder.compress(page)?))
}

/// How often the scanner runs under `policy`, after how many scans a page is
/// idle (none: no idle time), and the idle time in scans a page's backoff
/// counts against.
fn schedule(policy: &MemoryCompression) -> (Duration, Option<u32>, u32) {
    let idle = policy.idle();
    let mut period = idle.map_or(TARGET_PERIOD, |i| {
        (i / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    });
    if policy.rss_mib.is_some() {
        period = period.min(TARGET_PERIOD);
    }
    let scans = |d: Duration| {
        u32::try_from(d.as_millis().div_ceil(period.as_millis()).max(1)).unwrap_or(u32::MAX)
    };
    let idle_scans = idle.map(scans);
    (
        period,
        idle_scans,
        idle_scans.unwrap_or_else(|| scans(TARGET_BACKOFF_IDLE)),
    )
}

/// How cold a page is for the RSS target: scans since it was last written or
/// put back, halved for each doubling of its idle time (a page that keeps
/// coming back goes last).
fn coldness(scan: u32, last_hot: u32, backoff: u8) -> u32 {
    (scan - last_hot) >> backoff
}

/// Of `warm` (coldness, page), the `n` coldest pages.
fn coldest(mut warm: Vec<(u32, usize)>, n: usize) -> Vec<usize> {
    if n < warm.len() {
        warm.select_nth_unstable_by_key(n, |&(c, _)| std::cmp::Reverse(c));
        warm.truncate(n);
    }
    warm.into_iter().map(|(_, i)| i).collect()
}

/// The scanner's loop: every period (a quarter of the idle time, at most
/// [`TARGET_PERIOD`] with an RSS target) the dirty log read, the pages cold
/// for the whole idle time compressed, and, when guest memory's footprint is
/// above the target, the coldest of the others until it is not.
fn scan(shared: &Shared, reader: DirtyReader, mut encoder: Encoder) {
    map_untouched_zeros(shared);
    let mut cpu = thread_cpu_ns();
    let mut last = Instant::now();
    let mut warned = false;
    while !shared.stop.load(Ordering::Acquire) {
        // Read each time: a change (PATCH /vigil/memory) unparks this thread.
        let policy = shared.policy.get();
        let (period, idle_scans, backoff_scans) = schedule(&policy);
        let now = Instant::now();
        if now < last + period {
            // Unparked when the pager stops or its policy changes.
            std::thread::park_timeout(last + period - now);
            continue;
        }
        last = now;
        let written = match reader.take() {
            Ok(log) => log,
            Err(e) => {
                tracing::warn!("memory compression stops: the dirty log: {e}");
                return;
            }
        };
        // Only pages in RAM and this process's own: not the shared zero page
        // an untouched page maps (nothing to take), nor one swapped out.
        // Read outside the lock, which faults must not wait for.
        let backed = DirtyLog::resident_own(&shared.mem).ok();
        if let Some(b) = &backed {
            shared
                .counters
                .resident_bytes
                .set(b.count() as u64 * PAGE_SIZE);
        }
        let (scan, pool_bytes) = {
            let mut t = lock(&shared.table);
            t.scan += 1;
            t.idle_scans = backoff_scans;
            for gpa in written.dirty_pages() {
                if let Some(i) = shared.pages.index(gpa) {
                    t.last_hot[i] = t.scan;
                }
            }
            (t.scan, t.pool.bytes)
        };
        // Pages over the target (rounded up); the pool counts, as it is RAM
        // the guest's memory takes.
        let over = match (policy.rss_bytes(), &backed) {
            (Some(target), Some(b)) => (b.count() as u64 * PAGE_SIZE + pool_bytes)
                .saturating_sub(target)
                .div_ceil(PAGE_SIZE) as usize,
            (Some(_), None) if !warned => {
                warned = true;
                tracing::warn!(
                    "memory compression: /proc/self/pagemap unreadable; the RSS target is not kept"
                );
                0
            }
            _ => 0,
        };
        let mut candidates = Vec::new();
        let mut warm = Vec::new();
        // A slice of the table at a time: faults wait for none of it long.
        for start in (0..shared.pages.total).step_by(SCAN_SLICE) {
            let t = lock(&shared.table);
            let end = (start + SCAN_SLICE).min(shared.pages.total);
            for i in start..end {
                if t.slots[i] != Slot::Resident
                    || !backed
                        .as_ref()
                        .is_none_or(|b| b.is_dirty(shared.pages.gpa(i)))
                {
                    continue;
                }
                let (last_hot, backoff) = (t.last_hot[i], t.backoff[i]);
                if idle_scans.is_some_and(|n| is_cold(scan, last_hot, n, backoff)) {
                    candidates.push(i);
                } else if over > 0 && coldness(scan, last_hot, backoff) >= 2 {
                    // Not written nor put back in the last two scans (more
                    // for a page that keeps coming back or not compressing).
                    warm.push((coldness(scan, last_hot, backoff), i));
                }
            }
        }
        if over > candidates.len() {
            candidates.extend(coldest(warm, over - candidates.len()));
            candidates.sort_unstable();
        }
        for batch in candidates.chunks(BATCH) {
            if shared.stop.load(Ordering::Acquire) {
                break;
            }
            if let Err(e) = compress_batch(shared, batch, &mut encoder) {
                tracing::error!("memory compression stops: {e}");
                return;
            }
        }
        account_cpu(&shared.counters, &mut cpu);
    }
}

/// Compresses the pages `batch` (ascending page numbers), taking out of RAM
/// those not written meanwhile.
fn compress_batch(
    shared: &Shared,
    batch: &[usize],
    encoder: &mut Encoder,
) -> Result<(), LazyMemoryError> {
    let mut taken = Vec::with_capacity(batch.len());
    {
        let mut t = lock(&shared.table);
        for &i in batch {
            if t.slots[i] == Slot::Resident {
                t.slots[i] = Slot::Compressing { written: false };
                taken.push(i);
            }
        }
    }
    let runs = shared.pages.runs(&taken);
    for &(first, n) in &runs {
        shared
            .lazy
            .write_protect(shared.pages.gpa(first), n as u64 * PAGE_SIZE)?;
    }
    // Outside the lock: a page read here may be missing (the balloon gave it
    // back), and the server must be free to answer that fault.
    let mut buf = vec![0u8; PAGE];
    let mut results = Vec::with_capacity(taken.len());
    for &i in &taken {
        let gpa = shared.pages.gpa(i);
        let r = shared.mem.read_slice(&mut buf, GuestAddress(gpa));
        results.push(match r {
            Ok(()) => match pack(encoder, &buf) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!("memory compression: page {gpa:#x}: {e}");
                    None
                }
            },
            Err(e) => {
                tracing::warn!("memory compression: reading page {gpa:#x}: {e}");
                None
            }
        });
    }
    let c = &shared.counters;
    let mut dropped = Vec::with_capacity(taken.len());
    {
        let mut t = lock(&shared.table);
        let t = &mut *t;
        for (&i, result) in taken.iter().zip(results) {
            if t.slots[i] != (Slot::Compressing { written: false }) {
                c.pages_raced.inc();
                t.slots[i] = Slot::Resident;
                t.last_hot[i] = t.scan;
                continue;
            }
            let slot = match result.map(|r| t.hold(r)) {
                Some(Ok((slot, duplicate))) => {
                    if slot == Slot::Zero {
                        c.pages_zero.inc();
                    }
                    if duplicate {
                        c.pages_deduplicated.inc();
                    }
                    slot
                }
                Some(Err(_)) => {
                    c.pages_incompressible.inc();
                    Slot::Resident
                }
                None => Slot::Resident,
            };
            if slot == Slot::Resident {
                // Not worth holding: left alone for another idle time, twice
                // as long each time (up to 8 times), so that data that does
                // not compress is not tried again every idle time, nor every
                // other scan under a target it keeps out of reach.
                t.slots[i] = Slot::Resident;
                t.last_hot[i] = t.scan;
                t.backoff[i] = (t.backoff[i] + 1).min(MAX_BACKOFF);
                continue;
            }
            t.slots[i] = slot;
            t.last_hot[i] = t.scan;
            dropped.push(i);
            c.pages_compressed.inc();
        }
        // Under the lock, with no write let through since the read (the
        // server marks any under this lock first): the copies are current.
        for (first, n) in shared.pages.runs(&dropped) {
            shared
                .lazy
                .drop_pages(shared.pages.gpa(first), n as u64 * PAGE_SIZE)?;
        }
        shared.publish(t);
    }
    // Pages left in RAM writable again; writers waiting on the others wake
    // and fault on the missing page.
    for &(first, n) in &runs {
        shared
            .lazy
            .unprotect(shared.pages.gpa(first), n as u64 * PAGE_SIZE)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_that_comes_back_soon_waits_longer_next_time() {
        // Idle for 4 scans; a page hot at scan 10 is cold from scan 14.
        assert!(!is_cold(13, 10, 4, 0));
        assert!(is_cold(14, 10, 4, 0));
        // Taken out at 14, back at 15: in use; next time 8 scans, then 16, 32.
        assert_eq!(next_backoff(15, 14, 4, 0), 1);
        assert!(!is_cold(22, 15, 4, 1) && is_cold(23, 15, 4, 1));
        assert_eq!(next_backoff(16, 15, 4, 2), 3);
        assert_eq!(next_backoff(16, 15, 4, MAX_BACKOFF), MAX_BACKOFF);
        // Out for a whole idle time: it waits less again.
        assert_eq!(next_backoff(30, 20, 4, 3), 2);
        assert_eq!(next_backoff(30, 20, 4, 0), 0);
    }

    #[test]
    fn a_target_takes_the_coldest_pages_and_scans_often_enough() {
        // Pages 3 and 1 are the coldest; a page with a backoff counts as warmer.
        assert_eq!(
            coldest(vec![(4, 0), (9, 1), (1, 2), (12, 3)], 2)
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>(),
            [1, 3].into()
        );
        assert_eq!(coldest(vec![(4, 0)], 3), vec![0]);
        assert_eq!(coldness(20, 4, 0), 16);
        assert_eq!(coldness(20, 4, 2), 4);
        let policy = |idle_ms, rss_mib| MemoryCompression {
            idle_ms,
            rss_mib,
            algo: CompressionAlgo::Lz4,
        };
        // Idle alone: a quarter of it (at most 5 s).
        assert_eq!(
            schedule(&policy(Some(2000), None)),
            (Duration::from_millis(500), Some(4), 4)
        );
        assert_eq!(
            schedule(&policy(Some(60_000), None)).0,
            Duration::from_secs(5)
        );
        // A target: at least every 250 ms, the idle time in those scans.
        assert_eq!(
            schedule(&policy(Some(60_000), Some(64))),
            (TARGET_PERIOD, Some(240), 240)
        );
        assert_eq!(schedule(&policy(None, Some(64))), (TARGET_PERIOD, None, 4));
    }

    #[test]
    fn an_rss_target_set_while_running_brings_the_footprint_under_it() {
        const PAGES: u64 = 1024;
        const TARGET_MIB: u64 = 2;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (PAGES * PAGE_SIZE) as usize)])
            .unwrap();
        for i in 0..PAGES {
            let p = host(&mem, i * PAGE_SIZE);
            for w in 0..(PAGE / 8) as u64 {
                // SAFETY: inside the mapping, nothing else touches it yet.
                unsafe { p.add(w as usize).write_volatile(expected(i, w)) };
            }
        }
        let footprint = |c: &PagerCounters| {
            DirtyLog::resident_own(&mem).unwrap().count() as u64 * PAGE_SIZE + c.pool_bytes.get()
        };
        let dirty = DirtyTracker::for_memory(mem.clone());
        let counters = Arc::new(PagerCounters::default());
        // An idle time of a day: nothing leaves for it.
        let pager = Pager::start(
            MemoryCompression {
                idle_ms: Some(86_400_000),
                rss_mib: None,
                algo: CompressionAlgo::Lz4,
            },
            &mem,
            &dirty,
            counters.clone(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(counters.pages_compressed.get(), 0);
        assert_eq!(footprint(&counters), PAGES * PAGE_SIZE);

        let policy = pager.policy();
        policy.set(MemoryCompression {
            rss_mib: Some(TARGET_MIB),
            // The codec is kept whatever the change says.
            algo: CompressionAlgo::Zstd,
            ..policy.get()
        });
        assert_eq!(
            (policy.get().rss_mib, policy.get().algo),
            (Some(TARGET_MIB), CompressionAlgo::Lz4)
        );
        wait_for("the footprint to fall under the target", || {
            footprint(&counters) <= TARGET_MIB << 20
        });
        // As much as needed, not every compressible page (three quarters).
        let s = counters.snapshot();
        assert!(
            s.pages_held >= (PAGES / 2) - 8 && s.pages_held < PAGES * 5 / 8,
            "{s:?}"
        );
        for i in 0..PAGES {
            let p = host(&mem, i * PAGE_SIZE);
            for w in 0..(PAGE / 8) as u64 {
                // SAFETY: inside the mapping; the pager serves missing pages.
                let got = unsafe { p.add(w as usize).read_volatile() };
                assert_eq!(got, expected(i, w), "page {i} word {w}");
            }
        }
        drop(pager);
    }

    #[test]
    fn a_target_out_of_reach_tries_incompressible_pages_less_and_less() {
        const PAGES: u64 = 512;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (PAGES * PAGE_SIZE) as usize)])
            .unwrap();
        for i in 0..PAGES {
            let p = host(&mem, i * PAGE_SIZE);
            for w in 0..(PAGE / 8) as u64 {
                // SAFETY: inside the mapping, nothing else touches it yet.
                unsafe { p.add(w as usize).write_volatile(expected(i * 4 + 3, w)) };
            }
        }
        let dirty = DirtyTracker::for_memory(mem.clone());
        let counters = Arc::new(PagerCounters::default());
        // 2 MiB of noise against a 1 MiB target.
        let pager = Pager::start(
            MemoryCompression {
                idle_ms: None,
                rss_mib: Some(1),
                algo: CompressionAlgo::Lz4,
            },
            &mem,
            &dirty,
            counters.clone(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        drop(pager);
        // 12 scans: tried every other scan, that would be ~6 times each; with
        // the backoff, at 2, 6 and 14 scans at most.
        let tries = counters.pages_incompressible.get();
        assert!((PAGES..=3 * PAGES).contains(&tries), "{tries} tries");
        assert_eq!(counters.pages_compressed.get(), 0);
    }

    fn host(mem: &GuestMemoryMmap, gpa: u64) -> *mut u64 {
        mem.get_host_address(GuestAddress(gpa)).unwrap().cast()
    }

    /// Page `i` of the mix: zeros, four distinct pages repeated, text, noise.
    fn expected(i: u64, word: u64) -> u64 {
        match i % 4 {
            0 => 0,
            1 => (i % 16) * 0x0101_0101_0101_0101 + word,
            2 => u64::from_le_bytes(*b"vigil pa") ^ (word % 7) ^ (i << 40),
            _ => {
                // splitmix64
                let mut z = (i << 20 | word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            }
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn lz4_cold_pages_leave_ram_and_come_back_intact_and_writes_are_never_lost() {
        round_trip(CompressionAlgo::Lz4);
    }

    #[test]
    fn zstd_cold_pages_leave_ram_and_come_back_intact_and_writes_are_never_lost() {
        round_trip(CompressionAlgo::Zstd);
    }

    fn round_trip(algo: CompressionAlgo) {
        const PAGES: u64 = 1024;
        const HOT: u64 = 8;
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), (PAGES / 2 * PAGE_SIZE) as usize),
            (
                GuestAddress(0x1_0000_0000),
                (PAGES / 2 * PAGE_SIZE) as usize,
            ),
        ])
        .unwrap();
        let gpa = |i: u64| {
            if i < PAGES / 2 {
                i * PAGE_SIZE
            } else {
                0x1_0000_0000 + (i - PAGES / 2) * PAGE_SIZE
            }
        };
        for i in 0..PAGES {
            let p = host(&mem, gpa(i));
            for w in 0..(PAGE / 8) as u64 {
                // SAFETY: inside the mapping, nothing else touches it yet.
                unsafe { p.add(w as usize).write_volatile(expected(i, w)) };
            }
        }
        let backed_before = DirtyLog::backed(&mem).unwrap().count();
        assert_eq!(backed_before, PAGES as usize);
        // Its writes are not logged: every page looks cold, so the pager races
        // with the writer below.
        let dirty = DirtyTracker::for_memory(mem.clone());
        let counters = Arc::new(PagerCounters::default());
        let pager = Pager::start(
            MemoryCompression {
                idle_ms: Some(200),
                rss_mib: None,
                algo,
            },
            &mem,
            &dirty,
            counters.clone(),
        )
        .unwrap();

        // A writer the dirty log does not see, on the first word of HOT pages
        // (zero, duplicate, text and noise ones) while they are compressed.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (mem, stop) = (mem.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    for i in 0..HOT {
                        // SAFETY: a word of guest memory; faults are served
                        // by the pager's thread.
                        unsafe { host(&mem, gpa(i * 37)).write_volatile(n) };
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                n
            })
        };
        // Zeros: a quarter; duplicates: of the next quarter, all but 4 (i % 16
        // with i % 4 == 1 takes 4 values); noise stays.
        let in_ram = || DirtyLog::backed(&mem).unwrap().count();
        // Text goes last (a scan takes pages in order); all within a scan.
        wait_for("the mix to be taken out", || {
            let s = counters.snapshot();
            s.pages_zero >= PAGES / 4 - HOT
                && s.pages_deduplicated >= PAGES / 4 - 4 - HOT
                && in_ram() <= (PAGES / 4 + 2 * HOT + 8) as usize
        });
        let s = counters.snapshot();
        assert!(s.pages_incompressible >= PAGES / 4 - HOT, "{s:?}");
        assert!(
            s.pool_bytes > 0 && s.pool_bytes < PAGES * PAGE_SIZE / 8,
            "{s:?}"
        );

        // Let compression race with the writer a little longer.
        wait_for("writes to race with compression", || {
            counters.pages_raced.get() > 0 || counters.pages_restored.get() > 4 * HOT
        });
        stop.store(true, Ordering::Relaxed);
        let last = writer.join().unwrap();

        // Every byte back as it was written, through faults the pager serves.
        for i in 0..PAGES {
            let p = host(&mem, gpa(i));
            for w in 0..(PAGE / 8) as u64 {
                // SAFETY: inside the mapping; the pager serves missing pages.
                let got = unsafe { p.add(w as usize).read_volatile() };
                let want = if w == 0 && i % 37 == 0 && i / 37 < HOT {
                    last
                } else {
                    expected(i, w)
                };
                assert_eq!(got, want, "page {i} word {w}");
            }
        }
        let s = counters.snapshot();
        assert!(s.pages_restored > 0 && s.fault_in.count > 0, "{s:?}");
        assert!(s.cpu_ns > 0);
        drop(pager);
    }

    #[test]
    fn held_pages_are_saved_without_coming_back_and_load_straight_into_a_pool() {
        use crate::snapshot::file::{self, Pages as Saved};
        use crate::snapshot::packed;
        const PAGES: u64 = 512;
        let fill = |mem: &GuestMemoryMmap| {
            for i in 0..PAGES {
                let p = host(mem, i * PAGE_SIZE);
                for w in 0..(PAGE / 8) as u64 {
                    // SAFETY: inside the mapping, nothing else touches it yet.
                    unsafe { p.add(w as usize).write_volatile(expected(i, w)) };
                }
            }
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (PAGES * PAGE_SIZE) as usize)])
            .unwrap();
        fill(&mem);
        let dirty = DirtyTracker::for_memory(mem.clone());
        let counters = Arc::new(PagerCounters::default());
        let policy = MemoryCompression {
            idle_ms: Some(200),
            rss_mib: None,
            algo: CompressionAlgo::Lz4,
        };
        let pager = Pager::start(policy, &mem, &dirty, counters.clone()).unwrap();
        // Zeros, duplicates and text held; noise stays in RAM.
        wait_for("the mix to be taken out", || {
            counters.pages_held.get() >= 3 * PAGES / 4 - 4
        });
        let reader = pager.reader();
        let held = reader.held();
        let held_pages = held.count();
        assert_eq!(held_pages, counters.pages_held.get());
        let pages_of = |kind: usize| held.pages().filter(|i| i % 4 == kind).count() as u64;
        assert_eq!(pages_of(3), 0, "noise is not held: {held:?}");

        // A memory file with every byte, and not one page faulted back in.
        let dir = std::env::temp_dir().join(format!("vigil-pager-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        let written = file::write_memory(&path, &reader, Saved::NonZero).unwrap();
        assert_eq!(counters.pages_restored.get(), 0);
        assert_eq!(counters.pages_held.get(), held_pages);
        // Held pages with data stay compressed, after the RAM image (holes
        // there); the rest of the mix's data is in it.
        let held_data = pages_of(1) + pages_of(2);
        assert_eq!(written.packed_pages, held_data);
        assert_eq!(
            written.data,
            (PAGES / 4 + PAGES / 2 - held_data) * PAGE_SIZE,
            "noise and whatever was not held"
        );
        let ram = (PAGES * PAGE_SIZE) as usize;
        let saved = std::fs::read(&path).unwrap();
        assert_eq!(
            saved.len() as u64,
            ram as u64 + written.packed_bytes,
            "{written:?}"
        );
        // The pool's bytes, each distinct page once as there, with a 20-byte
        // entry per page and a 32-byte footer.
        assert_eq!(
            written.packed_bytes,
            counters.pool_bytes.get() + held_data * 20 + 32,
            "{written:?}"
        );
        let f = File::open(&path).unwrap();
        let packed = packed::read_section(&f, ram as u64, PAGES as usize).unwrap();
        assert_eq!(packed.len() as u64, held_data);
        let mut image = saved[..ram].to_vec();
        packed::unpack_each(
            &packed,
            |e| e,
            |page, bytes| {
                let at = &mut image[page * PAGE..][..PAGE];
                assert!(at.iter().all(|&b| b == 0), "page {page} is a hole");
                at.copy_from_slice(bytes);
                Ok(())
            },
        )
        .unwrap();
        for i in 0..PAGES {
            for w in 0..(PAGE / 8) as u64 {
                let at = (i * PAGE_SIZE + w * 8) as usize;
                let got = u64::from_le_bytes(image[at..at + 8].try_into().unwrap());
                assert_eq!(got, expected(i, w), "page {i} word {w} of the file");
            }
        }
        drop(pager);

        // Loaded with a pager: the held pages go to its pool, the rest to RAM.
        let restored =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (PAGES * PAGE_SIZE) as usize)])
                .unwrap();
        let counters = Arc::new(PagerCounters::default());
        let mut pager = Pager::new(policy, &restored, counters.clone()).unwrap();
        let data = file::data_ranges(&f, &path).unwrap();
        // Ranges from outside must be whole pages of RAM.
        let bad = PageBits::from_pages([3, PAGES as usize]);
        assert!(matches!(
            pager.load(&f, &data, &bad, &packed),
            Err(PagerError::Held { page, .. }) if page == PAGES as usize
        ));
        let info = pager.load(&f, &data, &held, &packed).unwrap();
        // Held zero pages are holes in the file: untouched, they read as zeros.
        assert_eq!(info.held, held_data);
        assert_eq!(info.copied, PAGES / 4 + (PAGES / 2 - held_data));
        assert_eq!(
            DirtyLog::backed(&restored).unwrap().count() as u64,
            info.copied
        );
        assert_eq!(counters.pages_held.get(), held_data);
        // Once: a second load would find its pages taken.
        assert!(matches!(
            pager.load(&f, &data, &held, &packed),
            Err(PagerError::Loaded)
        ));
        pager
            .start_scanning(&DirtyTracker::for_memory(restored.clone()))
            .unwrap();
        for i in 0..PAGES {
            let p = host(&restored, i * PAGE_SIZE);
            for w in 0..(PAGE / 8) as u64 {
                // SAFETY: inside the mapping; the pager serves missing pages.
                let got = unsafe { p.add(w as usize).read_volatile() };
                assert_eq!(got, expected(i, w), "page {i} word {w} after the load");
            }
        }
        // Counted just after the faulting read is woken.
        wait_for("every held page to be counted back", || {
            counters.pages_restored.get() >= held_data
        });
        drop(pager);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn adopted_pages_go_to_the_pool_in_either_codec_and_replace_what_was_in_ram() {
        const PAGES: u64 = 8;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (PAGES * PAGE_SIZE) as usize)])
            .unwrap();
        let page = |i: u64| -> Vec<u8> {
            (0..(PAGE / 8) as u64)
                .flat_map(|w| expected(i, w).to_le_bytes())
                .collect()
        };
        // Noise then zeros: compresses, but not to 3/4 of a page.
        let mostly_noise = {
            let mut p = page(3);
            p[PAGE * 7 / 8..].fill(0);
            p
        };
        // Page 2 is in RAM with stale bytes: the packed copy is newer.
        mem.write_slice(&[0xee; PAGE], GuestAddress(2 * PAGE_SIZE))
            .unwrap();
        let counters = Arc::new(PagerCounters::default());
        let policy = MemoryCompression {
            idle_ms: None,
            rss_mib: None,
            algo: CompressionAlgo::Lz4,
        };
        let mut pager = Pager::new(policy, &mem, counters.clone()).unwrap();
        let mut unpacker = Unpacker::default();
        let mut zstd = Encoder::new(CompressionAlgo::Zstd).unwrap();
        let lz4 = |p: &[u8]| lz4_flex::block::compress(p);
        let packed = vec![
            // Text in this pool's codec, text in the other (recompressed),
            // noise (kept in RAM, as it does not compress enough).
            unpacker
                .check(PAGE_SIZE, CompressionAlgo::Lz4, &lz4(&page(2)))
                .unwrap(),
            unpacker
                .check(
                    2 * PAGE_SIZE,
                    CompressionAlgo::Zstd,
                    &zstd.compress(&page(6)).unwrap(),
                )
                .unwrap(),
            unpacker
                .check(3 * PAGE_SIZE, CompressionAlgo::Lz4, &lz4(&mostly_noise))
                .unwrap(),
        ];
        assert!(unpacker.check(0, CompressionAlgo::Lz4, &[0x10, 1]).is_err());
        assert_eq!(pager.adopt(packed).unwrap(), 2);
        assert_eq!(counters.pages_held.get(), 2);
        pager
            .start_scanning(&DirtyTracker::for_memory(mem.clone()))
            .unwrap();
        let mut got = vec![0u8; PAGE];
        for (i, want) in [(1, page(2)), (2, page(6)), (3, mostly_noise)] {
            mem.read_slice(&mut got, GuestAddress(i * PAGE_SIZE))
                .unwrap();
            assert!(got == want, "page {i}");
        }
        wait_for("both held pages to be counted back", || {
            counters.pages_restored.get() == 2
        });
    }
}
