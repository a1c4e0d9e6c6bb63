//! What operators see: Prometheus metrics and the JSON access log. Both live outside config
//! snapshots so counters and the log file survive reloads.

pub mod access_log;
pub mod metrics;

pub use access_log::{AccessLog, AccessRecord};
pub use metrics::{Metrics, RouteMetrics};
