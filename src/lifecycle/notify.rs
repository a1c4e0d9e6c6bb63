//! Telling the outside world the process is ready: the pid file `tollgate upgrade` reads, and
//! systemd's notify protocol (`READY=1`, `MAINPID=`) so a `Type=notify` unit follows the main
//! PID across binary upgrades. Both are best effort: failures are logged, never fatal.

use std::io;
use std::path::Path;

/// Writes this process's pid to `path` (atomically, via a temporary file and rename).
pub fn write_pid_file(path: &Path) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}

/// Reads a pid file written by [`write_pid_file`].
pub fn read_pid_file(path: &Path) -> io::Result<i32> {
    let text = std::fs::read_to_string(path)?;
    text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("`{}` holds no pid", path.display()),
        )
    })
}

/// Sends `state` (e.g. `READY=1\nMAINPID=123`) to systemd when run under a notify unit.
/// Returns whether a message was sent.
pub fn sd_notify(state: &str) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let result = send(&socket, state.as_bytes());
    if let Err(e) = &result {
        tracing::warn!("cannot notify systemd ({}): {e}", socket.to_string_lossy());
    }
    result.is_ok()
}

fn send(socket: &std::ffi::OsStr, msg: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = socket.as_bytes();
    let addr = if let Some(name) = bytes.strip_prefix(b"@") {
        // Linux abstract namespace.
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name)?
    } else {
        SocketAddr::from_pathname(Path::new(socket))?
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(msg, &addr)?;
    Ok(())
}

/// Waits until this process holds a listening socket on the port of every address. Pingora
/// binds listeners in their service threads and a failed bind only panics that thread, so this
/// is how the process learns whether it really listens. (Connecting would not tell: another
/// program may hold the port.) Returns the first address that never came up.
pub async fn wait_listening(
    addresses: &[String],
    limit: std::time::Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut ports = Vec::with_capacity(addresses.len());
    for address in addresses {
        let addr: std::net::SocketAddr = address
            .parse()
            .map_err(|_| format!("`{address}` is not an address"))?;
        ports.push((address, addr.port()));
    }
    loop {
        let mine = own_listening_ports();
        match ports.iter().find(|(_, port)| !mine.contains(port)) {
            None => return Ok(()),
            Some((address, _)) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("this process is not listening on {address}"));
            }
            Some(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

/// TCP ports on which this process holds a socket in LISTEN state (Linux /proc).
fn own_listening_ports() -> std::collections::HashSet<u16> {
    let inodes: std::collections::HashSet<u64> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    let mut ports = std::collections::HashSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() > 9 && f[3] == "0A" && f[9].parse().is_ok_and(|i: u64| inodes.contains(&i)) {
                if let Some(port) = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                {
                    ports.insert(port);
                }
            }
        }
    }
    ports
}

/// Announces this process as ready and as the service's main process.
pub fn ready(pid_file: &Path) {
    if let Err(e) = write_pid_file(pid_file) {
        tracing::warn!("cannot write pid file {}: {e}", pid_file.display());
    }
    sd_notify(&format!("READY=1\nMAINPID={}", std::process::id()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_listening_ports_sees_our_sockets_only() {
        let ours = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = ours.local_addr().unwrap().port();
        assert!(own_listening_ports().contains(&port));
        drop(ours);
        assert!(!own_listening_ports().contains(&port));
    }

    #[test]
    fn pid_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.pid");
        write_pid_file(&p).unwrap();
        assert_eq!(read_pid_file(&p).unwrap(), std::process::id() as i32);
        std::fs::write(&p, "nope").unwrap();
        assert!(read_pid_file(&p).is_err());
    }

    #[test]
    fn notify_reaches_a_datagram_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), b"READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
