//! A Linux tap interface (`/dev/net/tun`), opened non-blocking with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (and `IFF_MULTI_QUEUE`, an fd per queue,
//! for several queue pairs) and a 12-byte virtio-net header in front
//! of each frame (`TUNSETVNETHDRSZ`), offloads off (`TUNSETOFFLOAD 0`) until a
//! driver accepts some ([`Tap::set_offload`]). The ioctl
//! numbers and `struct ifreq` are libc's; the calls go through vmm-sys-util.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vigil_model::config::net::IFNAME_MAX;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Bytes of the virtio-net header before each frame (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

/// An open tap.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the tap `name`, creating it when absent (both need root or
    /// CAP_NET_ADMIN, unless the tap was created for this user).
    pub fn open(name: &str) -> std::io::Result<Self> {
        Self::open_flags(name, 0)
    }

    /// `queues` queues of the multi-queue tap `name` (`IFF_MULTI_QUEUE`; created
    /// so when absent), each its own fd, or the plain tap when `queues` is 1.
    /// All attached: the kernel spreads the frames it hands over among them.
    pub fn open_queues(name: &str, queues: u16) -> std::io::Result<Vec<Self>> {
        if queues <= 1 {
            return Ok(vec![Self::open(name)?]);
        }
        (0..queues)
            .map(|_| Self::open_flags(name, libc::IFF_MULTI_QUEUE))
            .collect()
    }

    /// Attaches this queue of a multi-queue tap, or detaches it: a detached
    /// queue is handed no frames, and those it held are dropped.
    pub fn set_queue_attached(&self, attached: bool) -> std::io::Result<()> {
        // SAFETY: `ifreq` is plain data: all zeroes is a valid value of it.
        let mut ifreq: libc::ifreq = unsafe { std::mem::zeroed() };
        let flag = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        ifreq.ifr_ifru.ifru_flags = flag as _;
        // SAFETY: TUNSETQUEUE reads the `struct ifreq` it is given, which lives
        // across the call; the fd is ours.
        if unsafe { ioctl_with_ref(&self.file, libc::TUNSETQUEUE, &ifreq) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn open_flags(name: &str, extra: libc::c_int) -> std::io::Result<Self> {
        if name.is_empty() || name.len() > IFNAME_MAX || name.as_bytes().contains(&0) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("an interface name has 1 to {IFNAME_MAX} bytes"),
            ));
        }
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // SAFETY: `ifreq` is plain data (a name and a union of integers and
        // addresses): all zeroes is a valid value of it.
        let mut ifreq: libc::ifreq = unsafe { std::mem::zeroed() };
        // IFNAME_MAX < IFNAMSIZ: the name stays NUL-terminated.
        for (to, from) in ifreq.ifr_name.iter_mut().zip(name.bytes()) {
            *to = from as libc::c_char;
        }
        ifreq.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | extra) as _;
        // SAFETY: TUNSETIFF reads and writes the `struct ifreq` it is given, which
        // lives across the call; the fd is ours.
        if unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut ifreq) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { ioctl_with_val(&file, libc::TUNSETOFFLOAD, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The kernel writes back the name it chose, NUL-terminated.
        let chosen: Vec<u8> = ifreq
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(Self {
            file,
            name: String::from_utf8_lossy(&chosen).into_owned(),
        })
    }

    /// A backend already open elsewhere: a tap set up as [`Tap::open`] does (handed
    /// over by a privileged parent, say), or any fd that carries one frame, with its
    /// 12-byte header, per read and per write, such as one end of a `SOCK_SEQPACKET`
    /// socket pair (tests and fuzzing, which need no root). Made non-blocking.
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<Self> {
        let raw = fd.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no pointers involved.
        unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            if flags < 0 || libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(Self {
            file: File::from(fd),
            name: format!("fd {raw}"),
        })
    }

    /// A tap without a network: one end of a `SOCK_SEQPACKET` socket pair, and
    /// the other end, where the host side reads the frames the device sends and
    /// writes the ones it receives (for tests and fuzzing, which need no root).
    pub fn pair() -> std::io::Result<(Self, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into the array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and ours.
        let (tap, host) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Self::from_fd(tap)?, host))
    }

    /// Which offloads (`TUN_F_*`) the frames the tap hands over may carry:
    /// checksums left partial, TCP segments larger than the MTU.
    pub fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD, flags.into()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its header); `WouldBlock` when there is none.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (with its header).
    pub fn write_frame(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
