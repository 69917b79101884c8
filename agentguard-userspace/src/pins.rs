//! AgentGuard's kernel state pinned in bpffs, so that enforcement outlives
//! the daemon: maps, and the links that keep the programs attached.
//!
//! ```text
//! <pin_dir>/                 /sys/fs/bpf/agentguard by default
//!   <generation>/            16 hex digits of the SHA-256 of the eBPF object
//!     maps/AG_TAGS ...       every map but the read-only globals
//!     links/<program>        always-attached programs (tagging, BPF-LSM)
//!     live/<program>         on-demand programs, present only while attached
//! ```
//!
//! A daemon that starts and finds its generation reopens the *same* maps
//! (aya's loader opens a pinned map instead of creating one) and takes over
//! the pinned links instead of attaching the programs a second time, so the
//! programs that stayed in the kernel keep reading the maps it now writes.
//! The ring buffer is one of those maps: what the kernel wrote while no
//! daemon ran is still in it, after the last record the dead daemon read.
//!
//! A different object (an upgrade) gets a new generation directory; the old
//! one is removed once the new one is attached and compiled, so for a moment
//! both judge (the same decisions from two policies' copies) instead of
//! neither.
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};
use sha2::{Digest as _, Sha256};

use crate::loader::EBPF_OBJECT;

/// The pin directories of this binary's eBPF object under `root`.
#[derive(Debug, Clone)]
pub struct Pins {
    /// `pin_dir` from the configuration.
    pub root: PathBuf,
    /// `<root>/<generation>`.
    pub dir: PathBuf,
    /// The maps were there already: a daemon ran before with this object.
    pub adopted: bool,
}

impl Pins {
    /// Create (or find) this object's generation directory under `root`,
    /// which must be on bpffs.
    pub fn open(root: &Path) -> io::Result<Self> {
        let dir = root.join(generation());
        let adopted = std::fs::read_dir(dir.join("maps")).is_ok_and(|mut d| d.next().is_some());
        for sub in ["maps", "links", "live"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| io::Error::new(e.kind(), format!("cannot create pin directory {}: {e}", dir.join(sub).display())))?;
        }
        if !on_bpffs(&dir) {
            return Err(io::Error::other(format!(
                "{} is not on a bpf filesystem: pins must live there (mount one with `mount -t bpf bpf /sys/fs/bpf`)",
                dir.display()
            )));
        }
        Ok(Self { root: root.to_owned(), dir, adopted })
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.dir.join("links").join(program)
    }

    pub fn live(&self, program: &str) -> PathBuf {
        self.dir.join("live").join(program)
    }

    /// The pinned always-attached link of `program`, if a daemon left one.
    pub fn adopt_link(&self, program: &str) -> Option<PinnedLink> {
        let path = self.link(program);
        if !path.exists() {
            return None;
        }
        match PinnedLink::from_pin(&path) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable pinned link; attaching the program anew");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Generation directories of other objects (left by an older binary).
    pub fn stale_generations(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && *p != self.dir)
            .collect()
    }
}

/// Pin `link` at `path`, replacing a stale pin there.
pub fn pin(link: FdLink, path: &Path) -> Result<PinnedLink, String> {
    let _ = std::fs::remove_file(path);
    link.pin(path).map_err(|e| format!("cannot pin {}: {e}", path.display()))
}

/// The generation of the embedded object: its hash, so a daemon only ever
/// reopens maps whose layout its programs were built for. Computed once:
/// `status` asks for it, and the daemon lets go of the object's pages
/// after start (loader.rs `release_object`).
pub fn generation() -> String {
    static GENERATION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    GENERATION
        .get_or_init(|| {
            let digest = Sha256::digest(EBPF_OBJECT);
            digest[..8].iter().map(|b| format!("{b:02x}")).collect()
        })
        .clone()
}

/// The names of the object's maps that are pinned: all but the read-only
/// globals (`.rodata`, `.bss`), which every load creates with its own values.
pub fn pinned_map_names() -> Vec<String> {
    match aya_obj::Object::parse(EBPF_OBJECT) {
        Ok(obj) => obj.maps.keys().filter(|n| !n.starts_with('.')).cloned().collect(),
        Err(e) => {
            tracing::error!(error = %e, "cannot parse the eBPF object's maps; nothing will be pinned");
            Vec::new()
        }
    }
}

/// Remove everything under `root` (the links detach as their last pin goes,
/// once no process holds them) and `root` itself.
pub fn remove_all(root: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// The ids of the programs that the links pinned under `root` attach: what
/// [`remove_all`] is meant to take out of the kernel.
pub fn pinned_program_ids(root: &Path) -> Vec<u32> {
    let mut ids: Vec<u32> = list(root)
        .iter()
        .filter_map(|rel| PinnedLink::from_pin(root.join(rel)).ok())
        .filter_map(|p| FdLink::from(p).info().ok())
        .map(|info| info.program_id())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Wait, at most `limit`, until none of the programs `ids` is loaded any
/// more, and return those still loaded then. Removing a link's last pin
/// detaches it from a kernel work item, not from the `unlink` itself, and a
/// process holding the program (a daemon on its way out) keeps it loaded:
/// "unloaded" is only said once the kernel has let go.
pub fn wait_unloaded(ids: &[u32], limit: std::time::Duration) -> Vec<u32> {
    let start = std::time::Instant::now();
    loop {
        let loaded: std::collections::HashSet<u32> = aya::programs::loaded_programs().filter_map(Result::ok).map(|p| p.id()).collect();
        let left: Vec<u32> = ids.iter().copied().filter(|id| loaded.contains(id)).collect();
        if left.is_empty() || start.elapsed() >= limit {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// What is pinned under `root`, relative paths, sorted (for status and tests).
pub fn list(root: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap_or(&p).display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn on_bpffs(dir: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    nix::sys::statfs::statfs(dir).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}
