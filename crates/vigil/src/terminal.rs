//! Puts an interactive terminal in character mode for the guest console, and puts
//! it back however the VM ends.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;

/// Restores the terminal's settings when dropped.
pub struct TerminalGuard {
    saved: libc::termios,
}

impl TerminalGuard {
    /// Switches stdin to non-canonical, no-echo mode if it is a terminal. Signals
    /// (Ctrl-C) stay enabled: they stop the VM.
    pub fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let fd = stdin.as_raw_fd();
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is stdin, open for the life of the process; `saved` is writable.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: fd is valid and `raw` is a fully initialised termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter` on the same, still open fd.
        unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}
