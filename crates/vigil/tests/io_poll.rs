//! The device loop polling the virtio rings (`--io-poll-us`). A test binary of
//! its own: the loop stops polling while other threads want its CPU, as they
//! do when a binary's tests run their VMs side by side.

mod common;

use common::blk_bench::bench;

/// The device loop polls the rings after work and asks the driver not to
/// notify meanwhile (`VRING_USED_F_NO_NOTIFY` for a driver without event
/// indices): one request in flight, the driver notifies (nearly) every request with
/// polling off (`--io-poll-us 0`), a handful polled. The polled run may poll
/// 10 ms: the default 200 µs stops polling where the gaps between requests
/// grow past it, as they do on a busy test host.
///
/// A driver with event indices is not compared here: this guest takes each
/// completion as it lands (no exit on its register reads), so even unpolled
/// the device, re-reading the available index at the end of its pass, finds
/// the next request there and the driver seldom needs to notify (~50 per
/// 8,000 requests). The device tests check that the poll keeps `avail_event`
/// behind (`virtio_mmio.rs`).
#[test]
fn polling_the_rings_spares_the_driver_its_notifications() {
    let params = "blk_qd=1 blk_event_idx=0";
    let polled = bench("poll", params, &["--io-poll-us", "10000"], "io_engine=sync");
    let unpolled = bench("unpolled", params, &["--io-poll-us", "0"], "io_engine=sync");
    for b in [&polled, &unpolled] {
        assert_eq!(b.requests(), 2 * b.figure("requests"), "{}", b.block);
    }
    let (with, without) = (
        polled.metric("notifications"),
        unpolled.metric("notifications"),
    );
    assert!(
        without * 10 >= unpolled.requests() * 9,
        "{without} notifications unpolled: {}",
        unpolled.block
    );
    assert!(
        with * 4 < without,
        "{with} notifications polled, {without} not"
    );
}
