//! derpmesh relay core: a DERP v2 relay with mesh links and a load generator. No Node dependency;
//! the napi-rs binding in `native/node` wraps it.

pub mod admission;
pub mod backoff;
pub mod client;
pub mod conn;
pub mod frame;
pub mod front;
pub mod handshake;
pub mod io;
pub mod keys;
pub mod limits;
pub mod loadgen;
pub mod mesh;
pub mod metrics;
pub mod outbox;
pub mod relay;
pub mod server;
pub mod stun;
pub mod tls;
pub mod tlsio;
pub mod upgrade;
