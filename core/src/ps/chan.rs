//! A message channel over one transport connection: variable-length messages (a header and an
//! optional body) on top of the transport's exact-length tagged messages, driven by a thread
//! that owns the connection, or, while they wait for answers, by the threads that attached to
//! it ([`Chan::attach`], [`Chan::drive`]: whoever holds the connection sends and receives).
//!
//! On the wire each message is a 16-byte prefix (magic `BRPS`, header length, body length),
//! then the header bytes, then the body bytes when there are any — three transport messages
//! with tags 1, 2, 3. A body sent from several buffers ([`Chan::send_segments`], e.g. a pull
//! answered from the store's buffers of its parts, without copying them into one) has the
//! magic `BRPM`: its header message starts with the segment table (a u32 count `k`, then `k`
//! u64 lengths, little-endian; 2 ≤ `k` ≤ [`MAX_SEGMENTS`], every length > 0, adding up to the
//! body length; the header proper after it is held to the same limit), and the body follows
//! as `k` transport messages with tag 3. The receiver gets the same contiguous body either
//! way. Outgoing messages are sent in priority order (higher first, FIFO within a priority): they are handed to the transport one at a time, and only while less than
//! [`POST_WINDOW`] bytes handed over earlier are still unsent, so a message queued later with a
//! higher priority overtakes what is still queued. Both lengths are checked against the channel's [`Limits`] (what the protocol
//! allows the peer: the group's partition size plus a header) BEFORE anything is allocated.
//!
//! A peer that closes or dies ends the channel. A protocol error (bad magic, a length over the
//! limits, a message the receiver refuses) ends it too, after a goodbye naming the reason
//! ([`super::wire::Msg::Bye`], sent for at most [`BYE_LINGER`]) so the peer can fail what it
//! has in flight at once. `on_close` is called once with the reason.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use braid_transport::{Conn, PollFd, Request};

use super::pool::{Loan, Seg};
use crate::error::{Error, Result};

const MAGIC: [u8; 4] = *b"BRPS";
/// The magic of a message whose body is sent in segments (see the module documentation).
const MAGIC_SEGS: [u8; 4] = *b"BRPM";
/// Most segments one message's body may be sent in.
pub(crate) const MAX_SEGMENTS: usize = 4096;
/// Segments smaller than this are copied together rather than sent one by one.
const SEGMENT_MIN: usize = 64 << 10;
/// Messages up to this size (header and body) queued while the channel is idle are written by
/// the thread that queues them (a small request then leaves without waking the channel
/// thread first; a larger one is not worth writing under the caller's locks).
const INLINE_MAX: usize = 64 << 10;
const TAG_PREFIX: u64 = 1;
const TAG_HDR: u64 = 2;
const TAG_BODY: u64 = 3;
/// How long a channel that hit a protocol error tries to send its goodbye.
pub(crate) const BYE_LINGER: Duration = Duration::from_secs(1);
/// Bytes handed to the transport and not yet sent, beyond which the next message waits in the
/// channel's priority queue: the transport sends in posting order, so a message of higher
/// priority queued later overtakes everything not yet handed over (a large push split in
/// parts lets a later urgent one through after at most about 8 MiB: two parts at the default
/// partition size, which keeps the link busy between parts; with 1 MiB, posting one 4 MiB
/// part at a time left it idle between parts, ~10% slower at 16 MiB).
pub(crate) const POST_WINDOW: usize = 8 << 20;

/// The largest header and body a channel accepts from its peer; a larger length in a prefix is
/// a protocol error, refused before anything is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Header bytes.
    pub hdr: usize,
    /// Body bytes.
    pub body: usize,
}

/// What handles a received message: `Err(reason)` is a protocol error that ends the channel.
pub(crate) type OnMsg = Box<dyn FnMut(&Incoming) -> std::result::Result<(), String> + Send>;

/// Where a message's body goes, asked once its header is in (see [`Chan::start_with`]):
/// given the header and the body's segment lengths, `Some` receives the body straight into
/// lent memory instead of the receive buffer.
pub(crate) type OnPlace = Box<dyn FnMut(&[u8], &[usize]) -> Option<Placement> + Send>;

/// Bodies smaller than this are not placed ([`OnPlace`]): received into the receive buffer
/// and copied, which costs less than a receive per segment.
pub(crate) const PLACE_MIN: usize = 64 << 10;

/// A body received straight into lent memory ([`OnPlace`]): segment `i` goes to byte
/// `offs[i]` of `loan` (checked against the loan's bounds before anything is received). The
/// channel holds it from the header until the body is in and `on_msg` saw the message
/// ([`Incoming::placed`]), or until the connection is dropped; `guard` is dropped then.
pub(crate) struct Placement {
    /// The memory (a receive loan, [`Loan::new_mut`]).
    pub loan: Arc<Loan>,
    /// Where each segment goes in it.
    pub offs: Vec<usize>,
    /// Dropped when the channel lets go of the placement (the body arrived whole, or never
    /// will on this connection).
    #[allow(dead_code)] // held for its drop
    pub guard: Box<dyn Send>,
}

impl Placement {
    /// Whether every segment fits in the loan, without overlapping another.
    fn fits(&self, segs: &[usize]) -> bool {
        if self.offs.len() != segs.len() {
            return false;
        }
        let mut spans: Vec<(usize, usize)> = self
            .offs
            .iter()
            .copied()
            .zip(segs.iter().copied())
            .collect();
        spans.sort_unstable();
        spans.iter().all(|(o, n)| self.loan.dest(*o, *n).is_some())
            && spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A message to send.
pub(crate) struct Outgoing {
    /// Higher first.
    pub prio: i32,
    /// Header bytes (JSON).
    pub hdr: Vec<u8>,
    /// Body bytes (shared: a request kept for a retry is not copied again).
    pub body: Arc<Vec<u8>>,
}

struct Queued {
    prio: i32,
    seq: u64,
    msg: Wire,
}

/// A queued message: its body is the concatenation of `segs` (none: no body).
struct Wire {
    hdr: Vec<u8>,
    segs: Vec<Seg>,
}

impl From<Outgoing> for Wire {
    fn from(m: Outgoing) -> Wire {
        Wire {
            hdr: m.hdr,
            segs: vec![Seg::Owned(m.body)],
        }
    }
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        self.prio == o.prio && self.seq == o.seq
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Max-heap: higher priority first, then lower sequence number first.
        self.prio.cmp(&o.prio).then(o.seq.cmp(&self.seq))
    }
}

/// A received message.
pub(crate) struct Incoming {
    /// Header bytes.
    pub hdr: Vec<u8>,
    /// The receive buffer: the body is its first `len` bytes. It keeps its high-water length
    /// between messages, so a body is received without zeroing the buffer first. Shared with
    /// whoever took the body as it is ([`Incoming::body_buf`]) until they let go.
    buf: Arc<Vec<u8>>,
    len: usize,
    /// The body's segments (lengths; one segment: the body).
    segs: Vec<usize>,
    /// On a channel started with early segments ([`Chan::start_with`]): `Some(n)` while the
    /// body is still arriving and its first `n` segments are in (an early look, before the
    /// whole message); `None` for the whole message.
    partial: Option<usize>,
    /// The body was received into the memory an [`OnPlace`] gave, not into this message.
    placed: bool,
}

impl Incoming {
    /// Body bytes (of an early look: only the segments in are valid; none when the body was
    /// placed, [`Incoming::placed`]).
    pub(crate) fn body(&self) -> &[u8] {
        if self.placed {
            return &[];
        }
        &self.buf[..self.len.min(self.buf.len())]
    }

    /// The buffer whose first [`Incoming::body`]`.len()` bytes are the body of this whole
    /// message, for a handler that keeps (a range of) the body as it is, e.g. to forward it:
    /// while a clone is held the channel receives into another buffer. `None` for an early
    /// look, a placed body or none.
    pub(crate) fn body_buf(&self) -> Option<&Arc<Vec<u8>>> {
        (self.partial.is_none() && !self.placed && self.len > 0).then_some(&self.buf)
    }

    /// Whether the body was received straight into the memory the channel's [`OnPlace`]
    /// gave for it (it is there, whole; [`Incoming::body`] is empty).
    pub(crate) fn placed(&self) -> bool {
        self.placed
    }

    /// The lengths of the body's segments, in order (one segment: the body; none: no body).
    pub(crate) fn segments(&self) -> &[usize] {
        &self.segs
    }

    /// `Some(n)`: an early look at a message whose first `n` segments are in (see
    /// [`Chan::start_with`]); `None`: the whole message.
    pub(crate) fn partial(&self) -> Option<usize> {
        self.partial
    }
}

/// How a channel handles what it receives (see [`Chan::start_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ChanOpts {
    /// Early looks at segmented messages: `on_msg` also sees a message whose body comes in
    /// several segments after each segment of at least [`EARLY_SEGMENT`] bytes but the last.
    pub early: bool,
    /// Answers to small messages that arrived together leave together: after handling a
    /// message of at most [`INLINE_MAX`] bytes, the channel thread handles the next one too if
    /// it is already in and small (up to [`COALESCE_MAX`] in a row), before it writes what they
    /// queued, in one system call (a worker's push and pull get their answers in one write and
    /// one wake-up). Only where handling a small message is always quick (not with a callback
    /// update rule): an answer waits for the next message's handling.
    pub coalesce: bool,
}

/// Most small messages a coalescing channel handles before it writes their answers.
const COALESCE_MAX: usize = 16;

/// The smallest segment after which a channel with early segments shows the message so far
/// ([`Chan::start_with`]): below it an early look costs more than it saves.
pub(crate) const EARLY_SEGMENT: usize = 64 << 10;

/// The connection and its sending state, shared by the channel thread (which holds it while it
/// works and lets go while it waits) and a thread that queues a small message while the
/// channel is idle: that one posts and writes it itself (see [`INLINE_MAX`]).
struct Link {
    conn: Box<dyn Conn>,
    /// Parts handed to the transport and not yet sent.
    sends: std::collections::VecDeque<(Request, Seg)>,
    /// Bytes in `sends`.
    inflight: usize,
    /// The message being posted: its parts not yet accepted by the transport.
    posting: std::collections::VecDeque<(u64, Seg)>,
    /// The receiving side: whoever holds the link receives (see [`Chan::drive`]).
    rx: Rx,
}

/// What the receiving side keeps between messages.
struct Rx {
    prefix: Box<[u8; 16]>,
    /// The last message received; its buffers are reused for the next one (a fresh buffer per
    /// message would cost a page fault per 4 KiB of every large body).
    msg: Incoming,
    rstate: RState,
    /// Set on a protocol error: nothing more is read; the goodbye goes out and the channel
    /// waits for the peer to close, for at most [`BYE_LINGER`].
    failing: Option<(String, std::time::Instant)>,
    on_msg: OnMsg,
    /// Where bodies go instead of `msg.buf` ([`OnPlace`]).
    on_place: Option<OnPlace>,
    /// The placement of the body being received, if it is placed.
    placing: Option<Placement>,
    /// Receive buffers handlers still hold ([`Incoming::body_buf`]), reused once let go (a
    /// fresh buffer per message would cost a page fault per 4 KiB); at most [`SPARE_MAX`].
    spare: Vec<Arc<Vec<u8>>>,
    /// Early looks at segmented messages ([`ChanOpts::early`]).
    early: bool,
    /// See [`ChanOpts::coalesce`].
    coalesce: bool,
}

struct Shared {
    /// None once the channel thread ended (the connection is closed then).
    link: Mutex<Option<Link>>,
    queue: Mutex<(BinaryHeap<Queued>, u64)>,
    wake: i32,
    /// The channel's own thread: what it queues itself (an answer, from `on_msg`) needs no
    /// wake-up, since its loop looks at the queue right after.
    owner: std::sync::OnceLock<std::thread::ThreadId>,
    stop: AtomicBool,
    /// Stop without sending what is queued ([`Chan::abort`]).
    abort: AtomicBool,
    closed: Mutex<Option<String>>,
    /// Bytes of the receive buffer (kept between messages at the largest body's size).
    rbuf: std::sync::atomic::AtomicUsize,
    /// What the peer may send.
    limits: Limits,
    /// Whether other threads may drive the link ([`Chan::drive`]): connections whose sends
    /// never read ([`Conn::writes_apart`]).
    drivable: bool,
    /// Threads driving the link while they wait ([`Chan::attach`]): the channel thread then
    /// waits for its wake-up descriptor only, and they receive.
    drivers: AtomicUsize,
    /// Whether the channel thread waits for its wake-up descriptor only (drivers receive):
    /// [`Chan::unpark`] wakes it when a thread needs it to receive again.
    parked: AtomicBool,
    /// Why the connection failed, found by a thread driving it: the channel thread ends the
    /// channel with it.
    dead: Mutex<Option<String>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: `wake` is an eventfd this struct owns; closed once here.
        unsafe {
            libc::close(self.wake);
        }
    }
}

/// What [`Chan::drive`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drive {
    /// Something was sent or received.
    Moved,
    /// Nothing to do: wait on the descriptors given.
    Idle,
    /// Another thread works on the channel now.
    Busy,
    /// The channel ended or is ending (or cannot be driven): its thread handles it.
    Closed,
}

/// The sending side of a channel; dropping it (all clones) stops the thread with a goodbye.
pub(crate) struct Chan {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    peer: String,
}

impl Chan {
    /// Starts the channel thread on `conn`, accepting messages within `limits`. `on_msg` runs
    /// on that thread for every message; `on_close` runs once when the channel ends (not after
    /// [`Chan::close`]).
    pub(crate) fn start(
        conn: Box<dyn Conn>,
        name: &str,
        limits: Limits,
        on_msg: OnMsg,
        on_close: Box<dyn FnOnce(String) + Send>,
    ) -> Result<Chan> {
        Chan::start_with(
            conn,
            name,
            limits,
            on_msg,
            on_close,
            ChanOpts::default(),
            None,
        )
    }

    /// As [`Chan::start`], with `opts`. With [`ChanOpts::early`], `on_msg` also gets an early
    /// look at a message whose body comes in several segments, after each segment of at least
    /// [`EARLY_SEGMENT`] bytes but the last ([`Incoming::partial`]), so that it can use the
    /// segments in (copy them out, while they are still in the cache) while the rest arrives.
    /// An `Err` from an early look is a protocol error, as from the whole message.
    ///
    /// With `on_place`, the body of a message of at least [`PLACE_MIN`] bytes goes where it
    /// says, once the header is in (see [`Placement`]); `on_msg` then sees it with
    /// [`Incoming::placed`] (and no early looks).
    pub(crate) fn start_with(
        conn: Box<dyn Conn>,
        name: &str,
        limits: Limits,
        on_msg: OnMsg,
        on_close: Box<dyn FnOnce(String) + Send>,
        opts: ChanOpts,
        on_place: Option<OnPlace>,
    ) -> Result<Chan> {
        // SAFETY: FFI; eventfd(2) with valid flags returns a new descriptor or -1.
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(Error::System(format!(
                "eventfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        let peer = conn.peer_desc();
        let drivable = conn.writes_apart();
        let shared = Arc::new(Shared {
            link: Mutex::new(Some(Link {
                conn,
                sends: Default::default(),
                inflight: 0,
                posting: Default::default(),
                rx: Rx {
                    prefix: Box::new([0u8; 16]),
                    msg: Incoming {
                        hdr: Vec::new(),
                        buf: Arc::default(),
                        len: 0,
                        segs: Vec::new(),
                        partial: None,
                        placed: false,
                    },
                    rstate: RState::Idle,
                    failing: None,
                    on_msg,
                    on_place,
                    placing: None,
                    spare: Vec::new(),
                    early: opts.early,
                    coalesce: opts.coalesce,
                },
            })),
            queue: Mutex::new((BinaryHeap::new(), 0)),
            wake,
            owner: std::sync::OnceLock::new(),
            stop: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            closed: Mutex::new(None),
            rbuf: std::sync::atomic::AtomicUsize::new(0),
            limits,
            drivable,
            drivers: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            dead: Mutex::new(None),
        });
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("braid-ps-{name}"))
            .spawn(move || run(sh, on_close))
            .map_err(|e| Error::System(format!("spawning a channel thread: {e}")))?;
        Ok(Chan {
            shared,
            thread: Mutex::new(Some(thread)),
            peer,
        })
    }

    /// Messages queued and not yet taken for sending (messages are taken one at a time, in
    /// order, so everything taken before goes out before anything queued later).
    pub(crate) fn queued(&self) -> usize {
        lock(&self.shared.queue).0.len()
    }

    /// Queues a message and gets it moving ([`Chan::kick`]). Errors: the channel ended (with
    /// its reason).
    pub(crate) fn send(&self, msg: Outgoing) -> Result<()> {
        let prio = msg.prio;
        self.queue(prio, msg.into(), true)
    }

    /// Queues a message to go with others queued after it: nothing moves until [`Chan::kick`]
    /// (or the channel thread's next look at its queue). Errors: as [`Chan::send`].
    #[cfg(test)]
    pub(crate) fn send_later(&self, msg: Outgoing) -> Result<()> {
        let prio = msg.prio;
        self.queue(prio, msg.into(), false)
    }

    /// Queues a message whose body is the concatenation of `segs`, sent from those buffers
    /// (not copied into one); runs of segments under [`SEGMENT_MIN`] bytes are copied into one
    /// (a transport message per small part costs more than the copy). Errors: as
    /// [`Chan::send`].
    pub(crate) fn send_segments(
        &self,
        prio: i32,
        hdr: Vec<u8>,
        segs: Vec<Arc<Vec<u8>>>,
    ) -> Result<()> {
        self.queue_segs(prio, hdr, segs.into_iter().map(Seg::Owned), true)
    }

    /// As [`Chan::send_segments`], with segments of any kind ([`Seg`]).
    pub(crate) fn send_segs(
        &self,
        prio: i32,
        hdr: Vec<u8>,
        segs: impl IntoIterator<Item = Seg>,
    ) -> Result<()> {
        self.queue_segs(prio, hdr, segs, true)
    }

    /// As [`Chan::send_segments`], with segments that may be lent memory, to go with others
    /// queued after it: nothing moves until [`Chan::kick`] (or the channel thread's next look
    /// at its queue). A lender waits until the channel let go of them ([`Chan::holds`]).
    pub(crate) fn send_segs_later(
        &self,
        prio: i32,
        hdr: Vec<u8>,
        segs: impl IntoIterator<Item = Seg>,
    ) -> Result<()> {
        self.queue_segs(prio, hdr, segs, false)
    }

    fn queue_segs(
        &self,
        prio: i32,
        hdr: Vec<u8>,
        segs: impl IntoIterator<Item = Seg>,
        kick: bool,
    ) -> Result<()> {
        let segs: Vec<Seg> = segs.into_iter().collect();
        if segs.len() <= 1 {
            return self.queue(prio, Wire { hdr, segs }, kick);
        }
        let mut out: Vec<Seg> = Vec::new();
        let mut small: Vec<u8> = Vec::new();
        for s in segs {
            if s.len() >= SEGMENT_MIN {
                if !small.is_empty() {
                    out.push(Seg::Owned(Arc::new(std::mem::take(&mut small))));
                }
                out.push(s);
            } else {
                small.extend_from_slice(s.bytes());
            }
        }
        if !small.is_empty() {
            out.push(Seg::Owned(Arc::new(small)));
        }
        if out.len() > MAX_SEGMENTS {
            // More than a receiver takes: one body.
            let mut one = Vec::with_capacity(out.iter().map(|s| s.len()).sum());
            for s in &out {
                one.extend_from_slice(s.bytes());
            }
            out = vec![Seg::Owned(Arc::new(one))];
        }
        self.queue(prio, Wire { hdr, segs: out }, kick)
    }

    /// Whether anything queued or being sent here is a range of `loan`, or a body is being
    /// received into it. Waits for the connection while a thread works on it (`on_msg`
    /// runs meanwhile): not to be called with a lock `on_msg` takes.
    pub(crate) fn holds(&self, loan: &Arc<Loan>) -> bool {
        let queued = lock(&self.shared.queue)
            .0
            .iter()
            .any(|q| q.msg.segs.iter().any(|s| s.lends(loan)));
        queued
            || lock(&self.shared.link).as_ref().is_some_and(|l| {
                l.posting.iter().any(|(_, s)| s.lends(loan))
                    || l.sends.iter().any(|(_, s)| s.lends(loan))
                    || l.rx
                        .placing
                        .as_ref()
                        .is_some_and(|p| Arc::ptr_eq(&p.loan, loan))
            })
    }

    fn queue(&self, prio: i32, msg: Wire, kick: bool) -> Result<()> {
        {
            let mut q = lock(&self.shared.queue);
            // Looked at under the queue's lock: a channel that ended empties its queue after
            // it set `closed` (nothing queued stays behind, lent memory included).
            if let Some(why) = lock(&self.shared.closed).clone() {
                return Err(Error::PeerLost {
                    rank: 0,
                    member: 0,
                    host: self.peer.clone(),
                    detail: why,
                });
            }
            let seq = q.1;
            q.1 += 1;
            q.0.push(Queued { prio, seq, msg });
        }
        if kick {
            self.kick();
        }
        Ok(())
    }

    /// Gets what is queued moving: written at once by this thread when the channel is idle and
    /// it is small (see [`Chan::write_queued`]), else by the channel thread, woken for it.
    pub(crate) fn kick(&self) {
        if !self.write_queued() {
            self.poke();
        }
    }

    /// Posts and writes the queued messages on the caller's thread when the channel is idle
    /// (its thread waiting, nothing being posted) and they are small ([`INLINE_MAX`]): a
    /// request then leaves without waking the channel thread first, and requests queued
    /// together leave in one system call. Whether everything queued was written (else the
    /// channel thread must go on). Only for connections whose sends never read
    /// ([`Conn::writes_apart`]).
    fn write_queued(&self) -> bool {
        if self.shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        // The channel thread holds the link while it works (and so does this thread inside
        // its own callbacks): then it sends what is queued itself.
        let Ok(mut g) = self.shared.link.try_lock() else {
            return false;
        };
        let Some(link) = g.as_mut() else {
            return false;
        };
        if !link.conn.writes_apart() || !link.posting.is_empty() {
            return false;
        }
        let mut posted = 0usize;
        loop {
            let next = {
                let mut q = lock(&self.shared.queue);
                let small = q.0.peek().is_some_and(|m| {
                    posted + m.msg.hdr.len() + m.msg.segs.iter().map(|s| s.len()).sum::<usize>()
                        <= INLINE_MAX
                });
                if small && link.inflight < POST_WINDOW {
                    q.0.pop()
                } else {
                    None
                }
            };
            let Some(m) = next else { break };
            link.posting.extend(frames(m.msg));
            posted += link.posting.iter().map(|(_, b)| b.len()).sum::<usize>();
            if post(link).is_err() || !link.posting.is_empty() {
                return false;
            }
        }
        if posted == 0 || link.conn.flush().is_err() || reap(link).is_err() {
            return false;
        }
        link.sends.is_empty() && lock(&self.shared.queue).0.is_empty()
    }

    fn poke(&self) {
        if self.shared.owner.get() == Some(&std::thread::current().id()) {
            return;
        }
        let one: u64 = 1;
        // SAFETY: FFI; writes 8 bytes from a live u64 to our eventfd.
        unsafe {
            libc::write(
                self.shared.wake,
                (&one as *const u64).cast::<libc::c_void>(),
                8,
            );
        }
    }

    /// Whether a waiting thread may drive this channel ([`Chan::drive`]).
    pub(crate) fn drivable(&self) -> bool {
        self.shared.drivable
    }

    /// Counts the calling thread as driving the channel until [`Chan::detach`]: it calls
    /// [`Chan::drive`] and waits on the descriptors that gives, so the channel thread leaves
    /// receiving to it (one wake-up less per answer: the waiting thread gets its answer
    /// itself instead of being woken by the channel thread that received it).
    pub(crate) fn attach(&self) {
        self.shared.drivers.fetch_add(1, Ordering::SeqCst);
    }

    /// Ends [`Chan::attach`]. The channel thread is woken when the last driver leaves with a
    /// message half received or something left to send (else it looks again within 20 ms).
    pub(crate) fn detach(&self) {
        if self.shared.drivers.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        let pending = match self.shared.link.try_lock() {
            // A message partly received (a receive posted for the next one's prefix is
            // the idle state).
            Ok(g) => g.as_ref().is_some_and(|l| {
                matches!(l.rx.rstate, RState::Hdr(..) | RState::Body(..))
                    || !l.posting.is_empty()
                    || !l.sends.is_empty()
            }),
            // Held: by the channel thread (which looks at the drivers before it waits) or by
            // another thread.
            Err(std::sync::TryLockError::WouldBlock) => false,
            Err(std::sync::TryLockError::Poisoned(_)) => true,
        };
        if pending || !lock(&self.shared.queue).0.is_empty() {
            self.poke();
        }
    }

    /// Wakes the channel thread when it is parked (waiting for its wake-up descriptor only,
    /// see [`Chan::attach`]) and no thread drives the channel any more: for a thread that
    /// waits for an answer on this channel without driving it.
    pub(crate) fn unpark(&self) {
        if self.shared.drivers.load(Ordering::SeqCst) == 0
            && self.shared.parked.load(Ordering::SeqCst)
        {
            self.poke();
        }
    }

    /// Drives the channel on the calling thread (attached, see [`Chan::attach`]): posts what
    /// is queued and receives what arrived, running the message handler here, until nothing
    /// moves; then adds the descriptors to wait on to `fds`.
    pub(crate) fn drive(&self, fds: &mut Vec<PollFd>) -> Drive {
        let sh = &self.shared;
        if !sh.drivable || sh.stop.load(Ordering::SeqCst) {
            return Drive::Closed;
        }
        let mut g = match sh.link.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => return Drive::Busy,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        let Some(link) = g.as_mut() else {
            return Drive::Closed;
        };
        if lock(&sh.dead).is_some() {
            return Drive::Closed;
        }
        let mut moved = false;
        loop {
            match step(sh, link) {
                Ok(true) => moved = true,
                Ok(false) => break,
                Err(why) => {
                    // The channel thread ends the channel (and runs its `on_close`).
                    *lock(&sh.dead) = Some(why);
                    drop(g);
                    self.poke();
                    return Drive::Closed;
                }
            }
        }
        link.conn.poll_fds(fds);
        if moved {
            Drive::Moved
        } else {
            Drive::Idle
        }
    }

    /// Bytes of the channel's receive buffer (it keeps the largest recent body's size).
    pub(crate) fn receive_buffer(&self) -> usize {
        self.shared.rbuf.load(Ordering::Relaxed)
    }

    /// Whether the channel ended, and why.
    pub(crate) fn closed(&self) -> Option<String> {
        lock(&self.shared.closed).clone()
    }

    /// Stops the channel: queued messages are sent first (for at most about 2 s), then a
    /// goodbye.
    pub(crate) fn close(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.poke();
        if let Some(h) = lock(&self.thread).take() {
            // The last reference may be dropped by the channel's own thread (in a callback):
            // it then ends by itself.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Chan {
    /// As [`Chan::close`], without sending what is still queued or being sent first: for a
    /// connection whose peer stopped reading.
    pub(crate) fn abort(&self) {
        self.shared.abort.store(true, Ordering::SeqCst);
        self.close();
    }
}

/// Closes channels one after the other (each sends what it has queued first, see
/// [`Chan::close`]).
pub(crate) fn close_all(chans: impl IntoIterator<Item = Arc<Chan>>) {
    for c in chans {
        c.close();
    }
}

impl Drop for Chan {
    /// Stops the channel without waiting for its thread: the last reference may go while a
    /// lock is held that the thread's `on_close` needs (a join there would deadlock). The
    /// thread still sends what was queued, then ends by itself; [`Chan::close`] waits.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.poke();
    }
}

enum RState {
    Idle,
    Prefix(Request),
    /// The header; the body length, and whether it comes in segments.
    Hdr(Request, usize, bool),
    /// The body: segment `.1` of [`Incoming::segments`] is being received; it ends at byte
    /// `.2`.
    Body(Request, usize, usize),
}

/// Splits the segment table off the front of a `BRPM` header: the segment lengths, checked
/// against the body length `bl`; the header left must be at most `max_hdr` bytes.
fn take_segments(
    hdr: &mut Vec<u8>,
    bl: usize,
    max_hdr: usize,
    segs: &mut Vec<usize>,
) -> std::result::Result<(), String> {
    let bad = |what: &str| format!("segmented message: {what}");
    let k = hdr
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| bad("no segment table"))?;
    if !(2..=MAX_SEGMENTS).contains(&k) {
        return Err(bad(&format!("{k} segments (2 to {MAX_SEGMENTS} allowed)")));
    }
    let table = 4 + 8 * k;
    if hdr.len() <= table {
        return Err(bad("header shorter than its segment table"));
    }
    if hdr.len() - table > max_hdr {
        return Err(bad(&format!(
            "header of {} bytes (at most {max_hdr})",
            hdr.len() - table
        )));
    }
    segs.clear();
    let mut sum = 0usize;
    for c in hdr[4..table].chunks_exact(8) {
        let mut b8 = [0u8; 8];
        b8.copy_from_slice(c);
        let n = usize::try_from(u64::from_le_bytes(b8))
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| bad("a segment of 0 bytes or too many"))?;
        sum = sum
            .checked_add(n)
            .ok_or_else(|| bad("segment lengths overflow"))?;
        segs.push(n);
    }
    if sum != bl {
        return Err(bad(&format!("segments of {sum} bytes for a body of {bl}")));
    }
    hdr.drain(..table);
    Ok(())
}

fn run(sh: Arc<Shared>, on_close: Box<dyn FnOnce(String) + Send>) {
    let _ = sh.owner.set(std::thread::current().id());
    // This thread posts, then progresses, then waits on the connection's descriptors.
    if let Some(l) = lock(&sh.link).as_mut() {
        l.conn.set_event_driven(true);
    }
    let r = drive(&sh);
    // The connection goes with this thread (closed when dropped below).
    let Some(mut link) = lock(&sh.link).take() else {
        return;
    };
    let failing = link.rx.failing.take();
    match r {
        Ok(()) => {
            link.conn.goodbye();
            *lock(&sh.closed) = Some("closed".into());
            lock(&sh.queue).0.clear();
        }
        Err(e) => {
            // After a protocol error, the reason is that error (not how the connection
            // ended while the goodbye lingered).
            let why = match failing {
                Some((why, _)) => {
                    tracing::warn!(target: "braid::ps", "closed the connection with {}: {why}", link.conn.peer_desc());
                    why
                }
                None => e,
            };
            *lock(&sh.closed) = Some(why.clone());
            lock(&sh.queue).0.clear();
            drop(link.conn);
            if !sh.stop.load(Ordering::SeqCst) {
                on_close(why);
            }
        }
    }
}

/// Checks a message prefix against `limits`: (header length, body length, whether the body
/// comes in segments). A segmented message's header may be longer by its segment table.
fn parse_prefix(
    prefix: &[u8; 16],
    limits: Limits,
) -> std::result::Result<(usize, usize, bool), String> {
    let segmented = prefix[..4] == MAGIC_SEGS;
    if prefix[..4] != MAGIC && !segmented {
        return Err("not the braid push/pull protocol (bad magic)".into());
    }
    let max_hdr = if segmented {
        limits.hdr.saturating_add(4 + 8 * MAX_SEGMENTS)
    } else {
        limits.hdr
    };
    let hl = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
    let mut b8 = [0u8; 8];
    b8.copy_from_slice(&prefix[8..16]);
    let bl = u64::from_le_bytes(b8);
    let hl = usize::try_from(hl)
        .ok()
        .filter(|h| (1..=max_hdr).contains(h));
    let blu = usize::try_from(bl)
        .ok()
        .filter(|b| *b <= limits.body && (!segmented || *b > 0));
    match (hl, blu) {
        (Some(h), Some(b)) => Ok((h, b, segmented)),
        _ => Err(format!(
            "message lengths over the limits (header {} of at most {}, body {bl} of at most {})",
            u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]),
            max_hdr,
            limits.body
        )),
    }
}

/// Queues the goodbye that tells the peer why the channel ends.
fn queue_bye(sh: &Shared, why: &str) {
    let mut q = lock(&sh.queue);
    let seq = q.1;
    q.1 += 1;
    q.0.push(Queued {
        prio: i32::MAX,
        seq,
        msg: Wire {
            hdr: super::wire::Msg::Bye {
                reason: why.to_string(),
            }
            .encode(),
            segs: Vec::new(),
        },
    });
}

/// The channel loop; `Ok` when stopped, `Err(reason)` when the connection failed or the peer
/// broke the protocol (found by this thread or by one driving the link, [`Chan::drive`]).
/// After a protocol error (recorded in [`Rx::failing`]) nothing more is read; the goodbye
/// goes out and the channel waits for the peer to close, for at most [`BYE_LINGER`] (closing
/// first could lose the goodbye in flight).
fn drive(sh: &Shared) -> std::result::Result<(), String> {
    let mut fds: Vec<PollFd> = Vec::new();
    let mut scratch = Vec::new();
    let mut stop_since: Option<std::time::Instant> = None;
    loop {
        // The link is held while this thread works; a small message queued meanwhile waits in
        // the queue (see `Chan::write_queued`).
        let mut g = lock(&sh.link);
        let Some(link) = g.as_mut() else {
            return Err("closed".into());
        };
        if let Some(why) = lock(&sh.dead).take() {
            return Err(why);
        }
        let moved = step(sh, link)?;
        // 3. Stop when asked, once everything queued went out (bounded).
        if sh.stop.load(Ordering::SeqCst) {
            let since = *stop_since.get_or_insert_with(std::time::Instant::now);
            let empty =
                lock(&sh.queue).0.is_empty() && link.posting.is_empty() && link.sends.is_empty();
            if empty || sh.abort.load(Ordering::SeqCst) || since.elapsed() > Duration::from_secs(2)
            {
                return Ok(());
            }
        }
        if moved {
            continue;
        }
        // 4. Wait for the connection or a new message, with the link free. While threads
        // drive the link (waiting for answers, see `Chan::attach`) they receive, and this
        // thread waits for its wake-up descriptor only (and looks again after at most 20 ms),
        // unless it has something to send.
        fds.clear();
        // Parked first, drivers read after (a thread that stops driving reads them the other
        // way round, see `Chan::unpark`): either this thread sees no driver, or that one sees
        // it parked and wakes it.
        sh.parked.store(true, Ordering::SeqCst);
        let parked = sh.drivers.load(Ordering::SeqCst) > 0
            && link.posting.is_empty()
            && link.sends.is_empty();
        if !parked {
            sh.parked.store(false, Ordering::SeqCst);
            link.conn.poll_fds(&mut fds);
        }
        drop(g);
        fds.push(PollFd {
            fd: sh.wake,
            read: true,
            write: false,
        });
        let _ = braid_transport::wait_fds(&fds, Duration::from_millis(20), &mut scratch);
        // The wake-up descriptor is the last one; read it only when it was poked (a failed
        // wait reads it anyway).
        sh.parked.store(false, Ordering::SeqCst);
        if scratch.last().map_or(true, |p| p.revents != 0) {
            let mut b = [0u8; 8];
            // SAFETY: FFI; reads at most 8 bytes into a live buffer from our nonblocking
            // eventfd.
            unsafe {
                libc::read(sh.wake, b.as_mut_ptr().cast::<libc::c_void>(), 8);
            }
        }
    }
}

/// Records a protocol error: the goodbye naming it is queued and nothing more is read.
fn fail_protocol(sh: &Shared, rx: &mut Rx, why: String) {
    queue_bye(sh, &why);
    rx.failing = Some((why, std::time::Instant::now()));
    rx.rstate = RState::Idle;
    // Nothing is being received into it (the failing step's receive completed).
    rx.placing = None;
    rx.msg.placed = false;
}

/// One look at the link, by the channel thread or a thread driving it: posts what is queued,
/// progresses the connection, receives what arrived (running `on_msg` for each whole
/// message). Whether anything moved; `Err` when the connection failed, or the goodbye after a
/// protocol error lingered long enough.
fn step(sh: &Shared, link: &mut Link) -> std::result::Result<bool, String> {
    let limits = sh.limits;
    let mut moved = false;
    // 1. Outgoing: one message at a time, in priority order.
    loop {
        if link.posting.is_empty() {
            if link.inflight >= POST_WINDOW {
                // Enough on its way: the rest waits, in priority order.
                break;
            }
            let next = lock(&sh.queue).0.pop();
            let Some(q) = next else { break };
            link.posting.extend(frames(q.msg));
        }
        let before = link.posting.len();
        post(link)?;
        moved |= link.posting.len() != before;
        if !link.posting.is_empty() {
            // The transport takes no more now.
            break;
        }
    }
    let rx = &mut link.rx;
    let conn = &mut link.conn;
    // 2. Incoming (nothing more once the peer broke the protocol).
    if let Some((why, since)) = &rx.failing {
        if since.elapsed() > BYE_LINGER {
            return Err(why.clone());
        }
    } else if matches!(rx.rstate, RState::Idle) {
        // SAFETY: `prefix` is a boxed array that lives as long as the link.
        if let Some(r) = unsafe { conn.irecv(TAG_PREFIX, rx.prefix.as_mut_ptr(), 16) }
            .map_err(|e| e.to_string())?
        {
            rx.rstate = RState::Prefix(r);
        }
    }
    moved |= conn.progress().map_err(|e| e.to_string())?;
    moved |= reap(link)?;
    let rx = &mut link.rx;
    let conn = &mut link.conn;
    // Messages handled in this step (see `ChanOpts::coalesce`).
    let mut handled = 0;
    loop {
        let next = match &rx.rstate {
            RState::Idle => break,
            RState::Prefix(r) => {
                if conn.test(*r).map_err(|e| e.to_string())?.is_none() {
                    break;
                }
                let (hl, bl, segmented) = match parse_prefix(&rx.prefix, limits) {
                    Ok(x) => x,
                    Err(why) => {
                        fail_protocol(sh, rx, why);
                        break;
                    }
                };
                rx.msg.hdr.clear();
                rx.msg.hdr.resize(hl, 0);
                // SAFETY: `msg.hdr` is not touched until the request completed.
                match unsafe { conn.irecv(TAG_HDR, rx.msg.hdr.as_mut_ptr(), hl) }
                    .map_err(|e| e.to_string())?
                {
                    Some(r) => RState::Hdr(r, bl, segmented),
                    None => return Err("transport refused a receive".into()),
                }
            }
            RState::Hdr(r, bl, segmented) => {
                if conn.test(*r).map_err(|e| e.to_string())?.is_none() {
                    break;
                }
                let (bl, segmented) = (*bl, *segmented);
                rx.msg.segs.clear();
                if segmented {
                    if let Err(why) =
                        take_segments(&mut rx.msg.hdr, bl, limits.hdr, &mut rx.msg.segs)
                    {
                        fail_protocol(sh, rx, why);
                        break;
                    }
                } else if bl > 0 {
                    rx.msg.segs.push(bl);
                }
                if bl == 0 {
                    rx.msg.len = 0;
                    if let Err(why) = (rx.on_msg)(&rx.msg) {
                        fail_protocol(sh, rx, why);
                        break;
                    }
                    RState::Idle
                } else if let Some(p) = place(rx, bl) {
                    rx.msg.len = bl;
                    rx.msg.placed = true;
                    let first = rx.msg.segs.first().copied().unwrap_or(bl);
                    let dest = p.loan.dest(p.offs[0], first);
                    rx.placing = Some(p);
                    let Some(dest) = dest else {
                        return Err("placement outside its memory".into());
                    };
                    // SAFETY: `dest` is `first` bytes of lent memory (checked by `dest`),
                    // valid while `rx.placing` holds the loan, which it does until the
                    // request completed or the connection (with its requests) was dropped;
                    // nothing else writes that range (`Placement::fits`).
                    match unsafe { conn.irecv(TAG_BODY, dest, first) }.map_err(|e| e.to_string())? {
                        Some(r) => RState::Body(r, 0, first),
                        None => return Err("transport refused a receive".into()),
                    }
                } else {
                    let Some(buf) = receive_buffer(rx, bl) else {
                        return Err("no receive buffer to itself".into());
                    };
                    sh.rbuf.store(
                        rx.msg.buf.capacity()
                            + rx.spare.iter().map(|b| b.capacity()).sum::<usize>(),
                        Ordering::Relaxed,
                    );
                    rx.msg.len = bl;
                    let first = rx.msg.segs.first().copied().unwrap_or(bl);
                    // SAFETY: the receive buffer (at least `bl` >= `first` bytes, held by
                    // this channel only: see `receive_buffer`) is not touched until the
                    // request completed.
                    match unsafe { conn.irecv(TAG_BODY, buf, first) }.map_err(|e| e.to_string())? {
                        Some(r) => RState::Body(r, 0, first),
                        None => return Err("transport refused a receive".into()),
                    }
                }
            }
            RState::Body(r, i, end) => {
                if conn.test(*r).map_err(|e| e.to_string())?.is_none() {
                    break;
                }
                if let Some(&n) = rx.msg.segs.get(*i + 1) {
                    // The next segment, right after this one.
                    let (i, at) = (*i + 1, *end);
                    if let Some(p) = &rx.placing {
                        let Some(dest) = p.offs.get(i).and_then(|o| p.loan.dest(*o, n)) else {
                            return Err("placement outside its memory".into());
                        };
                        // SAFETY: as for the first segment (the header's branch).
                        match unsafe { conn.irecv(TAG_BODY, dest, n) }.map_err(|e| e.to_string())? {
                            Some(r) => RState::Body(r, i, at + n),
                            None => return Err("transport refused a receive".into()),
                        }
                    } else {
                        if rx.early && rx.msg.segs[i - 1] >= EARLY_SEGMENT {
                            // An early look at the segments in (before the next receive is
                            // posted: nothing writes to the buffer meanwhile).
                            rx.msg.partial = Some(i);
                            let r = (rx.on_msg)(&rx.msg);
                            rx.msg.partial = None;
                            if let Err(why) = r {
                                fail_protocol(sh, rx, why);
                                break;
                            }
                        }
                        // Nobody else holds the buffer while a body is received into it (see
                        // `Incoming::body_buf`).
                        let Some(buf) =
                            Arc::get_mut(&mut rx.msg.buf).and_then(|b| b.get_mut(at..at + n))
                        else {
                            return Err("segment outside the receive buffer".into());
                        };
                        // SAFETY: `buf` (`n` bytes inside `msg.buf`, which does not move or
                        // change size while the body is received) is not touched until the
                        // request completed.
                        match unsafe { conn.irecv(TAG_BODY, buf.as_mut_ptr(), n) }
                            .map_err(|e| e.to_string())?
                        {
                            Some(r) => RState::Body(r, i, at + n),
                            None => return Err("transport refused a receive".into()),
                        }
                    }
                } else {
                    let r = (rx.on_msg)(&rx.msg);
                    // The placed body is in and handled: the placement ends.
                    rx.msg.placed = false;
                    rx.placing = None;
                    if let Err(why) = r {
                        fail_protocol(sh, rx, why);
                        break;
                    }
                    RState::Idle
                }
            }
        };
        rx.rstate = next;
        moved = true;
        let small = rx.msg.hdr.len() + rx.msg.len <= INLINE_MAX;
        if matches!(rx.rstate, RState::Idle) {
            // What the message queued (an answer) goes out before the next one is taken:
            // that one may take long to handle (a slow update rule). Except on a coalescing
            // channel, after a small message, where the next one is taken if it is in already
            // (and handled if it is small too, below): their answers leave together.
            handled += 1;
            if !rx.coalesce || !small || handled >= COALESCE_MAX || rx.failing.is_some() {
                break;
            }
            // SAFETY: as at the top of this function.
            match unsafe { conn.irecv(TAG_PREFIX, rx.prefix.as_mut_ptr(), 16) }
                .map_err(|e| e.to_string())?
            {
                Some(r) => rx.rstate = RState::Prefix(r),
                None => break,
            }
        } else if handled > 0 && matches!(rx.rstate, RState::Body(..)) && !small {
            // A large message after small ones: their answers go out before it is handled.
            break;
        }
    }
    Ok(moved)
}

/// Most receive buffers a channel keeps while handlers hold them ([`Rx::spare`]); one held
/// when there are more already is let go (it is freed when its holder drops it).
const SPARE_MAX: usize = 2;

/// A receive buffer of at least `bl` bytes that nobody else holds: the message's own, or, while
/// a handler holds that one ([`Incoming::body_buf`]), a spare one nobody holds any more (or a
/// new one). Where to receive into; `None` only if the buffer is shared after all.
fn receive_buffer(rx: &mut Rx, bl: usize) -> Option<*mut u8> {
    let msg = &mut rx.msg;
    if Arc::get_mut(&mut msg.buf).is_none() {
        let next = match rx.spare.iter().position(|b| Arc::strong_count(b) == 1) {
            Some(i) => rx.spare.swap_remove(i),
            None => Arc::default(),
        };
        let held = std::mem::replace(&mut msg.buf, next);
        rx.spare.push(held);
        if rx.spare.len() > SPARE_MAX {
            rx.spare.remove(0);
        }
    }
    let buf = Arc::get_mut(&mut msg.buf)?;
    if buf.len() > 4 * bl.max(1 << 20) {
        // Do not hold on to a buffer much larger than the traffic now.
        *buf = Vec::new();
    }
    if buf.len() < bl {
        // Grows only (zeroing only the new part); a smaller body is received into the front
        // of the buffer.
        buf.resize(bl, 0);
    }
    Some(buf.as_mut_ptr())
}

/// The placement of a body of `bl` bytes whose header and segment lengths are in `rx.msg`,
/// if the channel places bodies and this one fits where it is to go; `None`: into the
/// receive buffer.
fn place(rx: &mut Rx, bl: usize) -> Option<Placement> {
    if bl < PLACE_MIN || rx.msg.segs.is_empty() {
        return None;
    }
    let f = rx.on_place.as_mut()?;
    let p = f(&rx.msg.hdr, &rx.msg.segs)?;
    if !p.fits(&rx.msg.segs) {
        tracing::warn!(target: "braid::ps", "a placement that does not fit its memory was ignored");
        return None;
    }
    Some(p)
}

/// A message as transport messages: the prefix, the header (after the segment table when the
/// body comes in several buffers) and the body's buffers.
fn frames(m: Wire) -> Vec<(u64, Seg)> {
    let segs: Vec<Seg> = m.segs.into_iter().filter(|s| !s.is_empty()).collect();
    let bl: usize = segs.iter().map(|s| s.len()).sum();
    let (magic, hdr) = if segs.len() > 1 {
        // The segment table goes in front of the header.
        let mut h = Vec::with_capacity(4 + 8 * segs.len() + m.hdr.len());
        h.extend_from_slice(&(segs.len() as u32).to_le_bytes());
        for s in &segs {
            h.extend_from_slice(&(s.len() as u64).to_le_bytes());
        }
        h.extend_from_slice(&m.hdr);
        (MAGIC_SEGS, h)
    } else {
        (MAGIC, m.hdr)
    };
    let mut p = Vec::with_capacity(16);
    p.extend_from_slice(&magic);
    p.extend_from_slice(&(hdr.len() as u32).to_le_bytes());
    p.extend_from_slice(&(bl as u64).to_le_bytes());
    let mut out = Vec::with_capacity(2 + segs.len());
    out.push((TAG_PREFIX, Seg::Owned(Arc::new(p))));
    out.push((TAG_HDR, Seg::Owned(Arc::new(hdr))));
    out.extend(segs.into_iter().map(|s| (TAG_BODY, s)));
    out
}

/// Hands the parts of the message being posted to the transport while it takes them.
fn post(link: &mut Link) -> std::result::Result<(), String> {
    let zero = [0u8; braid_transport::META_LEN];
    while let Some((tag, buf)) = link.posting.front() {
        let b = buf.bytes();
        // SAFETY: the segment moves into `sends` right after posting and stays there until
        // the request completed (heap memory of a Vec does not move; lent memory stays valid
        // while a segment of it exists), or until the connection is dropped (before `sends`:
        // a `Link`'s fields drop in order).
        let r = unsafe { link.conn.isend(*tag, &zero, b.as_ptr(), b.len()) }
            .map_err(|e| e.to_string())?;
        let Some(req) = r else { break };
        if let Some((_, buf)) = link.posting.pop_front() {
            link.inflight += buf.len();
            link.sends.push_back((req, buf));
        }
    }
    Ok(())
}

/// Drops the parts the transport finished sending; whether there were any.
fn reap(link: &mut Link) -> std::result::Result<bool, String> {
    let mut moved = false;
    while let Some((r, _)) = link.sends.front() {
        if link.conn.test(*r).map_err(|e| e.to_string())?.is_none() {
            break;
        }
        if let Some((_, buf)) = link.sends.pop_front() {
            link.inflight = link.inflight.saturating_sub(buf.len());
        }
        moved = true;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Seen = Arc<Mutex<Vec<(std::thread::ThreadId, Vec<u8>)>>>;

    /// Channel `a` (recording each message's header and the thread that handled it; its
    /// `on_close` reason in `closed`) and channel `b`, connected over a TCP socket pair.
    fn chans() -> (Chan, Chan, Seen, Arc<Mutex<Option<String>>>) {
        let (ca, cb) = braid_transport::fuzzing::tcp_pair().expect("a socket pair");
        let limits = Limits {
            hdr: 1 << 10,
            body: 1 << 20,
        };
        let seen: Seen = Arc::default();
        let s2 = seen.clone();
        let closed: Arc<Mutex<Option<String>>> = Arc::default();
        let c2 = closed.clone();
        let a = Chan::start(
            ca,
            "a",
            limits,
            Box::new(move |m: &Incoming| {
                lock(&s2).push((std::thread::current().id(), m.hdr.clone()));
                Ok(())
            }),
            Box::new(move |why| *lock(&c2) = Some(why)),
        )
        .unwrap();
        let b = Chan::start(cb, "b", limits, Box::new(|_| Ok(())), Box::new(|_| {})).unwrap();
        (a, b, seen, closed)
    }

    /// A channel started with early looks shows a segmented message after each large segment
    /// but the last (the segments in, intact), then the whole message; small segments, a
    /// one-segment body and a channel without early looks show the whole message only.
    #[test]
    fn early_looks_show_large_segments_as_they_arrive() {
        type Looks = Arc<Mutex<Vec<(Option<usize>, Vec<usize>, Vec<u8>)>>>;
        let big = EARLY_SEGMENT;
        for early in [true, false] {
            let (ca, cb) = braid_transport::fuzzing::tcp_pair().expect("a socket pair");
            let limits = Limits {
                hdr: 1 << 10,
                body: 8 << 20,
            };
            let looks: Looks = Arc::default();
            let l2 = looks.clone();
            let a = Chan::start_with(
                ca,
                "a",
                limits,
                Box::new(move |m: &Incoming| {
                    let n = m.partial().unwrap_or(m.segments().len());
                    let have: usize = m.segments()[..n].iter().sum();
                    lock(&l2).push((
                        m.partial(),
                        m.segments().to_vec(),
                        m.body()[..have].to_vec(),
                    ));
                    Ok(())
                }),
                Box::new(|_| {}),
                ChanOpts {
                    early,
                    coalesce: false,
                },
                None,
            )
            .unwrap();
            let b = Chan::start(cb, "b", limits, Box::new(|_| Ok(())), Box::new(|_| {})).unwrap();
            let seg = |n: usize, v: u8| Arc::new(vec![v; n]);
            // Three large segments, then two small ones, then a one-segment body.
            let msgs: Vec<Vec<Arc<Vec<u8>>>> = vec![
                vec![seg(big, 1), seg(big + 8, 2), seg(big, 3)],
                vec![seg(100, 4), seg(200, 5)],
                vec![seg(2 * big, 6)],
            ];
            for (i, segs) in msgs.iter().enumerate() {
                b.send_segments(0, format!("m{i}").into_bytes(), segs.clone())
                    .unwrap();
            }
            until("the three messages", || {
                lock(&looks).iter().filter(|l| l.0.is_none()).count() == 3
            });
            let looks = lock(&looks).clone();
            let whole = |segs: &[Arc<Vec<u8>>]| {
                segs.iter()
                    .flat_map(|s| s.iter().copied())
                    .collect::<Vec<u8>>()
            };
            let lens = |segs: &[Arc<Vec<u8>>]| segs.iter().map(|s| s.len()).collect::<Vec<usize>>();
            let mut want = Vec::new();
            if early {
                for n in 1..3 {
                    want.push((Some(n), lens(&msgs[0]), whole(&msgs[0][..n])));
                }
            }
            for segs in &msgs {
                want.push((None, lens(segs), whole(segs)));
            }
            assert_eq!(looks.len(), want.len(), "early {early}");
            for (i, (got, want)) in looks.iter().zip(&want).enumerate() {
                assert_eq!(got.0, want.0, "early {early}: look {i}");
                if got.1.iter().all(|n| *n >= big) {
                    // Small segments may be sent as one.
                    assert_eq!(got.1, want.1, "early {early}: look {i}");
                }
                assert!(got.2 == want.2, "early {early}: bytes of look {i}");
            }
            a.close();
            b.close();
        }
    }

    /// Lent memory is sent from where it is (ranges of it, among owned segments; a small
    /// range goes with its small neighbours), and let go of once sent. A channel whose peer
    /// reads nothing holds what it could not send until it is closed (aborted: at once); then
    /// nothing of the loan is held any more.
    #[test]
    fn lent_segments_are_sent_from_where_they_are_and_let_go() {
        let limits = Limits {
            hdr: 1 << 10,
            body: 64 << 20,
        };
        let vals: Vec<u8> = (0..3usize << 20)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        // SAFETY: `vals` outlives the loan: the test waits for every reference to go below.
        let loan = unsafe { Loan::new(&vals) };
        assert!(Seg::lent(&loan, (3 << 20) - 1, 2).is_none());
        assert!(Seg::lent(&loan, usize::MAX, 2).is_none());
        let (ca, cb) = braid_transport::fuzzing::tcp_pair().expect("a socket pair");
        let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let b2 = bodies.clone();
        let a = Chan::start(
            ca,
            "a",
            limits,
            Box::new(move |m: &Incoming| {
                lock(&b2).push(m.body().to_vec());
                Ok(())
            }),
            Box::new(|_| {}),
        )
        .unwrap();
        let b = Chan::start(cb, "b", limits, Box::new(|_| Ok(())), Box::new(|_| {})).unwrap();
        let lent = |off: usize, n: usize| Seg::lent(&loan, off, n).unwrap();
        let segs = vec![
            lent(1 << 20, 1 << 20),
            Seg::Owned(Arc::new(vec![9u8; 100 << 10])),
            lent(0, 512 << 10),
            lent((3 << 20) - 10, 10),
            Seg::Owned(Arc::new(vec![8u8; 20])),
        ];
        let want: Vec<u8> = segs.iter().flat_map(|s| s.bytes().to_vec()).collect();
        b.send_segs_later(0, b"m".to_vec(), segs).unwrap();
        b.kick();
        until("the lent message", || lock(&bodies).len() == 1);
        assert!(lock(&bodies)[0] == want, "the bytes received");
        until("the loan let go", || Arc::strong_count(&loan) == 1);
        assert!(!b.holds(&loan));
        a.close();
        b.close();

        // A peer that reads nothing: what does not fit in the socket's buffers stays held.
        let big: Vec<u8> = vec![5u8; 48 << 20];
        // SAFETY: as above.
        let loan = unsafe { Loan::new(&big) };
        let (ca, cb) = braid_transport::fuzzing::tcp_pair().expect("a socket pair");
        let b = Chan::start(cb, "b", limits, Box::new(|_| Ok(())), Box::new(|_| {})).unwrap();
        let segs: Vec<Seg> = (0..3)
            .map(|i| Seg::lent(&loan, i << 24, 1 << 24).unwrap())
            .collect();
        b.send_segs_later(0, b"m".to_vec(), segs).unwrap();
        b.kick();
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            b.holds(&loan),
            "a channel whose peer reads nothing still holds the loan"
        );
        assert!(Arc::strong_count(&loan) > 1);
        b.close();
        assert!(!b.holds(&loan));
        assert_eq!(
            Arc::strong_count(&loan),
            1,
            "closed: nothing of the loan is held"
        );
        assert!(b.send_segs_later(0, b"m".to_vec(), Vec::new()).is_err());
        drop(ca);
    }

    #[test]
    fn a_receive_buffer_kept_by_a_handler_is_left_alone() {
        let limits = Limits {
            hdr: 1 << 10,
            body: 1 << 20,
        };
        let (ca, cb) = braid_transport::fuzzing::tcp_pair().expect("a socket pair");
        type Kept = Arc<Mutex<Vec<(Option<Arc<Vec<u8>>>, Vec<u8>)>>>;
        let kept: Kept = Arc::default();
        let k2 = kept.clone();
        // Keeps the buffers of the messages whose header is "keep" (as a server forwarding a
        // push does), records every body.
        let a = Chan::start(
            ca,
            "a",
            limits,
            Box::new(move |m: &Incoming| {
                let keep = if m.hdr == b"keep" {
                    m.body_buf().cloned()
                } else {
                    None
                };
                if m.hdr == b"none" {
                    assert!(m.body_buf().is_none(), "a message without a body");
                }
                lock(&k2).push((keep, m.body().to_vec()));
                Ok(())
            }),
            Box::new(|_| {}),
        )
        .unwrap();
        let b = Chan::start(cb, "b", limits, Box::new(|_| Ok(())), Box::new(|_| {})).unwrap();
        let body = |v: u8, n: usize| -> Vec<u8> { (0..n).map(|i| v ^ (i as u8)).collect() };
        let msgs: Vec<(&[u8], Vec<u8>)> = vec![
            (b"keep", body(1, 300 << 10)),
            (b"keep", body(2, 200 << 10)),
            (b"other", body(3, 500 << 10)),
            (b"none", Vec::new()),
            (b"keep", body(4, 100 << 10)),
            (b"other", body(5, 300 << 10)),
        ];
        for (h, m) in &msgs {
            b.send(Outgoing {
                prio: 0,
                hdr: h.to_vec(),
                body: Arc::new(m.clone()),
            })
            .unwrap();
        }
        until("every message", || lock(&kept).len() == msgs.len());
        let got = lock(&kept).clone();
        for (i, ((_, want), (keep, seen))) in msgs.iter().zip(&got).enumerate() {
            assert!(seen == want, "message {i} as received");
            if let Some(k) = keep {
                // Still what it was, though later messages came in meanwhile.
                assert!(k[..want.len()] == want[..], "message {i}: its kept buffer");
            }
        }
        let held: Vec<&Arc<Vec<u8>>> = got.iter().filter_map(|(k, _)| k.as_ref()).collect();
        assert_eq!(held.len(), 3);
        assert!(
            !Arc::ptr_eq(held[0], held[1]) && !Arc::ptr_eq(held[1], held[2]),
            "each kept body in a buffer of its own"
        );
        // Let go: the channel receives into them again (at most two kept aside; no new
        // buffer once one is free).
        drop(got);
        lock(&kept).clear();
        let before = a.receive_buffer();
        for v in 6..10u8 {
            b.send(Outgoing {
                prio: 0,
                hdr: b"other".to_vec(),
                body: Arc::new(body(v, 300 << 10)),
            })
            .unwrap();
        }
        until("four more", || lock(&kept).len() == 4);
        assert!(
            a.receive_buffer() <= before,
            "{} > {before}",
            a.receive_buffer()
        );
        assert!(lock(&kept)
            .iter()
            .zip(6..10u8)
            .all(|((_, seen), v)| *seen == body(v, 300 << 10)));
        a.close();
        b.close();
    }

    /// Sets its flag when dropped (a placement's guard).
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn placed_bodies_go_straight_to_lent_memory_and_let_go() {
        let limits = Limits {
            hdr: 1 << 10,
            body: 8 << 20,
        };
        let n = PLACE_MIN;
        let mut mem = vec![0u8; 4 * n];
        // SAFETY: `mem` outlives the loan and is not touched until nothing else holds it.
        let loan = unsafe { Loan::new_mut(mem.as_mut_ptr(), mem.len()) };
        assert!(loan.dest(3 * n, n + 1).is_none() && loan.dest(usize::MAX, 2).is_none());
        assert!(
            Seg::lent(&loan, 0, 1).is_none(),
            "a receive loan is not sent from"
        );
        let dropped = Arc::new(AtomicBool::new(false));
        // Headers "place" and "small": placed, the second segment first; "bad": a
        // placement out of the memory (ignored); anything else: not placed.
        let (l2, d2) = (loan.clone(), dropped.clone());
        let on_place: OnPlace = Box::new(move |hdr: &[u8], segs: &[usize]| {
            let offs = match hdr {
                b"place" | b"small" => vec![segs[1], 0],
                b"bad" => vec![0, 4 * n],
                _ => return None,
            };
            Some(Placement {
                loan: l2.clone(),
                offs,
                guard: Box::new(Flag(d2.clone())),
            })
        });
        type Seen = Arc<Mutex<Vec<(Vec<u8>, bool, Vec<u8>, bool)>>>;
        let seen: Seen = Arc::default();
        let (s2, d3) = (seen.clone(), dropped.clone());
        let (ca, mut cb) = braid_transport::fuzzing::tcp_pair().expect("a socket pair");
        let a = Chan::start_with(
            ca,
            "a",
            limits,
            Box::new(move |m: &Incoming| {
                let guard_gone = d3.load(Ordering::SeqCst);
                lock(&s2).push((m.hdr.clone(), m.placed(), m.body().to_vec(), guard_gone));
                Ok(())
            }),
            Box::new(|_| {}),
            ChanOpts {
                early: true,
                coalesce: false,
            },
            Some(on_place),
        )
        .unwrap();
        // Sends a message's transport frames from this thread, all of them or all but the
        // last (the body's last segment).
        let mut send = |hdr: &[u8], segs: Vec<Vec<u8>>, all: bool| {
            let mut fr = frames(Wire {
                hdr: hdr.to_vec(),
                segs: segs.into_iter().map(|v| Seg::Owned(Arc::new(v))).collect(),
            });
            if !all {
                fr.pop();
            }
            for (tag, seg) in &fr {
                let b = seg.bytes();
                // SAFETY: `seg` lives until the send completed (waited for right here).
                let r = unsafe {
                    cb.isend(*tag, &[0u8; braid_transport::META_LEN], b.as_ptr(), b.len())
                }
                .unwrap()
                .unwrap();
                until("a frame sent", || {
                    cb.progress().unwrap();
                    cb.test(r).unwrap().is_some()
                });
            }
        };
        let (x, y) = (vec![1u8; n], vec![2u8; n + 8]);
        send(b"place", vec![x.clone(), y.clone()], true);
        until("the placed message", || lock(&seen).len() == 1);
        {
            let s = lock(&seen);
            assert_eq!(s[0].0, b"place");
            assert!(
                s[0].1 && s[0].2.is_empty(),
                "placed: the body is not in the message"
            );
            assert!(!s[0].3, "the guard is held while the message is handled");
        }
        until("the placement let go", || {
            dropped.load(Ordering::SeqCst) && Arc::strong_count(&loan) == 2
        });
        // Out of its memory: received as usual.
        dropped.store(false, Ordering::SeqCst);
        send(b"bad", vec![vec![3u8; n], vec![4u8; n]], true);
        // Too small to place: asked for nothing.
        send(b"small", vec![vec![5u8; 10], vec![6u8; 20]], true);
        // (With an early look at "bad", as at any large segmented message not placed; none
        // at the placed one.)
        until("two more", || lock(&seen).len() == 4);
        {
            let s = lock(&seen);
            assert!(!s[1].1 && s[1].0 == b"bad", "bad: an early look");
            assert!(
                !s[2].1 && s[2].2.len() == 2 * n && s[2].2[n] == 4,
                "bad: as usual"
            );
            assert!(!s[3].1 && s[3].2.len() == 30, "small: as usual");
            assert!(
                dropped.load(Ordering::SeqCst),
                "the ignored placement let go"
            );
        }
        assert!(!a.holds(&loan));
        // Half a placed body: held until the connection is aborted.
        dropped.store(false, Ordering::SeqCst);
        send(b"place", vec![vec![7u8; n], vec![8u8; n]], false);
        until("the first segment in", || {
            // SAFETY: not read while written: the first segment went to `n..2n`, whose
            // receive completed once the byte at its end is in (written in order); polled
            // through a volatile read of the last byte only.
            unsafe { std::ptr::read_volatile(loan.dest(2 * n - 1, 1).unwrap()) == 7 }
        });
        assert!(a.holds(&loan), "a channel receiving into the loan holds it");
        assert!(!dropped.load(Ordering::SeqCst));
        a.abort();
        assert!(dropped.load(Ordering::SeqCst) && !a.holds(&loan));
        assert_eq!(
            Arc::strong_count(&loan),
            1,
            "aborted: nothing of the loan is held (the connection went with its thread)"
        );
        drop(a);
        drop(cb);
        drop(loan);
        assert_eq!(lock(&seen).len(), 4, "the half message was never handled");
        // The first message's segments, each where its placement said (`y` at 0, `x` after
        // it), under the half message's first segment (at `n`).
        assert!(mem[..n] == y[..n] && mem[n..2 * n].iter().all(|b| *b == 7));
        assert!(mem[2 * n..2 * n + 8] == x[n - 8..] && mem[2 * n + 8..].iter().all(|b| *b == 0));
    }

    fn send(c: &Chan, hdr: &[u8]) {
        c.send(Outgoing {
            prio: 0,
            hdr: hdr.to_vec(),
            body: Arc::new(vec![1u8; 100]),
        })
        .unwrap();
    }

    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Drives `c` on this thread until `done`, waiting on the descriptors it gives.
    fn drive_until(c: &Chan, what: &str, mut done: impl FnMut() -> bool) -> Drive {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        let (mut fds, mut scratch) = (Vec::new(), Vec::new());
        loop {
            fds.clear();
            let d = c.drive(&mut fds);
            if done() {
                return d;
            }
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting for {what}"
            );
            if d == Drive::Closed {
                std::thread::sleep(Duration::from_millis(1));
            } else {
                let _ = braid_transport::wait_fds(&fds, Duration::from_millis(5), &mut scratch);
            }
        }
    }

    /// A coalescing channel answers small messages that arrived together after handling
    /// several (and a large one only after writing what the small ones queued): every answer
    /// arrives, once, in order, past the COALESCE_MAX boundary and around a large message.
    #[test]
    fn a_coalescing_channel_answers_every_message_in_order() {
        let (ca, cb) = braid_transport::fuzzing::tcp_pair().expect("a socket pair");
        let limits = Limits {
            hdr: 1 << 10,
            body: 1 << 20,
        };
        let me: Arc<std::sync::OnceLock<Arc<Chan>>> = Arc::default();
        let me2 = me.clone();
        let a = Arc::new(
            Chan::start_with(
                ca,
                "a",
                limits,
                Box::new(move |m: &Incoming| {
                    // Echo: the header, and the body's length as the body.
                    let c = me2.get().ok_or("not ready")?;
                    c.send(Outgoing {
                        prio: 0,
                        hdr: m.hdr.clone(),
                        body: Arc::new(m.body().len().to_le_bytes().to_vec()),
                    })
                    .map_err(|e| e.to_string())
                }),
                Box::new(|_| {}),
                ChanOpts {
                    early: false,
                    coalesce: true,
                },
                None,
            )
            .unwrap(),
        );
        let _ = me.set(a.clone());
        // The echoes: header, and the length of the body echoed.
        type Echoes = Arc<Mutex<Vec<(Vec<u8>, usize)>>>;
        let got: Echoes = Arc::default();
        let g2 = got.clone();
        let b = Chan::start(
            cb,
            "b",
            limits,
            Box::new(move |m: &Incoming| {
                let mut n = [0u8; 8];
                n.copy_from_slice(&m.body()[..8]);
                lock(&g2).push((m.hdr.clone(), usize::from_le_bytes(n)));
                Ok(())
            }),
            Box::new(|_| {}),
        )
        .unwrap();
        let mut want = Vec::new();
        for round in 0..3 {
            for i in 0..(COALESCE_MAX + 7) {
                let (hdr, len) = match i {
                    // A large message among small ones.
                    20 => (format!("L{round}"), 200 << 10),
                    _ => (format!("s{round}-{i}"), 100 + i),
                };
                b.send_later(Outgoing {
                    prio: 0,
                    hdr: hdr.clone().into_bytes(),
                    body: Arc::new(vec![7u8; len]),
                })
                .unwrap();
                want.push((hdr.into_bytes(), len));
            }
            // All at once: they arrive together.
            b.kick();
            until("the answers", || lock(&got).len() == want.len());
        }
        assert_eq!(*lock(&got), want);
        a.close();
        b.close();
    }

    #[test]
    fn a_thread_driving_the_channel_receives_and_the_channel_thread_waits_meanwhile() {
        let (a, b, seen, _) = chans();
        let me = std::thread::current().id();
        assert!(a.drivable(), "tcp connections can be driven");
        a.attach();
        // Woken, the channel thread sees the driver and leaves receiving to it.
        a.kick();
        until("the channel thread to park", || {
            a.shared.parked.load(Ordering::SeqCst)
        });
        send(&b, b"one");
        drive_until(&a, "the first message", || !lock(&seen).is_empty());
        assert_eq!(
            lock(&seen)[0],
            (me, b"one".to_vec()),
            "received by the driver"
        );
        // No driver: the channel thread receives again (within its 20 ms look), not this one.
        a.detach();
        send(&b, b"two");
        until("the second message", || lock(&seen).len() == 2);
        let (who, hdr) = lock(&seen)[1].clone();
        assert_eq!(hdr, b"two".to_vec());
        assert_ne!(who, me, "received by the channel thread");
        // Parked again, then woken at once by unpark when its driver left.
        a.attach();
        a.kick();
        until("the channel thread to park again", || {
            a.shared.parked.load(Ordering::SeqCst)
        });
        a.detach();
        a.unpark();
        until("the channel thread to wake", || {
            !a.shared.parked.load(Ordering::SeqCst)
        });
        send(&b, b"three");
        until("the third message", || lock(&seen).len() == 3);
        assert_ne!(lock(&seen)[2].0, me);
    }

    #[test]
    fn a_failure_found_by_a_driver_ends_the_channel_on_its_thread() {
        let (a, b, seen, closed) = chans();
        a.attach();
        a.kick();
        until("the channel thread to park", || {
            a.shared.parked.load(Ordering::SeqCst)
        });
        send(&b, b"last");
        // The peer goes (its goodbye follows what it queued), while this thread drives.
        b.close();
        let d = drive_until(&a, "the channel to end", || lock(&closed).is_some());
        assert_eq!(d, Drive::Closed);
        assert_eq!(
            lock(&seen).len(),
            1,
            "what came before the end was received"
        );
        assert!(a.closed().is_some());
        // A closed channel cannot be driven; detaching it is harmless.
        assert_eq!(a.drive(&mut Vec::new()), Drive::Closed);
        a.detach();
    }

    #[test]
    fn higher_priority_first_fifo_within_a_priority() {
        let mut h = BinaryHeap::new();
        for (seq, prio) in [(0u64, 0i32), (1, 5), (2, 0), (3, 5), (4, -1), (5, 9)] {
            h.push(Queued {
                prio,
                seq,
                msg: Wire {
                    hdr: Vec::new(),
                    segs: Vec::new(),
                },
            });
        }
        let order: Vec<u64> = std::iter::from_fn(|| h.pop().map(|q| q.seq)).collect();
        assert_eq!(order, vec![5, 1, 3, 0, 2, 4]);
    }

    fn table(lens: &[u64], json: &[u8]) -> Vec<u8> {
        let mut h = (lens.len() as u32).to_le_bytes().to_vec();
        for n in lens {
            h.extend_from_slice(&n.to_le_bytes());
        }
        h.extend_from_slice(json);
        h
    }

    #[test]
    fn a_segment_table_is_split_off_and_checked() {
        let mut segs = Vec::new();
        let mut h = table(&[3, 5], b"{}");
        assert_eq!(take_segments(&mut h, 8, 2, &mut segs), Ok(()));
        assert_eq!(
            (h.as_slice(), segs.as_slice()),
            (&b"{}"[..], &[3usize, 5][..])
        );
        // Lengths that do not add up to the body, a zero-length segment, one segment, too
        // many, a table longer than the header, no header after the table: refused.
        for (mut h, bl) in [
            (table(&[3, 5], b"{}"), 9),
            (table(&[0, 8], b"{}"), 8),
            (table(&[8], b"{}"), 8),
            (table(&[u64::MAX, 2], b"{}"), 1),
            (table(&[1; MAX_SEGMENTS + 1], b"{}"), MAX_SEGMENTS + 1),
            (table(&[3, 5], b""), 8),
            (vec![2, 0, 0, 0, 1], 8),
            (vec![2, 0], 8),
            (table(&[3, 5], b"{ }"), 8),
        ] {
            assert!(
                take_segments(&mut h, bl, 2, &mut segs).is_err(),
                "{h:?} {bl}"
            );
        }
    }

    #[test]
    fn a_segmented_prefix_allows_the_table_and_needs_a_body() {
        let lim = Limits { hdr: 16, body: 100 };
        let prefix = |magic: &[u8; 4], hl: u32, bl: u64| {
            let mut p = [0u8; 16];
            p[..4].copy_from_slice(magic);
            p[4..8].copy_from_slice(&hl.to_le_bytes());
            p[8..].copy_from_slice(&bl.to_le_bytes());
            p
        };
        assert_eq!(
            parse_prefix(&prefix(b"BRPM", 16 + 20, 10), lim),
            Ok((36, 10, true))
        );
        assert_eq!(
            parse_prefix(&prefix(b"BRPS", 16, 10), lim),
            Ok((16, 10, false))
        );
        assert!(parse_prefix(&prefix(b"BRPS", 17, 10), lim).is_err());
        assert!(parse_prefix(&prefix(b"BRPM", 16, 0), lim).is_err());
        assert!(parse_prefix(&prefix(b"BRPM", 16, 101), lim).is_err());
        assert!(parse_prefix(&prefix(b"BRPX", 16, 10), lim).is_err());
    }
}
