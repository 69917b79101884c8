//! Landlock for `agentguard run`: just before exec, the launcher restricts
//! itself (and so the agent and all it starts) so that removal, rename and
//! truncation under the policy's protected paths fail in the kernel, with no
//! BPF-LSM needed (docs/architecture.md, "File decisions").
//!
//! Landlock is an allow-list: the rights a ruleset handles are denied
//! everywhere except beneath the hierarchies a rule grants. "Everything but
//! the protected trees" is therefore granted piecewise: for every ancestor
//! of a protected path, each of its entries that is neither protected nor
//! itself such an ancestor gets a rule. Consequences, by Landlock's design:
//! - entries directly inside an ancestor of a protected path (`/var/lib/x`
//!   when `/var/lib/postgresql` is protected) cannot be removed or renamed:
//!   removal is checked on the parent directory, which cannot be granted
//!   without granting the protected tree below it;
//! - a directory created later directly inside such an ancestor is not
//!   granted either;
//! - only concrete paths (absolute or in the workspace) of `deny` rules are
//!   covered; name patterns (`**/.git/**`, `*.bak`) cannot be enumerated,
//!   and `approve` needs a human, so both stay with the BPF programs;
//! - REFER (moving or linking across directories) must be handled, or
//!   Landlock would forbid every cross-directory rename; it is granted with
//!   the rest, so moving a file into or out of a protected tree fails too.
use std::{
    ffi::CString,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::PathBuf,
};

use thiserror::Error;

const RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: libc::c_long = 1;
const REMOVE_DIR: u64 = 1 << 4;
const REMOVE_FILE: u64 = 1 << 5;
/// ABI 2.
const REFER: u64 = 1 << 13;
/// ABI 3.
const TRUNCATE: u64 = 1 << 14;

#[derive(Debug, Error)]
pub enum LandlockError {
    #[error("Landlock is not available on this kernel (no landlock in the LSM list, or Linux < 5.13)")]
    Unavailable,
    #[error("Landlock ABI {0} cannot express this policy: it needs ABI 2 (REFER, Linux 5.19) so that moves between directories stay possible")]
    TooOld(i64),
    #[error("Landlock {op}: {source}")]
    Syscall { op: &'static str, source: std::io::Error },
}

/// The Landlock ABI version of this kernel, if any.
pub fn abi() -> Option<i64> {
    // SAFETY: documented probe call with a NULL attribute.
    let v = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u8>(), 0usize, RULESET_VERSION) };
    (v > 0).then_some(v)
}

/// The rights handled at this ABI: what the ruleset takes away outside the grants.
pub fn handled(abi: i64) -> u64 {
    let mut r = REMOVE_DIR | REMOVE_FILE | REFER;
    if abi >= 3 {
        r |= TRUNCATE;
    }
    r
}

/// One grant: a path and the rights beneath it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub path: PathBuf,
    pub rights: u64,
}

/// Compute the grants that leave only `protected` (existing paths, resolved)
/// without the handled rights. Reads the ancestor directories.
pub fn grants(protected: &[PathBuf], handled: u64) -> Vec<Grant> {
    let protected: Vec<PathBuf> = protected.iter().filter(|p| p.parent().is_some()).cloned().collect();
    let mut ancestors: Vec<PathBuf> = Vec::new();
    for p in &protected {
        let mut a = p.parent();
        while let Some(dir) = a {
            if !ancestors.contains(&dir.to_path_buf()) {
                ancestors.push(dir.to_path_buf());
            }
            a = dir.parent();
        }
    }
    let file_rights = handled & TRUNCATE;
    let mut out = Vec::new();
    for dir in &ancestors {
        // An ancestor inside a protected tree is covered by that tree.
        if protected.iter().any(|p| dir.starts_with(p)) {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            if protected.contains(&path) || ancestors.contains(&path) {
                continue;
            }
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                out.push(Grant { path, rights: handled });
            } else if kind.is_file() && file_rights != 0 {
                out.push(Grant { path, rights: file_rights });
            }
            // Symlinks and special files: their own removal is decided on
            // the ancestor, which is not granted; nothing to add.
        }
    }
    out
}

/// What `restrict` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub abi: i64,
    pub protected: Vec<PathBuf>,
    pub grants: usize,
}

fn sys_err(op: &'static str) -> LandlockError {
    LandlockError::Syscall { op, source: std::io::Error::last_os_error() }
}

/// Restrict the calling process (and everything it execs or forks from now
/// on) so the handled rights hold only outside `protected`. Paths that do
/// not exist are skipped; with none left, nothing is applied.
pub fn restrict(protected: &[String]) -> Result<Option<Applied>, LandlockError> {
    let existing: Vec<PathBuf> = protected.iter().filter_map(|p| std::fs::canonicalize(p).ok()).collect();
    if existing.is_empty() {
        return Ok(None);
    }
    let abi = abi().ok_or(LandlockError::Unavailable)?;
    if abi < 2 {
        return Err(LandlockError::TooOld(abi));
    }
    let handled = handled(abi);
    let grants = grants(&existing, handled);
    // struct landlock_ruleset_attr: its first field is handled_access_fs;
    // the kernel accepts a shorter struct from older callers.
    let attr: u64 = handled;
    // SAFETY: valid pointer and size.
    let fd = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, &attr as *const u64, std::mem::size_of::<u64>(), 0u32) };
    if fd < 0 {
        return Err(sys_err("create_ruleset"));
    }
    // SAFETY: a fresh descriptor we own.
    let ruleset = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    for g in &grants {
        let Ok(c) = CString::new(g.path.as_os_str().as_bytes()) else { continue };
        // SAFETY: a valid C string.
        let pfd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW) };
        if pfd < 0 {
            continue; // vanished meanwhile: nothing to grant
        }
        // SAFETY: a fresh descriptor we own.
        let parent = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pfd) };
        // struct landlock_path_beneath_attr is packed: u64 allowed_access, s32 parent_fd.
        let mut buf = [0u8; 12];
        buf[..8].copy_from_slice(&g.rights.to_ne_bytes());
        buf[8..].copy_from_slice(&parent.as_raw_fd().to_ne_bytes());
        // SAFETY: valid descriptor and a 12-byte attribute.
        let r = unsafe { libc::syscall(libc::SYS_landlock_add_rule, ruleset.as_raw_fd(), RULE_PATH_BENEATH, buf.as_ptr(), 0u32) };
        if r != 0 {
            return Err(sys_err("add_rule"));
        }
    }
    // Without CAP_SYS_ADMIN, Landlock requires no_new_privs (set-uid
    // programs then stop gaining privileges inside the agent).
    // SAFETY: plain prctl.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(sys_err("prctl(PR_SET_NO_NEW_PRIVS)"));
    }
    // SAFETY: valid descriptor.
    if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) } != 0 {
        return Err(sys_err("restrict_self"));
    }
    Ok(Some(Applied { abi, protected: existing, grants: grants.len() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_every_sibling_along_the_ancestry_but_not_the_tree() {
        let root = std::env::temp_dir().join(format!("agentguard-landlock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["a/protected/inner", "a/sibling", "b"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        std::fs::write(root.join("a/file"), b"x").expect("write");
        let protected = vec![root.join("a/protected")];
        let g = grants(&protected, handled(3));
        let has = |p: &str| g.iter().find(|x| x.path == root.join(p)).map(|x| x.rights);
        assert_eq!(has("a/sibling"), Some(handled(3)));
        assert_eq!(has("b"), Some(handled(3)));
        assert_eq!(has("a/file"), Some(TRUNCATE), "files get only file rights");
        assert_eq!(has("a/protected"), None);
        assert_eq!(has("a"), None, "an ancestor is never granted whole");
        assert!(g.iter().all(|x| !x.path.starts_with(root.join("a/protected"))));
        assert_eq!(handled(2) & TRUNCATE, 0, "TRUNCATE needs ABI 3");
        let _ = std::fs::remove_dir_all(&root);
    }
}
