//! The daemon's sessions, saved where a restarted daemon finds them
//! (`run_state`, /run/agentguard/sessions.json by default): the kernel keeps
//! the tags and selectors in pinned maps, but what a run session was started
//! for (its agent name and workspace) lives only in the daemon.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedSession {
    pub id: u32,
    pub agent: String,
    pub agent_id: u32,
    pub workspace: Option<PathBuf>,
    pub kind: String,
}

/// Write the sessions atomically (a rename), unless `last` shows they are
/// unchanged; returns what was written.
pub fn save(path: &Path, sessions: &[SavedSession], last: &str) -> std::io::Result<String> {
    let text = serde_json::to_string(sessions).map_err(std::io::Error::other)?;
    if text == last {
        return Ok(text);
    }
    write_atomic(path, &text)?;
    Ok(text)
}

/// Write `text` to `path` whole or not at all (a rename), creating its
/// directory: what a restarted daemon reads is never half a file.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The saved sessions; none when the file is missing or unreadable (said).
pub fn load(path: &Path) -> Vec<SavedSession> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "unreadable saved sessions; starting without them");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_unchanged_skip() {
        let dir = std::env::temp_dir().join(format!("ag-runstate-{}", std::process::id()));
        let path = dir.join("sessions.json");
        let s = vec![SavedSession { id: 0x8000_0001, agent: "a".into(), agent_id: 7, workspace: Some("/w".into()), kind: "run".into() }];
        let written = save(&path, &s, "").expect("save");
        assert_eq!(load(&path), s);
        std::fs::remove_file(&path).expect("rm");
        save(&path, &s, &written).expect("save unchanged");
        assert!(!path.exists(), "unchanged sessions are not rewritten");
        let _ = std::fs::remove_dir_all(dir);
    }
}
