//! Running test executables on the host: unit tests as they are, integration
//! tests serially with the AGENTGUARD_* environment and a fresh skip file.
//! Their stdout is shown live and parsed; stderr goes straight through.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::{
    build::TestExe,
    libtest::{self, Exit},
    repo,
    report::Outcome,
};

/// Run a unit-test executable with libtest's defaults.
pub fn run_unit(exe: &TestExe) -> Vec<Outcome> {
    let label = exe.label();
    println!("xtask: host: unit tests {label} ({})", exe.path.display());
    match run_captured(exe, &["--color", "never"], &[]) {
        Ok((output, exit)) => libtest::outcomes(&label, &output, &exit, ""),
        Err(err) => vec![Outcome::binary_failure(
            &label,
            format!("could not run: {err:#}"),
        )],
    }
}

/// Run an integration-test executable against the host kernel.
pub fn run_integration(root: &Path, exe: &TestExe) -> Vec<Outcome> {
    let label = exe.label();
    println!(
        "xtask: host: integration tests {label} ({})",
        exe.path.display()
    );
    let result = (|| {
        let dir = repo::build_dir(root).join("host");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let skip_file = dir.join(format!("skips-{label}.jsonl"));
        if skip_file.exists() {
            fs::remove_file(&skip_file).with_context(|| {
                format!("cannot remove the old skip file {}", skip_file.display())
            })?;
        }
        let bin = repo::agentguard_bin(root);
        let env = [
            ("AGENTGUARD_BIN", bin.to_string_lossy().into_owned()),
            (
                "AGENTGUARD_SKIP_FILE",
                skip_file.to_string_lossy().into_owned(),
            ),
            ("AGENTGUARD_ENV", "host".to_owned()),
        ];
        let (output, exit) = run_captured(exe, &["--test-threads=1", "--color", "never"], &env)?;
        let skips = match fs::read_to_string(&skip_file) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", skip_file.display()))
            }
        };
        Ok::<_, anyhow::Error>((output, exit, skips))
    })();
    match result {
        Ok((output, exit, skips)) => libtest::outcomes(&label, &output, &exit, &skips),
        Err(err) => vec![Outcome::binary_failure(
            &label,
            format!("could not run: {err:#}"),
        )],
    }
}

/// Run in the package directory (as `cargo test` does), echo stdout live and return it.
fn run_captured(exe: &TestExe, args: &[&str], env: &[(&str, String)]) -> Result<(String, Exit)> {
    let mut cmd = Command::new(&exe.path);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("CARGO_MANIFEST_DIR", &exe.manifest_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if exe.manifest_dir.is_dir() {
        cmd.current_dir(&exe.manifest_dir);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", exe.path.display()))?;
    let stdout = child
        .stdout
        .take()
        .context("the test's stdout was not captured")?;
    let mut reader = BufReader::new(stdout);
    let mut all = String::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("cannot read the output of {}", exe.path.display()))?;
        if n == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&buf);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        all.push_str(&text);
    }
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for {}", exe.path.display()))?;
    let exit = match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(sig)) => Exit::Signal(sig),
        (None, None) => Exit::Unfinished(format!("unknown status {status}")),
    };
    Ok((all, exit))
}
