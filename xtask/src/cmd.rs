//! Running external programs with errors that say which command failed and how.

use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context as _, Result};

/// The command line as a user would type it (for messages).
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Run with inherited stdio; fail unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| {
        format!(
            "cannot start `{}`: is it installed and on PATH?",
            describe(cmd)
        )
    })?;
    if !status.success() {
        bail!(
            "`{}` failed ({status}); see its output above",
            describe(cmd)
        );
    }
    Ok(())
}

/// Run capturing stdout and stderr; the exit status is the caller's business.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null()).output().with_context(|| {
        format!(
            "cannot start `{}`: is it installed and on PATH?",
            describe(cmd)
        )
    })
}

/// Run capturing stdout; fail (showing stderr) unless it exits 0.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8 output", describe(cmd)))
}
