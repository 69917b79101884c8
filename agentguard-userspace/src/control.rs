//! The control socket: one JSON request per connection, one JSON response.
//! Only root (or the configured group) may connect, and never a tagged
//! process: the daemon checks the peer's pid against the kernel's tag map.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Ps,
    /// Start an `agentguard run` session: the daemon creates its cgroup and
    /// the kernel selector that tags whatever execs inside it.
    NewSession {
        agent: String,
        workspace: Option<PathBuf>,
    },
    /// Re-read, check and apply the policy directory; on any error the
    /// policy in force stays.
    Reload,
    /// The killswitch (killswitch.rs): the daemon acts on the agents'
    /// cgroups, writes the incident record of a freeze, and logs the action
    /// with the caller and the reason. Answer: `{"results": [ActionResult]}`.
    Freeze {
        target: crate::killswitch::Target,
        reason: Option<String>,
    },
    Thaw {
        target: crate::killswitch::Target,
        reason: Option<String>,
    },
    Kill {
        target: crate::killswitch::Target,
        reason: Option<String>,
    },
    /// Stop the daemon. The pinned programs keep enforcing unless `unload`:
    /// then every pin, the saved sessions and the empty cgroups go too.
    Stop {
        unload: bool,
    },
    /// Pending approvals (approvals.rs). Answer: `{"pending": [Approval]}`.
    Approvals,
    /// Grant a pending approval: the kernel lets the same action on the
    /// same target by the same session through (once, or until the time is
    /// up), and the agent is thawed.
    Approve {
        id: u32,
        grant: crate::approvals::Grant,
    },
    /// Keep the action refused; thaw the agent, or kill it.
    Deny {
        id: u32,
        kill: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self { ok: true, error: None, data }
    }

    pub fn err(msg: impl Into<String>) -> Self {
        Self { ok: false, error: Some(msg.into()), data: serde_json::Value::Null }
    }
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("the AgentGuard daemon is not running (no socket at {0}); start it with `systemctl start agentguard` or `agentguard daemon`")]
    NotRunning(PathBuf),
    #[error("cannot talk to the daemon at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the daemon sent an unreadable answer: {0}")]
    Decode(serde_json::Error),
    #[error("the daemon refused: {0}")]
    Refused(String),
}

/// Send one request and wait for its answer.
pub fn request(socket: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    let io = |source| ClientError::Io { path: socket.to_owned(), source };
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(socket.to_owned())
        }
        _ => io(e),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(ClientError::Decode)?;
    line.push('\n');
    // A daemon that refuses the caller answers without reading the request
    // and closes, so the write can fail while the refusal waits to be read.
    let written = match stream.write_all(line.as_bytes()) {
        Err(e) if !matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) => {
            return Err(io(e))
        }
        w => w,
    };
    let mut answer = String::new();
    let read = BufReader::new(&stream).read_line(&mut answer);
    match (written, read) {
        (Err(e), Err(_) | Ok(0)) => return Err(io(e)),
        (_, Err(e)) => return Err(io(e)),
        _ => {}
    }
    let resp: Response = serde_json::from_str(&answer).map_err(ClientError::Decode)?;
    if resp.ok {
        Ok(resp.data)
    } else {
        Err(ClientError::Refused(resp.error.unwrap_or_else(|| "no reason given".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        let r = Request::NewSession { agent: "claude".into(), workspace: None };
        let s = serde_json::to_string(&r).expect("serialises");
        assert_eq!(s, r#"{"op":"new_session","agent":"claude","workspace":null}"#);
        let back: Request = serde_json::from_str(&s).expect("parses");
        assert_eq!(back, r);
    }

    #[test]
    fn killswitch_wire_format() {
        let r = Request::Freeze { target: crate::killswitch::Target::Agent("claude".into()), reason: Some("rm -rf".into()) };
        let s = serde_json::to_string(&r).expect("serialises");
        assert_eq!(s, r#"{"op":"freeze","target":{"agent":"claude"},"reason":"rm -rf"}"#);
        let all: Request = serde_json::from_str(r#"{"op":"kill","target":"all","reason":null}"#).expect("parses");
        assert_eq!(all, Request::Kill { target: crate::killswitch::Target::All, reason: None });
    }
}
