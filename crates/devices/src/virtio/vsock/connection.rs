//! One stream between the guest and a host Unix socket: its state, the guest data
//! not yet written to the host, and the credit counters of flow control
//! (virtio 1.2, 5.10.6.3).

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;

/// What the device buffers per connection for data the guest sent (its credit).
pub(super) const BUF_ALLOC: u32 = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// A host client connected to `<uds>`; its `CONNECT <port>\n` line is coming.
    ReadingConnect,
    /// REQUEST sent to the guest; waiting for RESPONSE.
    Connecting,
    Established,
}

pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) state: State,
    /// Host-side port (ours) and guest-side port.
    pub(super) local_port: u32,
    pub(super) peer_port: u32,
    /// `CONNECT` line so far.
    pub(super) line: Vec<u8>,
    /// Guest data not yet written to the stream.
    pub(super) pending: VecDeque<u8>,
    /// Bytes of guest data passed on to the stream.
    pub(super) fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    pub(super) fwd_cnt_sent: u32,
    /// Bytes of stream data sent to the guest.
    pub(super) rx_cnt: u32,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    /// The host side closed or the guest shut down sending.
    pub(super) host_eof: bool,
}

impl Conn {
    pub(super) fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            line: Vec::new(),
            pending: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_eof: false,
        }
    }

    /// Bytes the guest can take now.
    pub(super) fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Writes what it can of `pending` to the stream.
    pub(super) fn flush(&mut self) -> std::io::Result<()> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Connects to a host Unix socket without waiting: a listener whose backlog is full
/// refuses at once (`EAGAIN`) instead of stalling the device event loop.
pub(super) fn connect_nonblocking(path: &str) -> std::io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connecting_to_a_full_listener_fails_at_once() {
        use socket2::{Domain, SockAddr, Socket, Type};
        let path =
            std::env::temp_dir().join(format!("vigil-vsock-full-{}.sock", std::process::id()));
        std::fs::remove_file(&path).ok();
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        listener.listen(0).unwrap();
        let path_str = path.to_str().unwrap();
        // Nobody accepts: past the backlog, connecting must fail rather than block.
        let results: Vec<_> = (0..4).map(|_| connect_nonblocking(path_str)).collect();
        std::fs::remove_file(&path).ok();
        assert!(results[0].is_ok());
        let refused = results
            .iter()
            .filter(|r| matches!(r, Err(e) if e.kind() == ErrorKind::WouldBlock))
            .count();
        assert!(refused >= 1, "{results:?}");
        assert!(connect_nonblocking("/nonexistent/vigil.sock").is_err());
    }

    #[test]
    fn credit_counts_bytes_in_flight() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, State::Established, 1, 2);
        c.peer_buf_alloc = 100;
        c.rx_cnt = 60;
        c.peer_fwd_cnt = 20;
        assert_eq!(c.peer_credit(), 60);
        c.rx_cnt = 200;
        assert_eq!(c.peer_credit(), 0);
    }
}
