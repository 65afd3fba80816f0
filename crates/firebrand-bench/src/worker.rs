//! Load-generator worker processes. One process may hold at most ~19,000 connections (20,000
//! open files), so the cluster scenarios spread their clients over workers: the coordinator
//! starts `firebrand-bench worker` children, each with its own source addresses and the
//! coordinator's clock epoch, and drives them line by line (one command on stdin, one reply line
//! on stdout). A worker exits when its stdin closes.
//!
//! Commands (replies in parentheses):
//! - `subs ADDR N TOPIC CONC`: N subscribers of TOPIC that record delivery latency (`ok`)
//! - `status` (`status JOINED FAILED CLOSED DELIVERED LAST_NS`), `hist` (`hist SPARSE`), `reset`
//! - `users FIRST COUNT NTOPICS PREFIX VIEW TARGET CONC ADDRS`: users `u<FIRST>`… each on its
//!   own connection to `ADDRS[n % len]`, joining `PREFIX<n % NTOPICS>` (or `PREFIX` when NTOPICS
//!   is 0); VIEW `member` keeps each one's own presence view over TARGET users, `none` not (`ok`)
//! - `observe GROUP USERS NTOPICS PREFIX TARGET ADDR`: untracked connections joining every topic
//!   (100 per connection), keeping one shared view over USERS users (`ok`)
//! - `pstatus` (one JSON line), `record GROUP on|off`, `leaves GROUP` (JSON `[[user, ns], …]`)
//! - `close`: drops every connection (`ok`)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::presence::{GroupStatus, Member, PStats, View, ViewRef, run_conn};
use crate::stats::{EPOCH_ENV, Hist, epoch_ns};
use crate::ws::{DEFLATE_ENV, SOURCE_ENV};
use crate::{Subs, parse};

/// A worker's presence counters, as sent to the coordinator.
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub(crate) struct PStatus {
    pub(crate) conns: u64,
    pub(crate) connect_failed: u64,
    pub(crate) join_ok: u64,
    pub(crate) join_error: u64,
    pub(crate) join_timeout: u64,
    pub(crate) join_late_ok: u64,
    pub(crate) phx_error: u64,
    pub(crate) phx_close: u64,
    pub(crate) closed: u64,
    pub(crate) bytes: u64,
    pub(crate) frames: u64,
    pub(crate) first_sent_ns: u64,
    pub(crate) last_ok_ns: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) groups: BTreeMap<u32, GroupStatus>,
    pub(crate) members: u64,
    /// Members whose view holds exactly their target users and nothing else.
    pub(crate) members_complete: u64,
    pub(crate) member_present_min: u64,
    pub(crate) member_reached_max_ns: u64,
    pub(crate) member_frames_max: u64,
    pub(crate) member_frames_sum: u64,
    pub(crate) member_bytes_sum: u64,
    pub(crate) member_foreign: u64,
    pub(crate) member_stale_leaves: u64,
}

impl PStatus {
    /// Sums the counters of several workers (groups are merged by id; times take the extreme).
    pub(crate) fn add(&mut self, o: &PStatus) {
        self.conns += o.conns;
        self.connect_failed += o.connect_failed;
        self.join_ok += o.join_ok;
        self.join_error += o.join_error;
        self.join_timeout += o.join_timeout;
        self.join_late_ok += o.join_late_ok;
        self.phx_error += o.phx_error;
        self.phx_close += o.phx_close;
        self.closed += o.closed;
        self.bytes += o.bytes;
        self.frames += o.frames;
        if o.first_sent_ns != u64::MAX && o.first_sent_ns != 0 {
            self.first_sent_ns = if self.first_sent_ns == 0 {
                o.first_sent_ns
            } else {
                self.first_sent_ns.min(o.first_sent_ns)
            };
        }
        self.last_ok_ns = self.last_ok_ns.max(o.last_ok_ns);
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
        for (k, g) in &o.groups {
            self.groups.insert(*k, g.clone());
        }
        if o.members > 0 {
            self.member_present_min = if self.members == 0 {
                o.member_present_min
            } else {
                self.member_present_min.min(o.member_present_min)
            };
        }
        self.members += o.members;
        self.members_complete += o.members_complete;
        self.member_reached_max_ns = self.member_reached_max_ns.max(o.member_reached_max_ns);
        self.member_frames_max = self.member_frames_max.max(o.member_frames_max);
        self.member_frames_sum += o.member_frames_sum;
        self.member_bytes_sum += o.member_bytes_sum;
        self.member_foreign += o.member_foreign;
        self.member_stale_leaves += o.member_stale_leaves;
    }
}

// ---------------------------------------------------------------- the worker process

#[derive(Default)]
struct State {
    subs: Vec<Subs>,
    pstats: Arc<PStats>,
    groups: BTreeMap<u32, Arc<Mutex<View>>>,
    members: Vec<Arc<Mutex<Member>>>,
    tasks: JoinSet<()>,
}

fn addr(s: &str) -> anyhow::Result<SocketAddr> {
    s.parse().with_context(|| format!("bad address {s:?}"))
}

impl State {
    async fn handle(&mut self, line: &str) -> anyhow::Result<String> {
        let a: Vec<&str> = line.split_whitespace().collect();
        match a.as_slice() {
            ["subs", ad, n, topic, conc] => {
                let mut o = parse(&[])?;
                o.concurrency = conc.parse()?;
                let topic = topic.to_string();
                self.subs
                    .push(Subs::spawn(addr(ad)?, n.parse()?, |_| topic.clone(), &o));
                Ok("ok".into())
            }
            ["status"] => {
                let (mut j, mut f, mut c, mut d, mut last) = (0, 0, 0, 0, 0);
                for s in &self.subs {
                    j += s.sink.joined.load(Ordering::Relaxed);
                    f += s.sink.failed.load(Ordering::Relaxed);
                    c += s.sink.closed.load(Ordering::Relaxed);
                    d += s.sink.delivered.load(Ordering::Relaxed);
                    last = s.sink.last_ns.load(Ordering::Relaxed).max(last);
                }
                Ok(format!("status {j} {f} {c} {d} {last}"))
            }
            ["hist"] => {
                let mut h = Hist::default();
                for s in &self.subs {
                    let part = s.collect().await;
                    h.merge_sparse(&part.to_sparse()).context("hist")?;
                }
                Ok(format!("hist {}", h.to_sparse()))
            }
            ["reset"] => {
                for s in &self.subs {
                    s.sink.reset();
                }
                Ok("ok".into())
            }
            [
                "users",
                first,
                count,
                ntopics,
                prefix,
                view,
                target,
                conc,
                addrs,
            ] => {
                let (first, count): (usize, usize) = (first.parse()?, count.parse()?);
                let ntopics: usize = ntopics.parse()?;
                let target: u64 = target.parse()?;
                let addrs: Vec<SocketAddr> =
                    addrs.split(',').map(addr).collect::<anyhow::Result<_>>()?;
                let sem = Arc::new(Semaphore::new(conc.parse()?));
                for n in first..first + count {
                    let (topic, k) = if ntopics == 0 {
                        (prefix.to_string(), 0)
                    } else {
                        (format!("{prefix}{}", n % ntopics), n % ntopics)
                    };
                    let v = match *view {
                        "member" => {
                            let m = Arc::new(Mutex::new(Member {
                                view: View::new(target as usize, target),
                                frames: 0,
                                bytes: 0,
                            }));
                            self.members.push(m.clone());
                            ViewRef::Member(m)
                        }
                        "none" => ViewRef::None,
                        other => bail!("unknown view {other:?}"),
                    };
                    self.tasks.spawn(run_conn(
                        addrs[n % addrs.len()],
                        format!("/socket/websocket?vsn=2.0.0&user=u{n}"),
                        vec![(topic, k)],
                        v,
                        self.pstats.clone(),
                        sem.clone(),
                    ));
                }
                Ok("ok".into())
            }
            ["observe", group, users, ntopics, prefix, target, ad] => {
                let ntopics: usize = ntopics.parse()?;
                let g = Arc::new(Mutex::new(View::new(users.parse()?, target.parse()?)));
                self.groups.insert(group.parse()?, g.clone());
                let sem = Arc::new(Semaphore::new(64));
                let topics: Vec<(String, usize)> =
                    (0..ntopics).map(|k| (format!("{prefix}{k}"), k)).collect();
                for chunk in topics.chunks(100) {
                    self.tasks.spawn(run_conn(
                        addr(ad)?,
                        "/socket/websocket?vsn=2.0.0".into(),
                        chunk.to_vec(),
                        ViewRef::Group(g.clone(), ntopics),
                        self.pstats.clone(),
                        sem.clone(),
                    ));
                }
                Ok("ok".into())
            }
            ["pstatus"] => Ok(serde_json::to_string(&self.pstatus())?),
            ["record", group, on] => {
                let g = self.groups.get(&group.parse()?).context("no such group")?;
                g.lock().unwrap().set_recording(*on == "on");
                Ok("ok".into())
            }
            ["leaves", group] => {
                let g = self.groups.get(&group.parse()?).context("no such group")?;
                let r = g.lock().unwrap().recorded();
                Ok(serde_json::to_string(&r)?)
            }
            ["close"] => {
                self.subs.clear();
                self.tasks.abort_all();
                while self.tasks.join_next().await.is_some() {}
                self.members.clear();
                self.groups.clear();
                self.pstats = Arc::default();
                Ok("ok".into())
            }
            _ => bail!("unknown command {line:?}"),
        }
    }

    fn pstatus(&self) -> PStatus {
        let s = &self.pstats;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut p = PStatus {
            conns: l(&s.conns),
            connect_failed: l(&s.connect_failed),
            join_ok: l(&s.join_ok),
            join_error: l(&s.join_error),
            join_timeout: l(&s.join_timeout),
            join_late_ok: l(&s.join_late_ok),
            phx_error: l(&s.phx_error),
            phx_close: l(&s.phx_close),
            closed: l(&s.closed),
            bytes: l(&s.bytes),
            frames: l(&s.frames),
            first_sent_ns: l(&s.first_sent_ns),
            last_ok_ns: l(&s.last_ok_ns),
            first_error: s.first_error.lock().unwrap().clone(),
            groups: self
                .groups
                .iter()
                .map(|(k, g)| (*k, g.lock().unwrap().summary()))
                .collect(),
            members: self.members.len() as u64,
            member_present_min: u64::MAX,
            ..PStatus::default()
        };
        for m in &self.members {
            let m = m.lock().unwrap();
            let v = m.view.summary();
            if v.present == v.target && v.foreign == 0 {
                p.members_complete += 1;
                p.member_reached_max_ns = p.member_reached_max_ns.max(v.reached_ns);
            }
            p.member_present_min = p.member_present_min.min(v.present);
            p.member_frames_max = p.member_frames_max.max(m.frames);
            p.member_frames_sum += m.frames;
            p.member_bytes_sum += m.bytes;
            p.member_foreign += v.foreign;
            p.member_stale_leaves += v.stale_leaves;
        }
        if self.members.is_empty() {
            p.member_present_min = 0;
        }
        p
    }
}

/// The worker process: commands on stdin, replies on stdout; ends when stdin closes.
pub(crate) async fn run() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let mut st = State::default();
    while let Some(line) = lines.next_line().await? {
        let reply = match st.handle(&line).await {
            Ok(r) => r,
            Err(e) => format!("err {e:#}"),
        };
        out.write_all(reply.as_bytes()).await?;
        out.write_all(b"\n").await?;
        out.flush().await?;
    }
    Ok(())
}

// ---------------------------------------------------------------- the coordinator's handle

/// A worker child process (killed when dropped).
pub(crate) struct Worker {
    pub(crate) pid: u32,
    _child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    /// Starts worker `id` with source addresses 127.`id+1`.`salt`.x.
    pub(crate) fn spawn(id: usize, salt: u8) -> anyhow::Result<Worker> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("worker")
            .env(EPOCH_ENV, epoch_ns().to_string())
            .env(SOURCE_ENV, format!("{}.{salt}", id + 1))
            .env(
                DEFLATE_ENV,
                if crate::ws::offers_deflate() { "1" } else { "" },
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a worker")?;
        Ok(Worker {
            pid: child.id().unwrap_or(0),
            stdin: child.stdin.take().context("worker stdin")?,
            lines: BufReader::new(child.stdout.take().context("worker stdout")?).lines(),
            _child: child,
        })
    }

    /// Sends one command and returns its reply (an `err …` reply is an error).
    pub(crate) async fn cmd(&mut self, line: &str) -> anyhow::Result<String> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        let reply = tokio::time::timeout(Duration::from_secs(120), self.lines.next_line())
            .await
            .with_context(|| format!("worker {} did not answer {line:?}", self.pid))??
            .with_context(|| format!("worker {} exited", self.pid))?;
        if let Some(e) = reply.strip_prefix("err ") {
            bail!("worker {}: {e} (command {line:?})", self.pid);
        }
        Ok(reply)
    }

    pub(crate) async fn pstatus(&mut self) -> anyhow::Result<PStatus> {
        Ok(serde_json::from_str(&self.cmd("pstatus").await?)?)
    }
}

/// The summed `pstatus` of several workers.
pub(crate) async fn pstatus_all(ws: &mut [Worker]) -> anyhow::Result<PStatus> {
    let mut p = PStatus::default();
    for w in ws {
        p.add(&w.pstatus().await?);
    }
    Ok(p)
}
