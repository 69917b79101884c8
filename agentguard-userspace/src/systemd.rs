//! Talking to systemd without libsystemd: readiness through `NOTIFY_SOCKET`
//! (sd_notify(3): one datagram of `KEY=VALUE` lines), and whether stderr is
//! the journal (`JOURNAL_STREAM`, systemd.exec(5)).
use std::os::{
    linux::net::SocketAddrExt as _,
    unix::net::{SocketAddr, UnixDatagram},
};

/// Send `state` (e.g. `READY=1`) to the service manager. Returns whether a
/// manager was there to hear it; without `NOTIFY_SOCKET` this does nothing.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return false };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        // An abstract socket: '@' stands for the leading NUL.
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(socket = path, error = %e, "cannot notify systemd");
            false
        }
    }
}

/// `READY=1` with a status line `systemctl status` shows.
pub fn ready(status: &str) -> bool {
    notify(&format!("READY=1\nSTATUS={status}\nMAINPID={}", std::process::id()))
}

/// Around a reload (Type=notify-reload and `systemctl reload` wait for the
/// READY=1 that follows). `MONOTONIC_USEC` is required with RELOADING=1.
pub fn reloading() -> bool {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={now}"))
}

pub fn stopping() -> bool {
    notify("STOPPING=1")
}

/// Whether stderr is connected to the journal: systemd sets
/// `JOURNAL_STREAM=<dev>:<inode>` of the stream it gave the service.
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else { return false };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else { return false };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_sends_one_datagram_to_the_socket() {
        let dir = std::env::temp_dir().join(format!("ag-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let sock = dir.join("notify");
        let rx = UnixDatagram::bind(&sock).expect("bind");
        // The only test in the crate that sets it.
        std::env::set_var("NOTIFY_SOCKET", &sock);
        assert!(ready("serving"));
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).expect("datagram");
        let text = std::str::from_utf8(&buf[..n]).expect("utf-8");
        assert!(text.starts_with("READY=1\nSTATUS=serving\nMAINPID="), "{text}");
        let _ = std::fs::remove_dir_all(dir);
        assert!(!notify("READY=1"), "without NOTIFY_SOCKET nothing is sent");
    }
}
