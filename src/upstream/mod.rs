//! Upstreams: the compiled form of an `upstreams.<name>` entry and the choice of a backend for
//! each request.
//!
//! An [`Upstream`] is compiled once per configuration snapshot and is immutable afterwards. What
//! must outlive a snapshot (active health, passive-ejection counters, in-flight counts) lives in
//! the [`Registry`], one state per (upstream, backend address); a reload re-attaches to it.
//!
//! Request path, in order: the router picks a [`SubsetId`] (chosen at compile by
//! [`Upstream::subset`]), [`Upstream::hash_key`] reads the `hash_on` key, [`Upstream::select`]
//! returns a [`Pick`] (an in-flight slot), [`Upstream::peer`] gives the connection settings, and
//! the outcome goes back through [`Upstream::report_connect_failure`] /
//! [`Upstream::report_status`]. Those calls take no lock and `select` allocates nothing.
//! Compilation, the registry and the [`HealthChecker`] may lock and allocate.

mod balance;
mod compile;
mod health;
mod key;
mod passive;
mod registry;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pingora_core::upstreams::peer::HttpPeer;

use crate::config::{self, Balance, FieldError};
use balance::Subset;
use health::HealthSpec;
use key::HashOn;
use passive::PassivePolicy;
use registry::BackendState;

pub use health::HealthChecker;
pub use registry::Registry;

/// A compiled upstream: its backends with their precomputed peers, the balancing policy and the
/// label subsets routes select. Lives in a snapshot behind `Arc`.
pub struct Upstream {
    pub name: String,
    backends: Box<[BackendEntry]>,
    balance: Balance,
    hash_on: Option<HashOn>,
    subsets: Vec<Subset>,
    passive: PassivePolicy,
    /// `Some` iff the upstream has a `health_check:`; only then does active health count.
    health: Option<Arc<HealthSpec>>,
    retries: usize,
}

/// One configured backend.
struct BackendEntry {
    /// As written in the config (metrics, logs, default probe `Host`).
    address: String,
    addr: SocketAddr,
    weight: u32,
    labels: BTreeMap<String, String>,
    /// Rendezvous-hashing identity: a hash of `address`, stable across reloads and processes.
    seed: u64,
    peer: HttpPeer,
    state: Arc<BackendState>,
}

/// A label subset of an upstream's backends, from [`Upstream::subset`]. Only meaningful for the
/// upstream that returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubsetId(u32);

/// A chosen backend. Holds an in-flight slot on it (what `least_conn` counts) until dropped;
/// `Send + 'static`, so it can live in a request context or a WebSocket tunnel for hours.
pub struct Pick {
    pub index: usize,
    state: Arc<BackendState>,
}

/// One backend as seen by metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus<'a> {
    /// As written in the config.
    pub address: &'a str,
    /// What `address` resolved to at compile.
    pub addr: SocketAddr,
    pub labels: &'a BTreeMap<String, String>,
    /// Gets traffic: healthy by its active checks (or has none) and not ejected.
    pub healthy: bool,
    /// Taken out by passive health right now.
    pub ejected: bool,
    pub in_flight: usize,
}

impl Upstream {
    /// Validates and compiles `upstreams.<name>`, attaching each backend to its state in
    /// `registry`. Resolves host names (std `ToSocketAddrs`, blocking). Errors carry field paths
    /// such as `upstreams.chat.backends[1].address`; all of them are collected.
    pub fn compile(
        name: &str,
        cfg: &config::Upstream,
        registry: &Registry,
    ) -> Result<Upstream, Vec<FieldError>> {
        compile::compile(name, cfg, registry)
    }

    /// The subset of backends carrying all of `labels` (an empty map: every backend). Identical
    /// selectors share one subset. `Err` when no backend carries them. Call at compile, before
    /// the upstream is shared.
    pub fn subset(&mut self, labels: &BTreeMap<String, String>) -> Result<SubsetId, String> {
        if let Some(i) = self.subsets.iter().position(|s| s.labels == *labels) {
            return Ok(SubsetId(i as u32));
        }
        let members: Vec<usize> = self
            .backends
            .iter()
            .enumerate()
            .filter(|(_, b)| labels.iter().all(|(k, v)| b.labels.get(k) == Some(v)))
            .map(|(i, _)| i)
            .collect();
        if members.is_empty() {
            let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            return Err(format!(
                "no backend of upstream `{}` carries the labels {}",
                self.name,
                wanted.join(", ")
            ));
        }
        let weights: Vec<u32> = self.backends.iter().map(|b| b.weight).collect();
        self.subsets
            .push(Subset::new(labels.clone(), members, &weights));
        Ok(SubsetId((self.subsets.len() - 1) as u32))
    }

    /// Hash of the request's `hash_on` key for `balance: hash`. `None` when the upstream does
    /// not hash or the request lacks the key; `select` then falls back to round robin.
    #[inline]
    pub fn hash_key(&self, req: &http::request::Parts, client_ip: Option<IpAddr>) -> Option<u64> {
        self.hash_on.as_ref()?.key(req, client_ip)
    }

    /// Picks a backend of `subset` that is healthy (active checks), not ejected (passive), and
    /// not in `tried` (indexes this request already tried). `None`: no usable backend, the
    /// caller answers 503. Lock-free and allocation-free.
    pub fn select(&self, subset: SubsetId, hash: Option<u64>, tried: &[usize]) -> Option<Pick> {
        let subset = self.subsets.get(subset.0 as usize)?;
        let active = self.health.is_some();
        let usable = |i: usize| {
            let state = &self.backends[i].state;
            !tried.contains(&i) && (!active || state.is_healthy()) && !state.is_ejected()
        };
        let index = match (self.balance, hash) {
            (Balance::Hash, Some(key)) => subset.rendezvous(key, usable, |i| self.backends[i].seed),
            (Balance::LeastConn, _) => {
                subset.least_conn(usable, |i| self.backends[i].state.in_flight())
            }
            _ => subset.round_robin(usable),
        }?;
        Some(Pick::new(index, &self.backends[index].state))
    }

    /// A ready-to-use peer for backend `i`: address, TLS/SNI/verification and the connect, read,
    /// write and idle timeouts. Panics if `i` is not a backend index of this upstream.
    pub fn peer(&self, i: usize) -> Box<HttpPeer> {
        Box::new(self.backends[i].peer.clone())
    }

    /// Whether the backends are reached over TLS (all or none of them are).
    pub fn is_tls(&self) -> bool {
        self.backends.first().is_some_and(|b| b.peer.is_tls())
    }

    /// Connect and read timeouts of backend `i`, without cloning its peer.
    pub fn timeouts(&self, i: usize) -> (Option<std::time::Duration>, Option<std::time::Duration>) {
        let o = &self.backends[i].peer.options;
        (o.connection_timeout, o.read_timeout)
    }

    /// Panics if `i` is not a backend index of this upstream.
    pub fn backend_addr(&self, i: usize) -> SocketAddr {
        self.backends[i].addr
    }

    /// Backend `i`'s address as written in the config. Panics if `i` is out of range.
    pub fn backend_address(&self, i: usize) -> &str {
        &self.backends[i].address
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Extra attempts on another backend after a connect failure.
    pub fn retries(&self) -> usize {
        self.retries
    }

    /// Passive health: connecting to backend `i` failed. Ignores unknown indexes.
    pub fn report_connect_failure(&self, i: usize) {
        if let Some(b) = self.backends.get(i) {
            b.state.passive_failure(&self.passive);
        }
    }

    /// Passive health: backend `i` answered `status`. A 5xx counts as a failure when
    /// `passive.count_5xx`; anything below 500 resets the failure count.
    pub fn report_status(&self, i: usize, status: u16) {
        let Some(b) = self.backends.get(i) else {
            return;
        };
        if status < 500 {
            b.state.passive_success();
        } else if self.passive.count_5xx {
            b.state.passive_failure(&self.passive);
        }
    }

    /// Every backend's address, labels, whether it gets traffic, and requests in flight.
    pub fn backend_states(&self) -> impl Iterator<Item = BackendStatus<'_>> + '_ {
        let active = self.health.is_some();
        self.backends.iter().map(move |b| {
            let ejected = b.state.is_ejected();
            BackendStatus {
                address: &b.address,
                addr: b.addr,
                labels: &b.labels,
                healthy: (!active || b.state.is_healthy()) && !ejected,
                ejected,
                in_flight: b.state.in_flight(),
            }
        })
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field(
                "backends",
                &self.backends.iter().map(|b| &b.address).collect::<Vec<_>>(),
            )
            .field("balance", &self.balance)
            .field("hash_on", &self.hash_on)
            .field("subsets", &self.subsets.len())
            .field("health_check", &self.health.is_some())
            .field("retries", &self.retries)
            .finish()
    }
}

impl Pick {
    fn new(index: usize, state: &Arc<BackendState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            index,
            state: state.clone(),
        }
    }

    /// The backend's resolved address.
    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for Pick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pick")
            .field("index", &self.index)
            .field("addr", &self.state.addr)
            .finish()
    }
}
