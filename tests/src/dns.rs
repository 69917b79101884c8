//! A tiny authoritative DNS server on loopback for host-name rule tests: it
//! answers every A query with the address currently set, with a TTL of one
//! second, and every other query with an empty answer. Stops on drop.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

pub const TTL_SECS: u32 = 1;

pub struct DnsServer {
    addr: SocketAddr,
    answer: Arc<AtomicU32>,
    queries: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    pub fn start(answer: Ipv4Addr) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind the test DNS server");
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        let addr = sock.local_addr().expect("addr");
        let answer = Arc::new(AtomicU32::new(u32::from(answer)));
        let queries = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, q, s) = (answer.clone(), queries.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else { continue };
                if let Some(reply) = reply(&buf[..n], Ipv4Addr::from(a.load(Ordering::Relaxed))) {
                    q.fetch_add(1, Ordering::Relaxed);
                    let _ = sock.send_to(&reply, peer);
                }
            }
        });
        Self { addr, answer, queries, stop, thread: Some(thread) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answer A queries with `ip` from now on.
    pub fn set(&self, ip: Ipv4Addr) {
        self.answer.store(u32::from(ip), Ordering::Relaxed);
    }

    pub fn queries(&self) -> u32 {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The response to one query: the question echoed, one A record for an A
/// question, nothing for any other type.
fn reply(q: &[u8], ip: Ipv4Addr) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question's name: labels up to the zero byte, then type and class.
    let mut i = 12;
    while *q.get(i)? != 0 {
        i += 1 + usize::from(q[i]);
    }
    let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
    let question = &q[12..i + 5];
    let is_a = qtype == 1;
    let mut r = Vec::with_capacity(64);
    r.extend_from_slice(&q[0..2]); // id
    r.extend_from_slice(&[0x84 | (q[2] & 0x01), 0x00]); // response, authoritative, RD copied; NOERROR
    r.extend_from_slice(&[0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if is_a {
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]); // name pointer, A, IN
        r.extend_from_slice(&TTL_SECS.to_be_bytes());
        r.extend_from_slice(&[0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}
