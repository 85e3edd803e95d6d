//! MMDS on a guest interface: frames the guest sends to the MMDS address (ARP
//! for it, TCP to its port 80) go to a TCP/IP stack in the VMM (smoltcp) instead
//! of the tap; the stack's frames wait here for the guest's receive queue. Each
//! connection's bytes go to [`Mmds::answer`], one request at a time.
//!
//! Bounded whatever the guest does: 8 connections (a SYN beyond them is reset),
//! a request of at most [`MAX_REQUEST`] bytes per connection, one answer waiting
//! per connection, 64 frames queued each way (more are dropped and counted).
//! The stack runs when the guest sends to it: it has no timer, so a frame the
//! guest never receives (its receive queue full) is not retransmitted unless
//! the guest sends again.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use vigil_mmds::{Mmds, Request, MAX_REQUEST};

/// The MAC MMDS answers from (locally administered), as Firecracker's.
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
const PORT: u16 = 80;
const CONNECTIONS: usize = 8;
const QUEUED: usize = 64;
/// An Ethernet frame without FCS or VLAN tag: what the guest may send us.
const FRAME_MAX: usize = 1514;
const ETH_ARP: [u8; 2] = [0x08, 0x06];
const ETH_IPV4: [u8; 2] = [0x08, 0x00];
const TCP: u8 = 6;

/// The frames between the stack and the device.
#[derive(Default)]
struct Frames {
    from_guest: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
    dropped: u64,
}

struct FromGuest(Vec<u8>);

struct ToGuest<'a> {
    queue: &'a mut VecDeque<Vec<u8>>,
    dropped: &'a mut u64,
}

impl phy::RxToken for FromGuest {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for ToGuest<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        if self.queue.len() < QUEUED {
            self.queue.push_back(frame);
        } else {
            *self.dropped += 1;
        }
        r
    }
}

impl phy::Device for Frames {
    type RxToken<'a> = FromGuest;
    type TxToken<'a> = ToGuest<'a>;

    fn receive(&mut self, _: Instant) -> Option<(FromGuest, ToGuest<'_>)> {
        let frame = self.from_guest.pop_front()?;
        Some((
            FromGuest(frame),
            ToGuest {
                queue: &mut self.to_guest,
                dropped: &mut self.dropped,
            },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<ToGuest<'_>> {
        // Full: the stack keeps what it has to send until the next poll.
        if self.to_guest.len() >= QUEUED {
            return None;
        }
        Some(ToGuest {
            queue: &mut self.to_guest,
            dropped: &mut self.dropped,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = FRAME_MAX;
        caps
    }
}

/// One connection slot: a listening socket, the request bytes received, and
/// the answer not yet in the socket's send buffer.
struct Connection {
    socket: SocketHandle,
    request: Vec<u8>,
    answer: Vec<u8>,
    close_after: bool,
}

/// The MMDS end of one interface.
pub struct MmdsStack {
    mmds: Mmds,
    ip: Ipv4Addr,
    iface: Interface,
    sockets: SocketSet<'static>,
    connections: Vec<Connection>,
    frames: Frames,
    started: std::time::Instant,
}

impl MmdsStack {
    /// The stack for `mmds`, on the address its configuration gives (`None`
    /// when it has none: then nothing is diverted).
    pub fn new(mmds: Mmds) -> Option<Self> {
        let ip = mmds.config()?.ipv4_address;
        let mut frames = Frames::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(MMDS_MAC)));
        // Seeds the initial sequence numbers; they need not be secret here.
        config.random_seed = u64::from(std::process::id()) ^ 0x6d6d_6473;
        let started = std::time::Instant::now();
        let mut iface = Interface::new(config, &mut frames, Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            // Prefix 0: whatever address the guest uses is on the link, and
            // answers go straight to the MAC it asked from.
            let [a, b, c, d] = ip.octets();
            let _ = addrs.push(IpCidr::new(IpAddress::v4(a, b, c, d), 0));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let connections = (0..CONNECTIONS)
            .map(|_| {
                let mut socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; MAX_REQUEST]),
                    tcp::SocketBuffer::new(vec![0; 16 << 10]),
                );
                // A listening socket on a fixed port always accepts this.
                let _ = socket.listen(PORT);
                Connection {
                    socket: sockets.add(socket),
                    request: Vec::new(),
                    answer: Vec::new(),
                    close_after: false,
                }
            })
            .collect();
        Some(Self {
            mmds,
            ip,
            iface,
            sockets,
            connections,
            frames,
            started,
        })
    }

    /// The store it answers from.
    pub fn store(&self) -> &Mmds {
        &self.mmds
    }

    /// Whether the guest's Ethernet `frame` is for MMDS: ARP about its address,
    /// or IPv4 TCP to its address and port 80.
    pub fn is_for_mmds(&self, frame: &[u8]) -> bool {
        let ip = self.ip.octets();
        match frame.get(12..14) {
            Some(t) if t == ETH_ARP => frame.get(38..42) == Some(&ip[..]),
            Some(t) if t == ETH_IPV4 => {
                let Some(&[version_ihl, ..]) = frame.get(14..) else {
                    return false;
                };
                let ihl = usize::from(version_ihl & 0xf) * 4;
                frame.get(23) == Some(&TCP)
                    && frame.get(30..34) == Some(&ip[..])
                    && frame.get(14 + ihl + 2..14 + ihl + 4) == Some(&PORT.to_be_bytes()[..])
            }
            _ => false,
        }
    }

    /// Takes a frame [`Self::is_for_mmds`] chose, and runs the stack; the
    /// frames dropped meanwhile (this one when too large, answers when the
    /// guest's queue is full).
    pub fn from_guest(&mut self, frame: &[u8]) -> u64 {
        if frame.len() > FRAME_MAX || self.frames.from_guest.len() >= QUEUED {
            return 1;
        }
        let before = self.frames.dropped;
        self.frames.from_guest.push_back(frame.to_vec());
        self.poll();
        self.frames.dropped - before
    }

    /// The next frame for the guest.
    pub fn to_guest(&mut self) -> Option<Vec<u8>> {
        self.frames.to_guest.pop_front()
    }

    pub fn has_frames(&self) -> bool {
        !self.frames.to_guest.is_empty()
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.started.elapsed().as_micros() as i64)
    }

    fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.frames, &mut self.sockets);
        for c in &mut self.connections {
            let socket = self.sockets.get_mut::<tcp::Socket>(c.socket);
            serve(&self.mmds, c, socket);
        }
        // Sends what the connections wrote, and re-arms closed slots.
        self.iface.poll(now, &mut self.frames, &mut self.sockets);
    }
}

/// Moves one connection on: reads request bytes, answers whole requests (one
/// answer in flight at a time), closes when the guest did or the request was
/// unreadable, and listens again once closed.
fn serve(mmds: &Mmds, c: &mut Connection, socket: &mut tcp::Socket) {
    loop {
        let room = MAX_REQUEST - c.request.len();
        if c.close_after || room == 0 || !socket.can_recv() {
            break;
        }
        let mut buf = [0u8; 1024];
        let n = socket.recv_slice(&mut buf[..room.min(1024)]).unwrap_or(0);
        if n == 0 {
            break;
        }
        c.request.extend_from_slice(&buf[..n]);
    }
    while c.answer.is_empty() && !c.close_after && !c.request.is_empty() {
        match mmds.answer(&c.request, std::time::Instant::now()) {
            Request::Incomplete => break,
            Request::Answered {
                consumed,
                response,
                close,
            } => {
                tracing::debug!(bytes = consumed, "MMDS request answered");
                c.request.drain(..consumed);
                c.answer = response;
                if close {
                    c.close_after = true;
                    c.request.clear();
                }
            }
        }
    }
    if !c.answer.is_empty() && socket.can_send() {
        let n = socket.send_slice(&c.answer).unwrap_or(0);
        c.answer.drain(..n);
    }
    let peer_done = socket.state() == tcp::State::CloseWait;
    if c.answer.is_empty() && (c.close_after || peer_done) {
        socket.close();
    }
    if socket.state() == tcp::State::Closed {
        c.request.clear();
        c.answer.clear();
        c.close_after = false;
        let _ = socket.listen(PORT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket,
        TcpRepr, TcpSeqNumber,
    };
    use vigil_mmds::MmdsConfig;

    const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const GUEST_IP: [u8; 4] = [169, 254, 0, 2];

    fn stack() -> MmdsStack {
        let mmds = Mmds::new(1024);
        mmds.set_config(MmdsConfig {
            version: Default::default(),
            network_interfaces: vec!["eth0".into()],
            ipv4_address: vigil_mmds::DEFAULT_IPV4,
            imds_compat: false,
        });
        mmds.put(json!({"k": "v"})).unwrap();
        MmdsStack::new(mmds).unwrap()
    }

    fn arp_request() -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend(GUEST_MAC);
        f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend(GUEST_MAC);
        f.extend(GUEST_IP);
        f.extend([0; 6]);
        f.extend([169, 254, 169, 254]);
        f
    }

    #[test]
    fn arp_for_the_address_is_answered_from_the_mmds_mac() {
        let mut s = stack();
        let arp = arp_request();
        assert!(s.is_for_mmds(&arp));
        s.from_guest(&arp);
        let reply = s.to_guest().expect("an ARP reply");
        assert_eq!(&reply[..6], &GUEST_MAC);
        assert_eq!(&reply[6..12], &MMDS_MAC);
        assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
        assert_eq!(&reply[22..28], &MMDS_MAC, "sender hardware address");
        let mut other = arp_request();
        other[41] = 1;
        assert!(!s.is_for_mmds(&other));
    }

    /// A TCP segment from the guest to MMDS port 80.
    fn tcp(port: u16, seq: u32, ack: Option<u32>, control: TcpControl, payload: &[u8]) -> Vec<u8> {
        let (src, dst) = (Ipv4Addr::from(GUEST_IP), vigil_mmds::DEFAULT_IPV4);
        let tcp = TcpRepr {
            src_port: port,
            dst_port: PORT,
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
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
            dst_addr: dst,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut f = vec![0; 14 + ip.buffer_len() + tcp.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut f[..]);
        eth.set_dst_addr(EthernetAddress(MMDS_MAC));
        eth.set_src_addr(EthernetAddress(GUEST_MAC));
        eth.set_ethertype(EthernetProtocol::Ipv4);
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut f[14..34]), &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(&mut f[34..]),
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
            &caps,
        );
        f
    }

    /// The TCP segments MMDS sent: (flags SYN, ACK, RST, FIN; seq; payload).
    fn replies(s: &mut MmdsStack) -> Vec<(bool, bool, bool, bool, u32, Vec<u8>)> {
        std::iter::from_fn(|| s.to_guest())
            .filter(|f| f[12..14] == ETH_IPV4)
            .map(|f| {
                let t = TcpPacket::new_checked(&f[34..]).unwrap();
                let seq = t.seq_number().0 as u32;
                (
                    t.syn(),
                    t.ack(),
                    t.rst(),
                    t.fin(),
                    seq,
                    t.payload().to_vec(),
                )
            })
            .collect()
    }

    #[test]
    fn a_tcp_connection_gets_its_answer_and_connections_are_bounded() {
        let mut s = stack();
        s.from_guest(&arp_request());
        let _ = s.to_guest();
        let syn = tcp(40000, 100, None, TcpControl::Syn, &[]);
        assert!(s.is_for_mmds(&syn));
        s.from_guest(&syn);
        let r = replies(&mut s);
        assert!(matches!(r[..], [(true, true, false, false, _, _)]), "{r:?}");
        let server = r[0].4.wrapping_add(1);
        let request = b"GET /k HTTP/1.1\r\n\r\n";
        s.from_guest(&tcp(40000, 101, Some(server), TcpControl::Psh, request));
        let answer: Vec<u8> = replies(&mut s).into_iter().flat_map(|r| r.5).collect();
        let text = String::from_utf8(answer).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nv"), "{text}");

        // 7 listeners are left: the eighth new connection is reset.
        let mut accepted = 0;
        let mut reset = 0;
        for port in 41000..41008 {
            s.from_guest(&tcp(port, 1, None, TcpControl::Syn, &[]));
            for (syn, _, rst, _, _, _) in replies(&mut s) {
                accepted += usize::from(syn);
                reset += usize::from(rst);
            }
        }
        assert_eq!((accepted, reset), (CONNECTIONS - 1, 1));
    }

    #[test]
    fn garbage_is_dropped_without_answers_or_panics() {
        let mut s = stack();
        for len in 0..80 {
            let f: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let _ = s.is_for_mmds(&f);
            s.from_guest(&f);
        }
        let mut truncated = arp_request();
        truncated.truncate(40);
        assert!(!s.is_for_mmds(&truncated));
        assert_eq!(s.from_guest(&vec![0; 9000]), 1, "dropped");
        assert!(s.to_guest().is_none());
    }
}
