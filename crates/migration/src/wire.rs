//! The migration stream: frames of `kind u8, length u32 LE, payload, CRC-32C
//! u32 LE` (the CRC over kind, length and payload), in this order:
//!
//! | from | frame | payload |
//! |---|---|---|
//! | source | `Hello` | `VIGILMIG`, protocol version u32 LE, the one-time token |
//! | destination | `Answer` | 1 (go on) or 0, and a message |
//! | source | `Begin` | JSON: the guest RAM ranges |
//! | source | `Pages` (repeated) | guest-physical address u64 LE, then whole 4 KiB pages from there |
//! | source | `Zeros` (repeated) | guest-physical addresses u64 LE of pages that are all zeros now |
//! | source | `Packed` (repeated) | pages the source's memory-compression pager holds, as its pool keeps them: the codec u8 (1 LZ4, 2 Zstandard), then per page its guest-physical address u64 LE, a length u16 LE and that many bytes |
//! | source | `Pending` (repeated, post-copy only) | guest-physical addresses u64 LE of pages still to come: what the destination holds of them is stale |
//! | source | `State` | JSON: the VM's state, as in a snapshot (`vigil_vmm::snapshot::VmState`) |
//! | destination | `Answer` | 1: the VM is built, paused; 0 and why not |
//! | source | `Commit` | empty: the source has stopped its VM for good |
//! | destination | `Running` | empty: the VM runs at the destination |
//!
//! Post-copy: when `Pending` frames came, the destination builds and runs the
//! VM before those pages arrive. From `State` on, it asks for a pending page the
//! moment something touches it (`Want`, addresses u64 LE) while the source
//! answers and, once the VM runs there, pushes the rest (`Pages`, `Zeros`) and
//! ends with `Done`, which the destination confirms with an `Answer`.
//!
//! A source may send `Cancel` (a reason) instead of any frame after `Hello`.
//! Pages not sent are zeros at the destination. A page sent again (in
//! `Pages`, `Zeros` or `Packed`) replaces what was sent of it before. Any frame that does not
//! decode, fails its CRC or comes out of order ends the attempt.

use std::io::{Read, Write};

use crc::{Crc, CRC_32_ISCSI};
use vigil_model::config::CompressionAlgo;

/// The protocol version of this Vigil.
pub const VERSION: u32 = 3;
pub const MAGIC: &[u8; 8] = b"VIGILMIG";
/// The largest payload: a run of 256 pages and its address.
pub const MAX_PAYLOAD: usize = 8 + 256 * 4096;
/// A page of guest memory.
pub const PAGE: usize = 4096;
const CRC: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    Answer = 2,
    Begin = 3,
    Pages = 4,
    Zeros = 5,
    State = 6,
    Commit = 7,
    Running = 8,
    Cancel = 9,
    Pending = 10,
    Want = 11,
    Done = 12,
    Packed = 13,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        [
            Hello, Answer, Begin, Pages, Zeros, State, Commit, Running, Cancel, Pending, Want,
            Done, Packed,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

/// Why the stream could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame kind {0}: not a frame of this protocol{hint}", hint = if *.0 == 0x16 { " (a TLS handshake: this destination was given no --migration-tls-cert)" } else { "" })]
    Kind(u8),
    #[error("{kind:?} frame of {len} bytes: more than the {MAX_PAYLOAD} a frame may carry")]
    TooLong { kind: Kind, len: u32 },
    #[error(
        "{kind:?} frame: its CRC-32C is {found:#010x}, it says {said:#010x}: the stream is corrupt"
    )]
    Crc { kind: Kind, said: u32, found: u32 },
    #[error("expected a {expected} frame, got {got:?}")]
    Unexpected { expected: &'static str, got: Kind },
    #[error("{kind:?} frame: {why}")]
    Payload { kind: Kind, why: String },
}

/// One frame.
#[derive(Debug)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

/// Writes one frame.
pub fn write(out: &mut dyn Write, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut digest = CRC.digest();
    digest.update(&head);
    digest.update(payload);
    out.write_all(&head)?;
    out.write_all(payload)?;
    out.write_all(&digest.finalize().to_le_bytes())?;
    Ok(())
}

/// Reads one frame, checking its kind, length and CRC.
pub fn read(input: &mut dyn Read) -> Result<Frame, WireError> {
    let mut head = [0u8; 5];
    input.read_exact(&mut head)?;
    let kind = Kind::from_u8(head[0]).ok_or(WireError::Kind(head[0]))?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    if len as usize > MAX_PAYLOAD {
        return Err(WireError::TooLong { kind, len });
    }
    let mut payload = vec![0u8; len as usize];
    input.read_exact(&mut payload)?;
    let mut crc = [0u8; 4];
    input.read_exact(&mut crc)?;
    let said = u32::from_le_bytes(crc);
    let mut digest = CRC.digest();
    digest.update(&head);
    digest.update(&payload);
    let found = digest.finalize();
    if said != found {
        return Err(WireError::Crc { kind, said, found });
    }
    Ok(Frame { kind, payload })
}

/// Reads a frame that must be of kind `want` (a `Cancel` becomes an error
/// carrying its reason).
pub fn expect(input: &mut dyn Read, want: Kind) -> Result<Vec<u8>, WireError> {
    let frame = read(input)?;
    if frame.kind == want {
        return Ok(frame.payload);
    }
    if frame.kind == Kind::Cancel {
        return Err(WireError::Payload {
            kind: Kind::Cancel,
            why: String::from_utf8_lossy(&frame.payload).into_owned(),
        });
    }
    Err(WireError::Unexpected {
        expected: kind_name(want),
        got: frame.kind,
    })
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Hello => "Hello",
        Kind::Answer => "Answer",
        Kind::Begin => "Begin",
        Kind::Pages => "Pages",
        Kind::Zeros => "Zeros",
        Kind::State => "State",
        Kind::Commit => "Commit",
        Kind::Running => "Running",
        Kind::Cancel => "Cancel",
        Kind::Pending => "Pending",
        Kind::Want => "Want",
        Kind::Done => "Done",
        Kind::Packed => "Packed",
    }
}

/// An `Answer`: go on, or not and why.
pub fn answer(out: &mut dyn Write, ok: bool, message: &str) -> Result<(), WireError> {
    let mut payload = vec![u8::from(ok)];
    payload.extend_from_slice(message.as_bytes());
    write(out, Kind::Answer, &payload)
}

/// Reads an `Answer`: `Ok(message)` to go on, `Err(message)` when refused.
pub fn read_answer(input: &mut dyn Read) -> Result<Result<String, String>, WireError> {
    Ok(parse_answer(&expect(input, Kind::Answer)?))
}

/// An `Answer`'s payload: `Ok(message)` to go on, `Err(message)` when refused.
pub fn parse_answer(payload: &[u8]) -> Result<String, String> {
    let message = String::from_utf8_lossy(payload.get(1..).unwrap_or_default()).into_owned();
    match payload.first() {
        Some(1) => Ok(message),
        _ => Err(message),
    }
}

/// A payload of guest-physical addresses (`Zeros`, `Pending`, `Want`), each a
/// page boundary; `None` when it is not one.
pub fn addresses(payload: &[u8]) -> Option<Vec<u64>> {
    if !payload.len().is_multiple_of(8) {
        return None;
    }
    payload
        .chunks_exact(8)
        .map(|a| u64::from_le_bytes(a.try_into().unwrap_or_default()))
        .map(|gpa| gpa.is_multiple_of(PAGE as u64).then_some(gpa))
        .collect()
}

/// A `Pages` payload: the guest-physical address of its first page, a page
/// boundary, and its pages (at least one, whole); `None` when it is not one.
pub fn pages(payload: &[u8]) -> Option<(u64, &[u8])> {
    let (addr, data) = payload.split_at_checked(8)?;
    let gpa = u64::from_le_bytes(addr.try_into().ok()?);
    (gpa.is_multiple_of(PAGE as u64) && !data.is_empty() && data.len().is_multiple_of(PAGE))
        .then_some((gpa, data))
}

/// The byte that names `algo` in a `Packed` payload.
pub fn codec_byte(algo: CompressionAlgo) -> u8 {
    match algo {
        CompressionAlgo::Lz4 => 1,
        CompressionAlgo::Zstd => 2,
    }
}

/// One page of a `Packed` payload: its address and compressed bytes.
pub type PackedEntry<'a> = (u64, &'a [u8]);

/// A `Packed` payload: its codec and pages (address, compressed bytes), each
/// address a page boundary; `None` when it is not one.
pub fn packed(payload: &[u8]) -> Option<(CompressionAlgo, Vec<PackedEntry<'_>>)> {
    let (&codec, mut rest) = payload.split_first()?;
    let algo = match codec {
        1 => CompressionAlgo::Lz4,
        2 => CompressionAlgo::Zstd,
        _ => return None,
    };
    let mut pages = Vec::new();
    while !rest.is_empty() {
        let (head, tail) = rest.split_at_checked(10)?;
        let gpa = u64::from_le_bytes(head[..8].try_into().ok()?);
        let len = u16::from_le_bytes([head[8], head[9]]) as usize;
        let (data, tail) = tail.split_at_checked(len)?;
        if !gpa.is_multiple_of(PAGE as u64) || data.is_empty() {
            return None;
        }
        pages.push((gpa, data));
        rest = tail;
    }
    (!pages.is_empty()).then_some((algo, pages))
}

/// Addresses as a payload.
pub fn address_payload(pages: &[u64]) -> Vec<u8> {
    pages.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// The `Hello` payload.
pub fn hello(token: &str) -> Vec<u8> {
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(&VERSION.to_le_bytes());
    p.extend_from_slice(token.as_bytes());
    p
}

/// Splits a `Hello` payload into the version and the token.
pub fn parse_hello(payload: &[u8]) -> Result<(u32, &[u8]), WireError> {
    if payload.len() < 12 || &payload[..8] != MAGIC {
        return Err(WireError::Payload {
            kind: Kind::Hello,
            why: "not a Vigil migration (no VIGILMIG)".into(),
        });
    }
    let version = u32::from_le_bytes([payload[8], payload[9], payload[10], payload[11]]);
    Ok((version, &payload[12..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_a_flipped_byte_is_caught() {
        let mut buf = Vec::new();
        write(&mut buf, Kind::Pages, &[7u8; 4104]).unwrap();
        let frame = read(&mut buf.as_slice()).unwrap();
        assert_eq!(frame.kind, Kind::Pages);
        assert_eq!(frame.payload, vec![7u8; 4104]);
        for i in [0, 3, 100, buf.len() - 1] {
            let mut bad = buf.clone();
            bad[i] ^= 1;
            assert!(read(&mut bad.as_slice()).is_err(), "byte {i} flipped");
        }
        let e = read(&mut &buf[..buf.len() - 2]).unwrap_err();
        assert!(matches!(e, WireError::Io(_)), "{e}");
    }

    #[test]
    fn a_pages_payload_is_whole_pages_at_a_page_boundary() {
        let payload = |gpa: u64, len: usize| [gpa.to_le_bytes().to_vec(), vec![7; len]].concat();
        let p = payload(0x3000, 2 * PAGE);
        assert_eq!(pages(&p), Some((0x3000, &p[8..])));
        // Post-copy placed a Pages frame at any address: only the userfaultfd
        // copy below refused one off a page boundary.
        assert_eq!(pages(&payload(0x3001, PAGE)), None);
        assert_eq!(pages(&payload(0x3000, PAGE - 1)), None);
        assert_eq!(pages(&payload(0x3000, 0)), None);
        assert_eq!(pages(&[0; 7]), None);
    }

    #[test]
    fn a_packed_payload_names_its_codec_and_each_page() {
        let entry = |gpa: u64, data: &[u8]| {
            [
                &gpa.to_le_bytes()[..],
                &(data.len() as u16).to_le_bytes(),
                data,
            ]
            .concat()
        };
        let p = [vec![2], entry(0x2000, b"abc"), entry(0x5000, b"z")].concat();
        assert_eq!(
            packed(&p),
            Some((
                CompressionAlgo::Zstd,
                vec![(0x2000, &b"abc"[..]), (0x5000, &b"z"[..])]
            ))
        );
        assert_eq!(packed(&[vec![3], entry(0x2000, b"abc")].concat()), None);
        assert_eq!(packed(&[vec![1], entry(0x2001, b"abc")].concat()), None);
        assert_eq!(packed(&[vec![1], entry(0x2000, b"")].concat()), None);
        // A length past the payload's end, and no page at all.
        assert_eq!(packed(&p[..p.len() - 1]), None);
        assert_eq!(packed(&[1]), None);
    }

    #[test]
    fn hello_carries_version_and_token() {
        let p = hello("s3cret");
        assert_eq!(parse_hello(&p).unwrap(), (VERSION, &b"s3cret"[..]));
        assert!(parse_hello(b"GARBAGE!\x01\0\0\0x").is_err());
    }
}
