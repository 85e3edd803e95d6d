//! virtio-net driven from the driver's side, on one end of a `SOCK_SEQPACKET`
//! socket pair instead of a tap (one frame per message, as a tap; no root needed).

mod common;

use std::os::fd::{AsRawFd, OwnedFd};

use common::{memory, Driver, F_WRITE};
use vigil_devices::virtio::net::tap::{Tap, VNET_HDR_LEN};
use vigil_devices::virtio::net::{Net, MAX_BUFFER, TX};
use vigil_devices::virtio::{QueueOutcome, VirtioDevice};
use vigil_devices::GuestMemoryMmap;
use vigil_model::config::{NetConfig, RateLimit};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;

const QSIZE: u16 = 16;
const FRAME: u64 = 0x40000;
const RX_BUF: u64 = 0x60000;

/// A device on one end of a socket pair; the other end plays the host.
fn net() -> (Net, OwnedFd) {
    net_limited(Default::default())
}

/// As [`net`], receiving at most at `rx_rate_limit`.
fn net_limited(rx_rate_limit: RateLimit) -> (Net, OwnedFd) {
    let (tap, host) = Tap::pair().unwrap();
    let config = NetConfig {
        id: None,
        tap: String::new(),
        mac: vigil_model::MacAddr([2, 0, 0, 0, 0, 1]),
        rx_rate_limit,
        tx_rate_limit: Default::default(),
        mmds: None,
        queue_pairs: 1,
    };
    (Net::with_tap(tap, &config), host)
}

/// The fd the device watches for frames (the event loop calls it with that).
fn tap_fd(dev: &mut Net) -> std::os::fd::RawFd {
    dev.watched_fds()[0].0
}

/// The frames the host end has received.
fn frames(host: &OwnedFd) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; MAX_BUFFER + 1];
    loop {
        // SAFETY: receives into our buffer, at most its length.
        let n = unsafe { libc::recv(host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return out;
        }
        out.push(buf[..n as usize].to_vec());
    }
}

/// A 60-byte frame behind a header the guest filled with junk.
fn frame(tag: u8) -> Vec<u8> {
    let mut f = vec![0xaa; VNET_HDR_LEN];
    f.extend([0xff; 6]);
    f.extend([2, 0, 0, 0, 0, 1]);
    f.extend([0x88, 0xb5, tag]);
    f.resize(VNET_HDR_LEN + 60, tag);
    f
}

/// Sends `f` from the host end, as one frame.
fn send(host: &OwnedFd, f: &[u8]) {
    // SAFETY: sends from our buffer.
    let n = unsafe { libc::send(host.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    assert_eq!(n, f.len() as isize);
}

fn transmit(dev: &mut Net, d: &Driver, q: &mut Queue, mem: &GuestMemoryMmap) {
    let before = d.used_idx();
    assert_eq!(dev.process_queue(TX, q, mem), Ok(QueueOutcome::Done(true)));
    assert_eq!(d.used_idx(), before.wrapping_add(1), "the chain was used");
    assert_eq!(
        d.used(before).1,
        0,
        "nothing written into a transmit buffer"
    );
}

#[test]
fn transmitted_frames_reach_the_backend_without_the_guests_header() {
    let mem = memory(1 << 20);
    let (mut dev, host) = net();
    let mut d = Driver::at(&mem, 0x10000, QSIZE);
    let mut q = d.queue();
    let f = frame(1);
    d.write(FRAME, &f);
    // Split at an odd byte inside the header.
    d.add(&[(FRAME, 5, 0), (FRAME + 5, f.len() as u32 - 5, 0)]);
    transmit(&mut dev, &d, &mut q, &mem);
    let got = frames(&host);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0][..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
    assert_eq!(got[0][VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
    assert_eq!(dev.counters().tx_frames, 1);
}

/// An available entry whose head is past the queue (a hostile driver's)
/// cannot go back, and fails the device, but the frame sent before it in the
/// same pass has its chain back (found by fuzzing `virtio_net_tx` while used
/// entries went back in batches of a pass: the batch went back with none).
#[test]
fn a_head_past_the_queue_still_lets_the_chains_before_it_go_back() {
    let mem = memory(1 << 20);
    let (mut dev, host) = net();
    let mut d = Driver::at(&mem, 0x10000, QSIZE);
    let mut q = d.queue();
    let f = frame(3);
    d.write(FRAME, &f);
    d.add(&[(FRAME, f.len() as u32, 0)]);
    let avail = d.vq.avail_addr().0;
    d.write(avail + 4 + 2, &58368u16.to_le_bytes());
    d.write(avail + 2, &2u16.to_le_bytes());
    assert!(dev.process_queue(TX, &mut q, &mem).is_err());
    assert_eq!(frames(&host).len(), 1);
    assert_eq!(d.used_idx(), 1, "the frame's chain went back");
    assert_eq!(d.used(0), (0, 0));
}

#[test]
fn bad_transmit_chains_are_dropped_and_the_device_goes_on() {
    let mem = memory(1 << 20);
    let (mut dev, host) = net();
    let mut d = Driver::at(&mem, 0x10000, QSIZE);
    let mut q = d.queue();
    d.write(FRAME, &frame(7));
    let end = 1 << 20;
    let bad: &[&[(u64, u32, u16)]] = &[
        // Shorter than the header; the header alone; a runt with no Ethernet header.
        &[(FRAME, 8, 0)],
        &[(FRAME, VNET_HDR_LEN as u32, 0)],
        &[(FRAME, VNET_HDR_LEN as u32 + 13, 0)],
        // Larger than any frame, and far larger than memory.
        &[(FRAME, MAX_BUFFER as u32 + 1, 0)],
        &[(FRAME, 0x7fff_ffff, 0)],
        // Outside memory, or running past its end.
        &[(0xffff_0000_0000, 72, 0)],
        &[(end - 16, 72, 0)],
        // Device-writable: nothing for the device to read.
        &[(FRAME, 72, F_WRITE)],
    ];
    for chain in bad {
        d.add(chain);
        transmit(&mut dev, &d, &mut q, &mem);
    }
    // A loop: 0 -> 1 -> 0 -> ... of readable halves of a good frame. Iteration
    // stops after the queue size without an error; a cut chain is not sent.
    let head = d.add(&[(FRAME, 36, 0), (FRAME + 36, 36, 0)]);
    d.write_desc(head + 1, FRAME + 36, 36, 1, head);
    transmit(&mut dev, &d, &mut q, &mem);
    assert!(frames(&host).is_empty(), "a bad chain reached the backend");
    assert_eq!(dev.counters().errors, bad.len() as u64 + 1);

    d.add(&[(FRAME, 72, 0)]);
    transmit(&mut dev, &d, &mut q, &mem);
    assert_eq!(frames(&host).len(), 1);
}

#[test]
fn received_frames_fill_a_buffer_after_a_fresh_header() {
    let mem = memory(1 << 20);
    let (mut dev, host) = net();
    let mut d = Driver::at(&mem, 0x20000, QSIZE);
    let mut queues = vec![d.queue(), Queue::new(QSIZE).unwrap()];
    let f = frame(3);
    send(&host, &f);
    // Too small a buffer first: given back empty, the frame kept for the next.
    d.add(&[(RX_BUF, 20, F_WRITE)]);
    d.add(&[(RX_BUF + 0x1000, 2048, F_WRITE)]);
    let fd = tap_fd(&mut dev);
    let r = dev.process_fd(fd, EventSet::IN, &mut queues, &mem);
    assert_eq!(r, Ok(QueueOutcome::Done(true)));
    assert_eq!(d.used_idx(), 2);
    assert_eq!(d.used(0).1, 0);
    assert_eq!(d.used(1).1, f.len() as u32);
    let got = d.read(RX_BUF + 0x1000, f.len());
    // No offloads; num_buffers is 1.
    assert_eq!(got[..VNET_HDR_LEN], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
}

/// A backend that reports end-of-file (the host end of a socket pair closed; a tap
/// handed over by a parent that went away) used to be read as an endless stream of
/// empty "runt frames": the receive loop never returned. Now receiving stops, and
/// the device no longer asks the event loop to watch a backend that would always
/// be readable.
#[test]
fn a_closed_backend_neither_hangs_nor_stays_watched() {
    let mem = memory(1 << 20);
    let (mut dev, host) = net();
    drop(host);
    let mut d = Driver::at(&mem, 0x20000, QSIZE);
    let mut queue = d.queue();
    d.add(&[(RX_BUF, 2048, F_WRITE)]);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let first = dev.process_queue(0, &mut queue, &mem);
        let watched = dev.watched_fds();
        tx.send((first, watched.len())).unwrap();
    });
    let (first, watched) = rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("receiving from a closed backend hangs");
    assert_eq!(first, Ok(QueueOutcome::Done(false)));
    assert_eq!(watched, 0);
}

/// With `VIRTIO_NET_F_MRG_RXBUF` a frame larger than one buffer spreads over
/// as many as it needs, `num_buffers` saying how many, all published at once.
/// Too few buffers: none is taken until the driver adds more.
#[test]
fn a_large_frame_spans_mergeable_buffers_published_together() {
    const MRG_RXBUF: u64 = 1 << 15;
    let mem = memory(1 << 20);
    let (mut dev, host) = net();
    assert_ne!(dev.features() & MRG_RXBUF, 0, "offered");
    dev.ack_features(dev.features());
    let mut d = Driver::at(&mem, 0x20000, QSIZE);
    let mut queue = d.queue();
    queue.set_event_idx(true);
    let mut queues = vec![queue, Queue::new(QSIZE).unwrap()];
    // The driver wants an interrupt at the first used buffer.
    let used_event = d.vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    d.write(used_event, &0u16.to_le_bytes());

    let mut f = vec![0xaa; VNET_HDR_LEN];
    f.extend((0..1514u32).map(|i| (i % 251) as u8));
    send(&host, &f);
    for i in 0..2 {
        d.add(&[(RX_BUF + i * 0x1000, 512, F_WRITE)]);
    }
    let fd = tap_fd(&mut dev);
    let r = dev.process_fd(fd, EventSet::IN, &mut queues, &mem);
    assert_eq!(r, Ok(QueueOutcome::Done(false)));
    assert_eq!(d.used_idx(), 0, "two buffers cannot hold it: none taken");
    assert!(
        dev.watched_fds().is_empty(),
        "waits for buffers, not the tap"
    );

    for i in 2..4 {
        d.add(&[(RX_BUF + i * 0x1000, 512, F_WRITE)]);
    }
    let r = dev.process_queue(0, &mut queues[0], &mem);
    assert_eq!(r, Ok(QueueOutcome::Done(true)));
    assert_eq!(d.used_idx(), 3);
    assert_eq!(
        (0..3).map(|i| d.used(i)).collect::<Vec<_>>(),
        [(0, 512), (1, 512), (2, 1526 - 1024)]
    );
    let mut got = Vec::new();
    for (i, (_, len)) in (0..3).map(|i| d.used(i)).enumerate() {
        got.extend(d.read(RX_BUF + i as u64 * 0x1000, len as usize));
    }
    // No offloads; num_buffers is 3.
    assert_eq!(got[..VNET_HDR_LEN], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0]);
    assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
}

/// A frame that does not fit the buffer it was read into goes on over more
/// (mergeable buffers); the buffer first tried is charged to the pass once,
/// so one pass fills a queue's worth of buffers: 5 frames over 3 each of 16.
#[test]
fn a_pass_fills_a_queues_worth_of_buffers_with_frames_over_several() {
    const MRG_RXBUF: u64 = 1 << 15;
    let mem = memory(1 << 20);
    let (mut dev, host) = net();
    dev.ack_features(dev.features() & MRG_RXBUF);
    let mut d = Driver::at(&mem, 0x20000, QSIZE);
    let mut queues = vec![d.queue(), Queue::new(QSIZE).unwrap()];
    let mut f = vec![0xaa; VNET_HDR_LEN];
    f.extend((0..1514u32).map(|i| (i % 251) as u8));
    for _ in 0..5 {
        send(&host, &f);
    }
    for i in 0..u64::from(QSIZE) {
        d.add(&[(RX_BUF + i * 0x1000, 512, F_WRITE)]);
    }
    let fd = tap_fd(&mut dev);
    let r = dev.process_fd(fd, EventSet::IN, &mut queues, &mem);
    assert_eq!(r, Ok(QueueOutcome::Done(true)));
    assert_eq!(d.used_idx(), 15, "five frames of three buffers each");
    assert_eq!(
        (0..15).map(|i| d.used(i).1).collect::<Vec<_>>(),
        [512, 512, 1526 - 1024].repeat(5)
    );
}

/// With the checksum and TSO offloads accepted, a frame's partial checksum and
/// segmentation reach the backend in its header (the tap finishes them); a
/// segmentation the driver did not accept, or one without a partial checksum,
/// is dropped and counted; the driver's `num_buffers` never goes out.
#[test]
fn transmit_offloads_pass_on_only_what_was_accepted() {
    const CSUM: u64 = 1 << 0;
    const HOST_TSO4: u64 = 1 << 11;
    let mem = memory(1 << 20);
    let (mut dev, host) = net();
    dev.ack_features(dev.features() & !HOST_TSO4 | CSUM);
    let d = Driver::at(&mem, 0x20000, QSIZE);
    let mut q = d.queue();
    // NEEDS_CSUM, no GSO, csum_start 34, csum_offset 6, num_buffers 7.
    let header = |gso: u8, flags: u8| [flags, gso, 0, 0, 0, 0, 34, 0, 6, 0, 7, 0];
    let with = |h: [u8; 12]| {
        let mut f = frame(5);
        f[..VNET_HDR_LEN].copy_from_slice(&h);
        f
    };
    d.write(FRAME, &with(header(0, 1)));
    d.write(FRAME + 0x1000, &with(header(1, 1)));
    let mut d = d;
    d.add(&[(FRAME, (VNET_HDR_LEN + 60) as u32, 0)]);
    d.add(&[(FRAME + 0x1000, (VNET_HDR_LEN + 60) as u32, 0)]);
    dev.process_queue(TX, &mut q, &mem).unwrap();
    let sent = frames(&host);
    assert_eq!(sent.len(), 1, "the TSO frame without HOST_TSO4 is dropped");
    assert_eq!(
        sent[0][..VNET_HDR_LEN],
        [1, 0, 0, 0, 0, 0, 34, 0, 6, 0, 0, 0]
    );
    assert_eq!(dev.counters().errors, 1);

    // Accepted now: TSO with a partial checksum goes; TSO without one does not.
    dev.ack_features(dev.features());
    d.write(FRAME + 0x2000, &with(header(1, 0)));
    d.add(&[(FRAME + 0x1000, (VNET_HDR_LEN + 60) as u32, 0)]);
    d.add(&[(FRAME + 0x2000, (VNET_HDR_LEN + 60) as u32, 0)]);
    dev.process_queue(TX, &mut q, &mem).unwrap();
    let sent = frames(&host);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0][..VNET_HDR_LEN],
        [1, 1, 0, 0, 0, 0, 34, 0, 6, 0, 0, 0]
    );
    assert_eq!(dev.counters().errors, 2);
}

/// A hostile driver's unusable buffer in the middle of a frame spread over
/// mergeable buffers: the frame is dropped and counted, every buffer taken
/// for it given back empty once, and the next frame goes through.
#[test]
fn an_unusable_buffer_among_mergeable_ones_drops_the_frame_only() {
    let mem = memory(1 << 20);
    let (mut dev, host) = net();
    dev.ack_features(dev.features());
    let mut d = Driver::at(&mem, 0x20000, QSIZE);
    let mut queues = vec![d.queue(), Queue::new(QSIZE).unwrap()];
    let mut big = vec![0u8; VNET_HDR_LEN];
    big.extend((0..1514u32).map(|i| i as u8));
    for f in [&big, &frame(9)] {
        send(&host, f);
    }
    d.add(&[(RX_BUF, 512, F_WRITE)]);
    d.add(&[(RX_BUF + 0x1000, 512, 0)]); // device-readable: nothing to write into
    d.add(&[(RX_BUF + 0x2000, 2048, F_WRITE)]);
    let fd = tap_fd(&mut dev);
    let r = dev.process_fd(fd, EventSet::IN, &mut queues, &mem);
    assert_eq!(r, Ok(QueueOutcome::Done(true)));
    assert_eq!(d.used_idx(), 3);
    assert_eq!(
        (0..3).map(|i| d.used(i)).collect::<Vec<_>>(),
        [(0, 0), (1, 0), (2, (VNET_HDR_LEN + 60) as u32)]
    );
    assert_eq!(dev.counters().errors, 1);
    assert_eq!(dev.counters().rx_frames, 1);
}

/// Frames are read from the backend straight into the driver's buffers
/// (several to a chain, the header in the first); a chain whose first buffer
/// cannot hold the header takes its frame through the device's own buffer;
/// either way the guest sees the same bytes, and a frame longer than a chain
/// (without mergeable buffers) is dropped whole, never delivered cut short.
#[test]
fn received_frames_land_whole_in_chains_of_several_buffers() {
    let mem = memory(1 << 20);
    let (mut dev, host) = net();
    let mut d = Driver::at(&mem, 0x20000, QSIZE);
    let mut queues = vec![d.queue(), Queue::new(QSIZE).unwrap()];
    let (a, b) = (frame(4), frame(5));
    let mut big = vec![0u8; VNET_HDR_LEN];
    big.extend((0..1514u32).map(|i| i as u8));
    for f in [&a, &b, &big, &frame(6)] {
        send(&host, f);
    }
    // 30 bytes, then the rest of the frame in a second buffer.
    d.add(&[(RX_BUF, 30, F_WRITE), (RX_BUF + 0x1000, 2048, F_WRITE)]);
    // A first buffer shorter than the header.
    d.add(&[
        (RX_BUF + 0x2000, 4, F_WRITE),
        (RX_BUF + 0x3000, 2048, F_WRITE),
    ]);
    // Room for 200 bytes: the 1526-byte frame is dropped, the next one fits.
    d.add(&[(RX_BUF + 0x4000, 200, F_WRITE)]);
    let fd = tap_fd(&mut dev);
    let r = dev.process_fd(fd, EventSet::IN, &mut queues, &mem);
    assert_eq!(r, Ok(QueueOutcome::Done(true)));
    assert_eq!(d.used_idx(), 3);
    let len = a.len() as u32;
    assert_eq!(
        (0..3).map(|i| d.used(i)).collect::<Vec<_>>(),
        [(0, len), (2, len), (4, len)]
    );
    let header = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    let mut got = d.read(RX_BUF, 30);
    got.extend(d.read(RX_BUF + 0x1000, a.len() - 30));
    assert_eq!(got[..VNET_HDR_LEN], header);
    assert_eq!(got[VNET_HDR_LEN..], a[VNET_HDR_LEN..]);
    let mut got = d.read(RX_BUF + 0x2000, 4);
    got.extend(d.read(RX_BUF + 0x3000, b.len() - 4));
    assert_eq!(got[..VNET_HDR_LEN], header);
    assert_eq!(got[VNET_HDR_LEN..], b[VNET_HDR_LEN..]);
    let got = d.read(RX_BUF + 0x4000, a.len());
    assert_eq!(got[VNET_HDR_LEN..], frame(6)[VNET_HDR_LEN..]);
    assert_eq!(dev.counters().errors, 1, "the long frame");
    assert_eq!(dev.counters().rx_frames, 3);
    assert_eq!(dev.counters().rx_bytes, 3 * (a.len() - VNET_HDR_LEN) as u64);
}

/// A receive limit of one frame a second: the second frame, read into the
/// driver's buffer, is not given to it until the limiter allows, and then
/// whole.
#[test]
fn a_throttled_frame_waits_and_then_arrives_whole() {
    let mem = memory(1 << 20);
    let (mut dev, host) = net_limited(RateLimit {
        ops: Some((1, Some(1))),
        ..Default::default()
    });
    let mut d = Driver::at(&mem, 0x20000, QSIZE);
    let mut queues = vec![d.queue(), Queue::new(QSIZE).unwrap()];
    let (a, b) = (frame(7), frame(8));
    send(&host, &a);
    send(&host, &b);
    d.add(&[(RX_BUF, 2048, F_WRITE)]);
    d.add(&[(RX_BUF + 0x1000, 2048, F_WRITE)]);
    let fd = tap_fd(&mut dev);
    let r = dev.process_fd(fd, EventSet::IN, &mut queues, &mem);
    let Ok(QueueOutcome::RetryAfter(wait, true)) = r else {
        panic!("{r:?}");
    };
    assert!(!wait.is_zero());
    assert_eq!(d.used_idx(), 1);
    assert!(
        dev.watched_fds().is_empty(),
        "the timer, not the tap, resumes it"
    );
    std::thread::sleep(wait);
    let r = dev.process_queue(0, &mut queues[0], &mem);
    assert_eq!(r, Ok(QueueOutcome::Done(true)));
    assert_eq!(d.used_idx(), 2);
    assert_eq!(d.used(1), (1, b.len() as u32));
    let got = d.read(RX_BUF + 0x1000, b.len());
    assert_eq!(got[VNET_HDR_LEN..], b[VNET_HDR_LEN..]);
    assert_eq!(dev.counters().rx_frames, 2);
}

/// `queue_pairs`: a device of two pairs on two backends (a tap's two queues),
/// with a control queue. The driver uses the first pair until
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` says two; then frames go out on the second
/// pair's backend and come in from it into the second receive queue. A count
/// out of range, or a command the device does not know, is answered with an
/// error and changes nothing.
#[test]
fn two_queue_pairs_are_chosen_through_the_control_queue() {
    const F_CTRL_VQ: u64 = 1 << 17;
    const F_MQ: u64 = 1 << 22;
    let mem = memory(1 << 20);
    let (tap0, host0) = Tap::pair().unwrap();
    let (tap1, host1) = Tap::pair().unwrap();
    let config = NetConfig {
        queue_pairs: 2,
        ..NetConfig::new("", 0)
    };
    let mut dev = Net::with_taps(vec![tap0, tap1], &config);
    assert_eq!(dev.queue_max_sizes().len(), 5, "rx0 tx0 rx1 tx1 control");
    assert_eq!(dev.features() & (F_CTRL_VQ | F_MQ), F_CTRL_VQ | F_MQ);
    let mut pairs = [0u8; 2];
    dev.read_config(8, &mut pairs);
    assert_eq!(u16::from_le_bytes(pairs), 2, "max_virtqueue_pairs");
    assert_eq!(dev.watched_fds().len(), 1, "the first pair alone at first");

    let mut ctrl = Driver::at(&mem, 0x10000, QSIZE);
    let mut ctrl_q = ctrl.queue();
    let command = 0x30000;
    let mut set_pairs = |dev: &mut Net, class: u8, n: u16| -> u8 {
        ctrl.write(command, &[class, 0]);
        ctrl.write(command + 2, &n.to_le_bytes());
        ctrl.write(command + 8, &[0xee]);
        let before = ctrl.used_idx();
        ctrl.add(&[
            (command, 2, 0),
            (command + 2, 2, 0),
            (command + 8, 1, F_WRITE),
        ]);
        assert_eq!(
            dev.process_queue(4, &mut ctrl_q, &mem),
            Ok(QueueOutcome::Done(true))
        );
        assert_eq!(ctrl.used(before).1, 1, "the status byte written");
        ctrl.read(command + 8, 1)[0]
    };
    assert_eq!(set_pairs(&mut dev, 4, 3), 1, "three pairs of two: refused");
    assert_eq!(set_pairs(&mut dev, 4, 0), 1, "no pair: refused");
    assert_eq!(set_pairs(&mut dev, 9, 2), 1, "an unknown class: refused");
    assert_eq!(dev.watched_fds().len(), 1);
    assert_eq!(set_pairs(&mut dev, 4, 2), 0, "two pairs");
    let watched = dev.watched_fds();
    assert_eq!(watched.len(), 2);
    // Each tap queue's frames go to its own pair's receive queue.
    assert_eq!(dev.fd_queue(watched[0].0), Some(0));
    assert_eq!(dev.fd_queue(watched[1].0), Some(2));

    // A frame sent on the second transmit queue (index 3) leaves through the
    // second backend.
    let mut tx1 = Driver::at(&mem, 0x20000, QSIZE);
    let mut tx1_q = tx1.queue();
    let f = frame(5);
    tx1.write(FRAME, &f);
    tx1.add(&[(FRAME, f.len() as u32, 0)]);
    assert_eq!(
        dev.process_queue(3, &mut tx1_q, &mem),
        Ok(QueueOutcome::Done(true))
    );
    assert!(frames(&host0).is_empty());
    let sent = frames(&host1);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0][VNET_HDR_LEN..], f[VNET_HDR_LEN..]);

    // A frame from the second backend lands in the second receive queue (index 2).
    let rx0 = Driver::at(&mem, 0x50000, QSIZE);
    let mut rx1 = Driver::at(&mem, 0x70000, QSIZE);
    rx1.add(&[(RX_BUF, 2048, F_WRITE)]);
    let mut queues = vec![
        rx0.queue(),
        Queue::new(QSIZE).unwrap(),
        rx1.queue(),
        Queue::new(QSIZE).unwrap(),
        Queue::new(QSIZE).unwrap(),
    ];
    let g = frame(6);
    send(&host1, &g);
    assert_eq!(
        dev.process_fd(watched[1].0, EventSet::IN, &mut queues, &mem),
        Ok(QueueOutcome::Done(true))
    );
    assert_eq!(rx1.used_idx(), 1);
    assert_eq!(rx1.used(0), (0, g.len() as u32));
    assert_eq!(
        rx1.read(RX_BUF + VNET_HDR_LEN as u64, 60),
        g[VNET_HDR_LEN..]
    );
    assert_eq!(rx0.used_idx(), 0, "nothing on the first pair");

    // A reset goes back to the first pair alone.
    dev.reset();
    assert_eq!(dev.watched_fds().len(), 1);
}
