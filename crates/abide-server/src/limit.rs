//! Limits per client address: a token bucket for enrolment attempts, and a count of open
//! connections. Both live in the process: with several server processes on one database each
//! enforces its own (an attacker gets at most that many times the rate).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The address a request came from, as an extension of every request the server accepts.
#[derive(Debug, Clone, Copy)]
pub struct Remote(pub SocketAddr);

impl Remote {
    /// The client's address; requests made in-process (tests) count as 0.0.0.0.
    pub fn ip(remote: Option<&Remote>) -> IpAddr {
        remote.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |r| r.0.ip())
    }
}

/// Entries kept before full buckets are dropped (a full bucket is the same as none).
const MAX_TRACKED: usize = 65_536;

/// Token buckets by address: `per_minute` attempts a minute, up to `per_minute` at once.
#[derive(Debug)]
pub struct Buckets {
    per_minute: u32,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl Buckets {
    /// Buckets allowing `per_minute` attempts a minute per address (0: none at all).
    pub fn new(per_minute: u32) -> Buckets {
        Buckets {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one attempt for `ip` at `now`; `Err(seconds)` until the next one is allowed.
    pub fn take(&self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        let capacity = f64::from(self.per_minute);
        let per_second = capacity / 60.0;
        let mut buckets = self.buckets.lock().expect("not poisoned");
        if buckets.len() >= MAX_TRACKED {
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * per_second < capacity
            });
        }
        let (tokens, at) = buckets.entry(ip).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else if per_second > 0.0 {
            Err(((1.0 - *tokens) / per_second).ceil() as u64)
        } else {
            Err(60)
        }
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
