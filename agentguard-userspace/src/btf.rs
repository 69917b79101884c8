//! A small reader of the kernel's BTF (/sys/kernel/btf/vmlinux): enough to
//! find a struct by name, a member's byte offset (through anonymous struct
//! and union members), and whether a function exists. The file programs get
//! no CO-RE relocations (aya's Rust programs have none), so the loader
//! computes the offsets they need here and hands them over as a read-only
//! global ([`agentguard_common::KernelOffsets`]).
//!
//! aya-obj parses BTF too, but keeps member lists crate-private.
//! Format: Documentation/bpf/btf.rst (header, type section, string section).
use std::{collections::HashMap, path::Path};

use agentguard_common::KernelOffsets;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("not BTF: {0}")]
    Format(String),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("kernel BTF: {strukt}.{member} is a bitfield or not byte-aligned")]
    Unaligned { strukt: String, member: String },
}

const MAGIC: u16 = 0xeb9f;

// Kinds (include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Bit offset; with `kind_flag`, the low 24 bits (top 8: bitfield size).
    offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// Referenced type for typedef/const/volatile/func/... .
    type_id: u32,
    /// Members, parameters or values.
    vlen: u32,
    members: Vec<Member>,
}

/// Parsed BTF: types by id (id 0 is `void`), names by string offset.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<(u32, String), Vec<u32>>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| BtfError::Format(format!("truncated at byte {at}")))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|e| BtfError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&data)
    }

    /// Parse a little-endian BTF blob.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Format("bad magic (big-endian BTF is not supported)".into()));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_bytes = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or_else(|| BtfError::Format("type section out of bounds".into()))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| BtfError::Format("string section out of bounds".into()))?
            .to_vec();

        let mut types = vec![Type { name_off: 0, kind: 0, kind_flag: false, type_id: 0, vlen: 0, members: Vec::new() }];
        let mut at = 0;
        while at < types_bytes.len() {
            let name_off = u32_at(types_bytes, at)?;
            let info = u32_at(types_bytes, at + 4)?;
            let size_or_type = u32_at(types_bytes, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        members.push(Member {
                            name_off: u32_at(types_bytes, m)?,
                            type_id: u32_at(types_bytes, m + 4)?,
                            offset: u32_at(types_bytes, m + 8)?,
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                0..=19 => 0,
                other => return Err(BtfError::Format(format!("unknown BTF kind {other}"))),
            };
            // An array keeps its element type and its length instead.
            let (type_id, vlen) = if kind == KIND_ARRAY {
                (u32_at(types_bytes, at)?, u32_at(types_bytes, at + 8)?)
            } else {
                (size_or_type, vlen as u32)
            };
            at += extra;
            types.push(Type { name_off, kind, kind_flag, type_id, vlen, members });
        }
        let mut btf = Self { types, strings, by_name: HashMap::new() };
        for (id, t) in btf.types.iter().enumerate().skip(1) {
            if t.name_off != 0 {
                let name = btf.name(t.name_off).to_owned();
                btf.by_name.entry((t.kind, name)).or_default().push(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let start = off as usize;
        let Some(rest) = self.strings.get(start..) else { return "" };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Whether the kernel has a function of this name (e.g. an LSM hook's
    /// `bpf_lsm_<hook>` attach point).
    pub fn has_func(&self, name: &str) -> bool {
        self.by_name.contains_key(&(KIND_FUNC, name.to_owned()))
    }

    /// How many parameters the function `name` takes, if it exists.
    pub fn func_params(&self, name: &str) -> Option<usize> {
        let id = *self.by_name.get(&(KIND_FUNC, name.to_owned()))?.first()?;
        let proto = self.types.get(self.types.get(id as usize)?.type_id as usize)?;
        (proto.kind == KIND_FUNC_PROTO).then_some(proto.vlen as usize)
    }

    /// Follow typedef / const / volatile / restrict / type tags.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t) if matches!(t.kind, KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG) => id = t.type_id,
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `member` in `struct strukt`, looking through
    /// anonymous struct and union members.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let ids = self
            .by_name
            .get(&(KIND_STRUCT, strukt.to_owned()))
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        // Some kernels carry a forward-declared duplicate; take the first with members.
        for &id in ids {
            if let Some(bits) = self.find_bits(id, member, 0) {
                if bits % 8 != 0 {
                    return Err(BtfError::Unaligned { strukt: strukt.to_owned(), member: member.to_owned() });
                }
                return Ok(bits / 8);
            }
        }
        Err(BtfError::NoMember { strukt: strukt.to_owned(), member: member.to_owned() })
    }

    fn find_bits(&self, id: u32, member: &str, base: u32) -> Option<u32> {
        let t = self.types.get(id as usize)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for m in &t.members {
            let bits = if t.kind_flag { m.offset & 0x00ff_ffff } else { m.offset };
            if m.name_off == 0 {
                if let Some(found) = self.find_bits(self.resolve(m.type_id), member, base + bits) {
                    return Some(found);
                }
            } else if self.name(m.name_off) == member {
                if t.kind_flag && m.offset >> 24 != 0 {
                    return None;
                }
                return Some(base + bits);
            }
        }
        None
    }

    /// Offset of a dotted member path (`d_name.name`): each step must be an
    /// embedded struct, not a pointer.
    pub fn path_offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut current = strukt.to_owned();
        let mut total = 0;
        let steps: Vec<&str> = path.split('.').collect();
        for (i, step) in steps.iter().enumerate() {
            total += self.member_offset(&current, step)?;
            if i + 1 < steps.len() {
                current = self.member_struct_name(&current, step)?;
            }
        }
        Ok(total)
    }

    fn member_struct_name(&self, strukt: &str, member: &str) -> Result<String, BtfError> {
        let no = || BtfError::NoMember { strukt: strukt.to_owned(), member: member.to_owned() };
        let ids = self.by_name.get(&(KIND_STRUCT, strukt.to_owned())).ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        for &id in ids {
            if let Some(type_id) = self.find_member_type(id, member) {
                let t = self.types.get(self.resolve(type_id) as usize).ok_or_else(no)?;
                return Ok(self.name(t.name_off).to_owned());
            }
        }
        Err(no())
    }

    fn find_member_type(&self, id: u32, member: &str) -> Option<u32> {
        let t = self.types.get(id as usize)?;
        for m in &t.members {
            if m.name_off == 0 {
                if let Some(found) = self.find_member_type(self.resolve(m.type_id), member) {
                    return Some(found);
                }
            } else if self.name(m.name_off) == member {
                return Some(m.type_id);
            }
        }
        None
    }

    /// The length of the array `member` of `struct strukt`.
    pub fn member_array_len(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let no = || BtfError::NoMember { strukt: strukt.to_owned(), member: member.to_owned() };
        let ids = self.by_name.get(&(KIND_STRUCT, strukt.to_owned())).ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        for &id in ids {
            if let Some(type_id) = self.find_member_type(id, member) {
                let t = self.types.get(self.resolve(type_id) as usize).ok_or_else(no)?;
                return if t.kind == KIND_ARRAY { Ok(t.vlen) } else { Err(no()) };
            }
        }
        Err(no())
    }

    /// Every offset the file programs need. `syscall_args`/`syscall_ret`
    /// come from tracefs and are filled in by the loader.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let o = |s: &str, m: &str| self.path_offset(s, m);
        // 6.1 names the link count `__i_nlink` inside an anonymous union with
        // the const `i_nlink`; both live at the same offset.
        let inode_nlink = o("inode", "__i_nlink").or_else(|_| o("inode", "i_nlink"))?;
        Ok(KernelOffsets {
            path_mnt: o("path", "mnt")?,
            path_dentry: o("path", "dentry")?,
            dentry_parent: o("dentry", "d_parent")?,
            dentry_name: o("dentry", "d_name.name")?,
            dentry_inode: o("dentry", "d_inode")?,
            vfsmount_root: o("vfsmount", "mnt_root")?,
            mount_mnt: o("mount", "mnt")?,
            mount_parent: o("mount", "mnt_parent")?,
            mount_mountpoint: o("mount", "mnt_mountpoint")?,
            file_path: o("file", "f_path")?,
            file_mode: o("file", "f_mode")?,
            inode_mode: o("inode", "i_mode")?,
            inode_nlink,
            inode_ino: o("inode", "i_ino")?,
            inode_sb: o("inode", "i_sb")?,
            sb_dev: o("super_block", "s_dev")?,
            task_fs: o("task_struct", "fs")?,
            fs_pwd: o("fs_struct", "pwd")?,
            task_files: o("task_struct", "files")?,
            files_fdt: o("files_struct", "fdt")?,
            fdt_max_fds: o("fdtable", "max_fds")?,
            fdt_fd: o("fdtable", "fd")?,
            syscall_args: 0,
            syscall_ret: 0,
            // The directory cache's (dircache.rs): without them it stays
            // off, and everything else works as before. 6.14 renamed the
            // inline name (a union in `d_shortname`).
            dentry_iname: o("dentry", "d_iname").unwrap_or(0),
            dentry_iname_len: self.member_array_len("dentry", "d_iname").unwrap_or(0),
            inode_generation: o("inode", "i_generation").unwrap_or(0),
            renamedata_old: o("renamedata", "old_dentry").unwrap_or(0),
            renamedata_new: o("renamedata", "new_dentry").unwrap_or(0),
            pad: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Build a BTF blob: `struct qstr { union { u64 hash_len; }; const char *name; }`,
    /// `struct dentry { u32 flags; struct qstr d_name; }`, and a FUNC.
    fn blob() -> Vec<u8> {
        let mut strings = b"\0qstr\0hash_len\0name\0dentry\0flags\0d_name\0bpf_lsm_path_unlink\0u64\0".to_vec();
        let off = |s: &str, strings: &[u8]| -> u32 {
            let needle = format!("\0{s}\0");
            strings.windows(needle.len()).position(|w| w == needle.as_bytes()).expect("string") as u32 + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        let s = strings.clone();
        // 1: int u64 (size 8).
        push(&[off("u64", &s), KIND_INT << 24, 8, 64]);
        // 2: anonymous union { u64 hash_len; } size 8.
        push(&[0, (KIND_UNION << 24) | 1, 8, off("hash_len", &s), 1, 0]);
        // 3: const (name type) -> void* stand-in: int.
        push(&[0, KIND_CONST << 24, 1]);
        // 4: struct qstr { union; name at bit 64 } size 16.
        push(&[off("qstr", &s), (KIND_STRUCT << 24) | 2, 16, 0, 2, 0, off("name", &s), 3, 64]);
        // 5: struct dentry { flags at 0; d_name at bit 64 } size 24.
        push(&[off("dentry", &s), (KIND_STRUCT << 24) | 2, 24, off("flags", &s), 1, 0, off("d_name", &s), 4, 64]);
        // 6: func proto, 7: func.
        push(&[0, KIND_FUNC_PROTO << 24, 0]);
        push(&[off("bpf_lsm_path_unlink", &s), KIND_FUNC << 24, 6]);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.append(&mut strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_embedded_structs() {
        let btf = Btf::parse(&blob()).expect("parses");
        assert_eq!(btf.member_offset("qstr", "hash_len"), Ok(0));
        assert_eq!(btf.member_offset("qstr", "name"), Ok(8));
        assert_eq!(btf.path_offset("dentry", "d_name.name"), Ok(16));
        assert!(btf.has_func("bpf_lsm_path_unlink"));
        assert!(!btf.has_func("bpf_lsm_file_truncate"));
        assert_eq!(btf.func_params("bpf_lsm_path_unlink"), Some(0));
        assert!(matches!(btf.member_offset("dentry", "d_nope"), Err(BtfError::NoMember { .. })));
        assert!(matches!(btf.member_offset("inode", "i_ino"), Err(BtfError::NoStruct(_))));
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(matches!(Btf::parse(b"definitely not btf at all!!"), Err(BtfError::Format(_))));
    }

    #[test]
    fn reads_this_kernels_btf_when_present() {
        let Ok(btf) = Btf::from_sys_fs() else { return };
        let o = btf.kernel_offsets().expect("every member the file programs need exists");
        assert_eq!(o.path_mnt, 0, "struct path starts with mnt on every kernel we know");
        assert!(o.dentry_name > o.dentry_parent);
    }
}
