//! `tollgate upgrade`: replace the running process with this binary without refusing a
//! connection. The dance, and what keeps it safe at each step:
//!
//! 1. Compile the config with *this* binary, exactly as a start would. If it fails, stop: the
//!    running process is never touched.
//! 2. Find the running process through `server.pid_file` and check it is alive.
//! 3. Start `tollgate -c CONF --upgrade` and wait until it listens on `server.upgrade_sock`
//!    (it compiles its config before that, so a failure here also leaves the old one alone).
//! 4. Send `SIGQUIT` to the old process: it hands over its listening sockets and drains.
//! 5. Wait until the admin listener's `/status` answers with the new pid.
//!
//! Under systemd this runs as `ExecReload`; the new process reports `MAINPID=` itself.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::gateway::build;
use crate::lifecycle::notify::read_pid_file;
use crate::observe::Metrics;

/// How long the new process may take to start listening on the upgrade socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(15);

pub fn run(conf: &Path, ready_timeout: Duration, log: Option<&Path>) -> ExitCode {
    match upgrade(conf, ready_timeout, log) {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("upgrade failed: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `log`: where the new process writes stdout and stderr (appended); by default it inherits
/// this command's (under systemd: the journal).
fn upgrade(conf: &Path, ready_timeout: Duration, log: Option<&Path>) -> Result<String, String> {
    // 1. The new binary must accept the config.
    let (loaded, _) = build(
        conf,
        &crate::gateway::Registries::default(),
        &Metrics::new(),
        1,
    )
    .map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        format!(
            "this binary rejects the config; the running process keeps serving\n{}",
            lines.join("\n")
        )
    })?;
    let cfg = loaded.config;
    let pid_file = Path::new(&cfg.server.pid_file);
    let sock = Path::new(&cfg.server.upgrade_sock);
    let admin: SocketAddr = cfg
        .admin
        .address
        .parse()
        .map_err(|_| "admin.address is not an IP:port".to_string())?;

    // 2. The running process.
    let old = read_pid_file(pid_file).map_err(|e| {
        format!(
            "no running tollgate found through {}: {e}",
            pid_file.display()
        )
    })?;
    if !alive(old) {
        return Err(format!(
            "pid {old} from {} is not running",
            pid_file.display()
        ));
    }

    // 3. The new process, waiting for the sockets.
    let _ = std::fs::remove_file(sock);
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let mut command = Command::new(&exe);
    command
        .arg("-c")
        .arg(conf)
        .arg("--upgrade")
        .stdin(Stdio::null())
        // Its own process group: a Ctrl-C on this command must not reach the new server.
        .process_group(0);
    if let Some(path) = log {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open log {}: {e}", path.display()))?;
        let err = file
            .try_clone()
            .map_err(|e| format!("cannot open log: {e}"))?;
        command.stdout(file).stderr(err);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let child_pid = child.id() as i32;
    wait_for(SOCKET_TIMEOUT, || {
        if let Some(status) = exited(&mut child) {
            return Some(Err(format!(
                "the new process exited ({status}) before taking over; pid {old} keeps serving"
            )));
        }
        sock.exists().then_some(Ok(()))
    })
    .unwrap_or_else(|| {
        let _ = child.kill();
        Err(format!(
            "the new process did not open {} within {SOCKET_TIMEOUT:?}; stopped it, pid {old} keeps serving",
            sock.display()
        ))
    })?;

    // 4. Hand over.
    // SAFETY: kill(2) with a valid signal number has no memory-safety preconditions.
    if unsafe { libc::kill(old, libc::SIGQUIT) } != 0 {
        let _ = child.kill();
        return Err(format!(
            "cannot signal pid {old}: {}; stopped the new process",
            std::io::Error::last_os_error()
        ));
    }

    // 5. The new process answers.
    wait_for(ready_timeout, || {
        if let Some(status) = exited(&mut child) {
            return Some(Err(format!(
                "the new process exited ({status}) after the handoff; check its log"
            )));
        }
        (status_pid(admin) == Some(child_pid)).then_some(Ok(()))
    })
    .unwrap_or_else(|| {
        Err(format!(
            "the new process (pid {child_pid}) did not answer on {admin} within {ready_timeout:?}"
        ))
    })?;
    Ok(format!(
        "upgraded: pid {child_pid} serves; pid {old} drains (exits when its last connection ends; \
         WebSocket tunnels close paced after drain.timeout)"
    ))
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn exited(child: &mut Child) -> Option<std::process::ExitStatus> {
    child.try_wait().ok().flatten()
}

/// Polls `f` every 50 ms until it gives an answer or `limit` passes.
fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The pid the admin listener's `/status` reports (whichever process accepted).
fn status_pid(admin: SocketAddr) -> Option<i32> {
    fetch_status(admin)?.get("pid")?.as_i64().map(|p| p as i32)
}

/// `GET /status` from a running tollgate's admin listener, if one answers.
pub fn fetch_status(admin: SocketAddr) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: tollgate\r\nConnection: close\r\n\r\n")
        .ok()?;
    // Keep what arrived even if the server holds the connection open past the timeout.
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&out);
    let body = text.split_once("\r\n\r\n")?.1;
    serde_json::from_str(body).ok()
}
