//! The destination side: waits for a source holding the token, takes guest
//! memory page by page and the VM's state, builds the VM paused, and runs it
//! once the source has committed (stopped its own for good). An attempt that
//! fails (a wrong token, a corrupt or cut stream, a state that does not build)
//! is answered and dropped, and the destination waits for the next: the
//! source, which never stopped its VM, is unharmed.

use std::collections::BTreeMap;
use std::time::Duration;

use vigil_model::config::{ConsoleConfig, HostLimits, OnCrash};
use vigil_vmm::builder::{self, BuildError};
use vigil_vmm::pager::{PackedPage, Pager, Unpacker};
use vigil_vmm::snapshot::{check_memory, MemoryRange, VmState};
use vigil_vmm::{ControlError, GuestMemoryMmap, MemoryOrigin, RunningVm};
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
    #[error("the source sends memory after the VM runs (post-copy), which this destination's --memory-compression cannot page: migrate with \"method\": \"precopy\"")]
    Postcopy,
    #[error("cannot start the VM's threads: {0}")]
    Threads(std::io::Error),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Accepts sources on `listener` until one brings a VM that runs here; returns
/// it running, its devices rewritten by `overrides` as a snapshot load's are
/// (the MMDS store its interfaces reach). `on_failed_attempt` hears of every
/// attempt that failed. Ends
/// with `Interrupted` once `stop` says so while no source is connected.
pub fn receive(
    listener: &Listener,
    token: &str,
    overrides: &builder::RestoreOptions,
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
        match attempt(&mut stream, token, overrides, console, on_crash) {
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

/// What a source sent before its VM is built here.
pub struct Received {
    pub state: VmState,
    /// Guest RAM as the pages came (zeros where none did).
    pub mem: GuestMemoryMmap,
    /// Pages the source will send after the VM runs here (post-copy).
    pub pending: PageSet,
    /// Pages that came as the source's pager held them (`Packed`), checked,
    /// by address; not in `mem`.
    pub packed: Vec<PackedPage>,
}

/// An attempt up to the VM's build: the source's `Hello` checked (protocol
/// version, `token`) and answered, then its guest memory (`Begin`, `Pages`,
/// `Zeros`, `Pending`) and the VM's state. Every frame is checked before
/// anything is done with it; the first that fails ends the attempt.
pub fn receive_state(stream: &mut dyn Stream, token: &str) -> Result<Received, ReceiveError> {
    let mut stream = stream;
    let hello = wire::expect(&mut stream, Kind::Hello)?;
    let (version, theirs) = wire::parse_hello(&hello)?;
    if version != wire::VERSION {
        return Err(ReceiveError::Version(version));
    }
    if !same_token(theirs, token.as_bytes()) {
        return Err(ReceiveError::Token);
    }
    wire::answer(&mut stream, true, "")?;

    let begin = wire::expect(&mut stream, Kind::Begin)?;
    let ranges: Vec<MemoryRange> =
        serde_json::from_slice(&begin).map_err(|e| ReceiveError::Begin(e.to_string()))?;
    let total = check_memory(&ranges).map_err(ReceiveError::Begin)?;
    let host = HostLimits::read(0).host_memory_bytes;
    if total == 0 || total > host {
        return Err(ReceiveError::Begin(format!(
            "{total} bytes of guest memory; this host has {host}"
        )));
    }
    let mem = builder::memory_for(&ranges)?;
    let pending = PageSet::new(&ranges);
    let mut packed: BTreeMap<u64, PackedPage> = BTreeMap::new();
    let mut unpacker = Unpacker::default();
    loop {
        let frame = wire::read(&mut stream)?;
        match frame.kind {
            Kind::Pages => {
                let bad = |why: &str| ReceiveError::Frame {
                    kind: Kind::Pages,
                    why: why.into(),
                };
                let (gpa, data) = wire::pages(&frame.payload)
                    .ok_or_else(|| bad("not whole pages at a page boundary"))?;
                mem.write_slice(data, GuestAddress(gpa))
                    .map_err(|_| bad(&format!("{gpa:#x}+{:#x} is not guest RAM", data.len())))?;
                // Those of these pages that came packed before are stale.
                let stale: Vec<u64> = packed
                    .range(gpa..gpa + data.len() as u64)
                    .map(|(&p, _)| p)
                    .collect();
                for p in stale {
                    packed.remove(&p);
                }
            }
            Kind::Packed => {
                let bad = |why: String| ReceiveError::Frame {
                    kind: Kind::Packed,
                    why,
                };
                let (algo, pages) = wire::packed(&frame.payload).ok_or_else(|| {
                    bad("not a codec and compressed pages at page boundaries".into())
                })?;
                for (gpa, data) in pages {
                    if !pending.covers(gpa) {
                        return Err(bad(format!("{gpa:#x} is not a page of guest RAM")));
                    }
                    let page = unpacker
                        .check(gpa, algo, data)
                        .map_err(|e| bad(format!("page {gpa:#x}: {e}")))?;
                    packed.insert(gpa, page);
                }
            }
            Kind::Zeros => {
                let zero = [0u8; PAGE];
                let pages = wire::addresses(&frame.payload).ok_or_else(|| ReceiveError::Frame {
                    kind: Kind::Zeros,
                    why: "not a list of pages".into(),
                })?;
                for gpa in pages {
                    packed.remove(&gpa);
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
                return Ok(Received {
                    state,
                    mem,
                    pending,
                    packed: packed.into_values().collect(),
                });
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
    }
}

/// Writes pages that came packed into guest memory (a destination without
/// the pager).
fn unpack_into(mem: &GuestMemoryMmap, packed: Vec<PackedPage>) -> Result<(), ReceiveError> {
    let mut unpacker = Unpacker::default();
    let mut page = vec![0u8; PAGE];
    for p in packed {
        let bad = |why: String| ReceiveError::Frame {
            kind: Kind::Packed,
            why: format!("page {:#x}: {why}", p.gpa),
        };
        unpacker.unpack(p.algo, &p.data, &mut page).map_err(bad)?;
        mem.write_slice(&page, GuestAddress(p.gpa))
            .map_err(|e| bad(e.to_string()))?;
    }
    Ok(())
}

fn attempt(
    stream: &mut Box<dyn Stream>,
    token: &str,
    overrides: &builder::RestoreOptions,
    console: &ConsoleConfig,
    on_crash: OnCrash,
) -> Result<RunningVm, ReceiveError> {
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(WireError::Io)?;
    let Received {
        mut state,
        mem,
        pending,
        packed,
    } = receive_state(&mut **stream, token)?;
    overrides.apply(&mut state)?;
    // The pages the source's pager held with data came packed: they go to
    // this pager's pool at once (those of zeros never came).
    let pager = match overrides.memory_compression {
        Some(_) if !pending.is_empty() => return Err(ReceiveError::Postcopy),
        Some(config) => {
            let mut pager =
                Pager::new(config, &mem, Default::default()).map_err(BuildError::from)?;
            let held = pager.adopt(packed).map_err(BuildError::from)?;
            tracing::info!(
                pages_held = held,
                "memory compression on for the arriving VM"
            );
            Some(pager)
        }
        None => {
            unpack_into(&mem, packed)?;
            None
        }
    };
    if !pending.is_empty() {
        return crate::postcopy::arrive(stream, state, mem, pending, console, on_crash);
    }
    let origin = MemoryOrigin::Anonymous;
    let vm = builder::restore_with_memory(state, mem, origin, pager, console, on_crash)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read, Write};
    use vigil_model::config::CompressionAlgo;
    use vm_memory::GuestMemoryBackend;

    /// A source's side of the connection played from bytes; answers go nowhere.
    struct Played(Cursor<Vec<u8>>);

    impl Read for Played {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Played {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Stream for Played {
        fn set_read_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
            Ok(())
        }

        fn try_clone(&self) -> std::io::Result<Box<dyn Stream>> {
            Err(std::io::ErrorKind::Unsupported.into())
        }
    }

    /// The token of the fuzz seeds (`vigil_fuzz::MIGRATION_TOKEN`).
    const TOKEN: &str = "fuzz-token";

    /// A fuzz seed of `migration_receive` (made by the fuzz crate's
    /// `examples/seed_corpus.rs` from a real state of the test guest): its
    /// first byte is the fuzz target's own, the rest what a source sends.
    fn seed(bytes: &[u8]) -> Result<Received, ReceiveError> {
        receive_state(&mut Played(Cursor::new(bytes[1..].to_vec())), TOKEN)
    }

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        wire::write(&mut out, kind, payload).unwrap();
        out
    }

    /// `Hello` with the right token, `Begin` with `ranges` (JSON), then `rest`.
    fn begin(ranges: &str, rest: &[u8]) -> Result<Received, ReceiveError> {
        let stream = [
            frame(Kind::Hello, &wire::hello(TOKEN)),
            frame(Kind::Begin, ranges.as_bytes()),
            rest.to_vec(),
        ]
        .concat();
        receive_state(&mut Played(Cursor::new(stream)), TOKEN)
    }

    #[test]
    fn the_fuzz_seeds_arrive_with_their_pages_and_state() {
        let pre = seed(include_bytes!(
            "../../../fuzz/corpus/migration_receive/seed-precopy"
        ))
        .unwrap();
        let mut page = [0u8; PAGE];
        pre.mem.read_slice(&mut page, GuestAddress(0x1000)).unwrap();
        assert!(page.iter().enumerate().all(|(i, &b)| b == i as u8));
        assert!(pre.pending.is_empty());
        assert_eq!(pre.state.vcpus.len(), 1);

        let post = seed(include_bytes!(
            "../../../fuzz/corpus/migration_receive/seed-postcopy"
        ))
        .unwrap();
        assert_eq!(post.pending.runs(), [(0x4000, 2)]);

        let e = seed(include_bytes!(
            "../../../fuzz/corpus/migration_receive/seed-cancelled"
        ))
        .err()
        .unwrap();
        assert!(e.to_string().contains("the source gave up"), "{e}");

        // A page packed as the source's pager held it: kept aside, checked.
        let packed = seed(include_bytes!(
            "../../../fuzz/corpus/migration_receive/seed-packed"
        ))
        .unwrap();
        assert_eq!(packed.packed.len(), 1);
        let p = &packed.packed[0];
        assert_eq!((p.gpa, p.algo), (0x6000, CompressionAlgo::Lz4));
        Unpacker::default()
            .unpack(p.algo, &p.data, &mut page)
            .unwrap();
        assert!(page.iter().all(|&b| b == 7));
    }

    /// A `Packed` page replaces what came of it before and is replaced by
    /// what comes after; one that does not unpack to a page, or lies outside
    /// RAM, ends the attempt naming it.
    #[test]
    fn packed_pages_are_checked_and_the_last_word_on_a_page_wins() {
        // The precopy seed's frames: Hello, Begin (the test guest's RAM),
        // Pages, Zeros, State.
        let bytes = include_bytes!("../../../fuzz/corpus/migration_receive/seed-precopy");
        let mut input = &bytes[1..];
        let mut seed = Vec::new();
        while !input.is_empty() {
            let f = wire::read(&mut input).unwrap();
            seed.push(frame(f.kind, &f.payload));
        }
        let arrive = |middle: &[Vec<u8>]| {
            let stream = [&seed[..2], middle, &seed[4..]].concat().concat();
            receive_state(&mut Played(Cursor::new(stream)), TOKEN)
        };
        let page = |b: u8| vec![b; PAGE];
        let lz4 = |gpa: u64, data: &[u8]| {
            let block = lz4_flex::block::compress(data);
            [
                vec![wire::codec_byte(CompressionAlgo::Lz4)],
                gpa.to_le_bytes().to_vec(),
                (block.len() as u16).to_le_bytes().to_vec(),
                block,
            ]
            .concat()
        };
        let pages = |gpa: u64, data: &[u8]| [&gpa.to_le_bytes()[..], data].concat();
        // Page 1 raw then packed: packed. Page 2 packed then raw, page 3
        // packed then zeros: not.
        let r = arrive(&[
            frame(Kind::Pages, &pages(0x1000, &page(1))),
            frame(Kind::Packed, &lz4(0x1000, &page(2))),
            frame(Kind::Packed, &lz4(0x2000, &page(3))),
            frame(Kind::Pages, &pages(0x2000, &page(4))),
            frame(Kind::Packed, &lz4(0x3000, &page(5))),
            frame(Kind::Zeros, &wire::address_payload(&[0x3000])),
        ])
        .unwrap();
        let kept: Vec<u64> = r.packed.iter().map(|p| p.gpa).collect();
        assert_eq!(kept, [0x1000]);
        let mut out = page(0);
        Unpacker::default()
            .unpack(r.packed[0].algo, &r.packed[0].data, &mut out)
            .unwrap();
        assert_eq!(out, page(2));
        r.mem.read_slice(&mut out, GuestAddress(0x2000)).unwrap();
        assert_eq!(out, page(4));

        let ram = r.mem.last_addr().0 + 1;
        for (bad, words) in [
            (
                lz4(ram, &page(1)),
                format!("{ram:#x} is not a page of guest RAM"),
            ),
            (
                [
                    vec![1],
                    0x1000u64.to_le_bytes().to_vec(),
                    vec![3, 0],
                    vec![9, 9, 9],
                ]
                .concat(),
                "page 0x1000".into(),
            ),
            (vec![9, 0], "not a codec".into()),
        ] {
            let e = arrive(&[frame(Kind::Packed, &bad)]).err().unwrap();
            assert!(
                matches!(
                    e,
                    ReceiveError::Frame {
                        kind: Kind::Packed,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains(&words), "{e}");
        }
    }

    /// Found by fuzzing (migration_receive): RAM ranges whose sizes add up past
    /// 2^64 overflowed the sum checked against the host's memory (a panic), and
    /// a range that is not whole pages passed to the pending-page set, which
    /// then indexed past its end on a `Pending` frame (a panic: the destination
    /// process aborted). Both are refused at `Begin` now, naming the range.
    #[test]
    fn ram_ranges_that_are_not_whole_disjoint_pages_are_refused_at_begin() {
        let pending = frame(Kind::Pending, &wire::address_payload(&[0x1000]));
        for (ranges, words) in [
            (
                r#"[{"guest_address":0,"bytes":18446744073709547520},{"guest_address":0,"bytes":8192}]"#,
                "range 1 (0x0+0x2000): starts below the end of the range before",
            ),
            (
                r#"[{"guest_address":4096,"bytes":100}]"#,
                "range 0 (0x1000+0x64): not whole 4 KiB pages",
            ),
            (
                r#"[{"guest_address":18446744073709547520,"bytes":8192}]"#,
                "ends past the 64-bit address space",
            ),
            (
                r#"[{"guest_address":0,"bytes":0}]"#,
                "not whole 4 KiB pages",
            ),
        ] {
            let e = begin(ranges, &pending).err().unwrap();
            assert!(matches!(e, ReceiveError::Begin(_)), "{ranges}: {e}");
            assert!(e.to_string().contains(words), "{ranges}: {e}");
        }
    }

    #[test]
    fn a_wrong_token_or_version_ends_the_attempt_at_hello() {
        let e = receive_state(
            &mut Played(Cursor::new(frame(Kind::Hello, &wire::hello("guess")))),
            TOKEN,
        )
        .err()
        .unwrap();
        assert!(matches!(e, ReceiveError::Token), "{e}");
        let mut hello = wire::hello(TOKEN);
        hello[8..12].copy_from_slice(&1u32.to_le_bytes());
        let e = receive_state(&mut Played(Cursor::new(frame(Kind::Hello, &hello))), TOKEN)
            .err()
            .unwrap();
        assert!(matches!(e, ReceiveError::Version(1)), "{e}");
    }
}
