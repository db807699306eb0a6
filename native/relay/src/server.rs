//! One running relay: the [`Relay`], its [`MeshLinks`] and their TLS settings, and the order in
//! which they stop. This is what an embedder (the napi binding, a test) holds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::client::TlsOptions;
use crate::conn;
use crate::front::{Front, HttpHandoff};
use crate::keys::{Key, KeyPair};
use crate::limits::{AcceptLimits, Limiter, RefusalLog};
use crate::mesh::{LinkStatus, MeshError, MeshLinks};
use crate::metrics::Metrics;
use crate::relay::{Relay, RelayConfig};
use crate::tls::TlsError;
use crate::upgrade::{self, Bridge, Transport, Upgrade, UpgradeError};

/// What a [`Server`] starts with. `Default`: a new key, no mesh key, the default relay tunables,
/// mesh links trusting the public web PKI roots only.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// The relay's private key; `None` generates one.
    pub private_key: Option<Key>,
    /// Shared secret that grants mesh privileges (WatchConns, ClosePeer, ForwardPacket) and that
    /// mesh links present; `None` or empty: none.
    pub mesh_key: Option<String>,
    pub relay: RelayConfig,
    /// How mesh links verify `https://` peers.
    pub mesh_tls: TlsOptions,
}

/// A running relay, its mesh links and its front door (TLS certificate, hand-off of other HTTP
/// requests to the embedder). Dropping it stops the links; the relay's connections end with
/// [`Server::shutdown`] (or when the runtime does).
pub struct Server {
    relay: Arc<Relay>,
    links: MeshLinks,
    front: Arc<Front>,
    limiter: Arc<Limiter>,
}

impl Server {
    /// Fails when the mesh TLS settings are unusable (see [`MeshLinks::set_tls`]).
    pub fn new(config: ServerConfig) -> Result<Server, MeshError> {
        let key = config.private_key.map_or_else(KeyPair::generate, KeyPair::from_private);
        let relay = Relay::new(key, config.relay);
        relay.set_mesh_key(config.mesh_key);
        let links = MeshLinks::new(&relay, config.mesh_tls)?;
        let front = Arc::new(Front::new(relay.clone()));
        let limiter = Limiter::new(relay.clone());
        Ok(Server {
            relay,
            links,
            front,
            limiter,
        })
    }

    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    pub fn public_key(&self) -> &Key {
        self.relay.public_key()
    }

    /// The relay's counters and gauges.
    pub fn metrics(&self) -> &Metrics {
        &self.relay.metrics
    }

    pub fn histograms(&self) -> &crate::metrics::Histograms {
        &self.relay.histograms
    }

    pub fn set_mesh_key(&self, mesh_key: Option<String>) {
        self.relay.set_mesh_key(mesh_key);
    }

    /// Sets the problem text sent to clients in a Health frame; "" means healthy.
    pub fn set_health(&self, problem: &str) {
        self.relay.set_health(problem);
    }

    /// The front door of [`Server::accept_connection`]: TLS, probes, DERP upgrades, hand-off.
    pub fn front(&self) -> &Arc<Front> {
        &self.front
    }

    /// The accept limits every connection handed over (`accept_*`, `open_bridge`) passes first.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// Replaces the accept limits (see [`Limiter::set_limits`]); open connections stay.
    pub fn set_accept_limits(&self, limits: AcceptLimits) {
        self.limiter.set_limits(limits)
    }

    /// Addresses exempt from the per-address connection cap.
    pub fn set_accept_exempt(&self, addresses: Vec<std::net::IpAddr>) {
        self.limiter.set_exempt(addresses)
    }

    /// Where refused connections are reported, at most once per reason per
    /// [`crate::limits::REFUSAL_LOG_INTERVAL`].
    pub fn set_refusal_log(&self, log: Option<RefusalLog>) {
        self.limiter.set_refusal_log(log)
    }

    /// The mesh links: peers, TLS settings, status.
    pub fn links(&self) -> &MeshLinks {
        &self.links
    }

    /// Sets the peer relay URLs by difference (see [`MeshLinks::set_peers`]). Inside a runtime.
    pub fn set_mesh_peers(&self, urls: Vec<String>) -> Result<(), MeshError> {
        self.links.set_peers(urls)
    }

    /// Sets how mesh links verify `https://` peers (see [`MeshLinks::set_tls`]).
    pub fn set_mesh_tls(&self, tls: TlsOptions) -> Result<(), MeshError> {
        self.links.set_tls(tls)
    }

    /// The status of every mesh link, ordered by URL.
    pub fn mesh_links(&self) -> Vec<LinkStatus> {
        self.links.status()
    }

    /// Takes over a connected TCP socket by descriptor (duplicated: the caller closes its own
    /// handle afterwards) and serves it on the calling thread's runtime. A connection over an
    /// accept limit is not taken: closing the caller's handle closes it.
    pub fn accept_fd(&self, fd: i32, head: Bytes, upgrade: Upgrade, remote: SocketAddr) -> Result<(), UpgradeError> {
        let runtime = upgrade::runtime()?;
        let Ok(slot) = self.limiter.admit(remote.ip()) else {
            return Ok(());
        };
        let stream = upgrade::dup_tcp_stream(fd)?;
        self.tune(&stream);
        let relay = self.relay.clone();
        runtime.spawn(async move {
            let _slot = slot;
            match tokio::net::TcpStream::from_std(stream) {
                Ok(s) => conn::serve(relay, Transport::Tcp(s), head, upgrade, remote).await,
                Err(_) => Metrics::inc(&relay.metrics.handshake_failure_io),
            }
        });
        Ok(())
    }

    /// TCP keepalive and user timeout on a socket taken over.
    fn tune(&self, stream: &std::net::TcpStream) {
        #[cfg(unix)]
        self.limiter.tune(std::os::fd::AsRawFd::as_raw_fd(stream));
        #[cfg(not(unix))]
        let _ = stream;
    }

    /// Takes over a raw accepted TCP socket by descriptor (duplicated, as in [`Server::accept_fd`])
    /// before anything was read from it: TLS if a certificate is set, then HTTP (see
    /// [`crate::front`]). Serves it on the calling thread's runtime. A connection over an accept
    /// limit is not taken (nothing read, no task): closing the caller's handle closes it.
    pub fn accept_connection(&self, fd: i32, remote: SocketAddr) -> Result<(), UpgradeError> {
        let runtime = upgrade::runtime()?;
        let Ok(slot) = self.limiter.admit(remote.ip()) else {
            return Ok(());
        };
        let stream = upgrade::dup_tcp_stream(fd)?;
        self.tune(&stream);
        let front = self.front.clone();
        runtime.spawn(async move {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(s) => front.serve_admitted(s, remote, Some(slot)).await,
                Err(_) => Metrics::inc(&front.metrics().handshake_failure_io),
            }
        });
        Ok(())
    }

    /// New connections from [`Server::accept_connection`] get TLS with this pair (PEM chain, leaf
    /// first, and its key) and the meta certificate; live connections keep theirs. A bad pair is
    /// refused and the current one stays.
    pub fn set_certificate(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), TlsError> {
        self.front.set_certificate(cert_pem, key_pem)
    }

    /// New connections from [`Server::accept_connection`] are served without TLS.
    pub fn clear_certificate(&self) {
        self.front.clear_certificate()
    }

    /// Where [`Server::accept_connection`] hands requests the core does not answer itself.
    pub fn set_http_handoff(&self, handoff: Option<HttpHandoff>) {
        self.front.set_http_handoff(handoff)
    }

    /// Serves a connection whose bytes the caller carries through the returned [`Bridge`]. Over
    /// an accept limit, the bridge is closed at once (its first `read` yields nothing).
    pub fn open_bridge(&self, head: Bytes, upgrade: Upgrade, remote: SocketAddr) -> Result<Bridge, UpgradeError> {
        let runtime = upgrade::runtime()?;
        let (bridge, transport) = Bridge::open(&runtime);
        let Ok(slot) = self.limiter.admit(remote.ip()) else {
            return Ok(bridge);
        };
        let relay = self.relay.clone();
        runtime.spawn(async move {
            let _slot = slot;
            conn::serve(relay, transport, head, upgrade, remote).await
        });
        Ok(bridge)
    }

    /// Graceful shutdown, in order: mesh links stop (their forwarders go), no new connections, every
    /// client gets Restarting and is closed once its queue is flushed. Resolves when all
    /// connections are gone or `grace` has passed.
    pub async fn shutdown(&self, reconnect_in: Duration, try_for: Duration, grace: Duration) {
        self.links.stop_all();
        self.relay.shutdown(reconnect_in, try_for, grace).await;
    }
}
