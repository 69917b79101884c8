//! `agentguard daemon`: load and attach the programs, compile the policies
//! into the maps, tag agents that are already running, keep every tagged
//! process in its session cgroup, write the event log, serve the CLI.
use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use agentguard_common::{maps, Tag, RUN_SESSION_BIT};
use anyhow::{bail, Context as _};
use aya::{
    maps::{HashMap, MapData, RingBuf},
    Ebpf,
};
use serde::Serialize;
use serde_json::json;
use tokio::{
    io::{unix::AsyncFd, AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

mod approvals;

use crate::{
    cgroups::{self, CgroupTree},
    compile,
    config::Config,
    control::{Request, Response},
    decode::{decode, KernelEvent},
    events::{self, Clock, EventLog},
    loader::{self, ActionClass, LiveHooks, ProbeState, ProbeStatus},
    mounts,
    netrules::{self, Resolved},
    policy::{self, AgentPolicy, PolicySet},
    pins::Pins,
    procfs, runstate, systemd,
};

mod lifecycle;
pub use lifecycle::unload_without_daemon;

/// A session: one `agentguard run`, or one process tree a selector matched.
#[derive(Debug, Clone, Serialize)]
pub struct Session {
    pub id: u32,
    pub agent: String,
    pub agent_id: u32,
    pub cgroup: PathBuf,
    #[serde(skip)]
    pub cgroup_id: u64,
    pub workspace: Option<PathBuf>,
    pub kind: &'static str,
    /// Where a selector-matched session's processes were before the daemon
    /// moved them (`0::` path): a process found there was never moved yet
    /// and did not escape. None for `agentguard run` sessions, whose
    /// processes start inside.
    #[serde(skip)]
    pub origin: Option<String>,
}

pub struct State {
    ebpf: Ebpf,
    /// What this process last wrote into the network tries.
    written: compile::Written,
    probes: Vec<ProbeStatus>,
    policies: PolicySet,
    config: Config,
    tree: CgroupTree,
    sessions: BTreeMap<u32, Session>,
    next_run: u32,
    log: EventLog,
    clock: Clock,
    decode_errors: u64,
    events_logged: u64,
    /// Cgroup moves of tagged tasks the kernel reported (cgroup_attach_task).
    cgroup_moves_reported: u64,
    /// Addresses the policies' host names resolved to (refreshed periodically).
    resolved: Resolved,
    /// The network hooks, attached only while an agent is live.
    live: LiveHooks,
    /// Where the maps and links are pinned (they outlive this process).
    pins: Pins,
    /// The sessions as last saved to `config.run_state`.
    run_state_written: String,
    /// How many reloads brought the policy in force (0: the one loaded at
    /// start); `policies.hash` identifies it.
    policy_version: u64,
    /// `agentguard stop` asked to exit (true: and unload).
    stopping: Option<bool>,
    stop_signal: Arc<tokio::sync::Notify>,
    /// Pending approvals and live grants (daemon/approvals.rs).
    approvals: crate::approvals::Store,
    /// The tagged processes as of the last walk of the tags map.
    tagged: Option<TaggedWalk>,
    /// A reload brought a new policy in force (its host names are
    /// refreshed from then on).
    policy_changed: Arc<tokio::sync::Notify>,
    /// Runs of the programs the kernel skipped (skips.rs).
    skips: crate::skips::Skips,
}

/// What a walk of `AG_TAGS` found, and the kernel's tag-change count read
/// just before it. Walking a hash map visits every bucket (65 536 here,
/// however few tasks are tagged), so reconciliation reuses the walk while
/// the count is unchanged: an idle agent costs no walk (bench B8). A walk
/// older than [`TAG_WALK_MAX_AGE`] is redone regardless, and the daemon's
/// own writes to the map drop it.
struct TaggedWalk {
    changes: u64,
    walked: std::time::Instant,
    /// Thread-group leaders and their tags.
    leaders: Vec<(u32, Tag)>,
    /// Whether any task at all was tagged.
    any: bool,
}

/// Bound on how long a walk is reused while the count stays the same (the
/// count is per-CPU and read without ordering against the map on every
/// architecture: this bounds what a missed change could cost).
const TAG_WALK_MAX_AGE: Duration = Duration::from_secs(10);

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves the state usable: every update
    // is a whole map write or a whole struct field.
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Self-protection of AgentGuard's files (selfprotect.rs): a problem is
/// logged, never fatal (the programs may not be loadable on this kernel).
fn guard_own_files(ebpf: &mut Ebpf, config: &Config, tree: &CgroupTree) {
    if let Err(e) = std::fs::create_dir_all(&config.incident_dir) {
        tracing::warn!(dir = %config.incident_dir.display(), error = %e, "cannot create the incident directory");
    }
    let (plan, warnings) = crate::selfprotect::plan(config, &tree.root, &tree.base);
    for w in warnings {
        tracing::warn!("{w}");
    }
    match crate::selfprotect::apply(ebpf, &plan) {
        Ok((n, problems)) => {
            for p in problems {
                tracing::warn!("{p}");
            }
            // Marks changed: the directory cache decides again.
            if let Err(e) = compile::bump_file_generation(ebpf) {
                tracing::warn!(error = %e, "cannot renew the kernel's directory cache");
            }
            tracing::info!(paths = n, "AgentGuard's own files guarded from agents (where BPF-LSM loads)");
        }
        Err(e) => tracing::warn!(error = %e, "cannot guard AgentGuard's own files from agents"),
    }
}

/// Start-up, then serve until SIGINT or SIGTERM.
pub fn run(config: Config) -> anyhow::Result<()> {
    // Before the runtime: threads started later inherit the priority.
    boost_priority(config.priority_boost);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(config))
}

/// Run every thread of the daemon at nice -`boost` (config
/// `priority_boost`). Needs CAP_SYS_NICE; without it the daemon runs as
/// started and says so.
fn boost_priority(boost: u8) {
    if boost == 0 {
        return;
    }
    let nice = -i32::from(boost);
    let tids: Vec<u32> = std::fs::read_dir("/proc/self/task")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    for tid in tids {
        // SAFETY: plain syscall; PRIO_PROCESS with a thread id sets that thread.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(error = %e, nice, "cannot raise the daemon's priority (needs CAP_SYS_NICE); a flood of events may be dropped (and counted) sooner");
            return;
        }
    }
    tracing::debug!(nice, "daemon priority raised");
    request_short_slice(nice);
}

/// The slice the event reader (this, the runtime's thread) asks the
/// scheduler for: EEVDF's shortest (kernel 6.12 and later read
/// `sched_runtime` of a SCHED_OTHER thread as its slice; older kernels
/// ignore it). A waking thread with a shorter slice than the one running
/// preempts it at once (PREEMPT_SHORT) instead of waiting out that slice:
/// with an agent's threads busy on both cores of this machine, the reader
/// otherwise waited up to 10 ms to run after its ring buffer woke it (a
/// `perf sched` trace of bench B5 at 500 000 events/s), and the events
/// waited with it.
const EVENT_READER_SLICE_NS: u64 = 100_000;

fn request_short_slice(nice: i32) {
    /// `struct sched_attr`, SCHED_ATTR_SIZE_VER0 (include/uapi/linux/sched/types.h).
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        sched_policy: u32,
        sched_flags: u64,
        sched_nice: i32,
        sched_priority: u32,
        sched_runtime: u64,
        sched_deadline: u64,
        sched_period: u64,
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: EVENT_READER_SLICE_NS,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: `attr` is the kernel's VER0 layout and outlives the call;
    // pid 0 is the calling thread.
    if unsafe { libc::syscall(libc::SYS_sched_setattr, 0, std::ptr::from_ref(&attr), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, "cannot ask for a short scheduler slice; events may wait longer behind a busy agent");
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("agentguard daemon must run as root (it loads eBPF programs and manages cgroups)");
    }
    let policies = policy::load_dir(&config.policy_dir)
        .map_err(|e| anyhow::anyhow!("{e}\npolicy rejected; nothing was loaded"))?;
    if policies.agents.is_empty() {
        tracing::warn!(dir = %config.policy_dir.display(), "no policy declares an agent: nothing will be tagged");
    }
    for (fstype, target) in [("bpf", "/sys/fs/bpf"), ("securityfs", "/sys/kernel/security")] {
        if let Err(e) = mounts::ensure_mounted(fstype, target) {
            tracing::warn!(fstype, target, error = %e, "cannot mount");
        }
    }
    let cgroup_root = mounts::cgroup2_root()
        .context("no cgroup2 hierarchy is mounted: mount one (`mount -t cgroup2 none /sys/fs/cgroup`)")?;
    let tree = CgroupTree::new(&cgroup_root, &config.cgroup_subtree)?;

    loader::EVENTS_RING_BYTES.store(config.events_ring_bytes, std::sync::atomic::Ordering::Relaxed);
    // Pinned maps and links: reopened (not recreated) when a previous
    // daemon left them, so enforcement never paused (pins.rs). A pinned ring
    // keeps the size it was created with.
    let pins = Pins::open(&config.pin_dir).context("cannot use the pin directory (pin_dir)")?;
    let mut ebpf = loader::load_object_with(Some(&pins))?;
    if pins.adopted {
        let (plan, _) = crate::selfprotect::plan(&config, &tree.root, &tree.base);
        if let Err(e) = crate::selfprotect::preset_filter(&mut ebpf, &plan) {
            tracing::warn!(error = %e, "cannot prepare the self-protection filter before attaching");
        }
        // Off until this daemon's programs are attached (set_dircache below).
        if let Err(e) = compile::set_dircache(&mut ebpf, false) {
            tracing::warn!(error = %e, "cannot switch the kernel's directory cache off");
        }
    }
    let probes = loader::attach_all_with(&mut ebpf, &cgroup_root, Some(&pins))?;
    report_probes(&probes);
    let skips = crate::skips::Skips::watch(&ebpf, &probes, &pins, &crate::skips::saved_path(&config.run_state));
    let dircache = loader::dircache_ready(&probes);
    if let Err(e) = compile::set_dircache(&mut ebpf, dircache) {
        tracing::warn!(error = %e, "cannot switch the kernel's directory cache");
    }
    // Tags the daemon writes itself need their hint bit set first (taghint.rs).
    crate::taghint::load(&mut ebpf).map_err(|e| anyhow::anyhow!("{e}: the daemon could not tag agents that are already running"))?;
    // Self-protection (selfprotect.rs) guards this process from agents.
    if let Err(e) = loader::set_hook_flag(&mut ebpf, agentguard_common::HookFlag::DaemonTgid, std::process::id()) {
        tracing::warn!(error = %e, "cannot register the daemon for self-protection");
    }
    let (sessions, next_run) = lifecycle::restore_sessions(&tree, &runstate::load(&config.run_state));
    if pins.adopted {
        tracing::warn!(pins = %pins.dir.display(), sessions = sessions.len(), "took over the kernel state a previous daemon left pinned: enforcement did not stop");
    }

    let (resolved, dns_problems) = netrules::resolve_hosts(policies.hosts(), &Resolved::new());
    for p in dns_problems {
        tracing::warn!("{p}");
    }
    let mut written = compile::Written::default();
    let warnings = compile::apply(&mut ebpf, &mut written, &policies, &cgroup_root, &lifecycle::run_selectors(&sessions), &resolved)?;
    for w in warnings {
        tracing::warn!("{w}");
    }

    let ring = ebpf
        .take_map(maps::EVENTS)
        .context("the eBPF object has no events ring buffer")?;
    let ring = RingBuf::try_from(ring).context("AG_EVENTS is not a ring buffer")?;
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns
    // the RingBuf, and as_raw_fd always returns that same fd.
    let ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("cannot poll the events ring buffer: {e}"))?;

    // Held actions freeze their agent on a thread of their own (holdfast.rs).
    let holds = ebpf.take_map(maps::HOLDS).context("the eBPF object has no holds ring buffer")?;
    let holds = RingBuf::try_from(holds).context("AG_HOLDS is not a ring buffer")?;
    crate::holdfast::spawn(holds, tree.root.clone(), tree.base.clone()).context("cannot start the hold thread")?;

    let mut log = EventLog::open(&config)
        .with_context(|| format!("cannot open event log {}", config.events_log.display()))?;
    log.attach_kernel(&mut ebpf).context("cannot reach the event log's fail-closed state in the kernel")?;
    let listener = bind_socket(&config)?;
    guard_own_files(&mut ebpf, &config, &tree);
    let approvals = crate::approvals::Store::load(&config.approvals_state_path())
        .with_context(|| format!("cannot read the approvals state file {}", config.approvals_state_path().display()))?;

    let stop_signal = Arc::new(tokio::sync::Notify::new());
    let state: Shared = Arc::new(Mutex::new(State {
        written,
        ebpf,
        probes,
        policy_version: 0,
        policies,
        config,
        tree,
        sessions,
        next_run,
        log,
        clock: Clock::new(),
        decode_errors: 0,
        events_logged: 0,
        cgroup_moves_reported: 0,
        resolved,
        live: LiveHooks::pinned(pins.clone()),
        pins,
        run_state_written: String::new(),
        stopping: None,
        stop_signal: stop_signal.clone(),
        approvals,
        tagged: None,
        policy_changed: Arc::new(tokio::sync::Notify::new()),
        skips,
    }));
    lock(&state).restore_approvals();

    {
        let mut s = lock(&state);
        let s = &mut *s;
        s.sync_workspaces(&s.policies.clone())?;
        let root = s.tree.root.clone();
        let live = s.live.adopt(&mut s.ebpf, &root)?;
        if live > 0 {
            tracing::info!(links = live, "took over the pinned on-demand hooks");
        }
        let retagged = s.retag_sessions();
        if retagged > 0 {
            tracing::info!(processes = retagged, "tagged the processes of restored sessions");
        }
    }
    let adopted = adopt_existing(&mut lock(&state));
    {
        let mut s = lock(&state);
        // An older binary's generation: ours judges now, so it can go.
        for old in s.pins.stale_generations() {
            tracing::info!(pins = %old.display(), "removing the pins of a previous eBPF object");
            let _ = crate::pins::remove_all(&old);
        }
        s.save_sessions();
        tracing::info!(
            agents = s.policies.agents.len(),
            adopted,
            socket = %s.config.socket.display(),
            events = %s.config.events_log.display(),
            "agentguard daemon ready"
        );
        systemd::ready(&format!("enforcing for {} agent policies", s.policies.agents.len()));
    }
    // Start-up parsed the kernel's BTF and the object (tens of MiB, freed):
    // give those pages back rather than keep them resident while idle (B8).
    loader::release_kernel_btf();
    loader::release_object();
    // SAFETY: plain glibc call, no preconditions.
    unsafe { libc::malloc_trim(0) };
    println!("agentguard daemon ready");

    let events_task = tokio::spawn(read_events(ring, state.clone()));
    let socket_task = tokio::spawn(serve_socket(listener, state.clone()));
    let reconcile_task = tokio::spawn(reconcile_loop(state.clone()));
    let dns_task = tokio::spawn(dns_refresh_loop(state.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let hup_state = state.clone();
    let hup_task = tokio::spawn(async move {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        while hup.recv().await.is_some() {
            if let Err(e) = reload(&hup_state).await {
                tracing::error!("SIGHUP reload failed: {e:#}");
            }
        }
        anyhow::Ok(())
    });
    tokio::select! {
        r = hup_task => bail!("SIGHUP handler stopped: {r:?}"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        _ = term.recv() => tracing::info!("SIGTERM: stopping; the pinned programs keep enforcing"),
        () = stop_signal.notified() => {
            // Let the client read its answer before the process goes.
            tokio::time::sleep(Duration::from_millis(100)).await;
            tracing::info!(unload = lock(&state).stopping, "agentguard stop");
        }
        r = events_task => bail!("event reader stopped: {r:?}"),
        r = socket_task => bail!("control socket stopped: {r:?}"),
        r = reconcile_task => bail!("reconciler stopped: {r:?}"),
        r = dns_task => bail!("host name refresher stopped: {r:?}"),
    }
    systemd::stopping();
    let mut s = lock(&state);
    let s = &mut *s;
    s.save_sessions();
    s.log.close(&s.policies);
    let _ = std::fs::remove_file(&s.config.socket);
    Ok(())
}

fn report_probes(probes: &[ProbeStatus]) {
    for p in probes {
        match &p.state {
            ProbeState::Attached => tracing::info!(program = p.program, "attached"),
            ProbeState::Ready => tracing::info!(program = p.program, "verified; attached while an agent is live"),
            ProbeState::Unavailable { reason } => tracing::warn!(program = p.program, %reason, "unavailable"),
            ProbeState::Skipped { reason } => tracing::debug!(program = p.program, %reason, "not needed here"),
        }
    }
    if !loader::class_attached(probes, ActionClass::File) {
        tracing::warn!(
            "BPF-LSM programs cannot load on this kernel: file actions of agents are NOT vetoed in the kernel here. Run `agentguard doctor` for the reason and the remedy."
        );
    }
}

fn bind_socket(config: &Config) -> anyhow::Result<UnixListener> {
    let path = &config.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another agentguard daemon is already serving {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    // Root only, plus the configured group (SO_PEERCRED is checked as well).
    let mode = if config.socket_group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(group) = &config.socket_group {
        let g = nix::unistd::Group::from_name(group)?
            .with_context(|| format!("socket_group {group:?} does not exist"))?;
        nix::unistd::chown(path, None, Some(g.gid))?;
    }
    Ok(listener)
}

// ---- events ----------------------------------------------------------------

/// Records taken from the ring per turn: the control socket is served
/// between batches.
const RING_BATCH: usize = 8192;
/// Within a turn, the lines are written (and their latency recorded) every
/// this many records: a line waits for at most this many others to be
/// formatted and hashed before its write(2), ~1 ms under a flood, instead
/// of for the whole turn (~8 ms; bench B5).
const WRITE_EVERY: usize = 1024;
/// The longest the event reader holds the state lock in one go.
const MAX_LOCK_HOLD: Duration = Duration::from_millis(20);

async fn read_events(mut ring: AsyncFd<RingBuf<MapData>>, state: Shared) -> anyhow::Result<()> {
    // The log's tick: every TICK while it has work pending, every IDLE_TICK
    // once settled; a batch of events brings it back to TICK (the fsync policy).
    let mut next_tick = tokio::time::Instant::now() + events::log::TICK;
    let written = lock(&state).log.written();
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let mut taken = 0;
                let drained = {
                    let mut s = lock(&state);
                    let held = std::time::Instant::now();
                    let ring = guard.get_inner_mut();
                    let drained = loop {
                        // Bounded by count and by time, so the control
                        // socket (the killswitch, approvals) never waits
                        // long behind a flood of events.
                        if taken == RING_BATCH || (taken % 64 == 63 && held.elapsed() > MAX_LOCK_HOLD) {
                            break false;
                        }
                        let Some(item) = ring.next() else { break true };
                        taken += 1;
                        if taken % WRITE_EVERY == 0 {
                            // A failed write is reported and counted by the log.
                            let _ = s.log.flush();
                        }
                        match decode(&item) {
                            Ok(ev) => s.handle_event(&ev),
                            Err(e) => {
                                s.decode_errors += 1;
                                s.log.count_decode_error();
                                tracing::error!(error = %e, "undecodable event record");
                            }
                        }
                    };
                    // Writes the batch; lifts a ring-overflow fail-closed once drained.
                    s.log.end_batch(drained);
                    drained
                };
                if drained {
                    guard.clear_ready();
                    drop(guard);
                    // A trickle of events: let them gather, so it costs one
                    // wakeup and one write(2) per pause instead of per event
                    // (docs/events.md). Under load, go straight on.
                    if taken < events::log::SMALL_BATCH {
                        tokio::time::sleep(events::log::BATCH_PAUSE).await;
                    }
                } else {
                    drop(guard);
                    tokio::task::yield_now().await;
                }
            }
            // Lines were written (by this loop, or a freeze, a reload...).
            () = written.notified() => {
                next_tick = next_tick.min(tokio::time::Instant::now() + events::log::TICK);
            }
            // Loss events, the fsync policy, probing a failing log.
            () = tokio::time::sleep_until(next_tick) => {
                let mut s = lock(&state);
                let s = &mut *s;
                s.log.tick(&s.policies);
                s.check_skips();
                let pace = if s.log.settled() { events::log::IDLE_TICK } else { events::log::TICK };
                next_tick = tokio::time::Instant::now() + pace;
            }
        }
    }
}

impl State {
    fn handle_event(&mut self, ev: &KernelEvent) {
        let h = *ev.header();
        match ev {
            KernelEvent::Exec(e) if e.newly_tagged == agentguard_common::EXEC_TAGGED_AND_HELD => {
                // The first agent: the exec hook stopped it until the network
                // hooks are attached. Attach, contain, then let it run.
                self.ensure_live_hooks();
                self.contain(h.pid, Tag { agent_id: h.agent_id, session_id: h.session_id });
                if self.live.attached() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(h.pid as i32), nix::sys::signal::Signal::SIGCONT);
                }
            }
            KernelEvent::Exec(e) if e.newly_tagged == 1 => self.contain(h.pid, Tag { agent_id: h.agent_id, session_id: h.session_id }),
            KernelEvent::Fork(f) => self.contain(f.child_tid, Tag { agent_id: h.agent_id, session_id: h.session_id }),
            KernelEvent::CgroupMove(m) => {
                // A notification, not a line: the escape, if it is one, is
                // logged as `cgroup_escape`.
                let tag = Tag { agent_id: h.agent_id, session_id: h.session_id };
                self.cgroup_moves_reported += 1;
                if procfs::tgid_of(m.moved_tid) == Some(m.moved_tid) {
                    self.keep_in_session(m.moved_tid, tag, "cgroup_move");
                }
                return;
            }
            _ => {}
        }
        // A failed write is reported and counted by the log itself.
        if self.log.append_kernel(ev, &self.policies, &self.clock).is_ok() {
            self.events_logged += 1;
        }
        // A held action: freeze, record the pending approval (approvals.rs).
        self.on_approval_event(ev);
        if let KernelEvent::File(f) = ev {
            self.contain_file_violation(f);
        }
        self.freeze_on_violation(ev);
    }

    /// A rule with `freeze = true` refused an action: stop the whole agent
    /// (the killswitch), with an incident record naming the rule.
    fn freeze_on_violation(&mut self, ev: &KernelEvent) {
        use agentguard_common::Decision;
        let h = *ev.header();
        let (decision, rule_id, what) = match ev {
            KernelEvent::Net(n) => (n.decision, n.rule_id, "network"),
            KernelEvent::File(f) => (f.decision, f.rule_id, "file"),
            _ => return,
        };
        if decision != Decision::Deny as u32 {
            return;
        }
        let Some(agent) = self.agent(h.agent_id) else { return };
        let rule = match ev {
            KernelEvent::Net(_) => agent.net_rule(rule_id).filter(|r| r.freeze).map(|r| r.id.clone()),
            _ => agent.file_rule(rule_id).filter(|r| r.freeze).map(|r| r.id.clone()),
        };
        let Some(rule) = rule else { return };
        let name = agent.name.clone();
        let frozen = std::fs::read_to_string(self.tree.agent_dir(&name).join("cgroup.freeze")).is_ok_and(|v| v.trim() == "1");
        if frozen {
            return;
        }
        let reason = format!("{what} rule {rule} (freeze = true) refused an action of pid {}", h.pid);
        match self.freeze_agent(&name, &reason) {
            Ok(r) => tracing::warn!(agent = name, rule, pid = h.pid, processes = r.outcome.processes, "rule violation: agent frozen"),
            Err(e) => tracing::error!(agent = name, rule, pid = h.pid, error = %e, "rule violation: cannot freeze the agent"),
        }
    }

    /// Attach the on-demand hooks (an agent is live). A failure leaves the
    /// held process stopped: better stopped than unjudged.
    fn ensure_live_hooks(&mut self) {
        let root = self.tree.root.clone();
        if let Err(e) = self.live.attach(&mut self.ebpf, &root) {
            tracing::error!(error = %e, "cannot attach the network hooks; agents stay stopped");
        }
    }

    /// Detach the on-demand hooks once no agent is live (see LiveHooks::detach_if).
    fn release_live_hooks_if_idle(&mut self) {
        if !self.live.attached() || self.sessions.values().any(|s| s.kind == "run") {
            return;
        }
        // A task is tagged as of the last walk the kernel has not changed
        // since: no need for the authoritative check below (a walk).
        if self.tagged_leaders().is_some_and(|(_, any)| any) {
            return;
        }
        let detached = self.live.detach_if(&mut self.ebpf, |ebpf| {
            ebpf.map_mut(maps::TAGS)
                .and_then(|m| HashMap::<&mut MapData, u32, Tag>::try_from(m).ok())
                .is_some_and(|t| t.keys().next().is_none())
        });
        if detached {
            tracing::info!("no agent is live: network hooks detached");
        }
    }

    fn agent(&self, id: u32) -> Option<&AgentPolicy> {
        self.policies.by_id(id)
    }

    /// Make sure `pid` lives in its session's cgroup (creating the session
    /// for a process a selector just matched).
    fn contain(&mut self, pid: u32, tag: Tag) {
        // The event or snapshot may be stale: the task can have exited and
        // its pid been reused by an unrelated process (a fork storm wraps
        // pid_max in well under a second). The kernel drops a tag at exit,
        // so only a task that carries this tag now is moved.
        if !self.has_tag(pid, tag) {
            return;
        }
        let Some(agent) = self.agent(tag.agent_id).map(|a| a.name.clone()) else {
            return;
        };
        let current = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok();
        let current_path = current.as_deref().and_then(|c| c.lines().find_map(|l| l.strip_prefix("0::"))).map(str::to_owned);
        let existed = self.sessions.contains_key(&tag.session_id);
        let dir = match self.sessions.get(&tag.session_id) {
            Some(s) => s.cgroup.clone(),
            None => match self.tree.ensure_session(&agent, tag.session_id) {
                Ok((dir, id)) => {
                    self.sessions.insert(
                        tag.session_id,
                        Session {
                            id: tag.session_id,
                            agent: agent.clone(),
                            agent_id: tag.agent_id,
                            cgroup: dir.clone(),
                            cgroup_id: id,
                            workspace: None,
                            kind: "matched",
                            origin: current_path.clone(),
                        },
                    );
                    dir
                }
                Err(e) => {
                    tracing::error!(error = %e, agent, "cannot create session cgroup");
                    return;
                }
            },
        };
        let want = self.tree.relative(&dir);
        if current.as_deref().is_some_and(|c| c.lines().any(|l| l == format!("0::{want}"))) {
            return;
        }
        // A process of a known session found elsewhere left (the fork or exec
        // event can reach the daemon before the periodic check does).
        if existed {
            if let (Some(left_to), Some(session)) = (current_path, self.sessions.get(&tag.session_id).cloned()) {
                if session.origin.as_deref() != Some(left_to.as_str()) && !procfs::is_zombie(pid) {
                    self.log_escape(&session, pid, tag, &left_to, "fork_exec");
                }
            }
        }
        if let Err(e) = CgroupTree::move_pid(&dir, pid) {
            // ESRCH: it already exited; anything else is worth saying.
            if e.raw_os_error() != Some(libc::ESRCH) {
                tracing::warn!(pid, error = %e, cgroup = %dir.display(), "cannot move tagged process into its session cgroup");
            }
        }
    }

    fn tags(&mut self) -> Option<HashMap<&mut MapData, u32, Tag>> {
        let map = self.ebpf.map_mut(maps::TAGS)?;
        HashMap::try_from(map).ok()
    }

    fn tag_tids(&mut self, pid: u32, tag: Tag) -> usize {
        let tids = procfs::tids(pid);
        // The hint bit first: with a tag but no bit, the hooks would take
        // the task for untagged (taghint.rs).
        let hinted: Vec<u32> = tids
            .into_iter()
            .filter(|tid| match crate::taghint::set(&self.ebpf, *tid) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(pid, tid, error = %e, "cannot tag a task of an agent: it is not judged");
                    false
                }
            })
            .collect();
        self.tagged = None;
        let Some(mut tags) = self.tags() else { return 0 };
        let tagged = hinted.iter().filter(|tid| tags.insert(**tid, tag, 0).is_ok()).count();
        self.tags_changed();
        tagged
    }

    /// After the daemon's own tag writes: flows the kernel counted from an
    /// older tag are decided again (taghint.rs, the tag epoch).
    fn tags_changed(&self) {
        if let Err(e) = crate::taghint::bump_epoch(&self.ebpf) {
            tracing::error!(error = %e, "cannot change the tag epoch: a retagged task's repeated connects may be counted under its old tag");
        }
    }

    /// The kernel's count of tag writes and removals (all CPUs).
    fn tag_changes(&self) -> Option<u64> {
        let map = self.ebpf.map(maps::COUNTERS)?;
        let arr = aya::maps::PerCpuArray::<_, u64>::try_from(map).ok()?;
        arr.get(&(agentguard_common::Counter::TagChanges as u32), 0).ok().map(|v| v.iter().sum())
    }

    /// The tagged thread-group leaders, and whether any task is tagged:
    /// from the last walk of the tags map while the kernel has changed no
    /// tag since (see [`TaggedWalk`]), else from a new walk.
    fn tagged_leaders(&mut self) -> Option<(Vec<(u32, Tag)>, bool)> {
        // Read before the walk: a change during it changes the count, and
        // the next call walks again.
        let changes = self.tag_changes();
        if let (Some(c), Some(w)) = (changes, &self.tagged) {
            if w.changes == c && w.walked.elapsed() < TAG_WALK_MAX_AGE {
                return Some((w.leaders.clone(), w.any));
            }
        }
        let entries: Vec<(u32, Tag)> = self.tags()?.iter().filter_map(Result::ok).collect();
        let any = !entries.is_empty();
        let leaders: Vec<(u32, Tag)> = entries.into_iter().filter(|(tid, _)| procfs::tgid_of(*tid) == Some(*tid)).collect();
        self.tagged = changes.map(|changes| TaggedWalk { changes, walked: std::time::Instant::now(), leaders: leaders.clone(), any });
        Some((leaders, any))
    }

    /// A tagged process was found outside its session cgroup (it moved, or
    /// was moved): say so; the caller moves it back.
    fn log_escape(&mut self, session: &Session, pid: u32, tag: Tag, left_to: &str, detected: &str) {
        tracing::warn!(pid, agent = session.agent, left_to, "tagged process left its session cgroup; moving it back");
        let rec = json!({
            "time": events::rfc3339(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)),
            "kind": "cgroup_escape",
            "agent": session.agent,
            "agent_id": tag.agent_id,
            "session": tag.session_id,
            "pid": pid,
            "left_to": left_to,
            "detected": detected,
            "enforcement": "contained",
        });
        let _ = self.log.append(&rec);
    }

    /// Runs of the programs the kernel skipped since the last read
    /// (skips.rs): repaired where the class allows (the directory cache
    /// flushed, the sessions' processes tagged again), then warned about
    /// and logged, one `skipped_runs` event per program.
    fn check_skips(&mut self) {
        use crate::loader::ActionClass;
        let skipped = self.skips.poll();
        if skipped.is_empty() {
            return;
        }
        let flushed = skipped.iter().any(|s| s.class == ActionClass::FileCache).then(|| {
            compile::bump_file_generation(&mut self.ebpf).map_err(|e| {
                tracing::error!(error = %e, "cannot flush the kernel's directory cache");
                e.to_string()
            })
        });
        let retagged = skipped.iter().any(|s| s.class == ActionClass::Tagging).then(|| self.retag_sessions());
        for s in skipped {
            let remedy = match (s.class, &flushed, retagged) {
                (ActionClass::FileCache, Some(Ok(())), _) => "the directory cache was flushed".to_owned(),
                (ActionClass::FileCache, Some(Err(e)), _) => format!("the directory cache could NOT be flushed: {e}"),
                (ActionClass::Tagging, _, Some(n)) => format!("the sessions' processes were tagged again from their cgroups ({n} untagged found)"),
                _ => "none".to_owned(),
            };
            let when = if s.while_no_daemon { " while no daemon was reading (before this start)" } else { "" };
            tracing::warn!(program = s.program, skipped = s.skipped, total = s.total, remedy, "the kernel skipped runs of a program{when}: {}", s.risk());
            let _ = self.log.append(&json!({
                "kind": "skipped_runs",
                "program": s.program,
                "class": s.class,
                "skipped": s.skipped,
                "skipped_total": s.total,
                "while_no_daemon": s.while_no_daemon,
                "risk": s.risk(),
                "remedy": remedy,
            }));
        }
        self.skips.reported();
    }

    /// Drop the tags of `pid`'s tasks, and of `pid` itself.
    fn untag_tids(&mut self, pid: u32) {
        let mut tids = procfs::tids(pid);
        tids.push(pid);
        self.tagged = None;
        if let Some(mut tags) = self.tags() {
            for tid in tids {
                let _ = tags.remove(&tid);
            }
        }
        self.tags_changed();
    }

    fn is_tagged(&mut self, pid: u32) -> bool {
        self.tags().is_some_and(|t| t.get(&pid, 0).is_ok())
    }

    fn has_tag(&mut self, pid: u32, tag: Tag) -> bool {
        self.tags().and_then(|t| t.get(&pid, 0).ok()) == Some(tag)
    }
}

/// Tag agents that were running before the daemon started, and all their
/// descendants. Two passes: a child forked while the first pass ran is found
/// by the second (after its parent was tagged, the kernel tags new children).
fn adopt_existing(s: &mut State) -> usize {
    let me = std::process::id();
    // Judge from the first moment: hooks before tags.
    if s.policies.agents.values().any(|a| !a.selectors.is_empty()) {
        s.ensure_live_hooks();
    }
    let mut adopted = 0;
    for _pass in 0..2 {
        let procs: Vec<_> = procfs::pids().into_iter().filter(|p| *p != me).filter_map(procfs::read).collect();
        let by_pid: BTreeMap<u32, &procfs::ProcInfo> = procs.iter().map(|p| (p.pid, p)).collect();
        // Roots: processes a selector matches.
        let mut tagged: BTreeMap<u32, Tag> = BTreeMap::new();
        for p in &procs {
            if let Some(agent) = match_selectors(&s.policies, p, &s.tree.root) {
                let session = p.pid;
                tagged.insert(p.pid, Tag { agent_id: agent, session_id: session });
            }
        }
        // Descendants inherit, nearest tagged ancestor wins.
        for p in &procs {
            if tagged.contains_key(&p.pid) {
                continue;
            }
            let mut cur = p.ppid;
            let mut hops = 0;
            while cur > 1 && hops < 64 {
                if let Some(t) = tagged.get(&cur).copied() {
                    tagged.insert(p.pid, t);
                    break;
                }
                cur = by_pid.get(&cur).map_or(0, |q| q.ppid);
                hops += 1;
            }
        }
        for (pid, tag) in tagged {
            // A process that already exited (a zombie, or gone since the
            // scan) has had its exit hook: a tag now would outlive it and
            // pass to whatever reuses the pid.
            if procfs::is_zombie(pid) {
                continue;
            }
            let already = s.is_tagged(pid);
            let tagged_now = s.tag_tids(pid, tag);
            // It may have exited between the check and the tag (is_zombie
            // is also true for a process that is gone).
            if tagged_now > 0 && procfs::is_zombie(pid) {
                s.untag_tids(pid);
                continue;
            }
            if tagged_now > 0 && !already {
                adopted += 1;
                tracing::info!(pid, agent_id = tag.agent_id, "tagged an agent process that was already running");
                let rec = json!({
                    "time": events::rfc3339(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)),
                    "kind": "tag",
                    "agent": s.agent(tag.agent_id).map(|a| a.name.clone()),
                    "agent_id": tag.agent_id,
                    "session": tag.session_id,
                    "pid": pid,
                    "ppid": by_pid.get(&pid).map(|p| p.ppid),
                    "reason": "already running when the daemon started",
                });
                let _ = s.log.append(&rec);
            }
            s.contain(pid, tag);
        }
    }
    let _ = s.log.flush();
    adopted
}

/// Which agent a running process belongs to, by the policy's selectors.
pub fn match_selectors(set: &PolicySet, p: &procfs::ProcInfo, cgroup_root: &Path) -> Option<u32> {
    set.agents.values().find_map(|a| {
        let sel = &a.selectors;
        let exe_hit = p.exe.as_ref().is_some_and(|exe| {
            sel.exe.iter().any(|e| {
                e == exe || std::fs::canonicalize(e).is_ok_and(|r| r.to_string_lossy() == *exe)
            })
        });
        let comm_hit = sel.comm.iter().any(|c| {
            let c = &c.as_bytes()[..c.len().min(agentguard_common::limits::COMM_LEN - 1)];
            c == p.comm.as_bytes()
        });
        let uid_hit = sel.uid.contains(&p.uid);
        let cg_hit = p.cgroup.as_ref().is_some_and(|cg| {
            sel.cgroup.iter().any(|c| cg == c || cg.starts_with(&format!("{}/", c.trim_end_matches('/'))))
                || sel.unit.iter().any(|u| {
                    cgroups::find_unit(cgroup_root, u, 6).is_some_and(|dir| {
                        let rel = format!("/{}", dir.strip_prefix(cgroup_root).unwrap_or(&dir).display());
                        cg == &rel || cg.starts_with(&format!("{rel}/"))
                    })
                })
        });
        (exe_hit || comm_hit || uid_hit || cg_hit).then_some(a.id)
    })
}

// ---- reconciliation -------------------------------------------------------

/// Reconciliation's pace while any process is tagged or any session is
/// open: escapes are moved back within this where the kernel does not
/// report cgroup moves, and while none is (an idle host's daemon wakes as
/// little as it can: B8).
const RECONCILE: Duration = Duration::from_millis(500);
const RECONCILE_IDLE: Duration = Duration::from_secs(2);
/// The pace while an agent is live where the cgroup_attach_task probe
/// reports its cgroup moves as they happen: reconciliation is then the
/// backstop (a notification lost with a full ring), ends sessions and
/// expires approvals.
const RECONCILE_OBSERVED: Duration = Duration::from_secs(1);

async fn reconcile_loop(state: Shared) -> anyhow::Result<()> {
    let observed = crate::loader::cgroup_moves_observed(&lock(&state).probes);
    let busy_pace = if observed { RECONCILE_OBSERVED } else { RECONCILE };
    loop {
        let busy = {
            let mut s = lock(&state);
            reconcile(&mut s);
            !s.sessions.is_empty() || s.tagged_leaders().is_some_and(|(_, any)| any)
        };
        tokio::time::sleep(if busy { busy_pace } else { RECONCILE_IDLE }).await;
    }
}

/// Re-resolve each policy host name when its DNS answer expires (dns.rs);
/// the lookups run without the state lock.
async fn dns_refresh_loop(state: Shared) -> anyhow::Result<()> {
    let (servers, policy_changed) = {
        let s = lock(&state);
        (s.config.dns_servers.clone(), s.policy_changed.clone())
    };
    let resolver = match crate::dns::resolver(&servers) {
        Ok(r) => r,
        Err(e) => {
            // Not fatal: the names keep the addresses load and reload gave them.
            tracing::warn!("no DNS resolver configuration ({e:#}): policy host names are resolved at load and reload only, not refreshed within their TTL");
            std::future::pending::<()>().await;
            unreachable!("pending never completes");
        }
    };
    let mut schedule = crate::dns::Schedule::default();
    loop {
        let hosts: Vec<String> = lock(&state).policies.hosts().cloned().collect();
        let mut fresh = Resolved::new();
        for host in schedule.due(&hosts, tokio::time::Instant::now()) {
            match crate::dns::lookup(&resolver, &host).await {
                Ok((addrs, ttl)) => {
                    schedule.set(host.clone(), tokio::time::Instant::now() + ttl);
                    fresh.insert(host, addrs);
                }
                Err(e) => {
                    tracing::warn!(host, "host name does not resolve ({e}); keeping its previous addresses");
                    schedule.set(host, tokio::time::Instant::now() + crate::dns::RETRY);
                }
            }
        }
        if !fresh.is_empty() {
            lock(&state).refresh_hosts(fresh);
        }
        // Sleep until the next name is due (no sooner than MIN_REFRESH), or
        // until a reload brings other names: with none, the task sleeps (B8).
        let now = tokio::time::Instant::now();
        let wake = schedule.next().map(|t| t.max(now + crate::dns::MIN_REFRESH));
        tokio::select! {
            () = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {}
            () = policy_changed.notified() => {}
        }
    }
}

impl State {
    /// New addresses for some host names: recompile the network tries if
    /// any changed, and log what changed.
    fn refresh_hosts(&mut self, fresh: Resolved) {
        let changed: Vec<(String, Vec<std::net::IpAddr>)> =
            fresh.into_iter().filter(|(h, a)| self.resolved.get(h) != Some(a) && !a.is_empty()).collect();
        if changed.is_empty() {
            return;
        }
        let mut next = self.resolved.clone();
        next.extend(changed.iter().cloned());
        if let Err(e) = compile::apply_network(&mut self.ebpf, &mut self.written, &self.policies, &next) {
            tracing::error!("host addresses changed but the network rules cannot be recompiled: {e}; the previous addresses stay in force");
            return;
        }
        for (host, addrs) in changed {
            tracing::info!(host, ?addrs, "host name resolves to new addresses; network rules updated");
            let _ = self.log.append(&json!({
                "time": events::rfc3339(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)),
                "kind": "host_addresses",
                "name": host,
                "addresses": addrs,
                "previous": self.resolved.get(&host),
            }));
        }
        let _ = self.log.flush();
        self.resolved = next;
    }
}

/// Keep every tagged process in its session cgroup (moving back any that
/// left, and logging the attempt), and drop sessions whose processes are gone.
fn reconcile(s: &mut State) {
    let Some((leaders, _)) = s.tagged_leaders() else { return };
    for (pid, tag) in leaders {
        s.keep_in_session(pid, tag, "reconcile");
    }
    s.release_live_hooks_if_idle();
    s.expire_approvals();
    // Sessions whose cgroup emptied: forget them and their selector.
    let gone: Vec<u32> = s
        .sessions
        .values()
        .filter(|sess| !cgroups::populated(&sess.cgroup))
        .map(|sess| sess.id)
        .collect();
    for id in gone {
        if let Some(sess) = s.sessions.remove(&id) {
            if std::fs::remove_dir(&sess.cgroup).is_err() {
                // Something still lives there; keep tracking it.
                s.sessions.insert(id, sess);
                continue;
            }
            // Its processes are gone: account for its allowed flows and
            // free their room in the kernel.
            s.log.end_session_flows(id, &s.policies);
            if sess.kind == "run" {
                let _ = s.resync_selectors();
            }
        }
    }
    s.save_sessions();
    let _ = s.log.flush();
}

impl State {
    /// Keep tagged process `pid` in its session's cgroup: move it back (and
    /// log the escape) if it left; a process of no known session is
    /// contained in a new one. `detected`: what found it, `cgroup_move` (the
    /// cgroup_attach_task probe, as it happened) or `reconcile` (the
    /// periodic check; `contain` reports `fork_exec`).
    fn keep_in_session(&mut self, pid: u32, tag: Tag, detected: &str) {
        let Some(session) = self.sessions.get(&tag.session_id).cloned() else {
            self.contain(pid, tag);
            return;
        };
        let want = format!("0::{}", self.tree.relative(&session.cgroup));
        let current = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        // has_tag: the caller's view may be stale (see `contain`).
        // A zombie reports the root cgroup: it has left, but not by moving.
        if !current.lines().any(|l| l == want) && !current.is_empty() && !procfs::is_zombie(pid) && self.has_tag(pid, tag) {
            let left_to = current.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("?").to_owned();
            if session.origin.as_deref() != Some(left_to.as_str()) {
                self.log_escape(&session, pid, tag, &left_to, detected);
            }
            if let Err(e) = CgroupTree::move_pid(&session.cgroup, pid) {
                tracing::error!(pid, error = %e, "cannot move the process back");
            }
        }
    }

    fn run_session_selectors(&self) -> BTreeMap<u64, Tag> {
        self.sessions
            .values()
            .filter(|s| s.kind == "run")
            .map(|s| (s.cgroup_id, Tag { agent_id: s.agent_id, session_id: s.id }))
            .collect()
    }

    fn resync_selectors(&mut self) -> anyhow::Result<()> {
        let sessions = self.run_session_selectors();
        let root = self.tree.root.clone();
        compile::apply(&mut self.ebpf, &mut self.written, &self.policies, &root, &sessions, &self.resolved)?;
        self.sync_workspaces(&self.policies.clone())?;
        Ok(())
    }

    /// Create a run session and move the requesting process (the `agentguard
    /// run` launcher, about to exec the agent) into its cgroup. The daemon
    /// does the move so an unprivileged launcher needs no cgroup rights.
    fn new_session(&mut self, agent_name: &str, workspace: Option<PathBuf>, peer: Option<i32>) -> anyhow::Result<Session> {
        let peer = peer
            .and_then(|p| u32::try_from(p).ok())
            .context("cannot identify the launcher process (no SO_PEERCRED pid)")?;
        let agent = self
            .policies
            .for_run(agent_name)
            .with_context(|| format!("no policy declares agent {agent_name:?} and none is marked `fallback = true`"))?
            .clone();
        let id = RUN_SESSION_BIT | self.next_run;
        self.next_run += 1;
        // Named after what the user asked for, so `freeze NAME` finds it.
        let (dir, cgroup_id) = self.tree.ensure_session(agent_name, id)?;
        let session = Session {
            id,
            agent: agent_name.to_owned(),
            agent_id: agent.id,
            cgroup: dir,
            cgroup_id,
            workspace,
            kind: "run",
            origin: None,
        };
        self.sessions.insert(id, session.clone());
        self.save_sessions();
        self.ensure_live_hooks();
        if !self.live.attached() {
            anyhow::bail!("the network hooks cannot be attached; refusing to start an unjudged agent");
        }
        // The selector first, then the move: the launcher's exec, which comes
        // after our answer, is what tags it.
        self.resync_selectors()?;
        CgroupTree::move_pid(&session.cgroup, peer)
            .with_context(|| format!("cannot move launcher {peer} into {}", session.cgroup.display()))?;
        Ok(session)
    }

    /// Compile a prepared policy into the maps and switch to it. On an error
    /// the previous policy stays in force (a map too full for both versions
    /// keeps the new entries written so far beside the old ones:
    /// docs/operations.md, "Changing policy").
    fn reload_commit(&mut self, prepared: PreparedPolicy) -> anyhow::Result<serde_json::Value> {
        systemd::reloading();
        let result = self.reload_commit_inner(prepared);
        systemd::ready(&format!("enforcing for {} agent policies", self.policies.agents.len()));
        result
    }

    fn reload_commit_inner(&mut self, prepared: PreparedPolicy) -> anyhow::Result<serde_json::Value> {
        let PreparedPolicy { policies, resolved, problems, started, parsed } = prepared;
        for p in &problems {
            tracing::warn!("{p}");
        }
        let sessions = self.run_session_selectors();
        let root = self.tree.root.clone();
        let compiling = std::time::Instant::now();
        compile::apply(&mut self.ebpf, &mut self.written, &policies, &root, &sessions, &resolved)?;
        self.sync_workspaces(&policies)?;
        let compiled = compiling.elapsed();
        self.policies = policies;
        self.resolved = resolved;
        self.policy_version += 1;
        self.policy_changed.notify_one();
        let agents: Vec<_> = self.policies.agents.keys().cloned().collect();
        let _ = self.log.append(&json!({
            "time": events::rfc3339(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)),
            "kind": "policy_reload",
            "agents": agents,
        }));
        let _ = self.log.flush();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        let timing = json!({ "parse_ms": ms(parsed), "compile_ms": ms(compiled), "total_ms": ms(started.elapsed()) });
        tracing::info!(?agents, %timing, "policy reloaded");
        Ok(json!({ "agents": agents, "warnings": problems, "policy_version": self.policy_version, "policy_hash": self.policies.hash, "timing": timing }))
    }

    fn ps(&mut self) -> serde_json::Value {
        let tagged: Vec<(u32, Tag)> = self.tags().map(|t| t.iter().filter_map(Result::ok).collect()).unwrap_or_default();
        let mut threads_tagged: BTreeMap<u32, usize> = BTreeMap::new();
        for (tid, _) in &tagged {
            if let Some(pid) = procfs::tgid_of(*tid) {
                *threads_tagged.entry(pid).or_default() += 1;
            }
        }
        let mut procs = Vec::new();
        for (tid, tag) in tagged {
            if procfs::tgid_of(tid) != Some(tid) {
                continue;
            }
            let Some(info) = procfs::read(tid) else { continue };
            procs.push(json!({
                "agent": self.agent(tag.agent_id).map(|a| a.name.clone()),
                "agent_id": tag.agent_id,
                "session": tag.session_id,
                "pid": info.pid,
                "ppid": info.ppid,
                "exe": info.exe,
                "argv": info.argv,
                "start_ticks": info.start_ticks,
                "cgroup": info.cgroup,
                "threads": procfs::tids(tid).len(),
                "threads_tagged": threads_tagged.get(&tid).copied().unwrap_or(0),
            }));
        }
        json!({ "sessions": self.sessions.values().collect::<Vec<_>>(), "processes": procs })
    }

    fn status(&mut self) -> serde_json::Value {
        let counters = read_counters(&self.ebpf);
        let mut v = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "daemon_pid": std::process::id(),
            "agents": self.policies.agents.keys().collect::<Vec<_>>(),
            "sessions": self.sessions.len(),
            "probes": self.probes,
            "file_enforcement": self.file_enforcement(),
            "events_logged": self.events_logged,
            "decode_errors": self.decode_errors,
            "cgroup_moves_reported": self.cgroup_moves_reported,
            // The daemon's scheduling priority now (config `priority_boost`).
            // SAFETY: plain syscall; errno is not consulted (-1 is a valid nice).
            "nice": unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) },
            "approvals_pending": self.approvals.pending.len(),
            "kernel_counters": counters,
            // Runs the kernel skipped, per watched program (skips.rs; null
            // where the kernel does not count them).
            "skipped_runs": self.skips.totals(),
            // The kernel's directory cache for file decisions: its entries
            // are used only while this is the generation they were stamped
            // with (0: off).
            "file_cache_generation": compile::file_generation(&self.ebpf),
            "audit": self.log.status(),
        });
        self.status_ops(&mut v);
        v
    }
}

fn read_counters(ebpf: &Ebpf) -> serde_json::Value {
    use agentguard_common::Counter;
    let Some(map) = ebpf.map(maps::COUNTERS) else { return json!(null) };
    let Ok(arr) = aya::maps::PerCpuArray::<_, u64>::try_from(map) else { return json!(null) };
    let sum = |c: Counter| arr.get(&(c as u32), 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
    json!({
        "ringbuf_drops": sum(Counter::RingbufDrops),
        "tag_insert_failures": sum(Counter::TagInsertFailures),
        "events_submitted": sum(Counter::EventsSubmitted),
        "self_protect_denials": sum(Counter::SelfProtectDenials),
        "flows_full": sum(Counter::FlowsFull),
        "tag_changes": sum(Counter::TagChanges),
        "file_allowed_repeats": sum(Counter::FileAllowedRepeats),
        "file_scratch_busy": sum(Counter::FileScratchBusy),
    })
}

// ---- control socket --------------------------------------------------------

/// A policy directory read, parsed and checked, its host names resolved:
/// everything a reload does before it needs the daemon's state.
struct PreparedPolicy {
    policies: PolicySet,
    resolved: Resolved,
    problems: Vec<String>,
    started: std::time::Instant,
    parsed: Duration,
}

fn prepare_policy(dir: &Path, previous: &Resolved) -> anyhow::Result<PreparedPolicy> {
    let started = std::time::Instant::now();
    let policies = policy::load_dir(dir).map_err(|e| anyhow::anyhow!("{e}\npolicy rejected; the previous policy stays in force"))?;
    let parsed = started.elapsed();
    let (resolved, problems) = netrules::resolve_hosts(policies.hosts(), previous);
    Ok(PreparedPolicy { policies, resolved, problems, started, parsed })
}

/// One reload at a time: two overlapping ones could otherwise commit in the
/// opposite order to the one they read the files in.
static RELOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `agentguard reload` and SIGHUP: read, parse and check the policy (and
/// resolve its host names) in the blocking pool, without the state lock, so
/// the event log, the killswitch and approvals go on meanwhile; then compile
/// and switch under the lock.
async fn reload(state: &Shared) -> anyhow::Result<serde_json::Value> {
    let _one = RELOADING.lock().await;
    let (dir, resolved) = {
        let s = lock(state);
        (s.config.policy_dir.clone(), s.resolved.clone())
    };
    let prepared = tokio::task::spawn_blocking(move || prepare_policy(&dir, &resolved))
        .await
        .map_err(|e| anyhow::anyhow!("policy preparation failed: {e}; the previous policy stays in force"))??;
    lock(state).reload_commit(prepared)
}

async fn serve_socket(listener: UnixListener, state: Shared) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_client(stream, state).await {
                tracing::debug!(error = %e, "control client");
            }
        });
    }
}

async fn handle_client(stream: UnixStream, state: Shared) -> anyhow::Result<()> {
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let refusal = {
        let mut s = lock(&state);
        peer_refusal(&mut s, cred.uid(), cred.gid(), cred.pid())
    };
    let response = match refusal {
        Some(why) => {
            tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), why, "control request refused");
            Response::err(why)
        }
        None => {
            let mut line = String::new();
            BufReader::new(read).read_line(&mut line).await?;
            match serde_json::from_str::<Request>(&line) {
                Err(e) => Response::err(format!("malformed request: {e}")),
                Ok(Request::Reload) => match reload(&state).await {
                    Ok(v) => Response::ok(v),
                    Err(e) => Response::err(format!("{e:#}")),
                },
                Ok(req) => dispatch(&mut lock(&state), req, cred.pid()),
            }
        }
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

/// Why this peer may not use the socket, if it may not.
fn peer_refusal(s: &mut State, uid: u32, gid: u32, pid: Option<i32>) -> Option<String> {
    let group_ok = s.config.socket_group.as_ref().is_some_and(|g| {
        nix::unistd::Group::from_name(g).ok().flatten().is_some_and(|g| g.gid.as_raw() == gid)
    });
    if uid != 0 && !group_ok {
        return Some("only root or the configured socket_group may use the AgentGuard control socket".into());
    }
    let Some(pid) = pid.and_then(|p| u32::try_from(p).ok()) else {
        return Some("cannot identify the calling process (no SO_PEERCRED pid)".into());
    };
    if s.is_tagged(pid) {
        return Some("refused: the caller is a process of an agent; agents cannot control AgentGuard".into());
    }
    None
}

fn dispatch(s: &mut State, req: Request, peer: Option<i32>) -> Response {
    match req {
        Request::Status => Response::ok(s.status()),
        Request::Reload => Response::err("internal: reload is served by handle_client"),
        Request::Ps => Response::ok(s.ps()),
        Request::Stop { unload } => s.stop(unload),
        Request::Freeze { target, reason } => s.killswitch_request(Action::Freeze, &target, reason.as_deref(), peer),
        Request::Thaw { target, reason } => s.killswitch_request(Action::Thaw, &target, reason.as_deref(), peer),
        Request::Kill { target, reason } => s.killswitch_request(Action::Kill, &target, reason.as_deref(), peer),
        Request::Approvals => s.approvals_list(),
        Request::Approve { id, grant } => s.approve(id, grant, peer),
        Request::Deny { id, kill } => s.deny(id, kill, peer),
        Request::NewSession { agent, workspace } => match s.new_session(&agent, workspace, peer) {
            Ok(session) => Response::ok(json!({
                "landlock": s.landlock_paths(&session),
                "session": session.id,
                "agent": session.agent,
                "agent_id": session.agent_id,
                "cgroup": session.cgroup,
            })),
            Err(e) => Response::err(format!("{e:#}")),
        },
    }
}

// ---- killswitch ------------------------------------------------------------

use crate::{
    incident::Actor,
    killswitch::{self, Action, ActionResult, IncidentSink, Killswitch, KillswitchError, Target},
};

impl State {
    /// A freeze, thaw or kill from the control socket. `peer_refusal` has
    /// already refused tagged callers; a caller that lives inside the
    /// subtree is refused here as well (see
    /// `killswitch::refuse_caller_inside_subtree`).
    fn killswitch_request(&mut self, action: Action, target: &Target, reason: Option<&str>, peer: Option<i32>) -> Response {
        let Some(caller) = peer.and_then(|p| u32::try_from(p).ok()).and_then(procfs::read) else {
            return Response::err("cannot identify the calling process (no SO_PEERCRED pid, or it exited)");
        };
        if let Err(e) = killswitch::refuse_caller_inside_subtree(&self.config.cgroup_subtree, caller.cgroup.as_deref()) {
            tracing::warn!(pid = caller.pid, action = action.name(), "killswitch request refused: caller inside the subtree");
            return Response::err(e.to_string());
        }
        match self.killswitch(action, target, &Actor::from_proc(&caller), reason) {
            Ok(results) => Response::ok(json!({ "results": results })),
            Err(e) => Response::err(e.to_string()),
        }
    }

    /// Freeze `agent` at once on the daemon's own initiative, with its
    /// incident record and event: the hook for rules that freeze on
    /// violation (the file fallback's containment, approvals).
    pub fn freeze_agent(&mut self, agent: &str, reason: &str) -> Result<ActionResult, KillswitchError> {
        let target = Target::Agent(agent.to_owned());
        let mut results = self.killswitch(Action::Freeze, &target, &Actor::this_process(), Some(reason))?;
        results.pop().ok_or_else(|| KillswitchError::UnknownAgent {
            agent: agent.to_owned(),
            base: self.tree.base.clone(),
            existing: Vec::new(),
        })
    }

    /// Act, write the incidents, log one event per agent.
    fn killswitch(&mut self, action: Action, target: &Target, by: &Actor, reason: Option<&str>) -> Result<Vec<ActionResult>, KillswitchError> {
        // The incident quotes the last minute of the log from the file.
        if let Err(e) = self.log.flush() {
            tracing::error!(error = %e, "cannot write the event log");
        }
        let ks = Killswitch::new(&self.tree.root, &self.config.cgroup_subtree);
        let sink = IncidentSink { dir: &self.config.incident_dir, events_log: &self.config.events_log, recorded_by: "daemon" };
        let results = killswitch::perform(&ks, action, target, by, reason, &sink)?;
        for r in &results {
            let o = &r.outcome;
            tracing::warn!(action = action.name(), agent = o.agent, processes = o.processes, elapsed_us = o.elapsed_us, confirmed = o.confirmed, by_pid = by.pid, reason, "killswitch");
            let agent_id = self.policies.for_run(&o.agent).map(|a| a.id);
            if let Err(e) = self.log.append(&killswitch::event(r, by, reason, agent_id)) {
                tracing::error!(error = %e, "cannot append to the event log");
            }
        }
        if let Err(e) = self.log.flush() {
            tracing::error!(error = %e, "cannot write the event log");
        }
        Ok(results)
    }
}

// ---- files: workspaces and the fallback's containment ----------------------

impl State {
    /// The `{workspace}` rules of every run session that has a workspace.
    fn sync_workspaces(&mut self, policies: &PolicySet) -> anyhow::Result<()> {
        let workspaces = self
            .sessions
            .values()
            .filter(|s| s.kind == "run")
            .filter_map(|s| Some((s.id, (s.agent_id, s.workspace.clone()?))))
            .collect();
        crate::filemaps::apply_workspaces(&mut self.ebpf, policies, &workspaces)?;
        Ok(())
    }

    /// The paths the launcher of a run session protects with Landlock:
    /// only where BPF-LSM does not veto. Where it does, it is the stronger
    /// and logged veto, and Landlock, which runs before it in the kernel's
    /// LSM order, would refuse first and leave no event.
    fn landlock_paths(&self, session: &Session) -> Vec<String> {
        if loader::file_enforcement(&self.probes) == loader::FileEnforcement::Veto {
            return Vec::new();
        }
        self.policies
            .by_id(session.agent_id)
            .map(|a| crate::filerules::landlock_protected(a, session.workspace.as_deref()))
            .unwrap_or_default()
    }

    /// How file actions are enforced here, for `status`.
    fn file_enforcement(&self) -> serde_json::Value {
        let mode = loader::file_enforcement(&self.probes);
        json!({
            "mode": mode,
            "enforced": mode == loader::FileEnforcement::Veto,
            "observation_attached": self.live.observing(),
            // Repeated allowed actions in one directory answered without a
            // walk (docs/architecture.md, "The directory cache").
            "directory_cache": loader::dircache_ready(&self.probes),
            "detail": match mode {
                loader::FileEnforcement::Veto => "BPF-LSM: file actions of agents are vetoed in the kernel",
                loader::FileEnforcement::ObserveAndContain => "no BPF-LSM: file actions are observed (syscall tracepoints, while an agent is live) and contained, not vetoed: the agent is stopped at its first violating action and frozen; agents started with `agentguard run` also get Landlock rules",
                loader::FileEnforcement::None => "file actions of agents are neither vetoed nor observed on this kernel",
            },
        })
    }

    /// The fallback observed a violating file action: the kernel program
    /// already stopped the process (SIGSTOP); freeze the whole agent, then
    /// let the stopped process continue into the frozen state, so that a
    /// `thaw` after review resumes it.
    fn contain_file_violation(&mut self, f: &agentguard_common::FileEvent) {
        let blocks = agentguard_common::Decision::from_u32(f.decision).is_some_and(agentguard_common::Decision::blocks);
        // Held actions are approvals.rs's (which freezes and continues the process).
        let approve = f.decision == agentguard_common::Decision::Approve as u32;
        if f.enforcement != agentguard_common::Enforcement::Observed as u32 || !blocks || approve {
            return;
        }
        let h = f.header;
        let name = match self.sessions.get(&h.session_id) {
            Some(s) => s.agent.clone(),
            None => match self.agent(h.agent_id) {
                Some(a) => a.name.clone(),
                None => return,
            },
        };
        let already = std::fs::read_to_string(self.tree.agent_dir(&name).join("cgroup.freeze"))
            .is_ok_and(|v| v.trim() == "1");
        if !already {
            let path = crate::decode::c_str(&f.dir);
            let reason = format!(
                "file fallback: pid {} attempted {} on {path} ({}); observed, not vetoed, so the agent is contained",
                h.pid,
                crate::events::file_action(f.op),
                if f.decision == agentguard_common::Decision::Approve as u32 { "needs approval" } else { "denied" },
            );
            match self.freeze_agent(&name, &reason) {
                Ok(r) => tracing::warn!(agent = name, pid = h.pid, processes = r.outcome.processes, "file violation contained: agent frozen"),
                Err(e) => tracing::error!(agent = name, pid = h.pid, error = %e, "file violation: cannot freeze the agent; its offending process stays stopped"),
            }
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(h.pid as i32), nix::sys::signal::Signal::SIGCONT);
    }
}
