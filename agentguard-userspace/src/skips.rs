//! Runs of AgentGuard's programs that the kernel skipped.
//!
//! The kernel does not run a tracing program (`fexit`) on a CPU where the
//! same program is already running, and does not run a tracepoint program
//! on a CPU where any kprobe or tracepoint program is running; it counts
//! each run it skipped (`recursion_misses` in the program's info, 5.12+).
//! A skipped run is a hook that did not happen, so it is never silent here:
//! the daemon reads the counts every second (the log's tick), logs a
//! `skipped_runs` event for each program whose count grew, warns, shows the
//! totals in `agentguard status`, and repairs what the program's class
//! allows:
//!
//! * the directory cache's stamps (dircache.rs: `fexit` on `vfs_rename` and
//!   the mount changes): on a kernel with full preemption a run preempted
//!   half-way makes the same program's next run on that CPU a skip, and that
//!   change goes unstamped. The cache is flushed (the file generation bumped),
//!   so no entry stamped before it is used again;
//! * tagging (the fork, exec and exit tracepoints): the sessions' processes
//!   are tagged again from their cgroups;
//! * the fallback's syscall tracepoints: reported; the agent's action went
//!   unobserved, which the event says.
//!
//! BPF-LSM and cgroup programs have no such check: the kernel runs them
//! every time, so they are not watched.
//!
//! The counts the daemon has reported are saved (`skipped-runs.json`, next
//! to the saved sessions, on /run): a restarted daemon that takes the same
//! programs over reports the runs skipped while no daemon was reading, as
//! `skipped_runs` events with `while_no_daemon`.
use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        ProgramFd,
    },
    Ebpf,
};

use crate::{
    loader::{ActionClass, ProbeKind, ProbeSpec, ProbeState, ProbeStatus, PROBES},
    pins::Pins,
};

/// A program whose skipped runs are watched.
struct Watched {
    program: &'static str,
    class: ActionClass,
    fd: ProgramFd,
    /// The kernel's id of the program (which a restarted daemon finds
    /// again when it takes the program over).
    id: u32,
    /// The count when last read.
    seen: u64,
}

/// What was reported of one program, as saved for a restarted daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    id: u32,
    seen: u64,
}

/// Runs of one program skipped since the previous [`Skips::poll`].
#[derive(Debug)]
pub struct Skipped {
    pub program: &'static str,
    pub class: ActionClass,
    pub skipped: u64,
    pub total: u64,
    /// Skipped while no daemon was reading: between the previous daemon's
    /// last read and this daemon's start.
    pub while_no_daemon: bool,
}

impl Skipped {
    /// What the skip may have cost, for the event and the warning.
    pub fn risk(&self) -> &'static str {
        match self.class {
            ActionClass::FileCache => "a rename or mount change may have gone unstamped in the directory cache",
            ActionClass::Tagging => "a fork, exec or exit may have gone unseen: a process untagged, or lineage incomplete",
            ActionClass::File => "an agent's file action may have gone unobserved: neither judged nor contained",
            ActionClass::Network | ActionClass::SelfProtection => "a hook did not run",
        }
    }
}

/// The watched programs: every loaded program of a kind the kernel may skip.
pub struct Skips {
    watched: Vec<Watched>,
    /// Whether this kernel reports skipped runs at all (the program
    /// info's `recursion_misses`, 5.12+).
    supported: bool,
    last_poll: Instant,
    /// Skips from before this daemon, reported by the first poll.
    carried: Vec<Skipped>,
    /// Where the reported counts are saved, and what was saved last.
    saved_at: PathBuf,
    saved: String,
}

/// How often [`Skips::poll`] reads the counts (the log ticks more often
/// while it has work).
const POLL_EVERY: Duration = Duration::from_secs(1);

impl Skips {
    /// Watch the loaded tracepoint and `fexit` programs among `probes`:
    /// the program each one's pinned link runs (for a link taken over from
    /// a previous daemon, that daemon's program; pins.rs), else this
    /// daemon's.
    pub fn watch(ebpf: &Ebpf, probes: &[ProbeStatus], pins: &Pins, saved_at: &Path) -> Self {
        // The loaded programs of a kind the kernel may skip.
        let specs: Vec<&ProbeSpec> = probes
            .iter()
            .filter(|status| !matches!(status.state, ProbeState::Unavailable { .. } | ProbeState::Skipped { .. }))
            .filter_map(|status| PROBES.iter().find(|p| p.program == status.program))
            .filter(|spec| matches!(spec.kind, ProbeKind::TracePoint { .. } | ProbeKind::FExit { .. }))
            .collect();
        let mut adopted = adopted(pins, &specs);
        let mut watched = Vec::new();
        for spec in specs {
            // The program its pinned link runs first: the one in the
            // kernel's hook (ours once attached and pinned).
            let fd = adopted.remove(spec.program).or_else(|| {
                ebpf.program(spec.program)
                    .and_then(|p| p.fd().ok())
                    .and_then(|fd| fd.try_clone().ok())
            });
            match fd {
                Some(fd) => watched.push(Watched {
                    program: spec.program,
                    class: spec.class,
                    fd,
                    id: 0,
                    seen: 0,
                }),
                None => tracing::warn!(
                    program = spec.program,
                    "cannot watch the program's skipped runs"
                ),
            }
        }
        let mut skips = Self {
            watched,
            supported: true,
            last_poll: Instant::now(),
            carried: Vec::new(),
            saved_at: saved_at.to_owned(),
            saved: String::new(),
        };
        // The count is the kernel's, for the program's whole life. For a
        // program a previous daemon watched (taken over: the same id), what
        // that daemon did not report yet is reported now; for any other,
        // the count from here on (this daemon's own programs start at 0).
        let before = load(saved_at);
        for w in &mut skips.watched {
            match read(&w.fd) {
                Some((id, n)) => {
                    (w.id, w.seen) = (id, n);
                    if let Some(prev) = before.get(w.program).filter(|p| p.id == id && p.seen < n) {
                        skips.carried.push(Skipped {
                            program: w.program,
                            class: w.class,
                            skipped: n - prev.seen,
                            total: n,
                            while_no_daemon: true,
                        });
                    }
                }
                None => skips.supported = false,
            }
        }
        if !skips.supported && !skips.watched.is_empty() {
            tracing::warn!("this kernel does not report skipped program runs (recursion_misses, 5.12+): they cannot be counted here");
        }
        // Skips carried over are saved as reported once they are logged
        // ([`Skips::reported`]); until then the previous daemon's counts
        // stay, so a crash before the log loses none.
        if skips.carried.is_empty() {
            skips.reported();
        }
        skips
    }

    /// The programs whose skipped runs grew since the last read; at most
    /// one read a second. Once they are logged, [`Skips::reported`].
    pub fn poll(&mut self) -> Vec<Skipped> {
        let mut out = std::mem::take(&mut self.carried);
        if self.last_poll.elapsed() < POLL_EVERY {
            return out;
        }
        self.last_poll = Instant::now();
        for w in &mut self.watched {
            let Some((_, now)) = read(&w.fd) else { continue };
            if now > w.seen {
                out.push(Skipped {
                    program: w.program,
                    class: w.class,
                    skipped: now - w.seen,
                    total: now,
                    while_no_daemon: false,
                });
                w.seen = now;
            }
        }
        out
    }

    /// What [`Skips::poll`] returned is logged: save the counts, for a
    /// restarted daemon (atomically, and only when they changed). A
    /// failure is said; the next daemon then reports from its start, as it
    /// would after a reboot.
    pub fn reported(&mut self) {
        if !self.supported {
            return;
        }
        let now: BTreeMap<&str, Saved> = self.watched.iter().map(|w| (w.program, Saved { id: w.id, seen: w.seen })).collect();
        let Ok(text) = serde_json::to_string(&now) else { return };
        if text == self.saved {
            return;
        }
        match crate::runstate::write_atomic(&self.saved_at, &text) {
            Ok(()) => self.saved = text,
            Err(e) => tracing::warn!(path = %self.saved_at.display(), error = %e, "cannot save the skipped-run counts; a restarted daemon will not report runs skipped while none was reading"),
        }
    }

    /// Skipped runs so far, per watched program (all of them, zeros too);
    /// `None` where the kernel does not count them.
    pub fn totals(&self) -> Option<BTreeMap<&'static str, u64>> {
        self.supported
            .then(|| self.watched.iter().map(|w| (w.program, w.seen)).collect())
    }
}

/// The programs pinned links run (always attached, or attached while an
/// agent is live), where a previous daemon left them, by the name of the
/// program in `specs`: one walk of the host's loaded programs for all.
fn adopted(pins: &Pins, specs: &[&ProbeSpec]) -> BTreeMap<&'static str, ProgramFd> {
    let ids: BTreeMap<u32, &'static str> = specs
        .iter()
        .filter_map(|spec| {
            let id = [pins.link(spec.program), pins.live(spec.program)]
                .into_iter()
                .filter_map(|path| PinnedLink::from_pin(path).ok())
                .find_map(|link| FdLink::from(link).info().ok())?
                .program_id();
            Some((id, spec.program))
        })
        .collect();
    if ids.is_empty() {
        return BTreeMap::new();
    }
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| Some((*ids.get(&p.id())?, p.fd().ok()?)))
        .collect()
}

/// What a previous daemon saved ([`Skips::reported`]); nothing when there is
/// no such file (the first start since boot) or it cannot be read (said).
fn load(path: &Path) -> BTreeMap<String, Saved> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "unreadable saved skipped-run counts; runs skipped while no daemon was reading cannot be reported");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

/// The file [`Skips`] saves its counts to: next to the saved sessions.
pub fn saved_path(run_state: &Path) -> PathBuf {
    run_state.with_file_name("skipped-runs.json")
}

/// The program `fd`'s id and the kernel's count of its skipped runs, from
/// its `bpf_prog_info` (one syscall; reading fdinfo took three and a parse,
/// for every watched program every second). `None` where the kernel has no
/// such field (before 5.12: the length it fills in stops short of it).
fn read(fd: &ProgramFd) -> Option<(u32, u64)> {
    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};
    // SAFETY: plain C structs, for which all zeroes is a valid value.
    let (mut info, mut attr): (bpf_prog_info, bpf_attr) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    attr.info.bpf_fd = u32::try_from(fd.as_fd().as_raw_fd()).ok()?;
    attr.info.info_len = u32::try_from(std::mem::size_of::<bpf_prog_info>()).ok()?;
    attr.info.info = std::ptr::addr_of_mut!(info) as u64;
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD with a valid attr of its full size,
    // pointing at `info`, which the kernel fills up to `info_len` bytes
    // (every pointer field in it is 0: no array is asked for).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            std::ptr::addr_of_mut!(attr),
            std::mem::size_of::<bpf_attr>(),
        )
    };
    // SAFETY: the union's member this command uses.
    let filled = unsafe { attr.info.info_len } as usize;
    let end = std::mem::offset_of!(bpf_prog_info, recursion_misses) + std::mem::size_of::<u64>();
    (r == 0 && filled >= end).then_some((info.id, info.recursion_misses))
}
