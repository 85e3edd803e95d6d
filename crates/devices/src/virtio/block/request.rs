//! The virtio-blk request format (virtio 1.1, 5.2.6): the header, the segments of
//! a discard or write-zeroes, and one request as read from guest memory.

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

/// Sector size the virtio-blk protocol counts in.
pub const SECTOR_SIZE: u64 = 512;
/// Largest discard / write-zeroes range in one segment (sectors).
pub(super) const MAX_RANGE_SECTORS: u32 = 0x3f_ffff;
pub(super) const MAX_RANGE_SEGMENTS: u32 = 16;

// Request types and statuses (virtio 1.1, 5.2.6).
pub(super) const T_IN: u32 = 0;
pub(super) const T_OUT: u32 = 1;
pub(super) const T_FLUSH: u32 = 4;
pub(super) const T_GET_ID: u32 = 8;
pub(super) const T_DISCARD: u32 = 11;
pub(super) const T_WRITE_ZEROES: u32 = 13;
/// Request completed.
pub const S_OK: u8 = 0;
/// Request failed (bad sector, I/O error, write to a read-only disk).
pub const S_IOERR: u8 = 1;
/// Request type not supported.
pub const S_UNSUPP: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct RequestHeader {
    pub(super) kind: u32,
    _reserved: u32,
    pub(super) sector: u64,
}
// SAFETY: plain integers, any bit pattern is valid.
unsafe impl vm_memory::ByteValued for RequestHeader {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct Range {
    pub(super) sector: u64,
    pub(super) sectors: u32,
    pub(super) flags: u32,
}
// SAFETY: plain integers, any bit pattern is valid.
unsafe impl vm_memory::ByteValued for Range {}
pub(super) const RANGE_UNMAP: u32 = 1;

/// The segments of a discard or write-zeroes request.
pub(super) struct Segments {
    list: [Range; MAX_RANGE_SEGMENTS as usize],
    count: usize,
}

impl Segments {
    /// All the segments after the header, or `None` when there are none, more than
    /// [`MAX_RANGE_SEGMENTS`], or they cannot be read.
    fn read(reader: &mut Reader) -> Option<Self> {
        let count = reader.available_bytes() / std::mem::size_of::<Range>();
        if count == 0 || count > MAX_RANGE_SEGMENTS as usize {
            return None;
        }
        let mut segments = Segments {
            list: [Range::default(); MAX_RANGE_SEGMENTS as usize],
            count,
        };
        for range in &mut segments.list[..count] {
            *range = reader.read_obj().ok()?;
        }
        Some(segments)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Range> {
        self.list[..self.count].iter()
    }
}

/// One request, read from guest memory once: its header, what follows it, the
/// device-writable data buffers and the status byte.
pub(super) struct Request<'a> {
    pub(super) header: RequestHeader,
    /// The device-readable bytes after the header (write data, segments).
    pub(super) reader: Reader<'a>,
    pub(super) data: Writer<'a>,
    pub(super) status_writer: Writer<'a>,
    /// Discard and write-zeroes only.
    pub(super) segments: Option<Segments>,
}

impl<'a> Request<'a> {
    /// `None` when the chain is too malformed to carry a status.
    pub(super) fn parse(
        chain: DescriptorChain<&'a GuestMemoryMmap>,
        mem: &'a GuestMemoryMmap,
    ) -> Option<Self> {
        let mut reader = chain.clone().reader(mem).ok()?;
        let mut data = chain.writer(mem).ok()?;
        let data_len = data.available_bytes().checked_sub(1)?;
        let status_writer = data.split_at(data_len).ok()?;
        let header: RequestHeader = reader.read_obj().ok()?;
        let segments = match header.kind {
            T_DISCARD | T_WRITE_ZEROES => Segments::read(&mut reader),
            _ => None,
        };
        Some(Self {
            header,
            reader,
            data,
            status_writer,
            segments,
        })
    }

    /// The bytes the request moves, for the rate limiters.
    pub(super) fn bytes(&self) -> u64 {
        match self.header.kind {
            T_IN => self.data.available_bytes() as u64,
            T_OUT => self.reader.available_bytes() as u64,
            T_WRITE_ZEROES => self.segments.as_ref().map_or(0, |s| {
                s.iter()
                    .map(|r| u64::from(r.sectors) * SECTOR_SIZE)
                    .fold(0, u64::saturating_add)
            }),
            T_DISCARD => 0,
            _ => (self.reader.available_bytes() + self.data.available_bytes()) as u64,
        }
    }
}
