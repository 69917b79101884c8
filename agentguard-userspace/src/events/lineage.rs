//! Who started whom: the daemon's table of agent processes, built from the
//! kernel's fork and exec events, with /proc as the fallback for processes
//! it never saw being created (agents adopted at start-up).
//!
//! The parent recorded is the one that created the process, as the fork
//! event said: a daemonized grandchild keeps its real ancestry even after
//! the kernel reparents it to init. The lineage of a process is its
//! ancestors up to the root of its session, nearest first; the root itself
//! has an empty lineage.
use std::collections::HashMap;

use agentguard_common::RUN_SESSION_BIT;

/// Longest lineage recorded.
pub const MAX_LINEAGE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    ppid: u32,
    session: u32,
    /// The parent is known from a fork event, which only a tagged parent
    /// sends: it belongs to the same session.
    from_fork: bool,
    exited: bool,
}

/// Where a parent comes from when the table does not know a process.
pub trait ParentSource {
    fn ppid(&self, pid: u32) -> Option<u32>;
}

/// /proc/PID/stat.
pub struct ProcFs;

impl ParentSource for ProcFs {
    fn ppid(&self, pid: u32) -> Option<u32> {
        crate::procfs::read(pid).map(|i| i.ppid)
    }
}

pub struct ProcTable<P: ParentSource = ProcFs> {
    procs: HashMap<u32, Entry>,
    /// Session id → the pid it is rooted at (run sessions; a matched
    /// session's id is its root's pid).
    roots: HashMap<u32, u32>,
    capacity: usize,
    source: P,
    /// The last answer of [`Self::ancestry`]: (pid, session, ppid, lineage).
    /// A busy process emits many events in a row; between two process
    /// events (fork, exec, exit, which clear it) its answer cannot change.
    last: Option<(u32, u32, Option<u32>, Vec<u32>)>,
}

impl Default for ProcTable<ProcFs> {
    fn default() -> Self {
        Self::new(ProcFs, 2 * agentguard_common::limits::MAX_TAGGED_TASKS as usize)
    }
}

impl<P: ParentSource> ProcTable<P> {
    pub fn new(source: P, capacity: usize) -> Self {
        Self { procs: HashMap::new(), roots: HashMap::new(), capacity, source, last: None }
    }

    /// A tagged task created `child` (a process or a thread).
    pub fn on_fork(&mut self, parent_pid: u32, child: u32, session: u32) {
        self.last = None;
        self.make_room();
        self.procs.insert(child, Entry { ppid: parent_pid, session, from_fork: true, exited: false });
    }

    /// `pid` executed a program; `tagged_here`: this exec is what tagged it,
    /// so it roots its session.
    pub fn on_exec(&mut self, pid: u32, session: u32, tagged_here: bool) {
        self.last = None;
        if tagged_here {
            self.roots.insert(session, pid);
        }
        if !self.procs.contains_key(&pid) {
            if let Some(ppid) = self.source.ppid(pid) {
                self.make_room();
                self.procs.insert(pid, Entry { ppid, session, from_fork: false, exited: false });
            }
        }
    }

    /// Kept for its descendants' lineage until room is needed.
    pub fn on_exit(&mut self, pid: u32) {
        self.last = None;
        if let Some(e) = self.procs.get_mut(&pid) {
            e.exited = true;
        }
    }

    /// [`Self::ppid`] and [`Self::lineage`] together, remembered until the
    /// next process event.
    pub fn ancestry(&mut self, pid: u32, session: u32) -> (Option<u32>, &[u32]) {
        if !matches!(&self.last, Some((p, s, _, _)) if *p == pid && *s == session) {
            let ppid = self.ppid(pid, session);
            let lineage = self.lineage(pid, session);
            self.last = Some((pid, session, ppid, lineage));
        }
        match &self.last {
            Some((_, _, ppid, lineage)) => (*ppid, lineage),
            None => (None, &[]),
        }
    }

    pub fn ppid(&mut self, pid: u32, session: u32) -> Option<u32> {
        if let Some(e) = self.procs.get(&pid) {
            return Some(e.ppid);
        }
        let ppid = self.source.ppid(pid)?;
        self.make_room();
        self.procs.insert(pid, Entry { ppid, session, from_fork: false, exited: false });
        Some(ppid)
    }

    fn root(&self, session: u32) -> Option<u32> {
        if session & RUN_SESSION_BIT == 0 && session != 0 {
            return Some(session);
        }
        self.roots.get(&session).copied()
    }

    /// Ancestors of `pid` up to its session's root, nearest first. Without a
    /// known root, only ancestors the table saw in the same session count.
    pub fn lineage(&mut self, pid: u32, session: u32) -> Vec<u32> {
        let root = self.root(session);
        let mut out = Vec::new();
        let mut cur = pid;
        while out.len() < MAX_LINEAGE && Some(cur) != root {
            let parent = match self.procs.get(&cur) {
                Some(e) if root.is_some() || (e.from_fork && e.session == session) => e.ppid,
                None if root.is_some() => match self.ppid(cur, session) {
                    Some(p) => p,
                    None => break,
                },
                _ => break,
            };
            if parent <= 1 || out.contains(&parent) {
                break;
            }
            out.push(parent);
            cur = parent;
        }
        out
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// At capacity: forget exited processes, then threads and processes
    /// that are gone (threads never send an exit event of their own).
    fn make_room(&mut self) {
        if self.procs.len() < self.capacity {
            return;
        }
        self.procs.retain(|_, e| !e.exited);
        if self.procs.len() * 4 >= self.capacity * 3 {
            self.procs.retain(|pid, _| std::path::Path::new(&format!("/proc/{pid}")).exists());
        }
        let live: std::collections::HashSet<u32> = self.procs.keys().copied().collect();
        self.roots.retain(|_, pid| live.contains(pid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /proc: pid → ppid.
    struct Fake(HashMap<u32, u32>);

    impl ParentSource for Fake {
        fn ppid(&self, pid: u32) -> Option<u32> {
            self.0.get(&pid).copied()
        }
    }

    const RUN: u32 = RUN_SESSION_BIT | 1;

    #[test]
    fn fork_knowledge_survives_reparenting() {
        // /proc says the daemonized grandchild's parent is init.
        let mut t = ProcTable::new(Fake(HashMap::from([(100, 50), (300, 1)])), 1024);
        t.on_exec(100, RUN, true);
        t.on_fork(100, 200, RUN);
        t.on_fork(200, 300, RUN);
        t.on_exit(200);
        assert_eq!(t.lineage(300, RUN), vec![200, 100]);
        assert_eq!(t.lineage(100, RUN), Vec::<u32>::new(), "the root has no lineage");
        assert_eq!(t.ppid(300, RUN), Some(200));
        assert_eq!(t.ppid(100, RUN), Some(50), "the root's parent is outside the session");
    }

    #[test]
    fn matched_sessions_are_rooted_at_their_id_and_walk_proc() {
        // An adopted tree: the table never saw these forks.
        let mut t = ProcTable::new(Fake(HashMap::from([(40, 30), (30, 20), (20, 7), (7, 1)])), 1024);
        assert_eq!(t.lineage(40, 20), vec![30, 20]);
        assert_eq!(t.lineage(20, 20), Vec::<u32>::new());
    }

    #[test]
    fn unknown_root_stops_at_the_session_boundary() {
        let mut t = ProcTable::new(Fake(HashMap::from([(10, 5), (5, 1)])), 1024);
        t.on_fork(10, 11, RUN);
        t.on_fork(11, 12, RUN);
        assert_eq!(t.lineage(12, RUN), vec![11, 10]);
    }

    #[test]
    fn ancestry_is_remembered_only_until_the_next_process_event() {
        let mut t = ProcTable::new(Fake(HashMap::from([(100, 50)])), 1024);
        t.on_exec(100, RUN, true);
        t.on_fork(100, 200, RUN);
        assert_eq!(t.ancestry(200, RUN), (Some(100), &[100][..]));
        assert_eq!(t.ancestry(200, RUN), (Some(100), &[100][..]), "asked again");
        assert_eq!(t.ancestry(100, RUN), (Some(50), &[][..]), "another pid is not answered from memory");
        // pid 200 exits and the number is reused by a child of 300.
        t.on_fork(100, 300, RUN);
        assert_eq!(t.ancestry(200, RUN), (Some(100), &[100][..]));
        t.on_exit(200);
        t.on_fork(300, 200, RUN);
        assert_eq!(t.ancestry(200, RUN), (Some(300), &[300, 100][..]), "a fork clears what was remembered");
    }

    #[test]
    fn capacity_forgets_exited_processes_first() {
        let mut t = ProcTable::new(Fake(HashMap::new()), 4);
        for child in 2..6 {
            t.on_fork(1, child, RUN);
        }
        t.on_exit(2);
        t.on_exit(3);
        t.on_fork(1, 9, RUN);
        assert_eq!(t.len(), 3);
        assert_eq!(t.ppid(2, RUN), None);
        assert_eq!(t.ppid(9, RUN), Some(1));
    }
}
