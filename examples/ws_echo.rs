//! WebSocket echo upstream for `benches/load.sh`.
//!
//! Run: `cargo run --release --example ws_echo -- 127.0.0.1:9001`
//!
//! Accepts WebSocket upgrades on every path and echoes text and binary messages back. Runs on
//! one thread (pin it with `taskset`) so it stays out of the proxy's way. Prints `listening ADDR`
//! once bound.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into());
    let listener = TcpListener::bind(&addr).await.expect("bind");
    println!("listening {}", listener.local_addr().unwrap());
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("ws_echo: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(sock).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() {
                    break;
                }
                // Echo data frames; pings are answered by tungstenite itself.
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
    }
}
