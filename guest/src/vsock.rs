//! The `vsock` scenario: a stream connection from the guest to CID 2 port 1234
//! through the first virtio-vsock device (DeviceID 19), an echo, a shutdown; and
//! `vsock-listen`: the guest accepts a connection from the host on port 5000 and
//! echoes what it receives. Both with the polled driver of `virtio.rs` at CPL3.

use crate::cpu::rdtsc;
use crate::serial::{Line, Out, Serial};
use crate::virtio::{self, dma, rd, wr, zero, Clock, Dev, Devices, Queue, MQ_BUF, WRITE};
use crate::Machine;

const ID_VSOCK: u32 = 19;
const HDR: u64 = 44;
const HOST_CID: u64 = 2;
const HOST_PORT: u32 = 1234;
const LOCAL_PORT: u32 = 49152;
const LISTEN_PORT: u32 = 5000;
const BUF_ALLOC: u32 = 4096;
const PING: &[u8] = b"vigil-vsock-ping";

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;

const RX: u16 = 0;
const TX: u16 = 1;
const EVENT: u16 = 2;
const RX_BUFFERS: u16 = 4;
const RX_LEN: u64 = 1024;
const TX_BUF: u64 = MQ_BUF + RX_BUFFERS as u64 * RX_LEN;
const EVENT_BUF: u64 = TX_BUF + 0x800;

fn rx_buf(id: u16) -> u64 {
    dma(MQ_BUF) + u64::from(id) * RX_LEN
}

struct Conn {
    cid: u64,
    rx: Queue,
    tx: Queue,
    /// The event queue: one 8-byte buffer at EVENT_BUF.
    event: Queue,
    fwd_cnt: u32,
    local_port: u32,
    /// The host's port; 0 while listening (any source port is ours then).
    peer_port: u32,
}

impl Conn {
    /// Sends one packet (header and `payload`) and waits until the device used it.
    fn send(&mut self, op: u16, flags: u32, payload: &[u8]) -> Result<(), &'static str> {
        let p = dma(TX_BUF);
        zero(p, HDR as usize);
        wr(p, self.cid);
        wr(p + 8, HOST_CID);
        wr(p + 16, self.local_port);
        wr(p + 20, self.peer_port);
        wr(p + 24, payload.len() as u32);
        wr(p + 28, 1u16);
        wr(p + 30, op);
        wr(p + 32, flags);
        wr(p + 36, BUF_ALLOC);
        wr(p + 40, self.fwd_cnt);
        for (i, &b) in payload.iter().enumerate() {
            wr(p + HDR + i as u64, b);
        }
        self.tx
            .desc(0, p, (HDR as usize + payload.len()) as u32, 0, 0);
        self.tx.push_avail(0);
        self.tx.notify();
        self.tx.wait_used(2000).map(|_| ())
    }

    /// The next packet for our connection: (op, rx buffer id, payload length). The
    /// caller posts the buffer again with `repost`.
    fn recv(&mut self, ms: u64) -> Result<(u16, u16, u32), &'static str> {
        loop {
            let (id, len) = self.rx.wait_used(ms)?;
            if id >= RX_BUFFERS || u64::from(len) < HDR {
                return Err("bad used element");
            }
            let b = rx_buf(id);
            let ours = rd::<u64>(b) == HOST_CID
                && rd::<u64>(b + 8) == self.cid
                && (self.peer_port == 0 || rd::<u32>(b + 16) == self.peer_port)
                && rd::<u32>(b + 20) == self.local_port;
            if !ours {
                self.repost(id);
                continue;
            }
            let plen = rd::<u32>(b + 24);
            if u64::from(plen) + HDR > u64::from(len) {
                return Err("payload longer than the used length");
            }
            return Ok((rd::<u16>(b + 30), id, plen));
        }
    }

    fn repost(&mut self, id: u16) {
        self.rx.push_avail(id);
        self.rx.notify();
    }
}

pub fn vsock(machine: &Machine, detail: &mut Line) -> bool {
    virtio::with_device(
        machine,
        detail,
        ID_VSOCK,
        "no virtio-vsock device",
        |dev, clock, detail| run(dev, clock, detail),
    )
}

/// Sets the device up and posts the receive buffers, for a connection between
/// `local_port` and `peer_port`.
fn open(
    dev: Dev,
    clock: Clock,
    local_port: u32,
    peer_port: u32,
    detail: &mut Line,
) -> Result<Conn, ()> {
    let set_up = || -> Result<Conn, &'static str> {
        let features = virtio::negotiate(dev, clock, 0)?;
        let rx = virtio::setup_queue(dev, clock, RX, features)?;
        let tx = virtio::setup_queue(dev, clock, TX, features)?;
        let mut event = virtio::setup_queue(dev, clock, EVENT, features)?;
        virtio::driver_ok(dev)?;
        event.desc(0, dma(EVENT_BUF), 8, WRITE, 0);
        event.push_avail(0);
        event.notify();
        Ok(Conn {
            cid: dev.config_u64(0),
            rx,
            tx,
            event,
            fwd_cnt: 0,
            local_port,
            peer_port,
        })
    };
    let mut c = match set_up() {
        Ok(c) => c,
        Err(error) => {
            detail.str(error);
            return Err(());
        }
    };
    for id in 0..RX_BUFFERS {
        c.rx.desc(id, rx_buf(id), RX_LEN as u32, WRITE, 0);
        c.rx.push_avail(id);
    }
    c.rx.notify();
    Ok(c)
}

fn run(dev: Dev, clock: Clock, detail: &mut Line) -> Result<(), ()> {
    let mut c = open(dev, clock, LOCAL_PORT, HOST_PORT, detail)?;

    let step = |detail: &mut Line, what: &str, r: Result<(), &'static str>| {
        r.map_err(|error| {
            detail.str(what).str(": ").str(error);
        })
    };
    step(detail, "request", c.send(OP_REQUEST, 0, &[]))?;
    let (op, id, _) = c.recv(3000).map_err(|e| {
        detail.str("response: ").str(e);
    })?;
    c.repost(id);
    if op != OP_RESPONSE {
        detail.str("response: op=").dec(u64::from(op));
        return Err(());
    }
    step(detail, "send", c.send(OP_RW, 0, PING))?;

    let mut echoed = 0u64;
    while echoed < PING.len() as u64 {
        let (op, id, len) = c.recv(3000).map_err(|e| {
            detail.str("echo: ").str(e);
        })?;
        match op {
            OP_RW => {
                let b = rx_buf(id) + HDR;
                for i in 0..u64::from(len) {
                    let k = echoed + i;
                    if k >= PING.len() as u64 || rd::<u8>(b + i) != PING[k as usize] {
                        detail.str("echo: mismatch at byte ").dec(k);
                        return Err(());
                    }
                }
                echoed += u64::from(len);
                c.fwd_cnt = c.fwd_cnt.wrapping_add(len);
            }
            OP_RST => {
                detail.str("echo: reset by the host after ").dec(echoed);
                return Err(());
            }
            _ => {}
        }
        c.repost(id);
    }
    step(detail, "shutdown", c.send(OP_SHUTDOWN, 3, &[]))?;
    // The host answers a full shutdown with RST (bounded wait; not required).
    let deadline_ms = 1000;
    while let Ok((op, id, _)) = c.recv(deadline_ms) {
        c.repost(id);
        if op == OP_RST {
            break;
        }
    }
    detail.str("cid=").dec(c.cid).str(" echoed=").dec(echoed);
    Ok(())
}

pub fn vsock_listen(machine: &Machine, detail: &mut Line) -> bool {
    virtio::with_device(
        machine,
        detail,
        ID_VSOCK,
        "no virtio-vsock device",
        |dev, clock, detail| listen(dev, clock, detail),
    )
}

/// How long the guest waits for the host to connect and to send.
const LISTEN_MS: u64 = 10_000;

fn listen(dev: Dev, clock: Clock, detail: &mut Line) -> Result<(), ()> {
    let mut c = open(dev, clock, LISTEN_PORT, 0, detail)?;
    Serial
        .str("vsock: listening on port ")
        .dec(u64::from(LISTEN_PORT))
        .str("\n");
    let (op, id, _) = c.recv(LISTEN_MS).map_err(|e| {
        detail.str("request: ").str(e);
    })?;
    let peer = rd::<u32>(rx_buf(id) + 16);
    c.repost(id);
    if op != OP_REQUEST {
        detail.str("request: op=").dec(u64::from(op));
        return Err(());
    }
    c.peer_port = peer;
    c.send(OP_RESPONSE, 0, &[]).map_err(|e| {
        detail.str("response: ").str(e);
    })?;

    // Echo until the host shuts its side down.
    let mut echoed = 0u64;
    let mut data = [0u8; 256];
    loop {
        let (op, id, len) = c.recv(LISTEN_MS).map_err(|e| {
            detail.str("receive: ").str(e);
        })?;
        match op {
            OP_RW => {
                let n = (len as usize).min(data.len());
                for (i, byte) in data[..n].iter_mut().enumerate() {
                    *byte = rd::<u8>(rx_buf(id) + HDR + i as u64);
                }
                c.repost(id);
                c.fwd_cnt = c.fwd_cnt.wrapping_add(len);
                c.send(OP_RW, 0, &data[..n]).map_err(|e| {
                    detail.str("echo: ").str(e);
                })?;
                echoed += n as u64;
            }
            OP_SHUTDOWN | OP_RST => {
                c.repost(id);
                break;
            }
            _ => c.repost(id),
        }
    }
    let _ = c.send(OP_RST, 0, &[]);
    detail
        .str("port=")
        .dec(u64::from(LISTEN_PORT))
        .str(" peer_port=")
        .dec(u64::from(c.peer_port))
        .str(" echoed=")
        .dec(echoed);
    Ok(())
}

/// The malformed packets of `vsock-evil`, in order, and whether the device must
/// answer each with RST (a well-addressed packet it refuses) or drop it silently
/// (wrong CIDs, or no packet to be read at all).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Evil {
    /// RW whose header says 4096 payload bytes; the buffer has 16.
    Len,
    /// Op 99.
    Op,
    /// Type 2 (seqpacket), which the device does not do.
    Type,
    /// A REQUEST from a CID that is not the guest's.
    Src,
    /// A REQUEST to CID 7, not the host.
    Dst,
    /// 20 bytes: less than a header.
    Short,
    /// A descriptor far outside RAM.
    Oob,
    /// Descriptor 0 -> 1 -> 0.
    Loop,
    /// A descriptor of 0x7fff_ffff bytes.
    Huge,
}

const EVILS: [(Evil, &str, bool); 9] = [
    (Evil::Len, "len", true),
    (Evil::Op, "op", true),
    (Evil::Type, "type", true),
    (Evil::Src, "src", false),
    (Evil::Dst, "dst", false),
    (Evil::Short, "short", false),
    (Evil::Oob, "oob", false),
    (Evil::Loop, "loop", false),
    (Evil::Huge, "huge", false),
];

/// A port of the host where nothing listens: a REQUEST the device wrongly took
/// would come back as RST, too.
const NOWHERE: u32 = 1;
const OP_CREDIT_REQUEST: u16 = 7;

impl Conn {
    /// Sends the malformed packet `evil` from `local_port` to NOWHERE; waits until
    /// the device used it.
    fn send_evil(&mut self, evil: Evil) -> Result<(), &'static str> {
        let p = dma(TX_BUF);
        zero(p, HDR as usize + 16);
        let src_cid = if evil == Evil::Src {
            self.cid + 1
        } else {
            self.cid
        };
        let dst_cid = if evil == Evil::Dst { 7 } else { HOST_CID };
        let (op, len) = match evil {
            Evil::Len => (OP_RW, 4096u32),
            Evil::Op => (99, 0),
            _ => (OP_REQUEST, 0),
        };
        wr(p, src_cid);
        wr(p + 8, dst_cid);
        wr(p + 16, self.local_port);
        wr(p + 20, NOWHERE);
        wr(p + 24, len);
        wr(p + 28, if evil == Evil::Type { 2u16 } else { 1 });
        wr(p + 30, op);
        wr(p + 36, BUF_ALLOC);
        let whole = HDR as u32 + 16;
        match evil {
            Evil::Short => self.tx.desc(0, p, 20, 0, 0),
            Evil::Oob => self.tx.desc(0, virtio::FAR_OUTSIDE_RAM, whole, 0, 0),
            Evil::Loop => {
                self.tx.desc(0, p, HDR as u32, virtio::NEXT, 1);
                self.tx.desc(1, p + HDR, 16, virtio::NEXT, 0);
            }
            Evil::Huge => self.tx.desc(0, p, 0x7fff_ffff, 0, 0),
            _ => self.tx.desc(0, p, whole, 0, 0),
        }
        self.tx.push_avail(0);
        self.tx.notify();
        self.tx.wait_used(2000).map(|_| ())
    }

    /// Whether an RST for our ports arrives within `ms`.
    fn reset_within(&mut self, ms: u64) -> bool {
        while let Ok((op, id, _)) = self.recv(ms) {
            self.repost(id);
            if op == OP_RST {
                return true;
            }
        }
        false
    }
}

/// `vsock-evil`: malformed packets on the first virtio-vsock device, each followed
/// by a probe the device must answer (a CREDIT_REQUEST for no stream: RST), then a
/// whole connection with an echo, as `vsock`.
pub fn vsock_evil(machine: &Machine, detail: &mut Line) -> bool {
    virtio::with_device(
        machine,
        detail,
        ID_VSOCK,
        "no virtio-vsock device",
        |dev, clock, detail| evil(dev, clock, detail).and_then(|()| run(dev, clock, detail)),
    )
}

fn evil(dev: Dev, clock: Clock, detail: &mut Line) -> Result<(), ()> {
    let mut c = open(dev, clock, 0, NOWHERE, detail)?;
    let mut alive = 0;
    let mut good = true;
    for (i, (evil, name, answered)) in EVILS.into_iter().enumerate() {
        c.local_port = 50000 + i as u32;
        if let Err(error) = c.send_evil(evil) {
            detail.str(name).str(": ").str(error);
            return Err(());
        }
        let reset = c.reset_within(if answered { 2000 } else { 300 });
        detail
            .str(name)
            .str("=")
            .str(if reset { "rst" } else { "none" })
            .str(" ");
        good &= reset == answered;
        // The probe, from a port of its own.
        c.local_port = 60000 + i as u32;
        if c.send(OP_CREDIT_REQUEST, 0, &[]).is_ok() && c.reset_within(2000) {
            alive += 1;
        }
    }
    detail.str("alive=").dec(alive).str(" ");
    if !good || alive != EVILS.len() as u64 {
        return Err(());
    }
    Ok(())
}

/// The host port of the `mobility` scenario's stream (`<uds>_1235` on the host).
const STREAM_PORT: u32 = 1235;
/// Its first local port; each new connection takes the next.
const STREAM_LOCAL_PORT: u32 = 40000;
/// Bytes of one stream record: its number and [`stream_check`] of it (u64 each,
/// little-endian).
const STREAM_RECORD: u64 = 16;
/// Records per RW packet.
pub(crate) const STREAM_RECORDS_PER_PACKET: u64 = 32;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// A REQUEST not answered within this long is sent again, from the next port.
const CONNECT_MS: u64 = 2000;
/// After an RST the next REQUEST waits this long (the host may not listen yet).
const RETRY_MS: u64 = 100;

/// The second word of stream record `n`.
fn stream_check(n: u64) -> u64 {
    n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x005e_ed0f_5eed
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamState {
    /// No connection; the next REQUEST goes at or after this TSC.
    Closed(u64),
    /// REQUEST sent at this TSC.
    Connecting(u64),
    Established,
}

/// The `mobility` scenario's stream to the host: numbered records, sent within
/// the host's credit, driven a step at a time without waiting on the host. A
/// transport reset (the VM was restored or moved) or an RST drops the
/// connection; the next step connects again, from a new local port, and the
/// stream goes on from the next record number (records the old connection had
/// not delivered are lost, as the virtio spec allows).
pub(crate) struct Stream {
    c: Conn,
    dev: Dev,
    clock: Clock,
    state: StreamState,
    /// The next record's number.
    pub(crate) next: u64,
    /// Connections made (established) so far.
    pub(crate) connections: u64,
    /// Transport resets seen.
    pub(crate) resets: u64,
    /// Bytes sent on this connection, and the host's credit (its buf_alloc and
    /// fwd_cnt).
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

impl Stream {
    /// The first virtio-vsock device, set up; not connected yet.
    pub(crate) fn open(devices: &Devices, clock: Clock, detail: &mut Line) -> Result<Stream, ()> {
        let Some(dev) = virtio::find(devices, clock, ID_VSOCK, |_| true) else {
            detail.str("no virtio-vsock device");
            return Err(());
        };
        let c = open(dev, clock, STREAM_LOCAL_PORT, STREAM_PORT, detail)?;
        Ok(Stream {
            c,
            dev,
            clock,
            state: StreamState::Closed(0),
            next: 0,
            connections: 0,
            resets: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
        })
    }

    /// Whether a packet of records may go now.
    pub(crate) fn ready(&self) -> bool {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.state == StreamState::Established
            && self.peer_buf_alloc.saturating_sub(in_flight)
                >= (STREAM_RECORDS_PER_PACKET * STREAM_RECORD) as u32
    }

    /// Takes what the device sent (events, packets); connects when closed.
    pub(crate) fn poll(&mut self) -> Result<(), &'static str> {
        while let Some((id, _)) = self.c.event.take_used() {
            if id == 0 && rd::<u32>(dma(EVENT_BUF)) == EVENT_TRANSPORT_RESET {
                self.resets += 1;
                // The CID may have changed (virtio 1.2, 5.10.6.7).
                self.c.cid = self.dev.config_u64(0);
                self.drop_connection("transport reset", 0);
            }
            self.c.event.desc(0, dma(EVENT_BUF), 8, WRITE, 0);
            self.c.event.push_avail(0);
            self.c.event.notify();
        }
        while let Some((id, len)) = self.c.rx.take_used() {
            if id >= RX_BUFFERS || u64::from(len) < HDR {
                return Err("bad used element");
            }
            let b = rx_buf(id);
            let ours = rd::<u64>(b) == HOST_CID
                && rd::<u32>(b + 16) == STREAM_PORT
                && rd::<u32>(b + 20) == self.c.local_port;
            let op = rd::<u16>(b + 30);
            let plen = rd::<u32>(b + 24);
            if ours && !matches!(self.state, StreamState::Closed(_)) {
                self.peer_buf_alloc = rd::<u32>(b + 36);
                self.peer_fwd_cnt = rd::<u32>(b + 40);
                match op {
                    OP_RESPONSE => {
                        self.state = StreamState::Established;
                        self.connections += 1;
                        Serial
                            .str("vsock: connected port=")
                            .dec(u64::from(self.c.local_port))
                            .str(" from seq=")
                            .dec(self.next)
                            .str("\n");
                    }
                    OP_RST | OP_SHUTDOWN => self.drop_connection("reset by the host", RETRY_MS),
                    // What the host sends is not read: consumed all the same.
                    OP_RW => self.c.fwd_cnt = self.c.fwd_cnt.wrapping_add(plen),
                    _ => {}
                }
            }
            self.c.repost(id);
        }
        match self.state {
            StreamState::Closed(at) if rdtsc() >= at => {
                self.c.local_port += 1;
                (self.tx_cnt, self.c.fwd_cnt) = (0, 0);
                (self.peer_buf_alloc, self.peer_fwd_cnt) = (0, 0);
                self.c.send(OP_REQUEST, 0, &[])?;
                self.state = StreamState::Connecting(rdtsc());
            }
            StreamState::Connecting(at) if rdtsc().wrapping_sub(at) > self.clock.ms(CONNECT_MS) => {
                self.state = StreamState::Closed(0);
            }
            _ => {}
        }
        Ok(())
    }

    /// Sends the next [`STREAM_RECORDS_PER_PACKET`] records (call when [`Self::ready`]).
    pub(crate) fn send_records(&mut self) -> Result<(), &'static str> {
        let mut payload = [0u8; (STREAM_RECORDS_PER_PACKET * STREAM_RECORD) as usize];
        for (k, record) in payload.chunks_exact_mut(STREAM_RECORD as usize).enumerate() {
            let n = self.next + k as u64;
            record[..8].copy_from_slice(&n.to_le_bytes());
            record[8..].copy_from_slice(&stream_check(n).to_le_bytes());
        }
        self.c.send(OP_RW, 0, &payload)?;
        self.tx_cnt = self.tx_cnt.wrapping_add(payload.len() as u32);
        self.next += STREAM_RECORDS_PER_PACKET;
        Ok(())
    }

    /// Waits (up to `ms`) until the stream is connected and the host has taken
    /// every byte sent on it, asking for its credit; then shuts the connection
    /// down, both ways.
    pub(crate) fn close(&mut self, ms: u64) -> Result<(), &'static str> {
        let start = rdtsc();
        loop {
            self.poll()?;
            let established = self.state == StreamState::Established;
            if established && self.peer_fwd_cnt == self.tx_cnt {
                break;
            }
            if rdtsc().wrapping_sub(start) > self.clock.ms(ms) {
                return Err("the host did not take every byte");
            }
            if established {
                self.c.send(OP_CREDIT_REQUEST, 0, &[])?;
                let asked = rdtsc();
                while self.peer_fwd_cnt != self.tx_cnt
                    && rdtsc().wrapping_sub(asked) < self.clock.ms(10)
                {
                    self.poll()?;
                }
            }
        }
        self.c.send(OP_SHUTDOWN, 3, &[])?;
        self.state = StreamState::Closed(u64::MAX);
        Ok(())
    }

    /// Resets the device.
    pub(crate) fn reset(&self) {
        let _ = self.dev.reset(self.clock);
    }

    /// Drops the connection (saying so when it was established); the next
    /// REQUEST waits `retry_ms`.
    fn drop_connection(&mut self, why: &str, retry_ms: u64) {
        if self.state == StreamState::Established {
            Serial
                .str("vsock: ")
                .str(why)
                .str(" at seq=")
                .dec(self.next)
                .str("\n");
        }
        self.state = StreamState::Closed(rdtsc() + self.clock.ms(retry_ms));
    }
}
