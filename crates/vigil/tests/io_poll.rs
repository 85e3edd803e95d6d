//! The device loop polling the virtio rings (`--io-poll-us`). A test binary of
//! its own: the loop stops polling while other threads want its CPU, as they
//! do when a binary's tests run their VMs side by side.

mod common;

use common::blk_bench::bench;

/// The device loop polls the rings after work and asks the driver not to
/// notify meanwhile: a driver keeping 8 requests in flight sends a fraction of
/// the notifications it sends with polling off (`--io-poll-us 0`), with event
/// indices (`avail_event` kept behind) and without (`VRING_USED_F_NO_NOTIFY`).
/// The polled run may poll 10 ms: the default 200 µs stops polling where the
/// gaps between requests grow past it, as they do on a busy test host.
#[test]
fn polling_the_rings_spares_the_driver_its_notifications() {
    for (name, params) in [
        ("poll-evidx", "blk_qd=8"),
        ("poll-noevidx", "blk_qd=8 blk_event_idx=0"),
    ] {
        let polled = bench(name, params, &["--io-poll-us", "10000"], "io_engine=sync");
        let unpolled = bench(name, params, &["--io-poll-us", "0"], "io_engine=sync");
        for b in [&polled, &unpolled] {
            assert_eq!(b.requests(), 2 * b.figure("requests"), "{}", b.block);
        }
        let (with, without) = (
            polled.metric("notifications"),
            unpolled.metric("notifications"),
        );
        assert!(
            without >= unpolled.requests() / 16,
            "{params}: {without} notifications for {} requests without polling",
            unpolled.requests()
        );
        assert!(
            with * 4 < without,
            "{params}: {with} notifications polled, {without} not"
        );
    }
}
