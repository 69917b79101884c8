//! Calibrating this kernel's FMODE_CREATED bit, which the file fallback
//! needs to tell an open with O_CREAT|O_TRUNC that created a file (nothing
//! lost) from one that truncated an existing file. It is a macro, absent
//! from BTF, and its value moved between kernels (0x100000 up to 6.x, then
//! `1 << 21` after the FMODE reshuffle), so it is measured rather than
//! assumed: a calibration program on sys_exit_openat records the `f_mode`
//! of two opens by this thread, one that creates a file and one that
//! truncates it; the only bit that differs is FMODE_CREATED. The tracepoint
//! is attached for the two opens only.
use std::{io, path::PathBuf};

use agentguard_common::{maps, programs, HookFlag};
use aya::{maps::Array, programs::TracePoint, Ebpf};
use thiserror::Error;

use crate::loader::set_hook_flag;

#[derive(Debug, Error)]
pub enum CalibrateError {
    #[error("calibration program: {0}")]
    Program(String),
    #[error("calibration file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the two opens differ in f_mode bits {0:#x}, not in exactly one bit")]
    Ambiguous(u32),
}

fn hook_flag(ebpf: &Ebpf, flag: HookFlag) -> Result<u32, CalibrateError> {
    let map = ebpf.map(maps::HOOKS).ok_or_else(|| CalibrateError::Program(format!("map {} missing", maps::HOOKS)))?;
    let arr: Array<_, u32> = Array::try_from(map).map_err(|e| CalibrateError::Program(e.to_string()))?;
    arr.get(&(flag as u32), 0).map_err(|e| CalibrateError::Program(e.to_string()))
}

/// Measure FMODE_CREATED and store it in the hooks map; returns the bit.
pub fn calibrate(ebpf: &mut Ebpf) -> Result<u32, CalibrateError> {
    let dir = std::env::temp_dir().join(format!("agentguard-fmode-{}", std::process::id()));
    let io_err = |path: &PathBuf| {
        let path = path.clone();
        move |source| CalibrateError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let file = dir.join("probe");
    let result = measure(ebpf, &file);
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_dir(&dir);
    let (created, existing) = result?;
    let bit = created & !existing;
    if bit.count_ones() != 1 {
        return Err(CalibrateError::Ambiguous(bit));
    }
    set_hook_flag(ebpf, HookFlag::FmodeCreated, bit).map_err(CalibrateError::Program)?;
    Ok(bit)
}

fn measure(ebpf: &mut Ebpf, file: &PathBuf) -> Result<(u32, u32), CalibrateError> {
    let prog: &mut TracePoint = ebpf
        .program_mut(programs::OBS_CALIBRATE)
        .ok_or_else(|| CalibrateError::Program(format!("no program {}", programs::OBS_CALIBRATE)))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| CalibrateError::Program(e.to_string()))?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| CalibrateError::Program(e.to_string()))?;
    }
    let link = prog.attach("syscalls", "sys_exit_openat").map_err(|e| CalibrateError::Program(e.to_string()))?;
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    let open = || std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(file);
    let run = |ebpf: &mut Ebpf| -> Result<(u32, u32), CalibrateError> {
        set_hook_flag(ebpf, HookFlag::CalibrateTid, tid).map_err(CalibrateError::Program)?;
        drop(open().map_err(|source| CalibrateError::Io { path: file.clone(), source })?);
        let created = hook_flag(ebpf, HookFlag::CalibrateMode)?;
        drop(open().map_err(|source| CalibrateError::Io { path: file.clone(), source })?);
        let existing = hook_flag(ebpf, HookFlag::CalibrateMode)?;
        Ok((created, existing))
    };
    let result = run(ebpf);
    let _ = set_hook_flag(ebpf, HookFlag::CalibrateTid, 0);
    if let Some(Ok(tp)) = ebpf.program_mut(programs::OBS_CALIBRATE).map(<&mut TracePoint>::try_from) {
        let _ = tp.detach(link);
    }
    result
}
