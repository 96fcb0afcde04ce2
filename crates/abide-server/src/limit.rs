//! Limits per client address: a token bucket for enrolment attempts (governor), and a count of
//! open connections. Both live in the process: with several server processes on one database each
//! enforces its own (an attacker gets at most that many times the rate).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

/// The address a request came from, as an extension of every request the server accepts.
#[derive(Debug, Clone, Copy)]
pub struct Remote(pub SocketAddr);

impl Remote {
    /// The client's address; requests made in-process (tests) count as 0.0.0.0.
    pub fn ip(remote: Option<&Remote>) -> IpAddr {
        remote.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |r| r.0.ip())
    }
}

/// Addresses tracked before those whose buckets are full again are forgotten (a full bucket is
/// the same as none).
const MAX_TRACKED: usize = 65_536;

/// One bucket per address, on `C`.
type Limiter<C> =
    RateLimiter<IpAddr, HashMapStateStore<IpAddr>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Token buckets by address (governor's GCRA): `per_minute` attempts a minute, up to
/// `per_minute` at once.
pub struct Buckets<C: Clock + Clone = DefaultClock> {
    /// None when no attempt is allowed at all.
    limiter: Option<Limiter<C>>,
    clock: C,
}

impl Buckets {
    /// Buckets allowing `per_minute` attempts a minute per address (0: none at all).
    pub fn new(per_minute: u32) -> Buckets {
        Buckets::with_clock(per_minute, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Buckets<C> {
    /// [`Buckets::new`] on `clock` (tests move a fake one).
    pub fn with_clock(per_minute: u32, clock: C) -> Buckets<C> {
        let limiter = NonZeroU32::new(per_minute).map(|n| {
            RateLimiter::new(
                Quota::per_minute(n),
                HashMapStateStore::default(),
                clock.clone(),
            )
        });
        Buckets { limiter, clock }
    }

    /// Takes one attempt for `ip`; `Err(seconds)` until the next one is allowed.
    pub fn take(&self, ip: IpAddr) -> Result<(), u64> {
        let Some(limiter) = &self.limiter else {
            return Err(60);
        };
        if limiter.len() >= MAX_TRACKED {
            limiter.retain_recent();
        }
        limiter.check_key(&ip).map_err(|not_until| {
            let wait: Duration = not_until.wait_time_from(self.clock.now());
            wait.as_secs_f64().ceil().max(1.0) as u64
        })
    }
}

impl<C: Clock + Clone> std::fmt::Debug for Buckets<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buckets")
            .field("tracked", &self.limiter.as_ref().map_or(0, |l| l.len()))
            .finish()
    }
}

/// Open connections by address.
#[derive(Debug, Default, Clone)]
pub struct Connections(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One open connection, counted until dropped.
#[derive(Debug)]
pub struct Held {
    connections: Connections,
    ip: IpAddr,
}

impl Connections {
    /// Counts a new connection from `ip`, or `None` if it already holds `max`.
    pub fn hold(&self, ip: IpAddr, max: usize) -> Option<Held> {
        let mut open = self.0.lock().expect("not poisoned");
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Held {
            connections: self.clone(),
            ip,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self.connections.0.lock().expect("not poisoned");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}
