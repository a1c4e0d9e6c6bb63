//! The operator listener (loopback by default): Prometheus `/metrics`, `/status` (config
//! generation and the last reload error, as JSON) and `/healthz`. The authenticated admin API
//! will live here too.

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

use crate::gateway::Gateway;

pub struct AdminApp {
    pub gateway: Arc<Gateway>,
}

fn response(status: u16, content_type: &str, body: Vec<u8>) -> http::Response<Vec<u8>> {
    http::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(body)
        .expect("static response parts are valid")
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/metrics" => {
                self.gateway.refresh_backend_metrics();
                response(
                    200,
                    "text/plain; version=0.0.4",
                    self.gateway.metrics.render(),
                )
            }
            "/status" => {
                let body = serde_json::to_vec_pretty(&self.gateway.status()).unwrap_or_default();
                response(200, "application/json", body)
            }
            "/healthz" => response(200, "text/plain", b"ok\n".to_vec()),
            _ => response(
                404,
                "application/json",
                br#"{"error":"not_found","message":"try /metrics, /status or /healthz"}"#.to_vec(),
            ),
        }
    }
}
