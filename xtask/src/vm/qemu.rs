//! Booting one VM under qemu (TCG: KVM cannot run a stock kernel here),
//! teeing its serial console to a log file and to our stdout, and killing it
//! when it exceeds its time limit.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read, Write as _},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::cmd;

pub struct Boot {
    /// The whole console output.
    pub log: String,
    pub timed_out: bool,
    pub status: Option<ExitStatus>,
    /// qemu's own messages (stderr).
    pub qemu_stderr: String,
    pub elapsed: Duration,
    /// When (since qemu started) each `@@AG BEGIN`/`END` marker line arrived.
    pub marks: Vec<(Duration, String)>,
}

pub fn boot(
    kernel: &Path,
    initrd: &Path,
    log_path: &Path,
    timeout: Duration,
    prefix: &str,
    cpus: u32,
) -> Result<Boot> {
    let mut qemu = Command::new("qemu-system-x86_64");
    // One host thread runs both vCPUs in turn. With a thread per vCPU the
    // kernel's own code patching (int3-based text_poke: static keys, BPF
    // trampolines) raced the other vCPU: an int3 panic at boot, and once a
    // NULL call in rcu_tasks during the network tests (6.12). A VM kept
    // about one core busy either way, so the time hardly changes (6.12:
    // network 197 s, doctor 66 s).
    qemu.args(["-accel", "tcg,thread=single", "-cpu", "max", "-m", "1024", "-smp"])
        .arg(cpus.to_string())
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = qemu.spawn().with_context(|| {
        format!(
            "cannot start `{}`: install qemu-system-x86 (cargo xtask setup)",
            cmd::describe(&qemu)
        )
    })?;
    let stdout = child
        .stdout
        .take()
        .context("qemu's stdout was not captured")?;
    let stderr = child
        .stderr
        .take()
        .context("qemu's stderr was not captured")?;
    let log_file =
        File::create(log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let prefix = prefix.to_owned();
    let console = thread::spawn(move || tee(stdout, log_file, &prefix, start));
    let errors = thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut s);
        s
    });

    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("cannot wait for qemu")? {
            break Some(status);
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let (log, marks) = console
        .join()
        .map_err(|_| anyhow::anyhow!("the console reader thread panicked"))?
        .with_context(|| format!("cannot record the console to {}", log_path.display()))?;
    let qemu_stderr = errors.join().unwrap_or_default();
    Ok(Boot {
        log,
        timed_out,
        status,
        qemu_stderr,
        elapsed: start.elapsed(),
        marks,
    })
}

/// Copy the console to `log` and to stdout (each line prefixed); return it
/// all, and when each BEGIN/END marker arrived.
fn tee(
    from: impl Read,
    mut log: File,
    prefix: &str,
    start: Instant,
) -> Result<(String, Vec<(Duration, String)>)> {
    let mut reader = BufReader::new(from);
    let mut all = String::new();
    let mut marks = Vec::new();
    let mut buf = Vec::new();
    let stdout = std::io::stdout();
    loop {
        buf.clear();
        if reader
            .read_until(b'\n', &mut buf)
            .context("cannot read qemu's console")?
            == 0
        {
            break;
        }
        log.write_all(&buf)
            .context("cannot write the console log")?;
        let line = String::from_utf8_lossy(&buf);
        let mut out = stdout.lock();
        let _ = writeln!(out, "{prefix}{}", line.trim_end_matches(['\r', '\n']));
        let _ = out.flush();
        if let Some(at) = line.find("@@AG BEGIN ").or_else(|| line.find("@@AG END ")) {
            marks.push((start.elapsed(), line[at..].trim().to_owned()));
        }
        all.push_str(&line);
    }
    Ok((all, marks))
}
