//! Reads of an image's holes. A sparse image (made by `truncate`, or any disk
//! not yet written all over) reads as zeroes where nothing was written, and the
//! kernel serves a read of a hole by allocating page-cache pages, zeroing them
//! and copying the zeroes out: host memory spent on caching zeroes, and at 64
//! KiB the zeroing cost four times the copy (BENCHMARKS.md, "Holes"). A read
//! run that lies wholly in a hole (`lseek(SEEK_DATA)` finds no data in it)
//! gets zeroes written into its buffers instead.
//!
//! Only data is remembered, per chunk of the image (data was seen in it: its
//! reads read), never a hole: a hole is asked about at each read, so whatever
//! writes the image (this device on any queue, or the host) a read sees what
//! the file holds at that moment, as a read through the page cache would.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Chunks are 1 MiB, or larger for images over 16 TiB (the map stays within
/// 2 MiB).
const MIN_CHUNK_SHIFT: u32 = 20;
const MAX_CHUNKS: u64 = 1 << 24;

pub(super) struct Holes {
    /// A regular file whose filesystem answers `SEEK_DATA`; false for a block
    /// device (all data), and after any error but "no data past here".
    enabled: bool,
    chunk_shift: u32,
    /// One bit per chunk: data was found in it.
    data: Vec<u64>,
}

impl Holes {
    /// The map of an image `bytes` long; `enabled` for a regular file.
    pub(super) fn new(bytes: u64, enabled: bool) -> Self {
        let mut chunk_shift = MIN_CHUNK_SHIFT;
        while bytes >> chunk_shift > MAX_CHUNKS {
            chunk_shift += 1;
        }
        let chunks = (bytes >> chunk_shift) + 1;
        Self {
            enabled,
            chunk_shift,
            data: if enabled {
                vec![0; chunks.div_ceil(64) as usize]
            } else {
                Vec::new()
            },
        }
    }

    /// Whether the `len` bytes at `offset` of `file` lie wholly in a hole
    /// (they read as zeroes, and the file goes on past them).
    pub(super) fn within_hole(&mut self, file: &File, offset: u64, len: u64) -> bool {
        let Some(end) = offset.checked_add(len).filter(|_| self.enabled && len > 0) else {
            return false;
        };
        let (first, last) = (offset >> self.chunk_shift, (end - 1) >> self.chunk_shift);
        if (first..=last).any(|chunk| self.has_data(chunk)) {
            return false;
        }
        let Ok(at) = libc::off_t::try_from(offset) else {
            return false;
        };
        // SAFETY: lseek on the device's own descriptor; it moves the file
        // offset, which nothing uses (every read and write gives its own).
        let data = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
        if let Ok(data) = u64::try_from(data) {
            self.mark_data(data >> self.chunk_shift);
            return data >= end;
        }
        match std::io::Error::last_os_error() {
            // No data from `offset` on: a hole if the file still goes past it
            // (not one truncated under the device, whose reads must fail).
            e if e.raw_os_error() == Some(libc::ENXIO) => {
                file.metadata().is_ok_and(|m| m.len() >= end)
            }
            e => {
                tracing::info!("virtio-blk: the image cannot tell its holes ({e}); reads read");
                self.enabled = false;
                false
            }
        }
    }

    fn has_data(&self, chunk: u64) -> bool {
        let word = self.data.get((chunk / 64) as usize).copied().unwrap_or(0);
        word & (1 << (chunk % 64)) != 0
    }

    fn mark_data(&mut self, chunk: u64) {
        if let Some(word) = self.data.get_mut((chunk / 64) as usize) {
            *word |= 1 << (chunk % 64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    /// A sparse file of `len` bytes with 4 KiB of data at each of `data_at`,
    /// unlinked (gone with its descriptor).
    fn sparse(name: &str, len: u64, data_at: &[u64]) -> File {
        let path =
            std::env::temp_dir().join(format!("vigil-holes-{name}-{}.img", std::process::id()));
        let file = File::create_new(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(len).unwrap();
        for &at in data_at {
            file.write_all_at(&[7; 4096], at).unwrap();
        }
        file
    }

    #[test]
    fn a_range_is_a_hole_only_with_no_data_in_it_and_the_file_past_it() {
        let file = sparse("range", 4 * MIB, &[MIB + 4096]);
        let mut holes = Holes::new(4 * MIB, true);
        assert!(holes.within_hole(&file, 0, 64 << 10));
        assert!(holes.within_hole(&file, 2 * MIB, 256 << 10));
        assert!(!holes.within_hole(&file, MIB, 64 << 10), "data 4 KiB in");
        assert!(
            !holes.within_hole(&file, MIB - 4096, 8192 + 4096),
            "data at its end"
        );
        assert!(
            !holes.within_hole(&file, 4 * MIB - 4096, 8192),
            "past the end"
        );
        assert!(!holes.within_hole(&file, 0, 0));
    }

    #[test]
    fn a_hole_written_since_is_data() {
        let file = sparse("written", 4 * MIB, &[]);
        let mut holes = Holes::new(4 * MIB, true);
        assert!(holes.within_hole(&file, 3 * MIB, 4096));
        file.write_all_at(&[1; 512], 3 * MIB + 1024).unwrap();
        assert!(!holes.within_hole(&file, 3 * MIB, 4096));
        // The chunk is remembered: a hole beside the data in it reads too.
        assert!(!holes.within_hole(&file, 3 * MIB + 65536, 4096));
        assert!(holes.within_hole(&file, 2 * MIB, 4096));
    }

    #[test]
    fn an_image_truncated_under_the_device_has_no_hole_past_its_end() {
        let file = sparse("truncated", 4 * MIB, &[]);
        let mut holes = Holes::new(4 * MIB, true);
        file.set_len(MIB).unwrap();
        assert!(holes.within_hole(&file, 0, 4096));
        assert!(!holes.within_hole(&file, 2 * MIB, 4096));
    }

    #[test]
    fn a_block_device_is_all_data() {
        let file = sparse("disabled", MIB, &[]);
        assert!(!Holes::new(MIB, false).within_hole(&file, 0, 4096));
    }

    #[test]
    fn the_map_of_a_huge_image_stays_small() {
        let holes = Holes::new(1 << 50, true);
        assert!(holes.data.len() * 8 <= 2 * MIB as usize + 8);
        assert_eq!((1u64 << 50) >> holes.chunk_shift, MAX_CHUNKS);
    }
}
