//! Guest buffers handed to the kernel as iovecs, so a read or a write moves
//! data between a file (a disk image, a tap) and guest memory without a copy
//! through a buffer of the device's.

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::GuestMemoryMmap;

/// An iovec list: pointers into guest memory.
#[derive(Default)]
pub(crate) struct Iovecs(pub(crate) Vec<libc::iovec>);

// SAFETY: the pointers are into guest memory, which every thread of the VMM
// shares (`GuestMemoryMmap` is `Send` and `Sync`); only the owning device reads
// the list, and the kernel while a request is in flight (or during the call
// that uses it).
unsafe impl Send for Iovecs {}

/// Fills `out` with iovecs for `segments` of guest memory, the first `skip`
/// bytes left out; returns the bytes they cover. `None` when a segment is not
/// guest memory the kernel can be handed (one across a region boundary).
pub(crate) fn guest_iovecs(
    mem: &GuestMemoryMmap,
    segments: &[(GuestAddress, usize)],
    mut skip: usize,
    out: &mut Vec<libc::iovec>,
) -> Option<usize> {
    out.clear();
    let mut len = 0;
    for &(addr, n) in segments {
        let slice = mem.get_slice(addr, n).ok()?;
        if skip >= n {
            skip -= n;
            continue;
        }
        out.push(libc::iovec {
            // SAFETY: `skip < n`: inside the slice just checked.
            iov_base: unsafe { slice.ptr_guard_mut().as_ptr().add(skip) }.cast(),
            iov_len: n - skip,
        });
        len += n - skip;
        skip = 0;
    }
    Some(len)
}

/// Marks the first `len` bytes of `segments` of guest memory written (the
/// dirty bitmap a snapshot or a migration reads).
pub(crate) fn mark_written(mem: &GuestMemoryMmap, segments: &[(GuestAddress, usize)], len: usize) {
    let mut left = len;
    for &(addr, n) in segments {
        if left == 0 {
            break;
        }
        let n = n.min(left);
        if let Ok(s) = mem.get_slice(addr, n) {
            s.bitmap().mark_dirty(0, n);
        }
        left -= n;
    }
}
