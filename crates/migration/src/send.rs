//! The source side: pre-copy rounds over the dirty log until what is left to
//! send fits the downtime target, then the VM paused, the last pages and its
//! state sent, and the VM ended here once the destination runs it.
//!
//! Round 0 sends every page that is not all zeros (the destination's memory
//! starts zeroed). Each later round sends the pages written since the previous
//! one (a page that became all zeros as a `Zeros` entry). Before a round, the
//! time its pages would take at the measured bandwidth is the predicted
//! downtime: when it fits the target (or the rounds run out), the VM is paused
//! and that round is the last. When the guest dirties memory faster than half
//! the link carries, auto-converge holds the vCPUs paused for a growing share of
//! each 100 ms (20% more each round, at most 95%: a guest that dirties twice
//! what the link carries needs more than 80% to converge).
//!
//! Post-copy ([`MigrationMethod::Postcopy`] at once, [`MigrationMethod::Auto`] when pre-copy
//! does not converge: the rounds run out, or two rounds at the most throttle
//! still predict too long a pause): the VM pauses, its state and the list of
//! pages not yet sent go, and it runs at the destination while its pages follow
//! (`crate::postcopy`).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vigil_seccomp::ThreadKind;

use serde::Serialize;
use vigil_model::config::CompressionAlgo;
use vigil_model::migration::MigrationMethod;
use vigil_vmm::pager::MemoryReader;
use vigil_vmm::snapshot::{memory_ranges, SnapshotError};
use vigil_vmm::{ControlError, DirtyLog, DirtyLogError, VmControl, VmInspect};

use crate::target::{Stream, Target};
use crate::tls::ClientTls;
use crate::wire::{self, Kind, WireError, PAGE};

/// What to migrate where, and how.
#[derive(Clone, Debug)]
pub struct MigrationRequest {
    pub destination: Target,
    /// The destination's one-time token.
    pub token: String,
    /// The longest the VM may be paused at the end (predicted).
    pub downtime: Duration,
    /// Bytes per second at most; `None`: as fast as the link goes.
    pub bandwidth: Option<u64>,
    /// Pre-copy rounds at most before the VM is paused whatever is left.
    pub max_rounds: u32,
    /// Throttle the vCPUs when the guest dirties memory faster than it is sent.
    pub auto_converge: bool,
    pub method: MigrationMethod,
    /// Over TLS, checking the destination's certificate.
    pub tls: Option<ClientTls>,
}

/// Default downtime target.
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(100);
/// Default round limit.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;

/// Where a migration stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Idle,
    Connecting,
    Precopy,
    Stopped,
    /// The VM runs at the destination; its remaining pages follow.
    Postcopy,
    Completed,
    Failed,
    Cancelled,
}

/// Progress, as `GET /vigil/migration` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationStatus {
    pub state: Phase,
    pub destination: String,
    pub round: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    /// Pages sent as all zeros (no data).
    pub zero_pages: u64,
    /// Pages sent as the source's memory-compression pager holds them,
    /// compressed (also counted in `pages_sent`).
    pub packed_pages: u64,
    /// Dirty bytes at the last round's start.
    pub remaining_bytes: u64,
    pub dirty_rate_bytes_per_s: u64,
    pub bandwidth_bytes_per_s: u64,
    pub predicted_downtime_ms: u64,
    /// Share of time auto-converge holds the vCPUs paused.
    pub throttle_percent: u32,
    /// The method asked for; `postcopy` once a migration switched to it.
    pub method: MigrationMethod,
    /// Post-copy: pages the destination asked for when its VM touched them.
    pub requested_pages: u64,
    /// From the pause to the destination's confirmation (source's clock).
    pub downtime_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub error: Option<String>,
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("the destination refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
    #[error("cannot read guest memory at {0:#x}")]
    Memory(u64),
    #[error("cancelled")]
    Cancelled,
    #[error("the destination did not confirm it runs the VM ({0}); the VM is kept here, paused, since it may run there: check the destination before resuming it")]
    Unconfirmed(String),
    #[error("a migration is already under way")]
    Busy,
    #[error("post-copy failed after the VM started at the destination ({0}); the copy kept here, paused, is stale: the destination's VM is lost with it")]
    PostcopyLost(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Migrates one VM, at most one migration at a time.
pub struct Migrator {
    pub(crate) control: VmControl,
    pub(crate) inspect: VmInspect,
    status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Migrator {
    pub fn new(control: VmControl, inspect: VmInspect) -> Arc<Self> {
        Arc::new(Self {
            control,
            inspect,
            status: Arc::default(),
            cancel: Arc::default(),
            thread: Mutex::new(None),
        })
    }

    /// Starts migrating in the background; [`Migrator::status`] follows it.
    pub fn start(self: &Arc<Self>, request: MigrationRequest) -> Result<(), MigrationError> {
        let mut thread = lock(&self.thread);
        if thread.as_ref().is_some_and(|t| !t.is_finished()) {
            return Err(MigrationError::Busy);
        }
        self.cancel.store(false, Ordering::Release);
        *lock(&self.status) = MigrationStatus {
            state: Phase::Connecting,
            destination: request.destination.to_string(),
            method: request.method,
            ..Default::default()
        };
        let me = self.clone();
        *thread = Some(
            std::thread::Builder::new()
                .name("migration".into())
                .spawn(move || {
                    vigil_seccomp::confine(ThreadKind::Migration);
                    if let Err(e) = me.run(&request) {
                        tracing::error!(destination = %request.destination, "migration failed: {e}");
                    }
                })
                .map_err(|e| MigrationError::Connect {
                    target: "a migration thread".into(),
                    source: e,
                })?,
        );
        Ok(())
    }

    /// Where the current (or last) migration stands.
    pub fn status(&self) -> MigrationStatus {
        lock(&self.status).clone()
    }

    /// Asks the migration under way to stop; false when none is. A migration
    /// whose destination already took over is not undone.
    pub fn cancel(&self) -> bool {
        let under_way = lock(&self.thread)
            .as_ref()
            .is_some_and(|t| !t.is_finished());
        self.cancel.store(true, Ordering::Release);
        under_way
    }

    /// Migrates now, on this thread; the status says how it ended.
    pub fn run(&self, request: &MigrationRequest) -> Result<(), MigrationError> {
        let started = Instant::now();
        let result = self.migrate(request, started);
        let mut status = lock(&self.status);
        status.total_ms = Some(started.elapsed().as_millis() as u64);
        match &result {
            Ok(()) => status.state = Phase::Completed,
            Err(MigrationError::Cancelled) => status.state = Phase::Cancelled,
            Err(e) => {
                status.state = Phase::Failed;
                status.error = Some(e.to_string());
            }
        }
        result
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut lock(&self.status));
    }

    fn migrate(&self, request: &MigrationRequest, started: Instant) -> Result<(), MigrationError> {
        let target = request.destination.to_string();
        let mut stream = request
            .destination
            .connect(request.tls.as_ref())
            .map_err(|source| MigrationError::Connect {
                target: target.clone(),
                source,
            })?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(WireError::Io)?;
        wire::write(&mut stream, Kind::Hello, &wire::hello(&request.token))?;
        wire::read_answer(&mut stream)?.map_err(MigrationError::Refused)?;
        // Pages the pager holds are read from its pool, not put back in RAM.
        let mem = self.inspect.memory_reader();
        let begin = serde_json::to_vec(&memory_ranges(mem.memory())).unwrap_or_default();
        let mut out = Out {
            stream: &mut stream,
            limit: request.bandwidth,
            paced_from: (Instant::now(), 0),
            sent: 0,
            cancel: &self.cancel,
        };
        out.frame(Kind::Begin, &begin)?;
        self.update(|s| s.state = Phase::Precopy);

        let reader = self.inspect.dirty_log().subscribe()?;
        let mut log = reader.take()?;
        // Round 0 need not read what the host never backed: in anonymous memory
        // that is zeros, which the destination starts with.
        if self.inspect.memory_is_anonymous() {
            match DirtyLog::backed(mem.memory()) {
                Ok(backed) => log = backed,
                Err(e) => {
                    tracing::debug!("/proc/self/pagemap unreadable, round 0 reads every page: {e}")
                }
            }
        }
        let postcopy = request.method == MigrationMethod::Postcopy
            || self.precopy(request, &mut out, &mem, &reader, &mut log)?;

        // The last round, with the VM paused, goes as fast as the link does: the
        // limit protects the link while the guest runs, not the guest's pause.
        out.pace(None);
        let paused_at = Instant::now();
        self.control.pause()?;
        self.update(|s| s.state = Phase::Stopped);
        if postcopy {
            self.update(|s| s.method = MigrationMethod::Postcopy);
            let times = (started, paused_at);
            return crate::postcopy::send(self, &mut out, request, &reader, &log, times);
        }
        let result = self.stop_and_copy(&mut out, &reader, &log);
        let confirmed = match result {
            Ok(()) => {
                wire::write(out.stream, Kind::Commit, &[])?;
                match wire::expect(out.stream, Kind::Running) {
                    Ok(_) => Ok(()),
                    Err(e) => return Err(MigrationError::Unconfirmed(e.to_string())),
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = confirmed {
            return Err(self.keep_vm(out.stream, e));
        }
        let downtime = paused_at.elapsed();
        self.update(|s| {
            s.downtime_ms = Some(downtime.as_millis() as u64);
            s.bytes_sent = out.sent;
        });
        tracing::info!(
            destination = %target,
            ?downtime,
            total = ?started.elapsed(),
            bytes = out.sent,
            "migrated"
        );
        self.control.end_migrated(target);
        Ok(())
    }

    /// After a failure before the source committed: nothing ran at the
    /// destination, so the VM goes on here; the destination hears why.
    pub(crate) fn keep_vm(
        &self,
        stream: &mut Box<dyn Stream>,
        e: MigrationError,
    ) -> MigrationError {
        if let Err(r) = self.control.resume() {
            tracing::error!("after a failed migration, resuming the VM: {r}");
        }
        if !matches!(e, MigrationError::Cancelled) {
            let _ = wire::write(stream, Kind::Cancel, e.to_string().as_bytes());
        }
        e
    }

    /// Pre-copy rounds until what is left fits the downtime target (false) or
    /// post-copy should take over (true; only with [`MigrationMethod::Auto`]). `log`
    /// starts as round 0's pages and ends as those still to send.
    fn precopy(
        &self,
        request: &MigrationRequest,
        out: &mut Out<'_>,
        mem: &MemoryReader,
        reader: &vigil_vmm::DirtyReader,
        log: &mut DirtyLog,
    ) -> Result<bool, MigrationError> {
        let auto = request.method == MigrationMethod::Auto;
        let mut last_take = Instant::now();
        let mut throttle: Option<Throttle> = None;
        let mut rounds_at_most = 0;
        let mut round = 0u32;
        loop {
            let (t0, b0) = (Instant::now(), out.sent);
            let counts = send_pages(out, mem, log.dirty_pages(), round == 0, true)?;
            let took = t0.elapsed().as_secs_f64().max(1e-6);
            let bandwidth = ((out.sent - b0) as f64 / took).max(1.0);
            round += 1;
            *log = reader.take()?;
            let interval = last_take.elapsed().as_secs_f64().max(1e-6);
            last_take = Instant::now();
            let dirty_bytes = log.count() as u64 * PAGE as u64;
            let dirty_rate = dirty_bytes as f64 / interval;
            let predicted = Duration::from_secs_f64(dirty_bytes as f64 / bandwidth);
            self.update(|s| {
                s.round = round;
                s.bytes_sent = out.sent;
                s.pages_sent += counts.pages;
                s.zero_pages += counts.zeros;
                s.packed_pages += counts.packed;
                s.remaining_bytes = dirty_bytes;
                s.dirty_rate_bytes_per_s = dirty_rate as u64;
                s.bandwidth_bytes_per_s = bandwidth as u64;
                s.predicted_downtime_ms = predicted.as_millis() as u64;
            });
            tracing::info!(
                round,
                dirty_bytes,
                dirty_rate,
                bandwidth,
                ?predicted,
                "pre-copy round"
            );
            if predicted <= request.downtime {
                return Ok(false);
            }
            if round >= request.max_rounds || rounds_at_most >= 2 {
                return Ok(auto);
            }
            if request.auto_converge && round >= 2 && dirty_rate > bandwidth / 2.0 {
                let t = throttle.get_or_insert_with(|| Throttle::start(self.control.clone()));
                let percent = t.raise();
                if percent == MAX_THROTTLE && auto {
                    rounds_at_most += 1;
                }
                self.update(|s| s.throttle_percent = percent);
            }
        }
    }

    /// With the VM paused: the pages of the last round and those written since,
    /// then the state, and the destination's word that it built the VM.
    fn stop_and_copy(
        &self,
        out: &mut Out<'_>,
        reader: &vigil_vmm::DirtyReader,
        pending: &DirtyLog,
    ) -> Result<(), MigrationError> {
        let (mut state, counts) = self.control.capture(|mem, _| {
            // Infallible for the capture: what failed here is the migration's.
            Ok(
                send_pages(out, mem, pending.dirty_pages(), false, true).and_then(|a| {
                    let last = reader.take()?;
                    let b = send_pages(out, mem, last.dirty_pages(), false, true)?;
                    Ok(Counts {
                        pages: a.pages + b.pages,
                        zeros: a.zeros + b.zeros,
                        packed: a.packed + b.packed,
                    })
                }),
            )
        })?;
        let counts = counts?;
        self.update(|s| {
            s.pages_sent += counts.pages;
            s.zero_pages += counts.zeros;
            s.packed_pages += counts.packed;
        });
        // The destination knows the held pages with data from their Packed
        // frames; those of zeros never came, and are zeros there.
        state.memory_held = Default::default();
        let state = serde_json::to_vec(&state).map_err(|e| WireError::Payload {
            kind: Kind::State,
            why: format!("cannot encode the state: {e}"),
        })?;
        out.frame(Kind::State, &state)?;
        wire::read_answer(out.stream)?.map_err(MigrationError::Refused)?;
        Ok(())
    }
}

/// The stream, paced to the bandwidth limit, counting bytes, watching for a
/// cancel.
pub(crate) struct Out<'a> {
    pub(crate) stream: &'a mut Box<dyn Stream>,
    limit: Option<u64>,
    /// Since when, and from which byte count, the limit is kept.
    paced_from: (Instant, u64),
    pub(crate) sent: u64,
    pub(crate) cancel: &'a AtomicBool,
}

impl Out<'_> {
    /// Keeps to `limit` bytes a second from now on (`None`: no limit).
    pub(crate) fn pace(&mut self, limit: Option<u64>) {
        self.limit = limit;
        self.paced_from = (Instant::now(), self.sent);
    }

    /// Runs `f` without waiting for the limit (pages a running guest waits
    /// for); the bytes still count toward it.
    pub(crate) fn urgently<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let limit = self.limit.take();
        let r = f(self);
        self.limit = limit;
        r
    }

    pub(crate) fn frame(&mut self, kind: Kind, payload: &[u8]) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::Acquire) {
            return Err(MigrationError::Cancelled);
        }
        wire::write(self.stream, kind, payload)?;
        self.sent += payload.len() as u64 + 9;
        if let Some(limit) = self.limit.filter(|&l| l > 0) {
            let (since, base) = self.paced_from;
            let due = Duration::from_secs_f64((self.sent - base) as f64 / limit as f64);
            if let Some(wait) = due.checked_sub(since.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Default)]
pub(crate) struct Counts {
    pub(crate) pages: u64,
    pub(crate) zeros: u64,
    pub(crate) packed: u64,
}

/// Pages in one `Pages` frame at most.
pub(crate) const RUN: usize = 256;
/// Addresses in one `Zeros` (or `Pending`) frame at most.
pub(crate) const ZEROS: usize = 8192;

/// Sends `pages` (ascending addresses): runs of pages with data as `Pages`,
/// pages of zeros as `Zeros` (or not at all with `skip_zeros`: the
/// destination's memory starts zeroed), and with `pack`, pages the pager
/// holds as `Packed` (compressed as its pool keeps them; not in post-copy,
/// whose destination takes whole pages only).
pub(crate) fn send_pages(
    out: &mut Out<'_>,
    mem: &MemoryReader,
    pages: impl Iterator<Item = u64>,
    skip_zeros: bool,
    pack: bool,
) -> Result<Counts, MigrationError> {
    let mut counts = Counts::default();
    let mut run: Vec<u8> = Vec::with_capacity(8 + RUN * PAGE);
    let mut zeros: Vec<u8> = Vec::new();
    let mut packed: Vec<u8> = Vec::new();
    // Contiguous dirty pages are read from guest memory in one copy.
    let mut span = vec![0u8; RUN * PAGE];
    let mut pages = pages.peekable();
    while let Some(first) = pages.next() {
        let mut len = 1usize;
        while len < RUN && pages.peek() == Some(&(first + (len * PAGE) as u64)) {
            pages.next();
            len += 1;
        }
        let span = &mut span[..len * PAGE];
        let mut held: Vec<(usize, CompressionAlgo, Vec<u8>)> = Vec::new();
        let read = if pack {
            mem.read_packed(first, span, &mut |k, algo, data| {
                held.push((k, algo, data.to_vec()))
            })
        } else {
            mem.read(first, span)
        };
        read.map_err(|_| MigrationError::Memory(first))?;
        let mut is_held = [false; RUN];
        for (k, algo, data) in held {
            is_held[k] = true;
            let codec = wire::codec_byte(algo);
            if packed.first().is_some_and(|&c| c != codec)
                || packed.len() + 10 + data.len() > wire::MAX_PAYLOAD
            {
                out.frame(Kind::Packed, &packed)?;
                packed.clear();
            }
            if packed.is_empty() {
                packed.push(codec);
            }
            packed.extend_from_slice(&(first + (k * PAGE) as u64).to_le_bytes());
            packed.extend_from_slice(&(data.len() as u16).to_le_bytes());
            packed.extend_from_slice(&data);
            counts.pages += 1;
            counts.packed += 1;
        }
        for (i, page) in span.chunks_exact(PAGE).enumerate() {
            let gpa = first + (i * PAGE) as u64;
            if is_held[i] || is_zero(page) {
                if !is_held[i] && !skip_zeros {
                    zeros.extend_from_slice(&gpa.to_le_bytes());
                    counts.zeros += 1;
                    if zeros.len() >= ZEROS * 8 {
                        out.frame(Kind::Zeros, &zeros)?;
                        zeros.clear();
                    }
                }
                // A held page or a page of zeros ends a run of pages with data.
                if run.len() > 8 {
                    out.frame(Kind::Pages, &run)?;
                }
                run.clear();
                continue;
            }
            if run.is_empty() {
                run.extend_from_slice(&gpa.to_le_bytes());
            }
            run.extend_from_slice(page);
            counts.pages += 1;
        }
        // Runs do not cross spans: the next span is not contiguous, or is full.
        if run.len() > 8 {
            out.frame(Kind::Pages, &run)?;
        }
        run.clear();
    }
    for (kind, frame) in [(Kind::Zeros, &zeros), (Kind::Packed, &packed)] {
        if !frame.is_empty() {
            out.frame(kind, frame)?;
        }
    }
    Ok(counts)
}

/// Whether a page is all zeros, 16 bytes at a time.
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
}

/// The largest share of each 100 ms auto-converge holds the vCPUs paused.
const MAX_THROTTLE: u32 = 95;

/// Auto-converge: a thread that holds the vCPUs paused for `percent` of every
/// 100 ms. Dropping it stops it with the VM running.
struct Throttle {
    percent: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    fn start(control: VmControl) -> Self {
        let percent = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (percent.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("auto-converge".into())
            .spawn(move || {
                vigil_seccomp::confine(ThreadKind::Migration);
                while !s.load(Ordering::Acquire) {
                    let held = u64::from(p.load(Ordering::Acquire).min(MAX_THROTTLE));
                    if held > 0 && control.pause().is_ok() {
                        std::thread::sleep(Duration::from_millis(held));
                        let _ = control.resume();
                    }
                    std::thread::sleep(Duration::from_millis(100 - held));
                }
            })
            .ok();
        Self {
            percent,
            stop,
            thread,
        }
    }

    /// 20 points more, at most [`MAX_THROTTLE`]; the new share.
    fn raise(&self) -> u32 {
        let now = (self.percent.load(Ordering::Acquire) + 20).min(MAX_THROTTLE);
        self.percent.store(now, Ordering::Release);
        now
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
