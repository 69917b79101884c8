//! The Debian cloud kernels the VM tests boot (they have BPF-LSM in their
//! default LSM list and full BTF), cached as `build/kernels/<label>/vmlinuz`
//! with the exact package name in `package` and the kernel config in `config`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{apt::Apt, cmd, repo, setup};

/// A kernel the VM tests boot: a short label and the Debian meta package
/// whose `Depends:` names the exact versioned image package.
pub struct Kernel {
    pub label: &'static str,
    pub meta: &'static str,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        label: "6.12",
        meta: "linux-image-6.12-cloud-amd64",
    },
    Kernel {
        label: "6.1",
        meta: "linux-image-cloud-amd64",
    },
];

/// The labels, for messages.
pub fn labels() -> Vec<&'static str> {
    KERNELS.iter().map(|k| k.label).collect()
}

pub fn find(label: &str) -> Result<&'static Kernel> {
    KERNELS.iter().find(|k| k.label == label).with_context(|| {
        format!(
            "unknown kernel label {label:?}: use one of {}",
            labels().join(", ")
        )
    })
}

fn dir(root: &Path, label: &str) -> PathBuf {
    repo::build_dir(root).join("kernels").join(label)
}

/// The cached kernel image for `label`.
pub fn vmlinuz(root: &Path, label: &str) -> PathBuf {
    dir(root, label).join("vmlinuz")
}

/// The exact Debian package the cached image came from, if recorded.
pub fn package(root: &Path, label: &str) -> Option<String> {
    fs::read_to_string(dir(root, label).join("package"))
        .ok()
        .map(|s| s.trim().to_owned())
}

pub fn ensure_all(root: &Path, apt: &mut Apt) -> Result<()> {
    for k in KERNELS {
        let item = |pkg: Option<String>| {
            format!(
                "kernel {} ({})",
                k.label,
                pkg.unwrap_or_else(|| k.meta.to_owned())
            )
        };
        if vmlinuz(root, k.label).is_file() {
            setup::status("ok", &item(package(root, k.label)));
            continue;
        }
        let pkg = fetch(root, k, apt)
            .with_context(|| format!("cannot cache the {} kernel ({})", k.label, k.meta))?;
        setup::status("installed", &item(Some(pkg)));
    }
    Ok(())
}

/// Download and unpack the image package; returns its exact name.
fn fetch(root: &Path, k: &Kernel, apt: &mut Apt) -> Result<String> {
    let pkg = apt.resolve_dependency(k.meta, "linux-image-")?;
    let dest = dir(root, k.label);
    let tmp = repo::build_dir(root)
        .join("kernels")
        .join(format!("tmp-{}", k.label));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove the stale download dir {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    apt.download(&pkg, &tmp)?;
    let deb = only_entry(&tmp, |n| n.ends_with(".deb")).with_context(|| {
        format!(
            "apt-get download {pkg} left no single .deb in {}",
            tmp.display()
        )
    })?;
    let unpacked = tmp.join("root");
    cmd::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))
        .with_context(|| format!("cannot unpack {}", deb.display()))?;
    let boot = unpacked.join("boot");
    let image = only_entry(&boot, |n| n.starts_with("vmlinuz-"))
        .with_context(|| format!("{pkg} has no boot/vmlinuz-*"))?;

    fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
    if let Ok(config) = only_entry(&boot, |n| n.starts_with("config-")) {
        copy(&config, &dest.join("config"))?;
    }
    fs::write(dest.join("package"), format!("{pkg}\n"))
        .with_context(|| format!("cannot write {}", dest.join("package").display()))?;
    // vmlinuz last, through a rename: its presence means "cached and complete".
    let partial = dest.join("vmlinuz.partial");
    copy(&image, &partial)?;
    let final_path = vmlinuz(root, k.label);
    fs::rename(&partial, &final_path).with_context(|| {
        format!(
            "cannot rename {} to {}",
            partial.display(),
            final_path.display()
        )
    })?;
    fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    Ok(pkg)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(|_| ())
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

/// The one entry of `dir` whose name matches.
fn only_entry(dir: &Path, matches: impl Fn(&str) -> bool) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if matches(&entry.file_name().to_string_lossy()) {
            found.push(entry.path());
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!("nothing matching in {}", dir.display()),
        _ => bail!(
            "{} matching entries in {}, expected one",
            found.len(),
            dir.display()
        ),
    }
}
