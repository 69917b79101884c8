//! Types shared by AgentGuard's kernel programs and its userspace daemon.
//!
//! Everything here crosses the kernel boundary: `#[repr(C)]`, `Copy`, no
//! `bool`, no implicit padding (explicit `_pad` fields), and a compile-time
//! size check. Numbers given to kinds and decisions never change: they are
//! written into the audit log and read back by later versions.
#![cfg_attr(not(feature = "user"), no_std)]

/// Names of the maps, used by both sides so no string literal names a map twice.
pub mod maps {
    /// Ring buffer of events, kernel → daemon.
    pub const EVENTS: &str = "AG_EVENTS";
    /// Per-CPU counters, indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "AG_COUNTERS";
    /// Task id → [`crate::Tag`]: which agent and session a task belongs to.
    pub const TAGS: &str = "AG_TAGS";
    /// Agent id → [`crate::AgentConfig`]: the agent's defaults.
    pub const AGENTS: &str = "AG_AGENTS";
    /// cgroup v2 id → [`crate::Tag`]: a process that execs inside this cgroup is tagged.
    pub const SEL_CGROUP: &str = "AG_SEL_CGROUP";
    /// Executable path ([`crate::PathKey`]) → [`crate::Tag`].
    pub const SEL_EXE: &str = "AG_SEL_EXE";
    /// Command name (`comm`, 16 bytes) → [`crate::Tag`].
    pub const SEL_COMM: &str = "AG_SEL_COMM";
    /// User id → [`crate::Tag`].
    pub const SEL_UID: &str = "AG_SEL_UID";
    /// LPM trie: (agent id, IPv4 prefix) → [`crate::NetRuleList`].
    pub const NET_V4: &str = "AG_NET_V4";
    /// LPM trie: (agent id, IPv6 prefix) → [`crate::NetRuleList`].
    pub const NET_V6: &str = "AG_NET_V6";
    /// Array of u32 flags about which hooks are attached, indexed by [`crate::HookFlag`].
    pub const HOOKS: &str = "AG_HOOKS";
    /// Array of u32 flags about the event log, indexed by [`crate::StateSlot`]:
    /// what the fail-closed recording mode consults (docs/events.md).
    pub const STATE: &str = "AG_STATE";
    /// LPM trie: ([`crate::FilePrefixKey`]: agent or session id, path) →
    /// [`crate::FileRuleList`]: path-prefix and exact-path file rules.
    pub const FILE_PREFIX: &str = "AG_FILE_PREFIX";
    /// [`crate::FileNameKey`] → [`crate::FileRuleList`]: name-pattern file
    /// rules (a component anywhere, a basename, its suffix or prefix).
    pub const FILE_NAMES: &str = "AG_FILE_NAMES";
    /// Array of [`crate::limits::FILE_NAME_FILTER_WORDS`] u64 words: one bit
    /// per [`crate::file_name_filter_bit`], set for every key of
    /// [`FILE_NAMES`] (and, until the next write of the names, perhaps for
    /// keys removed since). The kernel looks a name up only when its bit
    /// is set: most of a path's names match no rule.
    pub const FILE_NAME_FILTER: &str = "AG_FILE_NAME_FILTER";
    /// [`crate::FileInodeKey`] → [`crate::FileRuleList`]: protected files
    /// that have more than one hard-link name, by (device, inode).
    pub const FILE_INODES: &str = "AG_FILE_INODES";
    /// Task id → [`crate::PendingOpen`]: an open with O_TRUNC by a tagged
    /// task, between syscall entry and exit (fallback observation).
    pub const FILE_PENDING: &str = "AG_FILE_PENDING";
    /// [`crate::GrantKey`] → [`crate::Grant`]: actions a human approved,
    /// checked by the network and file programs before an `approve` rule
    /// holds the action (approvals.rs in the daemon writes them).
    pub const GRANTS: &str = "AG_GRANTS";
    /// Ring buffer of [`crate::HoldEvent`]s, kernel → the daemon's hold
    /// thread: one per held action, so the agent is frozen without waiting
    /// for the main event stream.
    pub const HOLDS: &str = "AG_HOLDS";
    /// [`crate::FileInodeKey`] (agent id 0) → a [`crate::self_marks`] value:
    /// AgentGuard's own directories and files, which no tagged process may
    /// open for writing, create in, remove or rename (selfprotect.rs).
    pub const SELF_INODES: &str = "AG_SELF";
    /// Array of [`crate::limits::SELF_FILTER_WORDS`] u64 words: one bit per
    /// [`crate::self_filter_bit`] of every key's inode number in [`SELF_INODES`] (kept as
    /// the names filter is, [`FILE_NAME_FILTER`]). The kernel's walk up a
    /// file's directories looks an inode up only when its bit is set.
    pub const SELF_FILTER: &str = "AG_SELF_FILTER";
    /// [`crate::FlowKey`] → [`crate::FlowCount`]: allowed network flows of
    /// tagged processes. The first connect or send of a flow is an event;
    /// its repeats are counted here by the kernel, and the daemon logs the
    /// counts (docs/events.md, "Allowed flows").
    pub const FLOWS: &str = "AG_FLOWS";
    /// [`crate::FlowKey`] → [`crate::FlowCount`]: how many of a flow's
    /// actions the event log has accounted for. Written by the daemon only,
    /// pinned with the rest, so a restarted daemon neither repeats nor loses
    /// what the previous one logged. No program uses it.
    pub const FLOWS_LOGGED: &str = "AG_FLOWS_LOGGED";
    /// Array of u64 words, one bit per task id: set for every tagged task
    /// (and possibly for a few that no longer are). A clear bit means "not
    /// tagged" without a hash lookup in [`TAGS`], the common case of every
    /// hook for every process on the host. Only kernel code writes it, with
    /// atomic or/and: the daemon sets bits through the
    /// [`crate::programs::SET_TAG_HINT`] program.
    pub const TAG_HINTS: &str = "AG_TAG_HINTS";
    /// Array of one u64: changed after every write or removal in [`TAGS`]
    /// (atomically by the programs; by the daemon after its own writes). A
    /// [`crate::FlowSlot`] filled under an older value is not used.
    pub const TAG_EPOCH: &str = "AG_TAG_EPOCH";
    /// Per-CPU array of one [`crate::FlowSlot`]: the last allowed flow each
    /// CPU counted, so its next repeat costs no hash lookup. Its pending
    /// count is part of the flow's count (the daemon adds it).
    pub const FLOW_SLOTS: &str = "AG_FLOW_SLOTS";
    /// LRU hash [`crate::DirCacheKey`] → [`crate::DirCacheEntry`]: the
    /// directories in which a tagged agent's file action was allowed, so
    /// its next action there is judged without walking the directory's
    /// path (files.rs, dircache.rs; docs/architecture.md, "The directory
    /// cache").
    pub const FILE_DIRCACHE: &str = "AG_FILE_DIRCACHE";
    /// LPM trie: ([`crate::FilePrefixKey`]: agent or session id, a
    /// directory with `/`) → its length in bytes: every directory that has
    /// a key of [`FILE_PREFIX`] strictly below it. The kernel never caches
    /// such a directory: its entries may match keys of their own.
    pub const FILE_DIRMARK: &str = "AG_FILE_DIRMARK";
    /// Hash agent id → [`crate::FileQuickFilter`]: which names could match
    /// one of the agent's name keys, by their last two bytes and first
    /// byte. The directory cache copies it into each entry, so a hit
    /// checks an entry's name with two bit reads instead of hashing it.
    pub const FILE_QUICK: &str = "AG_FILE_QUICK";
}

/// Values of [`maps::SELF_INODES`].
pub mod self_marks {
    /// Nothing at or below this directory (or this file) may be written,
    /// created, removed, renamed or linked by a tagged process.
    pub const TREE: u32 = 1;
    /// The cgroup2 root: no tagged process may write `cgroup.procs` or
    /// `cgroup.threads` anywhere below it (moving itself out of its
    /// agent's cgroup).
    pub const CGROUP_ROOT: u32 = 2;
    /// A directory above a [`TREE`]: it may not itself be renamed (which
    /// would move the guarded tree away and let an agent put another in
    /// its place); what it holds besides is not guarded.
    pub const ANCESTOR: u32 = 3;
}

/// Names of the programs (the Rust function names in agentguard-ebpf).
pub mod programs {
    pub const SCHED_PROCESS_FORK: &str = "sched_process_fork";
    pub const SCHED_PROCESS_EXEC: &str = "sched_process_exec";
    pub const SCHED_PROCESS_EXIT: &str = "sched_process_exit";
    /// A task moved to another cgroup (cgroup_attach_task tracepoint).
    pub const CGROUP_ATTACH_TASK: &str = "cgroup_attach_task";
    pub const CONNECT4: &str = "connect4";
    pub const CONNECT6: &str = "connect6";
    pub const SENDMSG4: &str = "sendmsg4";
    pub const SENDMSG6: &str = "sendmsg6";
    pub const LSM_PATH_UNLINK: &str = "path_unlink";
    /// The directory cache's epoch (dircache.rs): fexit programs after a
    /// rename and after every change of the mount tree.
    pub const DIRCACHE_RENAME: &str = "dircache_rename";
    pub const DIRCACHE_MOUNT: &str = "dircache_mount";
    pub const DIRCACHE_UMOUNT: &str = "dircache_umount";
    pub const DIRCACHE_MOVE_MOUNT: &str = "dircache_move_mount";
    pub const DIRCACHE_PIVOT_ROOT: &str = "dircache_pivot_root";
    pub const DIRCACHE_NEW_NS: &str = "dircache_new_ns";
    /// A program that does nothing, loaded by `doctor` to prove BPF-LSM is loadable.
    pub const LSM_PROBE: &str = "lsm_probe";
    /// Empty cgroup_sock_addr programs: benchmark floors, never attached by the daemon.
    pub const FLOOR_CONNECT4: &str = "floor_connect4";
    pub const FLOOR_SENDMSG4: &str = "floor_sendmsg4";
    // BPF-LSM file hooks (files.rs).
    pub const LSM_PATH_RMDIR: &str = "path_rmdir";
    pub const LSM_PATH_RENAME: &str = "path_rename";
    pub const LSM_PATH_TRUNCATE: &str = "path_truncate";
    pub const LSM_FILE_TRUNCATE: &str = "file_truncate";
    pub const LSM_PATH_LINK: &str = "path_link";
    pub const PROTECT_TASK_KILL: &str = "protect_task_kill";
    pub const PROTECT_PTRACE: &str = "protect_ptrace";
    pub const PROTECT_BPF: &str = "protect_bpf";
    pub const PROTECT_BPF4: &str = "protect_bpf4";
    pub const PROTECT_FILE_OPEN: &str = "protect_file_open";
    pub const PROTECT_PATH_MKNOD: &str = "protect_path_mknod";
    pub const PROTECT_PATH_MKDIR: &str = "protect_path_mkdir";
    pub const PROTECT_PATH_SYMLINK: &str = "protect_path_symlink";
    // Fallback observation: syscall tracepoints (fileobs.rs), one program per
    // tracepoint, named after it.
    pub const OBS_UNLINK: &str = "sys_enter_unlink";
    pub const OBS_UNLINKAT: &str = "sys_enter_unlinkat";
    pub const OBS_RMDIR: &str = "sys_enter_rmdir";
    pub const OBS_RENAME: &str = "sys_enter_rename";
    pub const OBS_RENAMEAT: &str = "sys_enter_renameat";
    pub const OBS_RENAMEAT2: &str = "sys_enter_renameat2";
    pub const OBS_TRUNCATE: &str = "sys_enter_truncate";
    pub const OBS_FTRUNCATE: &str = "sys_enter_ftruncate";
    pub const OBS_LINK: &str = "sys_enter_link";
    pub const OBS_LINKAT: &str = "sys_enter_linkat";
    pub const OBS_OPEN: &str = "sys_enter_open";
    pub const OBS_OPENAT: &str = "sys_enter_openat";
    pub const OBS_OPENAT2: &str = "sys_enter_openat2";
    pub const OBS_CREAT: &str = "sys_enter_creat";
    pub const OBS_OPEN_EXIT: &str = "sys_exit_open";
    pub const OBS_OPENAT_EXIT: &str = "sys_exit_openat";
    pub const OBS_OPENAT2_EXIT: &str = "sys_exit_openat2";
    pub const OBS_CREAT_EXIT: &str = "sys_exit_creat";
    /// Calibration: records the `f_mode` of files the loader opens, to learn
    /// this kernel's FMODE_CREATED bit (a macro, absent from BTF).
    pub const OBS_CALIBRATE: &str = "calibrate_fmode";
    /// Empty syscall-tracepoint program: the B1f floor, never attached by the daemon.
    pub const FLOOR_SYSCALL: &str = "floor_syscall";
    /// Sets the [`crate::maps::TAG_HINTS`] bit of the task id in its first
    /// argument: run by the daemon with BPF_PROG_TEST_RUN before it writes a
    /// tag itself; never attached.
    pub const SET_TAG_HINT: &str = "set_tag_hint";
    /// Changes [`crate::maps::TAG_EPOCH`]; run by the daemon with
    /// BPF_PROG_TEST_RUN after it changed tags itself or removed flows.
    pub const BUMP_TAG_EPOCH: &str = "bump_tag_epoch";
}

/// Names of the read-only globals the loader sets before loading.
pub mod globals {
    /// Byte offset of `child_pid` in the sched_process_fork tracepoint record.
    pub const FORK_CHILD_PID_OFF: &str = "FORK_CHILD_PID_OFF";
    /// Byte offsets of `pid` and `dst_id` in the cgroup_attach_task record.
    pub const CGROUP_ATTACH_PID_OFF: &str = "CGROUP_ATTACH_PID_OFF";
    pub const CGROUP_ATTACH_DST_ID_OFF: &str = "CGROUP_ATTACH_DST_ID_OFF";
    /// Byte offset of `old_pid` in the sched_process_exec tracepoint record.
    pub const EXEC_OLD_PID_OFF: &str = "EXEC_OLD_PID_OFF";
    /// Byte offset of the `filename` `__data_loc` word in the sched_process_exec record.
    pub const EXEC_FILENAME_OFF: &str = "EXEC_FILENAME_OFF";
    /// [`crate::KernelOffsets`]: struct member offsets from this kernel's BTF.
    pub const KERNEL_OFFSETS: &str = "KERNEL_OFFSETS";
    /// Byte offset of `exit_code` in `struct task_struct` (from BTF; 0 when
    /// BTF is unavailable, and the exit event then carries no status).
    pub const TASK_EXIT_CODE_OFF: &str = "TASK_EXIT_CODE_OFF";
    pub const TASK_TGID_OFF: &str = "TASK_TGID_OFF";
}

/// Capacities. Changing one changes the size of a map, never an event layout.
pub mod limits {
    /// Tagged tasks (threads included) at once.
    pub const MAX_TAGGED_TASKS: u32 = 65_536;
    pub const MAX_AGENTS: u32 = 1_024;
    pub const MAX_SELECTORS: u32 = 4_096;
    /// Ring buffer size in bytes (a power of two, a multiple of the page
    /// size). The daemon maps it twice (wrap-around reads), and those pages
    /// count in its resident memory: 8 MiB keeps an idle daemon under
    /// B8's 32 MiB while holding about 190 ms of events at 500 000/s.
    pub const EVENTS_RING_BYTES: u32 = 8 * 1024 * 1024;
    /// Longest path carried in an event or a map key, NUL included.
    pub const PATH_MAX: usize = 256;
    /// Length of a kernel command name (`TASK_COMM_LEN`).
    pub const COMM_LEN: usize = 16;
    /// Prefixes per address family in the network tries (all agents together).
    pub const MAX_NET_PREFIXES: u32 = 16_384;
    /// Rules that can apply to one prefix of one agent (its own and those of
    /// every enclosing prefix, in policy order).
    pub const NET_RULES_PER_PREFIX: usize = 16;
    /// Bytes of path an LPM key of [`crate::maps::FILE_PREFIX`] holds (the
    /// kernel's LPM data limit is 256 bytes, 4 of which are the id).
    pub const FILE_KEY_PATH: usize = 252;
    /// Entries in the file LPM trie (all agents and sessions together).
    pub const MAX_FILE_PREFIXES: u32 = 16_384;
    /// Entries in the name-pattern and inode maps.
    pub const MAX_FILE_NAMES: u32 = 4_096;
    /// Words of [`crate::maps::FILE_NAME_FILTER`]: 2^16 bits, so a full
    /// names map sets at most 1/16 of them.
    pub const FILE_NAME_FILTER_WORDS: u32 = 1 << (FILE_NAME_FILTER_BITS_LOG2 - 6);
    pub const FILE_NAME_FILTER_BITS_LOG2: u32 = 16;
    pub const MAX_FILE_INODES: u32 = 16_384;
    /// AgentGuard's own protected directories and files (selfprotect.rs).
    pub const MAX_SELF_INODES: u32 = 64;
    /// Words of [`crate::maps::SELF_FILTER`]: 2^12 bits for at most 64 inodes.
    pub const SELF_FILTER_WORDS: u32 = 1 << (SELF_FILTER_BITS_LOG2 - 6);
    pub const SELF_FILTER_BITS_LOG2: u32 = 12;
    /// How far above a file its protected directory is looked for: a file
    /// deeper than this below AgentGuard's directory is not recognised.
    pub const SELF_WALK_DEPTH: usize = 12;
    /// Directories in the kernel's directory cache at once (LRU), and how
    /// many levels up to its mount's root a cached directory may be.
    pub const MAX_DIRCACHE: u32 = 8_192;
    pub const DIRCACHE_DEPTH: usize = 8;
    /// Directories with a file prefix key below them ([`crate::maps::FILE_DIRMARK`]).
    pub const MAX_FILE_DIRMARKS: u32 = 65_536;
    /// Rules that can apply to one prefix, name or inode of one agent.
    pub const FILE_RULES_PER_KEY: usize = 12;
    /// Longest path the kernel assembles for a file decision, NUL included.
    pub const FILE_PATH_MAX: usize = 512;
    /// Path components the kernel walks when it builds a path itself.
    pub const FILE_WALK_DEPTH: usize = 32;
    /// Longest basename prefix a `PREFIX*` name pattern may have.
    pub const FILE_BASE_PREFIX_MAX: usize = 32;
    /// Approval grants alive at once (all agents together).
    pub const MAX_GRANTS: u32 = 4_096;
    /// Size of the holds ring in bytes (a power of two, a multiple of the page size).
    pub const HOLDS_RING_BYTES: u32 = 64 * 1024;
    /// Allowed network flows counted in the kernel at once (see
    /// [`crate::maps::FLOWS`]); when full, every allowed action is an event.
    pub const MAX_FLOWS: u32 = 16_384;
    /// The kernel's PID_MAX_LIMIT on 64-bit: no task id reaches it.
    pub const TASK_ID_LIMIT: u32 = 4 * 1024 * 1024;
    /// Words of [`crate::maps::TAG_HINTS`] (512 KiB: every task id).
    pub const TAG_HINT_WORDS: u32 = TASK_ID_LIMIT / 64;
}

/// Kinds of event. The first field of every event record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Exec = 1,
    Fork = 2,
    Exit = 3,
    /// A tagged task was moved to another cgroup: a notification for the
    /// daemon, which moves it back if it left its session (not a log line
    /// of its own; the daemon logs `cgroup_escape`).
    CgroupMove = 4,
    Net = 10,
    File = 20,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Exec,
            2 => Self::Fork,
            3 => Self::Exit,
            4 => Self::CgroupMove,
            10 => Self::Net,
            20 => Self::File,
            _ => return None,
        })
    }
}

/// What a rule decides.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow = 0,
    Deny = 1,
    /// Hold for a human: the kernel refuses the action (and stops the
    /// agent) unless a grant for this session and target exists
    /// ([`maps::GRANTS`]).
    Approve = 2,
    /// Allow and log.
    Audit = 3,
}

impl Decision {
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::Allow,
            1 => Self::Deny,
            2 => Self::Approve,
            3 => Self::Audit,
            _ => return None,
        })
    }

    /// Whether the kernel refuses the action.
    pub const fn blocks(self) -> bool {
        matches!(self, Self::Deny | Self::Approve)
    }
}

/// Slots of [`maps::HOOKS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookFlag {
    /// 1 while the on-demand programs (network hooks, and the file
    /// observation fallback where BPF-LSM cannot load) are attached. When 0,
    /// a process that becomes tagged at exec is stopped (SIGSTOP) by the exec
    /// hook so it cannot act before the daemon has attached them and resumes it.
    NetAttached = 0,
    /// This kernel's FMODE_CREATED bit, learnt by calibration (0: unknown,
    /// then every O_TRUNC open is judged as a truncation).
    FmodeCreated = 1,
    /// Calibration: the task whose opens `calibrate_fmode` records...
    CalibrateTid = 2,
    /// ...and the `f_mode` of its last open.
    CalibrateMode = 3,
    /// The daemon's tgid, which agents may not signal or ptrace
    /// (selfprotect.rs); written at each daemon start.
    DaemonTgid = 4,
    /// Bumped by the daemon after every change to the network rules or the
    /// agents' defaults. A counted flow ([`FlowCount::generation`]) decided
    /// under the current value is allowed again without deciding anew.
    NetGeneration = 5,
    /// Bumped by the daemon after every change to the file rules, the
    /// agents' defaults, the workspaces or AgentGuard's own marks: a
    /// [`DirCacheEntry`] stamped with another value is not used.
    FileGeneration = 6,
    /// Bumped by the kernel after every rename of a directory and every
    /// change of the mount tree (dircache.rs): a [`DirCacheEntry`] stamped
    /// with another value is not used.
    FileEpoch = 7,
}

pub const HOOK_SLOTS: u32 = 8;

/// Per-CPU counters in [`maps::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A ring buffer reservation failed: an event was lost.
    RingbufDrops = 0,
    /// A child of a tagged task could not be tagged (map full).
    TagInsertFailures = 1,
    /// Events submitted successfully.
    EventsSubmitted = 2,
    /// A tagged process was refused an action on AgentGuard itself
    /// (selfprotect.rs): a signal, ptrace, bpf(), or a write to its files.
    SelfProtectDenials = 3,
    /// An allowed network action could not start a counted flow
    /// ([`maps::FLOWS`] full): it was logged as an event of its own.
    FlowsFull = 4,
    /// A tag was written or removed by a program. The daemon reads the sum
    /// before it walks the tags and walks again only when it changed
    /// (reconciliation of an idle agent costs no walk: bench B8).
    TagChanges = 5,
    /// A tagged agent's file action allowed from the directory cache
    /// (dircache.rs): counted, not logged (docs/events.md, "Allowed file
    /// actions").
    FileAllowedRepeats = 6,
    /// A tagged agent's file action found this CPU's file scratch taken by
    /// a program run it preempted (kernels with full preemption): it could
    /// not be judged, and was refused (BPF-LSM) or contained (the
    /// fallback), fail closed, with rule [`RULE_PREEMPTED`]. A
    /// self-protection refusal that found it taken is counted here too: it
    /// is refused as always, and its event goes without the path.
    FileScratchBusy = 7,
}

pub const COUNTER_SLOTS: u32 = 8;

/// Slots of [`maps::STATE`] (nonzero means set): whether events can be
/// recorded, for the fail-closed mode. While `LogFailed` or `RingFull` is
/// set, the network and file programs deny the actions of tagged tasks.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateSlot {
    /// The daemon runs in fail-closed mode (set at start from the configuration).
    FailClosed = 0,
    /// The daemon cannot write the event log (disk full, I/O error); set and
    /// cleared by the daemon, only in fail-closed mode.
    LogFailed = 1,
    /// A ring-buffer reservation failed while `FailClosed` was set: events are
    /// being lost. Latched by the kernel, cleared by the daemon once it has
    /// drained the ring.
    RingFull = 2,
}

pub const STATE_SLOTS: u32 = 4;

/// The `rule_id` of an action denied because it could not be recorded
/// (fail-closed mode).
pub const RULE_FAIL_CLOSED: u32 = u32::MAX;

/// The `rule_id` of an action on AgentGuard's own files refused by
/// self-protection (selfprotect.rs), whatever the agent's policy says.
pub const RULE_SELF_PROTECT: u32 = u32::MAX - 1;

/// The `rule_id` of a file action refused because it could not be judged:
/// the program run for it preempted another one mid-judgment on the same
/// CPU, whose working state it would otherwise have overwritten
/// ([`Counter::FileScratchBusy`]).
pub const RULE_PREEMPTED: u32 = u32::MAX - 2;

/// The network hook that produced a [`NetEvent`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetHook {
    Connect4 = 1,
    Connect6 = 2,
    Sendmsg4 = 3,
    Sendmsg6 = 4,
}

impl NetHook {
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Connect4,
            2 => Self::Connect6,
            3 => Self::Sendmsg4,
            4 => Self::Sendmsg6,
            _ => return None,
        })
    }
}

/// The file operation that produced a [`FileEvent`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileOp {
    Unlink = 1,
    Rmdir = 2,
    /// The source of a rename.
    Rename = 3,
    /// truncate(2), ftruncate(2), or an open with O_TRUNC of an existing file.
    Truncate = 4,
    /// A new hard link; the event names the file linked to (its other name).
    Link = 5,
    /// The existing file a rename replaces (judged as a truncation of it:
    /// the name stays, its content goes).
    RenameOver = 6,
    /// An open for writing (self-protection only: policies do not judge it).
    Write = 7,
    /// A new file, directory, device or symlink (self-protection only).
    Create = 8,
}

impl FileOp {
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Unlink,
            2 => Self::Rmdir,
            3 => Self::Rename,
            4 => Self::Truncate,
            5 => Self::Link,
            6 => Self::RenameOver,
            7 => Self::Write,
            8 => Self::Create,
            _ => return None,
        })
    }

    /// The policy operations (bits of [`FileRuleEntry::ops`]) a rule must
    /// name to decide this action. A link and a rename over a file are
    /// judged as truncations of the file they name: another name can
    /// truncate it, a rename replaces its content.
    pub const fn rule_ops(self) -> u32 {
        match self {
            Self::Unlink => file_ops::UNLINK,
            Self::Rmdir => file_ops::RMDIR,
            Self::Rename => file_ops::RENAME,
            Self::Truncate | Self::Link | Self::RenameOver | Self::Write | Self::Create => file_ops::TRUNCATE,
        }
    }
}

/// Bits of [`FileRuleEntry::ops`]: the operations a file rule names.
pub mod file_ops {
    pub const UNLINK: u32 = 1;
    pub const RMDIR: u32 = 2;
    pub const RENAME: u32 = 4;
    pub const TRUNCATE: u32 = 8;
    pub const ALL: u32 = UNLINK | RMDIR | RENAME | TRUNCATE;
}

/// How a decision took effect.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// The kernel refused the action before it happened.
    Enforced = 0,
    /// The action was only observed; the agent is contained afterwards.
    Observed = 1,
}

/// Session ids of `agentguard run` sessions have this bit set; other sessions
/// are numbered by the pid of their first process (pids stay below 2^22).
pub const RUN_SESSION_BIT: u32 = 1 << 31;

/// Which agent and session a task belongs to. `agent_id` 0 means "none".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tag {
    pub agent_id: u32,
    pub session_id: u32,
}
const _: () = assert!(core::mem::size_of::<Tag>() == 8);

/// Per-agent defaults, in [`maps::AGENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// [`Decision`] for a network action no rule matches.
    pub net_default: u32,
    /// [`Decision`] for a file action no rule matches.
    pub file_default: u32,
    /// [`agent_flags`]: which kinds of file rules the agent has, so the
    /// kernel skips the lookups it cannot need.
    pub flags: u32,
    /// Bit `n` set: the agent has a basename-prefix rule `PREFIX*` with a
    /// PREFIX of `n + 1` bytes.
    pub file_prefix_lens: u32,
}

/// Bits of [`AgentConfig::flags`].
pub mod agent_flags {
    /// Prefix or exact-path rules keyed by the agent id.
    pub const FILE_PREFIX: u32 = 1;
    /// Workspace rules keyed by the session id.
    pub const FILE_SESSION: u32 = 2;
    /// `**/NAME/**` rules.
    pub const FILE_COMPONENT: u32 = 4;
    /// `**/NAME` rules.
    pub const FILE_BASENAME: u32 = 8;
    /// `*.EXT` rules.
    pub const FILE_SUFFIX: u32 = 16;
    /// `**/PREFIX*` rules.
    pub const FILE_BASE_PREFIX: u32 = 32;
    /// Protected multi-link files by (device, inode).
    pub const FILE_INODES: u32 = 64;
    /// `**/A/B/**` rules.
    pub const FILE_PAIR: u32 = 128;
    /// `**/A/B` rules.
    pub const FILE_BASE_PAIR: u32 = 256;
}
const _: () = assert!(core::mem::size_of::<AgentConfig>() == 16);

/// Key data of [`maps::NET_V4`]: agent id (big-endian, so it is the first 32
/// bits of every prefix) then the IPv4 address (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetKeyV4 {
    pub agent_be: [u8; 4],
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<NetKeyV4>() == 8);

/// Key data of [`maps::NET_V6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetKeyV6 {
    pub agent_be: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<NetKeyV6>() == 20);

/// One rule as the kernel checks it: a port range, a protocol, a decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRuleEntry {
    pub first_port: u16,
    pub last_port: u16,
    /// IPPROTO_TCP, IPPROTO_UDP, or 0 for any.
    pub protocol: u32,
    /// [`Decision`].
    pub decision: u32,
    /// 1-based index of the rule in its policy's `[[network.rule]]` list.
    pub rule_id: u32,
}
const _: () = assert!(core::mem::size_of::<NetRuleEntry>() == 16);

/// Every rule that may apply to a destination inside one prefix, in policy
/// order; the first that matches port and protocol decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetRuleList {
    pub count: u32,
    pub _pad: u32,
    pub entries: [NetRuleEntry; limits::NET_RULES_PER_PREFIX],
}
const _: () = assert!(core::mem::size_of::<NetRuleList>() == 8 + 16 * 16);

/// Key data of [`maps::FILE_PREFIX`]: an agent id (rules with absolute
/// paths) or a run-session id (rules relative to its workspace; these have
/// the top bit set), big-endian, then the path bytes. The kernel looks up
/// with a prefix length that ends just after the path's NUL, so a node
/// `P/` matches everything beneath P and a node `P\0` matches P exactly.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilePrefixKey {
    pub id_be: [u8; 4],
    pub path: [u8; limits::FILE_KEY_PATH],
}
const _: () = assert!(core::mem::size_of::<FilePrefixKey>() == 256);

/// One file rule as the kernel checks it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileRuleEntry {
    /// [`file_ops`] bits the rule applies to.
    pub ops: u32,
    /// [`Decision`].
    pub decision: u32,
    /// 1-based index of the rule in its policy's `[[files.rule]]` list.
    pub rule_id: u32,
}
const _: () = assert!(core::mem::size_of::<FileRuleEntry>() == 12);

/// Every rule that may apply to paths under one key, in policy order; the
/// kernel takes, over all the keys a path hits, the lowest `rule_id` whose
/// ops include the action's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRuleList {
    pub count: u32,
    pub _pad: u32,
    pub entries: [FileRuleEntry; limits::FILE_RULES_PER_KEY],
}
const _: () = assert!(core::mem::size_of::<FileRuleList>() == 8 + 12 * 12);

impl FileRuleList {
    pub const fn empty() -> Self {
        Self {
            count: 0,
            _pad: 0,
            entries: [FileRuleEntry { ops: 0, decision: 0, rule_id: 0 }; limits::FILE_RULES_PER_KEY],
        }
    }
}

/// Kinds of [`FileNameKey`].
pub mod name_kind {
    /// Any component of the path (`**/NAME/**`).
    pub const COMPONENT: u32 = 1;
    /// The last component (`**/NAME`).
    pub const BASENAME: u32 = 2;
    /// The last component's tail from one of its last three dots (`*.EXT`).
    pub const SUFFIX: u32 = 3;
    /// The last component's first bytes (`**/PREFIX*`).
    pub const BASE_PREFIX: u32 = 4;
    /// Two adjacent components anywhere, hashed as `A/B` (`**/A/B/**`).
    pub const PAIR: u32 = 5;
    /// The last two components (`**/A/B`).
    pub const BASE_PAIR: u32 = 6;
}

/// Key of [`maps::FILE_NAMES`]: the agent, the [`name_kind`], and the
/// [`fnv1a64`] hash of the name bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileNameKey {
    pub agent_id: u32,
    pub kind: u32,
    pub hash: u64,
}
const _: () = assert!(core::mem::size_of::<FileNameKey>() == 16);

/// The bit of [`maps::SELF_FILTER`] that stands for inode number `ino`, on
/// any file system: the kernel's walk tests it before it reads the inode's
/// device (an inode whose bit is clear is not AgentGuard's).
#[inline(always)]
pub const fn self_filter_bit(ino: u64) -> u32 {
    let x = (ino ^ 0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> (64 - limits::SELF_FILTER_BITS_LOG2)) as u32
}

/// The bit of [`maps::FILE_NAME_FILTER`] that stands for a
/// [`FileNameKey`]: the key's fields mixed by two multiplications, top bits
/// taken. The kernel and the daemon both compute it with this function.
#[inline(always)]
pub const fn file_name_filter_bit(agent_id: u32, kind: u32, hash: u64) -> u32 {
    let id = ((agent_id as u64) << 8 | kind as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let x = (hash ^ id).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> (64 - limits::FILE_NAME_FILTER_BITS_LOG2)) as u32
}

/// Key of [`maps::FILE_INODES`]. `dev` is the kernel's internal `dev_t`
/// (`MAJOR << 20 | MINOR`), not stat's encoding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileInodeKey {
    pub agent_id: u32,
    pub dev: u32,
    pub ino: u64,
}
const _: () = assert!(core::mem::size_of::<FileInodeKey>() == 16);

/// An open with O_TRUNC seen at syscall entry, judged at exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingOpen {
    /// The open flags.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PendingOpen>() == 8);

pub const FNV64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bits: how both sides hash names for [`FileNameKey`].
pub const fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = FNV64_OFFSET;
    let mut i = 0;
    while i < bytes.len() {
        h = (h ^ bytes[i] as u64).wrapping_mul(FNV64_PRIME);
        i += 1;
    }
    h
}

/// The second path hash of a file [`GrantKey`]: FNV-1a's shape with another
/// offset basis and multiplier, so two paths that collide in one hash are
/// not expected to collide in both (neither is cryptographic).
pub const GRANT_H2_OFFSET: u64 = 0x9e37_79b9_7f4a_7c15;
pub const GRANT_H2_PRIME: u64 = 0x0000_0001_0000_01c1;

/// The [`GrantKey::target`] of a file path, as the kernel computes it.
pub const fn path_grant_target(bytes: &[u8]) -> [u8; 16] {
    let mut h1 = FNV64_OFFSET;
    let mut h2 = GRANT_H2_OFFSET;
    let mut i = 0;
    while i < bytes.len() {
        h1 = (h1 ^ bytes[i] as u64).wrapping_mul(FNV64_PRIME);
        h2 = (h2 ^ bytes[i] as u64).wrapping_mul(GRANT_H2_PRIME);
        i += 1;
    }
    let (a, b) = (h1.to_ne_bytes(), h2.to_ne_bytes());
    let mut out = [0u8; 16];
    let mut j = 0;
    while j < 8 {
        out[j] = a[j];
        out[8 + j] = b[j];
        j += 1;
    }
    out
}

/// Byte offsets of the kernel struct members the file programs read,
/// computed from this kernel's BTF at load time (loader.rs) and handed to
/// the programs as one read-only global. Never hard-coded: they differ
/// between 6.1, 6.12 and 6.18.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub path_mnt: u32,
    pub path_dentry: u32,
    pub dentry_parent: u32,
    /// `d_name.name`: the name pointer inside the embedded qstr.
    pub dentry_name: u32,
    pub dentry_inode: u32,
    pub vfsmount_root: u32,
    /// Offset of the embedded `struct vfsmount` in `struct mount`.
    pub mount_mnt: u32,
    pub mount_parent: u32,
    pub mount_mountpoint: u32,
    pub file_path: u32,
    pub file_mode: u32,
    pub inode_mode: u32,
    pub inode_nlink: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub sb_dev: u32,
    pub task_fs: u32,
    pub fs_pwd: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    /// Offset of the first argument in a syscalls/sys_enter_* tracepoint
    /// record (the others follow, 8 bytes each), and of `ret` in sys_exit_*.
    pub syscall_args: u32,
    pub syscall_ret: u32,
    /// `dentry.d_iname` (the inline name) and its length in bytes; 0 when
    /// this kernel's BTF has none (the directory cache is then off).
    pub dentry_iname: u32,
    pub dentry_iname_len: u32,
    pub inode_generation: u32,
    /// `renamedata.old_dentry` and `.new_dentry` (the directory cache's
    /// rename epoch, dircache.rs).
    pub renamedata_old: u32,
    pub renamedata_new: u32,
    pub pad: u32,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 30 * 4);

/// Key of [`maps::FILE_DIRCACHE`]: an agent's session, the rule
/// operations of the action ([`FileOp::rule_ops`]), and the directory as
/// the kernel holds it (its `struct dentry *` and `struct vfsmount *`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirCacheKey {
    pub agent_id: u32,
    pub session_id: u32,
    pub ops: u32,
    pub pad: u32,
    pub dentry: u64,
    pub mnt: u64,
}
const _: () = assert!(core::mem::size_of::<DirCacheKey>() == 32);

/// Value of [`maps::FILE_DIRCACHE`]: what was true of the directory when
/// an allowed action in it was judged the long way. Used only while the
/// generation and epoch ([`HookFlag::FileGeneration`],
/// [`HookFlag::FileEpoch`]) are unchanged and the directory is still the
/// same one: the same inode (pointer, number, generation), and the same
/// parents and names up to its mount's root (`chain`: each level's
/// `d_parent` and `d_name.hash_len`, `depth` of them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirCacheEntry {
    pub generation: u32,
    pub epoch: u32,
    pub inode: u64,
    pub ino: u64,
    pub igen: u32,
    /// The agent's [`agent_flags`] and `file_prefix_lens` then.
    pub flags: u32,
    pub prefix_lens: u32,
    pub rule_id: u32,
    /// The directory's own name's hash (FNV, as the name scan computes
    /// it): a pair with the entry's name continues from it.
    pub name_hash: u64,
    pub depth: u64,
    pub chain: [[u64; 2]; limits::DIRCACHE_DEPTH],
    /// The agent's [`FileQuickFilter`] then.
    pub quick: FileQuickFilter,
}

/// Value of [`maps::FILE_QUICK`]: a filter over an entry's own name that
/// is clear for every name none of the agent's name keys
/// ([`FileNameKey`]) can match. `last2` has bit [`file_quick_bit`] of the
/// last two bytes of every component, basename, suffix and pair key (a
/// name that equals such a key, or ends with it, ends with the same two
/// bytes); `first` has bit `b` for every basename-prefix key that starts
/// with byte `b`. A key shorter than two bytes (other than a prefix) sets
/// every bit of `last2`. A name shorter than two bytes is never clear.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileQuickFilter {
    pub last2: [u64; 4],
    pub first: [u64; 4],
}
const _: () = assert!(core::mem::size_of::<FileQuickFilter>() == 64);

impl FileQuickFilter {
    /// Every name goes the long way.
    pub const ALL: Self = Self { last2: [u64::MAX; 4], first: [u64::MAX; 4] };

    /// Add a name key of the kind whose flag ([`agent_flags`]) is `flag`.
    pub fn add(&mut self, flag: u32, name: &[u8]) {
        if flag == agent_flags::FILE_BASE_PREFIX {
            match name.first() {
                Some(&b) => self.first[b as usize >> 6] |= 1 << (b & 63),
                None => self.first = [u64::MAX; 4],
            }
            return;
        }
        match name {
            [.., a, b] => {
                let bit = file_quick_bit(*a, *b) as usize;
                self.last2[bit >> 6] |= 1 << (bit & 63);
            }
            _ => self.last2 = [u64::MAX; 4],
        }
    }

    /// Whether a name of `len` bytes, first byte `first` and last two
    /// `prev`, `last`, is clear (the kernel's test, dircache.rs).
    #[inline(always)]
    pub fn clear(&self, len: usize, first: u8, prev: u8, last: u8) -> bool {
        let bit = file_quick_bit(prev, last) as usize;
        let f = first as usize;
        len >= 2 && (self.last2[bit >> 6] >> (bit & 63)) & 1 == 0 && (self.first[f >> 6] >> (f & 63)) & 1 == 0
    }
}

/// The bit of [`FileQuickFilter::last2`] for a name ending in the bytes
/// `prev`, `last`: the two bytes mixed by a multiplication, top 8 bits.
#[inline(always)]
pub const fn file_quick_bit(prev: u8, last: u8) -> u32 {
    ((prev as u32) << 8 | last as u32).wrapping_mul(0x9E37_79B1) >> 24
}

/// A NUL-padded path used as a map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathKey {
    pub bytes: [u8; limits::PATH_MAX],
}
const _: () = assert!(core::mem::size_of::<PathKey>() == limits::PATH_MAX);

impl PathKey {
    pub const fn zeroed() -> Self {
        Self {
            bytes: [0; limits::PATH_MAX],
        }
    }
}

/// Common head of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// [`EventKind`].
    pub kind: u32,
    pub agent_id: u32,
    pub session_id: u32,
    /// Thread-group id (the process id).
    pub pid: u32,
    /// Task id (the thread id).
    pub tid: u32,
    pub uid: u32,
    /// CLOCK_MONOTONIC (`bpf_ktime_get_ns`), nanoseconds.
    pub ktime_ns: u64,
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 32);

/// A tagged process executed a binary (or became tagged by doing so).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// Process id before the exec (differs when a non-leader thread execs).
    pub old_pid: u32,
    /// 0: already tagged; 1: this exec is what tagged the process (a
    /// selector matched); [`EXEC_TAGGED_AND_HELD`]: tagged, and stopped with
    /// SIGSTOP because the on-demand hooks were not attached yet.
    pub newly_tagged: u32,
    pub comm: [u8; limits::COMM_LEN],
    /// The path given to execve, NUL-terminated.
    pub filename: [u8; limits::PATH_MAX],
}
const _: () = assert!(core::mem::size_of::<ExecEvent>() == 32 + 8 + 16 + 256);

/// See [`ExecEvent::newly_tagged`].
pub const EXEC_TAGGED_AND_HELD: u32 = 2;

/// A tagged task created a child task, which inherited the tag.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ForkEvent {
    pub header: EventHeader,
    /// Task id of the child (equal to its pid unless it is a thread).
    pub child_tid: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ForkEvent>() == 40);

/// A tagged task exited; its tag is gone.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    pub header: EventHeader,
    /// `task->exit_code` as the kernel keeps it (wait(2) status encoding:
    /// exit status in bits 8..16, terminating signal in bits 0..7, 0x80 core
    /// dumped); valid only when [`EXIT_STATUS_KNOWN`] is set in `flags`.
    pub exit_code: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<ExitEvent>() == 40);
/// [`ExitEvent::flags`]: `exit_code` was read from the task.
pub const EXIT_STATUS_KNOWN: u32 = 1;

/// A tagged task was moved to another cgroup. The header carries the moved
/// task's tag, and the pid and tid of the task that moved it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CgroupMoveEvent {
    pub header: EventHeader,
    /// Task id of the moved task (its pid when the whole process moved).
    pub moved_tid: u32,
    pub _pad: u32,
    /// The cgroup it was moved to.
    pub dst_cgroup_id: u64,
}
const _: () = assert!(core::mem::size_of::<CgroupMoveEvent>() == 48);

/// A tagged process tried to connect or send to an address.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NetEvent {
    pub header: EventHeader,
    /// [`NetHook`].
    pub hook: u32,
    /// [`Decision`].
    pub decision: u32,
    /// Rule that decided, 0 for the agent's default.
    pub rule_id: u32,
    /// IPPROTO_TCP / IPPROTO_UDP.
    pub protocol: u32,
    /// Address family (AF_INET / AF_INET6).
    pub family: u16,
    /// Destination port, host byte order.
    pub port: u16,
    /// [`approval`]: for an `approve` decision, whether the action was held
    /// or let through by a grant.
    pub approval: u32,
    /// Destination address: IPv4 in the first 4 bytes, IPv6 all 16, network order.
    pub addr: [u8; 16],
    /// The approval whose grant let the action through (0: none).
    pub approval_id: u32,
    /// [`NET_FLOW_FIRST`]: this allowed action opened a counted flow (its
    /// repeats are counted in [`maps::FLOWS`], not sent as events); 0: a
    /// single action.
    pub flow: u32,
}
const _: () = assert!(core::mem::size_of::<NetEvent>() == 32 + 24 + 16 + 8);

/// [`NetEvent::flow`]: the first action of a counted flow.
pub const NET_FLOW_FIRST: u32 = 1;

/// An allowed network flow of one process: everything a [`NetEvent`] of an
/// `allow` decision says except the time and the rule (in [`FlowCount`]).
/// Repeats of the same key are the same action again, so the kernel counts
/// them instead of sending events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Process id (thread-group id).
    pub pid: u32,
    pub session_id: u32,
    pub agent_id: u32,
    pub _pad: u32,
    /// [`NetHook`].
    pub hook: u32,
    pub protocol: u32,
    pub family: u16,
    pub port: u16,
    pub addr: [u8; 16],
    /// The real uid the process acted as.
    pub uid: u32,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 48);

/// Actions of a flow: counted by the kernel in [`maps::FLOWS`] (the first
/// included), or accounted for by the log in [`maps::FLOWS_LOGGED`] (where
/// only `count` is used).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCount {
    pub count: u64,
    /// The rule that allowed the flow (0: the agent's default). Fixed for
    /// the flow's life: when a reload decides its actions by another rule,
    /// they are sent as events of their own.
    pub rule_id: u32,
    /// [`HookFlag::NetGeneration`] the decision was taken (or confirmed)
    /// under: while it is current, a repeat is allowed without deciding.
    pub generation: u32,
    /// Set when the kernel starts the flow (its clock then), so a
    /// [`FlowSlot`] counting this flow's repeats can tell it from a later
    /// flow of the same key after the daemon removed this one.
    pub serial: u64,
}
const _: () = assert!(core::mem::size_of::<FlowCount>() == 24);

/// The last allowed flow a CPU counted ([`maps::FLOW_SLOTS`]): while the
/// same task repeats it under the same tag epoch and rule generation, the
/// program counts the repeat here, without looking up the tag or the flow.
/// `pending` belongs to the flow with `key` and `serial` in [`maps::FLOWS`]:
/// the program adds it there when the slot is refilled, and until then the
/// daemon adds it to what it reads there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSlot {
    /// 1 while a program on this CPU uses the slot (taken with an atomic
    /// compare-and-exchange; a program that finds it taken does without).
    pub busy: u64,
    /// Odd while the slot is being refilled (its pending count moved to
    /// [`maps::FLOWS`], its key rewritten), +2 after each refill: a reader
    /// that sees it unchanged around its reads saw no refill.
    pub seq: u64,
    /// The task (pid << 32 | tid) whose tag the flow's key was built from.
    pub pid_tgid: u64,
    /// [`maps::TAG_EPOCH`] read before that tag was.
    pub tag_epoch: u64,
    /// [`FlowCount::serial`] of the flow.
    pub serial: u64,
    /// Repeats counted here and not yet in [`maps::FLOWS`].
    pub pending: u64,
    /// [`HookFlag::NetGeneration`] at the fill.
    pub generation: u32,
    pub _pad: u32,
    pub key: FlowKey,
}
const _: () = assert!(core::mem::size_of::<FlowSlot>() == 104);

/// A tagged process tried a file action.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileEvent {
    pub header: EventHeader,
    /// [`FileOp`].
    pub op: u32,
    /// [`Decision`].
    pub decision: u32,
    pub rule_id: u32,
    /// [`Enforcement`].
    pub enforcement: u32,
    /// [`approval`], as in [`NetEvent::approval`].
    pub approval: u32,
    /// The approval whose grant let the action through (0: none).
    pub approval_id: u32,
    /// For an `approve` decision: the path's [`GrantKey::target`], which a
    /// grant for this action must carry.
    pub grant_target: [u8; 16],
    /// Directory the action happened in, as `bpf_d_path` resolved it; or
    /// the whole path when the kernel assembled it itself (then `name` is
    /// empty). Truncated to its first 255 bytes.
    pub dir: [u8; limits::PATH_MAX],
    /// The entry's name in that directory.
    pub name: [u8; limits::PATH_MAX],
}
const _: () = assert!(core::mem::size_of::<FileEvent>() == 32 + 24 + 16 + 512);

/// Values of [`NetEvent::approval`] and [`FileEvent::approval`].
pub mod approval {
    /// The decision was not `approve`.
    pub const NONE: u32 = 0;
    /// `approve` and no grant: refused and held for a human.
    pub const HELD: u32 = 1;
    /// Let through by a one-time grant, which the kernel deleted as it used it.
    pub const GRANTED_ONCE: u32 = 2;
    /// Let through by a grant that lasts until its expiry.
    pub const GRANTED: u32 = 3;
}

/// What a [`GrantKey`] names.
pub mod grant_kind {
    pub const NET: u32 = 1;
    pub const FILE: u32 = 2;
}

/// Key of [`maps::GRANTS`]: one action of one session on one target.
/// Network: `op` is the protocol, `port` and `family` the destination's,
/// `target` its address as in [`NetEvent::addr`] (IPv4-mapped IPv6 judged
/// as IPv4). File: `op` is the [`FileOp`], `port`/`family` are 0, and
/// `target` holds the [`fnv1a64`] of the whole path (8 bytes, native
/// order) then a second, independent 64-bit hash of it ([`path_grant_target`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantKey {
    pub session_id: u32,
    pub kind: u32,
    pub op: u32,
    pub port: u16,
    pub family: u16,
    pub target: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<GrantKey>() == 32);

/// An action was held for approval (one per held attempt, in
/// [`maps::HOLDS`]): which process, so its agent can be frozen at once.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HoldEvent {
    pub header: EventHeader,
    /// [`grant_kind`]: NET, or FILE (the process is also stopped, and must
    /// be continued once its cgroup is freezing).
    pub kind: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<HoldEvent>() == 40);

/// Value of [`maps::GRANTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// CLOCK_MONOTONIC (`bpf_ktime_get_ns`) after which the grant is void.
    pub expires_ns: u64,
    /// Nonzero: valid for one use; the kernel deletes it as it uses it (only
    /// the user whose delete succeeds passes, so two racing retries cannot
    /// both go through).
    pub once: u32,
    /// The approval that granted it, for the event.
    pub approval_id: u32,
}
const _: () = assert!(core::mem::size_of::<Grant>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `repr(C)`, `Copy`, and have no padding (checked
    // by the size assertions above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Tag {}
    unsafe impl aya::Pod for super::AgentConfig {}
    unsafe impl aya::Pod for super::PathKey {}
    unsafe impl aya::Pod for super::NetKeyV4 {}
    unsafe impl aya::Pod for super::NetKeyV6 {}
    unsafe impl aya::Pod for super::NetRuleList {}
    unsafe impl aya::Pod for super::FilePrefixKey {}
    unsafe impl aya::Pod for super::FileRuleList {}
    unsafe impl aya::Pod for super::FileNameKey {}
    unsafe impl aya::Pod for super::FileInodeKey {}
    unsafe impl aya::Pod for super::PendingOpen {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::GrantKey {}
    unsafe impl aya::Pod for super::Grant {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowCount {}
    unsafe impl aya::Pod for super::FlowSlot {}
    unsafe impl aya::Pod for super::FileQuickFilter {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_reference_values() {
        assert_eq!(fnv1a64(b""), FNV64_OFFSET);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn links_and_replacements_are_judged_as_truncations() {
        assert_eq!(FileOp::Link.rule_ops(), file_ops::TRUNCATE);
        assert_eq!(FileOp::RenameOver.rule_ops(), file_ops::TRUNCATE);
        assert_eq!(FileOp::Rename.rule_ops(), file_ops::RENAME);
    }

    /// The quick filter's test, as the kernel makes it from a name.
    fn quick_clear(q: &FileQuickFilter, name: &[u8]) -> bool {
        match name {
            [first, .., prev, last] => q.clear(name.len(), *first, *prev, *last),
            _ => false,
        }
    }

    /// Every name a key could match is not clear; short keys and names
    /// always go the long way; most other names are clear.
    #[test]
    fn the_quick_filter_never_clears_a_name_a_key_could_match() {
        let mut q = FileQuickFilter::default();
        q.add(agent_flags::FILE_COMPONENT, b".git");
        q.add(agent_flags::FILE_SUFFIX, b".bak");
        q.add(agent_flags::FILE_BASENAME, b"id_rsa");
        q.add(agent_flags::FILE_PAIR, b".ssh/config");
        q.add(agent_flags::FILE_BASE_PREFIX, b"backup-");
        for name in [&b".git"[..], b"db.bak", b".bak", b"x.tar.bak", b"id_rsa", b"config", b"backup-1", b"b9"] {
            assert!(!quick_clear(&q, name), "{:?}", core::str::from_utf8(name));
        }
        assert!(!quick_clear(&q, b"x"), "a one-byte name");
        // f0 .. f999
        let clear = (0..1000u32)
            .filter(|i| {
                let d = [b'f', b'0' + (i / 100) as u8, b'0' + (i / 10 % 10) as u8, b'0' + (i % 10) as u8];
                let skip = if *i < 10 { 2 } else if *i < 100 { 1 } else { 0 };
                let mut name = [0u8; 4];
                name[0] = b'f';
                name[1..4 - skip].copy_from_slice(&d[1 + skip..]);
                quick_clear(&q, &name[..4 - skip])
            })
            .count();
        assert!(clear > 900, "{clear} of 1000 plain names clear");
        let mut short = FileQuickFilter::default();
        short.add(agent_flags::FILE_BASENAME, b"a");
        assert!(!quick_clear(&short, b"f1") && !quick_clear(&short, b"zz"), "a one-byte key clears nothing");
        assert!(!quick_clear(&FileQuickFilter::ALL, b"f1"));
    }
}
