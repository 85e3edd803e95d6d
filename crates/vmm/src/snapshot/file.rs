//! The two files of a snapshot.
//!
//! The state file: a 32-byte header, then the [`VmState`] as JSON (self-describing,
//! so that a state struct may gain `#[serde(default)]` fields, see
//! `vigil_devices::persist`; [`VmState::extensions`] is one, left out when
//! empty, so a file without it still loads and one with none is as before):
//!
//! | bytes | what |
//! |---|---|
//! | 0..8 | `VIGILSNP` |
//! | 8..12 | format version, u32 little-endian ([`FORMAT_VERSION`]) |
//! | 12..16 | zero |
//! | 16..24 | length of the state in bytes, u64 little-endian |
//! | 24..32 | CRC-64/XZ of the state, u64 little-endian |
//!
//! The memory file: guest RAM, the ranges of [`VmState::memory`] one after the
//! other. A full one ([`MemoryKind::Full`]) leaves pages of zeros as holes (the
//! file is sparse); a diff ([`MemoryKind::Diff`]) holds only the pages written
//! since the VM's previous snapshot, every other page a hole, and is merged onto
//! that snapshot's memory file ([`merge_memory`]) before it is loaded.
//!
//! Both are written to a temporary name beside the target and renamed over it
//! once complete and synced, so that a failure (a full disk) leaves whatever was
//! at the path before.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crc::{Crc, CRC_64_XZ};
use vigil_model::config::CompressionAlgo;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::packed::{self, PackedEntry, SectionWriter};
#[cfg(doc)]
use super::state::MemoryKind;
use super::state::{check_memory, MemoryRange, VmState};
use crate::dirty_log::DirtyLog;
use crate::pager::MemoryReader;
use crate::GuestMemoryMmap;

/// What the state file starts with.
pub const MAGIC: &[u8; 8] = b"VIGILSNP";
/// The format this Vigil writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
/// A state is some KiB per vCPU and device; anything larger is not one of ours.
const MAX_STATE_BYTES: u64 = 64 << 20;
const CHECKSUM: Crc<u64> = Crc::<u64>::new(&CRC_64_XZ);
/// Guest memory is copied out this much at a time.
const CHUNK: usize = 1 << 20;
const PAGE: usize = 4096;

/// Why a snapshot file cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: not a Vigil snapshot (it does not start with VIGILSNP)")]
    NotASnapshot { path: PathBuf },
    #[error(
        "{path}: snapshot format version {found}; this Vigil reads version {FORMAT_VERSION} only"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: the header says {said} bytes of state, {}", if *.said > MAX_STATE_BYTES { format!("more than the {MAX_STATE_BYTES} a snapshot can have") } else { format!("but the file holds {found}") })]
    Length {
        path: PathBuf,
        said: u64,
        found: u64,
    },
    #[error("{path}: the state's checksum is {found:#018x}, the header says {expected:#018x}: the file is corrupt")]
    Checksum {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: state: {field}: {message}")]
    State {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: the file system kept {data} bytes of data where {written} bytes were written: a diff memory file needs holes exactly where nothing was written (4 KiB blocks, no hole punching of zeros); write it to another file system (ext4, XFS, tmpfs)")]
    Holes {
        path: PathBuf,
        written: u64,
        data: u64,
    },
    #[error("{base}: {base_bytes} bytes, but the diff {diff} is {diff_bytes} bytes: a diff merges only onto the memory file of the same VM's previous snapshot, which has its size")]
    MergeSize {
        base: PathBuf,
        base_bytes: u64,
        diff: PathBuf,
        diff_bytes: u64,
    },
    #[error("{path}: the diff and the base are the same file")]
    MergeSame { path: PathBuf },
    #[error("{path}: {message}")]
    Packed { path: PathBuf, message: String },
    #[error("{path}: {found} bytes, but the snapshot's memory is {expected} bytes{}: the memory file is truncated or not this snapshot's", if *.packed > 0 { format!(" and {} packed pages after it", .packed) } else { String::new() })]
    MemorySize {
        path: PathBuf,
        expected: u64,
        packed: u64,
        found: u64,
    },
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> FileError {
    let path = path.to_owned();
    move |source| FileError::Io { path, what, source }
}

/// The temporary name a file is written under before it is renamed to `path`.
fn partial(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Writes `fill` into a new file at `path` through a temporary name, syncs it
/// and renames it over `path`; on failure removes the temporary file.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&File, &Path) -> Result<(), FileError>,
) -> Result<(), FileError> {
    let tmp = partial(path);
    let result = (|| {
        // Readable too: the packed pages are compared with those written.
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp, "cannot create it"))?;
        fill(&file, &tmp)?;
        file.sync_all().map_err(io(&tmp, "cannot sync it"))?;
        std::fs::rename(&tmp, path).map_err(io(path, "cannot rename the finished file to it"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `state` to a state file at `path`.
pub fn write_state(path: &Path, state: &VmState) -> Result<(), FileError> {
    let body = serde_json::to_vec(state).map_err(|e| FileError::State {
        path: path.to_owned(),
        field: "(whole)".into(),
        message: e.to_string(),
    })?;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&[0; 4]);
    header.extend_from_slice(&(body.len() as u64).to_le_bytes());
    header.extend_from_slice(&CHECKSUM.checksum(&body).to_le_bytes());
    write_atomically(path, |mut file, tmp| {
        file.write_all(&header)
            .and_then(|()| file.write_all(&body))
            .map_err(io(tmp, "cannot write the state"))
    })
}

/// What a state file's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub state_bytes: u64,
    pub checksum: u64,
}

/// Reads and checks a state file: magic, version, length, checksum, then every
/// field of the state. Nothing is built from it here.
pub fn read_state(path: &Path) -> Result<(Header, VmState), FileError> {
    let mut file = File::open(path).map_err(io(path, "cannot open it"))?;
    let mut head = Vec::with_capacity(HEADER_LEN);
    (&mut file)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut head)
        .map_err(io(path, "cannot read it"))?;
    let file_len = file.metadata().map_err(io(path, "cannot stat it"))?.len();
    // The length is checked against the file's before the body is read: a
    // header cannot make this allocate more than the file holds.
    let header = check_header(path, &head, file_len)?;
    let mut body = vec![0u8; header.state_bytes as usize];
    file.read_exact(&mut body)
        .map_err(io(path, "cannot read the state"))?;
    let state = check_body(path, &header, &body)?;
    Ok((header, state))
}

/// As [`read_state`], of a state file's bytes already in memory (`path` only
/// names it in errors): the same checks, in the same order.
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<(Header, VmState), FileError> {
    let head = &bytes[..bytes.len().min(HEADER_LEN)];
    let header = check_header(path, head, bytes.len() as u64)?;
    let state = check_body(path, &header, &bytes[HEADER_LEN..])?;
    Ok((header, state))
}

/// Checks the first bytes of a state file of `file_len` bytes (`head`: up to
/// [`HEADER_LEN`] of them), its header as it says (its checksum not yet checked).
fn check_header(path: &Path, head: &[u8], file_len: u64) -> Result<Header, FileError> {
    let word = |at: usize| {
        head.get(at..at + 8).map_or(u64::MAX, |w| {
            u64::from_le_bytes(w.try_into().unwrap_or_default())
        })
    };
    if head.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        return Err(FileError::NotASnapshot {
            path: path.to_owned(),
        });
    }
    let version = head
        .get(8..12)
        .map(|v| u32::from_le_bytes(v.try_into().unwrap_or_default()));
    if let Some(found) = version.filter(|v| *v != FORMAT_VERSION) {
        return Err(FileError::Version {
            path: path.to_owned(),
            found,
        });
    }
    let found = file_len.saturating_sub(HEADER_LEN as u64);
    // A header cut short says nothing of the length: "more than a snapshot can have".
    let said = if head.len() == HEADER_LEN {
        word(16)
    } else {
        u64::MAX
    };
    if head.len() < HEADER_LEN || said > MAX_STATE_BYTES || said != found {
        return Err(FileError::Length {
            path: path.to_owned(),
            said: said.min(MAX_STATE_BYTES + 1),
            found,
        });
    }
    Ok(Header {
        version: FORMAT_VERSION,
        state_bytes: said,
        checksum: word(24),
    })
}

/// Checks the state's checksum against the one its header says, then parses it.
fn check_body(path: &Path, header: &Header, body: &[u8]) -> Result<VmState, FileError> {
    let checksum = CHECKSUM.checksum(body);
    if checksum != header.checksum {
        return Err(FileError::Checksum {
            path: path.to_owned(),
            expected: header.checksum,
            found: checksum,
        });
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    let state: VmState = serde_path_to_error::deserialize(de).map_err(|e| FileError::State {
        path: path.to_owned(),
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })?;
    // What every reader sizes from (the memory file, guest RAM): checked here.
    check_memory(&state.memory).map_err(|message| FileError::State {
        path: path.to_owned(),
        field: "memory".into(),
        message,
    })?;
    Ok(state)
}

/// Which pages of guest RAM a memory file gets; every other page is a hole.
#[derive(Clone, Copy)]
pub enum Pages<'a> {
    /// Every page that is not all zeros (a full memory file).
    NonZero,
    /// Every page the log counts as written, zeros included: a hole in a diff
    /// means "unchanged", so a page written back to zeros must be there.
    Dirty(&'a DirtyLog),
}

/// What [`write_memory`] wrote.
#[derive(Clone, Copy, Debug, Default)]
pub struct Written {
    /// Bytes of the RAM image written (the rest are holes).
    pub data: u64,
    /// Held pages kept compressed after it ([`super::packed`]), and their bytes.
    pub packed_pages: u64,
    pub packed_bytes: u64,
}

/// Writes `pages` of guest RAM to a memory file at `path`: the ranges of `mem`
/// one after the other, every page left out a hole. A full one keeps the
/// pages the pager holds compressed, as its pool does, after the RAM image
/// (a hole there). A diff ([`Pages::Dirty`]) is only as good as its holes, so
/// the file's data ranges are read back and must be exactly the pages
/// written: a file system that fills holes or makes holes of zeros is refused.
pub fn write_memory(path: &Path, mem: &MemoryReader, pages: Pages) -> Result<Written, FileError> {
    let mut written = Written::default();
    write_atomically(path, |file, tmp| {
        let ram: u64 = mem.memory().iter().map(|r| r.len()).sum();
        let mut section = SectionWriter::new(file, ram);
        let mut runs = Runs::default();
        let mut buf = vec![0u8; CHUNK];
        let mut packed: Vec<(usize, CompressionAlgo, Vec<u8>)> = Vec::new();
        let mut at = 0u64;
        for region in mem.memory().iter() {
            let len = region.len() as usize;
            let guest = region.start_addr().raw_value();
            let mut off = 0usize;
            while off < len {
                let n = CHUNK.min(len - off);
                let read = match pages {
                    // Copied out: the sink runs under the pager's lock.
                    Pages::NonZero => {
                        mem.read_packed(guest + off as u64, &mut buf[..n], &mut |k, algo, data| {
                            packed.push((k, algo, data.to_vec()))
                        })
                    }
                    Pages::Dirty(_) => mem.read(guest + off as u64, &mut buf[..n]),
                };
                read.map_err(|e| FileError::Io {
                    path: tmp.to_owned(),
                    what: "cannot read guest memory",
                    source: std::io::Error::other(e),
                })?;
                let first_page = ((at + off as u64) / PAGE as u64) as usize;
                for (k, algo, data) in &packed {
                    section
                        .push(first_page + k, *algo, data)
                        .map_err(io(tmp, "cannot write a packed page"))?;
                }
                // Consecutive pages to write go out in one write; a packed
                // page's is a hole (read_packed left it as it was).
                let mut next_packed = packed.iter().map(|p| p.0).peekable();
                let mut run: Option<usize> = None;
                for i in 0..=n.div_ceil(PAGE) {
                    let from = i * PAGE;
                    let is_packed = next_packed.next_if_eq(&i).is_some();
                    let wanted = from < n
                        && !is_packed
                        && match pages {
                            Pages::NonZero => buf[from..n.min(from + PAGE)].iter().any(|&b| b != 0),
                            Pages::Dirty(log) => log.is_dirty(guest + (off + from) as u64),
                        };
                    match (run, wanted) {
                        (None, true) => run = Some(from),
                        (Some(first), false) => {
                            let end = from.min(n);
                            let offset = at + (off + first) as u64;
                            file.write_all_at(&buf[first..end], offset)
                                .map_err(io(tmp, "cannot write guest memory"))?;
                            runs.push(offset, offset + (end - first) as u64);
                            run = None;
                        }
                        _ => {}
                    }
                }
                packed.clear();
                off += n;
            }
            at += len as u64;
        }
        let (packed_pages, packed_bytes) = section
            .finish()
            .map_err(io(tmp, "cannot write the packed pages"))?;
        file.set_len(at + packed_bytes)
            .map_err(io(tmp, "cannot size it"))?;
        if matches!(pages, Pages::Dirty(_)) {
            let data = data_ranges(file, tmp)?;
            if data != runs.0 {
                return Err(FileError::Holes {
                    path: tmp.to_owned(),
                    written: runs.bytes(),
                    data: data.iter().map(|(a, b)| b - a).sum(),
                });
            }
        }
        written = Written {
            data: runs.bytes(),
            packed_pages,
            packed_bytes,
        };
        Ok(())
    })?;
    Ok(written)
}

/// Byte ranges `[start, end)` of a file, ascending, adjacent ones joined.
#[derive(Default)]
struct Runs(Vec<(u64, u64)>);

impl Runs {
    fn push(&mut self, start: u64, end: u64) {
        match self.0.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => self.0.push((start, end)),
        }
    }

    fn bytes(&self) -> u64 {
        self.0.iter().map(|(a, b)| b - a).sum()
    }
}

/// The data ranges `[start, end)` of `file` (everything but its holes), as the
/// file system reports them (`SEEK_DATA`, `SEEK_HOLE`).
pub fn data_ranges(file: &File, path: &Path) -> Result<Vec<(u64, u64)>, FileError> {
    use std::os::fd::AsRawFd;
    let len = file.metadata().map_err(io(path, "cannot stat it"))?.len();
    let seek = |from: u64, whence: libc::c_int| -> Result<Option<u64>, FileError> {
        // SAFETY: lseek on a file descriptor `file` owns and keeps open; it moves
        // the file offset (the writes and reads here are positional) and touches
        // no memory.
        let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        match std::io::Error::last_os_error() {
            // No data at or after `from`.
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(FileError::Io {
                path: path.to_owned(),
                what: "cannot find its data and holes (SEEK_DATA, SEEK_HOLE)",
                source: e,
            }),
        }
    };
    let mut ranges = Vec::new();
    let mut at = 0u64;
    while at < len {
        let Some(start) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        // The end of the file counts as a hole.
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        ranges.push((start, end));
        at = end;
    }
    Ok(ranges)
}

/// What [`merge_memory`] did.
#[derive(Clone, Copy, Debug)]
pub struct MergeInfo {
    /// Bytes of the diff copied onto the base.
    pub copied: u64,
    /// Data ranges of the diff.
    pub ranges: usize,
    /// Packed pages of the base unpacked into its RAM image.
    pub unpacked: u64,
    /// The size of the RAM image, the merged file's.
    pub bytes: u64,
}

/// Copies the data ranges of the diff memory file `diff` onto the memory file
/// `base`, in place, at the same offsets: `base` becomes the memory the diff's
/// snapshot saved when `base` is the memory of the snapshot before it. Their
/// RAM images must be the same size. The packed pages of a full base (after
/// its RAM image) that the diff does not replace are unpacked into it, and the
/// base ends with its RAM image, as the diff's state expects. `progress`
/// hears the bytes copied so far and the diff's data bytes.
pub fn merge_memory(
    base: &Path,
    diff: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeInfo, FileError> {
    let base_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(base)
        .map_err(io(base, "cannot open it for writing"))?;
    let diff_file = File::open(diff).map_err(io(diff, "cannot open it"))?;
    let base_len = base_file.metadata().map_err(io(base, "cannot stat it"))?;
    let diff_len = diff_file.metadata().map_err(io(diff, "cannot stat it"))?;
    {
        use std::os::unix::fs::MetadataExt;
        if (base_len.dev(), base_len.ino()) == (diff_len.dev(), diff_len.ino()) {
            return Err(FileError::MergeSame {
                path: diff.to_owned(),
            });
        }
    }
    // A diff is a RAM image alone; a full base may have packed pages after its.
    let ram = diff_len.len();
    if base_len.len() < ram || !ram.is_multiple_of(PAGE as u64) {
        return Err(FileError::MergeSize {
            base: base.to_owned(),
            base_bytes: base_len.len(),
            diff: diff.to_owned(),
            diff_bytes: ram,
        });
    }
    let bad_packed = |message| FileError::Packed {
        path: base.to_owned(),
        message,
    };
    let packed =
        packed::read_section(&base_file, ram, (ram / PAGE as u64) as usize).map_err(|e| {
            bad_packed(format!(
                "{} bytes, but the diff {} is {ram} bytes, and {e}: a diff merges only onto the memory file of the same VM's previous snapshot",
                base_len.len(),
                diff.display()
            ))
        })?;
    // Checked whole before the base is written.
    packed::unpack_each(&packed, bad_packed, |_, _| Ok(()))?;
    let ranges = data_ranges(&diff_file, diff)?;
    let total: u64 = ranges.iter().map(|(a, b)| b - a).sum();
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0u64;
    for &(start, end) in &ranges {
        let mut at = start;
        while at < end {
            let n = CHUNK.min((end - at) as usize);
            diff_file
                .read_exact_at(&mut buf[..n], at)
                .map_err(io(diff, "cannot read it"))?;
            base_file
                .write_all_at(&buf[..n], at)
                .map_err(io(base, "cannot write to it"))?;
            at += n as u64;
            copied += n as u64;
            progress(copied, total);
        }
    }
    // The diff's pages are newer than the base's packed ones.
    let replaced = |page: usize| {
        let at = (page * PAGE) as u64;
        let i = ranges.partition_point(|&(_, end)| end <= at);
        ranges.get(i).is_some_and(|&(start, _)| start <= at)
    };
    let kept: Vec<PackedEntry> = packed.into_iter().filter(|e| !replaced(e.page)).collect();
    packed::unpack_each(&kept, bad_packed, |page, bytes| {
        base_file
            .write_all_at(bytes, (page * PAGE) as u64)
            .map_err(io(base, "cannot write to it"))
    })?;
    base_file
        .set_len(ram)
        .map_err(io(base, "cannot truncate it to its RAM image"))?;
    base_file.sync_all().map_err(io(base, "cannot sync it"))?;
    Ok(MergeInfo {
        copied,
        ranges: ranges.len(),
        unpacked: kept.len() as u64,
        bytes: ram,
    })
}

/// Opens the memory file of the snapshot `state` describes and checks it:
/// its RAM image the size of the snapshot's RAM, followed by as many packed
/// pages as the state says (checked whole, [`packed::read_section`]), which it
/// returns.
pub fn open_memory(path: &Path, state: &VmState) -> Result<(File, Vec<PackedEntry>), FileError> {
    let file = File::open(path).map_err(io(path, "cannot open it"))?;
    let found = file.metadata().map_err(io(path, "cannot stat it"))?.len();
    let ram: u64 = state.memory.iter().map(|r| r.bytes).sum();
    let size = |found| FileError::MemorySize {
        path: path.to_owned(),
        expected: ram,
        packed: state.memory_packed,
        found,
    };
    if (state.memory_packed == 0 && found != ram) || found < ram {
        return Err(size(found));
    }
    let pages = (ram / PAGE as u64) as usize;
    let packed = packed::read_section(&file, ram, pages).map_err(|message| FileError::Packed {
        path: path.to_owned(),
        message,
    })?;
    if packed.len() as u64 != state.memory_packed {
        return Err(FileError::Packed {
            path: path.to_owned(),
            message: format!(
                "{} packed pages after the RAM image, but the state says {}: the memory file is not this snapshot's",
                packed.len(),
                state.memory_packed
            ),
        });
    }
    Ok((file, packed))
}

/// Writes the pages a memory file keeps packed (`packed`, read with
/// [`open_memory`] from `path`) into `mem`, guest RAM of `ranges`.
pub fn unpack_into(
    mem: &GuestMemoryMmap,
    ranges: &[MemoryRange],
    packed: &[PackedEntry],
    path: &Path,
) -> Result<(), FileError> {
    let bad = |message| FileError::Packed {
        path: path.to_owned(),
        message,
    };
    packed::unpack_each(packed, bad, |page, bytes| {
        packed::page_gpa(ranges, page)
            .and_then(|gpa| mem.write_slice(bytes, GuestAddress(gpa)).ok())
            .ok_or_else(|| bad(format!("packed page {page}: not in guest RAM")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::MemoryRange;
    use crate::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vigil-file-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The data ranges of the file at `path`, in pages.
    fn data_pages(path: &Path) -> Vec<(u64, u64)> {
        let file = File::open(path).unwrap();
        let page = PAGE as u64;
        data_ranges(&file, path)
            .unwrap()
            .into_iter()
            .map(|(a, b)| (a / page, b / page))
            .collect()
    }

    #[test]
    fn a_diff_holds_the_dirty_pages_zeros_included_and_merges_onto_its_base() {
        let dir = scratch("diff");
        // Two regions of 16 pages, the second at 1 MiB.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 16 * PAGE),
            (GuestAddress(0x10_0000), 16 * PAGE),
        ])
        .unwrap();
        mem.write_slice(&[1; PAGE], GuestAddress(PAGE as u64))
            .unwrap();
        mem.write_slice(&[2; PAGE], GuestAddress(0x10_0000))
            .unwrap();
        let base = dir.join("base.mem");
        assert_eq!(
            write_memory(&base, &MemoryReader::plain(mem.clone()), Pages::NonZero)
                .unwrap()
                .data,
            2 * PAGE as u64
        );
        assert_eq!(data_pages(&base), [(1, 2), (16, 17)]);

        // Page 1 back to zeros, pages 3 and 4 written, the rest unchanged.
        mem.write_slice(&[0; PAGE], GuestAddress(PAGE as u64))
            .unwrap();
        mem.write_slice(&[3; 2 * PAGE], GuestAddress(3 * PAGE as u64))
            .unwrap();
        let mut log = DirtyLog::empty(&mem);
        log.add(0, &[0b11010]);
        let diff = dir.join("diff.mem");
        assert_eq!(
            write_memory(&diff, &MemoryReader::plain(mem.clone()), Pages::Dirty(&log))
                .unwrap()
                .data,
            3 * PAGE as u64
        );
        assert_eq!(data_pages(&diff), [(1, 2), (3, 5)]);

        let mut seen = Vec::new();
        let info = merge_memory(&base, &diff, &mut |done, total| seen.push((done, total))).unwrap();
        assert_eq!(
            (info.copied, info.ranges, info.bytes),
            (3 * PAGE as u64, 2, 32 * PAGE as u64)
        );
        assert_eq!(seen.last(), Some(&(3 * PAGE as u64, 3 * PAGE as u64)));
        let merged = std::fs::read(&base).unwrap();
        let mut now = vec![0u8; 32 * PAGE];
        mem.read_slice(&mut now[..16 * PAGE], GuestAddress(0))
            .unwrap();
        mem.read_slice(&mut now[16 * PAGE..], GuestAddress(0x10_0000))
            .unwrap();
        assert!(merged == now, "the base merged with the diff is memory now");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A real state file of the test guest: a seed of the fuzz target
    /// `snapshot_state` (made by the fuzz crate's `examples/seed_corpus.rs`),
    /// whose first byte is the fuzz target's own.
    const SEED: &[u8] = include_bytes!("../../../../fuzz/corpus/snapshot_state/seed-state-0");

    #[test]
    fn a_state_file_decodes_as_it_reads_and_a_cut_header_is_refused() {
        let dir = scratch("decode");
        let path = dir.join("vm.state");
        let bytes = &SEED[1..];
        std::fs::write(&path, bytes).unwrap();
        let (header, state) = read_state(&path).unwrap();
        let (same, _) = decode_state(&path, bytes).unwrap();
        assert_eq!(header, same);
        assert_eq!(header.state_bytes as usize, bytes.len() - HEADER_LEN);
        assert_eq!(state.machine.vcpu_count as usize, state.vcpus.len());
        // The header cut anywhere: each refused as read_state refuses it.
        for cut in [0, 3, 8, 10, 12, 20, 31, 32, 100] {
            let e = decode_state(&path, &bytes[..cut]).unwrap_err().to_string();
            let expected = if cut < 8 {
                "not a Vigil snapshot"
            } else {
                "bytes of state"
            };
            assert!(e.contains(expected), "cut at {cut}: {e}");
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert_eq!(read_state(&path).unwrap_err().to_string(), e);
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Found by fuzzing (snapshot_state): RAM ranges were taken as the file
    /// said, and `vigil snapshot inspect` summed their sizes, which overflowed
    /// past 2^64 (a panic) or, in a release build, printed the wrapped sum. The
    /// ranges are checked as the file is read now, and the field named.
    #[test]
    fn a_state_whose_ram_ranges_do_not_add_up_is_refused_naming_them() {
        let dir = scratch("ranges");
        let path = dir.join("vm.state");
        let (_, mut state) = decode_state(&path, &SEED[1..]).unwrap();
        state.memory = vec![
            MemoryRange {
                guest_address: 0,
                bytes: u64::MAX - 0xfff,
            },
            MemoryRange {
                guest_address: 0,
                bytes: 0x2000,
            },
        ];
        write_state(&path, &state).unwrap();
        let e = read_state(&path).unwrap_err().to_string();
        assert!(
            e.contains("vm.state: state: memory: range 1 (0x0+0x2000): starts below"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_merge_unpacks_the_packed_pages_of_its_base_the_diff_does_not_replace() {
        let dir = scratch("merge-packed");
        const PAGES: usize = 16;
        let ram = (PAGES * PAGE) as u64;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), PAGES * PAGE)]).unwrap();
        mem.write_slice(&[5; PAGE], GuestAddress(2 * PAGE as u64))
            .unwrap();
        // A full base: page 2 in its RAM image, pages 4 and 6 packed after it.
        let base = dir.join("base.mem");
        write_memory(&base, &MemoryReader::plain(mem), Pages::NonZero).unwrap();
        {
            let file = File::options().read(true).write(true).open(&base).unwrap();
            let mut section = SectionWriter::new(&file, ram);
            for (page, byte) in [(4, 9u8), (6, 8)] {
                let packed = lz4_flex::block::compress(&[byte; PAGE]);
                section.push(page, CompressionAlgo::Lz4, &packed).unwrap();
            }
            section.finish().unwrap();
        }
        // A diff that writes page 6 again.
        let diff = dir.join("diff.mem");
        {
            let file = File::create(&diff).unwrap();
            file.set_len(ram).unwrap();
            file.write_all_at(&[1; PAGE], 6 * PAGE as u64).unwrap();
        }

        // A damaged section: refused, naming the base, which is left as it was.
        let good = std::fs::read(&base).unwrap();
        let mut bad = good.clone();
        bad[ram as usize] ^= 0xff;
        std::fs::write(&base, &bad).unwrap();
        let e = merge_memory(&base, &diff, &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("base.mem: ") && e.contains("checksum"), "{e}");
        assert!(std::fs::read(&base).unwrap() == bad);

        std::fs::write(&base, &good).unwrap();
        let info = merge_memory(&base, &diff, &mut |_, _| {}).unwrap();
        assert_eq!(
            (info.copied, info.unpacked, info.bytes),
            (PAGE as u64, 1, ram)
        );
        let merged = std::fs::read(&base).unwrap();
        assert_eq!(merged.len() as u64, ram, "the RAM image alone");
        for page in 0..PAGES {
            let byte = match page {
                2 => 5,
                4 => 9,
                6 => 1,
                _ => 0,
            };
            assert!(
                merged[page * PAGE..][..PAGE].iter().all(|&b| b == byte),
                "page {page}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn merge_refuses_files_of_other_sizes_and_itself() {
        let dir = scratch("merge");
        let (a, b) = (dir.join("a.mem"), dir.join("b.mem"));
        std::fs::write(&a, [1; 8192]).unwrap();
        std::fs::write(&b, [2; 4096]).unwrap();
        let e = merge_memory(&a, &b, &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a.mem: 8192 bytes") && e.contains("b.mem is 4096 bytes"),
            "{e}"
        );
        let e = merge_memory(&a, &a, &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("same file"), "{e}");
        assert_eq!(std::fs::read(&a).unwrap(), [1; 8192]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
