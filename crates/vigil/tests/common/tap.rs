//! A persistent tap interface for tests that need one (root or CAP_NET_ADMIN).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// A `struct ifreq`: the name, then a 24-byte union at offset 16.
fn ifreq(name: &str) -> [u8; 40] {
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    req
}

fn ifreq_flags(name: &str, flags: i32) -> [u8; 40] {
    let mut req = ifreq(name);
    req[16..18].copy_from_slice(&(flags as u16).to_ne_bytes());
    req
}

/// An ifreq carrying an AF_INET sockaddr (SIOCSIFADDR, SIOCSIFNETMASK).
fn ifreq_ipv4(name: &str, addr: Ipv4Addr) -> [u8; 40] {
    let mut req = ifreq(name);
    req[16..18].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    req[20..24].copy_from_slice(&addr.octets());
    req
}

/// Sets or clears TUNSETPERSIST on tap `name`, creating it if needed (with
/// `extra` flags: `IFF_MULTI_QUEUE`).
fn set_persist(name: &str, on: bool, extra: i32) -> std::io::Result<()> {
    let tun = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = ifreq_flags(name, libc::IFF_TAP | libc::IFF_NO_PI | extra);
    // SAFETY: TUNSETIFF and TUNSETPERSIST on our own fd with a 40-byte ifreq.
    unsafe {
        if libc::ioctl(tun.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) < 0
            || libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, on as libc::c_ulong) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs one interface ioctl on a throwaway AF_INET socket.
fn if_ioctl(request: libc::c_ulong, req: &mut [u8; 40]) -> std::io::Result<()> {
    // SAFETY: plain socket call.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: we own the fd just created.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: the interface ioctls read and write a 40-byte ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, req.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A persistent tap, up, removed on drop.
pub struct TestTap(String, i32);

impl TestTap {
    pub fn create(name: &str) -> std::io::Result<Self> {
        Self::create_flags(name, 0)
    }

    /// A multi-queue tap (`IFF_MULTI_QUEUE`), for `--net queue_pairs=`.
    pub fn create_multi_queue(name: &str) -> std::io::Result<Self> {
        Self::create_flags(name, libc::IFF_MULTI_QUEUE)
    }

    fn create_flags(name: &str, extra: i32) -> std::io::Result<Self> {
        set_persist(name, true, extra)?;
        let tap = TestTap(name.into(), extra);
        let mut req = ifreq(name);
        if_ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        let flags = i16::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as i16;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        if_ioctl(libc::SIOCSIFFLAGS, &mut req)?;
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Gives the host side of the tap an IPv4 address in a /24.
    pub fn set_ipv4(&self, addr: Ipv4Addr) -> std::io::Result<()> {
        if_ioctl(libc::SIOCSIFADDR, &mut ifreq_ipv4(&self.0, addr))?;
        let mask = Ipv4Addr::new(255, 255, 255, 0);
        if_ioctl(libc::SIOCSIFNETMASK, &mut ifreq_ipv4(&self.0, mask))
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = set_persist(&self.0, false, self.1);
    }
}

/// Runs `f` on a thread of its own in a new, empty network namespace, so that the
/// taps it creates, their addresses and the VMs it spawns (children inherit the
/// namespace) never share a network with the host.
pub fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare only changes this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Whether this process may create taps (root and /dev/net/tun); says why not.
pub fn can_use_tun() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: virtio-net tests need root and /dev/net/tun");
        return false;
    }
    true
}

/// Runs a tap test in a network namespace of its own (with the VM it spawns).
pub fn in_netns(test: fn()) {
    if let Err(e) = in_new_netns(test) {
        eprintln!("SKIP: cannot make a network namespace: {e}");
    }
}
