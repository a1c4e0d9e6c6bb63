//! One JSON line per request, written by a dedicated thread so a slow disk never stalls a
//! request. When the writer falls behind by more than the queue holds, lines are dropped and
//! counted (`tollgate_access_log_dropped_total`) rather than blocking the proxy.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::SystemTime;

use serde::Serialize;

use crate::config;

const QUEUE: usize = 64 * 1024;

/// The fields of one access-log line.
#[derive(Debug, Serialize)]
pub struct AccessRecord<'a> {
    pub time: String,
    pub request_id: &'a str,
    pub client_ip: Option<String>,
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub upstream: &'a str,
    pub backend: Option<String>,
    pub status: u16,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: f64,
    pub upstream_ms: Option<f64>,
    pub websocket: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    /// What IP rules or bot detection found (`bot:sqlmap`, `ip:deny`), blocked or detected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub screened: Option<&'a str>,
    /// The authenticated consumer and its tenant, on routes with `auth`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<&'a str>,
}

enum Msg {
    Line(String),
    Reopen(config::AccessLog),
    Flush(std::sync::mpsc::Sender<()>),
}

/// Handle to the access-log writer thread.
pub struct AccessLog {
    tx: SyncSender<Msg>,
    enabled: std::sync::atomic::AtomicBool,
    dropped: prometheus::IntCounter,
}

impl AccessLog {
    /// Starts the writer for `cfg`. Fails if the log file cannot be opened.
    pub fn start(
        cfg: &config::AccessLog,
        dropped: prometheus::IntCounter,
    ) -> io::Result<AccessLog> {
        let out = open(cfg)?;
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, out))?;
        Ok(AccessLog {
            tx,
            enabled: cfg.enabled.into(),
            dropped,
        })
    }

    /// Applies a reloaded `access_log` section (new path or on/off) without losing lines.
    pub fn reconfigure(&self, cfg: &config::AccessLog) {
        self.enabled
            .store(cfg.enabled, std::sync::atomic::Ordering::Relaxed);
        let _ = self.tx.send(Msg::Reopen(cfg.clone()));
    }

    /// Writes out everything queued so far, waiting at most `limit` (before the process exits).
    pub fn flush(&self, limit: std::time::Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(limit);
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn log(&self, record: &AccessRecord<'_>) {
        if !self.enabled() {
            return;
        }
        let Ok(mut line) = serde_json::to_string(record) else {
            return;
        };
        line.push('\n');
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Line(line)) {
            self.dropped.inc();
        }
    }
}

/// RFC 3339 UTC time with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn open(cfg: &config::AccessLog) -> io::Result<Box<dyn Write + Send>> {
    if cfg.path == "stdout" {
        Ok(Box::new(io::stdout()))
    } else if cfg.path == "stderr" {
        Ok(Box::new(io::stderr()))
    } else {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.path)?;
        Ok(Box::new(f))
    }
}

fn writer(rx: Receiver<Msg>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    while let Ok(msg) = rx.recv() {
        handle(&mut out, msg);
        // Drain what is queued, then flush once: one write syscall per burst.
        while let Ok(msg) = rx.try_recv() {
            handle(&mut out, msg);
        }
        let _ = out.flush();
    }
}

fn handle(out: &mut BufWriter<Box<dyn Write + Send>>, msg: Msg) {
    match msg {
        Msg::Line(line) => {
            let _ = out.write_all(line.as_bytes());
        }
        Msg::Flush(done) => {
            let _ = out.flush();
            let _ = done.send(());
        }
        Msg::Reopen(cfg) => {
            let _ = out.flush();
            match open(&cfg) {
                Ok(w) => *out = BufWriter::with_capacity(64 * 1024, w),
                Err(e) => {
                    tracing::error!(path = %cfg.path, error = %e, "cannot open access log; keeping the old one")
                }
            }
        }
    }
}
