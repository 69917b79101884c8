//! A writer for the `newc` cpio format the kernel unpacks as an initramfs.
//! Written in Rust so files stream straight from `target/` (no staging copy),
//! entries are owned by root, and device nodes need no privileges.
//! Several archives may be concatenated into one initrd; the kernel unpacks
//! them in order.

use std::{
    collections::BTreeSet,
    fs::File,
    io::{self, Write},
    path::Path,
};

use anyhow::{bail, Context as _, Result};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

pub struct Cpio<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
    dirs: BTreeSet<String>,
}

impl<W: Write> Cpio<W> {
    /// `first_ino` keeps inode numbers distinct across concatenated archives.
    pub fn new(out: W, first_ino: u32) -> Self {
        Cpio {
            out,
            next_ino: first_ino,
            written: 0,
            dirs: BTreeSet::new(),
        }
    }

    /// A directory (and its missing parents), mode 0755 unless given.
    pub fn dir(&mut self, path: &str) -> Result<()> {
        self.dir_mode(path, 0o755)
    }

    pub fn dir_mode(&mut self, path: &str, mode: u32) -> Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.header(path, S_IFDIR | mode, 2, 0, 0)?;
        self.dirs.insert(path.to_owned());
        Ok(())
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        self.header(path, S_IFREG | mode, 1, data.len() as u64, 0)?;
        self.write(data)?;
        self.pad()
    }

    /// A regular file whose content is read from `src` (symlinks followed).
    pub fn file_from(&mut self, path: &str, mode: u32, src: &Path) -> Result<()> {
        let path = path.trim_matches('/');
        let mut f = File::open(src).with_context(|| format!("cannot open {}", src.display()))?;
        let len = f
            .metadata()
            .with_context(|| format!("cannot stat {}", src.display()))?
            .len();
        self.parents(path)?;
        self.header(path, S_IFREG | mode, 1, len, 0)?;
        let copied = io::copy(&mut f, &mut self.out)
            .with_context(|| format!("cannot copy {} into the initramfs", src.display()))?;
        if copied != len {
            bail!(
                "{} changed size while being archived ({len} → {copied} bytes)",
                src.display()
            );
        }
        self.written += copied;
        self.pad()
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        self.header(path, S_IFLNK | 0o777, 1, target.len() as u64, 0)?;
        self.write(target.as_bytes())?;
        self.pad()
    }

    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        self.header(path, S_IFCHR | mode, 1, 0, (major << 8) | minor)
    }

    /// Write the trailer and return the writer.
    pub fn finish(mut self) -> Result<W> {
        self.header("TRAILER!!!", 0, 1, 0, 0)?;
        self.out
            .flush()
            .context("cannot flush the initramfs archive")?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        Ok(())
    }

    /// `rdev` is (major << 8) | minor.
    fn header(&mut self, name: &str, mode: u32, nlink: u32, size: u64, rdev: u32) -> Result<()> {
        let size =
            u32::try_from(size).with_context(|| format!("{name} is too large for cpio newc"))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev >> 8,
            rdev & 0xff,
            namesize as u32,
            0,
        ];
        let mut h = String::from("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        self.write(h.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.out
            .write_all(data)
            .context("cannot write the initramfs archive")?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.write(&[0; 4][..4 - rem])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut c = Cpio::new(Vec::new(), 1);
        c.file("etc/hosts", 0o644, b"x").expect("write");
        let bytes = c.finish().expect("finish");
        let text = String::from_utf8_lossy(&bytes);
        // etc (dir, parent created first), etc/hosts, trailer.
        assert_eq!(text.matches("070701").count(), 3);
        assert!(text.starts_with("07070100000001000041ed"));
        assert_eq!(bytes.len() % 4, 0);
        let hosts = text.find("etc/hosts\0").expect("name present");
        // 110-byte header, then the name.
        assert_eq!(&text[hosts - 110..hosts - 104], "070701");
        assert_eq!(&text[hosts - 110 + 54..hosts - 110 + 62], "00000001"); // filesize
    }
}
