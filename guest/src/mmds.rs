//! The `mmds` scenario: the guest reaches the VMM's metadata service (MMDS) on
//! the first virtio-net device as a guest OS would: ARP for 169.254.169.254,
//! then HTTP/1.1 over one TCP connection at a time. The client is hand-written
//! with fixed buffers and no retransmission (the VMM's end does not lose
//! frames), and runs at CPL3.
//!
//! Lines `mmds: ...` tell the host what the guest saw. V1 (a plain GET answers)
//! or V2 (it gets 401) is found from the first answer. After `mmds: ready patch`
//! the guest waits for a byte on the serial port (the host changed the store)
//! and reads the key again.

use crate::cpu::rdtsc;
use crate::serial::{self, Line, Out, Serial};
use crate::virtio::{self, dma, rd, wr, zero, Clock, Dev, Queue, MQ_BUF, MQ_BUF_LEN, WRITE};
use crate::Machine;

const ID_NET: u32 = 1;
const NET_F_MAC: u64 = 1 << 5;
/// `virtio_net_hdr_v1` with VIRTIO_F_VERSION_1.
const HDR: u64 = 12;
const RX_BUFFERS: u16 = 6;
const RX_LEN: u64 = 2048;
const TX_BUF: u64 = MQ_BUF + RX_BUFFERS as u64 * RX_LEN;
const FRAME_MAX: usize = 1514;
const _: () = assert!(TX_BUF + HDR + FRAME_MAX as u64 <= MQ_BUF + MQ_BUF_LEN);
const RX: u16 = 0;
const TX: u16 = 1;

const GUEST_IP: [u8; 4] = [169, 254, 0, 2];
const MMDS_IP: [u8; 4] = [169, 254, 169, 254];
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
/// The key the host puts in the store, and patches after `ready patch`.
const KEY: &[u8] = b"/latest/meta-data/ami-id";
const RESPONSE_MAX: usize = 2048;

/// The interface and the TCP connection under way.
struct Link {
    rx: Queue,
    tx: Queue,
    clock: Clock,
    mac: [u8; 6],
    peer: [u8; 6],
    port: u16,
}

/// One TCP segment from MMDS to our current port.
struct Segment {
    seq: u32,
    ack: u32,
    flags: u8,
    /// Where its payload lies in the frame buffer.
    data: (usize, usize),
}

fn checksum(data: &[u8], mut acc: u32) -> u16 {
    for pair in data.chunks(2) {
        let word = (u32::from(pair[0]) << 8) | pair.get(1).map_or(0, |&b| u32::from(b));
        acc += word;
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Link {
    fn send(&mut self, frame: &[u8]) -> Result<(), &'static str> {
        let len = frame.len().max(60);
        let at = dma(TX_BUF);
        zero(at, HDR as usize + len);
        for (i, &b) in frame.iter().enumerate() {
            wr(at + HDR + i as u64, b);
        }
        self.tx.desc(0, at, (HDR as usize + len) as u32, 0, 0);
        self.tx.push_avail(0);
        self.tx.notify();
        self.tx.wait_used(2000).map(|_| ())
    }

    /// The next frame received before `deadline` (TSC), copied into `buf`; its
    /// buffer is posted again.
    fn receive(&mut self, buf: &mut [u8; FRAME_MAX], deadline: u64) -> Result<usize, &'static str> {
        let left = deadline.saturating_sub(rdtsc()) / self.clock.ms(1);
        let (id, len) = self.rx.wait_used(left.max(1))?;
        if id >= RX_BUFFERS {
            return Err("receive: bad used id");
        }
        let at = dma(MQ_BUF) + u64::from(id) * RX_LEN;
        let n = (len as usize).saturating_sub(HDR as usize).min(FRAME_MAX);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = rd(at + HDR + i as u64);
        }
        self.rx.push_avail(id);
        self.rx.notify();
        Ok(n)
    }

    /// ARP for MMDS: its MAC.
    fn arp(&mut self) -> Result<(), &'static str> {
        let mut f = [0u8; 42];
        f[..6].fill(0xff);
        f[6..12].copy_from_slice(&self.mac);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        f[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&self.mac);
        f[28..32].copy_from_slice(&GUEST_IP);
        f[38..42].copy_from_slice(&MMDS_IP);
        self.send(&f)?;
        let deadline = rdtsc() + self.clock.ms(3000);
        let mut buf = [0u8; FRAME_MAX];
        loop {
            let n = self
                .receive(&mut buf, deadline)
                .map_err(|_| "no ARP reply")?;
            // Other traffic (IPv6 neighbour discovery on the tap) is skipped.
            if n >= 42
                && buf[12..14] == [0x08, 0x06]
                && buf[20..22] == [0, 2]
                && buf[28..32] == MMDS_IP
            {
                self.peer.copy_from_slice(&buf[22..28]);
                return Ok(());
            }
        }
    }

    fn segment(
        &mut self,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
    ) -> Result<(), &'static str> {
        let mut f = [0u8; FRAME_MAX];
        let total = 40 + payload.len();
        if 14 + total > FRAME_MAX {
            return Err("request too long");
        }
        f[..6].copy_from_slice(&self.peer);
        f[6..12].copy_from_slice(&self.mac);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&GUEST_IP);
        ip[16..20].copy_from_slice(&MMDS_IP);
        let sum = checksum(ip, 0);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let tcp_len = 20 + payload.len();
        let tcp = &mut f[34..34 + tcp_len];
        tcp[0..2].copy_from_slice(&self.port.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&(RESPONSE_MAX as u16).to_be_bytes());
        tcp[20..].copy_from_slice(payload);
        let mut pseudo = 0u32;
        for pair in GUEST_IP.chunks(2).chain(MMDS_IP.chunks(2)) {
            pseudo += u32::from(be16(pair));
        }
        pseudo += 6 + tcp_len as u32;
        let sum = checksum(tcp, pseudo);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        self.send(&f[..14 + total])
    }

    /// The next segment for our port before `deadline`.
    fn next_segment(
        &mut self,
        buf: &mut [u8; FRAME_MAX],
        deadline: u64,
    ) -> Result<Segment, &'static str> {
        loop {
            let n = self.receive(buf, deadline)?;
            // MMDS asking who we are (its neighbour cache is empty after a
            // snapshot restore): answered, as any host on the link would.
            if n >= 42
                && buf[12..14] == [0x08, 0x06]
                && buf[20..22] == [0, 1]
                && buf[38..42] == GUEST_IP
            {
                let mut f = [0u8; 42];
                f[..6].copy_from_slice(&buf[6..12]);
                f[6..12].copy_from_slice(&self.mac);
                f[12..22].copy_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
                f[22..28].copy_from_slice(&self.mac);
                f[28..32].copy_from_slice(&GUEST_IP);
                f[32..42].copy_from_slice(&buf[22..32]);
                self.send(&f)?;
                continue;
            }
            if n < 54 || buf[12..14] != [0x08, 0x00] || buf[23] != 6 || buf[26..30] != MMDS_IP {
                continue;
            }
            let ihl = usize::from(buf[14] & 0xf) * 4;
            let total = usize::from(be16(&buf[16..18]));
            let tcp = 14 + ihl;
            if ihl < 20 || 14 + total > n || tcp + 20 > 14 + total {
                continue;
            }
            if be16(&buf[tcp..]) != 80 || be16(&buf[tcp + 2..]) != self.port {
                continue;
            }
            let off = usize::from(buf[tcp + 12] >> 4) * 4;
            if off < 20 || tcp + off > 14 + total {
                continue;
            }
            return Ok(Segment {
                seq: be32(&buf[tcp + 4..]),
                ack: be32(&buf[tcp + 8..]),
                flags: buf[tcp + 13],
                data: (tcp + off, 14 + total),
            });
        }
    }

    /// One request on a new connection: the status, and the response's length
    /// in `resp` with where its body starts.
    fn http(
        &mut self,
        request: &[u8],
        resp: &mut [u8; RESPONSE_MAX],
    ) -> Result<(u16, usize, usize), &'static str> {
        self.port += 1;
        let isn = 0x1000_0000u32.wrapping_add(u32::from(self.port) << 16);
        let mut buf = [0u8; FRAME_MAX];
        let deadline = rdtsc() + self.clock.ms(3000);
        // The SYN again after a while without an answer: a peer that had to
        // ask for our MAC first dropped it.
        let mut tries = 0;
        let mut rcv = loop {
            if tries < 6 {
                tries += 1;
                self.segment(isn, 0, SYN, &[])?;
            }
            let retry = (rdtsc() + self.clock.ms(250)).min(deadline);
            let s = match self.next_segment(&mut buf, retry) {
                Ok(s) => s,
                Err(_) if rdtsc() < deadline => continue,
                Err(_) => return Err("no SYN-ACK"),
            };
            if s.flags & RST != 0 {
                return Err("connection refused");
            }
            if s.flags & (SYN | ACK) == SYN | ACK && s.ack == isn.wrapping_add(1) {
                break s.seq.wrapping_add(1);
            }
        };
        let snd = isn.wrapping_add(1);
        self.segment(snd, rcv, ACK | PSH, request)?;
        let snd = snd.wrapping_add(request.len() as u32);
        let mut got = 0;
        let mut fin = false;
        let done = |resp: &[u8], got: usize| -> Option<(usize, usize)> {
            let head = resp[..got].windows(4).position(|w| w == b"\r\n\r\n")? + 4;
            let tag = b"Content-Length: ";
            let at = resp[..head].windows(tag.len()).position(|w| w == tag)? + tag.len();
            let mut length = 0;
            for &d in resp[at..head].iter().take_while(|d| d.is_ascii_digit()) {
                length = length * 10 + usize::from(d - b'0');
            }
            (got >= head + length).then_some((head, head + length))
        };
        let (head, end) = loop {
            let s = self
                .next_segment(&mut buf, deadline)
                .map_err(|_| "no answer")?;
            if s.flags & RST != 0 {
                return Err("connection reset");
            }
            let (from, to) = s.data;
            if s.seq == rcv && to > from {
                let n = to - from;
                if got + n > RESPONSE_MAX {
                    return Err("answer too long");
                }
                resp[got..got + n].copy_from_slice(&buf[from..to]);
                got += n;
                rcv = rcv.wrapping_add(n as u32);
            }
            if s.flags & FIN != 0 && s.seq.wrapping_add((to - from) as u32) == rcv {
                rcv = rcv.wrapping_add(1);
                fin = true;
            }
            self.segment(snd, rcv, ACK, &[])?;
            if let Some(found) = done(resp, got) {
                break found;
            }
            if fin {
                return Err("closed before the whole answer");
            }
        };
        // We close first: MMDS closes its end and listens again.
        self.segment(snd, rcv, FIN | ACK, &[])?;
        let close_by = rdtsc() + self.clock.ms(1000);
        while !fin {
            let Ok(s) = self.next_segment(&mut buf, close_by) else {
                break;
            };
            if s.flags & FIN != 0 {
                rcv = s.seq.wrapping_add(1);
                fin = true;
            }
        }
        if fin {
            self.segment(snd.wrapping_add(1), rcv, ACK, &[])?;
        }
        if got < 12 || &resp[..9] != b"HTTP/1.1 " {
            return Err("not an HTTP answer");
        }
        let status = resp[9..12]
            .iter()
            .fold(0u16, |n, &d| n * 10 + u16::from(d.wrapping_sub(b'0')));
        Ok((status, head, end))
    }
}

/// A request with up to two extra header lines.
struct Request {
    buf: [u8; 512],
    len: usize,
}

impl Request {
    fn new(method: &str, path: &[u8]) -> Self {
        let mut r = Request {
            buf: [0; 512],
            len: 0,
        };
        r.add(method.as_bytes())
            .add(b" ")
            .add(path)
            .add(b" HTTP/1.1\r\nHost: 169.254.169.254\r\n");
        r
    }

    fn add(&mut self, bytes: &[u8]) -> &mut Self {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    fn header(mut self, name: &[u8], value: &[u8]) -> Self {
        self.add(name).add(b": ").add(value).add(b"\r\n");
        self
    }

    fn bytes(&mut self) -> &[u8] {
        self.add(b"\r\n");
        &self.buf[..self.len]
    }
}

/// Sends `req`, prints `mmds: WHAT status=S body=B` (newlines shown as `,`) and
/// returns the status, and the body in `resp`.
fn ask<'a>(
    link: &mut Link,
    what: &str,
    mut req: Request,
    resp: &'a mut [u8; RESPONSE_MAX],
) -> Result<(u16, &'a [u8]), &'static str> {
    let (status, head, end) = link.http(req.bytes(), resp)?;
    let body = &resp[head..end];
    let mut out = Serial;
    out.str("mmds: ")
        .str(what)
        .str(" status=")
        .dec(u64::from(status))
        .str(" body=");
    for &b in body.iter().take(160) {
        out.byte(if b == b'\n' { b',' } else { b });
    }
    out.str("\n");
    Ok((status, body))
}

fn expect(status: u16, wanted: u16, what: &'static str) -> Result<(), &'static str> {
    if status == wanted {
        Ok(())
    } else {
        Err(what)
    }
}

pub fn mmds(machine: &Machine, detail: &mut Line) -> bool {
    virtio::with_device(
        machine,
        detail,
        ID_NET,
        "no virtio-net device",
        |dev, clock, detail| match run(dev, clock, detail) {
            Ok(()) => Ok(()),
            Err(e) => {
                detail.str(e);
                Err(())
            }
        },
    )
}

fn run(dev: Dev, clock: Clock, detail: &mut Line) -> Result<(), &'static str> {
    let features = virtio::negotiate(dev, clock, NET_F_MAC)?;
    let mut rx = virtio::setup_queue(dev, clock, RX, features)?;
    let tx = virtio::setup_queue(dev, clock, TX, features)?;
    virtio::driver_ok(dev)?;
    let mut mac = [0u8; 6];
    for (i, byte) in mac.iter_mut().enumerate() {
        *byte = dev.config_u8(i as u64);
    }
    zero(dma(MQ_BUF), MQ_BUF_LEN as usize);
    for id in 0..RX_BUFFERS {
        rx.desc(
            id,
            dma(MQ_BUF) + u64::from(id) * RX_LEN,
            RX_LEN as u32,
            WRITE,
            0,
        );
        rx.push_avail(id);
    }
    rx.notify();
    let mut link = Link {
        rx,
        tx,
        clock,
        mac,
        peer: [0; 6],
        port: 49152,
    };
    link.arp()?;
    let mut out = Serial;
    out.str("mmds: arp mac=");
    for (i, b) in link.peer.iter().enumerate() {
        if i > 0 {
            out.str(":");
        }
        out.bytes(&[
            b"0123456789abcdef"[usize::from(b >> 4)],
            b"0123456789abcdef"[usize::from(b & 15)],
        ]);
    }
    out.str("\n");

    let mut resp = [0u8; RESPONSE_MAX];
    let (status, _) = ask(&mut link, "get", Request::new("GET", KEY), &mut resp)?;
    let mut token = [0u8; 64];
    let v2 = status == 401;
    if v2 {
        let put = |ttl: &[u8]| {
            Request::new("PUT", b"/latest/api/token").header(b"X-metadata-token-ttl-seconds", ttl)
        };
        let (status, _) = ask(
            &mut link,
            "forwarded",
            put(b"60").header(b"X-Forwarded-For", b"169.254.0.9"),
            &mut resp,
        )?;
        expect(status, 400, "a PUT with X-Forwarded-For was not refused")?;
        let (status, body) = ask(&mut link, "token", put(b"1"), &mut resp)?;
        expect(status, 200, "no token")?;
        if body.len() != token.len() {
            return Err("a token of an unexpected length");
        }
        token.copy_from_slice(body);
        let get = Request::new("GET", KEY).header(b"X-metadata-token", &token);
        let (status, _) = ask(&mut link, "get-token", get, &mut resp)?;
        expect(status, 200, "a GET with the token refused")?;
        let until = rdtsc() + clock.ms(1500);
        while rdtsc() < until {}
        let get = Request::new("GET", KEY).header(b"X-metadata-token", &token);
        let (status, _) = ask(&mut link, "expired", get, &mut resp)?;
        expect(status, 401, "an expired token accepted")?;
        let (status, body) = ask(&mut link, "token", put(b"600"), &mut resp)?;
        expect(status, 200, "no second token")?;
        if body.len() != token.len() {
            return Err("a second token of an unexpected length");
        }
        token.copy_from_slice(body);
    } else {
        expect(status, 200, "a V1 GET refused")?;
        let json = Request::new("GET", b"/latest").header(b"Accept", b"application/json");
        let (status, _) = ask(&mut link, "json", json, &mut resp)?;
        expect(status, 200, "a JSON GET refused")?;
        let (status, _) = ask(
            &mut link,
            "list",
            Request::new("GET", b"/latest/meta-data/"),
            &mut resp,
        )?;
        expect(status, 200, "a listing refused")?;
        let (status, _) = ask(
            &mut link,
            "missing",
            Request::new("GET", b"/no/such/key"),
            &mut resp,
        )?;
        expect(status, 404, "a missing key found")?;
    }

    Serial.str("mmds: ready patch\n");
    if serial::read_byte(clock.ms(60_000)).is_none() {
        return Err("no go from the host");
    }
    let mut get = Request::new("GET", KEY);
    if v2 {
        get = get.header(b"X-metadata-token", &token);
    }
    let (status, _) = ask(&mut link, "after-patch", get, &mut resp)?;
    expect(status, 200, "the key is gone after the patch")?;
    detail
        .str(if v2 { "version=V2" } else { "version=V1" })
        .str(" connections=")
        .dec(u64::from(link.port - 49152));
    Ok(())
}
