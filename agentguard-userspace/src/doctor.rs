//! `agentguard doctor`: what this kernel offers, and which mechanism
//! AgentGuard will use for each action class, with a remediation line for
//! anything missing. Listed is not loadable: BPF-LSM is probed by loading and
//! attaching a do-nothing program.
use std::{
    fs::File,
    path::{Path, PathBuf},
};

use agentguard_common::programs;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use serde::Serialize;

use crate::{loader, mounts};

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct ClassReport {
    pub class: &'static str,
    /// Whether the class is covered at all (possibly by a weaker mechanism).
    pub available: bool,
    /// True when the kernel refuses the action before it happens.
    pub veto: bool,
    pub mechanism: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remediation: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub checks: Vec<Check>,
    pub classes: Vec<ClassReport>,
    /// Whether `agentguard daemon` can run here.
    pub daemon_can_run: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blockers: Vec<String>,
}

/// Facts gathered before deciding on mechanisms.
#[derive(Debug)]
struct Facts {
    root: bool,
    btf: bool,
    bpffs: bool,
    securityfs: bool,
    lsm_list: Option<String>,
    cgroup2: Option<PathBuf>,
    cgroup_freeze: bool,
    cgroup_kill: bool,
    v1_freezer: Option<PathBuf>,
    object: Result<(), String>,
    tracepoints: Result<(), String>,
    sock_addr: Result<(), String>,
    lsm_loadable: Result<(), String>,
    /// The file fallback's programs verify (probed only without BPF-LSM).
    file_observation: Result<(), String>,
    ringbuf: bool,
    landlock_abi: Option<i64>,
}

pub fn run() -> Report {
    let facts = gather();
    report(&facts)
}

fn gather() -> Facts {
    let mut f = Facts {
        root: nix::unistd::geteuid().is_root(),
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        bpffs: false,
        securityfs: false,
        lsm_list: None,
        cgroup2: None,
        cgroup_freeze: false,
        cgroup_kill: false,
        v1_freezer: None,
        object: Err("not probed".into()),
        tracepoints: Err("not probed".into()),
        sock_addr: Err("not probed".into()),
        lsm_loadable: Err("not probed".into()),
        file_observation: Err("not probed".into()),
        ringbuf: false,
        landlock_abi: None,
    };
    if f.root {
        // Mount what systemd would have mounted; doctor and daemon agree.
        let _ = mounts::ensure_mounted("bpf", "/sys/fs/bpf");
        let _ = mounts::ensure_mounted("securityfs", "/sys/kernel/security");
    }
    f.bpffs = mounts::mounts().iter().any(|m| m.fstype == "bpf");
    f.securityfs = mounts::mounts().iter().any(|m| m.fstype == "securityfs");
    f.lsm_list = std::fs::read_to_string("/sys/kernel/security/lsm")
        .ok()
        .map(|s| s.trim().to_owned());
    f.cgroup2 = mounts::cgroup2_root();
    f.v1_freezer = mounts::cgroup1_freezer();
    f.landlock_abi = landlock_abi();

    // A scratch child cgroup: `cgroup.freeze` only exists below the root, and
    // the network probe attaches there so no other process is touched.
    let scratch = f.cgroup2.as_ref().and_then(|root| ScratchCgroup::new(root).ok());
    if let Some(s) = &scratch {
        f.cgroup_freeze = s.path.join("cgroup.freeze").exists();
        f.cgroup_kill = s.path.join("cgroup.kill").exists();
    }

    if !f.root {
        let why = "not root: run `sudo agentguard doctor` to probe eBPF".to_owned();
        f.object = Err(why.clone());
        f.tracepoints = Err(why.clone());
        f.sock_addr = Err(why.clone());
        f.lsm_loadable = Err(why);
        return f;
    }
    match loader::load_object() {
        Err(e) => {
            let why = e.to_string();
            f.object = Err(why.clone());
            f.tracepoints = Err(why.clone());
            f.sock_addr = Err(why.clone());
            f.lsm_loadable = Err(why);
        }
        Ok(mut ebpf) => {
            f.object = Ok(());
            // The object defines a ring buffer; loading it created one.
            f.ringbuf = true;
            f.tracepoints = loader::PROBES
                .iter()
                .filter(|p| matches!(p.kind, loader::ProbeKind::TracePoint { .. }) && p.lifetime == loader::Lifetime::Always)
                .try_for_each(|p| {
                    loader::attach_probe(&mut ebpf, p, Path::new("/"))
                        .map_err(|e| format!("{}: {e}", p.program))
                });
            f.sock_addr = match &scratch {
                None => Err("no cgroup2 hierarchy to attach to".to_owned()),
                Some(s) => probe_sock_addr(&mut ebpf, &s.path),
            };
            f.lsm_loadable = probe_lsm(&mut ebpf);
            if f.lsm_loadable.is_err() {
                // Verified, not attached: attaching would tax every syscall.
                f.file_observation = loader::kernel_offsets().clone().map(drop).and_then(|()| {
                    loader::PROBES
                        .iter()
                        .filter(|p| p.lifetime == loader::Lifetime::FallbackWhileAgentLive)
                        .try_for_each(|p| loader::load_probe(&mut ebpf, p).map_err(|e| format!("{}: {e}", p.program)))
                });
            }
        }
    }
    f
}

fn probe_sock_addr(ebpf: &mut aya::Ebpf, cgroup: &Path) -> Result<(), String> {
    let prog: &mut CgroupSockAddr = ebpf
        .program_mut(programs::CONNECT4)
        .ok_or("program connect4 missing")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    prog.load().map_err(|e| chain(&e))?;
    let fd = File::open(cgroup).map_err(|e| e.to_string())?;
    prog.attach(&fd, CgroupAttachMode::Single)
        .map_err(|e| chain(&e))?;
    Ok(())
}

/// Load and attach the real file programs, not a stand-in: a kernel can load
/// a trivial LSM program yet refuse a helper the real ones need (6.1 refuses
/// bpf_d_path in path_unlink). Doctor's maps hold no tags, so attaching them
/// for the probe affects no process.
fn probe_lsm(ebpf: &mut aya::Ebpf) -> Result<(), String> {
    // The file programs only: the file veto is what this probe answers for
    // (self-protection is reported by the daemon's status).
    loader::PROBES.iter().filter(|p| p.class == loader::ActionClass::File).try_for_each(|p| {
        let loader::ProbeKind::Lsm { hook, args } = p.kind else { return Ok(()) };
        match loader::lsm_hook_check(hook, args) {
            // A hook this kernel does not have (file_truncate before 6.2):
            // another probe covers its actions.
            Err(loader::ProbeState::Skipped { .. }) => return Ok(()),
            Err(loader::ProbeState::Unavailable { reason }) => return Err(format!("{}: {reason}", p.program)),
            _ => {}
        }
        loader::attach_probe(ebpf, p, Path::new("/")).map_err(|e| format!("{}: {e}", p.program))
    })
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Landlock ABI version, via landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION).
pub fn landlock_abi() -> Option<i64> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_long = 1;
    // SAFETY: documented probe call with a NULL attribute pointer.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (v > 0).then_some(v)
}

struct ScratchCgroup {
    path: PathBuf,
}

impl ScratchCgroup {
    fn new(root: &Path) -> std::io::Result<Self> {
        let path = root.join(format!("agentguard-doctor-{}", std::process::id()));
        std::fs::create_dir(&path)?;
        Ok(Self { path })
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn check(name: &'static str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok,
        detail: detail.into(),
    }
}

fn result_detail(r: &Result<(), String>, ok: &str) -> String {
    match r {
        Ok(()) => ok.to_owned(),
        Err(e) => e.clone(),
    }
}

fn report(f: &Facts) -> Report {
    let uname = nix::sys::utsname::uname().ok();
    let kernel = uname
        .map(|u| format!("{} {}", u.sysname().to_string_lossy(), u.release().to_string_lossy()))
        .unwrap_or_else(|| "unknown".to_owned());
    let lsm_listed = f
        .lsm_list
        .as_deref()
        .is_some_and(|l| l.split(',').any(|x| x == "bpf"));

    let preemption = preemption();
    let checks = vec![
        check("root", f.root, if f.root { "running as root" } else { "not root" }),
        check("btf", f.btf, "/sys/kernel/btf/vmlinux"),
        check("bpffs", f.bpffs, "bpf filesystem mounted (pins live under /sys/fs/bpf/agentguard)"),
        check("securityfs", f.securityfs, "/sys/kernel/security"),
        check(
            "lsm_listed",
            lsm_listed,
            format!("active LSMs: {}", f.lsm_list.as_deref().unwrap_or("unknown")),
        ),
        check("lsm_loadable", f.lsm_loadable.is_ok(), result_detail(&f.lsm_loadable, "a BPF-LSM program loaded and attached")),
        check(
            "file_observation",
            f.lsm_loadable.is_ok() || f.file_observation.is_ok(),
            if f.lsm_loadable.is_ok() {
                "not needed: BPF-LSM vetoes file actions".to_owned()
            } else {
                result_detail(&f.file_observation, "syscall-tracepoint file observation verifies (attached only while an agent is live)")
            },
        ),
        check(
            "cgroup2",
            f.cgroup2.is_some(),
            f.cgroup2.as_ref().map_or("no cgroup2 mount".to_owned(), |p| p.display().to_string()),
        ),
        check("cgroup_freeze", f.cgroup_freeze, "cgroup v2 cgroup.freeze"),
        check("cgroup_kill", f.cgroup_kill, "cgroup v2 cgroup.kill"),
        check(
            "v1_freezer",
            f.v1_freezer.is_some(),
            f.v1_freezer.as_ref().map_or("not mounted".to_owned(), |p| p.display().to_string()),
        ),
        check("ebpf_object", f.object.is_ok(), result_detail(&f.object, "loaded, maps created")),
        check("tracepoints", f.tracepoints.is_ok(), result_detail(&f.tracepoints, "sched_process_fork/exec/exit attach")),
        check("cgroup_sock_addr", f.sock_addr.is_ok(), result_detail(&f.sock_addr, "connect4 loads and attaches")),
        check("ringbuf", f.ringbuf, "BPF ring buffer"),
        check("preemption", !preemption.0, preemption.1.clone()),
        check(
            "landlock",
            f.landlock_abi.is_some(),
            f.landlock_abi.map_or("unavailable".to_owned(), |v| format!("ABI {v}")),
        ),
    ];

    let network = if f.sock_addr.is_ok() && f.cgroup2.is_some() {
        ClassReport {
            class: "network veto",
            available: true,
            veto: true,
            mechanism: "cgroup_sock_addr connect4/6 + sendmsg4/6 at the cgroup2 root".into(),
            remediation: None,
        }
    } else {
        ClassReport {
            class: "network veto",
            available: false,
            veto: false,
            mechanism: "none: network enforcement will not start".into(),
            remediation: Some(format!(
                "needs cgroup v2 and cgroup_sock_addr programs (Linux 4.17+): {}",
                result_detail(&f.sock_addr, "")
            )),
        }
    };
    let file = if f.lsm_loadable.is_ok() {
        ClassReport {
            class: "file veto",
            available: true,
            veto: true,
            mechanism: "BPF-LSM path hooks: the kernel refuses the action".into(),
            remediation: preemption.0.then(|| {
                "this kernel preempts BPF programs: an agent's file action whose program preempted another one mid-judgment on the same CPU is refused, fail closed (rare; counted in `status` as file_scratch_busy, logged with rule `preempted`). Voluntary preemption (`preempt=voluntary`) never preempts a program".to_owned()
            }),
        }
    } else {
        ClassReport {
            class: "file veto",
            available: f.file_observation.is_ok(),
            veto: false,
            mechanism: match &f.file_observation {
                Ok(()) => format!(
                    "fallback: observe through syscall tracepoints while an agent is live and contain (the agent is stopped at its first violating action and frozen; that one action is not undone); agents started with `agentguard run` also get Landlock rules{}",
                    if f.landlock_abi.is_some_and(|v| v >= 2) { "" } else { " (Landlock ABI 2+ unavailable here)" }
                ),
                Err(e) => format!("none: the observation fallback does not load either ({e})"),
            },
            remediation: Some(if lsm_listed {
                format!(
                    "BPF-LSM is listed but not loadable ({}): this kernel or sandbox blocks BPF trampolines; file actions will be observed and contained, not vetoed",
                    result_detail(&f.lsm_loadable, "")
                )
            } else {
                "BPF-LSM is not active on this kernel (lsm= lacks bpf): file actions will be observed and contained, not vetoed. To enable: add `lsm=...,bpf` to the kernel command line".to_owned()
            }),
        }
    };
    let tagging = ClassReport {
        class: "process tagging",
        available: f.tracepoints.is_ok(),
        veto: false,
        mechanism: "sched_process_fork/exec/exit tracepoints".into(),
        remediation: f
            .tracepoints
            .as_ref()
            .err()
            .map(|e| format!("tracepoints cannot attach ({e}); AgentGuard cannot run")),
    };
    let killswitch = if f.cgroup_freeze {
        ClassReport {
            class: "killswitch",
            available: true,
            veto: true,
            mechanism: format!(
                "cgroup v2 cgroup.freeze{}",
                if f.cgroup_kill { " and cgroup.kill" } else { " (kill by signals: no cgroup.kill)" }
            ),
            remediation: None,
        }
    } else if f.v1_freezer.is_some() {
        ClassReport {
            class: "killswitch",
            available: true,
            veto: true,
            mechanism: "cgroup v1 freezer".into(),
            remediation: Some("cgroup v2 freezing needs Linux 5.2+; the v1 freezer is used".into()),
        }
    } else {
        ClassReport {
            class: "killswitch",
            available: true,
            veto: false,
            mechanism: "SIGSTOP/SIGKILL to every tagged process (weaker: a process forked during the stop can escape)".into(),
            remediation: Some("mount cgroup v2 (Linux 5.2+) for an atomic freeze".into()),
        }
    };

    let mut blockers = Vec::new();
    if !f.root {
        blockers.push("not root: the daemon must run as root".to_owned());
    }
    if let Err(e) = &f.object {
        if f.root {
            blockers.push(format!("the eBPF object does not load: {e}"));
        }
    }
    if let (true, Err(e)) = (f.root, &f.tracepoints) {
        blockers.push(format!("process tagging is impossible: {e}"));
    }
    if f.cgroup2.is_none() {
        blockers.push("no cgroup2 hierarchy: mount one (`mount -t cgroup2 none /sys/fs/cgroup`)".into());
    }
    Report {
        kernel,
        checks,
        classes: vec![network, file, tagging, killswitch],
        daemon_can_run: blockers.is_empty(),
        blockers,
    }
}

/// Whether this kernel can preempt a BPF program mid-run (full, lazy or
/// real-time preemption; BPF-LSM and syscall-tracepoint programs run with
/// only migration disabled), and what that was read from.
fn preemption() -> (bool, String) {
    let version = nix::sys::utsname::uname().map(|u| u.version().to_string_lossy().into_owned()).unwrap_or_default();
    preemption_from(
        std::fs::read_to_string("/sys/kernel/debug/sched/preempt").ok().as_deref(),
        &version,
        &std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
    )
}

/// [`preemption`] from the debugfs switch (if readable), `uname -v` and the
/// kernel command line.
fn preemption_from(sched: Option<&str>, version: &str, cmdline: &str) -> (bool, String) {
    // Switchable at run time on PREEMPT_DYNAMIC kernels: "none (voluntary) full".
    if let Some(modes) = sched {
        let mode = modes
            .split_whitespace()
            .find_map(|w| w.strip_prefix('(').and_then(|w| w.strip_suffix(')')))
            .unwrap_or("?")
            .to_owned();
        let preemptible = !matches!(mode.as_str(), "none" | "voluntary");
        return (preemptible, format!("{mode} (/sys/kernel/debug/sched/preempt)"));
    }
    let on_cmdline = cmdline.split_whitespace().find_map(|w| w.strip_prefix("preempt="));
    if version.contains("PREEMPT_RT") {
        return (true, "real-time (PREEMPT_RT)".into());
    }
    if version.contains("PREEMPT_DYNAMIC") {
        return match on_cmdline {
            Some(m) => (!matches!(m, "none" | "voluntary"), format!("{m} (preempt={m} on the command line, PREEMPT_DYNAMIC)")),
            None => (
                false,
                "this build's default (PREEMPT_DYNAMIC; voluntary on Debian and Ubuntu). Mount debugfs to read the mode now: /sys/kernel/debug/sched/preempt".into(),
            ),
        };
    }
    if version.split_whitespace().any(|w| w == "PREEMPT") {
        return (true, "full (PREEMPT)".into());
    }
    (false, "none or voluntary (no PREEMPT in `uname -v`)".into())
}

/// The report as people read it.
pub fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "kernel: {}", r.kernel);
    let _ = writeln!(s, "\nchecks:");
    for c in &r.checks {
        let _ = writeln!(s, "  [{}] {:<17} {}", if c.ok { " ok " } else { "MISS" }, c.name, c.detail);
    }
    let _ = writeln!(s, "\nenforcement on this kernel:");
    for c in &r.classes {
        let what = match (c.available, c.veto) {
            (true, true) => "ENFORCED",
            (true, false) => "DEGRADED",
            (false, _) => "MISSING ",
        };
        let _ = writeln!(s, "  {what} {:<16} {}", c.class, c.mechanism);
        if let Some(rem) = &c.remediation {
            let _ = writeln!(s, "           {:<16} -> {rem}", "");
        }
    }
    if r.daemon_can_run {
        let _ = writeln!(s, "\nthe daemon can run here.");
    } else {
        let _ = writeln!(s, "\nthe daemon cannot run here:");
        for b in &r.blockers {
            let _ = writeln!(s, "  - {b}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::preemption_from;

    #[test]
    fn preemption_is_read_from_debugfs_then_uname_and_the_command_line() {
        let debian = "#1 SMP PREEMPT_DYNAMIC Debian 6.12.118-1 (2026-11-20)";
        assert!(!preemption_from(Some("none (voluntary) full \n"), debian, "").0);
        assert!(preemption_from(Some("none voluntary (full) lazy\n"), debian, "").0);
        assert!(preemption_from(Some("none voluntary full (lazy)\n"), debian, "").0);
        assert!(preemption_from(None, debian, "root=/dev/vda1 preempt=full quiet").0);
        assert!(!preemption_from(None, debian, "root=/dev/vda1 preempt=voluntary").0);
        let (preemptible, detail) = preemption_from(None, debian, "root=/dev/vda1");
        assert!(!preemptible && detail.contains("default"), "{detail}");
        assert!(preemption_from(None, "#1 SMP PREEMPT_RT Thu", "").0);
        assert!(preemption_from(None, "#1 SMP PREEMPT Thu Jan 1", "").0);
        assert!(!preemption_from(None, "#1 SMP Thu Jan 1", "").0);
    }
}
