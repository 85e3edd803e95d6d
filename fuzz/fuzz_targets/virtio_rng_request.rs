//! A hostile driver's virtio-rng queue (see virtio_blk_request). The device must
//! not panic or hang, and never serve more than 64 KiB per request.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_devices::virtio::rng::Rng;
use vigil_devices::virtio::{QueueOutcome, VirtioDevice};
use vigil_fuzz::{memory, used, used_idx, QueueInput};

fuzz_target!(|input: QueueInput| {
    let mem = memory();
    let mut queue = input.install(&mem);
    let size = input.size();
    let mut dev = Rng::new(Default::default());
    let mut requests = 0u64;
    for (round, &bump) in input.rounds.iter().take(8).chain([&0]).enumerate() {
        if round > 0 {
            QueueInput::bump(&mem, bump);
        }
        let before = used_idx(&mem);
        let broken = match dev.process_queue(0, &mut queue, &mem) {
            Ok(QueueOutcome::Done(_)) => false,
            // A full queue's worth served: the device yields to the event loop.
            Ok(QueueOutcome::RetryAfter(wait, _)) => {
                assert!(wait.is_zero(), "throttled without a rate limit");
                false
            }
            Err(_) => true,
        };
        let done = used_idx(&mem).wrapping_sub(before);
        assert!(
            done <= size,
            "{done} used entries from a {size}-entry queue"
        );
        // A buffer may cover the used ring itself, so only the last entry (written
        // after every fill) is sure to be the device's.
        if done > 0 {
            let (head, len) = used(&mem, size, before.wrapping_add(done - 1));
            assert!(head < u32::from(size), "used head {head}");
            assert!(len <= 64 * 1024, "{len} bytes in one request");
        }
        requests += u64::from(done);
        if broken {
            // The request whose completion could not be recorded was served.
            requests += 1;
            break;
        }
    }
    assert!(dev.bytes_served() <= requests * 64 * 1024);
});
