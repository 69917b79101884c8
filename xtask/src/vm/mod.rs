//! Integration tests inside qemu VMs booting the Debian cloud kernels (real
//! BPF-LSM). One VM per kernel, one after the other; all test binaries run
//! serially inside. Console logs land in `build/vm/<label>/console.log`.

mod console;
mod cpio;
mod init;
mod initramfs;
mod qemu;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use self::console::Console;
pub use self::initramfs::Executable;
use crate::{
    kernels,
    libtest::{self, Exit},
    repo,
    report::{EnvResults, Outcome},
};

/// The parts every VM of this run shares: the static and payload archives.
pub struct Prepared {
    parts: [PathBuf; 2],
    names: Vec<String>,
}

fn vm_dir(root: &Path) -> PathBuf {
    repo::build_dir(root).join("vm")
}

/// Build the shared archives once per `cargo xtask test`. `programs` go to
/// `/bin` (they must include `agentguard`), `tests` to `/tests`.
pub fn prepare(root: &Path, tests: &[Executable], programs: &[Executable]) -> Result<Prepared> {
    let dir = vm_dir(root);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for t in tests.iter().chain(programs) {
        if !t
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        {
            bail!(
                "executable name {:?} is not safe to use as a file name in the VM",
                t.name
            );
        }
    }
    if !programs.iter().any(|p| p.name == "agentguard") {
        bail!("cargo built no `agentguard` program, so the VM would have no /bin/agentguard");
    }
    let start = Instant::now();
    let static_part =
        initramfs::static_archive(&dir).context("cannot build the static initramfs")?;
    let payload = initramfs::payload_archive(&dir, tests, programs, &repo::policies(root))
        .context("cannot build the initramfs payload (test binaries and libraries)")?;
    let size = fs::metadata(&payload).map(|m| m.len()).unwrap_or(0);
    println!(
        "xtask: vm: initramfs payload {} MiB built in {:.1} s",
        size >> 20,
        start.elapsed().as_secs_f64()
    );
    Ok(Prepared {
        parts: [static_part, payload],
        names: tests.iter().map(|t| t.name.clone()).collect(),
    })
}

/// Boot the kernel `label`, run every test binary, count the outcomes.
/// The tests' VMs have two vCPUs (agents and the daemon run side by side);
/// the benchmark's has one ([`BENCH_CPUS`]).
pub const TEST_CPUS: u32 = 2;

/// One vCPU for the benchmark. Under single-threaded TCG the vCPUs take
/// turns on one host thread, so a clock read inside one vCPU (the kernel's
/// account of a program's run time, bench B1) also counts the other's
/// turns whenever it is busy: a freshly started daemon made the same hit
/// path of the file programs account 9 µs per run in the bench against 4 µs
/// in a quiet VM (session 18). With one vCPU a program's run time is its
/// own instructions.
pub const BENCH_CPUS: u32 = 1;

pub fn run(root: &Path, label: &str, prepared: &Prepared, timeout: Duration, cpus: u32) -> Result<EnvResults> {
    let env = format!("vm-{label}");
    let kernel = kernels::vmlinuz(root, label);
    if !kernel.is_file() {
        bail!("no kernel at {}: run `cargo xtask setup`", kernel.display());
    }
    let dir = vm_dir(root).join(label);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let initrd = dir.join("initrd.cpio");
    let parts: Vec<&Path> = prepared.parts.iter().map(PathBuf::as_path).collect();
    initramfs::assemble(&initrd, &parts, &init::script(label, &prepared.names))
        .with_context(|| format!("cannot assemble {}", initrd.display()))?;

    let log_path = dir.join("console.log");
    println!(
        "xtask: {env}: booting {} (timeout {} s)",
        kernel.display(),
        timeout.as_secs()
    );
    let mut boot = qemu::boot(&kernel, &initrd, &log_path, timeout, &format!("[{env}] "), cpus)?;
    let mut retried = None;
    if let Some(panic) = panic_before_any_test(&boot) {
        // Seen under TCG (int3 in sched_clock while the kernel patches its
        // own text at boot): nothing was tested, so the boot is not a
        // result. Once, and said in the notes; a second panic counts.
        println!("xtask: {env}: the kernel panicked while booting, before any test began ({panic}); booting again");
        let first = dir.join("console-panic.log");
        let _ = fs::copy(&log_path, &first);
        retried = Some(format!(
            "the first boot panicked before any test began ({panic}; console log {}); booted again",
            first.display()
        ));
        boot = qemu::boot(&kernel, &initrd, &log_path, timeout, &format!("[{env}] "), cpus)?;
    }
    let console = console::parse(&boot.log);
    let stopped = match (&boot.status, boot.timed_out) {
        (_, true) => format!(
            "the VM timed out after {} s and was killed",
            timeout.as_secs()
        ),
        (Some(s), false) => format!(
            "the VM stopped early (qemu {s}); see {}",
            log_path.display()
        ),
        (None, false) => "the VM stopped early".to_owned(),
    };
    let mut outcomes = outcomes(&env, &console, &prepared.names, boot.timed_out, &stopped);
    if !boot.qemu_stderr.trim().is_empty() {
        eprintln!("[{env}] qemu: {}", boot.qemu_stderr.trim());
        if console.runs.is_empty() && outcomes.is_empty() {
            outcomes.push(Outcome::binary_failure(
                &env,
                format!("qemu: {}", boot.qemu_stderr.trim()),
            ));
        }
    }
    let mut notes = vec![
        format!(
            "kernel {}",
            console.kernel.as_deref().unwrap_or("(not reported)")
        ),
        format!(
            "LSMs {}",
            console.lsm.as_deref().unwrap_or("(not reported)")
        ),
        format!(
            "VM ran {:.0} s ({}); console log {}",
            boot.elapsed.as_secs_f64(),
            timeline(&boot.marks),
            log_path.display()
        ),
    ];
    if console
        .lsm
        .as_deref()
        .is_some_and(|l| !l.split(',').any(|m| m == "bpf"))
    {
        notes.push("BPF-LSM is NOT active in this VM".to_owned());
    }
    notes.extend(retried);
    notes.extend(console.warnings.iter().map(|w| format!("init: {w}")));
    if !console.kmsg.is_empty() {
        notes.push(format!(
            "{} kernel warnings (@@AG KMSG lines in the console log)",
            console.kmsg.len()
        ));
    }
    Ok(EnvResults {
        env,
        outcomes,
        notes,
    })
}

/// The kernel's panic line when the VM died of a kernel panic before any
/// test binary began (no `@@AG BEGIN` marker arrived), and not for its time
/// limit.
fn panic_before_any_test(boot: &qemu::Boot) -> Option<String> {
    if boot.timed_out || !boot.marks.is_empty() {
        return None;
    }
    let line = boot.log.lines().find(|l| l.contains("Kernel panic - not syncing"))?;
    Some(line.split_once("] ").map_or(line, |(_, rest)| rest).trim().to_owned())
}

/// `boot 3.2 s, files 15.0 s, net 40.1 s` from the BEGIN/END arrival times.
fn timeline(marks: &[(Duration, String)]) -> String {
    let mut parts = Vec::new();
    let mut begun: Option<(Duration, &str)> = None;
    for (at, mark) in marks {
        let mut words = mark.split_whitespace().skip(1);
        match (words.next(), words.next()) {
            (Some("BEGIN"), Some(name)) => {
                if parts.is_empty() && begun.is_none() {
                    parts.push(format!("boot {:.1} s", at.as_secs_f64()));
                }
                begun = Some((*at, name));
            }
            (Some("END"), Some(name)) => {
                if let Some((from, n)) = begun.take().filter(|(_, n)| *n == name) {
                    parts.push(format!("{n} {:.1} s", (*at - from).as_secs_f64()));
                }
            }
            _ => {}
        }
    }
    if parts.is_empty() {
        "no test began".to_owned()
    } else {
        parts.join(", ")
    }
}

/// Outcomes of every expected binary from the console: a binary without its
/// END marker is a failure, one that never began is a failure, and a VM that
/// timed out after all of them ended is a failure too.
fn outcomes(
    env: &str,
    console: &Console,
    names: &[String],
    timed_out: bool,
    stopped: &str,
) -> Vec<Outcome> {
    let mut out = Vec::new();
    let mut all_ended = true;
    for name in names {
        match console.runs.iter().find(|r| &r.name == name) {
            Some(run) => {
                let exit = match run.exit {
                    Some(code) => Exit::Code(code),
                    None => {
                        all_ended = false;
                        Exit::Unfinished(stopped.to_owned())
                    }
                };
                out.extend(libtest::outcomes(name, &run.output, &exit, &run.skips));
            }
            None => {
                all_ended = false;
                out.push(Outcome::binary_failure(
                    name,
                    format!("did not run: {stopped}"),
                ));
            }
        }
    }
    if timed_out && all_ended {
        out.push(Outcome::binary_failure(
            env,
            format!("{stopped} (after all tests ended)"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Counts, Status};

    #[test]
    fn missing_end_markers_fail() {
        let log = "@@AG BEGIN files\ntest a ... ok\n@@AG SKIPS-BEGIN files\n\
                   {\"test\":\"a\",\"reason\":\"no lsm\"}\n@@AG SKIPS-END files\n@@AG END files 0\n\
                   @@AG BEGIN net\ntest b ... ok\ntest c ... ";
        let c = console::parse(log);
        let names = ["files", "net", "exec"].map(String::from);
        let o = outcomes("vm-6.1", &c, &names, true, "timed out");
        assert_eq!(
            Counts::of(&o),
            Counts {
                passed: 1,
                failed: 2,
                skipped: 1
            }
        );
        assert_eq!(o[0].status, Status::Skipped);
        assert_eq!(o[2].name(), "net");
        assert!(o[2]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("it was running c")));
        assert_eq!(o[3].name(), "exec");
    }

    fn boot_of(log: &str, marks: &[&str], timed_out: bool) -> qemu::Boot {
        qemu::Boot {
            log: log.to_owned(),
            timed_out,
            status: None,
            qemu_stderr: String::new(),
            elapsed: Duration::from_secs(7),
            marks: marks.iter().map(|m| (Duration::from_secs(3), (*m).to_owned())).collect(),
        }
    }

    #[test]
    fn only_a_panic_before_any_test_is_booted_again() {
        let panic = "[    2.83] Oops: int3: 0000 [#2] PREEMPT SMP NOPTI\n[    2.833146] Kernel panic - not syncing: Fatal exception in interrupt\n";
        assert_eq!(
            panic_before_any_test(&boot_of(panic, &[], false)).as_deref(),
            Some("Kernel panic - not syncing: Fatal exception in interrupt")
        );
        // A panic once tests ran is a result: the tests that were running fail.
        let during = format!("@@AG BEGIN files\n{panic}");
        assert_eq!(panic_before_any_test(&boot_of(&during, &["@@AG BEGIN files"], false)), None);
        // So is a VM that ran out of time, and one that stopped without a panic.
        assert_eq!(panic_before_any_test(&boot_of(panic, &[], true)), None);
        assert_eq!(panic_before_any_test(&boot_of("[    1.0] reboot: Power down\n", &[], false)), None);
    }

    #[test]
    fn timeline_from_marks() {
        let marks = [
            (Duration::from_millis(3200), "@@AG BEGIN files".to_owned()),
            (Duration::from_millis(18200), "@@AG END files 0".to_owned()),
            (Duration::from_millis(18300), "@@AG BEGIN net".to_owned()),
        ];
        assert_eq!(timeline(&marks), "boot 3.2 s, files 15.0 s");
        assert_eq!(timeline(&[]), "no test began");
    }

    #[test]
    fn timeout_after_all_ended_is_one_failure() {
        let c = console::parse("@@AG BEGIN files\ntest a ... ok\n@@AG END files 0\n");
        let o = outcomes("vm-6.12", &c, &["files".to_owned()], true, "timed out");
        assert_eq!(
            Counts::of(&o),
            Counts {
                passed: 1,
                failed: 1,
                skipped: 0
            }
        );
        assert_eq!(o[1].name(), "vm-6.12");
    }
}
