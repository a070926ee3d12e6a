//! What peers that have not authenticated may hold of a port: a table of pending
//! connections, bounded in all and per address. A new connection always gets in; when
//! the table (or its address's share) is full, the pending connection that has been quiet
//! longest is dropped to make room: first those from which no byte has arrived (oldest
//! first), then those whose last bytes are oldest. So an accept loop never pauses for
//! unauthenticated peers (a paused loop is what a flood of idle connections starves a real
//! edge with), and a flood, however fast it reconnects, pushes out its own idle
//! connections first: a real peer in the middle of its handshake has just sent something.
//!
//! "Arrived" is asked of the kernel, not only of the connection's task: under a flood a
//! task may not have run yet when its connection's turn to go comes, so the table peeks at
//! a silent-looking connection's socket before it drops it, and keeps it if bytes wait.
//!
//! A flood that reconnects as fast as it is dropped can open connections faster than a
//! server can finish TLS handshakes; then who gets served is decided by who is dropped.
//! So the table remembers the addresses whose connections it had to drop ("strikes",
//! halved every [`STRIKE_ROUNDS`] × `max_pending` admissions) and, among the quietest
//! connections, drops one of the address with the most strikes: a flood's addresses come
//! back again and again and collect strikes, a real client's address does not.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The bounds of a pending table.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionLimits {
    /// Pending connections at once, from all addresses.
    pub max_pending: usize,
    /// Pending connections at once from one address (an IPv4 address, or an IPv6 /64).
    pub max_per_address: usize,
}

/// The pending connections of one port.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    table: Mutex<Table>,
}

#[derive(Debug)]
struct Entry {
    address: IpAddr,
    dropped: CancellationToken,
    /// A second handle on the socket, to see whether bytes wait without taking them.
    probe: Option<socket2::Socket>,
    /// When bytes last arrived (seen waiting, or read), on the table's own clock; 0 while
    /// none has.
    active_at: u64,
}

/// Silent-looking connections peeked at before one is dropped, at most, per admission.
const PROBES: usize = 8;
/// The quietest connections among which the one to drop is chosen by its address's
/// strikes.
const CANDIDATES: usize = 32;
/// Strikes are halved every this many tables full of admissions: long enough that a
/// flood's addresses, each dropped now and then, keep some.
const STRIKE_ROUNDS: usize = 16;

#[derive(Debug, Default)]
struct Table {
    /// A logical clock: one tick per admission or activity, so "quiet longest" needs no
    /// wall clock.
    clock: u64,
    entries: HashMap<u64, Entry>,
    /// By last activity, quietest first: (active_at, ticket), so those from which nothing
    /// arrived (0) come first, oldest first.
    by_activity: BTreeSet<(u64, u64)>,
    /// Each address's tickets.
    by_address: HashMap<IpAddr, Vec<u64>>,
    /// Connections dropped to make room, since start.
    evicted: u64,
    /// Drops per address, halved every [`STRIKE_ROUNDS`] × `max_pending` admissions.
    strikes: HashMap<IpAddr, u32>,
    /// Admissions since the strikes were last halved.
    round: usize,
}

/// Whether bytes from the peer wait on `socket` (non-blocking, as tokio's sockets are);
/// an error or the peer's close counts as none (the connection is as good as gone).
fn bytes_waiting(socket: &socket2::Socket) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket.peek(&mut probe), Ok(n) if n > 0)
}

impl Table {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn evict(&mut self, ticket: u64) {
        if let Some(entry) = self.remove(ticket) {
            entry.dropped.cancel();
            self.evicted += 1;
            *self.strikes.entry(entry.address).or_default() += 1;
            tracing::debug!(address = %entry.address, "a pending connection was dropped to make room for a newer one");
        }
    }

    fn remove(&mut self, ticket: u64) -> Option<Entry> {
        let entry = self.entries.remove(&ticket)?;
        self.by_activity.remove(&(entry.active_at, ticket));
        if let Some(tickets) = self.by_address.get_mut(&entry.address) {
            tickets.retain(|t| *t != ticket);
            if tickets.is_empty() {
                self.by_address.remove(&entry.address);
            }
        }
        Some(entry)
    }

    fn touch(&mut self, ticket: u64) {
        let now = self.tick();
        if let Some(entry) = self.entries.get_mut(&ticket) {
            self.by_activity.remove(&(entry.active_at, ticket));
            entry.active_at = now;
            self.by_activity.insert((now, ticket));
        }
    }

    /// Drops a quiet connection: first sparing (as active now) up to [`PROBES`]
    /// silent-looking ones whose bytes have in fact arrived, then, among the
    /// [`CANDIDATES`] quietest, the one whose address has the most strikes (the quietest
    /// of those).
    fn evict_quietest(&mut self) {
        for _ in 0..PROBES {
            let Some(&(active_at, ticket)) = self.by_activity.iter().next() else {
                return;
            };
            let spoke = active_at == 0
                && self
                    .entries
                    .get(&ticket)
                    .and_then(|entry| entry.probe.as_ref())
                    .is_some_and(bytes_waiting);
            if !spoke {
                break;
            }
            self.touch(ticket);
        }
        let victim = self
            .by_activity
            .iter()
            .take(CANDIDATES)
            .enumerate()
            .max_by_key(|(rank, (_, ticket))| {
                let strikes = self
                    .entries
                    .get(ticket)
                    .and_then(|entry| self.strikes.get(&entry.address))
                    .copied()
                    .unwrap_or(0);
                // Most strikes first; among equals, the quietest (lowest rank).
                (strikes, std::cmp::Reverse(*rank))
            })
            .map(|(_, &(_, ticket))| ticket);
        if let Some(ticket) = victim {
            self.evict(ticket);
        }
    }

    /// Counts an admission; every `round_length` of them, halves every address's strikes,
    /// so an address is forgiven once it stops coming back.
    fn count_round(&mut self, round_length: usize) {
        self.round += 1;
        if self.round >= round_length {
            self.round = 0;
            self.strikes.retain(|_, strikes| {
                *strikes /= 2;
                *strikes > 0
            });
        }
    }

    /// The quietest pending connection of `address`.
    fn quietest_of(&self, address: IpAddr) -> Option<u64> {
        self.by_address
            .get(&address)?
            .iter()
            .copied()
            .min_by_key(|ticket| {
                let active_at = self.entries.get(ticket).map_or(0, |e| e.active_at);
                (active_at, *ticket)
            })
    }
}

/// The address a per-address cap counts by: an IPv4 address, or the /64 of an IPv6 one
/// (a single host commonly holds a whole /64).
fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
    }
}

impl Admission {
    /// An empty table with these bounds (each at least 1).
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Admission {
            limits: AdmissionLimits {
                max_pending: limits.max_pending.max(1),
                max_per_address: limits.max_per_address.max(1),
            },
            table: Mutex::default(),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a just-accepted connection from `address`: bytes already waiting count as
    /// activity (a real client speaks as soon as it has connected, so under a flood its
    /// first bytes are there by the time it is accepted).
    pub fn admit_tcp(self: &Arc<Self>, tcp: &TcpStream, address: IpAddr) -> io::Result<Pending> {
        let probe = socket2::SockRef::from(tcp).try_clone()?;
        let spoken = bytes_waiting(&probe);
        Ok(self.admit(address, spoken, Some(probe)))
    }

    /// Admits a connection from `address` (which has `spoken` if bytes from it arrived),
    /// dropping the quietest pending connection of the same address when it holds its
    /// share, and the quietest of all when the table is full. `probe` is a second handle on
    /// its socket, if it has one, for the table to peek at.
    pub fn admit(
        self: &Arc<Self>,
        address: IpAddr,
        spoken: bool,
        probe: Option<socket2::Socket>,
    ) -> Pending {
        let address = address_key(address);
        let mut table = self.table();
        table.count_round(self.limits.max_pending * STRIKE_ROUNDS);
        let same_address = table.by_address.get(&address).map_or(0, Vec::len);
        if same_address >= self.limits.max_per_address
            && let Some(quietest) = table.quietest_of(address)
        {
            table.evict(quietest);
        }
        while table.entries.len() >= self.limits.max_pending {
            table.evict_quietest();
        }
        let ticket = table.tick();
        let active_at = if spoken { ticket } else { 0 };
        let dropped = CancellationToken::new();
        table.entries.insert(
            ticket,
            Entry {
                address,
                dropped: dropped.clone(),
                probe,
                active_at,
            },
        );
        table.by_activity.insert((active_at, ticket));
        table.by_address.entry(address).or_default().push(ticket);
        Pending {
            activity: Activity {
                admission: self.clone(),
                ticket,
                settled: Arc::new(AtomicBool::new(false)),
            },
            dropped,
        }
    }

    /// Connections pending now.
    pub fn pending(&self) -> usize {
        self.table().entries.len()
    }

    /// Connections dropped to make room, since start.
    pub fn evicted(&self) -> u64 {
        self.table().evicted
    }
}

/// Marks a pending connection active (it received bytes); cheap once it has settled.
#[derive(Debug, Clone)]
pub struct Activity {
    admission: Arc<Admission>,
    ticket: u64,
    settled: Arc<AtomicBool>,
}

impl Activity {
    /// The connection received bytes.
    pub fn touch(&self) {
        if !self.settled.load(Ordering::Relaxed) {
            self.admission.table().touch(self.ticket);
        }
    }
}

/// One pending connection's place in the table; leaving the table (authenticated, or
/// gone) is dropping it, or [`settle`](Self::settle).
#[derive(Debug)]
pub struct Pending {
    activity: Activity,
    dropped: CancellationToken,
}

impl Pending {
    /// Resolves when a newer connection took this one's place: the connection must end.
    pub async fn dropped(&self) {
        self.dropped.cancelled().await
    }

    /// Whether a newer connection took this one's place.
    pub fn is_dropped(&self) -> bool {
        self.dropped.is_cancelled()
    }

    /// What marks this connection active: give it to the stream ([`Watched`]).
    pub fn activity(&self) -> Activity {
        self.activity.clone()
    }

    /// The connection authenticated: it leaves the table and can no longer be dropped
    /// from it. Answers false if it had been dropped already.
    pub fn settle(&mut self) -> bool {
        if !self.activity.settled.swap(true, Ordering::AcqRel) {
            self.activity.admission.table().remove(self.activity.ticket);
        }
        !self.is_dropped()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.activity.settled.swap(true, Ordering::AcqRel) {
            self.activity.admission.table().remove(self.activity.ticket);
        }
    }
}

/// A stream that marks its pending connection active whenever bytes arrive.
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    activity: Activity,
}

impl<S> Watched<S> {
    /// `inner`, reporting reads to `activity`.
    pub fn new(inner: S, activity: Activity) -> Self {
        Watched { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Connections the kernel queues for a listener before it drops new ones: under a flood the
/// queue stays full, and a real client whose connection attempt is dropped tries again only
/// a second later (then three), so a long queue is the shorter wait.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener with [`LISTEN_BACKLOG`] (the kernel caps it at `net.core.somaxconn`).
pub fn bind_listener(addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts between which an accept loop lets the connections it accepted run: accepting
/// far faster than they are served would only have the table drop them.
const ACCEPTS_PER_YIELD: u32 = 8;

/// Paces an accept loop: see [`ACCEPTS_PER_YIELD`].
#[derive(Debug, Default)]
pub struct AcceptPace {
    accepted: u32,
}

impl AcceptPace {
    /// Called after each accept; now and then lets other tasks run first.
    pub async fn accepted(&mut self) {
        self.accepted += 1;
        if self.accepted.is_multiple_of(ACCEPTS_PER_YIELD) {
            tokio::task::yield_now().await;
        }
    }
}

/// Waits up to `limit` for a new connection's first bytes (without taking them): a peer
/// that connects and sends nothing holds its place no longer than this.
pub async fn first_bytes(tcp: &TcpStream, limit: Duration) -> Result<(), String> {
    let mut probe = [0u8; 1];
    match tokio::time::timeout(limit, tcp.peek(&mut probe)).await {
        Ok(Ok(0)) => Err("the peer closed the connection before sending anything".into()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(format!("reading the first bytes failed: {err}")),
        Err(_) => Err(format!(
            "nothing sent within {} ms of connecting",
            limit.as_millis()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Admission {
        fn admit_quiet(self: &Arc<Self>, address: IpAddr) -> Pending {
            self.admit(address, false, None)
        }
    }

    #[test]
    fn one_that_spoke_on_arrival_outlasts_those_that_did_not() {
        let admission = Admission::new(AdmissionLimits {
            max_pending: 2,
            max_per_address: 10,
        });
        let spoke = admission.admit(ip(1), true, None);
        let silent = admission.admit(ip(2), false, None);
        let _new = admission.admit(ip(3), false, None);
        assert!(silent.is_dropped() && !spoke.is_dropped());
    }

    #[test]
    fn addresses_that_keep_coming_back_are_dropped_before_a_newcomer() {
        let admission = Admission::new(AdmissionLimits {
            max_pending: 4,
            max_per_address: 10,
        });
        // A flood of four addresses, each dropped and back again.
        let mut flood: Vec<Pending> = (10..14)
            .map(|i| admission.admit(ip(i), true, None))
            .collect();
        for round in 0..3u8 {
            for i in 10..14 {
                flood.push(admission.admit(ip(i + 10 * (round % 2)), true, None));
            }
        }
        // A real client arrives; the flood goes on arriving after it.
        let client = admission.admit(ip(1), true, None);
        for i in 10..14 {
            flood.push(admission.admit(ip(i), true, None));
        }
        assert!(
            !client.is_dropped(),
            "the flood's addresses had strikes, the client none"
        );
        assert!(admission.evicted() >= 16);
    }

    #[tokio::test]
    async fn a_connection_whose_bytes_wait_unread_is_spared() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admission = Admission::new(AdmissionLimits {
            max_pending: 2,
            max_per_address: 10,
        });
        // Accepted before it spoke; it speaks afterwards, and nobody reads it yet.
        let mut talker = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let talker_pending = admission.admit_tcp(&accepted, ip(1)).unwrap();
        talker.write_all(b"hello").await.unwrap();
        let _idle = TcpStream::connect(addr).await.unwrap();
        let (idle_accepted, _) = listener.accept().await.unwrap();
        let idle_pending = admission.admit_tcp(&idle_accepted, ip(2)).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _newcomer = admission.admit_quiet(ip(3));
        assert!(idle_pending.is_dropped(), "the idle one goes");
        assert!(!talker_pending.is_dropped(), "the older one spoke");
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn a_full_table_drops_the_quietest_so_a_peer_that_talks_stays() {
        let admission = Admission::new(AdmissionLimits {
            max_pending: 3,
            max_per_address: 10,
        });
        let talking = admission.admit_quiet(ip(1));
        let idle = admission.admit_quiet(ip(2));
        let _idle2 = admission.admit_quiet(ip(3));
        talking.activity().touch();
        let _new = admission.admit_quiet(ip(4));
        assert!(idle.is_dropped(), "the quietest made room");
        assert!(!talking.is_dropped(), "the oldest, but it spoke since");
        // Among those that spoke, the one whose last bytes are oldest goes.
        let admission = Admission::new(AdmissionLimits {
            max_pending: 2,
            max_per_address: 10,
        });
        let (first, second) = (admission.admit_quiet(ip(1)), admission.admit_quiet(ip(2)));
        second.activity().touch();
        first.activity().touch();
        let newcomer = admission.admit_quiet(ip(3));
        assert!(!newcomer.is_dropped() && !first.is_dropped() && second.is_dropped());
        // A newcomer that has not spoken yet is next, before any that spoke.
        let _another = admission.admit_quiet(ip(4));
        assert!(newcomer.is_dropped() && !first.is_dropped());
    }

    #[test]
    fn a_full_table_drops_its_oldest_and_always_admits_the_newest() {
        let admission = Admission::new(AdmissionLimits {
            max_pending: 3,
            max_per_address: 10,
        });
        let first = admission.admit_quiet(ip(1));
        let second = admission.admit_quiet(ip(2));
        let third = admission.admit_quiet(ip(3));
        assert_eq!(admission.pending(), 3);
        let fourth = admission.admit_quiet(ip(4));
        assert!(first.is_dropped(), "the oldest made room");
        assert!(!second.is_dropped() && !third.is_dropped() && !fourth.is_dropped());
        assert_eq!((admission.pending(), admission.evicted()), (3, 1));
        drop(second);
        assert_eq!(admission.pending(), 2, "a connection that ends leaves");
        let _fifth = admission.admit_quiet(ip(5));
        assert!(!third.is_dropped(), "there was room");
    }

    #[test]
    fn one_address_is_held_to_its_share_and_drops_its_own_oldest() {
        let admission = Admission::new(AdmissionLimits {
            max_pending: 100,
            max_per_address: 2,
        });
        let other = admission.admit_quiet(ip(9));
        let a1 = admission.admit_quiet(ip(1));
        let a2 = admission.admit_quiet(ip(1));
        let a3 = admission.admit_quiet(ip(1));
        assert!(a1.is_dropped() && !a2.is_dropped() && !a3.is_dropped());
        assert!(!other.is_dropped(), "another address keeps its place");
        // IPv6 counts by /64.
        let v6 = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]);
        let b1 = admission.admit_quiet(v6(1));
        let _b2 = admission.admit_quiet(v6(2));
        let _b3 = admission.admit_quiet(v6(3));
        assert!(b1.is_dropped());
    }

    #[test]
    fn a_settled_connection_is_never_dropped_and_frees_its_place() {
        let admission = Admission::new(AdmissionLimits {
            max_pending: 1,
            max_per_address: 1,
        });
        let mut linked = admission.admit_quiet(ip(1));
        assert!(linked.settle());
        assert_eq!(admission.pending(), 0);
        let _next = admission.admit_quiet(ip(1));
        let _after = admission.admit_quiet(ip(2));
        assert!(!linked.is_dropped());
        let mut late = admission.admit_quiet(ip(3));
        let _newer = admission.admit_quiet(ip(4));
        assert!(!late.settle(), "dropped before it authenticated");
    }
}
