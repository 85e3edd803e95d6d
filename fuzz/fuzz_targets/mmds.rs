//! MMDS against a hostile guest: arbitrary bytes as HTTP requests (V1 or V2,
//! IMDS or JSON), then raw frames and well-formed TCP segments (valid checksums,
//! fuzzed ports, sequence numbers, controls and payloads) into the net device's
//! MMDS stack. Nothing may panic or hang; every answer is HTTP; every frame the
//! stack sends fits an Ethernet frame; what it queues stays bounded.

#![no_main]

use std::net::Ipv4Addr;
use std::time::Instant;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet,
    Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};
use vigil_devices::virtio::net::{MmdsStack, MMDS_MAC};
use vigil_mmds::{Mmds, MmdsConfig, MmdsVersion, Request, DEFAULT_IPV4, MAX_REQUEST};

const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

#[derive(Arbitrary, Debug)]
struct Segment {
    port: u16,
    seq: u32,
    ack: Option<u32>,
    control: u8,
    payload: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Frame {
    Raw(Vec<u8>),
    Tcp(Segment),
}

#[derive(Arbitrary, Debug)]
struct Input {
    v2: bool,
    imds_compat: bool,
    requests: Vec<Vec<u8>>,
    frames: Vec<Frame>,
}

fn tcp(s: &Segment) -> Vec<u8> {
    let src = Ipv4Addr::new(169, 254, 0, 2);
    let control = match s.control % 5 {
        0 => TcpControl::None,
        1 => TcpControl::Psh,
        2 => TcpControl::Syn,
        3 => TcpControl::Fin,
        _ => TcpControl::Rst,
    };
    let payload = &s.payload[..s.payload.len().min(1400)];
    let repr = TcpRepr {
        src_port: s.port,
        dst_port: 80,
        control,
        seq_number: TcpSeqNumber(s.seq as i32),
        ack_number: s.ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 8192,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: DEFAULT_IPV4,
        next_header: IpProtocol::Tcp,
        payload_len: repr.buffer_len(),
        hop_limit: 64,
    };
    let mut f = vec![0; 14 + ip.buffer_len() + repr.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut f[..]);
    eth.set_dst_addr(EthernetAddress(MMDS_MAC));
    eth.set_src_addr(EthernetAddress(GUEST_MAC));
    eth.set_ethertype(EthernetProtocol::Ipv4);
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut f[14..34]), &caps);
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut f[34..]),
        &IpAddress::Ipv4(src),
        &IpAddress::Ipv4(DEFAULT_IPV4),
        &caps,
    );
    f
}

fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(GUEST_MAC);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend(GUEST_MAC);
    f.extend([169, 254, 0, 2, 0, 0, 0, 0, 0, 0]);
    f.extend(DEFAULT_IPV4.octets());
    f
}

fuzz_target!(|input: Input| {
    let mmds = Mmds::new(4096);
    mmds.set_config(MmdsConfig {
        version: if input.v2 { MmdsVersion::V2 } else { MmdsVersion::V1 },
        network_interfaces: vec!["eth0".into()],
        ipv4_address: DEFAULT_IPV4,
        imds_compat: input.imds_compat,
    });
    mmds.put(serde_json::json!({"latest": {"meta-data": {"id": "i-1", "n": 2, "l": [1]}}}))
        .unwrap();
    for r in input.requests.iter().take(16) {
        match mmds.answer(r, Instant::now()) {
            Request::Answered { consumed, response, .. } => {
                assert!(consumed <= r.len());
                assert!(response.starts_with(b"HTTP/1.1 "));
            }
            Request::Incomplete => assert!(r.len() < MAX_REQUEST),
        }
    }
    let mut stack = MmdsStack::new(mmds).unwrap();
    stack.from_guest(&arp());
    for frame in input.frames.iter().take(64) {
        let bytes = match frame {
            Frame::Raw(b) => b.clone(),
            Frame::Tcp(s) => tcp(s),
        };
        if stack.is_for_mmds(&bytes) {
            stack.from_guest(&bytes);
        }
        let mut out = 0;
        while let Some(f) = stack.to_guest() {
            assert!(f.len() <= 1514);
            out += 1;
        }
        assert!(out <= 64, "{out} frames queued at once");
    }
});
