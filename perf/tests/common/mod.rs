//! Scaffolding shared by the elastic multi-process tests (`elastic.rs`, `scale32.rs`): the
//! workspace binaries, child processes read line by line with timestamps, and the parsers of
//! what `braid-perf --elastic` and `braid-coordinator status --json` print.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn perf() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_braid-perf"))
}

pub fn bin(name: &str) -> PathBuf {
    // Workspace binaries land next to braid-perf.
    let p = perf().with_file_name(name);
    assert!(
        p.exists(),
        "{} not built (run cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// A command whose environment holds no launcher variables of the test's own environment
/// (BRAID_*, torchrun's), with stdin from /dev/null.
pub fn clean(program: &Path) -> Command {
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

/// One line a process wrote, with the time the test read it.
#[derive(Clone, Debug)]
pub struct Line {
    pub at: Instant,
    pub stderr: bool,
    pub text: String,
}

/// A child process whose stdout and stderr are read line by line, with timestamps, while it
/// runs. Dropping it stops the process (SIGTERM, which braid-run forwards, then SIGKILL).
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub lines: Arc<Mutex<Vec<Line>>>,
    pub readers: Vec<JoinHandle<()>>,
    pub status: Option<ExitStatus>,
    /// Whether the test had to stop it.
    pub stopped: bool,
}

pub fn reader(
    src: impl Read + Send + 'static,
    stderr: bool,
    to: Arc<Mutex<Vec<Line>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    to.lock().unwrap().push(Line {
                        at: Instant::now(),
                        stderr,
                        text,
                    });
                }
            }
        }
    })
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            reader(child.stdout.take().unwrap(), false, lines.clone()),
            reader(child.stderr.take().unwrap(), true, lines.clone()),
        ];
        Proc {
            name: name.to_string(),
            child,
            lines,
            readers,
            status: None,
            stopped: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap().clone()
    }

    /// Everything it printed so far, for assertion messages.
    pub fn dump(&self) -> String {
        let mut s = format!("---- {} (pid {}) ----\n", self.name, self.pid());
        for l in self.lines() {
            s.push_str(if l.stderr { "err| " } else { "out| " });
            s.push_str(&l.text);
            s.push('\n');
        }
        s
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    /// Waits until a line matches `pred` (returns it) or `limit` passes or the process exits
    /// without such a line (None).
    pub fn wait_line(&mut self, limit: Duration, pred: impl Fn(&Line) -> bool) -> Option<Line> {
        let end = Instant::now() + limit;
        loop {
            let done = self.exited().is_some();
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return Some(l);
            }
            if done {
                // Let the readers drain what is left in the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return self.lines().into_iter().find(|l| pred(l));
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits at most `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        while self.exited().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.exited()
    }

    /// Stops the process if it still runs (SIGTERM, 5 s, SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        self.stopped = true;
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        if self.wait_exit(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// Waits for the process (stopping it after `limit`) and for its output. Returns its exit
    /// status, None if the test had to stop it.
    pub fn finish(&mut self, limit: Duration) -> Option<ExitStatus> {
        let st = self.wait_exit(limit);
        if st.is_none() {
            self.stop();
        }
        // braid-run's children may hold the pipes a little longer; they die with it.
        let end = Instant::now() + Duration::from_secs(10);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        for r in std::mem::take(&mut self.readers) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
        st
    }

    /// SIGKILL now, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

pub fn since(a: Instant, b: Instant) -> f64 {
    secs(b.saturating_duration_since(a))
}

pub fn parse_view(s: &str) -> Option<(u64, usize, usize)> {
    let rest = s.strip_prefix("# view ")?;
    let mut e = None;
    let mut n = None;
    let mut r = None;
    for kv in rest.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        match k {
            "epoch" => e = v.parse().ok(),
            "size" => n = v.parse().ok(),
            "rank" => r = v.parse().ok(),
            _ => {}
        }
    }
    Some((e?, n?, r?))
}

/// The final `# elastic: steps completed C failed F view changes V epoch E size N #wrong W`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Final {
    pub completed: u64,
    pub failed: u64,
    pub changes: u64,
    pub epoch: u64,
    pub size: usize,
    pub wrong: u64,
}

pub fn parse_final(s: &str) -> Option<Final> {
    let rest = s.strip_prefix("# elastic: ")?;
    let t: Vec<&str> = rest.split_whitespace().collect();
    let after = |key: &str| -> Option<u64> {
        let i = t.iter().position(|w| *w == key)?;
        t.get(i + 1)?.parse().ok()
    };
    Some(Final {
        completed: after("completed")?,
        failed: after("failed")?,
        changes: after("changes")?,
        epoch: after("epoch")?,
        size: after("size")? as usize,
        wrong: after("#wrong")?,
    })
}

/// The group `world` of a status document.
pub fn world(v: &Value) -> Option<&Value> {
    v["groups"]
        .as_array()?
        .iter()
        .find(|g| g["group"].as_str() == Some("world"))
}

/// One member of a view as the coordinator reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub rank: usize,
    pub id: u64,
    pub pid: u64,
}

/// (epoch, members by rank) of the group `world`.
pub fn view_of(v: &Value) -> Option<(u64, Vec<Member>)> {
    let g = world(v)?;
    let epoch = g["epoch"].as_u64()?;
    let mut ms: Vec<Member> = g["members"]
        .as_array()?
        .iter()
        .filter_map(|m| {
            Some(Member {
                rank: m["rank"].as_u64()? as usize,
                id: m["id"].as_u64()?,
                pid: m["pid"].as_u64()?,
            })
        })
        .collect();
    ms.sort_by_key(|m| m.rank);
    Some((epoch, ms))
}

/// The history of the group `world`: (epoch, size, reason).
pub fn history(v: &Value) -> Vec<(u64, usize, String)> {
    world(v)
        .and_then(|g| g["history"].as_array())
        .map(|h| {
            h.iter()
                .filter_map(|e| {
                    Some((
                        e["epoch"].as_u64()?,
                        e["size"].as_u64()? as usize,
                        e["reason"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}
