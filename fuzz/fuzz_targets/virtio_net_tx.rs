//! A hostile driver's virtio-net transmit queue (see virtio_blk_request), and a
//! receive queue of its making for the frames the host sends. The backend is one
//! end of a `SOCK_SEQPACKET` socket pair standing in for the tap (one frame per
//! message, as a tap), so no root is needed. The device must not panic or hang,
//! must keep the used rings consistent, and must only ever pass on frames of a
//! sane length whose virtio-net header it zeroed.

#![no_main]

use std::os::fd::{AsRawFd, OwnedFd};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vigil_model::config::RateLimit;
use vigil_model::config::NetConfig;
use vigil_devices::virtio::net::tap::{Tap, VNET_HDR_LEN};
use vigil_devices::virtio::net::{Net, MAX_BUFFER, RX, TX};
use vigil_devices::virtio::{QueueOutcome, VirtioDevice};
use vigil_fuzz::{memory, QueueInput, RINGS, RINGS_2};

#[derive(Arbitrary, Debug)]
struct Input {
    tx: QueueInput,
    /// The receive queue and the frames the host sends into it, if any.
    rx: Option<(QueueInput, Vec<Vec<u8>>)>,
    /// A transmit byte limit (bytes per second, burst).
    tx_limit: Option<(u16, u16)>,
    /// The host closes its end after sending its frames.
    host_closes: bool,
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: receives into our buffer, at most its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).ok()
}

fn send(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: sends from our buffer; a full socket just refuses.
    unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
}

/// Runs queue `index` for a few rounds (the available index bumped in between);
/// returns the used entries it added.
fn run(
    dev: &mut Net,
    index: usize,
    queue: &mut virtio_queue::Queue,
    mem: &vigil_devices::GuestMemoryMmap,
    input: &QueueInput,
    limited: bool,
) -> u16 {
    let rings = if index == TX { RINGS } else { RINGS_2 };
    let size = input.size();
    let mut total = 0u16;
    for (round, &bump) in input.rounds.iter().take(8).chain([&0]).enumerate() {
        if round > 0 {
            QueueInput::bump_at(mem, rings, bump);
        }
        let before = rings.used_idx(mem);
        let broken = match dev.process_queue(index, queue, mem) {
            Ok(QueueOutcome::Done(_)) => false,
            Ok(QueueOutcome::RetryAfter(wait, _)) => {
                assert!(limited || wait.is_zero(), "throttled without a rate limit");
                false
            }
            Err(_) => true,
        };
        let done = rings.used_idx(mem).wrapping_sub(before);
        assert!(
            done <= size,
            "{done} used entries from a {size}-entry queue"
        );
        if done > 0 {
            let (head, len) = rings.used(mem, size, before.wrapping_add(done - 1));
            assert!(head < u32::from(size), "used head {head}");
            if index == TX {
                assert_eq!(len, 0, "the device wrote into a transmit buffer");
            } else {
                assert!(len as usize <= MAX_BUFFER, "{len} bytes received");
            }
        }
        total = total.wrapping_add(done);
        if broken {
            break;
        }
    }
    total
}

fuzz_target!(|input: Input| {
    let mem = memory();
    let (tap, host_end) = Tap::pair().unwrap();
    let tx_rate_limit = match input.tx_limit {
        Some((rate, burst)) => RateLimit {
            bandwidth: Some((u64::from(rate), Some(u64::from(burst)))),
            ..RateLimit::default()
        },
        None => RateLimit::default(),
    };
    let config = NetConfig {
        id: None,
        tap: String::new(),
        mac: vigil_model::MacAddr([2, 0, 0, 0, 0, 1]),
        rx_rate_limit: RateLimit::default(),
        tx_rate_limit,
        mmds: None,
        queue_pairs: 1,
    };
    let mut dev = Net::with_tap(tap, &config);

    let mut tx = input.tx.install(&mem);
    let served = run(
        &mut dev,
        TX,
        &mut tx,
        &mem,
        &input.tx,
        input.tx_limit.is_some(),
    );
    // What reached the "tap": one frame per message, each sane and headerless.
    let mut buf = vec![0u8; MAX_BUFFER + 1];
    let mut frames = 0u64;
    while let Some(n) = recv(&host_end, &mut buf) {
        assert!(
            (VNET_HDR_LEN + 14..=MAX_BUFFER).contains(&n),
            "a {n}-byte frame reached the tap"
        );
        assert!(
            buf[..VNET_HDR_LEN].iter().all(|&b| b == 0),
            "a guest header reached the tap"
        );
        frames += 1;
    }
    assert!(
        frames <= u64::from(served),
        "{frames} frames from {served} chains"
    );
    assert_eq!(dev.counters().tx_frames, frames);

    if let Some((rx_input, sent)) = &input.rx {
        for frame in sent.iter().take(8) {
            send(&host_end, frame);
        }
        let host_end = (!input.host_closes).then_some(host_end);
        let mut rx = rx_input.install_at(&mem, RINGS_2);
        run(&mut dev, RX, &mut rx, &mem, rx_input, false);
        // The event loop would call again when the tap is readable, on the fds
        // the device watches.
        let mut queues = [rx, tx];
        for (fd, events) in dev.watched_fds() {
            let _ = dev.process_fd(fd, events, &mut queues, &mem);
        }
        let _ = dev.watched_fds();
        drop(host_end);
    }
});
