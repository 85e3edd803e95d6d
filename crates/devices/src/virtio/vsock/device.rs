//! The virtio-vsock device: its queues, the listening socket, the open
//! connections and the control packets owed to the guest.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use vigil_metrics::{DeviceCounters, DeviceKind};

use crate::virtio::Reader;
use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::connection::{connect_nonblocking, Conn, State, BUF_ALLOC};
use super::packet::{
    Header, HDR_LEN, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::persist::Persist;
use crate::virtio::persist::DeviceState;
use crate::virtio::{
    add_used, copy_config, pop_chain, serve_chains, whole_chain_reader, Budget, DeviceBroken, Next,
    Publish, QueueOutcome, Served, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1, YIELD,
};
use vigil_model::config::{FieldError, VsockConfig};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (virtio 1.2, 5.10.6.7): the guest drops
/// its connections and reads its CID again.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// Bytes of `struct virtio_vsock_event`.
const EVENT_LEN: usize = 4;
/// Most payload bytes in one packet either way.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Longest `CONNECT <port>\n` line a host client may send.
const MAX_CONNECT_LINE: usize = 32;
/// First port the device gives host-initiated connections (host side).
const FIRST_HOST_PORT: u32 = 1 << 30;

/// Errors attaching a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("uds_path {path:?}: cannot listen there: {source}")]
    Listen {
        path: String,
        source: std::io::Error,
    },
}

impl FieldError for VsockError {
    fn field(&self) -> &'static str {
        "uds_path"
    }
}

/// Counters of one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockCounters {
    pub connections: u64,
    pub resets_sent: u64,
    /// Packets dropped: unreadable chains, bad lengths, wrong CIDs.
    pub dropped: u64,
}

/// Most control packets (RST, RESPONSE, credit updates) waiting for receive buffers.
const MAX_CONTROL: usize = 1024;
/// Most open streams (each holds a host socket), whoever opened them.
const MAX_CONNECTIONS: usize = 1024;

/// A virtio-vsock device.
pub struct Vsock {
    pub(super) cid: u64,
    pub(super) uds: PathBuf,
    listener: UnixListener,
    conns: Vec<Conn>,
    /// Control packets waiting for a receive buffer.
    control: VecDeque<Header>,
    /// The guest has receive buffers (as far as the device knows).
    rx_ready: bool,
    /// The transmit queue had more than one call's budget: come back to it.
    tx_pending: bool,
    next_port: u32,
    /// Streams closed but maybe still registered with the event loop; dropped
    /// once left out of a `watched_fds` answer.
    closing: Vec<UnixStream>,
    closing_old: Vec<UnixStream>,
    buf: Vec<u8>,
    counters: VsockCounters,
    /// A transport reset event is owed to the guest (the device was restored).
    reset_event: bool,
    metrics: Arc<DeviceCounters>,
}

impl Vsock {
    /// Listens on `config.uds` (a stale socket file there is replaced).
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        let err = |source| VsockError::Listen {
            path: config.uds.display().to_string(),
            source,
        };
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(&config.uds) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(&config.uds).map_err(err)?;
            }
        }
        let listener = UnixListener::bind(&config.uds).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(Self {
            cid: config.cid,
            uds: config.uds.clone(),
            listener,
            conns: Vec::new(),
            control: VecDeque::new(),
            rx_ready: true,
            tx_pending: false,
            next_port: FIRST_HOST_PORT,
            closing: Vec::new(),
            closing_old: Vec::new(),
            buf: vec![0; MAX_PAYLOAD],
            counters: VsockCounters::default(),
            reset_event: false,
            metrics: Arc::new(DeviceCounters::new(DeviceKind::Vsock, "vsock0")),
        })
    }

    /// Owes the guest a transport reset event: sent on the event queue as soon as
    /// the driver runs and has an event buffer there.
    pub(super) fn queue_transport_reset(&mut self) {
        self.reset_event = true;
    }

    /// Sends the events owed to the guest on the event queue. A buffer too short
    /// for an event is handed back empty.
    fn send_events(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceBroken> {
        let mut used = false;
        if !self.reset_event {
            return Ok(used);
        }
        let Some(queue) = queues.get_mut(EVENT).filter(|q| q.ready()) else {
            return Ok(used);
        };
        let mut budget = Budget::of(queue);
        while self.reset_event {
            let chain = match pop_chain(queue, mem, &mut budget)? {
                Next::Chain(chain) => chain,
                Next::Empty | Next::Later => break,
            };
            let head = chain.head_index();
            let sent = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= EVENT_LEN => {
                    w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok()
                }
                _ => false,
            };
            if sent {
                self.reset_event = false;
            } else {
                tracing::debug!(head, "unusable vsock event buffer");
                self.counters.dropped += 1;
            }
            add_used(queue, mem, head, if sent { EVENT_LEN as u32 } else { 0 })?;
            used = true;
        }
        Ok(used)
    }

    /// Counts into `metrics` (shared with whoever reads them) from now on.
    pub fn with_counters(mut self, metrics: Arc<DeviceCounters>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Connections made, resets sent, packets dropped.
    pub fn counters(&self) -> VsockCounters {
        self.counters
    }

    fn header(&self, conn: &Conn, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: conn.local_port,
            dst_port: conn.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: conn.fwd_cnt,
        }
    }

    /// Queues a control packet for the guest. A guest that floods the transmit
    /// queue without giving receive buffers cannot grow this without bound: past
    /// [`MAX_CONTROL`] packets, new ones are dropped (and counted).
    fn queue_control(&mut self, hdr: Header) {
        if self.control.len() >= MAX_CONTROL {
            self.counters.dropped += 1;
            self.metrics.errors.inc();
            return;
        }
        self.control.push_back(hdr);
    }

    fn rst_for(&mut self, hdr: &Header) {
        self.counters.resets_sent += 1;
        self.queue_control(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            buf_alloc: BUF_ALLOC,
            ..Header::default()
        });
    }

    fn close(&mut self, i: usize) {
        let conn = self.conns.swap_remove(i);
        self.closing.push(conn.stream);
    }

    fn reset_conn(&mut self, i: usize) {
        let rst = self.header(&self.conns[i], OP_RST);
        self.counters.resets_sent += 1;
        self.queue_control(rst);
        self.close(i);
    }

    /// The connection between these ports. A host client still sending its
    /// `CONNECT` line has no guest port yet: no guest packet may reach it.
    fn find(&self, local_port: u32, peer_port: u32) -> Option<usize> {
        self.conns.iter().position(|c| {
            c.state != State::ReadingConnect
                && c.local_port == local_port
                && c.peer_port == peer_port
        })
    }

    /// The next host port no connection uses (there are at most
    /// `MAX_CONNECTIONS`, so one is found within that many steps).
    fn free_host_port(&mut self) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = self.next_port.wrapping_add(1).max(FIRST_HOST_PORT);
            if !self.conns.iter().any(|c| c.local_port == port) {
                return port;
            }
        }
    }

    /// One packet from the guest, its CIDs checked.
    fn handle_packet(&mut self, hdr: Header, payload: &[u8]) {
        if hdr.kind != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.rst_for(&hdr);
            }
            return;
        }
        let found = self.find(hdr.dst_port, hdr.src_port);
        if let Some(i) = found {
            let conn = &mut self.conns[i];
            conn.peer_buf_alloc = hdr.buf_alloc;
            conn.peer_fwd_cnt = hdr.fwd_cnt;
        }
        match (hdr.op, found) {
            (OP_REQUEST, None) if self.conns.len() >= MAX_CONNECTIONS => {
                tracing::debug!(
                    port = hdr.dst_port,
                    "vsock connection refused: too many open"
                );
                self.rst_for(&hdr);
            }
            (OP_REQUEST, None) => {
                let path = format!("{}_{}", self.uds.display(), hdr.dst_port);
                match connect_nonblocking(&path) {
                    Ok(stream) => {
                        let mut conn =
                            Conn::new(stream, State::Established, hdr.dst_port, hdr.src_port);
                        conn.peer_buf_alloc = hdr.buf_alloc;
                        conn.peer_fwd_cnt = hdr.fwd_cnt;
                        self.queue_control(self.header(&conn, OP_RESPONSE));
                        self.conns.push(conn);
                        self.counters.connections += 1;
                    }
                    Err(e) => {
                        tracing::debug!(path, "vsock connect failed: {e}");
                        self.rst_for(&hdr);
                    }
                }
            }
            (OP_RST, None) => {}
            (_, None) => self.rst_for(&hdr),
            (OP_RST, Some(i)) => self.close(i),
            (OP_RESPONSE, Some(i)) if self.conns[i].state == State::Connecting => {
                let conn = &mut self.conns[i];
                conn.state = State::Established;
                let line = format!("OK {}\n", conn.local_port);
                conn.pending.extend(line.as_bytes());
                // The OK line is not guest data: keep fwd_cnt where it was.
                conn.fwd_cnt = conn.fwd_cnt.wrapping_sub(line.len() as u32);
                if conn.flush().is_err() {
                    self.reset_conn(i);
                }
            }
            (OP_REQUEST | OP_RESPONSE, Some(i)) => self.reset_conn(i),
            (_, Some(i)) if self.conns[i].state != State::Established => self.reset_conn(i),
            (OP_RW, Some(i)) => {
                let conn = &mut self.conns[i];
                let in_flight = conn.pending.len() + payload.len();
                if in_flight > BUF_ALLOC as usize {
                    tracing::debug!("vsock guest overran its credit; reset");
                    self.reset_conn(i);
                    return;
                }
                conn.pending.extend(payload);
                if conn.flush().is_err() {
                    self.reset_conn(i);
                }
            }
            (OP_SHUTDOWN, Some(i)) => {
                if hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    let _ = self.conns[i].flush();
                    self.reset_conn(i);
                } else if hdr.flags & SHUTDOWN_SEND != 0 {
                    let conn = &mut self.conns[i];
                    let _ = conn.flush();
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            (OP_CREDIT_UPDATE, Some(_)) => {}
            (OP_CREDIT_REQUEST, Some(i)) => {
                let update = self.header(&self.conns[i], OP_CREDIT_UPDATE);
                self.conns[i].fwd_cnt_sent = self.conns[i].fwd_cnt;
                self.queue_control(update);
            }
            (_, Some(i)) => self.reset_conn(i),
        }
    }

    fn process_tx(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceBroken> {
        let outcome = serve_chains(queue, mem, Publish::Every8, |chain| {
            let head = chain.head_index();
            match whole_chain_reader(chain, mem) {
                Ok(mut reader) => self.packet_from(&mut reader),
                Err(e) => {
                    tracing::debug!(head, "malformed vsock tx chain: {e:?}");
                    self.counters.dropped += 1;
                    self.metrics.errors.inc();
                }
            }
            Ok(Served::Used(0))
        })?;
        Ok(match outcome {
            QueueOutcome::Done(used) => used,
            // More than one call's budget: come back (nothing here is rate limited).
            QueueOutcome::RetryAfter(_, used) => {
                self.tx_pending = true;
                used
            }
        })
    }

    /// One packet the guest sent: its header, then its payload.
    fn packet_from(&mut self, reader: &mut Reader<'_>) {
        let mut raw = [0u8; HDR_LEN];
        if reader.read_exact(&mut raw).is_err() {
            self.counters.dropped += 1;
            self.metrics.errors.inc();
            return;
        }
        let hdr = Header::parse(&raw);
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID {
            // Before anything else: such a packet must not touch a connection.
            tracing::debug!(?hdr, "vsock packet with wrong CIDs; dropped");
            self.counters.dropped += 1;
            self.metrics.errors.inc();
            return;
        }
        let len = hdr.len as usize;
        if len > MAX_PAYLOAD || len > reader.available_bytes() || (hdr.op != OP_RW && len != 0) {
            tracing::debug!(?hdr, "vsock packet of a bad length");
            self.counters.dropped += 1;
            self.metrics.errors.inc();
            if hdr.op != OP_RST {
                self.rst_for(&hdr);
                if let Some(i) = self.find(hdr.dst_port, hdr.src_port) {
                    self.close(i);
                }
            }
        } else if reader.read_exact(&mut self.buf[..len]).is_ok() {
            if hdr.op == OP_RW {
                self.metrics.transfer_out(len as u64);
            } else {
                self.metrics.ops_other.inc();
            }
            let payload = std::mem::take(&mut self.buf);
            self.handle_packet(hdr, &payload[..len]);
            self.buf = payload;
        } else {
            self.counters.dropped += 1;
            self.metrics.errors.inc();
        }
    }

    /// Fills the guest's receive buffers: control packets first, then stream data
    /// within the guest's credit.
    fn process_rx(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceBroken> {
        let mut used = false;
        let mut next_conn = 0;
        let mut budget = Budget::of(queue);
        loop {
            // What to send next: a control packet, or data from a readable stream.
            let mut packet: Option<(Header, usize)> = self.control.front().map(|h| (*h, 0));
            if packet.is_none() {
                while next_conn < self.conns.len() && packet.is_none() {
                    let i = next_conn;
                    let conn = &self.conns[i];
                    let want = conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent) >= BUF_ALLOC / 2;
                    if conn.state == State::Established && want {
                        packet = Some((self.header(conn, OP_CREDIT_UPDATE), usize::MAX));
                        break;
                    }
                    if conn.state != State::Established || conn.host_eof || conn.peer_credit() == 0
                    {
                        next_conn += 1;
                        continue;
                    }
                    packet = Some((self.header(conn, OP_RW), i));
                }
                if packet.is_none() {
                    return Ok(used);
                }
            }
            let chain = match pop_chain(queue, mem, &mut budget)? {
                Next::Chain(chain) => chain,
                Next::Empty => {
                    self.rx_ready = false;
                    return Ok(used);
                }
                // Host data is still waiting: its fds keep the event loop coming back.
                Next::Later => return Ok(used),
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(mem) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                _ => {
                    self.counters.dropped += 1;
                    self.metrics.errors.inc();
                    add_used(queue, mem, head, 0)?;
                    used = true;
                    continue;
                }
            };
            let (mut hdr, source) = packet.expect("chosen above");
            let mut len = 0;
            if hdr.op == OP_RW {
                let conn = &mut self.conns[source];
                let room = (writer.available_bytes() - HDR_LEN)
                    .min(conn.peer_credit() as usize)
                    .min(MAX_PAYLOAD);
                if room == 0 {
                    // A buffer with room for a header only (the credit is not zero
                    // here): no data fits. Reading 0 bytes would look like the
                    // host closing; putting it back would leave the readable stream
                    // waking the event loop for ever. It goes back empty.
                    self.counters.dropped += 1;
                    add_used(queue, mem, head, 0)?;
                    used = true;
                    continue;
                }
                match conn.stream.read(&mut self.buf[..room]) {
                    Ok(0) => {
                        // The host side closed: tell the guest, which answers RST.
                        conn.host_eof = true;
                        hdr.op = OP_SHUTDOWN;
                        hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                    }
                    Ok(n) => {
                        len = n;
                        conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                        hdr.len = n as u32;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        queue.go_to_previous_position();
                        next_conn += 1;
                        continue;
                    }
                    Err(_) => {
                        queue.go_to_previous_position();
                        self.reset_conn(source);
                        continue;
                    }
                }
                conn.fwd_cnt_sent = conn.fwd_cnt;
            } else if source == usize::MAX {
                if let Some(i) = self.find(hdr.src_port, hdr.dst_port) {
                    self.conns[i].fwd_cnt_sent = self.conns[i].fwd_cnt;
                }
            } else {
                self.control.pop_front();
            }
            let written = if writer.write_all(&hdr.bytes()).is_ok()
                && writer.write_all(&self.buf[..len]).is_ok()
            {
                if hdr.op == OP_RW {
                    self.metrics.transfer_in(len as u64);
                } else {
                    self.metrics.ops_other.inc();
                }
                (HDR_LEN + len) as u32
            } else {
                self.counters.dropped += 1;
                self.metrics.errors.inc();
                0
            };
            add_used(queue, mem, head, written)?;
            used = true;
        }
    }

    /// A host client connected to `<uds>`.
    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    // Past the limit the host client is simply closed.
                    if self.conns.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err()
                    {
                        continue;
                    }
                    let port = self.free_host_port();
                    self.conns
                        .push(Conn::new(stream, State::ReadingConnect, port, 0));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads a `CONNECT <port>\n` line; sends the REQUEST once it is complete.
    fn read_connect(&mut self, i: usize) {
        let mut byte = [0u8; 1];
        loop {
            match self.conns[i].stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if self.conns[i].line.len() < MAX_CONNECT_LINE => {
                    self.conns[i].line.push(byte[0])
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => {
                    self.close(i);
                    return;
                }
            }
        }
        let line = String::from_utf8_lossy(&self.conns[i].line).into_owned();
        let port = line
            .strip_prefix("CONNECT ")
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(port) = port else {
            tracing::debug!(line, "bad vsock CONNECT line");
            self.close(i);
            return;
        };
        // The guest may have opened a stream between the same two ports since
        // (its REQUEST names any host port): two connections would answer to it.
        if self.find(self.conns[i].local_port, port).is_some() {
            tracing::warn!(
                host_port = self.conns[i].local_port,
                guest_port = port,
                "vsock CONNECT refused: the guest holds a stream between these ports"
            );
            self.close(i);
            return;
        }
        let conn = &mut self.conns[i];
        conn.peer_port = port;
        conn.state = State::Connecting;
        let request = self.header(&self.conns[i], OP_REQUEST);
        self.queue_control(request);
        self.counters.connections += 1;
    }

    fn fill_rx(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceBroken> {
        match queues.get_mut(RX).filter(|q| q.ready()) {
            Some(queue) => self.process_rx(queue, mem),
            None => Ok(false),
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.cid.to_le_bytes();
        copy_config(&config, offset, data);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        _queue: &mut Queue,
        _mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        // All the work is in process_queues: tx packets are answered on rx.
        Ok(QueueOutcome::Done(false))
    }

    fn process_queues(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        let mut used = self.send_events(queues, mem)?;
        match index {
            RX => self.rx_ready = true,
            TX => {
                if let Some(queue) = queues.get_mut(TX) {
                    self.tx_pending = false;
                    used |= self.process_tx(queue, mem)?;
                }
            }
            _ => {}
        }
        used |= self.fill_rx(queues, mem)?;
        if self.tx_pending {
            return Ok(QueueOutcome::RetryAfter(YIELD, used));
        }
        Ok(QueueOutcome::Done(used))
    }

    fn watched_fds(&mut self) -> Vec<(RawFd, EventSet)> {
        self.closing_old = std::mem::take(&mut self.closing);
        let mut fds = vec![(self.listener.as_raw_fd(), EventSet::IN)];
        for conn in &self.conns {
            let mut set = EventSet::empty();
            let readable = match conn.state {
                State::ReadingConnect => true,
                State::Connecting => false,
                State::Established => self.rx_ready && !conn.host_eof && conn.peer_credit() > 0,
            };
            if readable {
                set |= EventSet::IN;
            }
            if !conn.pending.is_empty() {
                set |= EventSet::OUT;
            }
            if !set.is_empty() {
                fds.push((conn.stream.as_raw_fd(), set));
            }
        }
        fds
    }

    fn process_fd(
        &mut self,
        fd: RawFd,
        events: EventSet,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        if fd == self.listener.as_raw_fd() {
            self.accept();
        } else if let Some(i) = self.conns.iter().position(|c| c.stream.as_raw_fd() == fd) {
            if self.conns[i].state == State::ReadingConnect {
                self.read_connect(i);
            } else if events.contains(EventSet::OUT) && self.conns[i].flush().is_err() {
                self.reset_conn(i);
            }
        }
        let used = self.send_events(queues, mem)? | self.fill_rx(queues, mem)?;
        Ok(QueueOutcome::Done(used))
    }

    fn reset(&mut self) {
        for conn in self.conns.drain(..) {
            self.closing.push(conn.stream);
        }
        self.control.clear();
        self.rx_ready = true;
        // A driver starting afresh has no connections to drop.
        self.reset_event = false;
    }

    fn state(&self) -> DeviceState {
        DeviceState::Vsock(self.save())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_packets_waiting_for_the_guest_are_bounded() {
        let dir = std::env::temp_dir().join(format!("vigil-vsock-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut v = Vsock::new(&VsockConfig {
            cid: 3,
            uds: dir.join("v.sock"),
        })
        .unwrap();
        // A guest that connects to closed ports without ever posting receive buffers.
        let request = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 9,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        };
        for _ in 0..MAX_CONTROL + 500 {
            v.rst_for(&request);
        }
        assert_eq!(v.control.len(), MAX_CONTROL);
        assert_eq!(v.counters.dropped, 500);
        std::fs::remove_dir_all(&dir).ok();
    }
}
