//! A Linux tap interface (`/dev/net/tun`), opened non-blocking with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte virtio-net header in front
//! of each frame (`TUNSETVNETHDRSZ`), offloads off (`TUNSETOFFLOAD 0`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vigil_model::config::net::IFNAME_MAX;
/// Bytes of the virtio-net header before each frame (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

// <linux/if_tun.h>: _IOW('T', n, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// An open tap.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the tap `name`, creating it when absent (both need root or
    /// CAP_NET_ADMIN, unless the tap was created for this user).
    pub fn open(name: &str) -> std::io::Result<Self> {
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
        // struct ifreq: the name (16 bytes), then a union whose first member here
        // is `short ifr_flags`.
        let mut ifreq = [0u8; 40];
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
        ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifreq` is large
        // enough for (40 bytes); the fd is ours.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = ifreq[..16].iter().position(|&b| b == 0).unwrap_or(16);
        Ok(Self {
            file,
            name: String::from_utf8_lossy(&ifreq[..end]).into_owned(),
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

use std::os::unix::fs::OpenOptionsExt;
