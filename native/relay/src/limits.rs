//! Accept limits: what happens to a connection the moment the core takes it, before a byte of it
//! is read — derper's `--accept-connection-limit`/`--accept-connection-burst` (a token bucket on
//! accepts), caps on the connections open at once on this relay and from one source address, and
//! the TCP keepalive and `TCP_USER_TIMEOUT` (derper's `--tcp-keepalive-time`, `--tcp-user-timeout`)
//! that find dead peers.
//!
//! A connection over a limit is closed at once (nothing read, no task started), counted by reason
//! in the relay's metrics and reported to the [`RefusalLog`] at most once per
//! [`REFUSAL_LOG_INTERVAL`] per reason. A connection within the limits holds a [`Slot`] for its
//! whole life, handed on with it (front door → DERP connection), which frees its place when the
//! connection ends.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::metrics::Metrics;
use crate::relay::Relay;

/// derper's `--tcp-keepalive-time`: long, to spare mobile batteries (DERP has its own keepalive
/// frames every minute).
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(10 * 60);
/// derper's `--tcp-user-timeout`: short, so a peer that stopped acknowledging is dropped promptly.
pub const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(15);
/// Interval and count of the keepalive probes after the first (Go's defaults, which derper gets).
/// With `TCP_USER_TIMEOUT` set, Linux drops the connection at the first probe found unanswered
/// once the timeout has passed, so these matter only without it.
#[cfg(target_os = "linux")]
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
#[cfg(target_os = "linux")]
const KEEPALIVE_COUNT: i32 = 9;
/// At most one refusal per reason is reported to the [`RefusalLog`] in this time.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The limits in force. `Default`: no limits, derper's TCP keepalive and user timeout.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptLimits {
    /// Connections accepted per second on average; `None`: unlimited.
    pub rate: Option<f64>,
    /// Connections accepted at once before the rate applies (the bucket's size). `None`: one
    /// second's worth of `rate`, at least 1. (derper's default, unlimited, would make its limit a
    /// no-op: its bucket starts full.)
    pub burst: Option<u32>,
    /// Connections open at once, every source together; `None`: unlimited.
    pub max_connections: Option<u64>,
    /// Connections open at once from one source address (except the exempt ones); `None`:
    /// unlimited.
    pub max_connections_per_ip: Option<u64>,
    /// Idle time before the first TCP keepalive probe; `None`: the system's setting.
    pub tcp_keepalive: Option<Duration>,
    /// `TCP_USER_TIMEOUT` (Linux): how long sent data may stay unacknowledged; `None`: the
    /// system's setting.
    pub tcp_user_timeout: Option<Duration>,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        AcceptLimits {
            rate: None,
            burst: None,
            max_connections: None,
            max_connections_per_ip: None,
            tcp_keepalive: Some(DEFAULT_TCP_KEEPALIVE),
            tcp_user_timeout: Some(DEFAULT_TCP_USER_TIMEOUT),
        }
    }
}

impl AcceptLimits {
    /// The bucket's size: `burst`, or one second's worth of `rate` (at least 1).
    fn bucket_size(&self) -> Option<f64> {
        let rate = self.rate?;
        Some(match self.burst {
            Some(burst) => f64::from(burst.max(1)),
            None => rate.ceil().max(1.0),
        })
    }
}

/// Why a connection was refused; [`Refusal::code`] is its stable name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Over the accept rate (the bucket was empty).
    RateLimit,
    /// This relay already had its maximum of connections open.
    MaxConnections,
    /// The source address already had its maximum of connections open.
    MaxConnectionsPerIp,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::RateLimit => "rate-limit",
            Refusal::MaxConnections => "max-connections",
            Refusal::MaxConnectionsPerIp => "max-connections-per-ip",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn counter(self, m: &Metrics) -> &std::sync::atomic::AtomicU64 {
        match self {
            Refusal::RateLimit => &m.accepts_refused_rate_limit,
            Refusal::MaxConnections => &m.accepts_refused_max_connections,
            Refusal::MaxConnectionsPerIp => &m.accepts_refused_max_connections_per_ip,
        }
    }
}

/// A refusal worth a log line: the latest of its reason, and how many more of that reason were
/// not reported since the previous notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalNotice {
    pub reason: Refusal,
    pub ip: IpAddr,
    pub suppressed: u64,
}

/// Receives [`RefusalNotice`]s (called on the accepting thread; must not block).
pub type RefusalLog = Arc<dyn Fn(RefusalNotice) + Send + Sync>;

/// A token bucket: `tokens` of at most the bucket size, refilled at the rate.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Adds what `rate` refilled since the last time, up to `size`.
    fn refill(&mut self, now: Instant, rate: f64, size: f64) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(size);
        self.at = now;
    }

    /// Takes one token if there is one at `now`.
    fn take(&mut self, now: Instant, rate: f64, size: f64) -> bool {
        self.refill(now, rate, size);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Default)]
struct NoticeState {
    last: Option<Instant>,
    suppressed: u64,
}

/// The accept limits of one relay and the connections open under them.
pub struct Limiter {
    relay: Arc<Relay>,
    limits: RwLock<AcceptLimits>,
    /// Addresses the per-address cap does not apply to (still counted).
    exempt: RwLock<HashSet<IpAddr>>,
    bucket: Mutex<Bucket>,
    /// Open connections per source address; an address leaves with its last connection.
    per_ip: DashMap<IpAddr, u64, ahash::RandomState>,
    log: RwLock<Option<RefusalLog>>,
    notices: [Mutex<NoticeState>; 3],
}

impl Limiter {
    pub fn new(relay: Arc<Relay>) -> Arc<Limiter> {
        Arc::new(Limiter {
            relay,
            limits: RwLock::new(AcceptLimits::default()),
            exempt: RwLock::new(HashSet::new()),
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                at: Instant::now(),
            }),
            per_ip: DashMap::with_hasher(ahash::RandomState::new()),
            log: RwLock::new(None),
            notices: Default::default(),
        })
    }

    /// Replaces the limits; connections already open stay (a lower cap refuses new ones until
    /// enough have closed). The bucket keeps its tokens, refilled at the old rate until now (at
    /// most the new size); a rate set where there was none starts with a full bucket.
    pub fn set_limits(&self, limits: AcceptLimits) {
        let mut current = self.limits.write().unwrap_or_else(|p| p.into_inner());
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match (current.rate.zip(current.bucket_size()), limits.bucket_size()) {
            (None, Some(size)) => bucket.tokens = size,
            (Some((rate, old_size)), Some(size)) => {
                bucket.refill(now, rate, old_size);
                bucket.tokens = bucket.tokens.min(size);
            }
            (_, None) => {}
        }
        bucket.at = now;
        *current = limits;
    }

    pub fn limits(&self) -> AcceptLimits {
        self.limits.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets the addresses the per-address cap does not apply to (the cluster's own nodes, local
    /// proxies).
    pub fn set_exempt(&self, addresses: impl IntoIterator<Item = IpAddr>) {
        *self.exempt.write().unwrap_or_else(|p| p.into_inner()) = addresses.into_iter().map(canonical).collect();
    }

    /// Where refusals are reported (rate-limited); `None`: nowhere.
    pub fn set_refusal_log(&self, log: Option<RefusalLog>) {
        *self.log.write().unwrap_or_else(|p| p.into_inner()) = log;
    }

    /// Connections open under the limits now from `ip`.
    pub fn open_from(&self, ip: IpAddr) -> u64 {
        self.per_ip.get(&canonical(ip)).map_or(0, |n| *n)
    }

    /// A place for a new connection from `ip`, or why there is none (counted and reported).
    pub fn admit(self: &Arc<Limiter>, ip: IpAddr) -> Result<Slot, Refusal> {
        let ip = canonical(ip);
        let metrics = &self.relay.metrics;
        let (rate, size, max, max_per_ip) = {
            let limits = self.limits.read().unwrap_or_else(|p| p.into_inner());
            (
                limits.rate,
                limits.bucket_size(),
                limits.max_connections,
                limits.max_connections_per_ip,
            )
        };
        // The caps first (taking a place, given back if refused later), so a connection refused by
        // a cap does not spend a token.
        let open = metrics.accepted_open.fetch_add(1, Relaxed) + 1;
        let slot = Slot {
            limiter: self.clone(),
            ip,
        };
        let per_ip = {
            let mut count = self.per_ip.entry(ip).or_insert(0);
            *count += 1;
            *count
        };
        let refusal = if max.is_some_and(|max| open > max) {
            Some(Refusal::MaxConnections)
        } else if max_per_ip.is_some_and(|max| per_ip > max) && !self.is_exempt(ip) {
            Some(Refusal::MaxConnectionsPerIp)
        } else if let (Some(rate), Some(size)) = (rate, size) {
            let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            (!bucket.take(Instant::now(), rate, size)).then_some(Refusal::RateLimit)
        } else {
            None
        };
        match refusal {
            None => Ok(slot),
            Some(reason) => {
                drop(slot);
                Metrics::inc(&metrics.accepts_refused);
                Metrics::inc(reason.counter(metrics));
                self.notice(reason, ip);
                Err(reason)
            }
        }
    }

    fn is_exempt(&self, ip: IpAddr) -> bool {
        self.exempt.read().unwrap_or_else(|p| p.into_inner()).contains(&ip)
    }

    /// Reports the refusal if its reason was not reported within [`REFUSAL_LOG_INTERVAL`].
    fn notice(&self, reason: Refusal, ip: IpAddr) {
        let notice = {
            let mut state = self.notices[reason.index()].lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if state
                .last
                .is_some_and(|last| now.duration_since(last) < REFUSAL_LOG_INTERVAL)
            {
                state.suppressed += 1;
                return;
            }
            state.last = Some(now);
            RefusalNotice {
                reason,
                ip,
                suppressed: std::mem::take(&mut state.suppressed),
            }
        };
        let log = self.log.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(log) = log {
            log(notice);
        }
    }

    fn release(&self, ip: IpAddr) {
        Metrics::dec(&self.relay.metrics.accepted_open);
        if let Some(mut count) = self.per_ip.get_mut(&ip) {
            *count -= 1;
        }
        self.per_ip.remove_if(&ip, |_, count| *count == 0);
    }

    /// Applies the TCP keepalive and user timeout in force to an accepted socket.
    #[cfg(unix)]
    pub fn tune(&self, fd: std::os::fd::RawFd) {
        let (keepalive, user_timeout) = {
            let limits = self.limits.read().unwrap_or_else(|p| p.into_inner());
            (limits.tcp_keepalive, limits.tcp_user_timeout)
        };
        // A socket that refuses an option is served without it.
        let _ = set_tcp_timeouts(fd, keepalive, user_timeout);
    }
}

/// `::ffff:a.b.c.d` is `a.b.c.d`: one address, however the listener reported it.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A connection's place under the caps, given back when dropped.
pub struct Slot {
    limiter: Arc<Limiter>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.release(self.ip);
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("ip", &self.ip).finish()
    }
}

/// Sets `SO_KEEPALIVE` with `keepalive` as the idle time (probes then every 15 s, 9 of them, as Go
/// does for derper) and `TCP_USER_TIMEOUT`; `None` leaves the system's setting.
#[cfg(target_os = "linux")]
pub fn set_tcp_timeouts(
    fd: std::os::fd::RawFd,
    keepalive: Option<Duration>,
    user_timeout: Option<Duration>,
) -> std::io::Result<()> {
    let secs = |d: Duration| i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX);
    if let Some(idle) = keepalive {
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(idle))?;
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(KEEPALIVE_INTERVAL))?;
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_COUNT)?;
    }
    if let Some(timeout) = user_timeout {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)?;
    }
    Ok(())
}

/// Elsewhere the system's keepalive settings stay (the control plane says so in its debug log).
#[cfg(all(unix, not(target_os = "linux")))]
pub fn set_tcp_timeouts(
    _fd: std::os::fd::RawFd,
    _keepalive: Option<Duration>,
    _user_timeout: Option<Duration>,
) -> std::io::Result<()> {
    Ok(())
}

#[cfg(target_os = "linux")]
fn setsockopt(fd: std::os::fd::RawFd, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed; the kernel validates `fd`.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The process's soft limit on open files (`RLIMIT_NOFILE`); `None` when unlimited or unknown.
pub fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
            return None;
        }
        #[allow(clippy::useless_conversion)] // rlim_t is not u64 on every platform
        u64::try_from(limit.rlim_cur).ok()
    }
    #[cfg(not(unix))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;

    fn limiter(limits: AcceptLimits) -> Arc<Limiter> {
        let limiter = Limiter::new(Relay::new(KeyPair::generate(), Default::default()));
        limiter.set_limits(limits);
        limiter
    }

    #[test]
    fn the_bucket_refills_at_the_rate_up_to_its_size() {
        let start = Instant::now();
        let mut bucket = Bucket { tokens: 5.0, at: start };
        assert_eq!((0..10).filter(|_| bucket.take(start, 5.0, 5.0)).count(), 5);
        assert!(
            bucket.take(start + Duration::from_millis(200), 5.0, 5.0),
            "one token after 1/5 s"
        );
        assert!(!bucket.take(start + Duration::from_millis(200), 5.0, 5.0));
        let later = start + Duration::from_secs(60);
        assert_eq!(
            (0..10).filter(|_| bucket.take(later, 5.0, 5.0)).count(),
            5,
            "never more than the size"
        );
    }

    #[test]
    fn a_changed_rate_keeps_the_tokens_and_a_new_one_starts_full() {
        let l = limiter(AcceptLimits {
            rate: Some(1.0),
            burst: Some(3),
            ..AcceptLimits::default()
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let taken: Vec<_> = (0..3).map(|_| l.admit(ip).unwrap()).collect();
        assert_eq!(l.admit(ip).unwrap_err(), Refusal::RateLimit);
        l.set_limits(AcceptLimits {
            rate: Some(2.0),
            burst: Some(10),
            ..AcceptLimits::default()
        });
        assert_eq!(
            l.admit(ip).unwrap_err(),
            Refusal::RateLimit,
            "an empty bucket stays empty"
        );
        l.set_limits(AcceptLimits::default());
        l.set_limits(AcceptLimits {
            rate: Some(2.0),
            burst: Some(4),
            ..AcceptLimits::default()
        });
        let more: Vec<_> = (0..4).map(|_| l.admit(ip).unwrap()).collect();
        assert_eq!(l.admit(ip).unwrap_err(), Refusal::RateLimit);
        assert_eq!(taken.len() + more.len(), 7);
    }

    #[test]
    fn the_burst_defaults_to_one_seconds_worth() {
        let size = |rate, burst| {
            AcceptLimits {
                rate,
                burst,
                ..AcceptLimits::default()
            }
            .bucket_size()
        };
        assert_eq!(size(None, Some(5)), None);
        assert_eq!(size(Some(2.5), None), Some(3.0));
        assert_eq!(size(Some(0.1), None), Some(1.0));
        assert_eq!(size(Some(100.0), Some(7)), Some(7.0));
    }

    #[test]
    fn caps_count_places_and_give_them_back() {
        let l = limiter(AcceptLimits {
            max_connections: Some(3),
            max_connections_per_ip: Some(2),
            ..AcceptLimits::default()
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = l.admit(a).unwrap();
        let a2 = l.admit(mapped).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Refusal::MaxConnectionsPerIp);
        assert_eq!(l.open_from(a), 2);
        let b1 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err(), Refusal::MaxConnections);
        drop(a1);
        let b2 = l.admit(b).unwrap();
        l.set_exempt([b]);
        drop(a2);
        let b3 = l.admit(b).unwrap();
        assert_eq!(l.open_from(b), 3, "exempt from the per-address cap, still counted");
        drop((b1, b2, b3));
        assert_eq!(l.open_from(a), 0);
        assert!(l.per_ip.is_empty(), "addresses leave with their last connection");
        let m = &l.relay.metrics;
        assert_eq!(m.accepted_open.load(Relaxed), 0);
        assert_eq!(m.accepts_refused.load(Relaxed), 2);
        assert_eq!(m.accepts_refused_max_connections.load(Relaxed), 1);
        assert_eq!(m.accepts_refused_max_connections_per_ip.load(Relaxed), 1);
    }

    #[test]
    fn refusals_are_reported_once_per_interval_per_reason() {
        let l = limiter(AcceptLimits {
            rate: Some(1.0),
            burst: Some(1),
            max_connections_per_ip: Some(1),
            ..AcceptLimits::default()
        });
        let notices = Arc::new(Mutex::new(Vec::new()));
        let sink = notices.clone();
        l.set_refusal_log(Some(Arc::new(move |n| sink.lock().unwrap().push(n))));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let _held = l.admit(a).unwrap();
        for i in 0..5u8 {
            assert_eq!(l.admit(a).unwrap_err(), Refusal::MaxConnectionsPerIp);
            assert_eq!(
                l.admit(IpAddr::from([198, 51, 100, i])).unwrap_err(),
                Refusal::RateLimit
            );
        }
        let notices = notices.lock().unwrap();
        assert_eq!(
            *notices,
            vec![
                RefusalNotice {
                    reason: Refusal::MaxConnectionsPerIp,
                    ip: a,
                    suppressed: 0
                },
                RefusalNotice {
                    reason: Refusal::RateLimit,
                    ip: IpAddr::from([198, 51, 100, 0]),
                    suppressed: 0
                },
            ]
        );
        assert_eq!(l.relay.metrics.accepts_refused.load(Relaxed), 10);
    }
}
