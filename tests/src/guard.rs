//! RAII guards: every cgroup and temporary directory a test creates is
//! removed when the guard drops, also when the test panics.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// A child cgroup under the cgroup2 root, removed on drop (its processes are
/// killed first so the rmdir cannot fail on a busy cgroup).
pub struct CgroupGuard {
    pub path: PathBuf,
}

impl CgroupGuard {
    pub fn new(name: &str) -> Self {
        let root = agentguard::mounts::cgroup2_root().expect("no cgroup2 mount on this host");
        let path = root.join(format!("agentguard-test-{name}-{}", std::process::id()));
        if path.exists() {
            let _ = Self { path: path.clone() };
        }
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        Self { path }
    }

    /// The cgroup's id as `bpf_get_current_cgroup_id` reports it (its inode).
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display()))
            .ino()
    }

    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let kill = self.path.join("cgroup.kill");
        if kill.exists() {
            let _ = std::fs::write(&kill, "1");
        }
        for _ in 0..200 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// A fresh directory under /tmp, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), name)
    }

    /// A fresh directory under `parent`, removed on drop.
    pub fn new_in(parent: &Path, name: &str) -> Self {
        let path = parent.join(format!(
            "agentguard-test-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self { path }
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
