//! Allowed network flows (docs/events.md, "Allowed flows"). The kernel sends
//! the first allowed connect or send of a flow (process, rule, hook,
//! protocol, address, port, uid) as an event and counts its repeats in
//! AG_FLOWS; this module turns those counts into `repeats` lines, so the log
//! accounts for every action without a ring-buffer record per packet.
//!
//! The account is exact: each flow's kernel count is the number of its
//! actions; its first action's line stands for one of them, each `repeats`
//! line for the difference since the previous one. What the log has
//! accounted for is kept in AG_FLOWS_LOGGED (pinned), so a restarted daemon
//! continues the account instead of repeating or losing it.
//!
//! A flow's count is its AG_FLOWS count plus what per-CPU slots
//! (AG_FLOW_SLOTS) counted of it and not yet moved there: each CPU counts the
//! repeats of the last flow it saw in its slot, and moves them to AG_FLOWS
//! when the slot is refilled (net.rs). The slots are read before and after
//! AG_FLOWS; a slot refilled in between (its `seq` changed) is left out of
//! that reading, so a repeat is never counted twice.
use std::{
    collections::HashMap as StdHashMap,
    time::{Duration, Instant},
};

use agentguard_common::{maps, FlowCount, FlowKey, FlowSlot};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    Ebpf,
};

use super::log::KernelMapError;

/// How often the kernel's counts are read and logged.
pub const SWEEP: Duration = Duration::from_secs(1);
/// A flow whose process is gone and whose count did not change for this
/// many sweeps is removed from the kernel's map (after its last repeats were
/// logged), so a long session does not fill it with dead processes' flows.
const IDLE_SWEEPS_BEFORE_REMOVAL: u32 = 2;

/// The log's account of one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// Actions the log accounts for (the first action's line counts 1).
    count: u64,
    /// When the log last accounted for it (wall ns), when known.
    at_ns: Option<i128>,
    /// Whether the first action's line was written, or one sweep passed
    /// without it (it may have been lost with a full ring: counted there).
    first_settled: bool,
    /// Consecutive sweeps that found the count unchanged.
    idle_sweeps: u32,
}

/// Repeats to log for one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeats {
    pub key: FlowKey,
    /// The rule that allowed the flow (0: the agent's default).
    pub rule_id: u32,
    pub count: u64,
    pub since_ns: Option<i128>,
}

/// The account, without the kernel: what to log given the kernel's counts.
#[derive(Debug, Default)]
pub struct Ledger {
    entries: StdHashMap<FlowKey, Entry>,
}

impl Ledger {
    /// The line of a flow's first action was written (at `wall_ns`).
    pub fn first(&mut self, key: FlowKey, wall_ns: i128) {
        let e = self.entries.entry(key).or_insert(Entry { count: 1, at_ns: None, first_settled: false, idle_sweeps: 0 });
        e.first_settled = true;
        e.at_ns = Some(e.at_ns.map_or(wall_ns, |t| t.max(wall_ns)));
    }

    /// A flow accounted for up to `count` by a previous daemon.
    pub fn restore(&mut self, key: FlowKey, count: u64) {
        self.entries.insert(key, Entry { count, at_ns: None, first_settled: true, idle_sweeps: 0 });
    }

    /// The kernel counts `kernel_count` actions of `key` now (`now_ns`):
    /// the repeats to log, if any, now accounted for. A flow seen for the
    /// first time waits one sweep for its first action's line, so the
    /// repeats follow it in the log.
    pub fn observe(&mut self, key: FlowKey, rule_id: u32, kernel_count: u64, now_ns: i128) -> Option<Repeats> {
        let e = self.entries.entry(key).or_insert(Entry { count: 1, at_ns: None, first_settled: false, idle_sweeps: 0 });
        if !e.first_settled {
            e.first_settled = true;
            return None;
        }
        if kernel_count <= e.count {
            e.idle_sweeps = e.idle_sweeps.saturating_add(1);
            return None;
        }
        let r = Repeats { key, rule_id, count: kernel_count - e.count, since_ns: e.at_ns };
        e.count = kernel_count;
        e.at_ns = Some(now_ns);
        e.idle_sweeps = 0;
        Some(r)
    }

    /// Undo [`Self::observe`]'s `r`: its line could not be written.
    pub fn revert(&mut self, r: &Repeats) {
        if let Some(e) = self.entries.get_mut(&r.key) {
            e.count = e.count.saturating_sub(r.count);
            e.at_ns = r.since_ns;
        }
    }

    /// What the log accounts for of `key`.
    pub fn accounted(&self, key: &FlowKey) -> u64 {
        self.entries.get(key).map_or(1, |e| e.count)
    }

    /// Whether `key` has stayed unchanged long enough to be removed once
    /// its process is gone.
    fn idle(&self, key: &FlowKey) -> bool {
        self.entries.get(key).is_some_and(|e| e.first_settled && e.idle_sweeps >= IDLE_SWEEPS_BEFORE_REMOVAL)
    }

    pub fn forget(&mut self, key: &FlowKey) {
        self.entries.remove(key);
    }

    /// Like [`Self::observe`], for a flow about to be removed: everything
    /// not yet accounted for is logged now.
    fn settle(&mut self, key: FlowKey, rule_id: u32, kernel_count: u64, now_ns: i128) -> Option<Repeats> {
        self.entries.entry(key).or_insert(Entry { count: 1, at_ns: None, first_settled: true, idle_sweeps: 0 }).first_settled = true;
        self.observe(key, rule_id, kernel_count, now_ns)
    }
}

/// The kernel's flow maps and the log's account of them.
pub struct Flows {
    counts: HashMap<MapData, FlowKey, FlowCount>,
    logged: HashMap<MapData, FlowKey, FlowCount>,
    slots: PerCpuArray<MapData, FlowSlot>,
    /// Changes the tag epoch, so no slot counts a removed flow again.
    epoch: crate::taghint::EpochBump,
    pub ledger: Ledger,
    last_sweep: Instant,
}

/// How many times a reading is retried while slots are being refilled.
const STABLE_READ_TRIES: usize = 4;

/// Add to each flow in `counts` what a slot counted of it, for the slots
/// that were not refilled between `before` and `after` (read before and
/// after `counts`): their pending repeats are not in `counts` yet. False
/// when some slot with pending repeats was refilled meanwhile (its repeats
/// may or may not be in `counts`, and are left out).
fn add_pending(counts: &mut [(FlowKey, FlowCount)], before: &[FlowSlot], after: &[FlowSlot]) -> bool {
    let mut stable = true;
    for (b, a) in before.iter().zip(after) {
        if b.pending == 0 {
            continue;
        }
        if b.seq != a.seq || b.seq % 2 == 1 {
            stable = false;
            continue;
        }
        // The serial tells the flow from a later one of the same key (after
        // a removal); a slot of a removed flow was accounted for already.
        if let Some((_, c)) = counts.iter_mut().find(|(k, c)| *k == b.key && c.serial == b.serial) {
            c.count += b.pending;
        }
    }
    stable
}

impl Flows {
    /// Take the flow maps from the object, and the account a previous
    /// daemon left in AG_FLOWS_LOGGED.
    pub fn attach(ebpf: &mut Ebpf) -> Result<Self, KernelMapError> {
        let take = |ebpf: &mut Ebpf, name: &'static str| -> Result<HashMap<MapData, FlowKey, FlowCount>, KernelMapError> {
            let map = ebpf.take_map(name).ok_or(KernelMapError::Missing(name))?;
            HashMap::try_from(map).map_err(|source| KernelMapError::Map { name, source })
        };
        let counts = take(ebpf, maps::FLOWS)?;
        let logged = take(ebpf, maps::FLOWS_LOGGED)?;
        let slots = ebpf.take_map(maps::FLOW_SLOTS).ok_or(KernelMapError::Missing(maps::FLOW_SLOTS))?;
        let slots = PerCpuArray::try_from(slots).map_err(|source| KernelMapError::Map { name: maps::FLOW_SLOTS, source })?;
        let epoch = crate::taghint::EpochBump::new(ebpf).map_err(KernelMapError::Program)?;
        let mut ledger = Ledger::default();
        for (key, c) in logged.iter().filter_map(Result::ok) {
            ledger.restore(key, c.count);
        }
        Ok(Self { counts, logged, slots, epoch, ledger, last_sweep: Instant::now() })
    }

    /// Every CPU's slot now (empty if unreadable: the counts then lack
    /// the slots' pending repeats until a later reading).
    fn slots_now(&self) -> Vec<FlowSlot> {
        match self.slots.get(&0, 0) {
            Ok(values) => values.iter().copied().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the flow slots: repeats counted there are logged later");
                Vec::new()
            }
        }
    }

    /// Every flow's count (see the module's comment): retried while slots
    /// with pending repeats are being refilled, then without them.
    fn read(&self, keep: impl Fn(&FlowKey) -> bool) -> Vec<(FlowKey, FlowCount)> {
        let mut attempt = 1;
        loop {
            let before = self.slots_now();
            let mut current: Vec<(FlowKey, FlowCount)> = self.counts.iter().filter_map(Result::ok).filter(|(k, _)| keep(k)).collect();
            let after = self.slots_now();
            if add_pending(&mut current, &before, &after) || attempt == STABLE_READ_TRIES {
                return current;
            }
            attempt += 1;
        }
    }

    /// Whether a sweep is due.
    pub fn due(&self, now: Instant) -> bool {
        now.duration_since(self.last_sweep) >= SWEEP
    }

    /// Read every flow's count: the repeats to log now, and the flows whose
    /// process is gone and that stopped changing, to [`Self::remove`] once
    /// the repeats are written.
    pub fn sweep(&mut self, now_ns: i128) -> (Vec<Repeats>, Vec<FlowKey>) {
        self.last_sweep = Instant::now();
        let current = self.read(|_| true);
        let repeats = current.iter().filter_map(|(k, c)| self.ledger.observe(*k, c.rule_id, c.count, now_ns)).collect();
        let idle_dead = current
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| self.ledger.idle(k) && !std::path::Path::new(&format!("/proc/{}", k.pid)).exists())
            .collect();
        (repeats, idle_dead)
    }

    /// Every flow of `session`, settled: the repeats to log before the
    /// session's flows are removed with [`Self::remove`].
    pub fn settle_session(&mut self, session: u32, now_ns: i128) -> (Vec<Repeats>, Vec<FlowKey>) {
        let current = self.read(|k| k.session_id == session);
        let keys = current.iter().map(|(k, _)| *k).collect();
        let repeats = current.into_iter().filter_map(|(k, c)| self.ledger.settle(k, c.rule_id, c.count, now_ns)).collect();
        (repeats, keys)
    }

    /// Record in the kernel what the log now accounts for (after the
    /// repeats lines were written).
    pub fn record_logged(&mut self, repeats: &[Repeats]) {
        for r in repeats {
            let count = FlowCount { count: self.ledger.accounted(&r.key), ..FlowCount::default() };
            if let Err(e) = self.logged.insert(r.key, count, 0) {
                tracing::warn!(error = %e, "cannot record a flow's account in AG_FLOWS_LOGGED; a restarted daemon may log its repeats twice");
            }
        }
    }

    /// Remove flows from the kernel and the account. A process that acts
    /// on a removed flow again starts it anew (a `first` line): the tag
    /// epoch changes, so no CPU's slot counts it on.
    pub fn remove(&mut self, keys: &[FlowKey]) {
        if keys.is_empty() {
            return;
        }
        for k in keys {
            let _ = self.counts.remove(k);
            let _ = self.logged.remove(k);
            self.ledger.forget(k);
        }
        if let Err(e) = self.epoch.bump() {
            tracing::error!(error = %e, "cannot change the tag epoch after removing flows: a removed flow's repeats may go uncounted");
        }
    }

    /// Flows the kernel counts now.
    pub fn live(&self) -> usize {
        self.counts.keys().filter_map(Result::ok).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey { pid: 7, session_id: 3, agent_id: 1, port, ..FlowKey::default() }
    }

    fn slot(k: FlowKey, serial: u64, seq: u64, pending: u64) -> FlowSlot {
        FlowSlot { key: k, serial, seq, pending, ..FlowSlot::default() }
    }

    fn count(n: u64, serial: u64) -> FlowCount {
        FlowCount { count: n, serial, ..FlowCount::default() }
    }

    #[test]
    fn pending_slot_repeats_are_added_once_and_only_to_their_own_flow() {
        let mut counts = vec![(key(1), count(10, 100)), (key(2), count(5, 200))];
        let slots = [slot(key(1), 100, 4, 7), slot(key(2), 199, 2, 3), slot(key(3), 300, 6, 9)];
        // Unchanged slots: key 1 gets its 7; key 2's slot holds an earlier
        // flow of that key (another serial); key 3 is not a flow any more.
        assert!(add_pending(&mut counts, &slots, &slots));
        assert_eq!(counts, vec![(key(1), count(17, 100)), (key(2), count(5, 200))]);
        // A slot refilled between the readings (seq moved, or odd: under
        // way) is left out, and the reading says so.
        let mut counts = vec![(key(1), count(10, 100))];
        let mut after = slots;
        after[0].seq = 6;
        assert!(!add_pending(&mut counts, &slots, &after));
        assert_eq!(counts, vec![(key(1), count(10, 100))]);
        let odd = [slot(key(1), 100, 5, 7)];
        assert!(!add_pending(&mut counts, &odd, &odd));
        assert_eq!(counts[0].1.count, 10);
        // A slot with nothing pending does not make a reading unstable.
        let empty = [slot(key(1), 100, 5, 0)];
        assert!(add_pending(&mut counts, &empty, &[slot(key(1), 100, 7, 0)]));
    }

    #[test]
    fn the_first_line_counts_one_and_repeats_the_rest_exactly() {
        let mut l = Ledger::default();
        l.first(key(1), 100);
        // Nothing repeated yet.
        assert_eq!(l.observe(key(1), 0, 1, 200), None);
        assert_eq!(l.observe(key(1), 0, 10, 300), Some(Repeats { rule_id: 0, key: key(1), count: 9, since_ns: Some(100) }));
        assert_eq!(l.observe(key(1), 0, 10, 400), None);
        assert_eq!(l.observe(key(1), 0, 25, 500), Some(Repeats { rule_id: 0, key: key(1), count: 15, since_ns: Some(300) }));
        assert_eq!(l.accounted(&key(1)), 25);
        // A line that could not be written is put back and logged later.
        let r = l.observe(key(1), 0, 30, 600).expect("repeats");
        l.revert(&r);
        assert_eq!(l.observe(key(1), 0, 31, 700), Some(Repeats { rule_id: 0, key: key(1), count: 6, since_ns: Some(500) }));
    }

    #[test]
    fn a_flow_seen_before_its_first_line_waits_one_sweep_then_is_not_lost() {
        let mut l = Ledger::default();
        // The sweep saw it before the first line was written: wait.
        assert_eq!(l.observe(key(2), 0, 5, 100), None);
        l.first(key(2), 90);
        assert_eq!(l.observe(key(2), 0, 6, 200), Some(Repeats { rule_id: 0, key: key(2), count: 5, since_ns: Some(90) }));
        // A first line lost with a full ring (counted as a ring drop): the
        // repeats are still logged from the second sweep on.
        assert_eq!(l.observe(key(3), 0, 4, 100), None);
        assert_eq!(l.observe(key(3), 0, 4, 200), Some(Repeats { rule_id: 0, key: key(3), count: 3, since_ns: None }));
    }

    #[test]
    fn a_restored_account_continues_without_repeating() {
        let mut l = Ledger::default();
        l.restore(key(4), 40);
        assert_eq!(l.observe(key(4), 0, 40, 100), None);
        assert_eq!(l.observe(key(4), 0, 41, 200), Some(Repeats { rule_id: 0, key: key(4), count: 1, since_ns: None }));
    }

    #[test]
    fn idle_needs_unchanged_sweeps_and_settle_logs_the_rest() {
        let mut l = Ledger::default();
        l.first(key(5), 1);
        assert!(!l.idle(&key(5)));
        for t in 0..IDLE_SWEEPS_BEFORE_REMOVAL {
            assert_eq!(l.observe(key(5), 0, 1, i128::from(t)), None);
        }
        assert!(l.idle(&key(5)));
        // An unseen first line does not hold back a session's last account.
        assert_eq!(l.settle(key(6), 0, 3, 10), Some(Repeats { rule_id: 0, key: key(6), count: 2, since_ns: None }));
    }
}
