//! The Debian package manager, used by setup: which packages are installed,
//! installing missing ones, downloading a .deb, and running `apt-get update`
//! at most once per xtask run and only when something is actually missing.

use std::{collections::BTreeSet, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::cmd;

/// apt access for one xtask run; remembers whether the package lists were refreshed.
#[derive(Default)]
pub struct Apt {
    updated: bool,
}

impl Apt {
    /// Which of `packages` are not fully installed (`dpkg-query` status is not
    /// `install ok installed`).
    pub fn missing(&self, packages: &[&str]) -> Result<Vec<String>> {
        let out = cmd::output(
            Command::new("dpkg-query")
                .args(["-W", "-f=${Package}\t${Status}\n"])
                .args(packages),
        )?;
        // dpkg-query exits 1 when some package is unknown; what it printed is still valid.
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(missing_from_status(packages, &text))
    }

    /// Refresh the package lists, once per run.
    pub fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        require_root("refresh the apt package lists (apt-get update)")?;
        cmd::run(apt_get().arg("update"))
            .context("apt-get update failed: check network access to the Debian mirrors")?;
        self.updated = true;
        Ok(())
    }

    /// Install packages (after one `apt-get update`).
    pub fn install(&mut self, packages: &[String]) -> Result<()> {
        if packages.is_empty() {
            return Ok(());
        }
        require_root(&format!("install {}", packages.join(" ")))?;
        self.update()?;
        cmd::run(
            apt_get()
                .args(["install", "-y", "--no-install-recommends"])
                .args(packages),
        )
        .with_context(|| format!("installing {} failed", packages.join(" ")))
    }

    /// The package `meta` depends on whose name starts with `prefix`
    /// (`apt-cache depends`), refreshing the lists once if apt knows nothing yet.
    pub fn resolve_dependency(&mut self, meta: &str, prefix: &str) -> Result<String> {
        for attempt in 0..2 {
            let out = cmd::output(Command::new("apt-cache").args(["depends", meta]))?;
            if let Some(dep) = depends_on(&String::from_utf8_lossy(&out.stdout), prefix) {
                return Ok(dep);
            }
            if attempt == 0 && !self.updated {
                self.update()?;
            } else {
                break;
            }
        }
        bail!(
            "apt-cache depends {meta} lists no `Depends: {prefix}...`: is the Debian \
             bookworm main archive in /etc/apt/sources.list(.d)?"
        )
    }

    /// `apt-get download package` into `dir`; refreshes the lists and retries
    /// once if the mirror no longer has the version apt knows of.
    pub fn download(&mut self, package: &str, dir: &Path) -> Result<()> {
        let try_once = || {
            cmd::output(
                apt_get()
                    .args(["-o", "APT::Sandbox::User=root", "download", package])
                    .current_dir(dir),
            )
        };
        let out = try_once()?;
        if out.status.success() {
            return Ok(());
        }
        if !self.updated {
            self.update()?;
            let out = try_once()?;
            if out.status.success() {
                return Ok(());
            }
        }
        bail!(
            "apt-get download {package} (in {}) failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}

fn apt_get() -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// Fail with a clear message unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    if effective_uid()? != 0 {
        bail!("setup needs root to {what}: rerun `cargo xtask setup` as root (e.g. with sudo)");
    }
    Ok(())
}

fn effective_uid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("cannot read /proc/self/status to learn the effective uid")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
        .context("no parsable `Uid:` line in /proc/self/status")
}

/// The packages of `wanted` that `dpkg-query -W -f='${Package}\t${Status}\n'`
/// output does not show as `install ok installed`.
pub fn missing_from_status(wanted: &[&str], dpkg_output: &str) -> Vec<String> {
    let installed: BTreeSet<&str> = dpkg_output
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(name, _)| name.split(':').next().unwrap_or(name))
        .collect();
    wanted
        .iter()
        .filter(|p| !installed.contains(*p))
        .map(|p| p.to_string())
        .collect()
}

/// The first `Depends: <prefix>...` package in `apt-cache depends` output.
pub fn depends_on(apt_cache_output: &str, prefix: &str) -> Option<String> {
    apt_cache_output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|dep| dep.starts_with(prefix) && !dep.starts_with('<'))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_packages_from_dpkg_status() {
        let out = "cpio\tinstall ok installed\nzlib1g-dev:amd64\tinstall ok installed\n\
                   busybox-static\tdeinstall ok config-files\n";
        assert_eq!(
            missing_from_status(
                &["cpio", "zlib1g-dev", "busybox-static", "qemu-system-x86"],
                out
            ),
            vec!["busybox-static", "qemu-system-x86"]
        );
    }

    #[test]
    fn dependency_from_apt_cache() {
        let out =
            "linux-image-6.12-cloud-amd64\n  Depends: linux-image-6.12.117+deb12-cloud-amd64\n";
        assert_eq!(
            depends_on(out, "linux-image-").as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64")
        );
        assert_eq!(depends_on("foo\n", "linux-image-"), None);
    }
}
