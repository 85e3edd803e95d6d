//! The destination side: waits for a source holding the token, takes guest
//! memory page by page and the VM's state, builds the VM paused, and runs it
//! once the source has committed (stopped its own for good). An attempt that
//! fails (a wrong token, a corrupt or cut stream, a state that does not build)
//! is answered and dropped, and the destination waits for the next: the
//! source, which never stopped its VM, is unharmed.

use std::time::Duration;

use vigil_model::config::{ConsoleConfig, HostLimits, OnCrash};
use vigil_vmm::builder::{self, BuildError};
use vigil_vmm::snapshot::{MemoryRange, VmState};
use vigil_vmm::{ControlError, MemoryOrigin, RunningVm};
use vm_memory::{Bytes, GuestAddress};

use crate::pages::PageSet;
use crate::target::{Listener, Stream};
use crate::wire::{self, Kind, WireError, PAGE};

/// Recorded as why a VM that never ran was stopped.
const SIGTERM: i32 = 15;

/// How long one read may wait for the source.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an attempt to receive a VM failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the source speaks protocol version {0}; this Vigil speaks {v}", v = wire::VERSION)]
    Version(u32),
    #[error("the source's token is wrong")]
    Token,
    #[error("Begin: {0}")]
    Begin(String),
    #[error("{kind:?} frame: {why}")]
    Frame { kind: Kind, why: String },
    #[error("state: {field}: {message}")]
    State { field: String, message: String },
    #[error("cannot build the VM: {0}")]
    Build(#[from] BuildError),
    #[error("cannot start the VM's threads: {0}")]
    Threads(std::io::Error),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Accepts sources on `listener` until one brings a VM that runs here; returns
/// it running. `on_failed_attempt` hears of every attempt that failed. Ends
/// with `Interrupted` once `stop` says so while no source is connected.
pub fn receive(
    listener: &Listener,
    token: &str,
    console: &ConsoleConfig,
    on_crash: OnCrash,
    on_failed_attempt: &dyn Fn(&ReceiveError),
    stop: &dyn Fn() -> bool,
) -> std::io::Result<RunningVm> {
    loop {
        let mut stream = match listener.secure(listener.accept(stop)?) {
            Ok(stream) => stream,
            Err(e) => {
                on_failed_attempt(&e.into());
                continue;
            }
        };
        match attempt(&mut stream, token, console, on_crash) {
            Ok(running) => return Ok(running),
            Err(e) => {
                // Tell the source why, when the stream still carries it.
                let _ = wire::answer(&mut stream, false, &e.to_string());
                on_failed_attempt(&e);
            }
        }
    }
}

/// Compares without stopping at the first difference.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn attempt(
    stream: &mut Box<dyn Stream>,
    token: &str,
    console: &ConsoleConfig,
    on_crash: OnCrash,
) -> Result<RunningVm, ReceiveError> {
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(WireError::Io)?;
    let hello = wire::expect(stream, Kind::Hello)?;
    let (version, theirs) = wire::parse_hello(&hello)?;
    if version != wire::VERSION {
        return Err(ReceiveError::Version(version));
    }
    if !same_token(theirs, token.as_bytes()) {
        return Err(ReceiveError::Token);
    }
    wire::answer(stream, true, "")?;

    let begin = wire::expect(stream, Kind::Begin)?;
    let ranges: Vec<MemoryRange> =
        serde_json::from_slice(&begin).map_err(|e| ReceiveError::Begin(e.to_string()))?;
    let total: u64 = ranges.iter().map(|r| r.bytes).sum();
    let host = HostLimits::read(0).host_memory_bytes;
    if total == 0 || total > host {
        return Err(ReceiveError::Begin(format!(
            "{total} bytes of guest memory; this host has {host}"
        )));
    }
    let mem = builder::memory_for(&ranges)?;
    let pending = PageSet::new(&ranges);
    let state = loop {
        let frame = wire::read(stream)?;
        match frame.kind {
            Kind::Pages => {
                let bad = |why: &str| ReceiveError::Frame {
                    kind: Kind::Pages,
                    why: why.into(),
                };
                let (addr, data) = frame
                    .payload
                    .split_at_checked(8)
                    .ok_or_else(|| bad("shorter than its address"))?;
                let gpa = u64::from_le_bytes(addr.try_into().unwrap_or_default());
                if gpa % PAGE as u64 != 0 || data.is_empty() || data.len() % PAGE != 0 {
                    return Err(bad("not whole pages at a page boundary"));
                }
                mem.write_slice(data, GuestAddress(gpa))
                    .map_err(|_| bad(&format!("{gpa:#x}+{:#x} is not guest RAM", data.len())))?;
            }
            Kind::Zeros => {
                let zero = [0u8; PAGE];
                let pages = wire::addresses(&frame.payload).ok_or_else(|| ReceiveError::Frame {
                    kind: Kind::Zeros,
                    why: "not a list of pages".into(),
                })?;
                for gpa in pages {
                    if mem.write_slice(&zero, GuestAddress(gpa)).is_err() {
                        return Err(ReceiveError::Frame {
                            kind: Kind::Zeros,
                            why: format!("{gpa:#x} is not a page of guest RAM"),
                        });
                    }
                }
            }
            Kind::Pending => {
                let pages = wire::addresses(&frame.payload)
                    .filter(|pages| pages.iter().all(|&p| pending.covers(p)))
                    .ok_or_else(|| ReceiveError::Frame {
                        kind: Kind::Pending,
                        why: "not a list of pages of guest RAM".into(),
                    })?;
                for p in pages {
                    pending.insert(p);
                }
            }
            Kind::State => {
                let de = &mut serde_json::Deserializer::from_slice(&frame.payload);
                let state: VmState =
                    serde_path_to_error::deserialize(de).map_err(|e| ReceiveError::State {
                        field: e.path().to_string(),
                        message: e.inner().to_string(),
                    })?;
                break state;
            }
            Kind::Cancel => {
                return Err(ReceiveError::Frame {
                    kind: Kind::Cancel,
                    why: format!(
                        "the source gave up: {}",
                        String::from_utf8_lossy(&frame.payload)
                    ),
                })
            }
            other => {
                return Err(ReceiveError::Frame {
                    kind: other,
                    why: "not expected while memory arrives".into(),
                })
            }
        }
    };

    if !pending.is_empty() {
        return crate::postcopy::arrive(stream, state, mem, pending, console, on_crash);
    }
    let vm = builder::restore_with_memory(state, mem, MemoryOrigin::Anonymous, console, on_crash)?;
    vm.start_paused();
    let running = vm.start().map_err(ReceiveError::Threads)?;
    let control = running.control();
    let committed = wire::answer(stream, true, "built")
        .and_then(|()| wire::expect(stream, Kind::Commit).map(drop));
    if let Err(e) = committed {
        // The source keeps its VM: this one never ran.
        control.stop(SIGTERM);
        let _ = running.wait();
        return Err(e.into());
    }
    control.resume()?;
    wire::write(stream, Kind::Running, &[])?;
    Ok(running)
}
