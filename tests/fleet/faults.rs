//! A UDP proxy on loopback between agents and the control plane that drops, duplicates
//! and delays datagrams at set rates (a random delay per datagram also reorders them),
//! and can cut the path entirely for a while: the network of a remote site, for QUIC.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;

/// What the proxy does to each datagram, in each direction.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Share of datagrams dropped.
    pub drop: f64,
    /// Share of datagrams sent twice.
    pub duplicate: f64,
    /// Each datagram is held for a uniformly random time up to this (so later ones may
    /// overtake it).
    pub max_delay: Duration,
}

/// What the proxy did.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct LossyProxy {
    /// Where agents connect instead of the control plane.
    pub addr: SocketAddr,
    pub counts: Arc<FaultCounts>,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// A small seeded generator (SplitMix64): the same faults for the same seed.
struct Dice(Mutex<u64>);

impl Dice {
    fn uniform(&self) -> f64 {
        let mut state = self.0.lock().unwrap();
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as f64 / u64::MAX as f64
    }
}

struct Path {
    faults: Faults,
    dice: Dice,
    counts: Arc<FaultCounts>,
    cut: Arc<AtomicBool>,
}

impl Path {
    /// Sends `datagram` to `to` through `socket`, as the faults say.
    fn send(self: &Arc<Self>, socket: &Arc<UdpSocket>, to: Option<SocketAddr>, datagram: &[u8]) {
        if self.cut.load(Ordering::Relaxed) || self.dice.uniform() < self.faults.drop {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let copies = if self.dice.uniform() < self.faults.duplicate {
            self.counts.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.faults.max_delay.mul_f64(self.dice.uniform());
            let (socket, datagram, counts) =
                (Arc::clone(socket), datagram.to_vec(), Arc::clone(&self.counts));
            tokio::spawn(async move {
                // Latency of the simulated network, not synchronisation.
                tokio::time::sleep(delay).await;
                let sent = match to {
                    Some(to) => socket.send_to(&datagram, to).await,
                    None => socket.send(&datagram).await,
                };
                if sent.is_ok() {
                    counts.forwarded.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
}

impl LossyProxy {
    /// Starts a proxy to `upstream` on a free loopback port.
    pub async fn start(upstream: SocketAddr, faults: Faults, seed: u64) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let counts = Arc::new(FaultCounts::default());
        let cut = Arc::new(AtomicBool::new(false));
        let path = Arc::new(Path {
            faults,
            dice: Dice(Mutex::new(seed)),
            counts: Arc::clone(&counts),
            cut: Arc::clone(&cut),
        });
        let task = tokio::spawn(async move {
            // One upstream socket per client address, each with a task for the replies
            // (in a set that aborts them when this task is aborted).
            let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut replies = tokio::task::JoinSet::new();
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else { break };
                let upstream_socket = clients.entry(from).or_insert_with(|| {
                    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                    socket.set_nonblocking(true).unwrap();
                    socket.connect(upstream).unwrap();
                    let socket = Arc::new(UdpSocket::from_std(socket).unwrap());
                    let (back, front, path) =
                        (Arc::clone(&socket), Arc::clone(&front), Arc::clone(&path));
                    replies.spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        while let Ok(n) = back.recv(&mut buf).await {
                            path.send(&front, Some(from), &buf[..n]);
                        }
                    });
                    socket
                });
                path.send(upstream_socket, None, &buf[..n]);
            }
        });
        Self { addr, counts, cut, task }
    }

    /// Drops everything, both ways, while `cut` is true.
    pub fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
