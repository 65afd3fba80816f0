//! Presence clients for the cluster scenarios: connections that join topics (with or without a
//! tracked `user`), count join outcomes and crashes, and keep presence views from
//! `presence_state` and `presence_diff` exactly as the official client does (diffs received
//! before the state wait for it; joins are applied before leaves; a leave removes a presence
//! only if its `phx_ref` is the one held).
//!
//! Frames are walked with a small JSON skipper instead of being deserialized: a member of a
//! 10,000-user room receives gigabytes of presence payloads in a run, and the generator must not
//! be the bottleneck. Keys are `u<N>` (user N); each user holds one presence (one `phx_ref`).

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use memchr::{memchr2, memmem};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::stats::now_ns;
use crate::ws::Ws;

// ---------------------------------------------------------------- JSON walking

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\n' | b'\r' | b'\t') {
        i += 1;
    }
    i
}

/// `b[i]` is `"`: the index after the closing quote.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        let k = j + memchr2(b'"', b'\\', b.get(j..)?)?;
        if b[k] == b'\\' {
            j = k + 2;
        } else {
            return Some(k + 1);
        }
    }
}

/// Skips the JSON value at `i` (after optional whitespace); the index after it.
pub(crate) fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    let mut i = skip_ws(b, i);
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            loop {
                match *b.get(i)? {
                    b'"' => {
                        i = skip_string(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let s = i;
            while i < b.len() && !matches!(b[i], b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t')
            {
                i += 1;
            }
            (i > s).then_some(i)
        }
    }
}

/// Calls `f(key without quotes, value range)` for each entry of the object at `r`.
/// `None` if it is not a well-formed object.
pub(crate) fn each_entry(
    b: &[u8],
    r: Range<usize>,
    mut f: impl FnMut(&[u8], Range<usize>),
) -> Option<()> {
    let b = &b[..r.end];
    let mut i = skip_ws(b, r.start);
    if *b.get(i)? != b'{' {
        return None;
    }
    i = skip_ws(b, i + 1);
    if *b.get(i)? == b'}' {
        return Some(());
    }
    loop {
        if *b.get(i)? != b'"' {
            return None;
        }
        let ke = skip_string(b, i)?;
        let key = &b[i + 1..ke - 1];
        i = skip_ws(b, ke);
        if *b.get(i)? != b':' {
            return None;
        }
        let vs = skip_ws(b, i + 1);
        let ve = skip_value(b, vs)?;
        f(key, vs..ve);
        i = skip_ws(b, ve);
        match *b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return Some(()),
            _ => return None,
        }
    }
}

/// A V2 JSON frame `[join_ref, ref, topic, event, payload]`: the ranges of its first four
/// elements and of the payload. The payload is not walked (it ends at the final `]`).
pub(crate) fn frame_parts(d: &[u8]) -> Option<([Range<usize>; 4], Range<usize>)> {
    let mut i = skip_ws(d, 0);
    if *d.get(i)? != b'[' {
        return None;
    }
    i += 1;
    let mut parts: [Range<usize>; 4] = Default::default();
    for p in &mut parts {
        let s = skip_ws(d, i);
        let e = skip_value(d, s)?;
        *p = s..e;
        i = skip_ws(d, e);
        if *d.get(i)? != b',' {
            return None;
        }
        i += 1;
    }
    let s = skip_ws(d, i);
    let mut e = d.len();
    while e > s && matches!(d[e - 1], b' ' | b'\n' | b'\r' | b'\t') {
        e -= 1;
    }
    if e <= s || d[e - 1] != b']' {
        return None;
    }
    Some((parts, s..e - 1))
}

/// User N from a key `u<N>`.
pub(crate) fn user_of(key: &[u8]) -> Option<usize> {
    let digits = key.strip_prefix(b"u")?;
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0usize, |v, &c| v * 10 + usize::from(c - b'0')),
    )
}

/// A nonzero hash of the first `phx_ref` in a presence value `{"metas":[{…,"phx_ref":"…"}]}`.
pub(crate) fn ref_of(v: &[u8]) -> u32 {
    static FINDER: std::sync::LazyLock<memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memmem::Finder::new(br#""phx_ref":""#));
    let Some(i) = FINDER.find(v) else {
        return 1;
    };
    let s = i + br#""phx_ref":""#.len();
    let e = s + memchr::memchr(b'"', &v[s..]).unwrap_or(v.len() - s);
    let mut h: u32 = 0x811c_9dc5;
    for &c in &v[s..e] {
        h = (h ^ u32::from(c)).wrapping_mul(0x0100_0193);
    }
    h | 1
}

// ---------------------------------------------------------------- views

/// A presence list over users `0..refs.len()`: the `phx_ref` held for each (0: absent).
pub(crate) struct View {
    refs: Vec<u32>,
    present: u64,
    /// The count to reach, and when `present` last became equal to it (0: never).
    target: u64,
    reached_ns: u64,
    /// Keys that are not `u<N>` with N in range; leaves of a ref not held.
    foreign: u64,
    stale_leaves: u64,
    /// Leaves `(user, ns)` while recording.
    recording: Option<Vec<(u32, u64)>>,
}

impl View {
    pub(crate) fn new(users: usize, target: u64) -> View {
        View {
            refs: vec![0; users],
            present: 0,
            target,
            reached_ns: 0,
            foreign: 0,
            stale_leaves: 0,
            recording: None,
        }
    }

    fn check(&mut self, was: u64, now: u64) {
        if self.present == self.target && was != self.target {
            self.reached_ns = now.max(1);
        }
    }

    fn join(&mut self, key: &[u8], v: &[u8]) {
        match user_of(key).filter(|&u| u < self.refs.len()) {
            Some(u) => {
                if self.refs[u] == 0 {
                    self.present += 1;
                }
                self.refs[u] = ref_of(v);
            }
            None => self.foreign += 1,
        }
    }

    fn leave(&mut self, key: &[u8], v: &[u8], now: u64) {
        match user_of(key).filter(|&u| u < self.refs.len()) {
            Some(u) => {
                let r = ref_of(v);
                if self.refs[u] != 0 && self.refs[u] == r {
                    self.refs[u] = 0;
                    self.present -= 1;
                    if let Some(rec) = &mut self.recording {
                        rec.push((u as u32, now));
                    }
                } else {
                    self.stale_leaves += 1;
                }
            }
            None => self.foreign += 1,
        }
    }

    /// `presence_state` for the users `users` (the topic's): replaces them.
    fn state(&mut self, b: &[u8], payload: Range<usize>, users: impl Iterator<Item = usize>) {
        let was = self.present;
        for u in users {
            if u < self.refs.len() && self.refs[u] != 0 {
                self.refs[u] = 0;
                self.present -= 1;
            }
        }
        if each_entry(b, payload, |k, v| self.join(k, &b[v])).is_none() {
            self.foreign += 1;
        }
        self.check(was, now_ns());
    }

    /// `presence_diff`: joins, then leaves.
    fn diff(&mut self, b: &[u8], payload: Range<usize>) {
        let was = self.present;
        let now = now_ns();
        let (mut joins, mut leaves) = (None, None);
        if each_entry(b, payload, |k, v| match k {
            b"joins" => joins = Some(v),
            b"leaves" => leaves = Some(v),
            _ => {}
        })
        .is_none()
        {
            self.foreign += 1;
        }
        if let Some(j) = joins {
            each_entry(b, j, |k, v| self.join(k, &b[v]));
        }
        if let Some(l) = leaves {
            each_entry(b, l, |k, v| self.leave(k, &b[v], now));
        }
        self.check(was, now);
    }

    #[cfg(test)]
    pub(crate) fn present(&self) -> u64 {
        self.present
    }

    pub(crate) fn set_recording(&mut self, on: bool) {
        self.recording = on.then(Vec::new);
    }

    pub(crate) fn summary(&self) -> GroupStatus {
        GroupStatus {
            present: self.present,
            target: self.target,
            reached_ns: self.reached_ns,
            foreign: self.foreign,
            stale_leaves: self.stale_leaves,
        }
    }

    pub(crate) fn recorded(&self) -> Vec<(u32, u64)> {
        self.recording.clone().unwrap_or_default()
    }
}

#[derive(Serialize, serde::Deserialize, Default, Clone, Debug)]
pub(crate) struct GroupStatus {
    pub(crate) present: u64,
    pub(crate) target: u64,
    pub(crate) reached_ns: u64,
    pub(crate) foreign: u64,
    pub(crate) stale_leaves: u64,
}

/// A member's view and its traffic.
pub(crate) struct Member {
    pub(crate) view: View,
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
}

/// Where a connection's presence payloads go.
#[derive(Clone)]
pub(crate) enum ViewRef {
    /// Not kept (tracked users of the storm: only join outcomes matter).
    None,
    /// The connection's own view of its single topic (room members).
    Member(Arc<Mutex<Member>>),
    /// A node-wide view shared by observer connections; topic k holds the users `n` with
    /// `n % topics == k`. Observers are untracked, so they get no `presence_state`: the view
    /// starts empty at their join and follows the diffs.
    Group(Arc<Mutex<View>>, usize),
}

// ---------------------------------------------------------------- counters

/// What a worker's presence connections report.
pub(crate) struct PStats {
    pub(crate) conns: AtomicU64,
    pub(crate) connect_failed: AtomicU64,
    pub(crate) join_ok: AtomicU64,
    pub(crate) join_error: AtomicU64,
    pub(crate) join_timeout: AtomicU64,
    pub(crate) join_late_ok: AtomicU64,
    pub(crate) phx_error: AtomicU64,
    pub(crate) phx_close: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) frames: AtomicU64,
    pub(crate) first_sent_ns: AtomicU64,
    pub(crate) last_ok_ns: AtomicU64,
    pub(crate) first_error: Mutex<Option<String>>,
}

impl Default for PStats {
    fn default() -> Self {
        PStats {
            conns: AtomicU64::new(0),
            connect_failed: AtomicU64::new(0),
            join_ok: AtomicU64::new(0),
            join_error: AtomicU64::new(0),
            join_timeout: AtomicU64::new(0),
            join_late_ok: AtomicU64::new(0),
            phx_error: AtomicU64::new(0),
            phx_close: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            first_sent_ns: AtomicU64::new(u64::MAX),
            last_ok_ns: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }
}

impl PStats {
    fn error(&self, e: String) {
        let mut f = self.first_error.lock().unwrap();
        if f.is_none() {
            *f = Some(e);
        }
    }
}

/// One presence connection: `path` carries the `user` param or not; joins `topics` (at most
/// 100; join ref = index + 1) all at once, within `sem`'s in-flight bound until every join is
/// answered or timed out (10 s), then stays, heartbeating every 30 s.
pub(crate) async fn run_conn(
    addr: SocketAddr,
    path: String,
    topics: Vec<(String, usize)>,
    view: ViewRef,
    stats: Arc<PStats>,
    sem: Arc<Semaphore>,
) {
    let permit = sem.acquire_owned().await;
    let mut ws = match Ws::connect(addr, &path).await {
        Ok(ws) => ws,
        Err(e) => {
            stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            stats.error(format!("connect: {e}"));
            return;
        }
    };
    stats.conns.fetch_add(1, Ordering::Relaxed);
    let mut out = Vec::new();
    for (i, (t, _)) in topics.iter().enumerate() {
        crate::ws::client_frame(
            &mut out,
            1,
            format!(r#"["{0}","{0}","{t}","phx_join",{{}}]"#, i + 1).as_bytes(),
        );
    }
    stats.first_sent_ns.fetch_min(now_ns(), Ordering::Relaxed);
    if let Err(e) = ws.send_raw(&out).await {
        stats.connect_failed.fetch_add(1, Ordering::Relaxed);
        stats.error(format!("send joins: {e}"));
        return;
    }
    let mut permit = Some(permit);
    // 0 pending, 1 ok, 2 error, 3 timed out
    let mut joined = vec![0u8; topics.len()];
    let mut pending = topics.len();
    // The app pushes `presence_state` only to tracked users: observers (no user) get none, so
    // their list starts empty at the join and follows the diffs (they join before any user).
    let mut state_seen = vec![matches!(view, ViewRef::Group(..)); topics.len()];
    let mut early: Vec<Vec<Vec<u8>>> = vec![Vec::new(); topics.len()];
    let join_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let period = Duration::from_secs(30);
    let mut hb = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut last_bytes = ws.read_bytes;
    loop {
        tokio::select! {
            r = ws.fill() => {
                let alive = matches!(r, Ok(true));
                let now = now_ns();
                let (mut frames, mut closed) = (0u64, !alive);
                while let Some((op, r)) = ws.next_frame() {
                    frames += 1;
                    if op == 8 {
                        closed = true;
                        break;
                    }
                    if op != 1 {
                        continue;
                    }
                    let d = ws.data(r);
                    if *DEBUG {
                        eprintln!("frame {}", String::from_utf8_lossy(&d[..d.len().min(300)]));
                    }
                    let Some((p, payload)) = frame_parts(d) else {
                        stats.error(format!("unparsable frame {:?}", String::from_utf8_lossy(&d[..d.len().min(200)])));
                        continue;
                    };
                    let topic_idx = |p: &[Range<usize>; 4]| -> Option<usize> {
                        let jr = d.get(p[0].start + 1..p[0].end.checked_sub(1)?)?;
                        let n = std::str::from_utf8(jr).ok()?.parse::<usize>().ok()?;
                        (n >= 1 && n <= topics.len()).then(|| n - 1)
                    };
                    match &d[p[3].clone()] {
                        br#""phx_reply""# => {
                            if d[p[1].clone()] != d[p[0].clone()] {
                                continue; // heartbeat replies
                            }
                            let Some(i) = topic_idx(&p) else { continue };
                            let ok = memmem::find(&d[payload.clone()], br#""status":"ok""#).is_some();
                            match (joined[i], ok) {
                                (0, true) => {
                                    joined[i] = 1;
                                    pending -= 1;
                                    stats.join_ok.fetch_add(1, Ordering::Relaxed);
                                    stats.last_ok_ns.fetch_max(now, Ordering::Relaxed);
                                }
                                (0, false) => {
                                    joined[i] = 2;
                                    pending -= 1;
                                    stats.join_error.fetch_add(1, Ordering::Relaxed);
                                    stats.error(format!("join refused: {}", String::from_utf8_lossy(&d[payload.clone()])));
                                }
                                (3, true) => {
                                    joined[i] = 1;
                                    stats.join_late_ok.fetch_add(1, Ordering::Relaxed);
                                }
                                _ => {}
                            }
                        }
                        br#""phx_error""# => {
                            stats.phx_error.fetch_add(1, Ordering::Relaxed);
                        }
                        br#""phx_close""# => {
                            stats.phx_close.fetch_add(1, Ordering::Relaxed);
                        }
                        ev @ (br#""presence_state""# | br#""presence_diff""#) => {
                            let is_state = ev == br#""presence_state""#;
                            match &view {
                                ViewRef::None => {}
                                ViewRef::Member(m) => {
                                    let mut m = m.lock().unwrap();
                                    if is_state {
                                        let n = m.view.refs.len();
                                        m.view.state(d, payload, 0..n);
                                        for e in std::mem::take(&mut early[0]) {
                                            apply_early(&mut m.view, &e);
                                        }
                                        state_seen[0] = true;
                                    } else if state_seen[0] {
                                        m.view.diff(d, payload);
                                    } else {
                                        early[0].push(d.to_vec());
                                    }
                                }
                                ViewRef::Group(g, ntopics) => {
                                    // Broadcast diffs carry no join ref: find the topic by name.
                                    let k = if is_state {
                                        topic_idx(&p)
                                    } else {
                                        let name = d.get(p[2].start + 1..p[2].end - 1).unwrap_or_default();
                                        topics.iter().position(|(t, _)| t.as_bytes() == name)
                                    };
                                    let Some(i) = k else { continue };
                                    let k = topics[i].1;
                                    let mut g = g.lock().unwrap();
                                    if is_state {
                                        let n = g.refs.len();
                                        g.state(d, payload, (k..n).step_by((*ntopics).max(1)));
                                        for e in std::mem::take(&mut early[i]) {
                                            apply_early(&mut g, &e);
                                        }
                                        state_seen[i] = true;
                                    } else if state_seen[i] {
                                        g.diff(d, payload);
                                    } else {
                                        early[i].push(d.to_vec());
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
                let bytes = ws.read_bytes - last_bytes;
                last_bytes = ws.read_bytes;
                stats.frames.fetch_add(frames, Ordering::Relaxed);
                stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                if let ViewRef::Member(m) = &view {
                    let mut m = m.lock().unwrap();
                    m.frames += frames;
                    m.bytes += bytes;
                }
                ws.shrink();
                if pending == 0 {
                    drop(permit.take());
                }
                if closed {
                    stats.closed.fetch_add(1, Ordering::Relaxed);
                    if pending > 0 {
                        stats.join_error.fetch_add(pending as u64, Ordering::Relaxed);
                        stats.error("closed before the join reply".into());
                    }
                    return;
                }
            }
            _ = tokio::time::sleep_until(join_deadline), if pending > 0 => {
                for j in joined.iter_mut().filter(|j| **j == 0) {
                    *j = 3;
                }
                stats.join_timeout.fetch_add(pending as u64, Ordering::Relaxed);
                pending = 0;
                drop(permit.take());
            }
            _ = hb.tick() => {
                if ws.send_text(br#"[null,"hb","phoenix","heartbeat",{}]"#).await.is_err() {
                    stats.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

static DEBUG: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("FIREBRAND_BENCH_DEBUG").is_some());

/// A diff received before its topic's `presence_state`, applied after it.
fn apply_early(v: &mut View, d: &[u8]) {
    if let Some((_, payload)) = frame_parts(d) {
        v.diff(d, payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_frames_and_payloads() {
        let d = br#"["3","3","room:a","presence_state",{"u1":{"metas":[{"online_at":"1","phx_ref":"A"}]},"u2":{"metas":[{"phx_ref":"B","x":"}\"]{"}]}}]"#;
        let (p, pl) = frame_parts(d).unwrap();
        assert_eq!(&d[p[3].clone()], br#""presence_state""#);
        assert_eq!(&d[p[0].clone()], br#""3""#);
        let mut keys = Vec::new();
        each_entry(d, pl.clone(), |k, v| keys.push((k.to_vec(), ref_of(&d[v])))).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].0, b"u1");
        assert_ne!(keys[0].1, keys[1].1);
        let mut v = View::new(10, 2);
        v.state(d, pl, 0..10);
        assert_eq!(v.present(), 2);
        assert!(v.summary().reached_ns > 0);
        // An update (new ref joins, old ref leaves) keeps the user; a leave with the held ref
        // removes it; a leave of a ref not held is stale.
        let diff = br#"[null,null,"room:a","presence_diff",{"joins":{"u1":{"metas":[{"phx_ref":"C"}]}},"leaves":{"u1":{"metas":[{"phx_ref":"A"}]},"u2":{"metas":[{"phx_ref":"B"}]},"u7":{"metas":[{"phx_ref":"Z"}]},"bob":{"metas":[]}}}]"#;
        let (_, pl) = frame_parts(diff).unwrap();
        v.set_recording(true);
        v.diff(diff, pl);
        assert_eq!(v.present(), 1);
        assert_eq!(v.recorded().iter().map(|r| r.0).collect::<Vec<_>>(), [2]);
        let s = v.summary();
        assert_eq!((s.stale_leaves, s.foreign), (2, 1));
    }

    #[test]
    fn users_and_values() {
        assert_eq!(user_of(b"u0"), Some(0));
        assert_eq!(user_of(b"u56999"), Some(56999));
        assert_eq!(user_of(b"x1"), None);
        assert_eq!(user_of(b"u"), None);
        assert_eq!(skip_value(b" [1,{\"a\":[null,true]},\"x\"] ,", 0), Some(26));
        assert_eq!(skip_value(b"123,", 0), Some(3));
    }
}
