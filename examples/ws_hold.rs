//! Opens many idle WebSocket connections through a proxy and holds them, for `benches/load.sh`.
//!
//! Run: `cargo run --release --example ws_hold -- --connect 127.0.0.1:8080 --n 10000 \
//!          --concurrency 200 --hold-secs 10 --sources 127.0.0.1,127.0.0.2`
//!
//! 1. Opens `--n` connections, at most `--concurrency` handshakes at a time, each from one of
//!    `--sources` (source IPs, round robin; more IPs = more ephemeral ports). On each it sends
//!    one text message and checks the echo.
//! 2. Prints `READY opened=.. failed=.. secs=..` once every connection is open or failed (or
//!    `--open-timeout-secs` passed), then holds them all idle for `--hold-secs`. A connection
//!    that receives anything but a ping, or is closed, during the hold counts as dropped.
//! 3. Sends one more message on each held connection and checks the echo, then prints
//!    `RESULT ...` with `alive_after_hold=`, closes them all and exits.
//!
//! Every wait is bounded; the process never runs longer than open timeout + hold + ~30 s.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const STEP_TIMEOUT: Duration = Duration::from_secs(10);

struct Args {
    connect: SocketAddr,
    path: String,
    n: usize,
    concurrency: usize,
    hold: Duration,
    open_timeout: Duration,
    sources: Vec<IpAddr>,
}

fn parse_args() -> Args {
    let mut a = Args {
        connect: "127.0.0.1:8080".parse().unwrap(),
        path: "/ws".into(),
        n: 1000,
        concurrency: 200,
        hold: Duration::from_secs(10),
        open_timeout: Duration::from_secs(120),
        sources: vec!["127.0.0.1".parse().unwrap()],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--connect" => a.connect = value(&flag, &val),
            "--path" => a.path = val.clone(),
            "--n" => a.n = value(&flag, &val),
            "--concurrency" => a.concurrency = value(&flag, &val),
            "--hold-secs" => a.hold = Duration::from_secs(value(&flag, &val)),
            "--open-timeout-secs" => a.open_timeout = Duration::from_secs(value(&flag, &val)),
            "--sources" => a.sources = val.split(',').map(|s| value(&flag, s.trim())).collect(),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if a.sources.is_empty() || a.concurrency == 0 {
        usage("need at least one source and concurrency > 0");
    }
    a
}

fn value<T: std::str::FromStr>(flag: &str, val: &str) -> T {
    val.parse()
        .unwrap_or_else(|_| usage(&format!("bad value for {flag}: {val}")))
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "ws_hold: {msg}\nflags: --connect ADDR --path /ws --n N --concurrency C --hold-secs S \
         --open-timeout-secs S --sources IP,IP"
    );
    std::process::exit(2)
}

#[derive(Default)]
struct Stats {
    opened: AtomicU64,
    connect_failed: AtomicU64,
    handshake_failed: AtomicU64,
    echo_failed: AtomicU64,
    dropped_during_hold: AtomicU64,
    alive_after_hold: AtomicU64,
    /// The first few error messages, for the report.
    errors: Mutex<Vec<String>>,
}

impl Stats {
    fn note(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap();
        if e.len() < 5 {
            e.push(what);
        }
    }
    fn settled(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
            + self.connect_failed.load(Ordering::Relaxed)
            + self.handshake_failed.load(Ordering::Relaxed)
            + self.echo_failed.load(Ordering::Relaxed)
    }
}

type Ws = WebSocketStream<TcpStream>;

/// Sends `text` and waits for the same text back, skipping pings/pongs.
async fn echo(ws: &mut Ws, text: String) -> Result<(), String> {
    timeout(STEP_TIMEOUT, ws.send(Message::text(text.clone())))
        .await
        .map_err(|_| "send timed out".to_string())?
        .map_err(|e| format!("send: {e}"))?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, ws.next()).await {
            Err(_) => return Err("echo timed out".into()),
            Ok(None) => return Err("closed before echo".into()),
            Ok(Some(Err(e))) => return Err(format!("read: {e}")),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => return Ok(()),
            Ok(Some(Ok(other))) => return Err(format!("unexpected echo: {other:?}")),
        }
    }
}

async fn open(args: &Args, src: IpAddr) -> Result<TcpStream, String> {
    let sock = if src.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    sock.bind(SocketAddr::new(src, 0))
        .map_err(|e| format!("bind {src}: {e}"))?;
    let stream = timeout(STEP_TIMEOUT, sock.connect(args.connect))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn one(
    i: usize,
    args: Arc<Args>,
    stats: Arc<Stats>,
    gate: Arc<Semaphore>,
    mut hold_end: watch::Receiver<bool>,
) {
    let permit = gate.acquire_owned().await.expect("semaphore");
    if *hold_end.borrow() {
        // The open phase timed out before this one got a turn.
        stats.note(
            &stats.connect_failed,
            "not started before the open timeout".into(),
        );
        return;
    }
    let src = args.sources[i % args.sources.len()];
    let stream = match open(&args, src).await {
        Ok(s) => s,
        Err(e) => return stats.note(&stats.connect_failed, e),
    };
    let url = format!("ws://{}{}", args.connect, args.path);
    let mut ws = match timeout(
        STEP_TIMEOUT,
        tokio_tungstenite::client_async(url.as_str(), stream),
    )
    .await
    {
        Ok(Ok((ws, _resp))) => ws,
        Ok(Err(e)) => return stats.note(&stats.handshake_failed, format!("handshake: {e}")),
        Err(_) => return stats.note(&stats.handshake_failed, "handshake timed out".into()),
    };
    if let Err(e) = echo(&mut ws, format!("hello {i}")).await {
        return stats.note(&stats.echo_failed, e);
    }
    stats.opened.fetch_add(1, Ordering::Relaxed);
    drop(permit);

    // Hold: idle until told to stop; anything but a ping means the tunnel is gone.
    loop {
        tokio::select! {
            _ = hold_end.changed() => break,
            msg = ws.next() => match msg {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => return stats.note(&stats.dropped_during_hold, format!("during hold: {other:?}")),
                Some(Err(e)) => return stats.note(&stats.dropped_during_hold, format!("during hold: {e}")),
                None => return stats.note(&stats.dropped_during_hold, "closed during hold".into()),
            },
        }
    }
    match echo(&mut ws, format!("bye {i}")).await {
        Ok(()) => {
            stats.alive_after_hold.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => stats.note(&stats.dropped_during_hold, format!("after hold: {e}")),
    }
    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Arc::new(parse_args());
    let stats = Arc::new(Stats::default());
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let (end_tx, end_rx) = watch::channel(false);
    let start = Instant::now();

    let mut tasks = Vec::with_capacity(args.n);
    for i in 0..args.n {
        tasks.push(tokio::spawn(one(
            i,
            args.clone(),
            stats.clone(),
            gate.clone(),
            end_rx.clone(),
        )));
    }

    // Open phase: until everything settled or the open timeout.
    while stats.settled() < args.n as u64 && start.elapsed() < args.open_timeout {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_secs = start.elapsed().as_secs_f64();
    let opened = stats.opened.load(Ordering::Relaxed);
    println!(
        "READY opened={opened} failed={} secs={open_secs:.1}",
        args.n as u64 - opened
    );

    // Hold phase.
    tokio::time::sleep(args.hold).await;
    let _ = end_tx.send(true);

    // Final check; bounded.
    let all = futures_util::future::join_all(tasks);
    if timeout(STEP_TIMEOUT * 3, all).await.is_err() {
        eprintln!("ws_hold: some connections did not finish their final check in time");
    }
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "RESULT n={} opened={} connect_failed={} handshake_failed={} echo_failed={} dropped_during_hold={} alive_after_hold={} open_secs={open_secs:.1}",
        args.n,
        g(&stats.opened),
        g(&stats.connect_failed),
        g(&stats.handshake_failed),
        g(&stats.echo_failed),
        g(&stats.dropped_during_hold),
        g(&stats.alive_after_hold),
    );
    for e in stats.errors.lock().unwrap().iter() {
        println!("ERROR {e}");
    }
}
