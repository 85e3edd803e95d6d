//! The packed section of a Full memory file: the pages the pager held at the
//! capture, kept as its pool kept them (compressed), after the RAM image.
//!
//! The RAM image stays what every loader maps (a hole where a packed page
//! is); the section follows it at offset `R` (the RAM's size), laid out so
//! that it is written in one pass as pages come:
//!
//! | bytes | what |
//! |---|---|
//! | `R..` | the pages' compressed bytes, each distinct content once |
//! | then | one 20-byte entry per page, ascending by page: page number u64, offset of its bytes in the data u64, their length u16, codec u8 (1 LZ4, 2 Zstandard), zero u8 |
//! | last 32 | `VIGILPAK`, version u32 (1), zero u32, entries u64, CRC-64/XZ of the data and entries u64 |
//!
//! All little-endian; page numbers count through the RAM ranges in order, as
//! [`super::PageBits`] does. The state file says how many pages the section
//! holds ([`super::VmState::memory_packed`]); only a Full snapshot has one,
//! and a merge unpacks the base's into its RAM image ([`super::file::merge_memory`]).

use std::collections::HashMap;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::FileExt;

use crc::{Crc, Digest, CRC_64_XZ};
use vigil_model::config::CompressionAlgo;

use super::state::MemoryRange;
use crate::pager::Unpacker;

const MAGIC: &[u8; 8] = b"VIGILPAK";
const VERSION: u32 = 1;
const FOOTER: usize = 32;
const ENTRY: usize = 20;
const PAGE: usize = 4096;
const CHECKSUM: Crc<u64> = Crc::<u64>::new(&CRC_64_XZ);

/// One held page of a section: its number through the RAM ranges, its codec
/// and its compressed bytes (checked only to be at most a page: whether they
/// unpack to one is the loader's to check).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedEntry {
    pub page: usize,
    pub algo: CompressionAlgo,
    pub data: Vec<u8>,
}

fn codec_byte(algo: CompressionAlgo) -> u8 {
    match algo {
        CompressionAlgo::Lz4 => 1,
        CompressionAlgo::Zstd => 2,
    }
}

/// Writes a section after the RAM image of `file`, a page at a time; equal
/// compressed bytes (a page the pool stored once for many) are written once.
pub struct SectionWriter<'f> {
    file: &'f File,
    start: u64,
    at: u64,
    entries: Vec<u8>,
    count: u64,
    last: Option<usize>,
    /// Offsets (in the data) of the bytes written, by their hash.
    written: HashMap<u64, Vec<u64>>,
    digest: Digest<'static, u64>,
}

impl<'f> SectionWriter<'f> {
    /// A section starting at `ram_bytes`, the RAM image's size.
    pub fn new(file: &'f File, ram_bytes: u64) -> Self {
        Self {
            file,
            start: ram_bytes,
            at: ram_bytes,
            entries: Vec::new(),
            count: 0,
            last: None,
            written: HashMap::new(),
            digest: CHECKSUM.digest(),
        }
    }

    /// Appends page `page` (pages come in ascending order).
    pub fn push(&mut self, page: usize, algo: CompressionAlgo, data: &[u8]) -> std::io::Result<()> {
        let len = u16::try_from(data.len())
            .ok()
            .filter(|&n| n > 0 && usize::from(n) <= PAGE);
        let (Some(len), true) = (len, self.last.is_none_or(|l| l < page)) else {
            return Err(std::io::Error::other(format!(
                "page {page}: {} bytes, or out of order",
                data.len()
            )));
        };
        let key = {
            let mut h = std::hash::DefaultHasher::new();
            (codec_byte(algo), data).hash(&mut h);
            h.finish()
        };
        // A hash is only a hint: the bytes are compared, read back.
        let mut same = None;
        let mut back = vec![0u8; data.len()];
        for &offset in self.written.get(&key).into_iter().flatten() {
            if self
                .file
                .read_exact_at(&mut back, self.start + offset)
                .is_ok()
                && back == data
            {
                same = Some(offset);
                break;
            }
        }
        let offset = match same {
            Some(offset) => offset,
            None => {
                self.file.write_all_at(data, self.at)?;
                self.digest.update(data);
                let offset = self.at - self.start;
                self.at += data.len() as u64;
                self.written.entry(key).or_default().push(offset);
                offset
            }
        };
        self.entries.extend((page as u64).to_le_bytes());
        self.entries.extend(offset.to_le_bytes());
        self.entries.extend(len.to_le_bytes());
        self.entries.extend([codec_byte(algo), 0]);
        self.count += 1;
        self.last = Some(page);
        Ok(())
    }

    /// Writes the entries and the footer when there is at least one page;
    /// returns how many pages and bytes the section holds.
    pub fn finish(self) -> std::io::Result<(u64, u64)> {
        if self.count == 0 {
            return Ok((0, 0));
        }
        let Self {
            file,
            start,
            at,
            entries,
            count,
            mut digest,
            ..
        } = self;
        digest.update(&entries);
        let mut footer = Vec::with_capacity(FOOTER);
        footer.extend(MAGIC);
        footer.extend(VERSION.to_le_bytes());
        footer.extend(0u32.to_le_bytes());
        footer.extend(count.to_le_bytes());
        footer.extend(digest.finalize().to_le_bytes());
        file.write_all_at(&entries, at)?;
        file.write_all_at(&footer, at + entries.len() as u64)?;
        Ok((count, at + (entries.len() + FOOTER) as u64 - start))
    }
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap_or_default())
}

/// Reads the section of `file` (whose RAM image is `ram_bytes`) and checks
/// it whole before anything uses it; an empty list when the file ends with
/// the RAM image. `pages` is how many pages the RAM has.
pub fn read_section(file: &File, ram_bytes: u64, pages: usize) -> Result<Vec<PackedEntry>, String> {
    let len = file
        .metadata()
        .map_err(|e| format!("cannot stat it: {e}"))?
        .len();
    if len <= ram_bytes {
        return Ok(Vec::new());
    }
    let section_len = usize::try_from(len - ram_bytes)
        .map_err(|_| format!("{} bytes after the RAM image", len - ram_bytes))?;
    // Held pages are at most 3/4 of a page each: a section larger than the
    // RAM is not one.
    if section_len as u64 > ram_bytes + FOOTER as u64 {
        return Err(format!(
            "{section_len} bytes after the RAM image of {ram_bytes}: more than its pages could pack to"
        ));
    }
    let mut bytes = vec![0u8; section_len];
    file.read_exact_at(&mut bytes, ram_bytes)
        .map_err(|e| format!("cannot read its packed pages: {e}"))?;
    parse_section(&bytes, pages)
}

/// Parses a section (the bytes after the RAM image), checking every field.
pub fn parse_section(bytes: &[u8], pages: usize) -> Result<Vec<PackedEntry>, String> {
    let after = |what: String| format!("the packed pages after the RAM image: {what}");
    if bytes.len() < FOOTER {
        return Err(after(format!(
            "{} bytes, shorter than their {FOOTER}-byte footer",
            bytes.len()
        )));
    }
    let (body, footer) = bytes.split_at(bytes.len() - FOOTER);
    if &footer[..8] != MAGIC {
        return Err(after("the footer does not start with VIGILPAK".into()));
    }
    let version = u32::from_le_bytes([footer[8], footer[9], footer[10], footer[11]]);
    if version != VERSION {
        return Err(after(format!(
            "version {version}; this Vigil reads version {VERSION}"
        )));
    }
    let count = le64(&footer[16..24]);
    let table = usize::try_from(count)
        .ok()
        .and_then(|c| c.checked_mul(ENTRY))
        .filter(|&t| t <= body.len())
        .ok_or_else(|| {
            after(format!(
                "{count} entries do not fit in {} bytes",
                body.len()
            ))
        })?;
    let (data, entries) = body.split_at(body.len() - table);
    let expected = le64(&footer[24..32]);
    let found = CHECKSUM.checksum(body);
    if found != expected {
        return Err(after(format!(
            "their checksum is {found:#018x}, the footer says {expected:#018x}: the file is corrupt"
        )));
    }
    let mut out = Vec::with_capacity(table / ENTRY);
    for (i, e) in entries.chunks_exact(ENTRY).enumerate() {
        let entry = |what: String| after(format!("entry {i}: {what}"));
        let page = usize::try_from(le64(&e[..8])).unwrap_or(usize::MAX);
        let offset = le64(&e[8..16]);
        let len = usize::from(u16::from_le_bytes([e[16], e[17]]));
        let algo = match e[18] {
            1 => CompressionAlgo::Lz4,
            2 => CompressionAlgo::Zstd,
            c => return Err(entry(format!("codec {c}, not 1 (LZ4) or 2 (Zstandard)"))),
        };
        if e[19] != 0 {
            return Err(entry(format!("reserved byte {}, not 0", e[19])));
        }
        if page >= pages {
            return Err(entry(format!("page {page}; the RAM has {pages}")));
        }
        if out.last().is_some_and(|p: &PackedEntry| p.page >= page) {
            return Err(entry(format!(
                "page {page} after page {}",
                out[out.len() - 1].page
            )));
        }
        if len == 0 || len > PAGE {
            return Err(entry(format!("{len} bytes for page {page}")));
        }
        let bytes = usize::try_from(offset)
            .ok()
            .and_then(|at| data.get(at..at.checked_add(len)?))
            .ok_or_else(|| {
                entry(format!(
                    "{len} bytes at {offset}, past the data's {}",
                    data.len()
                ))
            })?;
        out.push(PackedEntry {
            page,
            algo,
            data: bytes.to_vec(),
        });
    }
    Ok(out)
}

/// Unpacks each entry into a page and hands it to `put` with its page number;
/// an entry that does not unpack to exactly one page is an error made by
/// `bad` (the entry's page named).
pub fn unpack_each<E>(
    entries: &[PackedEntry],
    bad: impl Fn(String) -> E,
    mut put: impl FnMut(usize, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut unpacker = Unpacker::default();
    let mut page = vec![0u8; PAGE];
    for e in entries {
        unpacker
            .unpack(e.algo, &e.data, &mut page)
            .map_err(|why| bad(format!("packed page {}: {why}", e.page)))?;
        put(e.page, &page)?;
    }
    Ok(())
}

/// The guest-physical address of page `page`, numbered through `ranges`.
pub fn page_gpa(ranges: &[MemoryRange], page: usize) -> Option<u64> {
    let mut first = 0u64;
    let page = page as u64;
    for r in ranges {
        let n = r.bytes / PAGE as u64;
        if page < first + n {
            return Some(r.guest_address + (page - first) * PAGE as u64);
        }
        first += n;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(pages: &[(usize, CompressionAlgo, Vec<u8>)]) -> Vec<u8> {
        let path = std::env::temp_dir().join(format!("vigil-packed-{}", std::process::id()));
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut w = SectionWriter::new(&file, 0);
        for (page, algo, data) in pages {
            w.push(*page, *algo, data).unwrap();
        }
        let (count, bytes) = w.finish().unwrap();
        assert_eq!(count, pages.len() as u64);
        let out = std::fs::read(&path).unwrap();
        assert_eq!(bytes, out.len() as u64);
        std::fs::remove_file(&path).ok();
        out
    }

    #[test]
    fn a_section_reads_back_as_written_and_each_bad_field_is_named() {
        let pages = vec![
            (3, CompressionAlgo::Lz4, vec![7u8; 100]),
            (5, CompressionAlgo::Zstd, vec![1u8; 4096]),
            // The same bytes as page 3's: written once.
            (9, CompressionAlgo::Lz4, vec![7u8; 100]),
        ];
        let bytes = section(&pages);
        assert_eq!(bytes.len(), 100 + 4096 + 3 * ENTRY + FOOTER);
        let read = parse_section(&bytes, 10).unwrap();
        let back: Vec<_> = read.into_iter().map(|e| (e.page, e.algo, e.data)).collect();
        assert_eq!(back, pages);

        let at_footer = bytes.len() - FOOTER;
        let table = at_footer - 3 * ENTRY;
        type Damage<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;
        let cases: Vec<(Damage, usize, &str)> = vec![
            (Box::new(|b| b.truncate(10)), 10, "shorter than"),
            (Box::new(|b| b[at_footer] = b'X'), 10, "VIGILPAK"),
            (Box::new(|b| b[at_footer + 8] = 2), 10, "version 2"),
            (
                Box::new(|b| b[at_footer + 18] = 1),
                10,
                "65539 entries do not fit",
            ),
            (Box::new(|b| b[0] ^= 1), 10, "checksum"),
            (Box::new(|_| {}), 9, "entry 2: page 9; the RAM has 9"),
        ];
        for (damage, pages, expected) in cases {
            let mut b = bytes.clone();
            damage(&mut b);
            let e = parse_section(&b, pages).unwrap_err();
            assert!(e.contains(expected), "{expected}: {e}");
        }
        // Entries that do not hold together, with the checksum made to match.
        let reseal = |b: &mut Vec<u8>| {
            let end = b.len() - FOOTER;
            let crc = CHECKSUM.checksum(&b[..end]);
            b[end + 24..].copy_from_slice(&crc.to_le_bytes());
        };
        for (field, value, expected) in [
            (18, 3u8, "entry 0: codec 3"),
            (19, 1, "entry 0: reserved byte 1"),
            (ENTRY, 2, "entry 1: page 2 after page 3"),
            (
                ENTRY + 8,
                101,
                "entry 1: 4096 bytes at 101, past the data's 4196",
            ),
            (ENTRY + 15, 0x80, "past the data's"),
            (16, 0, "entry 0: 0 bytes"),
        ] {
            let mut b = bytes.clone();
            b[table + field] = value;
            reseal(&mut b);
            let e = parse_section(&b, 10).unwrap_err();
            assert!(e.contains(expected), "{expected}: {e}");
        }
    }

    #[test]
    fn pages_number_through_the_ranges() {
        let ranges = [
            MemoryRange {
                guest_address: 0,
                bytes: 2 * PAGE as u64,
            },
            MemoryRange {
                guest_address: 0x10_0000,
                bytes: 3 * PAGE as u64,
            },
        ];
        assert_eq!(page_gpa(&ranges, 1), Some(0x1000));
        assert_eq!(page_gpa(&ranges, 2), Some(0x10_0000));
        assert_eq!(page_gpa(&ranges, 4), Some(0x10_2000));
        assert_eq!(page_gpa(&ranges, 5), None);
    }
}
