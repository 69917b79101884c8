//! A small program the integration tests run as an "agent": it performs one
//! action the way an improvising agent might (connect, sendto, threads,
//! vfork, clone3, double fork, unlink...) and prints what the kernel said.
//! The VM harness has no bash or python, so everything the tests need from a
//! child process is here.
//!
//! Output: one `key=value` line per fact; exit 0 when the action succeeded,
//! 1 when the kernel refused it (with `errno=NAME`), 2 on usage errors.
use std::{
    ffi::CString,
    net::{SocketAddr, TcpStream, UdpSocket},
    process::exit,
    time::Duration,
};

fn usage() -> ! {
    eprintln!(
        "usage: ag-testbin connect tcp|udp ADDR:PORT | sendto ADDR:PORT | sleep SECS | threads N SECS | \
         vfork CMD... | clone3 CMD... | daemonize CMD... | unlink PATH | rmdir PATH | rename FROM TO | \
         truncate PATH | open-trunc PATH | ftruncate PATH | unlinkat DIR NAME | link FROM TO | append PATH TEXT | write PATH TEXT | create PATH | mkdir PATH | symlink TARGET PATH | exec CMD... | connects ADDR:PORT N RATE now|stdin [THREADS] | connects-until ADDR:PORT STOPFILE | signal PID SIG | ptrace PID | bpf-obj-get PINPATH | counter DIR|- MS | tree N DIR|- MS | forkstorm DEPTH FANOUT SECS | \
         steps STEP... (tcp=ADDR:PORT, udp=ADDR:PORT, unlink=PATH, rmdir=PATH, rename=FROM:TO, wait=PATH, sock=SOCKET:JSON) | \
         hold-loop tcp|unlink ADDR|PATH | race-unlink DIR N FILE SECS | race-rename DIR SECS"
    );
    exit(2)
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ENOENT) => "ENOENT".into(),
        Some(n) => format!("E{n}"),
        None => e.to_string(),
    }
}

fn report(r: std::io::Result<()>) -> ! {
    match r {
        Ok(()) => {
            println!("result=ok");
            exit(0)
        }
        Err(e) => {
            println!("result=err");
            println!("errno={}", errno_name(&e));
            exit(1)
        }
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| {
        eprintln!("bad address {s}: {e}");
        exit(2)
    })
}

fn cstrings(args: &[String]) -> Vec<CString> {
    args.iter()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_else(|_| usage()))
        .collect()
}

/// exec argv (never returns on success).
fn exec(args: &[String]) -> ! {
    if args.is_empty() {
        usage();
    }
    let c = cstrings(args);
    let mut ptrs: Vec<*const libc::c_char> = c.iter().map(|s| s.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: NUL-terminated argv of valid C strings.
    unsafe { libc::execvp(ptrs[0], ptrs.as_ptr()) };
    eprintln!("exec {}: {}", args[0], std::io::Error::last_os_error());
    // SAFETY: leaving without running destructors (we may be a vfork child).
    unsafe { libc::_exit(127) }
}

fn environ() -> *const *mut libc::c_char {
    unsafe extern "C" {
        static environ: *const *mut libc::c_char;
    }
    // SAFETY: reading the C runtime's environment pointer.
    unsafe { environ }
}

fn wait_child(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: plain waitpid.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            eprintln!("ag-testbin: waitpid({pid}): {e}");
            return 125;
        }
    }
    if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { usage() };
    println!("pid={}", std::process::id());
    match (cmd.as_str(), &args[1..]) {
        ("connect", [proto, a]) => {
            let a = addr(a);
            let r = match proto.as_str() {
                "tcp" => TcpStream::connect_timeout(&a, Duration::from_secs(3)).map(drop),
                "udp" => {
                    let bind = if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                    UdpSocket::bind(bind).and_then(|s| s.connect(a))
                }
                _ => usage(),
            };
            report(r)
        }
        ("connect-twice", [proto, a, gate]) => {
            // Connect, wait for the gate file to appear, connect again: the
            // same tagged process across a policy change.
            let a = addr(a);
            let once = || match proto.as_str() {
                "tcp" => TcpStream::connect_timeout(&a, Duration::from_secs(3)).map(drop),
                _ => UdpSocket::bind(if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).and_then(|s| s.connect(a)),
            };
            let show = |n: u32, r: std::io::Result<()>| match r {
                Ok(()) => println!("try{n}=ok"),
                Err(e) => println!("try{n}={}", errno_name(&e)),
            };
            show(1, once());
            while !std::path::Path::new(gate).exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
            show(2, once());
            exit(0)
        }
        ("sendto", [a]) => {
            let a = addr(a);
            let bind = if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            report(UdpSocket::bind(bind).and_then(|s| s.send_to(b"agentguard", a)).map(drop))
        }
        ("sleep", [secs]) => {
            std::thread::sleep(Duration::from_secs_f64(secs.parse().unwrap_or_else(|_| usage())));
            exit(0)
        }
        ("threads", [n, secs]) => {
            let n: usize = n.parse().unwrap_or_else(|_| usage());
            let secs: f64 = secs.parse().unwrap_or_else(|_| usage());
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    std::thread::spawn(move || {
                        // SAFETY: gettid has no preconditions.
                        println!("tid={}", unsafe { libc::gettid() });
                        std::thread::sleep(Duration::from_secs_f64(secs));
                    })
                })
                .collect();
            for h in handles {
                let _ = h.join();
            }
            exit(0)
        }
        ("vfork", rest) => {
            // glibc's posix_spawn creates the child with clone(CLONE_VM |
            // CLONE_VFORK): the vfork path, without libc::vfork's hazards.
            let c = cstrings(rest);
            let mut ptrs: Vec<*mut libc::c_char> = c.iter().map(|s| s.as_ptr().cast_mut()).collect();
            ptrs.push(std::ptr::null_mut());
            let mut pid: libc::pid_t = 0;
            // SAFETY: valid NUL-terminated argv; environ is the process's own.
            let rc = unsafe {
                libc::posix_spawnp(&mut pid, ptrs[0], std::ptr::null(), std::ptr::null(), ptrs.as_ptr(), environ())
            };
            if rc != 0 {
                eprintln!("posix_spawnp: {}", std::io::Error::from_raw_os_error(rc));
                exit(2)
            }
            println!("child={pid}");
            exit(wait_child(pid))
        }
        ("clone3", rest) => {
            // struct clone_args with every field zero except exit_signal = SIGCHLD.
            let mut cl = [0u64; 11];
            cl[4] = libc::SIGCHLD as u64;
            // SAFETY: clone3 without CLONE_VM behaves like fork.
            let pid = unsafe { libc::syscall(libc::SYS_clone3, cl.as_mut_ptr(), std::mem::size_of_val(&cl)) };
            if pid == 0 {
                exec(rest);
            }
            if pid < 0 {
                eprintln!("clone3: {}", std::io::Error::last_os_error());
                exit(2)
            }
            println!("child={pid}");
            exit(wait_child(pid as libc::pid_t))
        }
        ("daemonize", rest) => {
            // The classic double fork + setsid: the grandchild is reparented
            // away from us and leaves our session.
            // SAFETY: fork in a single-threaded program.
            match unsafe { libc::fork() } {
                0 => {
                    unsafe { libc::setsid() };
                    match unsafe { libc::fork() } {
                        0 => {
                            println!("grandchild={}", std::process::id());
                            // Like a real daemon: let go of the caller's stdio.
                            let null = CString::new("/dev/null").unwrap_or_else(|_| usage());
                            // SAFETY: plain open/dup2 on valid descriptors.
                            unsafe {
                                let fd = libc::open(null.as_ptr(), libc::O_RDWR);
                                for target in 0..3 {
                                    libc::dup2(fd, target);
                                }
                            }
                            exec(rest)
                        }
                        _ => unsafe { libc::_exit(0) },
                    }
                }
                pid => {
                    wait_child(pid);
                    // Give the grandchild time to print before we exit.
                    std::thread::sleep(Duration::from_millis(100));
                    exit(0)
                }
            }
        }
        ("exec", rest) => exec(rest),
        ("connects", [a, n, rate, gate]) => connects(
            addr(a),
            n.parse().unwrap_or_else(|_| usage()),
            rate.parse().unwrap_or_else(|_| usage()),
            gate == "stdin",
            1,
        ),
        ("connects", [a, n, rate, gate, threads]) => connects(
            addr(a),
            n.parse().unwrap_or_else(|_| usage()),
            rate.parse().unwrap_or_else(|_| usage()),
            gate == "stdin",
            threads.parse().unwrap_or_else(|_| usage()),
        ),
        ("connects-until", [a, stop]) => connects_until(addr(a), stop),
        // Attacks on AgentGuard itself (self-protection).
        ("signal", [pid, sig]) => {
            let (pid, sig): (i32, i32) = (pid.parse().unwrap_or_else(|_| usage()), sig.parse().unwrap_or_else(|_| usage()));
            // SAFETY: plain syscall.
            let r = unsafe { libc::kill(pid, sig) };
            report(if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) })
        }
        ("ptrace", [pid]) => {
            let pid: i32 = pid.parse().unwrap_or_else(|_| usage());
            // SAFETY: PTRACE_SEIZE with null addr/data; detached at once if it worked.
            let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0usize, 0usize) };
            let res = if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
            if r == 0 {
                // SAFETY: as above.
                unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0usize, 0usize) };
            }
            report(res)
        }
        ("bpf-obj-get", [path]) => {
            // BPF_OBJ_GET of a pinned map: the first step of rewriting it.
            let c = CString::new(path.as_bytes()).unwrap_or_else(|_| usage());
            let mut attr = [0u64; 16];
            attr[0] = c.as_ptr() as u64;
            const BPF_OBJ_GET: libc::c_long = 7;
            // SAFETY: bpf(2) with a zeroed attr whose pathname points at a valid C string.
            let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_ptr(), std::mem::size_of_val(&attr)) };
            if fd >= 0 {
                // SAFETY: our own fd.
                unsafe { libc::close(fd as i32) };
            }
            report(if fd >= 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) })
        }
        ("counter", [dir, ms]) => counter_loop(dir, millis(ms)),
        ("steps", steps) if !steps.is_empty() => run_steps(steps),
        ("hold-loop", [what, arg]) => hold_loop(what, arg),
        ("race-unlink", [dir, n, file, secs]) => race_unlink(
            dir,
            n.parse().unwrap_or_else(|_| usage()),
            file,
            Duration::from_secs_f64(secs.parse().unwrap_or_else(|_| usage())),
        ),
        ("race-rename", [dir, secs]) => race_rename(dir, Duration::from_secs_f64(secs.parse().unwrap_or_else(|_| usage()))),
        ("tree", [n, dir, ms]) => tree(n.parse().unwrap_or_else(|_| usage()), dir, millis(ms)),
        ("forkstorm", [depth, fanout, secs]) => {
            // A lifetime in rounds of the fork loop, not a deadline: under a
            // storm this VM's clock was seen to leap seconds ahead.
            let rounds = (secs.parse::<f64>().unwrap_or_else(|_| usage()) * 1000.0 / STORM_PAUSE_MS as f64) as u64;
            forkstorm(0, depth.parse().unwrap_or_else(|_| usage()), fanout.parse().unwrap_or_else(|_| usage()), rounds)
        }
        ("unlink", [p]) => report(std::fs::remove_file(p)),
        ("rmdir", [p]) => report(std::fs::remove_dir(p)),
        ("rename", [a, b]) => report(std::fs::rename(a, b)),
        ("truncate", [p]) => {
            // truncate(2) on the path, not ftruncate on a descriptor.
            let c = CString::new(p.as_bytes()).unwrap_or_else(|_| usage());
            // SAFETY: valid C string.
            let r = unsafe { libc::truncate(c.as_ptr(), 0) };
            report(if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) })
        }
        ("open-trunc", [p]) => report(std::fs::OpenOptions::new().write(true).truncate(true).open(p).map(drop)),
        // ftruncate(2) on a descriptor opened without O_TRUNC.
        ("ftruncate", [p]) => report(std::fs::OpenOptions::new().write(true).open(p).and_then(|f| f.set_len(0))),
        // unlinkat(2) relative to a directory descriptor, as `rm -r` does.
        ("unlinkat", [dir, name]) => report(unlinkat(dir, name)),
        ("link", [from, to]) => report(std::fs::hard_link(from, to)),
        ("append", [p, text]) => report(
            std::fs::OpenOptions::new().append(true).open(p).and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes())),
        ),
        ("write", [p, text]) => report(std::fs::write(p, text)),
        ("create", [p]) => report(std::fs::OpenOptions::new().write(true).create_new(true).open(p).map(drop)),
        ("mkdir", [p]) => report(std::fs::create_dir(p)),
        ("symlink", [target, p]) => report(std::os::unix::fs::symlink(target, p)),
        _ => usage(),
    }
}

fn unlinkat(dir: &str, name: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let d = std::fs::File::open(dir)?;
    let c = CString::new(name.as_bytes()).unwrap_or_else(|_| usage());
    // SAFETY: a valid directory descriptor and C string.
    if unsafe { libc::unlinkat(d.as_raw_fd(), c.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

// ---- process trees for the killswitch tests --------------------------------

fn millis(ms: &str) -> Duration {
    Duration::from_millis(ms.parse().unwrap_or_else(|_| usage()))
}

fn fork() -> libc::pid_t {
    // SAFETY: these modes fork only while single-threaded.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!("fork: {}", std::io::Error::last_os_error());
        // SAFETY: leaving without running the parent's destructors.
        unsafe { libc::_exit(2) }
    }
    pid
}

/// Forever: count, write the count to DIR/<pid> (fixed width, at offset 0,
/// so a reader sees whole numbers), sleep. With DIR `-`, only sleep: an idle
/// agent process.
fn counter_loop(dir: &str, every: Duration) -> ! {
    use std::os::unix::fs::FileExt as _;
    let file = (dir != "-").then(|| {
        let path = format!("{dir}/{}", std::process::id());
        std::fs::File::create(&path).unwrap_or_else(|e| {
            eprintln!("create {path}: {e}");
            exit(2)
        })
    });
    let mut n: u64 = 0;
    loop {
        n += 1;
        if let Some(f) = &file {
            let _ = f.write_at(format!("{n:020}\n").as_bytes(), 0);
        }
        std::thread::sleep(every);
    }
}

/// N children in three shapes (a plain child; a double-forked, setsid'd
/// grandchild reparented away from us; a child with a grandchild of its
/// own), every process a counter loop; prints `ready=<processes>` (this one
/// included) once all exist, then counts too.
fn tree(n: usize, dir: &str, every: Duration) -> ! {
    let mut made = 1;
    for i in 0..n {
        match i % 3 {
            0 => {
                if fork() == 0 {
                    counter_loop(dir, every);
                }
                made += 1;
            }
            1 => {
                let mid = fork();
                if mid == 0 {
                    // SAFETY: plain syscalls in the child.
                    unsafe { libc::setsid() };
                    if fork() == 0 {
                        counter_loop(dir, every);
                    }
                    // SAFETY: leaving the intermediate child at once.
                    unsafe { libc::_exit(0) }
                }
                wait_child(mid);
                made += 1;
            }
            _ => {
                if fork() == 0 {
                    if fork() == 0 {
                        counter_loop(dir, every);
                    }
                    counter_loop(dir, every);
                }
                made += 2;
            }
        }
    }
    println!("ready={made}");
    counter_loop(dir, every)
}

const STORM_PAUSE_MS: u64 = 20;

/// A fork storm: down to DEPTH, every process forks FANOUT children (every
/// other one double-forked and setsid'd), then forks a short-lived child
/// every STORM_PAUSE_MS, `rounds` times, and leaves, so a storm that a failed
/// test left behind ends by itself. DEPTH 3 and FANOUT 3 make 40 processes
/// that fork some 2 000 times a second in all: enough that forks are always
/// in flight, little enough that a 2-core machine stays responsive.
fn forkstorm(depth: u32, max_depth: u32, fanout: u32, rounds: u64) -> ! {
    if depth < max_depth {
        for i in 0..fanout {
            if i % 2 == 1 {
                let mid = fork();
                if mid == 0 {
                    // SAFETY: plain syscalls in the child.
                    unsafe { libc::setsid() };
                    if fork() == 0 {
                        forkstorm(depth + 1, max_depth, fanout, rounds);
                    }
                    // SAFETY: leaving the intermediate child at once.
                    unsafe { libc::_exit(0) }
                }
                wait_child(mid);
            } else if fork() == 0 {
                forkstorm(depth + 1, max_depth, fanout, rounds);
            }
        }
    }
    for _ in 0..rounds {
        let pid = fork();
        if pid == 0 {
            // SAFETY: the short-lived child leaves at once.
            unsafe { libc::_exit(0) }
        }
        wait_child(pid);
        std::thread::sleep(Duration::from_millis(STORM_PAUSE_MS));
    }
    exit(0)
}

// ---- event floods for the event-log tests and benches ------------------------

/// N UDP connects on one socket (each runs the kernel's connect hook and
/// emits one event), at RATE per second (0: as fast as possible). With
/// `gated`, prints `ready=1` and waits for a line on stdin before starting,
/// and for another (or EOF) before exiting. Prints `attempts=`, `denied=`
/// (EPERM), `start_ns=` (CLOCK_REALTIME) and `elapsed_ns=`.
/// UDP connects in a tight loop until `stop` exists (looked at every 1024
/// connects): `ready=1` first, then `attempts=` and `denied=` (EPERM).
fn connects_until(a: SocketAddr, stop: &str) -> ! {
    let bind = if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = UdpSocket::bind(bind).unwrap_or_else(|e| {
        eprintln!("bind: {e}");
        exit(2)
    });
    println!("ready=1");
    let (mut attempts, mut denied) = (0u64, 0u64);
    loop {
        for _ in 0..1024 {
            attempts += 1;
            if let Err(e) = sock.connect(a) {
                if e.raw_os_error() == Some(libc::EPERM) {
                    denied += 1;
                }
            }
        }
        if std::path::Path::new(stop).exists() {
            break;
        }
    }
    println!("attempts={attempts}");
    println!("denied={denied}");
    exit(0)
}

/// `n` UDP connects to `a` at `rate` per second in all (0: flat out),
/// shared by `threads` threads with a socket each (one thread cannot offer
/// B4's rate on its own: each tagged connect is also a kernel event).
fn connects(a: SocketAddr, n: u64, rate: u64, gated: bool, threads: u64) -> ! {
    use std::io::BufRead as _;
    let SocketAddr::V4(v4) = a else {
        eprintln!("connects: IPv4 only");
        exit(2)
    };
    let threads = threads.max(1);
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    if gated {
        println!("ready=1");
        let _ = stdin.read_line(&mut line);
    }
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let start = std::time::Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let share = n / threads + u64::from(t < n % threads);
            let rate = rate / threads;
            std::thread::spawn(move || connect_loop(v4, share, rate, start))
        })
        .collect();
    let denied: u64 = workers.into_iter().map(|w| w.join().unwrap_or(0)).sum();
    let elapsed = start.elapsed();
    println!("attempts={n}");
    println!("denied={denied}");
    println!("start_ns={wall}");
    println!("elapsed_ns={}", elapsed.as_nanos());
    if gated {
        line.clear();
        let _ = stdin.read_line(&mut line);
    }
    exit(0)
}

/// A paced [`connect_loop`] checks its schedule this often (a burst of at
/// most this many connects, ~100 µs at B4's rate).
const PACE_EVERY: u64 = 32;

/// One thread of [`connects`]: returns how many were refused (EPERM).
fn connect_loop(v4: std::net::SocketAddrV4, n: u64, rate: u64, start: std::time::Instant) -> u64 {
    use std::os::fd::AsRawFd as _;
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap_or_else(|e| {
        eprintln!("bind: {e}");
        exit(2)
    });
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
        sin_zero: [0; 8],
    };
    let mut denied = 0u64;
    for i in 0..n {
        // SAFETY: a valid socket and a sockaddr_in of the right length.
        let r = unsafe {
            libc::connect(sock.as_raw_fd(), (&sin as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
            denied += 1;
        }
        // Pace every PACE_EVERY connects by sleeping until the schedule
        // catches up. Never spin: on two cores, two spinning generator
        // threads leave the daemon no CPU, and then B4 and B5 measure the
        // generator, not the log.
        if let Some(step) = 1_000_000_000_u64.checked_div(rate) {
            if i % PACE_EVERY == PACE_EVERY - 1 {
                let due = Duration::from_nanos((i + 1).saturating_mul(step));
                let now = start.elapsed();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
        }
    }
    denied
}

/// `steps`: one action after another, each printed as `sN=ok|ERRNO` (N from
/// 1; `wait` steps print nothing): an agent that retries after a human
/// answered, or tries another target. `sock=PATH:JSON` sends one request
/// line to a Unix socket and prints the answer line as `sN=...`.
fn run_steps(steps: &[String]) -> ! {
    let mut n = 0;
    for step in steps {
        let Some((what, arg)) = step.split_once('=') else { usage() };
        if what == "wait" {
            while !std::path::Path::new(arg).exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        n += 1;
        let r = match what {
            "tcp" => TcpStream::connect_timeout(&addr(arg), Duration::from_secs(3)).map(drop),
            "udp" => {
                let a = addr(arg);
                UdpSocket::bind(if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).and_then(|s| s.connect(a))
            }
            "unlink" => std::fs::remove_file(arg),
            "rmdir" => std::fs::remove_dir(arg),
            "rename" => {
                let Some((from, to)) = arg.split_once(':') else { usage() };
                std::fs::rename(from, to)
            }
            "sock" => {
                let Some((path, line)) = arg.split_once(':') else { usage() };
                match sock_request(path, line) {
                    Ok(answer) => {
                        println!("s{n}={}", answer.trim());
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            _ => usage(),
        };
        match r {
            Ok(()) => println!("s{n}=ok"),
            Err(e) => println!("s{n}={}", errno_name(&e)),
        }
    }
    exit(0)
}

fn sock_request(path: &str, line: &str) -> std::io::Result<String> {
    use std::io::{BufRead as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // A refusal may come before the request is read: ignore a failed write.
    let _ = s.write_all(format!("{line}\n").as_bytes());
    let mut answer = String::new();
    std::io::BufReader::new(&s).read_line(&mut answer)?;
    Ok(answer)
}

/// `hold-loop`: for each line on stdin, print `t0=NS` (CLOCK_MONOTONIC),
/// try the action at once, print `r=ok|ERRNO`: the B7 harness times the
/// attempt to the agent's cgroup being frozen.
fn hold_loop(what: &str, arg: &str) -> ! {
    use std::io::BufRead as _;
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        let t0 = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
            .unwrap_or(0);
        println!("t0={t0}");
        let r = match what {
            "tcp" => TcpStream::connect_timeout(&addr(arg), Duration::from_secs(3)).map(drop),
            "unlink" => std::fs::remove_file(arg),
            _ => usage(),
        };
        match r {
            Ok(()) => println!("r=ok"),
            Err(e) => println!("r={}", errno_name(&e)),
        }
    }
    exit(0)
}

/// Pin the calling thread (and the threads it spawns after) to CPU 0.
fn pin_to_cpu0() -> bool {
    // SAFETY: a zeroed cpu_set_t with CPU 0 set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Two threads on CPU 0 each move a directory of their own back and forth
/// in a directory of their own under DIR for SECS: every move runs the
/// directory cache's `fexit` program on `vfs_rename`, and on a fully
/// preemptible kernel one thread is sometimes preempted inside it, so that
/// the other's next run is skipped. (Within one parent directory the
/// second would wait for the first's lock on it instead.)
fn race_rename(dir: &str, secs: Duration) -> ! {
    println!("pinned={}", u8::from(pin_to_cpu0()));
    let mover = |i: usize| {
        let parent = format!("{dir}/t{i}");
        let name = |n: &str| CString::new(format!("{parent}/{n}")).unwrap_or_else(|_| usage());
        let (a, b) = (name("a"), name("b"));
        if let Err(e) = std::fs::create_dir_all(format!("{parent}/a")) {
            eprintln!("mkdir: {e}");
            exit(2)
        }
        move || {
            let (mut moved, mut failed) = (0u64, 0u64);
            let start = std::time::Instant::now();
            while start.elapsed() < secs {
                let (from, to) = if moved % 2 == 0 { (&a, &b) } else { (&b, &a) };
                // SAFETY: valid C strings.
                if unsafe { libc::rename(from.as_ptr(), to.as_ptr()) } == 0 {
                    moved += 1;
                } else {
                    failed += 1;
                }
            }
            (moved, failed)
        }
    };
    let other = std::thread::spawn(mover(1));
    let (m0, f0) = mover(0)();
    let (m1, f1) = other.join().unwrap_or((0, 0));
    println!("renames={}", m0 + m1);
    println!("rename_failures={}", f0 + f1);
    exit(0)
}

/// Two threads of one agent on one CPU, for SECS: the main thread unlinks
/// DIR/f0..f{N-1} (a protected tree) over and over, the other truncates
/// FILE (allowed) over and over. Each truncate takes the file programs' long
/// way, writing its path into the same per-CPU scratch the unlink's judgment
/// reads: an agent trying to have its denied unlink judged on the other
/// thread's allowed path, where the kernel preempts a program mid-way.
fn race_unlink(dir: &str, n: usize, file: &str, secs: Duration) -> ! {
    // The thread spawned below inherits the pinning.
    println!("pinned={}", u8::from(pin_to_cpu0()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let file = CString::new(file.as_bytes()).unwrap_or_else(|_| usage());
    let truncater = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut attempts, mut eperm, mut other) = (0u64, 0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                attempts += 1;
                // SAFETY: valid C string.
                if unsafe { libc::truncate(file.as_ptr(), 0) } != 0 {
                    match std::io::Error::last_os_error().raw_os_error() {
                        Some(libc::EPERM) => eperm += 1,
                        _ => other += 1,
                    }
                }
            }
            (attempts, eperm, other)
        })
    };
    let names: Vec<CString> = (0..n).map(|i| CString::new(format!("{dir}/f{i}")).unwrap_or_else(|_| usage())).collect();
    let (mut attempts, mut deleted, mut eperm, mut other) = (0u64, 0u64, 0u64, 0u64);
    let start = std::time::Instant::now();
    'run: while start.elapsed() < secs {
        for name in &names {
            attempts += 1;
            // SAFETY: valid C string.
            if unsafe { libc::unlink(name.as_ptr()) } == 0 {
                deleted += 1;
                println!("deleted={}", name.to_string_lossy());
            } else {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EPERM) => eperm += 1,
                    _ => other += 1,
                }
            }
            if start.elapsed() >= secs {
                break 'run;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (t_attempts, t_eperm, t_other) = truncater.join().unwrap_or((0, 0, 0));
    println!("unlink_attempts={attempts}");
    println!("unlink_deleted={deleted}");
    println!("unlink_eperm={eperm}");
    println!("unlink_other={other}");
    println!("truncate_attempts={t_attempts}");
    println!("truncate_eperm={t_eperm}");
    println!("truncate_other={t_other}");
    exit(0)
}
