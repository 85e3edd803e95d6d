//! The `net` scenario: one Ethernet frame each way through the first virtio-net
//! device (DeviceID 1), with the polled driver of `virtio.rs` at CPL3.

use crate::cpu::rdtsc;
use crate::serial::{Line, Out};
use crate::virtio::{self, dma, rd, wr, zero, Clock, Dev, Queue, MQ_BUF, MQ_BUF_LEN, NEXT, WRITE};
use crate::Machine;

const ID_NET: u32 = 1;
const NET_F_MAC: u64 = 1 << 5;
/// `virtio_net_hdr_v1` with VIRTIO_F_VERSION_1.
const HDR: u64 = 12;
/// Local experimental ethertype (IEEE 802).
const ETHERTYPE: u16 = 0x88b5;
const TO_HOST: &[u8] = b"vigil-net-guest-to-host";
const FROM_HOST: &[u8] = b"vigil-net-host-to-guest";
/// Receive buffers of 2 KiB (header and a 1514-byte frame fit), then the transmit
/// buffer.
const RX_BUFFERS: u16 = 6;
const RX_LEN: u64 = 2048;
const TX_BUF: u64 = MQ_BUF + RX_BUFFERS as u64 * RX_LEN;
/// Header, Ethernet header and a 46-byte minimum payload.
const TX_LEN: u64 = HDR + 14 + 46;
const _: () = assert!(TX_BUF + TX_LEN <= MQ_BUF + MQ_BUF_LEN);
const RX: u16 = 0;
const TX: u16 = 1;

/// `VIRTIO_NET_F_MRG_RXBUF`.
const NET_F_MRG_RXBUF: u64 = 1 << 15;
/// With `net_mrg=1`: receive buffers of 512 bytes, so that a full frame spans
/// four of them.
const MRG_RX_LEN: u64 = 512;
const MRG_RX_BUFFERS: u16 = (RX_BUFFERS as u64 * RX_LEN / MRG_RX_LEN) as u16;
/// The byte at `offset` of the host's answer (an Ethernet frame), after its
/// marker.
fn answer_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

pub fn net(machine: &Machine, detail: &mut Line) -> bool {
    let Ok(Some(mrg)) = machine.number("net_mrg", 0, 1, Some(0), detail) else {
        return false;
    };
    virtio::with_device(
        machine,
        detail,
        ID_NET,
        "no virtio-net device",
        |dev, clock, detail| run(dev, clock, mrg == 1, detail),
    )
}

/// Receive buffer `id` of `len` bytes each.
fn rx_buf_of(id: u16, len: u64) -> u64 {
    dma(MQ_BUF) + u64::from(id) * len
}

/// Brings `dev` up with the offered part of `wanted`, both queues at their
/// default size, and posts `buffers` receive buffers of `buf_len` bytes: the
/// receive and transmit queues, the features accepted and the MAC.
fn start(
    dev: Dev,
    clock: Clock,
    wanted: u64,
    buffers: u16,
    buf_len: u64,
    detail: &mut Line,
) -> Result<(Queue, Queue, u64, [u8; 6]), ()> {
    let set_up = || -> Result<(Queue, Queue, u64), &'static str> {
        let features = virtio::negotiate(dev, clock, wanted)?;
        let rx = virtio::setup_queue(dev, clock, RX, features)?;
        let tx = virtio::setup_queue(dev, clock, TX, features)?;
        virtio::driver_ok(dev)?;
        Ok((rx, tx, features))
    };
    let (mut rx, tx, features) = set_up().map_err(|error| {
        detail.str(error);
    })?;
    let mut mac = [0u8; 6];
    for (i, byte) in mac.iter_mut().enumerate() {
        *byte = dev.config_u8(i as u64);
    }
    zero(dma(MQ_BUF), MQ_BUF_LEN as usize);
    for id in 0..buffers.min(rx.size()) {
        rx.desc(id, rx_buf_of(id, buf_len), buf_len as u32, WRITE, 0);
        rx.push_avail(id);
    }
    rx.notify();
    Ok((rx, tx, features, mac))
}

fn run(dev: Dev, clock: Clock, mrg: bool, detail: &mut Line) -> Result<(), ()> {
    let wanted = NET_F_MAC | if mrg { NET_F_MRG_RXBUF } else { 0 };
    let (buffers, buf_len) = if mrg {
        (MRG_RX_BUFFERS, MRG_RX_LEN)
    } else {
        (RX_BUFFERS, RX_LEN)
    };
    let (mut rx, mut tx, features, mac) = start(dev, clock, wanted, buffers, buf_len, detail)?;
    if features & wanted != wanted {
        detail.str(if features & NET_F_MAC == 0 {
            "no VIRTIO_NET_F_MAC"
        } else {
            "no VIRTIO_NET_F_MRG_RXBUF"
        });
        return Err(());
    }

    // Broadcast destination, our source, the ethertype, the payload, zero padding.
    let frame = dma(TX_BUF);
    for i in 0..6 {
        wr(frame + HDR + i, 0xffu8);
        wr(frame + HDR + 6 + i, mac[i as usize]);
    }
    wr(frame + HDR + 12, ETHERTYPE.to_be_bytes());
    for (i, &b) in TO_HOST.iter().enumerate() {
        wr(frame + HDR + 14 + i as u64, b);
    }
    tx.desc(0, frame, TX_LEN as u32, 0, 0);
    tx.push_avail(0);
    tx.notify();
    if let Err(error) = tx.wait_used(2000) {
        detail.str("send: ").str(error);
        return Err(());
    }

    // The host answers; other traffic (IPv6 router solicitations, ...) is skipped
    // and its buffers posted again. A frame is gathered into `frame` from as many
    // buffers as its header says (one without mergeable buffers).
    let mut frame = [0u8; 2048];
    let (mut received, mut others, mut spanned) = (0, 0u64, 0u64);
    while received == 0 {
        let mut len = 0usize;
        let mut count = 1u64;
        let mut ids = [0u16; 16];
        let mut taken = 0usize;
        while (taken as u64) < count {
            let (id, used) = match rx.wait_used(3000) {
                Ok(used) => used,
                Err(error) => {
                    detail.str("receive: ").str(error);
                    detail.str(" other_frames=").dec(others);
                    return Err(());
                }
            };
            if id >= buffers || u64::from(used) > buf_len || len + used as usize > frame.len() {
                detail
                    .str("receive: used id ")
                    .dec(u64::from(id))
                    .str(" len ")
                    .dec(u64::from(used));
                return Err(());
            }
            let buf = rx_buf_of(id, buf_len);
            for (i, byte) in frame[len..len + used as usize].iter_mut().enumerate() {
                *byte = rd::<u8>(buf + i as u64);
            }
            if taken == 0 {
                count = if mrg {
                    u64::from(u16::from_le_bytes([frame[10], frame[11]]))
                } else {
                    1
                };
                if count == 0 || count > ids.len() as u64 {
                    detail.str("receive: num_buffers=").dec(count);
                    return Err(());
                }
            }
            ids[taken] = id;
            taken += 1;
            len += used as usize;
        }
        let header = HDR as usize;
        let marker = header + 14..header + 14 + FROM_HOST.len();
        let wanted = len >= marker.end
            && frame[header + 12..header + 14] == ETHERTYPE.to_be_bytes()
            && frame[marker.clone()] == *FROM_HOST;
        if wanted {
            // Every byte after the marker is the host's pattern.
            if let Some(at) =
                (marker.end..len).find(|&i| frame[i] != answer_byte((i - header) as u64))
            {
                detail.str("receive: byte ").dec(at as u64).str(" differs");
                return Err(());
            }
            received += 1;
            spanned = count;
        } else {
            others += 1;
        }
        for &id in &ids[..taken] {
            rx.push_avail(id);
        }
        rx.notify();
    }

    detail.str("mac=");
    for (i, &b) in mac.iter().enumerate() {
        if i > 0 {
            detail.str(":");
        }
        let digits = b"0123456789abcdef";
        detail.bytes(&[digits[usize::from(b >> 4)], digits[usize::from(b & 15)]]);
    }
    detail.str(" sent=1 received=").dec(received);
    if mrg {
        detail.str(" buffers=").dec(spanned);
    }
    Ok(())
}

/// Frames `net-bench` sends or counts, unless `net_frames=` says.
const BENCH_FRAMES: u64 = 20_000;

/// Most frames `net-bench` keeps in flight, or receive buffers it posts
/// (`net_qd=`): a 256-entry queue's worth.
const BENCH_MAX_QD: u64 = virtio::BENCH_QUEUE_SIZE as u64;
/// `net_frame=`: Ethernet frame bytes `net-bench` sends (without the virtio
/// header), from the minimum to a full 1500-byte payload.
const BENCH_FRAME: (u64, u64) = (60, 1514);
const _: () = assert!(TX_BUF + HDR + BENCH_FRAME.1 <= MQ_BUF + MQ_BUF_LEN);

/// `net-bench`: 20000 frames of `net_frame=` bytes (60 by default), `net_qd=`
/// of them in flight (1 by default: each waits for the device to use it), timed
/// with the TSC at CPL3: the transmit packet rate; with `net_dir=rx`, the
/// receive rate of 20000 frames the host sends, `net_qd=` buffers posted. `VIRTIO_RING_F_EVENT_IDX` is used when the device
/// offers it (unless `net_event_idx=0`): a notification per batch, and used
/// buffers reaped once per pass with one interrupt status read.
pub fn net_bench(machine: &Machine, detail: &mut Line) -> bool {
    let params = (
        machine.number("net_qd", 1, BENCH_MAX_QD, Some(1), detail),
        machine.number("net_event_idx", 0, 1, Some(1), detail),
        machine.number(
            "net_frame",
            BENCH_FRAME.0,
            BENCH_FRAME.1,
            Some(BENCH_FRAME.0),
            detail,
        ),
        machine.number(
            "net_frames",
            1000,
            10_000_000,
            Some(BENCH_FRAMES),
            detail,
        ),
    );
    let (Ok(Some(qd)), Ok(Some(event_idx)), Ok(Some(frame_len)), Ok(Some(frames))) = params else {
        return false;
    };
    let receive = match machine.info.param(b"net_dir") {
        None | Some(b"tx") => false,
        Some(b"rx") => true,
        Some(other) => {
            detail
                .str("net_dir=")
                .bytes(other)
                .str(": expected tx or rx");
            return false;
        }
    };
    let buffers = if receive {
        let mib = (qd * RX_LEN).div_ceil(1 << 20);
        match crate::mobility::free_region(machine, "net_qd", mib, detail) {
            Some(_) => crate::mobility::DIRTY_BASE,
            None => return false,
        }
    } else {
        0
    };
    virtio::with_device(
        machine,
        detail,
        ID_NET,
        "no virtio-net device",
        |dev, clock, detail| {
            let len = HDR + frame_len;
            if receive {
                bench_rx(dev, clock, qd as u16, event_idx == 1, (len, frames), buffers, detail)
            } else {
                bench(dev, clock, qd as u16, event_idx == 1, (len, frames), detail)
            }
        },
    )
}

/// Payload prefixes of `net_dir=rx`: the guest's frames asking the host to start
/// (followed by the frame length wanted, big-endian) and to stop, and the host's
/// frames (`vigil bench net --dir rx`).
const RX_READY: &[u8] = b"vigil-net-bench-rx-ready";
const RX_DONE: &[u8] = b"vigil-net-bench-rx-done";
const RX_FLOOD: &[u8] = b"vigil-net-bench-rx-flood";

/// Sends one minimum frame of our ethertype carrying `payload` on `tx` (its
/// descriptor 0) and waits for the device to use it.
fn send_marker(tx: &mut Queue, payload: &[u8]) -> Result<(), &'static str> {
    let frame = dma(TX_BUF);
    write_frame(frame, payload);
    tx.desc(0, frame, TX_LEN as u32, 0, 0);
    tx.push_avail(0);
    tx.notify();
    tx.wait_used(2000).map(|_| ())
}

/// `net_dir=rx`: posts `qd` receive buffers of 2 KiB at `buffers`, asks the host
/// to flood (a ready frame, repeated until frames come), then counts
/// `frames` flood frames of `len` bytes (virtio header and frame), each
/// buffer posted again once read, timed with the TSC from the first; then a done
/// frame. Other frames (the host's own traffic) are skipped and counted.
fn bench_rx(
    dev: Dev,
    clock: Clock,
    qd: u16,
    event_idx: bool,
    (len, frames): (u64, u64),
    buffers: u64,
    detail: &mut Line,
) -> Result<(), ()> {
    let set_up = || -> Result<(Queue, Queue), &'static str> {
        let wanted = if event_idx { virtio::F_EVENT_IDX } else { 0 };
        let features = virtio::negotiate(dev, clock, wanted)?;
        let rx = virtio::setup_queue_at(
            dev,
            clock,
            RX,
            features,
            virtio::ring(RX),
            virtio::BENCH_QUEUE_SIZE,
        )?;
        let tx = virtio::setup_queue(dev, clock, TX, features)?;
        virtio::driver_ok(dev)?;
        Ok((rx, tx))
    };
    let (mut rx, mut tx) = match set_up() {
        Ok(queues) => queues,
        Err(error) => {
            detail.str(error);
            return Err(());
        }
    };
    let qd = qd.min(rx.size());
    let buf = |id: u16| buffers + u64::from(id) * RX_LEN;
    for id in 0..qd {
        rx.desc(id, buf(id), RX_LEN as u32, WRITE, 0);
        rx.push_avail(id);
    }
    rx.arm_used_event();
    rx.notify();
    let is_flood = |id: u16, used: u32| {
        u64::from(used) == len
            && rd::<[u8; 2]>(buf(id) + HDR + 12) == ETHERTYPE.to_be_bytes()
            && RX_FLOOD
                .iter()
                .enumerate()
                .all(|(i, &b)| rd::<u8>(buf(id) + HDR + 14 + i as u64) == b)
    };
    // The ready frame names the frame length wanted.
    let mut ready = [0u8; RX_READY.len() + 2];
    ready[..RX_READY.len()].copy_from_slice(RX_READY);
    ready[RX_READY.len()..].copy_from_slice(&((len - HDR) as u16).to_be_bytes());
    let (mut received, mut others) = (0u64, 0u64);
    let (mut start, mut asked) = (0u64, 0u64);
    let mut last_progress = rdtsc();
    while received < frames {
        let now = rdtsc();
        if received == 0 && (asked == 0 || now - asked > clock.ms(200)) {
            if let Err(error) = send_marker(&mut tx, &ready) {
                detail.str("ready: ").str(error);
                return Err(());
            }
            asked = now;
        }
        let old = rx.avail_index();
        while let Some((id, used)) = rx.pop_used() {
            if id >= qd {
                detail.str("receive: a used id that was never made available");
                return Err(());
            }
            if is_flood(id, used) {
                if received == 0 {
                    start = rdtsc();
                }
                received += 1;
            } else {
                others += 1;
            }
            rx.push_avail(id);
        }
        if rx.avail_index() != old {
            last_progress = rdtsc();
            rx.ack_interrupts();
            rx.arm_used_event();
            rx.notify_since(old);
        } else if rdtsc() - last_progress > clock.ms(5000) {
            detail
                .str("receive: timeout received=")
                .dec(received)
                .str(" other_frames=")
                .dec(others);
            return Err(());
        }
    }
    let us = ((rdtsc() - start) * 1000 / clock.ms(1)).max(1);
    // The host stops flooding at this frame (or when the VMM ends).
    if let Err(error) = send_marker(&mut tx, RX_DONE) {
        detail.str("done: ").str(error);
        return Err(());
    }
    report(detail, "rx", us, (len, frames), qd, rx.event_idx())
        .str(" other_frames=")
        .dec(others);
    Ok(())
}

/// The figures of a `net-bench` run in direction `dir` (`tx` or `rx`):
/// `frames` frames of `len` bytes (with the virtio header) in `us`.
fn report<'l>(
    detail: &'l mut Line,
    dir: &str,
    us: u64,
    (len, frames): (u64, u64),
    qd: u16,
    event_idx: bool,
) -> &'l mut Line {
    detail
        .str(dir)
        .str("_pps=")
        .dec(frames * 1_000_000 / us)
        .str(" ")
        .str(dir)
        .str("_kib_s=")
        .dec(frames * (len - HDR) * 1_000_000 / us / 1024)
        .str(" frames=")
        .dec(frames)
        .str(" frame=")
        .dec(len - HDR)
        .str(" qd=")
        .dec(u64::from(qd))
        .str(" event_idx=")
        .dec(u64::from(event_idx))
}

/// Sends `frames` buffers of `len` bytes (virtio header and frame).
fn bench(
    dev: Dev,
    clock: Clock,
    qd: u16,
    event_idx: bool,
    (len, frames): (u64, u64),
    detail: &mut Line,
) -> Result<(), ()> {
    let set_up = || -> Result<Queue, &'static str> {
        let wanted = if event_idx { virtio::F_EVENT_IDX } else { 0 };
        let features = virtio::negotiate(dev, clock, wanted)?;
        // The receive queue exists but gets no buffers: only transmit is measured.
        virtio::setup_queue(dev, clock, RX, features)?;
        let tx = virtio::setup_queue_at(
            dev,
            clock,
            TX,
            features,
            virtio::ring(TX),
            virtio::BENCH_QUEUE_SIZE,
        )?;
        virtio::driver_ok(dev)?;
        Ok(tx)
    };
    let mut tx = match set_up() {
        Ok(tx) => tx,
        Err(error) => {
            detail.str(error);
            return Err(());
        }
    };
    let qd = qd.min(tx.size());
    let frame = dma(TX_BUF);
    zero(frame, len as usize);
    for i in 0..6 {
        wr(frame + HDR + i, 0xffu8);
        wr(frame + HDR + 6 + i, [0x02u8, 0, 0, 0, 0, 0x99][i as usize]);
    }
    wr(frame + HDR + 12, ETHERTYPE.to_be_bytes());
    // Every slot's descriptor sends the same frame: the device only reads it.
    for slot in 0..qd {
        tx.desc(slot, frame, len as u32, 0, 0);
    }
    let mut free: [u16; BENCH_MAX_QD as usize] = [0; BENCH_MAX_QD as usize];
    for (slot, f) in free.iter_mut().enumerate().take(usize::from(qd)) {
        *f = slot as u16;
    }
    let mut free_count = usize::from(qd);
    let (mut sent, mut done, mut max_in_flight) = (0u64, 0u64, 0u64);
    tx.arm_used_event();
    let start = rdtsc();
    let mut last_progress = start;
    while done < frames {
        let old = tx.avail_index();
        while free_count > 0 && sent < frames {
            free_count -= 1;
            tx.push_avail(free[free_count]);
            sent += 1;
        }
        max_in_flight = max_in_flight.max(sent - done);
        if tx.avail_index() != old {
            tx.notify_since(old);
        }
        let mut batch = 0;
        while let Some((id, _)) = tx.pop_used() {
            if id >= qd {
                detail.str("send: a used id that was never made available");
                return Err(());
            }
            free[free_count] = id;
            free_count += 1;
            batch += 1;
        }
        let now = rdtsc();
        if batch > 0 {
            done += batch;
            last_progress = now;
            tx.ack_interrupts();
            tx.arm_used_event();
        } else if now - last_progress > clock.ms(2000) {
            detail.str("send: timeout");
            return Err(());
        }
    }
    let us = ((rdtsc() - start) * 1000 / clock.ms(1)).max(1);
    report(detail, "tx", us, (len, frames), qd, tx.event_idx())
        .str(" max_in_flight=")
        .dec(max_in_flight);
    Ok(())
}

/// The malformed transmit chains of `net-evil`, in order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Evil {
    /// A good frame, notified with the queues set up but before DRIVER_OK.
    PreOk,
    /// A descriptor far outside RAM.
    Oob,
    /// Descriptor 0 -> 1 -> 0, each half of a good frame.
    Loop,
    /// 8 bytes: shorter than the 12-byte virtio-net header.
    Short,
    /// The header alone, no Ethernet frame.
    HdrOnly,
    /// A descriptor of 0x7fff_ffff bytes.
    Huge,
    /// The frame marked device-writable.
    Dir,
    /// An available ring entry naming descriptor 200 of a 16-entry queue.
    BadHead,
}

const EVILS: [(Evil, &str); 8] = [
    (Evil::PreOk, "pre_ok"),
    (Evil::Oob, "oob"),
    (Evil::Loop, "loop"),
    (Evil::Short, "short"),
    (Evil::HdrOnly, "hdr"),
    (Evil::Huge, "huge"),
    (Evil::Dir, "dir"),
    (Evil::BadHead, "head"),
];

/// Payloads of the frames `net-evil` builds: the malformed chains carry the first
/// (the host must never see it), the good frame after each the second.
const EVIL_FRAME: &[u8] = b"vigil-net-evil-bad";
const GOOD_FRAME: &[u8] = b"vigil-net-evil-ok";
/// The good frame, after the one the malformed chains use.
const GOOD_BUF: u64 = TX_BUF + 0x800;
const _: () = assert!(GOOD_BUF + TX_LEN <= MQ_BUF + MQ_BUF_LEN);

/// A minimum-size broadcast frame of our ethertype carrying `payload` at `at`.
fn write_frame(at: u64, payload: &[u8]) {
    zero(at, TX_LEN as usize);
    for i in 0..6 {
        wr(at + HDR + i, 0xffu8);
        wr(at + HDR + 6 + i, [0x02u8, 0, 0, 0, 0, 0xee][i as usize]);
    }
    wr(at + HDR + 12, ETHERTYPE.to_be_bytes());
    for (i, &b) in payload.iter().enumerate() {
        wr(at + HDR + 14 + i as u64, b);
    }
}

/// Resets `dev` and sets up its queues; DRIVER_OK when `driver_ok`. The transmit
/// queue.
fn set_up_tx(dev: Dev, clock: Clock, driver_ok: bool) -> Result<Queue, &'static str> {
    let features = virtio::negotiate(dev, clock, 0)?;
    virtio::setup_queue(dev, clock, RX, features)?;
    let tx = virtio::setup_queue(dev, clock, TX, features)?;
    if driver_ok {
        virtio::driver_ok(dev)?;
    }
    Ok(tx)
}

/// Sends the good frame (descriptor 2) and waits until the device used it.
fn send_good(tx: &mut Queue) -> Result<(), &'static str> {
    tx.desc(2, dma(GOOD_BUF), TX_LEN as u32, 0, 0);
    tx.push_avail(2);
    tx.notify();
    tx.wait_used(2000).map(|_| ())
}

/// Submits the malformed chain `evil` on a freshly set-up device: what the device
/// made of it, and whether a good frame went through afterwards (on the same
/// queues, or after a reset when the device needs one or the chain was never
/// started).
fn evil_case(dev: Dev, clock: Clock, evil: Evil) -> Result<(&'static str, bool), &'static str> {
    let mut tx = set_up_tx(dev, clock, evil != Evil::PreOk)?;
    let frame = dma(TX_BUF);
    let mut head = 0;
    match evil {
        Evil::PreOk => tx.desc(0, frame, TX_LEN as u32, 0, 0),
        Evil::Oob => tx.desc(0, virtio::FAR_OUTSIDE_RAM, TX_LEN as u32, 0, 0),
        Evil::Loop => {
            let half = TX_LEN as u32 / 2;
            tx.desc(0, frame, half, NEXT, 1);
            tx.desc(1, frame + u64::from(half), half, NEXT, 0);
        }
        Evil::Short => tx.desc(0, frame, 8, 0, 0),
        Evil::HdrOnly => tx.desc(0, frame, HDR as u32, 0, 0),
        Evil::Huge => tx.desc(0, frame, 0x7fff_ffff, 0, 0),
        Evil::Dir => tx.desc(0, frame, TX_LEN as u32, WRITE, 0),
        Evil::BadHead => {
            tx.desc(0, frame, TX_LEN as u32, 0, 0);
            head = 200;
        }
    }
    tx.push_avail(head);
    tx.notify();
    let outcome = virtio::evil_outcome(tx.wait_used(if evil == Evil::PreOk { 100 } else { 2000 }));
    let recovered = if outcome == "used" {
        send_good(&mut tx).is_ok()
    } else {
        set_up_tx(dev, clock, true)
            .and_then(|mut tx| send_good(&mut tx))
            .is_ok()
    };
    Ok((outcome, recovered))
}

/// `net-evil`: a hostile driver's transmit chains on the first virtio-net device,
/// each followed by a good frame that must go through.
pub fn net_evil(machine: &Machine, detail: &mut Line) -> bool {
    virtio::with_device(machine, detail, ID_NET, "no virtio-net device", evil)
}

fn evil(dev: Dev, clock: Clock, detail: &mut Line) -> Result<(), ()> {
    zero(dma(MQ_BUF), MQ_BUF_LEN as usize);
    write_frame(dma(TX_BUF), EVIL_FRAME);
    write_frame(dma(GOOD_BUF), GOOD_FRAME);
    let mut recovered = 0;
    let mut good = true;
    for (evil, name) in EVILS {
        let (outcome, ok) = match evil_case(dev, clock, evil) {
            Ok(result) => result,
            Err(error) => {
                detail.str(name).str(": ").str(error);
                return Err(());
            }
        };
        detail.str(name).str("=").str(outcome).str(" ");
        recovered += u64::from(ok);
        // Only the chain given before DRIVER_OK may be left alone.
        good &= (outcome == "idle") == (evil == Evil::PreOk);
    }
    detail.str("recovered=").dec(recovered);
    if !good || recovered != EVILS.len() as u64 {
        return Err(());
    }
    Ok(())
}

/// `VIRTIO_NET_F_CSUM` and `VIRTIO_NET_F_GUEST_CSUM`.
const NET_F_CSUM: u64 = 1 << 0;
const NET_F_GUEST_CSUM: u64 = 1 << 1;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const HDR_F_NEEDS_CSUM: u8 = 1;
/// `net-csum`'s addresses and ports: the host's end of the tap is 192.168.127.1.
const CSUM_GUEST_IP: [u8; 4] = [192, 168, 127, 2];
const CSUM_HOST_IP: [u8; 4] = [192, 168, 127, 1];
const CSUM_GUEST_PORT: u16 = 5556;
const CSUM_HOST_PORT: u16 = 5555;
const CSUM_TO_HOST: &[u8] = b"vigil-csum-offload-to-host";
/// Ethernet, IPv4 and UDP headers.
const UDP_AT: u64 = 14 + 20;

/// The Internet checksum's running sum of `len` bytes at `addr`.
fn sum_bytes(addr: u64, len: u64, mut sum: u64) -> u64 {
    let mut i = 0;
    while i < len {
        let hi = u64::from(rd::<u8>(addr + i));
        let lo = if i + 1 < len {
            u64::from(rd::<u8>(addr + i + 1))
        } else {
            0
        };
        sum += hi << 8 | lo;
        i += 2;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The UDP pseudo-header's sum: addresses, protocol and length.
fn pseudo_sum(src: [u8; 4], dst: [u8; 4], udp_len: u64) -> u64 {
    let word = |b: [u8; 4], i: usize| u64::from(u16::from_be_bytes([b[i], b[i + 1]]));
    word(src, 0) + word(src, 2) + word(dst, 0) + word(dst, 2) + 17 + udp_len
}

/// `net-csum`: checksum offloads on the first virtio-net device. Sends a UDP
/// datagram to the host with its checksum left partial (`VIRTIO_NET_F_CSUM`:
/// only the pseudo-header's sum in the field, `NEEDS_CSUM` in the header), which
/// the host's stack accepts only if the checksum is finished on the way; then
/// waits for the host's answer and checks its checksum, finishing it first when
/// the header says it is partial (which the host may send only with
/// `net_guest_csum=1`, `VIRTIO_NET_F_GUEST_CSUM` accepted).
pub fn net_csum(machine: &Machine, detail: &mut Line) -> bool {
    let Ok(Some(guest_csum)) = machine.number("net_guest_csum", 0, 1, Some(1), detail) else {
        return false;
    };
    virtio::with_device(
        machine,
        detail,
        ID_NET,
        "no virtio-net device",
        |dev, clock, detail| csum_run(dev, clock, guest_csum == 1, detail),
    )
}

fn csum_run(dev: Dev, clock: Clock, guest_csum: bool, detail: &mut Line) -> Result<(), ()> {
    let wanted = NET_F_MAC | NET_F_CSUM | if guest_csum { NET_F_GUEST_CSUM } else { 0 };
    let (mut rx, mut tx, features, mac) = start(dev, clock, wanted, RX_BUFFERS, RX_LEN, detail)?;
    if features & wanted != wanted {
        detail.str("checksum offloads not offered");
        return Err(());
    }

    // The header asks for the UDP checksum to be finished.
    let at = dma(TX_BUF);
    let udp_len = 8 + CSUM_TO_HOST.len() as u64;
    let len = HDR + UDP_AT + udp_len;
    zero(at, len as usize);
    wr(at, HDR_F_NEEDS_CSUM);
    wr(at + 6, (UDP_AT as u16).to_le_bytes());
    wr(at + 8, 6u16.to_le_bytes());
    let eth = at + HDR;
    for i in 0..6 {
        wr(eth + i, 0xffu8);
        wr(eth + 6 + i, mac[i as usize]);
    }
    wr(eth + 12, 0x0800u16.to_be_bytes());
    let ip = eth + 14;
    wr(ip, 0x45u8);
    wr(ip + 2, ((20 + udp_len) as u16).to_be_bytes());
    wr(ip + 6, 0x4000u16.to_be_bytes());
    wr(ip + 8, 64u8);
    wr(ip + 9, 17u8);
    wr(ip + 12, CSUM_GUEST_IP);
    wr(ip + 16, CSUM_HOST_IP);
    wr(ip + 10, (!fold(sum_bytes(ip, 20, 0))).to_be_bytes());
    let udp = ip + 20;
    wr(udp, CSUM_GUEST_PORT.to_be_bytes());
    wr(udp + 2, CSUM_HOST_PORT.to_be_bytes());
    wr(udp + 4, (udp_len as u16).to_be_bytes());
    for (i, &b) in CSUM_TO_HOST.iter().enumerate() {
        wr(udp + 8 + i as u64, b);
    }
    let pseudo = fold(pseudo_sum(CSUM_GUEST_IP, CSUM_HOST_IP, udp_len));
    wr(udp + 6, pseudo.to_be_bytes());
    tx.desc(0, at, len as u32, 0, 0);
    tx.push_avail(0);
    tx.notify();
    if let Err(error) = tx.wait_used(2000) {
        detail.str("send: ").str(error);
        return Err(());
    }

    // The host's answer: UDP to our port; other traffic is skipped.
    let mut others = 0u64;
    loop {
        let (id, used) = match rx.wait_used(5000) {
            Ok(used) => used,
            Err(error) => {
                detail
                    .str("receive: ")
                    .str(error)
                    .str(" other_frames=")
                    .dec(others);
                return Err(());
            }
        };
        if id >= RX_BUFFERS || u64::from(used) > RX_LEN {
            detail.str("receive: used id ").dec(u64::from(id));
            return Err(());
        }
        let buf = rx_buf_of(id, RX_LEN);
        let (eth, frame_len) = (buf + HDR, u64::from(used).saturating_sub(HDR));
        let ours = frame_len >= UDP_AT + 8
            && rd::<[u8; 2]>(eth + 12) == 0x0800u16.to_be_bytes()
            && rd::<u8>(eth + 14 + 9) == 17
            && rd::<[u8; 2]>(eth + UDP_AT + 2) == CSUM_GUEST_PORT.to_be_bytes();
        if !ours {
            others += 1;
            rx.push_avail(id);
            rx.notify();
            continue;
        }
        let udp = eth + UDP_AT;
        let udp_len = u64::from(u16::from_be_bytes(rd::<[u8; 2]>(udp + 4)));
        if udp_len < 8 || UDP_AT + udp_len > frame_len {
            detail.str("receive: UDP length ").dec(udp_len);
            return Err(());
        }
        let partial = rd::<u8>(buf) & HDR_F_NEEDS_CSUM != 0;
        if partial {
            // As a device would: the sum from csum_start, the field holding the
            // pseudo-header's, stored complemented.
            let start = u64::from(u16::from_le_bytes(rd::<[u8; 2]>(buf + 6)));
            let offset = u64::from(u16::from_le_bytes(rd::<[u8; 2]>(buf + 8)));
            if start != UDP_AT || offset != 6 {
                detail
                    .str("receive: csum_start=")
                    .dec(start)
                    .str(" csum_offset=")
                    .dec(offset);
                return Err(());
            }
            let sum = !fold(sum_bytes(udp, udp_len, 0));
            wr(udp + 6, sum.to_be_bytes());
        }
        let src = rd::<[u8; 4]>(eth + 14 + 12);
        let dst = rd::<[u8; 4]>(eth + 14 + 16);
        let valid = fold(sum_bytes(udp, udp_len, pseudo_sum(src, dst, udp_len))) == 0xffff;
        detail
            .str("tx=1 rx_partial=")
            .dec(u64::from(partial))
            .str(" rx_valid=")
            .dec(u64::from(valid));
        return if valid { Ok(()) } else { Err(()) };
    }
}

const NET_F_CTRL_VQ: u64 = 1 << 17;
const NET_F_MQ: u64 = 1 << 22;
/// `net-mq`'s frames to the host (one per transmit queue, the queue's digit
/// last) and the payload the host's frames carry after their UDP header.
const MQ_TO_HOST: &[u8] = b"vigil-net-mq-tx";
const MQ_FROM_HOST: &[u8] = b"vigil-net-mq-host";
/// Bytes of Ethernet, IPv4 and UDP headers before that payload.
const MQ_PAYLOAD_AT: u64 = 14 + 20 + 8;
/// Receive buffers posted on each pair, 2 KiB each; then the transmit frames
/// and the control command and its status byte.
const MQ_RX_BUFFERS: u16 = 3;
const MQ_TX_BUF: u64 = MQ_BUF + 2 * MQ_RX_BUFFERS as u64 * RX_LEN;
const MQ_CTRL_BUF: u64 = MQ_TX_BUF + 2 * 128;
const _: () = assert!(MQ_CTRL_BUF + 16 <= MQ_BUF + MQ_BUF_LEN);

/// `net-mq`: two receive/transmit queue pairs (`VIRTIO_NET_F_MQ`, with the
/// control queue): reads `max_virtqueue_pairs`, asks for two pairs with
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` (after checking that three more than the
/// device has are refused), sends a frame on each transmit queue, then counts
/// the host's frames (other traffic skipped) on each receive queue until both
/// have had one (5 s at most): the host spreads its frames over the tap's
/// queues by flow.
pub fn net_mq(machine: &Machine, detail: &mut Line) -> bool {
    virtio::with_device(
        machine,
        detail,
        ID_NET,
        "no virtio-net device",
        mq_run,
    )
}

fn mq_run(dev: Dev, clock: Clock, detail: &mut Line) -> Result<(), ()> {
    let fail = |detail: &mut Line, what: &str| {
        detail.str(what);
        Err(())
    };
    let wanted = NET_F_MAC | NET_F_CTRL_VQ | NET_F_MQ;
    let features = match virtio::negotiate(dev, clock, wanted) {
        Ok(f) if f & wanted == wanted => f,
        Ok(_) => return fail(detail, "no VIRTIO_NET_F_MQ"),
        Err(e) => return fail(detail, e),
    };
    let max = u16::from_le_bytes([dev.config_u8(8), dev.config_u8(9)]);
    if max < 2 {
        detail.str("max_virtqueue_pairs=").dec(u64::from(max));
        return fail(detail, ": expected 2 or more");
    }
    let mac: [u8; 6] = core::array::from_fn(|i| dev.config_u8(i as u64));
    let set_up = || -> Result<[Queue; 5], &'static str> {
        let rx0 = virtio::setup_queue(dev, clock, 0, features)?;
        let tx0 = virtio::setup_queue(dev, clock, 1, features)?;
        let rx1 = virtio::setup_queue(dev, clock, 2, features)?;
        let tx1 = virtio::setup_queue(dev, clock, 3, features)?;
        // The control queue comes after every pair the device has.
        let ring = dma(virtio::RINGS_SECOND);
        let ctrl = virtio::setup_queue_at(dev, clock, 2 * max, features, ring, 16)?;
        virtio::driver_ok(dev)?;
        Ok([rx0, tx0, rx1, tx1, ctrl])
    };
    let [mut rx0, mut tx0, mut rx1, mut tx1, mut ctrl] = match set_up() {
        Ok(queues) => queues,
        Err(e) => return fail(detail, e),
    };
    let buf = |pair: u16, id: u16| dma(MQ_BUF) + (u64::from(pair * MQ_RX_BUFFERS + id)) * RX_LEN;
    for (pair, rx) in [(0, &mut rx0), (1, &mut rx1)] {
        for id in 0..MQ_RX_BUFFERS {
            rx.desc(id, buf(pair, id), RX_LEN as u32, WRITE, 0);
            rx.push_avail(id);
        }
        rx.notify();
    }

    // VQ_PAIRS_SET: more pairs than the device has are refused, two taken.
    let command = dma(MQ_CTRL_BUF);
    let mut set_pairs = |n: u16| -> Result<u8, &'static str> {
        wr(command, [4u8, 0]);
        wr(command + 2, n.to_le_bytes());
        wr(command + 8, 0xeeu8);
        ctrl.desc(0, command, 4, NEXT, 1);
        ctrl.desc(1, command + 8, 1, WRITE, 0);
        ctrl.push_avail(0);
        ctrl.notify();
        ctrl.wait_used(2000)?;
        Ok(rd::<u8>(command + 8))
    };
    match set_pairs(max + 3) {
        Ok(1) => {}
        Ok(_) => return fail(detail, "VQ_PAIRS_SET past max_virtqueue_pairs: not refused"),
        Err(e) => return fail(detail, e),
    }
    match set_pairs(2) {
        Ok(0) => {}
        Ok(_) => return fail(detail, "VQ_PAIRS_SET 2: refused"),
        Err(e) => return fail(detail, e),
    }

    for (pair, tx) in [(0u8, &mut tx0), (1, &mut tx1)] {
        let frame = dma(MQ_TX_BUF) + u64::from(pair) * 128;
        zero(frame, 128);
        for i in 0..6 {
            wr(frame + HDR + i, 0xffu8);
            wr(frame + HDR + 6 + i, mac[i as usize]);
        }
        wr(frame + HDR + 12, ETHERTYPE.to_be_bytes());
        for (i, &b) in MQ_TO_HOST.iter().chain(&[b'0' + pair]).enumerate() {
            wr(frame + HDR + 14 + i as u64, b);
        }
        tx.desc(0, frame, TX_LEN as u32, 0, 0);
        tx.push_avail(0);
        tx.notify();
        if let Err(e) = tx.wait_used(2000) {
            detail.str("send on pair ").dec(u64::from(pair)).str(": ");
            return fail(detail, e);
        }
    }

    let mut counts = [0u64; 2];
    let start = rdtsc();
    while counts.contains(&0) {
        if rdtsc() - start > clock.ms(5000) {
            detail.str("receive: rx0=").dec(counts[0]).str(" rx1=").dec(counts[1]);
            return fail(detail, " (a queue had none)");
        }
        for (pair, rx) in [(0u16, &mut rx0), (1, &mut rx1)] {
            while let Some((id, len)) = rx.take_used() {
                if id >= MQ_RX_BUFFERS || u64::from(len) > RX_LEN {
                    detail.str("receive: used id ").dec(u64::from(id));
                    return fail(detail, " out of range");
                }
                let at = buf(pair, id) + HDR + MQ_PAYLOAD_AT;
                let ours = u64::from(len) >= HDR + MQ_PAYLOAD_AT + MQ_FROM_HOST.len() as u64
                    && MQ_FROM_HOST
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| rd::<u8>(at + i as u64) == b);
                if ours {
                    counts[usize::from(pair)] += 1;
                }
                rx.push_avail(id);
                rx.notify();
            }
        }
    }
    // Both receive queues had the host's frames (how many each varies).
    detail.str("pairs=2 tx=2 rx_queues=2");
    Ok(())
}
