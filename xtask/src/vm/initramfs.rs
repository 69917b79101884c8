//! The initramfs a test VM boots: a cached static archive (directories,
//! console device, busybox and its applet links, /etc basics), a payload
//! archive rebuilt every run (test binaries, `/bin/agentguard`, the shared
//! libraries `ldd` lists, the policies), and a per-kernel archive holding
//! `/init`. The three are concatenated, uncompressed, into one initrd.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::{self, BufWriter},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::cpio::Cpio;
use crate::cmd;

const BUSYBOX: &str = "/bin/busybox";
/// Bump when the static archive's content changes.
const STATIC_FORMAT: u32 = 1;

/// An executable for the VM: its file name inside (`/tests/<name>` or
/// `/bin/<name>`) and where it is on the host.
#[derive(Debug, Clone)]
pub struct Executable {
    pub name: String,
    pub path: PathBuf,
}

/// The cached static part: rebuilt only when busybox or its layout changes.
pub fn static_archive(vm_dir: &Path) -> Result<PathBuf> {
    let archive = vm_dir.join("static.cpio");
    let stamp_path = vm_dir.join("static.stamp");
    let meta = fs::metadata(BUSYBOX)
        .with_context(|| format!("no {BUSYBOX}: install busybox-static (cargo xtask setup)"))?;
    let stamp = format!("{STATIC_FORMAT} {} {}", meta.len(), meta.mtime());
    if archive.is_file() && fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str())
    {
        return Ok(archive);
    }
    let applets = cmd::stdout(Command::new(BUSYBOX).arg("--list-full"))?;
    let mut c = Cpio::new(create(&archive)?, 1);
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "root", "mnt",
    ] {
        c.dir(d)?;
    }
    c.dir_mode("tmp", 0o1777)?;
    c.dir_mode("var/tmp", 0o1777)?;
    c.char_dev("dev/console", 0o600, 5, 1)?;
    c.char_dev("dev/null", 0o666, 1, 3)?;
    c.file_from("bin/busybox", 0o755, Path::new(BUSYBOX))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet != "bin/busybox" {
            c.symlink(applet, "/bin/busybox")?;
        }
    }
    c.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    c.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    c.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n")?;
    c.finish()?;
    fs::write(&stamp_path, stamp)
        .with_context(|| format!("cannot write {}", stamp_path.display()))?;
    Ok(archive)
}

/// The per-run payload: tests under /tests, programs (the daemon, test
/// helpers) under /bin, all without debug info (the VM has 1 GiB; symbols
/// stay, so backtraces keep function names), their shared libraries at the
/// paths `ldd` names, and the policy tree at /policies (the tests find it
/// through AGENTGUARD_POLICY_DIR).
pub fn payload_archive(
    vm_dir: &Path,
    tests: &[Executable],
    programs: &[Executable],
    policies: &Path,
) -> Result<PathBuf> {
    let archive = vm_dir.join("payload.cpio");
    let stripped_dir = vm_dir.join("stripped");
    fs::create_dir_all(&stripped_dir)
        .with_context(|| format!("cannot create {}", stripped_dir.display()))?;
    let mut c = Cpio::new(create(&archive)?, 100_000);
    let mut libs = BTreeSet::new();
    let placed = tests
        .iter()
        .map(|t| ("tests", t))
        .chain(programs.iter().map(|p| ("bin", p)));
    for (dir, exe) in placed {
        let small = stripped(&exe.path, &stripped_dir.join(format!("{dir}-{}", exe.name)));
        c.file_from(&format!("{dir}/{}", exe.name), 0o755, &small)?;
        libs.extend(shared_libraries(&exe.path)?);
    }
    for lib in &libs {
        c.file_from(&lib.to_string_lossy(), 0o755, lib)?;
    }
    if policies.is_dir() {
        add_tree(&mut c, policies, Path::new("policies"))?;
    }
    c.finish()?;
    Ok(archive)
}

/// One initrd for a kernel: static + payload + an archive with `/init`.
pub fn assemble(out: &Path, parts: &[&Path], init_script: &str) -> Result<()> {
    let mut w = create(out)?;
    for part in parts {
        let mut f = File::open(part).with_context(|| format!("cannot open {}", part.display()))?;
        io::copy(&mut f, &mut w)
            .with_context(|| format!("cannot append {} to {}", part.display(), out.display()))?;
    }
    let mut c = Cpio::new(w, 900_000);
    c.file("init", 0o755, init_script.as_bytes())?;
    c.finish()?;
    Ok(())
}

/// `strip --strip-debug` of `src` at `dest`; `src` itself if that fails.
fn stripped(src: &Path, dest: &Path) -> PathBuf {
    let out = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(dest)
        .arg(src)
        .output();
    match out {
        Ok(o) if o.status.success() => dest.to_path_buf(),
        Ok(o) => {
            eprintln!(
                "xtask: vm: warning: strip --strip-debug {} failed ({}); using it unstripped",
                src.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
            src.to_path_buf()
        }
        Err(e) => {
            eprintln!(
                "xtask: vm: warning: cannot run strip ({e}); using {} unstripped",
                src.display()
            );
            src.to_path_buf()
        }
    }
}

fn create(path: &Path) -> Result<BufWriter<File>> {
    let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(BufWriter::with_capacity(1 << 20, f))
}

/// `dir` and everything below it, at `at` in the image.
fn add_tree(c: &mut Cpio<BufWriter<File>>, dir: &Path, at: &Path) -> Result<()> {
    c.dir(&at.to_string_lossy())?;
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .collect::<io::Result<_>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let inside = at.join(e.file_name());
        if path.is_dir() {
            add_tree(c, &path, &inside)?;
        } else if path.is_file() {
            c.file_from(&inside.to_string_lossy(), 0o644, &path)?;
        }
    }
    Ok(())
}

/// The shared libraries (and dynamic loader) `ldd` lists for `binary`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = cmd::output(Command::new("ldd").arg(binary))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
            || text.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", binary.display()))
}

/// Paths in `ldd` output; an unresolved library is an error.
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        let path_part = match line.split_once("=>") {
            Some((name, rest)) => {
                if rest.trim().starts_with("not found") {
                    bail!("library {} not found", name.trim());
                }
                rest
            }
            None => line,
        };
        if let Some(p) = path_part
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out).expect("parses"),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }
}
