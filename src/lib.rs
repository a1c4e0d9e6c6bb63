//! Tollgate: an edge gateway on Pingora. See README.md for the picture; each module's first
//! lines say what it owns.

pub mod admin;
pub mod config;
pub mod edge;
pub mod forwarding;
pub mod gateway;
pub mod lifecycle;
pub mod observe;
pub mod policy;
pub mod proxy;
pub mod respond;
pub mod router;
pub mod snapshot;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod waf;
