//! derpmesh relay core: a DERP v2 relay with mesh links and a load generator. No Node dependency;
//! the napi-rs binding in `native/node` wraps it.

pub mod frame;
pub mod handshake;
pub mod io;
pub mod keys;
pub mod client;
pub mod loadgen;
