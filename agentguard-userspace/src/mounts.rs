//! Pseudo-filesystems AgentGuard needs (bpffs, tracefs, securityfs) and the
//! cgroup2 mount point, found from /proc/self/mounts, never hard-coded.
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

/// One line of /proc/self/mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub source: String,
    pub target: PathBuf,
    pub fstype: String,
    pub options: String,
}

pub fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|text| parse_mounts(&text))
        .unwrap_or_default()
}

fn parse_mounts(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.split_whitespace();
            Some(MountEntry {
                source: it.next()?.to_owned(),
                target: PathBuf::from(unescape(it.next()?)),
                fstype: it.next()?.to_owned(),
                options: it.next()?.to_owned(),
            })
        })
        .collect()
}

/// /proc/self/mounts escapes spaces and the like as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (b[i], octal) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mounted(fstype: &str, target: &Path) -> bool {
    mounts()
        .iter()
        .any(|m| m.fstype == fstype && m.target == target)
}

/// The cgroup2 mount point (/sys/fs/cgroup on systemd hosts,
/// /sys/fs/cgroup/unified on hybrid ones).
pub fn cgroup2_root() -> Option<PathBuf> {
    let all = mounts();
    // Prefer the canonical location when several exist.
    let v2: Vec<_> = all.iter().filter(|m| m.fstype == "cgroup2").collect();
    v2.iter()
        .find(|m| m.target == Path::new("/sys/fs/cgroup"))
        .or_else(|| v2.first())
        .map(|m| m.target.clone())
}

/// The cgroup v1 freezer hierarchy, if mounted.
pub fn cgroup1_freezer() -> Option<PathBuf> {
    mounts()
        .into_iter()
        .find(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == "freezer"))
        .map(|m| m.target)
}

/// Mount `fstype` at `target` unless something of that type is already there.
pub fn ensure_mounted(fstype: &str, target: &str) -> std::io::Result<()> {
    let path = Path::new(target);
    if is_mounted(fstype, path) {
        return Ok(());
    }
    std::fs::create_dir_all(path)?;
    mount(
        Some(fstype),
        path,
        Some(fstype),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hybrid_mounts() {
        let text = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\ncgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0\nnone /a\\040b tmpfs rw 0 0\n";
        let m = parse_mounts(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].target, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m[1].options, "rw,relatime,freezer");
        assert_eq!(m[2].target, PathBuf::from("/a b"));
    }
}
