//! Fuzz smoke test (stable toolchain, no libFuzzer): every fuzz target of `braid::fuzzing` and
//! `braid_transport::fuzzing` runs over every file of its corpus in `fuzz/corpus/<target>/`,
//! plus deterministic pseudo-random mutations of each file (bit flips, interesting bytes,
//! truncations, length-like fields set to huge values, insertions, deletions, splices with
//! other files) and a few purely random inputs. It fails when a target panics (the inputs are
//! saved under `target/fuzz-smoke-crashes/<target>/`), aborts the process when a target asks
//! for more than 256 MiB at once (printing the target and the input in hex), and aborts when
//! one input runs longer than 60 s (a hang). It prints executions and crashes per target.
//!
//! Run: `make fuzz-smoke` (or `cargo test -p braid --test fuzz_smoke -- --nocapture`);
//! `FUZZ_SMOKE_SCALE=10` runs ten times as many mutations. Long runs with libFuzzer:
//! `make fuzz` (see fuzz/README.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Largest single allocation a target may make (the largest legitimate one is the push/pull
/// channel's 64 MiB header bound).
const ALLOC_LIMIT: usize = 256 << 20;
/// Largest input fed to a target.
const MAX_INPUT: usize = 64 << 10;
/// One input running longer than this is a hang.
const HANG: Duration = Duration::from_secs(60);

type Target = fn(&[u8]);

/// Every target, by the name of its corpus folder and libFuzzer target.
const TARGETS: &[(&str, Target, usize)] = &[
    // (name, entry point, mutations in all, spread over the corpus files)
    (
        "connect_handle",
        braid::transport::fuzzing::connect_handle,
        20000,
    ),
    ("tcp_frames", braid::transport::fuzzing::tcp_frames, 4000),
    ("tcp_accept", braid::transport::fuzzing::tcp_accept, 100),
    ("shm_ring", braid::transport::fuzzing::shm_ring, 400),
    ("shm_accept", braid::transport::fuzzing::shm_accept, 100),
    ("ib_wire", braid::transport::fuzzing::ib_wire, 20000),
    ("decode_handles", braid::fuzzing::decode_handles, 20000),
    ("comm_hello", braid::fuzzing::comm_hello, 15000),
    ("ps_hello", braid::fuzzing::ps_hello, 15000),
    ("ps_wire", braid::fuzzing::ps_wire, 25000),
    ("ps_chan", braid::fuzzing::ps_chan, 500),
    ("coord_frame", braid::fuzzing::coord_frame, 12000),
    ("coord_state", braid::fuzzing::coord_state, 10000),
    ("coord_session", braid::fuzzing::coord_session, 200),
];

// What is running now, for the allocation guard and the hang watchdog (no allocation needed
// to read them).
static CUR_TARGET: AtomicUsize = AtomicUsize::new(usize::MAX);
static CUR_PTR: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static CUR_LEN: AtomicUsize = AtomicUsize::new(0);
static CUR_START_MS: AtomicU64 = AtomicU64::new(0);
/// Panics seen on any thread (a target's background threads included).
static PANICS: AtomicU64 = AtomicU64::new(0);

fn raw_write(b: &[u8]) {
    // SAFETY: FFI; writes a live slice to stderr.
    unsafe {
        libc::write(2, b.as_ptr().cast::<libc::c_void>(), b.len());
    }
}

fn raw_write_num(mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    raw_write(&buf[i..]);
}

/// Prints the running target and its input (hex) without allocating.
fn report_current(what: &[u8]) {
    raw_write(b"\nfuzz_smoke: ");
    raw_write(what);
    raw_write(b" in target ");
    let t = CUR_TARGET.load(Ordering::SeqCst);
    match TARGETS.get(t) {
        Some((name, _, _)) => raw_write(name.as_bytes()),
        None => raw_write(b"(none)"),
    }
    raw_write(b", input (hex): ");
    let p = CUR_PTR.load(Ordering::SeqCst);
    let n = CUR_LEN.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: the harness publishes a pointer and length of the input it is running and
        // keeps that input alive until it clears them.
        let input = unsafe { std::slice::from_raw_parts(p, n) };
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for chunk in input.chunks(256) {
            let mut out = [0u8; 512];
            for (i, b) in chunk.iter().enumerate() {
                out[2 * i] = HEX[(b >> 4) as usize];
                out[2 * i + 1] = HEX[(b & 15) as usize];
            }
            raw_write(&out[..2 * chunk.len()]);
        }
    }
    raw_write(b"\n");
}

/// The system allocator, refusing (and reporting) any single allocation over the limit.
struct Guard;

impl Guard {
    fn refuse(size: usize) -> bool {
        if size <= ALLOC_LIMIT {
            return false;
        }
        raw_write(b"\nfuzz_smoke: allocation of ");
        raw_write_num(size as u64);
        raw_write(b" bytes refused (limit 256 MiB)");
        report_current(b"oversized allocation");
        true
    }
}

// SAFETY: forwards to the system allocator, or returns null (allowed: allocation failure).
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::refuse(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::refuse(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is System's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if Self::refuse(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract is System's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Guard = Guard;

/// xorshift64*: deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'{', b'"', b'9'];
const HUGE: [u64; 8] = [
    u64::MAX,
    1 << 63,
    1 << 40,
    u32::MAX as u64,
    i32::MAX as u64,
    1 << 31,
    u16::MAX as u64,
    0,
];

/// One mutation of `base` (1 to 4 operators), possibly spliced with `other`.
fn mutate(rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(9) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let n = rng.below(v.len() + 1);
                v.truncate(n);
            }
            3 if !v.is_empty() => {
                // A length-like field set to a huge (or zero) value, either byte order.
                let width = [2usize, 4, 8][rng.below(3)];
                let val = HUGE[rng.below(HUGE.len())];
                let bytes = if rng.below(2) == 0 {
                    val.to_le_bytes()
                } else {
                    val.to_be_bytes()
                };
                let bytes = if rng.below(2) == 0 {
                    &bytes[..width]
                } else {
                    &bytes[8 - width..]
                };
                let i = rng.below(v.len());
                for (k, b) in bytes.iter().enumerate() {
                    if let Some(x) = v.get_mut(i + k) {
                        *x = *b;
                    }
                }
            }
            4 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(16);
                let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, ins);
            }
            5 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below(v.len() - i);
                v.drain(i..i + n);
            }
            6 => {
                let a = rng.below(v.len() + 1);
                let b = rng.below(other.len() + 1);
                v.truncate(a);
                v.extend_from_slice(&other[b..]);
            }
            7 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below((v.len() - i).min(64));
                let chunk = v[i..i + n].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            _ if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below((v.len() - i).min(16));
                for x in &mut v[i..i + n] {
                    *x = rng.next() as u8;
                }
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v.truncate(MAX_INPUT);
    v
}

fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name)
}

fn now_ms(t0: Instant) -> u64 {
    t0.elapsed().as_millis() as u64 + 1
}

/// Runs one input; returns whether it panicked.
fn run_one(t: usize, f: Target, input: &[u8], t0: Instant) -> bool {
    CUR_PTR.store(input.as_ptr().cast_mut(), Ordering::SeqCst);
    CUR_LEN.store(input.len(), Ordering::SeqCst);
    CUR_TARGET.store(t, Ordering::SeqCst);
    CUR_START_MS.store(now_ms(t0), Ordering::SeqCst);
    let before = PANICS.load(Ordering::SeqCst);
    let r = std::panic::catch_unwind(|| f(input));
    CUR_START_MS.store(0, Ordering::SeqCst);
    CUR_PTR.store(std::ptr::null_mut(), Ordering::SeqCst);
    CUR_LEN.store(0, Ordering::SeqCst);
    r.is_err() || PANICS.load(Ordering::SeqCst) != before
}

fn save_crash(name: &str, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/fuzz-smoke-crashes")
        .join(name);
    let _ = std::fs::create_dir_all(&dir);
    // FNV-1a of the input names the file.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in input {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    let p = dir.join(format!("crash-{h:016x}"));
    let _ = std::fs::write(&p, input);
    p
}

#[test]
fn every_fuzz_target_survives_its_corpus_mutated() {
    let scale: usize = std::env::var("FUZZ_SMOKE_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let t0 = Instant::now();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        hook(info);
    }));
    // Hang watchdog.
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        let s = CUR_START_MS.load(Ordering::SeqCst);
        if s != 0 && now_ms(t0).saturating_sub(s) > HANG.as_millis() as u64 {
            report_current(b"input running longer than 60 s (hang)");
            std::process::abort();
        }
    });
    let mut failures = Vec::new();
    let mut lines = Vec::new();
    for (t, (name, f, budget)) in TARGETS.iter().enumerate() {
        let dir = corpus_dir(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "corpus {} is empty", dir.display());
        let seeds: Vec<Vec<u8>> = files
            .iter()
            .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            .collect();
        let started = Instant::now();
        let mut execs = 0u64;
        let mut crashes = Vec::new();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1).wrapping_mul(0x1234_5678_9abc));
        let mut run = |input: &[u8], crashes: &mut Vec<PathBuf>| {
            execs += 1;
            if run_one(t, *f, input, t0) {
                crashes.push(save_crash(name, input));
            }
        };
        for seed in &seeds {
            run(seed, &mut crashes);
        }
        for k in 0..budget * scale {
            let seed = &seeds[k % seeds.len()];
            let other = &seeds[rng.below(seeds.len())];
            let m = mutate(&mut rng, seed, other);
            run(&m, &mut crashes);
        }
        // Purely random inputs.
        for _ in 0..(budget / 10).max(8) * scale {
            let n = rng.below(512);
            let r: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            run(&r, &mut crashes);
        }
        lines.push(format!(
            "{name:<16} {:>5} corpus files {execs:>8} executions {:>4} crashes  ({:.1} s)",
            seeds.len(),
            crashes.len(),
            started.elapsed().as_secs_f64()
        ));
        if let Some(first) = crashes.first() {
            failures.push(format!(
                "{name}: {} crashing inputs, first saved as {}",
                crashes.len(),
                first.display()
            ));
        }
    }
    println!("fuzz smoke (seed corpus + deterministic mutations):");
    for l in &lines {
        println!("  {l}");
    }
    assert!(
        failures.is_empty(),
        "fuzz targets panicked:\n{}",
        failures.join("\n")
    );
}

/// Every seed the real encoders make is in the corpus as `fuzz/corpus/<target>/<name>`, every
/// target has a corpus, and the corpus stays small. `UPDATE_CORPUS=1` (`make fuzz-corpus`)
/// rewrites the seeds instead.
#[test]
fn corpus_holds_the_current_seeds() {
    let update = std::env::var_os("UPDATE_CORPUS").is_some();
    let mut seeds = braid::fuzzing::seeds();
    seeds.extend(braid::transport::fuzzing::seeds());
    let mut stale = Vec::new();
    for (target, name, bytes) in &seeds {
        assert!(
            TARGETS.iter().any(|(t, _, _)| t == target),
            "seed for unknown target {target}"
        );
        assert!(!bytes.is_empty(), "empty seed {target}/{name}");
        let p = corpus_dir(target).join(name);
        if update {
            std::fs::create_dir_all(corpus_dir(target)).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        } else if std::fs::read(&p).ok().as_ref() != Some(bytes) {
            stale.push(p.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "fuzz seeds missing or stale (run `make fuzz-corpus`): {stale:?}"
    );
    // The libFuzzer targets (fuzz/fuzz_targets/*.rs) and this test's list are the same.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    let mut libfuzzer: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".rs").map(str::to_string)
        })
        .collect();
    libfuzzer.sort();
    let mut here: Vec<String> = TARGETS.iter().map(|(t, _, _)| t.to_string()).collect();
    here.sort();
    assert_eq!(
        libfuzzer, here,
        "fuzz/fuzz_targets and this test's TARGETS differ"
    );
    let mut total = 0u64;
    for (t, _, _) in TARGETS {
        let dir = corpus_dir(t);
        let rd =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
        for e in rd.flatten() {
            total += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    assert!(
        total < 2 << 20,
        "fuzz corpus is {total} bytes, keep it under 2 MiB"
    );
}
