//! A hostile driver's virtio-blk queue: descriptor table, available ring and
//! guest memory (request headers, data, discard ranges) all from the input; the
//! device serves it for a few rounds. It must not panic or hang, must keep the
//! used ring consistent, and must never change a read-only image.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vigil_model::config::DriveConfig;
use vigil_devices::virtio::block::Block;
use vigil_devices::virtio::{QueueOutcome, VirtioDevice};
use vigil_fuzz::{memory, used, used_idx, Image, QueueInput};

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    queue: QueueInput,
}

static IMAGE: OnceLock<Image> = OnceLock::new();

fuzz_target!(|input: Input| {
    let image = IMAGE.get_or_init(|| Image::new(64 * 512));
    image.reset();
    let pristine = input.read_only.then(|| image.bytes());
    let mem = memory();
    let mut queue = input.queue.install(&mem);
    let size = input.queue.size();
    let mut dev = Block::new(&DriveConfig {
        path: image.path.clone(),
        read_only: input.read_only,
        id: "fuzz".into(),
        rate_limit: Default::default(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(dev.capacity(), 64);

    for (round, &bump) in input.queue.rounds.iter().take(8).chain([&0]).enumerate() {
        if round > 0 {
            QueueInput::bump(&mem, bump);
        }
        let before = used_idx(&mem);
        match dev.process_queue(0, &mut queue, &mem) {
            Ok(QueueOutcome::Done(_)) => {}
            // A full queue's worth served: the device yields to the event loop.
            Ok(QueueOutcome::RetryAfter(wait, _)) => {
                assert!(wait.is_zero(), "throttled without a rate limit")
            }
            // The transport sets DEVICE_NEEDS_RESET; the driver must reset.
            Err(_) => break,
        }
        let done = used_idx(&mem).wrapping_sub(before);
        assert!(
            done <= size,
            "{done} used entries from a {size}-entry queue"
        );
        // A read may land on the used ring itself, so only the last entry (written
        // after every copy) is sure to be the device's.
        if done > 0 {
            let (head, _) = used(&mem, size, before.wrapping_add(done - 1));
            assert!(head < u32::from(size), "used head {head}");
        }
    }
    let now = image.bytes();
    assert_eq!(now.len() as u64, image.len, "the image changed size");
    if let Some(pristine) = pristine {
        assert!(now == pristine, "a read-only image was written");
    }
});
