//! `cargo xtask install`: build in release and install the daemon as a
//! systemd service: the binary, the unit (packaging/agentguard.service), a
//! configuration (packaging/agentguard.toml, never overwriting an existing
//! one) and the shipped policies. `--destdir` stages everything under a
//! directory instead (for packaging, and for the test of this command).
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{cmd, repo};

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// Install under this directory instead of / (nothing is started).
    #[arg(long, default_value = "/")]
    pub destdir: PathBuf,
    /// Where the binary goes (the unit is rewritten to match).
    #[arg(long, default_value = "/usr/local/bin")]
    pub bindir: PathBuf,
    /// Install this binary instead of building one in release.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Also `systemctl enable --now agentguard` (only with --destdir /).
    #[arg(long)]
    pub start: bool,
}

/// What was put where (for the summary and the test).
#[derive(Debug, Default)]
pub struct Installed {
    pub written: Vec<PathBuf>,
    /// Existing files left alone (a configuration or policy the admin changed).
    pub kept: Vec<PathBuf>,
}

pub fn run(root: &Path, args: &InstallArgs) -> Result<()> {
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => {
            cmd::run(Command::new("cargo").current_dir(root).args(["build", "--release", "-p", "agentguard-userspace"]))?;
            root.join("target/release/agentguard")
        }
    };
    let done = install(root, &binary, &args.destdir, &args.bindir)?;
    for p in &done.written {
        println!("installed {}", p.display());
    }
    for p in &done.kept {
        println!("kept      {} (differs from the shipped one; the shipped version is next to it as .dist)", p.display());
    }
    let live = args.destdir == Path::new("/");
    if live && Path::new("/run/systemd/system").exists() {
        cmd::run(Command::new("systemctl").arg("daemon-reload"))?;
        if args.start {
            cmd::run(Command::new("systemctl").args(["enable", "--now", "agentguard"]))?;
        } else {
            println!("next: systemctl enable --now agentguard");
        }
    } else if live {
        println!("systemd is not running here: start the daemon with `{} daemon`", args.bindir.join("agentguard").display());
    }
    Ok(())
}

/// Copy everything under `destdir`.
pub fn install(root: &Path, binary: &Path, destdir: &Path, bindir: &Path) -> Result<Installed> {
    let at = |p: &Path| destdir.join(p.strip_prefix("/").unwrap_or(p));
    let mut done = Installed::default();
    let bin = at(&bindir.join("agentguard"));
    put(&bin, &std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?, 0o755, true, &mut done)?;

    let unit = std::fs::read_to_string(root.join("packaging/agentguard.service")).context("packaging/agentguard.service")?;
    let unit = unit.replace("/usr/local/bin/agentguard", &bindir.join("agentguard").to_string_lossy());
    put(&at(Path::new("/etc/systemd/system/agentguard.service")), unit.as_bytes(), 0o644, true, &mut done)?;

    let etc = at(Path::new("/etc/agentguard"));
    let config = std::fs::read(root.join("packaging/agentguard.toml")).context("packaging/agentguard.toml")?;
    put(&etc.join("agentguard.toml"), &config, 0o644, false, &mut done)?;
    let policies = repo::policies(root);
    let mut entries: Vec<_> = std::fs::read_dir(&policies)
        .with_context(|| format!("cannot list {}", policies.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().context("policy file name")?;
        put(&etc.join("policies").join(name), &std::fs::read(&p)?, 0o644, false, &mut done)?;
    }
    for doc in ["operations.md", "policy.md", "events.md"] {
        let src = root.join("docs").join(doc);
        if let Ok(text) = std::fs::read(&src) {
            put(&at(Path::new("/usr/local/share/doc/agentguard")).join(doc), &text, 0o644, true, &mut done)?;
        }
    }
    Ok(done)
}

/// Write `bytes` at `path` (atomically: a rename). An existing file that
/// differs is replaced only when `replace`; otherwise the new one goes next
/// to it as `.dist`.
fn put(path: &Path, bytes: &[u8], mode: u32, replace: bool, done: &mut Installed) -> Result<()> {
    let dir = path.parent().context("no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut target = path.to_owned();
    if let Ok(existing) = std::fs::read(path) {
        if existing == bytes {
            done.written.push(path.to_owned());
            return Ok(());
        }
        if !replace {
            done.kept.push(path.to_owned());
            target = path.with_extension(format!("{}.dist", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
        }
    }
    let tmp = target.with_extension("xtask-tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, &target).with_context(|| format!("cannot install {}", target.display()))?;
    if target == path {
        done.written.push(target);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_binary_unit_config_and_policies_and_keeps_a_changed_config() {
        let root = repo::root();
        let dest = std::env::temp_dir().join(format!("ag-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dest);
        let fake = dest.join("fake-agentguard");
        std::fs::create_dir_all(&dest).expect("mkdir");
        std::fs::write(&fake, b"#!/bin/sh\n").expect("fake binary");
        let done = install(&root, &fake, &dest.join("root"), Path::new("/opt/ag/bin")).expect("install");
        let r = dest.join("root");
        assert!(r.join("opt/ag/bin/agentguard").metadata().expect("binary").permissions().mode() & 0o111 != 0);
        let unit = std::fs::read_to_string(r.join("etc/systemd/system/agentguard.service")).expect("unit");
        assert!(unit.contains("ExecStart=/opt/ag/bin/agentguard --config /etc/agentguard/agentguard.toml daemon"), "{unit}");
        assert!(r.join("etc/agentguard/agentguard.toml").exists());
        assert!(r.join("etc/agentguard/policies/default.toml").exists());
        assert!(done.kept.is_empty());
        // The admin edits the configuration; a second install keeps it.
        std::fs::write(r.join("etc/agentguard/agentguard.toml"), "fail_closed = false\n").expect("edit");
        let again = install(&root, &fake, &r, Path::new("/opt/ag/bin")).expect("install again");
        assert_eq!(std::fs::read_to_string(r.join("etc/agentguard/agentguard.toml")).expect("read"), "fail_closed = false\n");
        assert_eq!(again.kept, vec![r.join("etc/agentguard/agentguard.toml")]);
        assert!(r.join("etc/agentguard/agentguard.toml.dist").exists());
        let _ = std::fs::remove_dir_all(&dest);
    }
}
