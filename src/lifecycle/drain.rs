//! Draining an old process: after Pingora broadcasts shutdown (`SIGTERM`, or `SIGQUIT` once
//! the sockets are handed over), listeners stop accepting and:
//!
//! - in-flight requests finish; kept-alive HTTP/1 connections get `Connection: close` on their
//!   next response (`edge`), idle ones are closed after `drain.idle_grace`; HTTP/2 gets GOAWAY
//!   (Pingora);
//! - WebSocket tunnels keep running until `drain.timeout`, then are closed one at a time, spread
//!   evenly over `drain.spread`, each at a frame boundary with a 1001 close frame (`tunnel`);
//! - the process exits as soon as no connection is left, instead of sleeping Pingora's grace
//!   period; progress is logged every few seconds and kept in `tollgate_draining`,
//!   `tollgate_connections_active` and `tollgate_websocket_tunnels_active`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::time::Instant;

use crate::gateway::Gateway;

/// After the paced close, how long tunnels get to finish their close handshakes before the
/// process exits regardless.
const FINAL_GRACE: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);
/// How long the listeners may take to start accepting at start.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Announces readiness once every listener accepts (or exits 1 if one never does), then waits
/// for shutdown and drains.
pub struct Drainer {
    pub gateway: Arc<Gateway>,
    pub pid_file: std::path::PathBuf,
}

#[async_trait]
impl BackgroundService for Drainer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        spawn_fast_exit_on_sigint(self.gateway.clone());
        let boot = self.gateway.boot_config();
        let mut addresses: Vec<String> = boot.listeners.iter().map(|l| l.address.clone()).collect();
        addresses.push(boot.admin.address.clone());
        // A shutdown that comes first (listeners then close) skips readiness and drains.
        let mut early = shutdown.clone();
        let listening = tokio::select! {
            r = crate::lifecycle::notify::wait_listening(&addresses, LISTEN_TIMEOUT) => Some(r),
            _ = wait_for_shutdown(&mut early) => None,
        };
        if let Some(Err(e)) = listening {
            tracing::error!("not serving: {e} (see the listener error above); exiting");
            exit_with(&self.gateway, 1);
        }
        if listening.is_some() {
            crate::lifecycle::notify::ready(&self.pid_file);
        }
        if wait_for_shutdown(&mut shutdown).await {
            drain(&self.gateway).await;
        }
    }
}

/// True once shutdown is broadcast; false if the broadcaster is gone.
pub async fn wait_for_shutdown(shutdown: &mut ShutdownWatch) -> bool {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return false;
        }
    }
    true
}

async fn drain(gateway: &Gateway) {
    let settings = gateway.drain_settings();
    let started = Instant::now();
    let close_at = started + settings.timeout.get();
    let give_up_at = close_at + settings.spread.get() + FINAL_GRACE;
    gateway.metrics.draining.set(1);
    tracing::info!(
        connections = gateway.metrics.connections_active.get(),
        tunnels = gateway.tunnels.len(),
        tunnel_deadline_s = settings.timeout.get().as_secs(),
        spread_s = settings.spread.get().as_secs(),
        "draining: no new connections; exiting when the last one ends"
    );
    let mut closer: Option<tokio::task::JoinHandle<()>> = None;
    let mut next_report = started + PROGRESS_EVERY;
    loop {
        let connections = gateway.metrics.connections_active.get();
        if connections <= 0 {
            tracing::info!(
                took_s = started.elapsed().as_secs_f64(),
                "drained: no connections left, exiting"
            );
            exit(gateway);
        }
        let now = Instant::now();
        if now >= next_report {
            tracing::info!(connections, tunnels = gateway.tunnels.len(), "draining");
            next_report = now + PROGRESS_EVERY;
        }
        if closer.is_none() && now >= close_at {
            closer = Some(tokio::spawn(close_tunnels_paced(
                gateway.tunnels.list(),
                settings.spread.get(),
            )));
        }
        if now >= give_up_at {
            tracing::warn!(
                connections,
                "drain deadline passed; exiting with connections still open"
            );
            exit(gateway);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Closes `tunnels` one by one, evenly over `spread`, oldest first.
async fn close_tunnels_paced(tunnels: Vec<Arc<crate::tunnel::TunnelHandle>>, spread: Duration) {
    if tunnels.is_empty() {
        return;
    }
    let step = spread / tunnels.len() as u32;
    tracing::info!(
        tunnels = tunnels.len(),
        spread_s = spread.as_secs_f64(),
        "drain deadline reached: closing WebSocket tunnels paced (1001 going away)"
    );
    let start = Instant::now();
    for (i, t) in tunnels.iter().enumerate() {
        tokio::time::sleep_until(start + step * i as u32).await;
        t.close();
    }
}

/// `SIGINT` ends the process at once, whatever state it is in. Pingora handles only the first
/// signal it gets, so without this a `SIGINT` sent to a process already draining after
/// `SIGTERM` or an upgrade would be ignored; and its own fast path waits on runtime shutdown.
fn spawn_fast_exit_on_sigint(gateway: Arc<Gateway>) {
    let Ok(mut sigint) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
    else {
        tracing::warn!("cannot listen for SIGINT; relying on Pingora's handling");
        return;
    };
    tokio::spawn(async move {
        if sigint.recv().await.is_some() {
            tracing::info!(
                connections = gateway.metrics.connections_active.get(),
                "SIGINT: exiting now"
            );
            gateway.access_log.flush(Duration::from_millis(200));
            std::process::exit(0);
        }
    });
}

fn exit(gateway: &Gateway) -> ! {
    exit_with(gateway, 0)
}

fn exit_with(gateway: &Gateway, code: i32) -> ! {
    gateway.access_log.flush(Duration::from_secs(2));
    std::process::exit(code)
}
