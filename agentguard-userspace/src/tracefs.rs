//! Tracepoint record layouts, read from this kernel's tracefs `format` files.
//!
//! The sched tracepoints change layout between kernels (6.1 has `char
//! comm[16]`, 6.18 `__data_loc char[] comm`), so the offsets the kernel
//! programs need are taken from the running kernel, never hard-coded.
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and could not be mounted at /sys/kernel/tracing ({0}); mount it with `mount -t tracefs tracefs /sys/kernel/tracing`"
    )]
    NotMounted(String),
    #[error("cannot read tracepoint format {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tracepoint format {path} has no field `{field}`")]
    MissingField { path: PathBuf, field: String },
}

/// Where tracefs is mounted, mounting it at /sys/kernel/tracing if needed.
pub fn tracefs_root() -> Result<PathBuf, TracefsError> {
    for candidate in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(candidate).join("events").is_dir() {
            return Ok(PathBuf::from(candidate));
        }
    }
    crate::mounts::ensure_mounted("tracefs", "/sys/kernel/tracing")
        .map_err(|e| TracefsError::NotMounted(e.to_string()))?;
    Ok(PathBuf::from("/sys/kernel/tracing"))
}

/// Byte offset of `field` in the record of tracepoint `category/name`.
pub fn field_offset(category: &str, name: &str, field: &str) -> Result<u32, TracefsError> {
    let path = tracefs_root()?
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::Read {
        path: path.clone(),
        source,
    })?;
    parse_offset(&text, field).ok_or_else(|| TracefsError::MissingField {
        path,
        field: field.to_owned(),
    })
}

/// Find `field:<type> <field>[...]; offset:N;` in a format file.
fn parse_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        // The declaration's last word, minus any array suffix, is the field name.
        let last = decl.split_whitespace().last()?;
        let fname = last.split('[').next()?;
        if fname != field {
            return None;
        }
        let offset = line.split(';').find_map(|p| p.trim().strip_prefix("offset:"))?;
        offset.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORK_618: &str = "name: sched_process_fork\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
    const FORK_61: &str = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";

    #[test]
    fn finds_offsets_in_both_layouts() {
        assert_eq!(parse_offset(FORK_618, "child_pid"), Some(20));
        assert_eq!(parse_offset(FORK_618, "parent_comm"), Some(8));
        assert_eq!(parse_offset(FORK_61, "child_pid"), Some(44));
        assert_eq!(parse_offset(FORK_61, "child_comm"), Some(28));
        assert_eq!(parse_offset(FORK_61, "pid"), None);
    }
}
