//! The `net` scenario: one Ethernet frame each way through the first virtio-net
//! device (DeviceID 1), with the polled driver of `virtio.rs` at CPL3.

use crate::cpu::rdtsc;
use crate::serial::{Line, Out};
use crate::virtio::{
    self, dma, rd, wr, zero, Clock, Dev, Devices, Queue, MQ_BUF, MQ_BUF_LEN, WRITE,
};
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

fn rx_buf(id: u16) -> u64 {
    dma(MQ_BUF) + u64::from(id) * RX_LEN
}

pub fn net(machine: &Machine, detail: &mut Line) -> bool {
    virtio::run_at_cpl3(machine, detail, |devices, clock, detail| {
        let Some(dev) = virtio::find(devices, clock, ID_NET, |_| true) else {
            detail.str("no virtio-net device");
            virtio::list_devices(devices, detail);
            return Err(());
        };
        let result = run(dev, clock, devices, detail);
        let _ = dev.reset(clock);
        result
    })
}

fn run(dev: Dev, clock: Clock, _devices: &Devices, detail: &mut Line) -> Result<(), ()> {
    let set_up = || -> Result<(Queue, Queue, u64), &'static str> {
        let features = virtio::negotiate(dev, clock, NET_F_MAC)?;
        let rx = virtio::setup_queue(dev, clock, RX, features)?;
        let tx = virtio::setup_queue(dev, clock, TX, features)?;
        virtio::driver_ok(dev)?;
        Ok((rx, tx, features))
    };
    let (mut rx, mut tx, features) = match set_up() {
        Ok(queues) => queues,
        Err(error) => {
            detail.str(error);
            return Err(());
        }
    };
    if features & NET_F_MAC == 0 {
        detail.str("no VIRTIO_NET_F_MAC");
        return Err(());
    }
    let mut mac = [0u8; 6];
    for (i, byte) in mac.iter_mut().enumerate() {
        *byte = dev.config_u8(i as u64);
    }

    zero(dma(MQ_BUF), MQ_BUF_LEN as usize);
    for id in 0..RX_BUFFERS {
        rx.desc(id, rx_buf(id), RX_LEN as u32, WRITE, 0);
        rx.push_avail(id);
    }
    rx.notify();

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
    // and its buffer posted again.
    let mut received = 0;
    let mut others = 0u64;
    while received == 0 {
        let (id, len) = match rx.wait_used(3000) {
            Ok(used) => used,
            Err(error) => {
                detail.str("receive: ").str(error);
                detail.str(" other_frames=").dec(others);
                return Err(());
            }
        };
        if id >= RX_BUFFERS {
            detail.str("receive: used id ").dec(u64::from(id));
            return Err(());
        }
        let buf = rx_buf(id);
        let wanted = u64::from(len) >= HDR + 14 + FROM_HOST.len() as u64
            && u64::from(len) <= RX_LEN
            && rd::<[u8; 2]>(buf + HDR + 12) == ETHERTYPE.to_be_bytes()
            && FROM_HOST
                .iter()
                .enumerate()
                .all(|(i, &b)| rd::<u8>(buf + HDR + 14 + i as u64) == b);
        if wanted {
            received += 1;
        } else {
            others += 1;
            rx.push_avail(id);
            rx.notify();
        }
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
    Ok(())
}

/// Frames `net-bench` sends.
const BENCH_FRAMES: u64 = 20_000;

/// `net-bench`: 20000 minimum-size frames sent one at a time (each waits for the
/// device to use it), timed with the TSC at CPL3: the transmit packet rate.
pub fn net_bench(machine: &Machine, detail: &mut Line) -> bool {
    virtio::run_at_cpl3(machine, detail, |devices, clock, detail| {
        let Some(dev) = virtio::find(devices, clock, ID_NET, |_| true) else {
            detail.str("no virtio-net device");
            virtio::list_devices(devices, detail);
            return Err(());
        };
        let result = bench(dev, clock, detail);
        let _ = dev.reset(clock);
        result
    })
}

fn bench(dev: Dev, clock: Clock, detail: &mut Line) -> Result<(), ()> {
    let set_up = || -> Result<Queue, &'static str> {
        let features = virtio::negotiate(dev, clock, 0)?;
        // The receive queue exists but gets no buffers: only transmit is measured.
        virtio::setup_queue(dev, clock, RX, features)?;
        let tx = virtio::setup_queue(dev, clock, TX, features)?;
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
    let frame = dma(TX_BUF);
    zero(frame, TX_LEN as usize);
    for i in 0..6 {
        wr(frame + HDR + i, 0xffu8);
        wr(frame + HDR + 6 + i, [0x02u8, 0, 0, 0, 0, 0x99][i as usize]);
    }
    wr(frame + HDR + 12, ETHERTYPE.to_be_bytes());
    tx.desc(0, frame, TX_LEN as u32, 0, 0);
    let start = rdtsc();
    for _ in 0..BENCH_FRAMES {
        tx.push_avail(0);
        tx.notify();
        if let Err(error) = tx.wait_used(2000) {
            detail.str("send: ").str(error);
            return Err(());
        }
    }
    let us = ((rdtsc() - start) * 1000 / clock.ms(1)).max(1);
    detail
        .str("tx_pps=")
        .dec(BENCH_FRAMES * 1_000_000 / us)
        .str(" frames=")
        .dec(BENCH_FRAMES);
    Ok(())
}
