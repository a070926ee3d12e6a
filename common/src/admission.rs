//! What peers that have not authenticated may hold of a port: a table of pending
//! connections, bounded in all and per address. A new connection always gets in; when
//! the table (or its address's share) is full, the oldest pending connection is dropped
//! to make room. So an accept loop never pauses for unauthenticated peers (a paused
//! loop is what a flood of idle connections starves a real edge with), and a flood can
//! only push out connections older than the ones it just made: a real peer, which
//! finishes its handshake in a few round trips, stays in unless the flood opens a whole
//! table of connections within those few round trips.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

#[derive(Debug, Default)]
struct Table {
    next: u64,
    /// By age: ticket number to its address and the token that drops it.
    entries: BTreeMap<u64, (IpAddr, CancellationToken)>,
    /// Each address's tickets, oldest first.
    by_address: HashMap<IpAddr, VecDeque<u64>>,
    /// Connections dropped to make room, since start.
    evicted: u64,
}

impl Table {
    fn evict(&mut self, ticket: u64) {
        if let Some((address, token)) = self.remove(ticket) {
            token.cancel();
            self.evicted += 1;
            tracing::debug!(%address, "a pending connection was dropped to make room for a newer one");
        }
    }

    fn remove(&mut self, ticket: u64) -> Option<(IpAddr, CancellationToken)> {
        let (address, token) = self.entries.remove(&ticket)?;
        if let Some(tickets) = self.by_address.get_mut(&address) {
            tickets.retain(|t| *t != ticket);
            if tickets.is_empty() {
                self.by_address.remove(&address);
            }
        }
        Some((address, token))
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

    /// Admits a connection from `address`, dropping the oldest pending connection of the
    /// same address when it holds its share, and the oldest of all when the table is full.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Pending {
        let key = address_key(address);
        let mut table = self.table();
        let same_address = table.by_address.get(&key).map_or(0, VecDeque::len);
        if same_address >= self.limits.max_per_address
            && let Some(&oldest) = table.by_address.get(&key).and_then(VecDeque::front)
        {
            table.evict(oldest);
        }
        while table.entries.len() >= self.limits.max_pending {
            let Some(&oldest) = table.entries.keys().next() else {
                break;
            };
            table.evict(oldest);
        }
        let ticket = table.next;
        table.next += 1;
        let dropped = CancellationToken::new();
        table.entries.insert(ticket, (key, dropped.clone()));
        table.by_address.entry(key).or_default().push_back(ticket);
        Pending {
            admission: self.clone(),
            ticket: Some(ticket),
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

/// One pending connection's place in the table; leaving the table (authenticated, or
/// gone) is dropping it, or [`settle`](Self::settle).
#[derive(Debug)]
pub struct Pending {
    admission: Arc<Admission>,
    ticket: Option<u64>,
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

    /// The connection authenticated: it leaves the table and can no longer be dropped
    /// from it. Answers false if it had been dropped already.
    pub fn settle(&mut self) -> bool {
        if let Some(ticket) = self.ticket.take() {
            self.admission.table().remove(ticket);
        }
        !self.is_dropped()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.admission.table().remove(ticket);
        }
    }
}

/// Waits up to `limit` for a new connection's first bytes (without taking them): a peer
/// that connects and sends nothing holds its place no longer than this.
pub async fn first_bytes(tcp: &tokio::net::TcpStream, limit: Duration) -> Result<(), String> {
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

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn a_full_table_drops_its_oldest_and_always_admits_the_newest() {
        let admission = Admission::new(AdmissionLimits {
            max_pending: 3,
            max_per_address: 10,
        });
        let first = admission.admit(ip(1));
        let second = admission.admit(ip(2));
        let third = admission.admit(ip(3));
        assert_eq!(admission.pending(), 3);
        let fourth = admission.admit(ip(4));
        assert!(first.is_dropped(), "the oldest made room");
        assert!(!second.is_dropped() && !third.is_dropped() && !fourth.is_dropped());
        assert_eq!((admission.pending(), admission.evicted()), (3, 1));
        drop(second);
        assert_eq!(admission.pending(), 2, "a connection that ends leaves");
        let _fifth = admission.admit(ip(5));
        assert!(!third.is_dropped(), "there was room");
    }

    #[test]
    fn one_address_is_held_to_its_share_and_drops_its_own_oldest() {
        let admission = Admission::new(AdmissionLimits {
            max_pending: 100,
            max_per_address: 2,
        });
        let other = admission.admit(ip(9));
        let a1 = admission.admit(ip(1));
        let a2 = admission.admit(ip(1));
        let a3 = admission.admit(ip(1));
        assert!(a1.is_dropped() && !a2.is_dropped() && !a3.is_dropped());
        assert!(!other.is_dropped(), "another address keeps its place");
        // IPv6 counts by /64.
        let v6 = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]);
        let b1 = admission.admit(v6(1));
        let _b2 = admission.admit(v6(2));
        let _b3 = admission.admit(v6(3));
        assert!(b1.is_dropped());
    }

    #[test]
    fn a_settled_connection_is_never_dropped_and_frees_its_place() {
        let admission = Admission::new(AdmissionLimits {
            max_pending: 1,
            max_per_address: 1,
        });
        let mut linked = admission.admit(ip(1));
        assert!(linked.settle());
        assert_eq!(admission.pending(), 0);
        let _next = admission.admit(ip(1));
        let _after = admission.admit(ip(2));
        assert!(!linked.is_dropped());
        let mut late = admission.admit(ip(3));
        let _newer = admission.admit(ip(4));
        assert!(!late.settle(), "dropped before it authenticated");
    }
}
