//! virtio-net end to end: the test guest sends a frame through a tap, the host
//! reads it on an AF_PACKET socket bound to the tap and answers with one of its
//! own. Needs root (or CAP_NET_ADMIN) and /dev/net/tun; skipped otherwise.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::http::request;
use common::mobility::{api_vigil, ok};
use common::tap::{can_use_tun, in_netns, TestTap};
use common::{finish, vigil, TIMEOUT};
use serde_json::{json, Value};

const ETHERTYPE: u16 = 0x88b5;
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// An AF_PACKET socket for our ethertype on one interface.
struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    fn bind(ifname: &str) -> Self {
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {ifname}");
        let proto = ETHERTYPE.to_be() as i32;
        // SAFETY: plain socket call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: we own the fd just created.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = Self::addr(ifindex, [0; 6]);
        // SAFETY: bind with a sockaddr_ll of the right size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Self { fd, ifindex }
    }

    fn addr(ifindex: i32, mac: [u8; 6]) -> libc::sockaddr_ll {
        let mut addr: libc::sockaddr_ll = unsafe_zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETHERTYPE.to_be();
        addr.sll_ifindex = ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&mac);
        addr
    }

    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        // SAFETY: receives into our buffer.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }

    fn send(&self, to: [u8; 6], frame: &[u8]) {
        let addr = Self::addr(self.ifindex, to);
        // SAFETY: sends our buffer to a sockaddr_ll.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl PacketSocket {
    /// Sends `frame` (its own destination inside) without waiting; false when the
    /// tap did not take it.
    fn try_send(&self, frame: &[u8]) -> bool {
        // SAFETY: sends our buffer on the bound socket.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        n == frame.len() as isize
    }

    /// A frame if one is waiting.
    fn try_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        // SAFETY: receives into our buffer.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        (n > 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }
}

fn unsafe_zeroed() -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain integers; all zeros is valid.
    unsafe { std::mem::zeroed() }
}

/// A tap named `<prefix><pid>` and a packet socket on it, or `None` (with a
/// message) where taps cannot be made.
fn test_tap(prefix: &str) -> Option<(TestTap, PacketSocket)> {
    if !can_use_tun() {
        return None;
    }
    let name = format!("{prefix}{}", std::process::id() % 100_000);
    match TestTap::create(&name) {
        Ok(tap) => {
            let socket = PacketSocket::bind(&name);
            Some((tap, socket))
        }
        Err(e) => {
            eprintln!("SKIP: cannot create tap {name}: {e}");
            None
        }
    }
}

#[test]
fn net_frames_cross_the_tap_both_ways() {
    in_netns(|| frames_cross_the_tap(&[]));
}

/// The same over virtio-pci (`--enable-pci`): the device and the scenario are unchanged.
#[test]
fn net_frames_cross_the_tap_both_ways_over_pci() {
    in_netns(|| frames_cross_the_tap(&["--enable-pci"]));
}

/// With `VIRTIO_NET_F_MRG_RXBUF` and 512-byte receive buffers, a full-size
/// frame arrives over three of them, every byte in place.
#[test]
fn a_full_frame_spans_mergeable_receive_buffers() {
    in_netns(|| frames_cross_the_tap(&["--cmdline", "test=net net_mrg=1"]));
}

fn frames_cross_the_tap(extra: &[&str]) {
    let mergeable = extra.contains(&"test=net net_mrg=1");
    let Some((tap, socket)) = test_tap("vgtest") else {
        return;
    };
    let name = tap.name().to_string();
    let mac = [0x02, 0x76, 0x69, 0x67, 0x00, 0x42];
    let mut args = vec![
        "run".to_owned(),
        "--net".to_owned(),
        format!("tap={name},mac=02:76:69:67:00:42"),
    ];
    if !mergeable {
        args.extend(["--cmdline".to_owned(), "test=net".to_owned()]);
    }
    let child = vigil().args(args).args(extra).spawn().unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let frame = loop {
        if let Some(frame) = socket.recv() {
            break Some(frame);
        }
        if Instant::now() > deadline {
            break None;
        }
    };
    let Some(frame) = frame else {
        let r = finish(child, TIMEOUT);
        panic!("no frame from the guest\n{r}");
    };
    assert_eq!(&frame[0..6], &[0xff; 6], "broadcast destination");
    assert_eq!(&frame[6..12], &mac, "source is the guest's MAC");
    assert_eq!(&frame[12..14], &ETHERTYPE.to_be_bytes());
    assert!(
        frame[14..].starts_with(b"vigil-net-guest-to-host"),
        "{frame:?}"
    );
    assert_eq!(frame.len(), 60, "padded to the Ethernet minimum");

    let mut reply = Vec::new();
    reply.extend_from_slice(&mac);
    reply.extend_from_slice(&HOST_MAC);
    reply.extend_from_slice(&ETHERTYPE.to_be_bytes());
    reply.extend_from_slice(b"vigil-net-host-to-guest");
    // After the marker, the pattern the guest checks byte by byte.
    let len = if mergeable { 1514 } else { 60 };
    reply.extend((reply.len()..len).map(|i| (i % 251) as u8));
    socket.send(mac, &reply);

    let r = finish(child, TIMEOUT);
    let expected = if mergeable {
        "TEST net PASS mac=02:76:69:67:00:42 sent=1 received=1 buffers=3"
    } else {
        "TEST net PASS mac=02:76:69:67:00:42 sent=1 received=1"
    };
    assert_eq!(r.line("TEST net "), expected, "{r}");
    assert_eq!(r.code, Some(0), "{r}");
}

#[test]
fn net_hostile_transmit_chains_never_reach_the_tap() {
    in_netns(hostile_transmit_chains_never_reach_the_tap);
}

fn hostile_transmit_chains_never_reach_the_tap() {
    let Some((tap, socket)) = test_tap("vgevil") else {
        return;
    };
    let name = tap.name().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut frames = Vec::new();
            loop {
                match socket.recv() {
                    Some(frame) => frames.push(frame),
                    None if stop.load(std::sync::atomic::Ordering::SeqCst) => return frames,
                    None => {}
                }
            }
        })
    };
    let child = vigil()
        .args(["run", "--net", &format!("tap={name}")])
        .args(["--cmdline", "test=net-evil"])
        .spawn()
        .unwrap();
    let r = finish(child, TIMEOUT);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let frames = receiver.join().unwrap();
    // Each malformed chain is used and dropped (the one given before DRIVER_OK is
    // never started; a head past the queue needs a reset), and a good frame goes
    // through after each.
    assert_eq!(
        r.line("TEST net-evil "),
        "TEST net-evil PASS pre_ok=idle oob=used loop=used short=used hdr=used huge=used \
         dir=used head=needs_reset recovered=8",
        "{r}"
    );
    assert_eq!(r.code, Some(0), "{r}");
    // On the tap: the eight good frames and nothing of the malformed chains (which
    // carry a payload of their own).
    let payloads: Vec<&[u8]> = frames.iter().map(|f| &f[14..]).collect();
    assert_eq!(frames.len(), 8, "{payloads:?}");
    for frame in &frames {
        assert_eq!(frame.len(), 60);
        assert!(frame[14..].starts_with(b"vigil-net-evil-ok"), "{frame:?}");
    }
}

#[test]
fn net_option_errors_name_the_value() {
    let r = common::run(&["run", "--net", "tap=x,mac=02:00"], TIMEOUT);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(
        r.stderr.contains("mac=02:00: expected six hex bytes"),
        "{r}"
    );
    let r = common::run(&["run", "--net", "tap=a/b"], TIMEOUT);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("--net tap=a/b:"), "{r}");
    let r = common::run(&["run", "--net", "tap=x,mac=03:00:00:00:00:01"], TIMEOUT);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("multicast"), "{r}");
}

/// The taps process `pid` holds open (a tun fd's fdinfo names its interface).
fn open_taps(pid: u32) -> Vec<String> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut taps: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            let line = info.lines().find(|l| l.starts_with("iff:"))?;
            Some(line["iff:".len()..].trim().to_owned())
        })
        .collect();
    taps.sort();
    taps
}

/// `PUT /snapshot/load` with `network_overrides` and `vsock_override`: the
/// restored interface runs on the other tap and the vsock device listens on
/// the other socket; an override naming no saved interface is refused with
/// the ids the snapshot has, and the process can still load.
#[test]
fn a_loaded_snapshot_uses_the_overridden_tap_and_vsock_socket() {
    in_netns(|| {
        if !can_use_tun() {
            return;
        }
        let tap = |prefix: &str| {
            let name = format!("{prefix}{}", std::process::id() % 100_000);
            TestTap::create(&name).unwrap_or_else(|e| panic!("tap {name}: {e}"))
        };
        let (first, second) = (tap("vgso"), tap("vgsn"));
        let dir = common::scratch("net-snapshot-overrides");
        let (mut source, sock) = api_vigil(&dir, "source");
        ok(
            &sock,
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": vigil_test_guest::ELF_PATH, "boot_args": "test=counter"}),
        );
        ok(
            &sock,
            "PUT",
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": first.name()}),
        );
        ok(
            &sock,
            "PUT",
            "/vsock",
            json!({"guest_cid": 3, "uds_path": dir.join("saved.vsock")}),
        );
        ok(
            &sock,
            "PUT",
            "/actions",
            json!({"action_type": "InstanceStart"}),
        );
        source.wait_for(&["counter: 2"], TIMEOUT);
        ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
        let (state, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
        ok(
            &sock,
            "PUT",
            "/snapshot/create",
            json!({"snapshot_path": state, "mem_file_path": mem}),
        );
        drop(source);

        let (mut restored, sock) = api_vigil(&dir, "restored");
        let load = |overrides: Value| {
            let mut body = json!({
                "snapshot_path": state,
                "mem_backend": {"backend_type": "File", "backend_path": mem},
                "resume_vm": true,
            });
            body.as_object_mut()
                .unwrap()
                .extend(overrides.as_object().unwrap().clone());
            request(&sock, "PUT", "/snapshot/load", &body.to_string())
        };
        for (overrides, why) in [
            (
                json!({"network_overrides": [{"iface_id": "eth9", "host_dev_name": second.name()}]}),
                "network_overrides[0].iface_id \"eth9\": no interface of the snapshot has this id (its interfaces: \"eth0\")",
            ),
            (
                json!({"network_overrides": [{"iface_id": "eth0", "host_dev_name": "a/b"}]}),
                "network_overrides[0].host_dev_name \"a/b\"",
            ),
        ] {
            let a = load(overrides);
            assert_eq!(a.status, 400, "{a:?}");
            assert!(a.fault().contains(why), "{a:?} lacks {why:?}");
        }
        let moved = dir.join("moved.vsock");
        let a = load(json!({
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": second.name()}],
            "vsock_override": {"uds_path": moved},
        }));
        assert_eq!(a.status, 204, "{a:?}");
        restored.wait_for(&["counter: "], TIMEOUT);
        assert_eq!(
            open_taps(restored.pid()),
            vec![second.name().to_owned()],
            "the restored interface is on the overriding tap"
        );
        assert!(
            std::os::unix::net::UnixStream::connect(&moved).is_ok(),
            "the vsock device listens on {}",
            moved.display()
        );
        std::fs::remove_dir_all(&dir).ok();
    });
}

/// Receive at depth: the guest posts 32 buffers and asks for frames (a ready
/// frame naming their length); the host floods the tap until the guest's done
/// frame. Every one of the guest's 20000 counted frames went through the device,
/// which interrupted once per batch, not per frame.
#[test]
fn net_receive_with_buffers_posted_interrupts_once_per_batch() {
    in_netns(|| {
        let Some((tap, socket)) = test_tap("vgnr") else {
            return;
        };
        let flooder = std::thread::spawn(move || {
            let deadline = Instant::now() + TIMEOUT;
            let len = loop {
                assert!(Instant::now() < deadline, "no ready frame from the guest");
                let Some(frame) = socket.recv() else { continue };
                if let Some(rest) = frame[14..].strip_prefix(b"vigil-net-bench-rx-ready") {
                    break usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                }
            };
            let mut frame = vec![0u8; len];
            frame[..6].fill(0xff);
            frame[6..12].copy_from_slice(&HOST_MAC);
            frame[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
            frame[14..38].copy_from_slice(b"vigil-net-bench-rx-flood");
            let mut sent = 0u64;
            loop {
                assert!(Instant::now() < deadline, "no done frame from the guest");
                for _ in 0..32 {
                    sent += u64::from(socket.try_send(&frame));
                }
                std::thread::yield_now();
                while let Some(got) = socket.try_recv() {
                    if got[14..].starts_with(b"vigil-net-bench-rx-done") {
                        return (len, sent);
                    }
                }
            }
        });
        let (line, net) = net_bench(tap.name(), "net_dir=rx net_qd=32 net_frame=100");
        let (len, sent) = flooder.join().unwrap();
        assert_eq!(len, 100, "the ready frame names net_frame=");
        assert!(
            line.contains("frames=20000 frame=100 qd=32 event_idx=1"),
            "{line}"
        );
        let (frames, interrupts) = (
            net["rx_count"].as_u64().unwrap(),
            net["interrupts"].as_u64().unwrap(),
        );
        assert!(
            (20_000..=sent + 100).contains(&frames),
            "{frames} frames delivered of {sent} sent: {net}"
        );
        assert_eq!(net["errors"].as_u64().unwrap(), 0, "{net}");
        assert!(interrupts * 4 < frames, "{interrupts} interrupts: {net}");
    });
}

/// `net-bench` on a tap with `params`: its PASS line and the net metrics.
fn net_bench(tap: &str, params: &str) -> (String, Value) {
    let metrics = std::env::temp_dir().join(format!(
        "vigil-net-bench-{}-{}.json",
        std::process::id(),
        params.len()
    ));
    std::fs::remove_file(&metrics).ok();
    let cmdline = format!("test=net-bench {params}");
    let run = common::run(
        &[
            "run",
            "--net",
            &format!("tap={tap}"),
            "--metrics-path",
            metrics.to_str().unwrap(),
            "--cmdline",
            &cmdline,
        ],
        TIMEOUT,
    );
    let line = run.line("TEST net-bench ").to_owned();
    assert!(line.starts_with("TEST net-bench PASS"), "{run}");
    let text = std::fs::read_to_string(&metrics).expect("the metrics file");
    std::fs::remove_file(&metrics).ok();
    let m: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    (line, m["net"].clone())
}

/// With `VIRTIO_RING_F_EVENT_IDX` and 32 frames in flight the guest notifies
/// and is interrupted at most once per batch, not per frame (none at all where
/// it takes each batch before the device reads `used_event`, as this guest,
/// which polls the used ring, mostly does); without it, at one frame in
/// flight, each pass of the device over the queue interrupts. Every frame
/// reached the tap.
#[test]
fn net_transmit_in_batches_interrupts_once_per_batch() {
    in_netns(|| {
        let Some((tap, _)) = test_tap("vgnq") else {
            return;
        };
        let (line, net) = net_bench(tap.name(), "net_qd=32");
        assert!(
            line.contains("qd=32 event_idx=1 max_in_flight=32"),
            "{line}"
        );
        let (frames, interrupts) = (
            net["tx_count"].as_u64().unwrap(),
            net["interrupts"].as_u64().unwrap(),
        );
        assert_eq!(
            (frames, net["errors"].as_u64().unwrap()),
            (20_000, 0),
            "{net}"
        );
        assert!(interrupts * 4 < frames, "{interrupts} interrupts: {net}");

        let (line, net) = net_bench(tap.name(), "net_qd=1 net_event_idx=0 net_frames=5000");
        assert!(
            line.contains("frames=5000 frame=60 qd=1 event_idx=0"),
            "{line}"
        );
        // One interrupt per pass of the device over the queue. A pass serves
        // what the guest adds while it runs: this guest adds its next frame
        // as soon as it sees the last one used, and the device loop polls, so
        // a pass serves tens to hundreds of frames (~100 on a quiet host).
        let (frames, interrupts) = (
            net["tx_count"].as_u64().unwrap(),
            net["interrupts"].as_u64().unwrap(),
        );
        assert_eq!(frames, 5000, "{net}");
        assert!(
            interrupts > 0 && interrupts <= frames,
            "{interrupts} interrupts: {net}"
        );
    });
}

/// Checksum offloads end to end. The guest sends a UDP datagram whose checksum
/// it left partial (`VIRTIO_NET_F_CSUM`, `NEEDS_CSUM`): the host's UDP socket
/// receives it only if the header reached the tap, which finishes the
/// checksum (a zeroed header would leave a bad one, and the stack drops the
/// datagram). The host's answer reaches the guest with its checksum left
/// partial when the guest accepted `VIRTIO_NET_F_GUEST_CSUM` (the tap was told,
/// `TUNSETOFFLOAD`), complete when it did not; valid either way.
#[test]
fn checksum_offloads_reach_the_tap_and_the_guest() {
    in_netns(|| {
        for (guest_csum, partial) in [(1, 1), (0, 0)] {
            udp_with_partial_checksums(guest_csum, partial);
        }
    });
}

fn udp_with_partial_checksums(guest_csum: u8, partial: u8) {
    use std::net::{Ipv4Addr, UdpSocket};
    if !can_use_tun() {
        return;
    }
    let name = format!("vgcs{guest_csum}{}", std::process::id() % 10_000);
    let tap = match TestTap::create(&name) {
        Ok(tap) => tap,
        Err(e) => {
            eprintln!("SKIP: cannot create tap {name}: {e}");
            return;
        }
    };
    tap.set_ipv4(Ipv4Addr::new(192, 168, 127, 1)).unwrap();
    let mac = "02:76:69:67:00:43";
    let neigh = std::process::Command::new("ip")
        .args([
            "neigh",
            "replace",
            "192.168.127.2",
            "lladdr",
            mac,
            "dev",
            &name,
        ])
        .status()
        .expect("ip (iproute2)");
    assert!(neigh.success(), "ip neigh replace");
    let socket = UdpSocket::bind("192.168.127.1:5555").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let cmdline = format!("test=net-csum net_guest_csum={guest_csum}");
    let child = vigil()
        .args([
            "run",
            "--net",
            &format!("tap={name},mac={mac}"),
            "--cmdline",
            &cmdline,
        ])
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let received = socket.recv_from(&mut buf);
    let Ok((n, from)) = received else {
        let r = finish(child, TIMEOUT);
        panic!("no datagram from the guest ({received:?})\n{r}");
    };
    assert_eq!(&buf[..n], b"vigil-csum-offload-to-host");
    assert_eq!(from.to_string(), "192.168.127.2:5556");
    socket
        .send_to(b"vigil-csum-offload-to-guest", from)
        .unwrap();
    let r = finish(child, TIMEOUT);
    assert_eq!(
        r.line("TEST net-csum "),
        format!("TEST net-csum PASS tx=1 rx_partial={partial} rx_valid=1"),
        "{r}"
    );
    drop(tap);
}

/// `--net queue_pairs=2` on a multi-queue tap: the guest (`net-mq`) finds two
/// pairs and a control queue, takes both with `VQ_PAIRS_SET`, sends a frame on
/// each transmit queue, and sees the host's frames arrive on both receive
/// queues: the host sends UDP datagrams of many flows, which the tap spreads
/// over its queues by flow hash.
#[test]
fn two_queue_pairs_carry_frames_both_ways() {
    in_netns(|| two_queue_pairs(&[]));
}

/// The same over virtio-pci: five queues, each with its MSI-X vector.
#[test]
fn two_queue_pairs_carry_frames_both_ways_over_pci() {
    in_netns(|| two_queue_pairs(&["--enable-pci"]));
}

fn two_queue_pairs(extra: &[&str]) {
    if !can_use_tun() {
        return;
    }
    let name = format!("vgmq{}", std::process::id() % 100_000);
    let tap = match TestTap::create_multi_queue(&name) {
        Ok(tap) => tap,
        Err(e) => return eprintln!("SKIP: cannot create a multi-queue tap {name}: {e}"),
    };
    tap.set_ipv4(std::net::Ipv4Addr::new(10, 99, 0, 1)).unwrap();
    let socket = PacketSocket::bind(&name);
    let child = vigil()
        .args(["run", "--net"])
        .arg(format!("tap={name},queue_pairs=2"))
        .args(["--cmdline", "test=net-mq"])
        .args(extra)
        .spawn()
        .unwrap();
    // The guest's frame from each transmit queue.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while seen.len() < 2 && Instant::now() < deadline {
        if let Some(frame) = socket.recv() {
            if let Some(rest) = frame[14..].strip_prefix(b"vigil-net-mq-tx") {
                seen.push(rest[0]);
            }
        }
    }
    seen.sort_unstable();
    if seen != b"01" {
        let r = finish(child, TIMEOUT);
        panic!("frames from the guest's transmit queues: {seen:?}\n{r}");
    }
    // Datagrams of 64 flows (source ports) to the subnet's broadcast address.
    for _ in 0..64 {
        let udp = std::net::UdpSocket::bind("10.99.0.1:0").unwrap();
        udp.set_broadcast(true).unwrap();
        udp.send_to(b"vigil-net-mq-host", "10.99.0.255:5000")
            .unwrap();
    }
    let r = finish(child, TIMEOUT);
    assert_eq!(
        r.line("TEST net-mq "),
        "TEST net-mq PASS pairs=2 tx=2 rx_queues=2",
        "{r}"
    );
}

/// `queue_pairs=2` on a tap made without `multi_queue` fails at start-up with
/// an error that says what the tap needs.
#[test]
fn queue_pairs_on_a_plain_tap_say_what_it_needs() {
    in_netns(|| {
        let Some((tap, _socket)) = test_tap("vgpl") else {
            return;
        };
        let r = common::run(
            &["run", "--net", &format!("tap={},queue_pairs=2", tap.name())],
            TIMEOUT,
        );
        assert_ne!(r.code, Some(0), "{r}");
        assert!(
            r.stderr
                .contains("queue_pairs above 1 needs a multi-queue tap"),
            "{r}"
        );
    });
}

/// `queue_pairs` out of range is refused, naming the option.
#[test]
fn queue_pairs_out_of_range_is_named() {
    let r = common::run(&["run", "--net", "tap=vgbad0,queue_pairs=17"], TIMEOUT);
    assert_ne!(r.code, Some(0), "{r}");
    assert!(
        r.stderr.contains("--net queue_pairs=17: expected 1 to 16"),
        "{r}"
    );
}
