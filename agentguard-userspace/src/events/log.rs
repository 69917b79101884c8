//! The event log as the daemon uses it: records in, chained lines out
//! ([`crate::audit::writer`]); loss accounting; the fail-closed switch in the
//! kernel; the periodic `loss` event; the log's part of `agentguard status`.
//!
//! Loss is never silent. Ring-buffer reservation failures are counted per
//! CPU by the kernel; events decoded but not written (undecodable records,
//! failed writes) are counted here. Whenever either count grows, a `loss`
//! event says by how much, as soon as the log can be written again.
use std::{
    io,
    time::{Duration, Instant},
};

use agentguard_common::{maps, StateSlot};
use aya::{
    maps::{Array, Map, MapData, PerCpuArray},
    Ebpf,
};
use serde::Serialize;
use serde_json::{json, Map as JsonMap, Value};
use thiserror::Error;

use super::{
    flow_repeats_record,
    flows::{Flows, Repeats},
    latency::Histogram,
    lineage::ProcTable,
    now_ns, now_rfc3339, record, Clock,
};
use crate::{
    audit::{
        to_hex,
        writer::{ChainWriter, Opened, PushError, WriteFailure, WriterConfig},
        AuditError,
    },
    config::Config,
    decode::KernelEvent,
    policy::PolicySet,
};

/// How often the daemon calls [`EventLog::tick`] while the log has work
/// pending (an unsynced write, a loss to report, a failing log).
pub const TICK: Duration = Duration::from_millis(100);
/// How often it calls it when the log is settled ([`EventLog::settled`]):
/// an idle daemon wakes as little as it can (B8). Kernel ring drops are
/// still checked at this pace.
pub const IDLE_TICK: Duration = Duration::from_secs(1);
/// After draining a small batch (fewer than [`SMALL_BATCH`] events), the
/// daemon waits this long before draining again, so a trickle of events is
/// taken in batches: fewer wakeups of the daemon (and of the kernel's
/// ring-buffer notification) and one write(2) per batch. Adds at most this
/// (plus timer slack) to hook-to-line latency; under load there is no pause.
pub const BATCH_PAUSE: Duration = Duration::from_millis(1);
pub const SMALL_BATCH: usize = 256;
/// A `loss` event at most this often while losses continue.
const LOSS_INTERVAL: Duration = Duration::from_secs(1);

/// Fields every line carries; a userspace event that lacks one gets null.
const REQUIRED: &[&str] = &[
    "action", "agent", "session", "pid", "ppid", "lineage", "target", "decision", "rule", "reversibility", "rollback", "enforcement",
];

#[derive(Debug, Error)]
pub enum KernelMapError {
    #[error("the eBPF object has no map {0}: rebuild agentguard")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("{0}")]
    Program(String),
}

/// Events decoded but not recorded, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Drops {
    pub decode_error: u64,
    pub write_failed: u64,
}

impl Drops {
    pub fn total(&self) -> u64 {
        self.decode_error + self.write_failed
    }
}

struct KernelMaps {
    state: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
}

struct Failing {
    since: String,
    error: String,
}

pub struct EventLog {
    writer: ChainWriter,
    procs: ProcTable,
    kernel: Option<KernelMaps>,
    /// Allowed network flows counted by the kernel (flows.rs).
    flows: Option<Flows>,
    fail_closed: bool,
    body: Vec<u8>,
    drops: Drops,
    /// Totals as of the last `loss` event written: (kernel, userspace).
    reported: (u64, Drops),
    failing: Option<Failing>,
    /// A `loss` event is due now (recording just recovered).
    loss_due: bool,
    last_loss_check: Instant,
    /// Times the kernel's ring-overflow fail-closed flag was found set and cleared.
    ring_full_episodes: u64,
    opened: Opened,
    /// Hook times (wall ns) of the kernel events in the unwritten batch.
    batch_hook_ns: Vec<i128>,
    latency: Histogram,
    /// Signalled on every write, so the daemon's tick comes back to
    /// [`TICK`] for the fsync policy whoever wrote (see [`Self::written`]).
    written: std::sync::Arc<tokio::sync::Notify>,
}

impl EventLog {
    /// Open the log named by the configuration and continue its chain. A log
    /// found altered while no daemon ran is recorded (`audit_gap`) and
    /// reported; it does not stop the daemon.
    pub fn open(config: &Config) -> Result<Self, AuditError> {
        let cfg = WriterConfig {
            path: config.events_log.clone(),
            chain_head: config.chain_head.clone(),
            rotate_bytes: config.events_rotate_bytes,
            keep: config.events_rotate_keep,
            fsync_interval: Duration::from_millis(config.events_fsync_interval_ms),
        };
        let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
        let (writer, opened) = ChainWriter::open(cfg, &host)?;
        let mut log = Self {
            writer,
            procs: ProcTable::default(),
            kernel: None,
            flows: None,
            fail_closed: config.fail_closed,
            body: Vec::with_capacity(1024),
            drops: Drops::default(),
            reported: (0, Drops::default()),
            failing: None,
            loss_due: false,
            last_loss_check: Instant::now(),
            ring_full_episodes: 0,
            opened,
            batch_hook_ns: Vec::with_capacity(8192),
            latency: Histogram::default(),
            written: Default::default(),
        };
        if let Some(reason) = log.opened.mismatch.clone() {
            tracing::error!(log = %config.events_log.display(), %reason, "the event log was altered while no daemon was writing it; recorded as an audit_gap event");
            let _ = log.append(&json!({ "kind": "audit_gap", "reason": reason }));
        }
        let start = json!({
            "kind": "daemon_start",
            "version": env!("CARGO_PKG_VERSION"),
            "daemon_pid": std::process::id(),
            "continues_from": log.opened.continues_from,
            "repaired_bytes": log.opened.repaired_bytes,
            "fail_closed": config.fail_closed,
        });
        let _ = log.append(&start);
        let _ = log.flush();
        Ok(log)
    }

    /// Take the kernel's state map and a handle on its counters, and tell the
    /// kernel whether to fail closed.
    pub fn attach_kernel(&mut self, ebpf: &mut Ebpf) -> Result<(), KernelMapError> {
        let map_err = |name| move |source| KernelMapError::Map { name, source };
        let state = ebpf.take_map(maps::STATE).ok_or(KernelMapError::Missing(maps::STATE))?;
        let mut state: Array<MapData, u32> = Array::try_from(state).map_err(map_err(maps::STATE))?;
        let failing = u32::from(self.fail_closed && self.failing.is_some());
        for (slot, value) in [(StateSlot::FailClosed, u32::from(self.fail_closed)), (StateSlot::LogFailed, failing), (StateSlot::RingFull, 0)] {
            state.set(slot as u32, value, 0).map_err(map_err(maps::STATE))?;
        }
        // A second handle on the counters map: the daemon keeps its own.
        let id = match ebpf.map(maps::COUNTERS) {
            Some(Map::PerCpuArray(data)) => data.info().map_err(map_err(maps::COUNTERS))?.id(),
            _ => return Err(KernelMapError::Missing(maps::COUNTERS)),
        };
        let data = MapData::from_id(id).map_err(map_err(maps::COUNTERS))?;
        let counters = PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(maps::COUNTERS))?;
        self.kernel = Some(KernelMaps { state, counters });
        self.flows = Some(Flows::attach(ebpf)?);
        Ok(())
    }

    /// Append a userspace event (any JSON object with a `kind`). Fields every
    /// line carries are added when missing; `seq`, `prev` and `host` are the
    /// writer's alone.
    pub fn append(&mut self, event: &impl Serialize) -> io::Result<u64> {
        let mut v = serde_json::to_value(event).map_err(io::Error::other)?;
        let Value::Object(m) = &mut v else {
            return Err(io::Error::other("an event must be a JSON object"));
        };
        self.normalize(m);
        self.body.clear();
        serde_json::to_writer(&mut self.body, &v).map_err(io::Error::other)?;
        self.push_body()
    }

    fn normalize(&mut self, m: &mut JsonMap<String, Value>) {
        for k in ["seq", "prev", "host"] {
            m.remove(k);
        }
        m.entry("time").or_insert_with(|| now_rfc3339().into());
        let kind = m.entry("kind").or_insert_with(|| "unknown".into()).clone();
        m.entry("action").or_insert(kind);
        let pid = m.get("pid").and_then(Value::as_u64).and_then(|p| u32::try_from(p).ok());
        let session = m.get("session").and_then(Value::as_u64).and_then(|s| u32::try_from(s).ok()).unwrap_or(0);
        if let Some(pid) = pid {
            if !m.contains_key("ppid") {
                m.insert("ppid".into(), self.procs.ppid(pid, session).into());
            }
            if !m.contains_key("lineage") {
                m.insert("lineage".into(), self.procs.lineage(pid, session).into());
            }
        }
        for k in REQUIRED {
            m.entry(*k).or_insert(Value::Null);
        }
    }

    /// The parent and ancestors of `pid` as the log records them.
    pub fn ancestry(&mut self, pid: u32, session: u32) -> (Option<u32>, Vec<u32>) {
        (self.procs.ppid(pid, session), self.procs.lineage(pid, session))
    }

    /// Append a kernel event, enriched.
    pub fn append_kernel(&mut self, ev: &KernelEvent, policies: &PolicySet, clock: &Clock) -> io::Result<u64> {
        let h = *ev.header();
        match ev {
            KernelEvent::Fork(f) => self.procs.on_fork(h.pid, f.child_tid, h.session_id),
            KernelEvent::Exec(e) => self.procs.on_exec(h.pid, h.session_id, e.newly_tagged != 0),
            _ => {}
        }
        let (ppid, lineage) = self.procs.ancestry(h.pid, h.session_id);
        let rec = record(ev, policies, clock, ppid, std::borrow::Cow::Borrowed(lineage));
        let pushed = self.writer.push_fields(|out| rec.write_fields(out));
        let hook_ns = rec.wall_ns;
        if let KernelEvent::Exit(_) = ev {
            self.procs.on_exit(h.pid);
        }
        let seq = match pushed {
            Ok(seq) => seq,
            Err(e) => return Err(self.push_failed(e)),
        };
        self.batch_hook_ns.push(hook_ns);
        if let (KernelEvent::Net(n), Some(flows)) = (ev, self.flows.as_mut()) {
            if n.flow == agentguard_common::NET_FLOW_FIRST {
                let key = agentguard_common::FlowKey {
                    pid: h.pid,
                    session_id: h.session_id,
                    agent_id: h.agent_id,
                    _pad: 0,
                    hook: n.hook,
                    protocol: n.protocol,
                    family: n.family,
                    port: n.port,
                    addr: n.addr,
                    uid: h.uid,
                };
                flows.ledger.first(key, hook_ns);
            }
        }
        Ok(seq)
    }

    /// Log the repeats of allowed flows the kernel counted (flows.rs), and
    /// remove the flows of processes that are gone.
    fn sweep_flows(&mut self, policies: &PolicySet, force: bool) {
        let failing = self.failing.is_some();
        let Some(flows) = self.flows.as_mut() else { return };
        // While the log cannot be written the kernel keeps counting.
        if failing || !(force || flows.due(Instant::now())) {
            return;
        }
        let (repeats, idle_dead) = flows.sweep(now_ns());
        if self.write_repeats(&repeats, policies) {
            if let Some(flows) = self.flows.as_mut() {
                flows.remove(&idle_dead);
            }
        }
    }

    /// A session ended: log what its flows repeated since the last sweep and
    /// remove them from the kernel.
    pub fn end_session_flows(&mut self, session: u32, policies: &PolicySet) {
        if self.failing.is_some() {
            // Kept until the log can account for them (removed at a later
            // session end of the same id, or when idle and dead).
            return;
        }
        let Some(flows) = self.flows.as_mut() else { return };
        let (repeats, keys) = flows.settle_session(session, now_ns());
        if self.write_repeats(&repeats, policies) {
            if let Some(flows) = self.flows.as_mut() {
                flows.remove(&keys);
            }
        }
    }

    /// Write `repeats` lines; true when they were all written (and the
    /// account recorded in the kernel). A line that could not be written is
    /// put back in the account: the kernel keeps counting, and its repeats
    /// are logged once the log recovers, so nothing is lost or counted twice.
    fn write_repeats(&mut self, repeats: &[Repeats], policies: &PolicySet) -> bool {
        if repeats.is_empty() {
            return true;
        }
        // The batch then holds only these lines: whatever a failed write
        // drops from now on is one of them.
        if self.flush().is_err() {
            self.revert_repeats(repeats);
            return false;
        }
        let dropped_before = self.drops.write_failed;
        // The seq each line was given (None: not even buffered).
        let mut seqs = Vec::with_capacity(repeats.len());
        for r in repeats {
            let (ppid, lineage) = self.procs.ancestry(r.key.pid, r.key.session_id);
            let rec = flow_repeats_record(r, now_ns(), policies, ppid, std::borrow::Cow::Borrowed(lineage));
            match self.writer.push_fields(|out| rec.write_fields(out)) {
                Ok(seq) => seqs.push(Some(seq)),
                Err(e) => {
                    let _ = self.push_failed(e);
                    // The failed write dropped every buffered line, and the
                    // writer hands their seqs out again.
                    let written_to = self.writer.seq();
                    for s in &mut seqs {
                        if s.is_some_and(|s| s > written_to) {
                            *s = None;
                        }
                    }
                    seqs.push(None);
                }
            }
        }
        let _ = self.flush();
        // A batch written before a later one failed (a full buffer, a
        // rotation) stays written: only lines past the last written seq go
        // back, and they are not losses.
        let written_to = self.writer.seq();
        let (written, unwritten): (Vec<_>, Vec<_>) =
            repeats.iter().zip(seqs).partition(|(_, seq)| seq.is_some_and(|s| s <= written_to));
        let written: Vec<Repeats> = written.into_iter().map(|(r, _)| *r).collect();
        let unwritten: Vec<Repeats> = unwritten.into_iter().map(|(r, _)| *r).collect();
        self.drops.write_failed = dropped_before;
        self.revert_repeats(&unwritten);
        if let Some(flows) = self.flows.as_mut() {
            flows.record_logged(&written);
        }
        unwritten.is_empty()
    }

    fn revert_repeats(&mut self, repeats: &[Repeats]) {
        if let Some(flows) = self.flows.as_mut() {
            for r in repeats {
                flows.ledger.revert(r);
            }
        }
    }

    fn push_body(&mut self) -> io::Result<u64> {
        match self.writer.push(&self.body) {
            Ok(seq) => Ok(seq),
            Err(e) => Err(self.push_failed(e)),
        }
    }

    fn push_failed(&mut self, e: PushError) -> io::Error {
        match e {
            PushError::Write(f) => {
                let e = io::Error::new(f.error.kind(), f.error.to_string());
                self.batch_hook_ns.clear();
                self.write_failed(f);
                e
            }
            PushError::Body(e) => io::Error::other(e),
        }
    }

    /// A ring-buffer record that could not be decoded: lost, and counted.
    pub fn count_decode_error(&mut self) {
        self.drops.decode_error += 1;
    }

    /// Write what is buffered.
    pub fn flush(&mut self) -> io::Result<()> {
        match self.writer.flush() {
            Ok(0) => Ok(()),
            Ok(_) => {
                self.written.notify_one();
                let now = now_ns();
                for hook in self.batch_hook_ns.drain(..) {
                    self.latency.record_ns(now - hook);
                }
                self.write_recovered();
                Ok(())
            }
            Err(f) => {
                let e = io::Error::new(f.error.kind(), f.error.to_string());
                self.batch_hook_ns.clear();
                self.write_failed(f);
                Err(e)
            }
        }
    }

    /// After the daemon drained a batch from the ring: write it, and when
    /// the ring is empty again lift a ring-overflow fail-closed.
    pub fn end_batch(&mut self, ring_empty: bool) {
        let _ = self.flush();
        if ring_empty {
            self.clear_ring_full();
        }
        if self.loss_due {
            self.report_loss();
        }
        self.writer.maybe_sync(Instant::now());
    }

    /// Periodic work: the `loss` event when counters grew (this also probes
    /// a failing log), and the fsync policy.
    /// Notified whenever lines were written (the tick's pace is then [`TICK`]).
    pub fn written(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.written.clone()
    }

    /// Whether the next tick can wait [`IDLE_TICK`]: everything written is
    /// synced and there is no loss to report and no failure to probe.
    pub fn settled(&self) -> bool {
        self.writer.settled() && !self.loss_due && self.failing.is_none()
    }

    pub fn tick(&mut self, policies: &PolicySet) {
        self.sweep_flows(policies, false);
        let _ = self.flush();
        let now = Instant::now();
        if self.loss_due || now.duration_since(self.last_loss_check) >= LOSS_INTERVAL {
            self.last_loss_check = now;
            self.report_loss();
        }
        self.writer.maybe_sync(now);
    }

    /// At shutdown: the flows' last repeats, the last `loss` event, then
    /// sync and checkpoint.
    pub fn close(&mut self, policies: &PolicySet) {
        self.sweep_flows(policies, true);
        let _ = self.flush();
        self.report_loss();
        self.writer.sync_now();
    }

    fn report_loss(&mut self) {
        let (kernel_total, per_cpu) = self.kernel_drops();
        let (reported_kernel, reported_user) = self.reported;
        if kernel_total <= reported_kernel && self.drops.total() <= reported_user.total() && !self.loss_due {
            return;
        }
        let drops = self.drops;
        let event = json!({
            "kind": "loss",
            "ringbuf_drops": kernel_total.saturating_sub(reported_kernel),
            "userspace_drops": drops.total().saturating_sub(reported_user.total()),
            "decode_errors": drops.decode_error.saturating_sub(reported_user.decode_error),
            "write_failures": drops.write_failed.saturating_sub(reported_user.write_failed),
            "ringbuf_drops_total": kernel_total,
            "ringbuf_drops_per_cpu": per_cpu,
            "userspace_drops_total": drops,
        });
        // The buffer is empty (flushed by the caller): a failure here loses
        // only this report, which is retried on the next tick.
        let pushed = self.append(&event).is_ok();
        match self.writer.flush() {
            Ok(n) if pushed && n > 0 => {
                self.write_recovered();
                self.reported = (kernel_total, drops);
                self.loss_due = false;
            }
            Ok(_) => {}
            Err(mut f) => {
                f.dropped = f.dropped.saturating_sub(1);
                self.write_failed(f);
            }
        }
    }

    fn write_failed(&mut self, f: WriteFailure) {
        self.drops.write_failed += f.dropped;
        if self.failing.is_none() {
            tracing::error!(
                log = %self.writer.config().path.display(),
                error = %f.error,
                fail_closed = self.fail_closed,
                "cannot write the event log: events are being dropped and counted{}",
                if self.fail_closed { "; fail-closed: agents' network and file actions are denied until it recovers" } else { "" }
            );
            self.failing = Some(Failing { since: now_rfc3339(), error: f.error.to_string() });
            if self.fail_closed {
                self.set_state(StateSlot::LogFailed, 1);
            }
        }
    }

    fn write_recovered(&mut self) {
        if let Some(was) = self.failing.take() {
            tracing::warn!(since = %was.since, "the event log is writable again");
            if self.fail_closed {
                self.set_state(StateSlot::LogFailed, 0);
            }
            self.loss_due = true;
        }
    }

    fn clear_ring_full(&mut self) {
        if self.state(StateSlot::RingFull) != 0 {
            self.set_state(StateSlot::RingFull, 0);
            self.ring_full_episodes += 1;
            tracing::warn!("the ring buffer overflowed (events lost; agents' network and file actions were denied meanwhile); drained, recording again");
        }
    }

    fn state(&self, slot: StateSlot) -> u32 {
        self.kernel.as_ref().and_then(|k| k.state.get(&(slot as u32), 0).ok()).unwrap_or(0)
    }

    fn set_state(&mut self, slot: StateSlot, value: u32) {
        if let Some(k) = &mut self.kernel {
            if let Err(e) = k.state.set(slot as u32, value, 0) {
                tracing::error!(?slot, error = %e, "cannot update the fail-closed flag in the kernel");
            }
        }
    }

    /// Ring-buffer reservation failures: total and per CPU.
    fn kernel_drops(&self) -> (u64, Vec<u64>) {
        let per_cpu: Vec<u64> = self
            .kernel
            .as_ref()
            .and_then(|k| k.counters.get(&(agentguard_common::Counter::RingbufDrops as u32), 0).ok())
            .map(|v| v.iter().copied().collect())
            .unwrap_or_default();
        (per_cpu.iter().sum(), per_cpu)
    }

    /// The log's part of `agentguard status`.
    pub fn status(&self) -> Value {
        let (kernel_total, per_cpu) = self.kernel_drops();
        let cfg = self.writer.config();
        json!({
            "log": cfg.path,
            "chain_head": cfg.chain_head,
            "seq": self.writer.seq(),
            "head": to_hex(&self.writer.head()),
            "synced_seq": self.writer.synced_seq(),
            "lines_written": self.writer.written(),
            "rotate_bytes": cfg.rotate_bytes,
            "rotate_keep": cfg.keep,
            "fsync_interval_ms": cfg.fsync_interval.as_millis() as u64,
            "hook_to_line": self.latency.summary(),
            "continued_from": self.opened.continues_from,
            "startup_mismatch": self.opened.mismatch,
            "recording": if self.failing.is_some() { "failing" } else { "ok" },
            "recording_error": self.failing.as_ref().map(|f| f.error.clone()),
            "failing_since": self.failing.as_ref().map(|f| f.since.clone()),
            "fail_closed": self.fail_closed,
            "fail_closed_engaged": {
                "log_failed": self.state(StateSlot::LogFailed) != 0,
                "ring_full": self.state(StateSlot::RingFull) != 0,
                "ring_full_episodes": self.ring_full_episodes,
            },
            "flows_counted": self.flows.as_ref().map(Flows::live),
            "drops": {
                "ringbuf": kernel_total,
                "ringbuf_per_cpu": per_cpu,
                "userspace": self.drops.total(),
                "decode_error": self.drops.decode_error,
                "write_failed": self.drops.write_failed,
                "unreported": (kernel_total + self.drops.total()).saturating_sub(self.reported.0 + self.reported.1.total()),
            },
        })
    }
}
