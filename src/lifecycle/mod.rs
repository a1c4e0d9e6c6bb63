//! Process lifecycle: readiness (pid file, systemd notify), draining after `SIGQUIT` (binary
//! upgrade) or `SIGTERM`, and the `tollgate upgrade` command that runs the socket handoff.
//!
//! Pingora does the handoff itself: on `SIGQUIT` the old process sends its listening sockets
//! over `server.upgrade_sock` to a new process started with `--upgrade`, keeps accepting for
//! 5 s, then broadcasts shutdown. What Pingora lacks, this module adds: the old process exits
//! as soon as its last connection ends (Pingora would sleep its whole grace period), and at the
//! drain deadline it closes the remaining WebSocket tunnels one by one across a window.

pub mod drain;
pub mod notify;
pub mod upgrade;
