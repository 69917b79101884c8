//! Reading kernel structs whose layout differs between kernels. The member
//! offsets come from the running kernel's BTF, computed by the loader
//! (agentguard-userspace/src/btf.rs) and written into [`KERNEL_OFFSETS`]
//! before load; aya's Rust programs get no CO-RE relocations, so nothing
//! here hard-codes an offset. Every read goes through
//! `bpf_probe_read_kernel`, which tolerates a bad pointer (it fails, and the
//! caller treats the path as unreadable).
use core::mem::MaybeUninit;

use agentguard_common::KernelOffsets;
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

/// A read-only global the loader overrides (like aya's `Global`, but read
/// one field at a time instead of copying the whole struct to the stack).
#[repr(transparent)]
pub struct RoGlobal<T>(pub MaybeUninit<T>);

// SAFETY: read-only after load; the kernel never writes .rodata.
unsafe impl<T> Sync for RoGlobal<T> {}

#[unsafe(no_mangle)]
pub static KERNEL_OFFSETS: RoGlobal<KernelOffsets> = RoGlobal(MaybeUninit::new(KernelOffsets {
    path_mnt: 0,
    path_dentry: 0,
    dentry_parent: 0,
    dentry_name: 0,
    dentry_inode: 0,
    vfsmount_root: 0,
    mount_mnt: 0,
    mount_parent: 0,
    mount_mountpoint: 0,
    file_path: 0,
    file_mode: 0,
    inode_mode: 0,
    inode_nlink: 0,
    inode_ino: 0,
    inode_sb: 0,
    sb_dev: 0,
    task_fs: 0,
    fs_pwd: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    syscall_args: 0,
    syscall_ret: 0,
    dentry_iname: 0,
    dentry_iname_len: 0,
    inode_generation: 0,
    renamedata_old: 0,
    renamedata_new: 0,
    pad: 0,
}));

/// One offset, read volatile so the compiler cannot fold the zeros above.
macro_rules! off {
    ($field:ident) => {
        $crate::kstructs::offset(
            // SAFETY: a field of a static that is always initialised.
            unsafe { core::ptr::addr_of!((*$crate::kstructs::KERNEL_OFFSETS.0.as_ptr()).$field) },
        )
    };
}
pub(crate) use off;

/// Read one offset field volatile, so the compiler cannot fold the zeros above.
#[inline(always)]
pub fn offset(field: *const u32) -> u64 {
    // SAFETY: `field` points into KERNEL_OFFSETS.
    (unsafe { core::ptr::read_volatile(field) }) as u64
}

#[inline(always)]
pub fn read_u64(addr: u64) -> Result<u64, ()> {
    // SAFETY: probe read of kernel memory; a bad address makes it fail.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.map_err(|_| ())
}

#[inline(always)]
pub fn read_u32(addr: u64) -> Result<u32, ()> {
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel(addr as *const u32) }.map_err(|_| ())
}

#[inline(always)]
pub fn read_u16(addr: u64) -> Result<u16, ()> {
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel(addr as *const u16) }.map_err(|_| ())
}

/// A pointer member; null is an error.
#[inline(always)]
pub fn read_ptr(addr: u64) -> Result<u64, ()> {
    match read_u64(addr)? {
        0 => Err(()),
        p => Ok(p),
    }
}

/// (vfsmount, dentry) of a `struct path` at `path`: one read when the
/// dentry follows the mount, as in every kernel's `struct path`.
#[inline(always)]
pub fn path_parts(path: u64) -> Result<(u64, u64), ()> {
    let (mnt, dentry) = (off!(path_mnt), off!(path_dentry));
    if dentry == mnt + 8 {
        let [m, d] = read_words::<2>(path + mnt)?;
        if m == 0 || d == 0 {
            return Err(());
        }
        return Ok((m, d));
    }
    Ok((read_ptr(path + mnt)?, read_ptr(path + dentry)?))
}

/// The current task's working directory (`current->fs->pwd`).
#[inline(always)]
pub fn cwd() -> Result<(u64, u64), ()> {
    // SAFETY: no preconditions; returns the current task_struct pointer.
    let task = unsafe { bpf_get_current_task() };
    let fs = read_ptr(task + off!(task_fs))?;
    path_parts(fs + off!(fs_pwd))
}

/// The `struct file *` behind the current task's descriptor `fd`.
#[inline(always)]
pub fn fd_file(fd: u64) -> Result<u64, ()> {
    // SAFETY: as above.
    let task = unsafe { bpf_get_current_task() };
    let files = read_ptr(task + off!(task_files))?;
    let fdt = read_ptr(files + off!(files_fdt))?;
    let max = read_u32(fdt + off!(fdt_max_fds))? as u64;
    if fd >= max {
        return Err(());
    }
    let array = read_ptr(fdt + off!(fdt_fd))?;
    read_ptr(array + fd * 8)
}

/// The inode of a dentry (0 for a negative dentry).
#[inline(always)]
pub fn dentry_inode(dentry: u64) -> u64 {
    read_u64(dentry + off!(dentry_inode)).unwrap_or(0)
}

const S_IFMT: u16 = 0o170_000;
const S_IFREG: u16 = 0o100_000;

/// (device, inode number) of a regular file that has more than one name,
/// or None. `dev` is the kernel's internal dev_t.
#[inline(always)]
pub fn multi_link_id(inode: u64) -> Option<(u32, u64)> {
    if inode == 0 {
        return None;
    }
    let mode = read_u16(inode + off!(inode_mode)).ok()?;
    if mode & S_IFMT != S_IFREG {
        return None;
    }
    let nlink = read_u32(inode + off!(inode_nlink)).ok()?;
    if nlink <= 1 {
        return None;
    }
    inode_id(inode)
}

/// (device, inode number) of any inode. `dev` is the kernel's internal dev_t.
#[inline(always)]
pub fn inode_id(inode: u64) -> Option<(u32, u64)> {
    let ino = read_u64(inode + off!(inode_ino)).ok()?;
    let sb = read_ptr(inode + off!(inode_sb)).ok()?;
    let dev = read_u32(sb + off!(sb_dev)).ok()?;
    Some((dev, ino))
}

/// `N` consecutive words at `addr`, in one read.
#[inline(always)]
fn read_words<const N: usize>(addr: u64) -> Result<[u64; N], ()> {
    // SAFETY: probe read of kernel memory; a bad address makes it fail.
    unsafe { bpf_probe_read_kernel(addr as *const [u64; N]) }.map_err(|_| ())
}

/// One step up from dentry `d`: `(d_parent, d_name.name)`. In every
/// kernel's `struct dentry` the `qstr d_name` follows `d_parent` (its
/// hash and length first, then the name pointer): one read when the
/// offsets say so, two otherwise. Each read is a helper call, whose cost
/// hardly depends on 8 or 24 bytes, and the walk makes one per level.
#[inline(always)]
pub fn dentry_up(d: u64) -> Result<(u64, u64), ()> {
    let (parent, name) = (off!(dentry_parent), off!(dentry_name));
    if name == parent + 16 {
        let w = read_words::<3>(d + parent)?;
        return Ok((w[0], w[2]));
    }
    Ok((read_u64(d + parent)?, read_u64(d + name)?))
}

/// One step up from dentry `d` for the self-protection walk:
/// `(d_parent, d_inode)`. `d_inode` follows the `qstr d_name` in every
/// kernel's `struct dentry` (so the name pointer's offset plus 8): one
/// 32-byte read when the offsets say so, two reads otherwise. A negative
/// dentry's inode is 0.
#[inline(always)]
pub fn dentry_parent_inode(d: u64) -> Result<(u64, u64), ()> {
    let (parent, name, inode) = (off!(dentry_parent), off!(dentry_name), off!(dentry_inode));
    if name == parent + 16 && inode == name + 8 {
        let w = read_words::<4>(d + parent)?;
        return Ok((w[0], w[3]));
    }
    Ok((read_u64(d + parent)?, read_u64(d + inode).unwrap_or(0)))
}

/// A mount's root dentry, parent and mountpoint: `(mnt.mnt_root,
/// mnt_parent, mnt_mountpoint)` (`mnt` is the `struct mount *`). In every
/// kernel's `struct mount` the parent, the mountpoint and the embedded
/// `struct vfsmount` (whose first member is the root) follow each other:
/// one read when the offsets say so, three otherwise. The root is not 0.
#[inline(always)]
pub fn mount_frame(mnt: u64) -> Result<(u64, u64, u64), ()> {
    let (parent, mountpoint, root) = (off!(mount_parent), off!(mount_mountpoint), off!(mount_mnt) + off!(vfsmount_root));
    if mountpoint == parent + 8 && root == parent + 16 {
        let [p, m, r] = read_words::<3>(mnt + parent)?;
        if r == 0 {
            return Err(());
        }
        return Ok((r, p, m));
    }
    Ok((read_ptr(mnt + root)?, read_u64(mnt + parent)?, read_u64(mnt + mountpoint)?))
}
