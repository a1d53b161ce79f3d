//! Helpers of the adversary suite (issue 16): start real braid jobs (a `braid-coordinator`
//! process and `braid-perf` ranks or push/pull servers and workers), find their listening ports
//! (/proc), speak braid's wire formats as a stranger would (encoders written here from the
//! format descriptions in the sources, nothing imported from braid), and check the outcome: no
//! braid process crashed, the job finished with `#wrong 0`, and the logs name the refusals.
//!
//! The binaries are those of the workspace's `target/<profile>` directory next to the test
//! executable: build them first (`cargo build --workspace --bins`; `make test` does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Binaries and processes
// ---------------------------------------------------------------------------------------------

/// A workspace binary (`braid-perf`, `braid-run`, `braid-coordinator`), next to the test
/// executable's `deps` directory, or in `BRAID_ADVERSARY_BINS` when set (to attack another
/// build, e.g. a copy of the binaries of an older commit).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = match std::env::var_os("BRAID_ADVERSARY_BINS") {
        Some(d) => PathBuf::from(d),
        None => exe
            .parent()
            .and_then(|d| {
                if d.ends_with("deps") {
                    d.parent()
                } else {
                    Some(d)
                }
            })
            .expect("target directory")
            .to_path_buf(),
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built (run cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// A command with none of the test's own BRAID_* or launcher variables, stdin from /dev/null.
pub fn clean(program: &std::path::Path) -> Command {
    let mut c = Command::new(program);
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("BRAID_")
                || [
                    "MASTER_ADDR",
                    "MASTER_PORT",
                    "RANK",
                    "WORLD_SIZE",
                    "LOCAL_RANK",
                ]
                .contains(&k)
            {
                c.env_remove(k);
            }
        }
    }
    c.stdin(Stdio::null());
    c
}

/// A child process whose stdout and stderr lines are collected while it runs. Dropping it
/// kills it.
pub struct Proc {
    /// Name for messages.
    pub name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

fn pump(
    src: impl Read + Send + 'static,
    tag: &'static str,
    to: Arc<Mutex<Vec<String>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let t = String::from_utf8_lossy(&buf);
                    to.lock()
                        .unwrap()
                        .push(format!("{tag}{}", t.trim_end_matches(['\n', '\r'])));
                }
            }
        }
    })
}

impl Proc {
    /// Spawns `cmd` with piped stdout and stderr.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let so = child.stdout.take().unwrap();
        let se = child.stderr.take().unwrap();
        let readers = vec![pump(so, "", lines.clone()), pump(se, "E: ", lines.clone())];
        Proc {
            name: name.into(),
            child,
            lines,
            readers,
            status: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lines so far (stderr lines start with `E: `).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Everything it printed, with its name.
    pub fn dump(&self) -> String {
        format!(
            "---- {} (pid {}, {:?}) ----\n{}",
            self.name,
            self.pid(),
            self.status,
            self.lines().join("\n")
        )
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits until a line satisfies `pred`; false at `limit` or when the process exited.
    pub fn wait_line(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let end = Instant::now() + limit;
        loop {
            if self.lines().iter().any(|l| pred(l)) {
                return true;
            }
            if Instant::now() >= end || self.exited().is_some() {
                std::thread::sleep(Duration::from_millis(50));
                return self.lines().iter().any(|l| pred(l));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit (killing it at `limit`); `None` if it had to be killed.
    pub fn finish(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        while self.exited().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let st = self.exited();
        if st.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        st
    }

    /// SIGTERM, then SIGKILL after 3 s; the exit status.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        if self.exited().is_none() {
            signal(self.pid(), libc::SIGTERM);
        }
        self.finish(Duration::from_secs(3))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: FFI; kill(2) takes plain integers.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A random job token (hex).
pub fn random_token() -> String {
    let mut b = [0u8; 16];
    random_fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Random bytes from /dev/urandom.
pub fn random_fill(b: &mut [u8]) {
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(b))
        .expect("/dev/urandom");
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    random_fill(&mut v);
    v
}

// ---------------------------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------------------------

/// What a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `braid-perf all_reduce --elastic --duration S` on 2 ranks over this transport.
    Collective(&'static str),
    /// `braid-perf push_pull --drill --duration S`: 1 server (index 0) and 2 workers over this
    /// transport.
    PushPull(&'static str),
}

/// A running job: a `braid-coordinator` process and the braid processes.
pub struct Job {
    /// What it runs.
    pub kind: Kind,
    /// The coordinator process.
    pub coord: Proc,
    /// The coordinator's address.
    pub addr: String,
    /// The processes, by launcher index (collective: rank; push/pull: server first).
    pub procs: Vec<Proc>,
    /// The job token, when the job has one.
    pub token: Option<String>,
    /// When the job was seen running.
    running: Option<Instant>,
    /// How long its loop runs.
    secs: f64,
}

/// Where a job's checks failed.
pub type Verdict = Result<(), String>;

impl Job {
    /// Starts a job of `kind` that runs about `secs` seconds, with a random job token when
    /// `token`, and waits until it runs (every data connection established).
    pub fn start(kind: Kind, token: bool, secs: f64) -> Job {
        let mut job = Job::launch(kind, token, secs, &|_, a| a.to_string());
        job.wait_running();
        job
    }

    /// Starts a job like [`Job::start`] without waiting for it; process `i` finds the
    /// coordinator at `coord_for(i, real address)`.
    pub fn launch(
        kind: Kind,
        token: bool,
        secs: f64,
        coord_for: &dyn Fn(usize, &str) -> String,
    ) -> Job {
        let token = token.then(random_token);
        let mut c = clean(&bin("braid-coordinator"));
        c.args(["--bind", "127.0.0.1:0"]).env("BRAID_LOG", "info");
        if let Some(t) = &token {
            c.env("BRAID_JOB_TOKEN", t);
        }
        let mut coord = Proc::spawn("braid-coordinator", c);
        assert!(
            coord.wait_line(Duration::from_secs(20), |l| l
                .starts_with("braid-coordinator listening on ")),
            "the coordinator did not start\n{}",
            coord.dump()
        );
        let addr = coord
            .lines()
            .iter()
            .find_map(|l| {
                l.strip_prefix("braid-coordinator listening on ")
                    .map(|s| s.trim().to_string())
            })
            .unwrap();
        let n = match kind {
            Kind::Collective(_) => 2,
            Kind::PushPull(_) => 3,
        };
        let dur = format!("{secs}");
        let mut procs = Vec::new();
        for i in 0..n {
            let mut c = clean(&bin("braid-perf"));
            match kind {
                Kind::Collective(t) => {
                    c.args(["all_reduce", "--elastic", "--duration", &dur, "-b", "64K"])
                        .env("BRAID_TRANSPORT", t)
                        .env("BRAID_ELASTIC", "1")
                        .env("BRAID_RANK", i.to_string());
                }
                Kind::PushPull(t) => {
                    c.args([
                        "push_pull",
                        "--drill",
                        "--workers",
                        "2",
                        "--servers",
                        "1",
                        "--duration",
                        &dur,
                        "--pace",
                        "5",
                        "--report",
                        "20",
                        "--len",
                        "256",
                        "--keys",
                        "4",
                    ])
                    .env("BRAID_TRANSPORT", t)
                    .env("BRAID_RUN_INDEX", i.to_string());
                }
            }
            c.env("BRAID_COORDINATOR", coord_for(i, &addr))
                .env("BRAID_WORLD_SIZE", n.to_string())
                .env("BRAID_LOG", "warn");
            if let Some(t) = &token {
                c.env("BRAID_JOB_TOKEN", t);
            }
            let name = match kind {
                Kind::Collective(_) => format!("rank {i}"),
                Kind::PushPull(_) if i == 0 => "server 0".to_string(),
                Kind::PushPull(_) => format!("worker {}", i - 1),
            };
            procs.push(Proc::spawn(&name, c));
        }
        Job {
            kind,
            coord,
            addr,
            procs,
            token,
            running: None,
            secs,
        }
    }

    /// Waits until the job runs: every rank installed the first view and rank 0 reported
    /// progress (collective), or every worker finished a round (push/pull).
    pub fn wait_running(&mut self) {
        let limit = Duration::from_secs(60);
        match self.kind {
            Kind::Collective(_) => {
                for i in 0..self.procs.len() {
                    let want = format!("# view epoch=1 size={} rank={i}", self.procs.len());
                    let ok = self.procs[i].wait_line(limit, |l| l == want);
                    assert!(ok, "rank {i} did not start\n{}", self.dump());
                }
                // The loop runs (the data connections are up) once rank 0 printed a progress
                // row or a step went through; give the acceptors a moment after the view.
                let ok = self.procs[0].wait_line(limit, |l| l.contains("#wrong"));
                assert!(ok, "rank 0 printed no progress\n{}", self.dump());
            }
            Kind::PushPull(_) => {
                for i in 1..self.procs.len() {
                    let ok = self.procs[i].wait_line(limit, |l| l.starts_with("# round "));
                    assert!(ok, "worker {} did not start\n{}", i - 1, self.dump());
                }
            }
        }
        self.running = Some(Instant::now());
    }

    /// To call when the attacks are over: records any process that ended already (a job
    /// must outlive its attacks, or they prove nothing) and prints how much of the job's time
    /// the attacks took.
    pub fn attacks_done(&mut self, p: &mut Problems) {
        if let Some(t) = self.running {
            eprintln!(
                "attacks took {:.2} s of the job's {:.1} s",
                t.elapsed().as_secs_f64(),
                self.secs
            );
        }
        for e in self.ended() {
            p.add(format!("ended during the attacks: {e}"));
        }
    }

    /// Everything every process printed.
    pub fn dump(&self) -> String {
        let mut s = self.coord.dump();
        for p in &self.procs {
            s.push('\n');
            s.push_str(&p.dump());
        }
        s
    }

    /// The server process of a push/pull job.
    pub fn server(&self) -> &Proc {
        &self.procs[0]
    }

    /// Pids of the braid processes (not the coordinator).
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.pid()).collect()
    }

    /// Processes that exited already (a job must outlive its attacks, or they prove
    /// nothing), with their status.
    pub fn ended(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(st) = self.coord.exited() {
            out.push(format!("coordinator {st}"));
        }
        for p in &mut self.procs {
            if let Some(st) = p.exited() {
                out.push(format!("{} {st}", p.name));
            }
        }
        out
    }

    /// Whether every process still runs (the coordinator too); the crashed ones otherwise.
    pub fn crashed(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(st) = self.coord.exited() {
            out.push(format!("coordinator {st}"));
        }
        for p in &mut self.procs {
            if let Some(st) = p.exited() {
                if !st.success() {
                    out.push(format!("{} {st}", p.name));
                }
            }
        }
        out
    }

    /// Waits for the job's end and checks it: no process crashed or failed, the coordinator
    /// still runs, and every rank or worker reports `#wrong 0` without failures or view
    /// changes. Stops the coordinator. `Err` lists the problems.
    pub fn finish(&mut self) -> Verdict {
        let mut problems = Vec::new();
        if let Some(st) = self.coord.exited() {
            problems.push(format!("the coordinator died: {st}"));
        }
        // Wait for every process: at most 60 s, and at most 10 s more once one has failed (the
        // others may wait for it until their own timeouts).
        let t0 = Instant::now();
        let mut end = t0 + Duration::from_secs(60);
        loop {
            let mut running = false;
            for p in &mut self.procs {
                match p.exited() {
                    None => running = true,
                    Some(st) if !st.success() => {
                        end = end.min(Instant::now() + Duration::from_secs(10));
                    }
                    Some(_) => {}
                }
            }
            if !running || Instant::now() >= end {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in &mut self.procs {
            match p.finish(Duration::ZERO) {
                Some(st) if st.success() => {}
                Some(st) => problems.push(format!("{} ended with {st}", p.name)),
                None => problems.push(format!(
                    "{} hung (killed after {:.0} s)",
                    p.name,
                    t0.elapsed().as_secs_f64()
                )),
            }
        }
        if let Some(st) = self.coord.exited() {
            problems.push(format!("the coordinator died: {st}"));
        }
        self.coord.terminate();
        match self.kind {
            Kind::Collective(_) => {
                for p in &self.procs {
                    let fin = p.lines().into_iter().find(|l| l.starts_with("# elastic: "));
                    match fin {
                        Some(f) => {
                            let ok = f.contains(" failed 0 ")
                                && f.contains(" view changes 0 ")
                                && f.ends_with(" #wrong 0");
                            if !ok {
                                problems.push(format!("{}: {f}", p.name));
                            }
                        }
                        None => problems.push(format!("{}: no final line", p.name)),
                    }
                }
            }
            Kind::PushPull(_) => {
                for p in &self.procs[1..] {
                    let fin = p
                        .lines()
                        .into_iter()
                        .find(|l| l.starts_with("# push_pull: "));
                    match fin {
                        Some(f) => {
                            let ok = f.contains(" #wrong 0 ")
                                && f.contains(" lost-updates 0 ")
                                && f.contains(" errors 0 ");
                            if !ok {
                                problems.push(format!("{}: {f}", p.name));
                            }
                        }
                        None => problems.push(format!("{}: no final line", p.name)),
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// All log lines of the coordinator.
    pub fn coord_log(&self) -> Vec<String> {
        self.coord.lines()
    }

    /// All lines of every braid process.
    pub fn procs_log(&self) -> Vec<String> {
        self.procs.iter().flat_map(|p| p.lines()).collect()
    }
}

/// Whether a log line reports a refusal: drop, refuse, reject.
pub fn is_refusal(l: &str) -> bool {
    let l = l.to_ascii_lowercase();
    l.contains("drop") || l.contains("refus") || l.contains("reject")
}

/// Whether `line` names `addr` (not as the prefix of a longer port number).
pub fn names_addr(line: &str, addr: &str) -> bool {
    line.match_indices(addr).any(|(i, _)| {
        !line[i + addr.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// The attackers (by local address) that no log line names in a refusal.
pub fn unlogged(log: &[String], attackers: &[(String, String)]) -> Vec<String> {
    attackers
        .iter()
        .filter(|(_, local)| !log.iter().any(|l| names_addr(l, local) && is_refusal(l)))
        .map(|(what, local)| format!("{what} from {local}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

fn socket_inodes(pid: u32) -> Vec<String> {
    let mut inodes = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_link(e.path()) {
                let t = t.to_string_lossy().to_string();
                if let Some(i) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.push(i.to_string());
                }
            }
        }
    }
    inodes
}

/// Listening TCP ports of process `pid` (its socket inodes in /proc/net/tcp*).
pub fn tcp_ports(pid: u32) -> Vec<u16> {
    let inodes = socket_inodes(pid);
    let mut ports = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(s) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in s.lines().skip(1) {
            let c: Vec<&str> = line.split_whitespace().collect();
            if c.len() > 9 && c[3] == "0A" && inodes.iter().any(|i| i == c[9]) {
                if let Some(p) = c[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                {
                    ports.push(p);
                }
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Abstract names (without the leading NUL) of the listening Unix sockets of process `pid`,
/// from /proc/net/unix (as any local process can list them).
pub fn unix_listeners(pid: u32) -> Vec<Vec<u8>> {
    let inodes = socket_inodes(pid);
    let Ok(s) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in s.lines().skip(1) {
        // Num RefCount Protocol Flags Type St Inode Path
        let c: Vec<&str> = line.split_whitespace().collect();
        if c.len() < 8 {
            continue;
        }
        let listening = u32::from_str_radix(c[3], 16).is_ok_and(|f| f & 0x10000 != 0);
        if listening && inodes.iter().any(|i| i == c[6]) {
            if let Some(name) = c[7].strip_prefix('@') {
                out.push(name.as_bytes().to_vec());
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Coordinator frames (core/src/membership/proto.rs)
// ---------------------------------------------------------------------------------------------

/// Coordinator message types.
pub mod coord_ty {
    /// Register.
    pub const REGISTER: u16 = 1;
    /// Registered.
    pub const REGISTERED: u16 = 2;
    /// View.
    pub const VIEW: u16 = 3;
    /// Error.
    pub const ERROR: u16 = 4;
    /// Heartbeat.
    pub const HEARTBEAT: u16 = 6;
    /// Rejoin.
    pub const REJOIN: u16 = 10;
    /// Challenge.
    pub const CHALLENGE: u16 = 11;
    /// Auth.
    pub const AUTH: u16 = 12;
    /// StatusReq.
    pub const STATUS_REQ: u16 = 13;
    /// StatusReply.
    pub const STATUS_REPLY: u16 = 14;
    /// ViewReq.
    pub const VIEW_REQ: u16 = 16;
}

/// A coordinator frame: magic `BRDC`, version (u16 BE), type (u16 BE), length (u32 BE), payload.
pub fn coord_frame_raw(version: u16, ty: u16, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"BRDC");
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A well-formed coordinator frame of protocol version 1 with a JSON body.
pub fn coord_frame(ty: u16, body: &serde_json::Value) -> Vec<u8> {
    let p = serde_json::to_vec(body).unwrap();
    coord_frame_raw(1, ty, p.len() as u32, &p)
}

/// Reads one coordinator frame (type, payload) within `limit`; `None` on close, timeout or
/// garbage.
pub fn read_coord_frame(s: &mut TcpStream, limit: Duration) -> Option<(u16, Vec<u8>)> {
    s.set_read_timeout(Some(limit)).ok()?;
    let mut h = [0u8; 12];
    s.read_exact(&mut h).ok()?;
    if &h[..4] != b"BRDC" {
        return None;
    }
    let ty = u16::from_be_bytes([h[6], h[7]]);
    let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if len > 16 << 20 {
        return None;
    }
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).ok()?;
    Some((ty, p))
}

/// The coordinator's status (`None` if refused, e.g. a job token is in force).
pub fn coord_status(addr: &str) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.write_all(&coord_frame(
        coord_ty::STATUS_REQ,
        &serde_json::json!({"client_nonce": "00"}),
    ))
    .ok()?;
    let (ty, p) = read_coord_frame(&mut s, Duration::from_secs(5))?;
    (ty == coord_ty::STATUS_REPLY)
        .then(|| serde_json::from_slice(&p).ok())
        .flatten()
}

/// Member ids of the first group of a status reply.
pub fn member_ids(status: &serde_json::Value, group: &str) -> Vec<u64> {
    status["status"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["group"] == group)
        .flat_map(|g| g["members"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m["id"].as_u64())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Data hellos and frames (core/src/comm.rs, transport/src/tcp.rs, core/src/ps)
// ---------------------------------------------------------------------------------------------

/// A collective data hello (`BRDA`, version 1, nonce, epoch, rank, member; no MAC).
pub fn data_hello(nonce: u64, epoch: u64, rank: u64, member: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(b"BRDA");
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&[0, 0]);
    for x in [nonce, epoch, rank, member] {
        h.extend_from_slice(&x.to_le_bytes());
    }
    h
}

/// A push/pull hello (`BRPH`, member id; no MAC).
pub fn ps_hello(member: u64) -> Vec<u8> {
    let mut h = b"BRPH".to_vec();
    h.extend_from_slice(&member.to_le_bytes());
    h
}

/// A tcp socket hello (`BRDT`, version 1, index, sockets, stripe, connection id, hello length)
/// followed by the hello.
pub fn tcp_hello(
    index: u16,
    nsock: u16,
    stripe: u32,
    conn_id: u64,
    hl: u32,
    hello: &[u8],
) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(b"BRDT");
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&index.to_le_bytes());
    h.extend_from_slice(&nsock.to_le_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&stripe.to_le_bytes());
    h.extend_from_slice(&conn_id.to_le_bytes());
    h.extend_from_slice(&hl.to_le_bytes());
    h.extend_from_slice(hello);
    h
}

/// A tcp socket hello for one socket carrying `hello`.
pub fn tcp_hello1(hello: &[u8]) -> Vec<u8> {
    let mut id = [0u8; 8];
    random_fill(&mut id);
    tcp_hello(
        0,
        1,
        256 << 10,
        u64::from_le_bytes(id),
        hello.len() as u32,
        hello,
    )
}

/// A 64-byte tcp frame header (`BRDF`, kind, part, parts, tag, total length, zero meta).
pub fn tcp_frame(kind: u8, part: u16, nparts: u16, tag: u64, total: u64) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[0..4].copy_from_slice(b"BRDF");
    h[4] = kind;
    h[6..8].copy_from_slice(&part.to_le_bytes());
    h[8..10].copy_from_slice(&nparts.to_le_bytes());
    h[16..24].copy_from_slice(&tag.to_le_bytes());
    h[24..32].copy_from_slice(&total.to_le_bytes());
    h
}

/// One tcp data message (one part) with `payload`.
pub fn tcp_msg(tag: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = tcp_frame(1, 0, 1, tag, payload.len() as u64);
    v.extend_from_slice(payload);
    v
}

/// A push/pull message prefix (`BRPS`, header length u32, body length u64).
pub fn ps_prefix(hl: u32, bl: u64) -> Vec<u8> {
    let mut p = b"BRPS".to_vec();
    p.extend_from_slice(&hl.to_le_bytes());
    p.extend_from_slice(&bl.to_le_bytes());
    p
}

/// A push/pull message over one tcp socket: prefix (tag 1), header (tag 2), body (tag 3).
pub fn ps_msg_tcp(hdr: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = tcp_msg(1, &ps_prefix(hdr.len() as u32, body.len() as u64));
    v.extend_from_slice(&tcp_msg(2, hdr));
    if !body.is_empty() {
        v.extend_from_slice(&tcp_msg(3, body));
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Attackers
// ---------------------------------------------------------------------------------------------

/// Connects to 127.0.0.1:`port` (short timeouts); `None` if refused.
pub fn tcp_connect(port: u16) -> Option<TcpStream> {
    let a: SocketAddr = ([127, 0, 0, 1], port).into();
    let s = TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok()?;
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
    Some(s)
}

/// Connects, sends `bytes`, lingers `hold`, closes; returns the attacker's local address.
pub fn tcp_send(port: u16, bytes: &[u8], hold: Duration) -> Option<String> {
    let mut s = tcp_connect(port)?;
    let local = s.local_addr().ok()?.to_string();
    let _ = s.write_all(bytes);
    let end = Instant::now() + hold;
    let mut sink = [0u8; 4096];
    while Instant::now() < end {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    Some(local)
}

/// Slow senders on `port` while they run: `idle` connections that send nothing, and one that
/// sends `bytes` one byte per second. Stopped (sockets closed) when dropped.
pub struct Slow {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Local addresses of the slow connections.
    pub locals: Vec<String>,
}

impl Slow {
    /// Starts the slow senders.
    pub fn tcp(port: u16, idle: usize, bytes: Vec<u8>) -> Slow {
        let stop = Arc::new(AtomicBool::new(false));
        let mut socks = Vec::new();
        let mut locals = Vec::new();
        for _ in 0..idle {
            if let Some(s) = tcp_connect(port) {
                locals.push(s.local_addr().map(|a| a.to_string()).unwrap_or_default());
                socks.push(s);
            }
        }
        let st = stop.clone();
        let idle_t = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(socks);
        });
        let st = stop.clone();
        let drip = tcp_connect(port);
        if let Some(s) = &drip {
            locals.push(s.local_addr().map(|a| a.to_string()).unwrap_or_default());
        }
        let drip_t = std::thread::spawn(move || {
            let Some(mut s) = drip else { return };
            let mut i = 0;
            let mut last = Instant::now() - Duration::from_secs(1);
            while !st.load(Ordering::SeqCst) {
                if last.elapsed() >= Duration::from_secs(1) && i < bytes.len() {
                    if s.write_all(&bytes[i..i + 1]).is_err() {
                        break;
                    }
                    i += 1;
                    last = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Slow {
            stop,
            threads: vec![idle_t, drip_t],
            locals,
        }
    }
}

impl Drop for Slow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Opens `n` connections to `port` at once, sends each `bytes`, holds them `hold`, closes.
/// Returns how many connected.
pub fn tcp_many(port: u16, n: usize, bytes: &[u8], hold: Duration) -> usize {
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let b = bytes.to_vec();
            std::thread::spawn(move || {
                let mut s = tcp_connect(port)?;
                let _ = s.write_all(&b);
                Some(s)
            })
        })
        .collect();
    let socks: Vec<TcpStream> = threads
        .into_iter()
        .filter_map(|t| t.join().ok().flatten())
        .collect();
    let got = socks.len();
    std::thread::sleep(hold);
    drop(socks);
    got
}

/// A connected abstract Unix SOCK_SEQPACKET socket to `name` (as the shm transport uses).
pub fn unix_connect(name: &[u8]) -> Option<OwnedFd> {
    // SAFETY: FFI; socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if name.len() + 1 > a.sun_path.len() {
        return None;
    }
    for (i, b) in name.iter().enumerate() {
        a.sun_path[i + 1] = *b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    // SAFETY: `a` is a live sockaddr_un and `len` covers its meaningful bytes.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &a as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    (r == 0).then_some(fd)
}

/// Sends one SEQPACKET message with descriptors; false on failure.
pub fn unix_send(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> bool {
    let mut b = bytes.to_vec();
    let mut iov = libc::iovec {
        iov_base: b.as_mut_ptr() as *mut libc::c_void,
        iov_len: b.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let sz = std::mem::size_of_val(fds);
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: CMSG_SPACE is a pure size computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(sz as u32) } as _;
        // SAFETY: the control buffer (128 bytes) holds the header and up to 16 descriptors.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(sz as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(c), sz);
        }
    }
    // SAFETY: msg points to live buffers of the stated sizes.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    n >= 0
}

/// Segment size of a shm connection with rings of `ring` bytes (3 pages + 2 rings).
pub fn shm_seg_len(ring: u64) -> u64 {
    3 * 4096 + 2 * ring
}

/// A shm hello (`BRDS`, version 3 = transport/src/shm.rs PROTO_VERSION, ring, segment
/// length, hello length) with `hello`.
pub fn shm_hello(ring: u64, seg_len: u64, hl: u32, hello: &[u8]) -> Vec<u8> {
    let mut v = b"BRDS".to_vec();
    v.extend_from_slice(&3u16.to_le_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&ring.to_le_bytes());
    v.extend_from_slice(&seg_len.to_le_bytes());
    v.extend_from_slice(&hl.to_le_bytes());
    v.extend_from_slice(hello);
    v
}

/// A memfd of `len` bytes with a valid-looking shm segment header (magic, version, ring), not
/// sealed.
pub fn fake_segment(len: u64, ring: u64) -> OwnedFd {
    // SAFETY: the name is a NUL-terminated literal.
    let fd = unsafe { libc::memfd_create(c"adversary".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is fresh and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain system call on an open memfd.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    assert_eq!(r, 0, "ftruncate");
    let mut hdr = Vec::new();
    hdr.extend_from_slice(b"BRDSHM01");
    hdr.extend_from_slice(&3u64.to_le_bytes());
    hdr.extend_from_slice(&ring.to_le_bytes());
    // SAFETY: writes hdr.len() bytes from a live buffer at offset 0.
    let n = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            hdr.as_ptr() as *const libc::c_void,
            hdr.len(),
            0,
        )
    };
    assert_eq!(n, hdr.len() as isize);
    fd
}

/// A fresh eventfd.
pub fn eventfd() -> OwnedFd {
    // SAFETY: FFI with constant flags.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: fd is fresh and owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Truncates `fd` to `len` bytes.
pub fn truncate(fd: &OwnedFd, len: u64) {
    // SAFETY: plain system call on an open descriptor.
    unsafe {
        libc::ftruncate(fd.as_raw_fd(), len as libc::off_t);
    }
}

// ---------------------------------------------------------------------------------------------
// Running cases
// ---------------------------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the cases of this crate one at a time (each starts a whole job; the suite must not
/// overload a small machine even under `--test-threads=2`).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Problems found by one case; `check` panics with all of them.
#[derive(Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    /// Records a problem.
    pub fn add(&mut self, p: impl Into<String>) {
        self.0.push(p.into());
    }

    /// Records `v`'s error.
    pub fn verdict(&mut self, v: Verdict) {
        if let Err(e) = v {
            self.0.push(e);
        }
    }

    /// Panics with every problem, then `dump` (the job's output).
    pub fn check(self, case: &str, dump: &str) {
        if !self.0.is_empty() {
            panic!(
                "{case}: {} problem(s):\n{}\n\n{dump}",
                self.0.len(),
                self.0.join("\n")
            );
        }
        if std::env::var_os("ADVERSARY_DUMP").is_some() {
            eprintln!("{dump}");
        }
        eprintln!("{case}: ok");
    }
}

/// Sends every case to `port` at once (one connection each, one thread each), lingering
/// `hold`; returns (case, attacker's local address) for those that connected and the cases
/// that could not connect.
pub fn tcp_send_all(
    port: u16,
    cases: Vec<(String, Vec<u8>)>,
    hold: Duration,
) -> (Vec<(String, String)>, Vec<String>) {
    let threads: Vec<_> = cases
        .into_iter()
        .map(|(what, bytes)| std::thread::spawn(move || (what, tcp_send(port, &bytes, hold))))
        .collect();
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for t in threads {
        let (what, r) = t.join().unwrap();
        match r {
            Some(local) => ok.push((what, local)),
            None => failed.push(what),
        }
    }
    (ok, failed)
}

/// A proxy in front of the coordinator that forwards frames both ways but holds back the
/// first `View` frame going to its client until released: a test device that lets an attacker
/// act between the view's publication and the client's connecting (as a fast or lucky attacker
/// could), and that sees the view as a man in the middle would.
pub struct CoordProxy {
    /// The proxy's address (give it to the client as BRAID_COORDINATOR).
    pub addr: String,
    held: Arc<Mutex<Option<serde_json::Value>>>,
    release: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<u8>>>,
}

fn read_raw_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut h = [0u8; 12];
    s.read_exact(&mut h).ok()?;
    let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
    let mut v = h.to_vec();
    v.resize(12 + len.min(16 << 20), 0);
    s.read_exact(&mut v[12..]).ok()?;
    Some(v)
}

impl CoordProxy {
    /// Starts the proxy for the coordinator at `coord`.
    pub fn start(coord: &str) -> CoordProxy {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let held = Arc::new(Mutex::new(None));
        let release = Arc::new(AtomicBool::new(false));
        let coord = coord.to_string();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (h, r, sn) = (held.clone(), release.clone(), sent.clone());
        std::thread::spawn(move || {
            let mut first = true;
            for c in l.incoming() {
                let Ok(mut client) = c else { break };
                let Ok(mut up) = TcpStream::connect(&coord) else {
                    continue;
                };
                let (mut c2, mut u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
                // Records what the client sends on its first connection (its opening frames).
                let record = std::mem::take(&mut first).then(|| sn.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    loop {
                        match c2.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if let Some(rec) = &record {
                                    let mut v = rec.lock().unwrap();
                                    if v.len() < 64 << 10 {
                                        v.extend_from_slice(&buf[..n]);
                                    }
                                }
                                if u2.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = u2.shutdown(std::net::Shutdown::Write);
                });
                let (h, r) = (h.clone(), r.clone());
                std::thread::spawn(move || {
                    while let Some(f) = read_raw_frame(&mut up) {
                        let ty = u16::from_be_bytes([f[6], f[7]]);
                        if ty == coord_ty::VIEW && h.lock().unwrap().is_none() {
                            *h.lock().unwrap() = Some(
                                serde_json::from_slice(&f[12..]).unwrap_or(serde_json::Value::Null),
                            );
                            while !r.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                        if client.write_all(&f).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CoordProxy {
            addr,
            held,
            release,
            sent,
        }
    }

    /// The frames the client sent on its first connection so far (type, whole frame).
    pub fn client_frames(&self) -> Vec<(u16, Vec<u8>)> {
        let b = self.sent.lock().unwrap().clone();
        let mut out = Vec::new();
        let mut o = 0;
        while b.len() >= o + 12 {
            let len = u32::from_be_bytes([b[o + 8], b[o + 9], b[o + 10], b[o + 11]]) as usize;
            if b.len() < o + 12 + len {
                break;
            }
            out.push((
                u16::from_be_bytes([b[o + 6], b[o + 7]]),
                b[o..o + 12 + len].to_vec(),
            ));
            o += 12 + len;
        }
        out
    }

    /// Waits up to `limit` for the held View frame's body.
    pub fn held_view(&self, limit: Duration) -> Option<serde_json::Value> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(v) = self.held.lock().unwrap().clone() {
                return Some(v);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Lets the held frame (and all later ones) through.
    pub fn release(&self) {
        self.release.store(true, Ordering::SeqCst);
    }
}

impl Drop for CoordProxy {
    fn drop(&mut self) {
        self.release();
    }
}

/// The view a stranger gets from a ViewReq for `group` (`None` if refused).
pub fn view_request(addr: &str, group: &str) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.write_all(&coord_frame(
        coord_ty::VIEW_REQ,
        &serde_json::json!({"group": group, "client_nonce": "00"}),
    ))
    .ok()?;
    let (ty, p) = read_coord_frame(&mut s, Duration::from_secs(3))?;
    (ty == coord_ty::VIEW)
        .then(|| serde_json::from_slice(&p).ok())
        .flatten()
}
