//! Post-copy: the VM runs at the destination before all its memory is there.
//!
//! The source, its VM paused, sends the pages still to come (`Pending`) and the
//! state. The destination drops what it holds of those pages, registers guest
//! memory with a userfaultfd (`vigil_vmm::lazy_memory`) and builds the VM: from
//! then on whatever touches a pending page (a vCPU through KVM, a device, the
//! restore itself) waits while a fault thread asks the source for it (`Want`);
//! a page that was never sent and is not pending is zeros, filled at once. Once
//! the source has committed, the VM runs there, and the source pushes every
//! pending page not asked for yet, answering requests first, then `Done`.
//!
//! Until the commit a failure leaves the VM running at the source, as in
//! pre-copy. After it, the VM's memory is split between the two hosts: losing
//! the link loses the VM (the destination stops its VM; the source keeps its
//! paused, stale copy and says so). That is post-copy's price, which
//! [`MigrationMethod::Auto`](vigil_model::migration::MigrationMethod::Auto) pays only when pre-copy cannot converge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vigil_model::config::{ConsoleConfig, OnCrash};
use vigil_vmm::builder;
use vigil_vmm::lazy_memory::LazyMemory;
use vigil_vmm::pager::MemoryReader;
use vigil_vmm::snapshot::{memory_ranges, VmState};
use vigil_vmm::{DirtyLog, DirtyReader, GuestMemoryMmap, MemoryOrigin, RunningVm, VmControl};

use crate::pages::PageSet;
use crate::receive::ReceiveError;
use crate::send::{send_pages, MigrationError, MigrationRequest, Migrator, Out, Phase, RUN, ZEROS};
use crate::target::Stream;
use crate::wire::{self, Kind, WireError, PAGE};

/// How long either side waits for the other's next step.
const WAIT: Duration = Duration::from_secs(60);
/// Recorded as why a VM was stopped.
const SIGTERM: i32 = 15;

/// What the destination says while the source serves it.
enum Heard {
    Want(Vec<u64>),
    Answer(Result<String, String>),
    Running,
    Lost(String),
}

/// Reads the destination's frames on a thread of their own, so that requests
/// are heard while pages go out. It ends with the connection.
fn listen(mut input: Box<dyn Stream>, heard: Sender<Heard>) -> std::io::Result<()> {
    // Requests come when the guest touches a page, which may be never.
    input.set_read_timeout(None)?;
    std::thread::Builder::new()
        .name("migration-in".into())
        .spawn(move || {
            vigil_seccomp::confine(vigil_seccomp::ThreadKind::Migration);
            loop {
                let said = match wire::read(&mut input) {
                    Ok(f) => match f.kind {
                        Kind::Want => wire::addresses(&f.payload).map_or_else(
                            || Heard::Lost("a Want frame that is not a list of pages".into()),
                            Heard::Want,
                        ),
                        Kind::Answer => Heard::Answer(wire::parse_answer(&f.payload)),
                        Kind::Running => Heard::Running,
                        other => Heard::Lost(format!("a {other:?} frame during post-copy")),
                    },
                    Err(e) => Heard::Lost(e.to_string()),
                };
                let end = matches!(said, Heard::Lost(_));
                if heard.send(said).is_err() || end {
                    break;
                }
            }
        })
        .map(drop)
}

/// The source's side, from the pause on (see the module's comment).
pub(crate) fn send(
    m: &Migrator,
    out: &mut Out<'_>,
    request: &MigrationRequest,
    reader: &DirtyReader,
    log: &DirtyLog,
    (started, paused_at): (Instant, Instant),
) -> Result<(), MigrationError> {
    let target = request.destination.to_string();
    let mem = m.inspect.memory_reader();
    let before_commit = |out: &mut Out<'_>, e| Err(m.keep_vm(out.stream, e));
    let captured = m.control.capture(|_, _| {
        Ok(reader.take().map(|last| {
            let mut pending = log.clone();
            pending.merge(&last);
            pending
        }))
    });
    let (mut state, pending) = match captured {
        Ok((state, Ok(pending))) => (state, pending),
        Ok((_, Err(e))) => return before_commit(out, e.into()),
        Err(e) => return before_commit(out, e.into()),
    };
    // Held pages go whole in post-copy: nothing there is held.
    state.memory_held = Default::default();
    let order: Vec<u64> = pending.dirty_pages().collect();
    let to_send = PageSet::new(&memory_ranges(mem.memory()));
    for &gpa in &order {
        to_send.insert(gpa);
    }
    let (tx, heard) = mpsc::channel();
    let switched = (|| {
        for chunk in order.chunks(ZEROS) {
            out.frame(Kind::Pending, &wire::address_payload(chunk))?;
        }
        let state = serde_json::to_vec(&state).map_err(|e| WireError::Payload {
            kind: Kind::State,
            why: format!("cannot encode the state: {e}"),
        })?;
        out.frame(Kind::State, &state)?;
        listen(out.stream.try_clone().map_err(WireError::Io)?, tx).map_err(WireError::Io)?;
        // The destination builds the VM, asking for the pages that takes.
        loop {
            match heard.recv_timeout(WAIT) {
                Ok(Heard::Want(pages)) => serve(m, out, &mem, &to_send, &pages)?,
                Ok(Heard::Answer(Ok(_))) => break,
                Ok(Heard::Answer(Err(why))) => return Err(MigrationError::Refused(why)),
                Ok(Heard::Running) => return Err(unexpected("Running before the commit")),
                Ok(Heard::Lost(why)) => return Err(unexpected(&why)),
                Err(_) => return Err(unexpected("no answer in 60 s")),
            }
        }
        out.frame(Kind::Commit, &[])
    })();
    if let Err(e) = switched {
        return before_commit(out, e);
    }
    // Committed: the VM is the destination's now, whatever happens. It runs
    // again, so the limit that protects the link while it does is back.
    static NEVER: AtomicBool = AtomicBool::new(false);
    out.cancel = &NEVER;
    out.pace(request.bandwidth);
    push(m, out, &mem, &to_send, &order, &heard, paused_at).map_err(|e| {
        let e = MigrationError::PostcopyLost(e.to_string());
        tracing::error!(destination = %target, "{e}");
        e
    })?;
    let status = m.status();
    m.update(|s| s.bytes_sent = out.sent);
    tracing::info!(
        destination = %target,
        downtime = ?Duration::from_millis(status.downtime_ms.unwrap_or_default()),
        total = ?started.elapsed(),
        bytes = out.sent,
        pages = order.len(),
        requested = status.requested_pages,
        "migrated (post-copy)"
    );
    m.control.end_migrated(target);
    Ok(())
}

fn unexpected(why: &str) -> MigrationError {
    MigrationError::Wire(WireError::Payload {
        kind: Kind::Want,
        why: format!("the destination: {why}"),
    })
}

/// Sends the pages of `pages` that are still to send.
fn serve(
    m: &Migrator,
    out: &mut Out<'_>,
    mem: &MemoryReader,
    to_send: &PageSet,
    pages: &[u64],
) -> Result<(), MigrationError> {
    let mut now: Vec<u64> = pages
        .iter()
        .copied()
        .filter(|&p| to_send.remove(p))
        .collect();
    now.sort_unstable();
    let counts = out.urgently(|out| send_pages(out, mem, now.iter().copied(), false, false))?;
    m.update(|s| {
        // Asked for, whether still to send or on the way already.
        s.requested_pages += pages.len() as u64;
        s.pages_sent += counts.pages;
        s.zero_pages += counts.zeros;
    });
    Ok(())
}

/// After the commit: requests first, then the rest in address order from the
/// last page asked for (what a guest touches next is likely near what it just
/// touched), then `Done` and the destination's word that it has every page.
fn push(
    m: &Migrator,
    out: &mut Out<'_>,
    mem: &MemoryReader,
    to_send: &PageSet,
    order: &[u64],
    heard: &Receiver<Heard>,
    paused_at: Instant,
) -> Result<(), MigrationError> {
    let mut running = false;
    let mut done = false;
    let mut next = 0usize;
    loop {
        let said = if running && !done {
            match heard.try_recv() {
                Ok(said) => Some(said),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => return Err(unexpected("gone")),
            }
        } else {
            match heard.recv_timeout(WAIT) {
                Ok(said) => Some(said),
                Err(RecvTimeoutError::Timeout) => return Err(unexpected("no word in 60 s")),
                Err(RecvTimeoutError::Disconnected) => return Err(unexpected("gone")),
            }
        };
        match said {
            Some(Heard::Want(pages)) => {
                serve(m, out, mem, to_send, &pages)?;
                if let Some(&last) = pages.iter().max() {
                    next = order.partition_point(|&gpa| gpa <= last);
                }
            }
            Some(Heard::Running) if !running => {
                running = true;
                let downtime = paused_at.elapsed();
                m.update(|s| {
                    s.state = Phase::Postcopy;
                    s.downtime_ms = Some(downtime.as_millis() as u64);
                });
                tracing::info!(
                    ?downtime,
                    pending = to_send.len(),
                    "the VM runs at the destination; post-copy"
                );
                if order.is_empty() {
                    // Nothing was pending: the destination took it as pre-copy.
                    return Ok(());
                }
            }
            Some(Heard::Answer(Ok(_))) if done => return Ok(()),
            Some(Heard::Answer(Err(why))) => return Err(unexpected(&why)),
            Some(Heard::Lost(why)) => return Err(unexpected(&why)),
            Some(_) => return Err(unexpected("a frame out of order")),
            None => {}
        }
        if running && !done {
            let mut chunk = Vec::with_capacity(RUN);
            while !to_send.is_empty() && chunk.len() < RUN {
                if next >= order.len() {
                    next = 0;
                }
                if to_send.remove(order[next]) {
                    chunk.push(order[next]);
                }
                next += 1;
            }
            // In address order: a wrap-around makes two runs.
            chunk.sort_unstable();
            let counts = send_pages(out, mem, chunk.iter().copied(), false, false)?;
            m.update(|s| {
                s.pages_sent += counts.pages;
                s.zero_pages += counts.zeros;
                s.bytes_sent = out.sent;
                s.remaining_bytes = to_send.len() as u64 * PAGE as u64;
            });
            if to_send.is_empty() {
                out.frame(Kind::Done, &[])?;
                done = true;
            }
        }
    }
}

/// What the destination's threads share.
struct Arrival {
    lazy: Arc<LazyMemory>,
    /// Pages still to come.
    pending: PageSet,
    /// Pages asked for (once each).
    requested: PageSet,
    writer: Mutex<Box<dyn Stream>>,
    /// Set once every page is there, or the source is lost.
    over: AtomicBool,
    control: Mutex<Option<VmControl>>,
}

impl Arrival {
    fn say(&self, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        wire::write(&mut *w, kind, payload)
    }

    fn answer(&self, message: &str) -> Result<(), WireError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        wire::answer(&mut *w, true, message)
    }

    /// The source is gone with pages missing: the VM cannot go on. Faults
    /// waiting are released (onto zeros) so that its threads can end.
    fn lose(&self, why: &str) {
        if self.over.swap(true, Ordering::AcqRel) {
            return;
        }
        let control = self
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(control) = control {
            control.fail(format!(
                "post-copy: the source is lost ({why}) with {} pages of the VM's memory still there; \
                 the VM cannot run without them",
                self.pending.len()
            ));
        }
        if let Err(e) = self.lazy.unregister() {
            tracing::error!("post-copy: {e}");
        }
    }
}

/// What the receiving thread tells the one building the VM.
enum Event {
    Commit,
    Lost(String),
}

/// The destination's side, from the `State` frame on: builds the VM over
/// memory filled on demand and runs it once the source commits.
pub(crate) fn arrive(
    stream: &mut Box<dyn Stream>,
    state: VmState,
    mem: GuestMemoryMmap,
    pending: PageSet,
    console: &ConsoleConfig,
    on_crash: OnCrash,
) -> Result<RunningVm, ReceiveError> {
    let lazy = Arc::new(LazyMemory::register(&mem, false).map_err(lazy_error)?);
    for (gpa, pages) in pending.runs() {
        lazy.drop_pages(gpa, pages * PAGE as u64)
            .map_err(lazy_error)?;
    }
    let ranges = memory_ranges(&mem);
    let arrival = Arc::new(Arrival {
        lazy: lazy.clone(),
        pending,
        requested: PageSet::new(&ranges),
        writer: Mutex::new(stream.try_clone().map_err(WireError::Io)?),
        over: AtomicBool::new(false),
        control: Mutex::new(None),
    });
    let (tx, events) = mpsc::channel();
    let input = stream.try_clone().map_err(WireError::Io)?;
    spawn("migration-in", {
        let a = arrival.clone();
        move || receive_pages(&a, input, &tx)
    })?;
    spawn("migration-faults", {
        let a = arrival.clone();
        move || ask_for_pages(&a)
    })?;

    let fail = |e: ReceiveError| {
        arrival.lose("the attempt failed here");
        e
    };
    let vm = builder::restore_with_memory(
        state,
        mem,
        MemoryOrigin::Lazy(lazy),
        None,
        console,
        on_crash,
    )
    .map_err(|e| fail(e.into()))?;
    vm.start_paused();
    let running = vm.start().map_err(|e| fail(ReceiveError::Threads(e)))?;
    let control = running.control();
    let committed = arrival
        .answer("built")
        .map_err(ReceiveError::from)
        .and_then(|()| match events.recv_timeout(WAIT) {
            Ok(Event::Commit) => Ok(()),
            Ok(Event::Lost(why)) => Err(lost(why)),
            Err(_) => Err(lost("no commit in 60 s".into())),
        });
    if let Err(e) = committed {
        // The source keeps its VM: this one never ran.
        control.stop(SIGTERM);
        arrival.lose("no commit");
        let _ = running.wait();
        return Err(e);
    }
    *arrival.control.lock().unwrap_or_else(|e| e.into_inner()) = Some(control.clone());
    control.resume()?;
    arrival.say(Kind::Running, &[])?;
    tracing::info!(
        pending = arrival.pending.len(),
        "the VM runs here; its remaining pages follow (post-copy)"
    );
    Ok(running)
}

fn lost(why: String) -> ReceiveError {
    ReceiveError::Frame {
        kind: Kind::Commit,
        why: format!("post-copy: {why}"),
    }
}

fn lazy_error(e: vigil_vmm::lazy_memory::LazyMemoryError) -> ReceiveError {
    ReceiveError::Build(e.into())
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), ReceiveError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            vigil_seccomp::confine(vigil_seccomp::ThreadKind::Migration);
            f()
        })
        .map(drop)
        .map_err(ReceiveError::Threads)
}

/// The destination's reading thread: pages in, the commit, the end.
fn receive_pages(a: &Arrival, mut input: Box<dyn Stream>, events: &Sender<Event>) {
    let why = loop {
        let frame = match wire::read(&mut input) {
            Ok(f) => f,
            Err(e) => break e.to_string(),
        };
        let placed = match frame.kind {
            Kind::Pages => place_pages(a, &frame.payload),
            Kind::Zeros => match wire::addresses(&frame.payload) {
                Some(pages) => pages.iter().try_for_each(|&gpa| {
                    a.lazy.zero(gpa).map_err(|e| e.to_string())?;
                    a.pending.remove(gpa);
                    Ok(())
                }),
                None => Err("a Zeros frame that is not a list of pages".into()),
            },
            Kind::Commit => {
                let _ = events.send(Event::Commit);
                Ok(())
            }
            Kind::Done if a.pending.is_empty() => {
                a.over.store(true, Ordering::Release);
                if let Err(e) = a.lazy.unregister() {
                    tracing::warn!("post-copy: {e}");
                }
                let _ = a.answer("every page is here");
                tracing::info!("post-copy: every page is here");
                return;
            }
            Kind::Done => Err(format!("Done with {} pages still missing", a.pending.len())),
            Kind::Cancel => Err(format!(
                "the source gave up: {}",
                String::from_utf8_lossy(&frame.payload)
            )),
            other => Err(format!("a {other:?} frame during post-copy")),
        };
        if let Err(why) = placed {
            break why;
        }
    };
    let _ = events.send(Event::Lost(why.clone()));
    a.lose(&why);
}

/// A `Pages` frame, copied in through the userfaultfd (a write through the
/// mapping would itself fault, waiting on this very thread).
fn place_pages(a: &Arrival, payload: &[u8]) -> Result<(), String> {
    let (gpa, data) =
        wire::pages(payload).ok_or("a Pages frame that is not whole pages at a page boundary")?;
    a.lazy.copy(gpa, data).map_err(|e| e.to_string())?;
    for i in 0..(data.len() / PAGE) as u64 {
        a.pending.remove(gpa + i * PAGE as u64);
    }
    Ok(())
}

/// The destination's fault thread: a touched page still to come is asked for;
/// any other missing page was never sent, so it is zeros.
fn ask_for_pages(a: &Arrival) {
    while !a.over.load(Ordering::Acquire) {
        let faults = match a.lazy.faults(Duration::from_millis(100)) {
            Ok(f) => f,
            Err(e) => {
                a.lose(&e.to_string());
                return;
            }
        };
        let mut want = Vec::new();
        for gpa in faults {
            if a.pending.contains(gpa) {
                if a.requested.insert(gpa) {
                    want.push(gpa);
                }
            } else if let Err(e) = a.lazy.zero(gpa) {
                tracing::error!("post-copy: {e}");
            }
        }
        if !want.is_empty() {
            if let Err(e) = a.say(Kind::Want, &wire::address_payload(&want)) {
                a.lose(&e.to_string());
                return;
            }
        }
    }
}
