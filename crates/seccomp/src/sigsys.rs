//! The SIGSYS handler: a forbidden call is reported, then the process dies by
//! SIGSYS. It runs in a signal handler, so it only makes async-signal-safe system
//! calls (each is in every kind's list: `filters::SIGSYS_HANDLER`) and writes
//! into a buffer on its stack.

use std::io;

use syscalls::Sysno;

/// The kernel's `siginfo_t` as filled for SIGSYS (`_sigsys` in the union):
/// `libc` has no accessor for the system call's number.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// `si_code` of a SIGSYS sent by a seccomp filter.
const SYS_SECCOMP: libc::c_int = 1;

/// Installs the handler for the whole process.
pub(crate) fn install() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the fields set
    // below are a handler with the SA_SIGINFO signature and its flag.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a valid handler for SIGSYS; no old action is read back.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `VIGIL_SECCOMP_PROBE`: a call no kind allows (`mount` with no arguments,
/// which would fail harmlessly if it ever were allowed).
pub(crate) fn probe() {
    // SAFETY: mount(2) with null pointers only returns an error; the filter
    // stops it before that.
    unsafe {
        libc::syscall(libc::SYS_mount, 0usize, 0usize, 0usize, 0usize, 0usize);
    }
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; for SIGSYS (the only signal this
    // handler is installed for) its union holds `_sigsys`, laid out as above.
    let (number, code) = unsafe {
        let info = &*info.cast::<SigsysInfo>();
        (info.syscall, info.code)
    };
    let mut comm = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into `comm`.
    unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) };
    let comm_len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());

    let mut line = Line::default();
    line.push(b"vigil: seccomp: the ");
    line.push(
        crate::current_kind()
            .map_or("unconfined", |k| k.name())
            .as_bytes(),
    );
    line.push(b" thread '");
    line.push(&comm[..comm_len]);
    line.push(b"' made a system call its filter forbids: ");
    let name = usize::try_from(number)
        .ok()
        .and_then(Sysno::new)
        .map_or("unknown", |s| s.name());
    line.push(name.as_bytes());
    line.push(b" (");
    line.number(number);
    line.push(b"); the VMM stops");
    if code != SYS_SECCOMP {
        line.push(b" (SIGSYS not from seccomp)");
    }
    line.push(b"\n");
    // SAFETY: writes the finished line from this stack buffer to stderr.
    unsafe { libc::write(2, line.bytes.as_ptr().cast(), line.len) };
    die();
}

/// Ends the process by SIGSYS without a core dump: guest memory is not written
/// to disk.
fn die() -> ! {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: only async-signal-safe calls on values of this frame: no core, the
    // default action for SIGSYS, SIGSYS unblocked, then sent to this thread.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
        // Not reached: the signal's default action ends the process.
        libc::_exit(128 + libc::SIGSYS)
    }
}

/// A line built without allocating.
struct Line {
    bytes: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            bytes: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, text: &[u8]) {
        let room = self.bytes.len() - self.len;
        let n = text.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
    }

    fn number(&mut self, n: libc::c_int) {
        let mut digits = [0u8; 12];
        let mut i = digits.len();
        let mut v = i64::from(n).unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            i -= 1;
            digits[i] = b'-';
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_holds_numbers_and_stops_at_its_end() {
        let mut line = Line::default();
        line.push(b"n=");
        line.number(-165);
        line.push(b" ");
        line.number(0);
        assert_eq!(&line.bytes[..line.len], b"n=-165 0");
        line.push(&[b'x'; 300]);
        assert_eq!(line.len, 256);
    }
}
