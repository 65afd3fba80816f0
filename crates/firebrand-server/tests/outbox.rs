//! The `[outbox]` through the real binary, against the real PostgreSQL (127.0.0.1:5432,
//! database `test`; or `FIREBRAND_TEST_POSTGRES_URL`): on a single node without Redis or NATS,
//! the server SIGKILLed mid-stream and restarted (clients rejoin with `since` and end with every
//! row once), PostgreSQL unreachable at start (`/ready` says why, the server serves, then
//! connects), the connection to PostgreSQL cut mid-stream (a TCP proxy reset) and PostgreSQL
//! itself restarted mid-stream, cleanly and as a crash (a PostgreSQL of the test's own: the
//! consumer reconnects and resumes, nothing lost or doubled); and three nodes of a cluster over
//! Redis and over NATS consuming one outbox. Each test has its own table, so they run in
//! parallel.

mod common;
#[allow(dead_code, unreachable_pub)]
#[path = "../../conformance/tests/common/faults.rs"]
mod faults;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{WAIT, http, spawn};
use firebrand_client::{ChannelEvent, Socket};
use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls};

fn pg_url() -> String {
    std::env::var("FIREBRAND_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// PostgreSQL's address, from [`pg_url`] (for the proxies).
fn pg_addr() -> SocketAddr {
    let config: tokio_postgres::Config = pg_url().parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => "127.0.0.1".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let host = if host == "localhost" {
        "127.0.0.1".into()
    } else {
        host
    };
    format!("{host}:{port}").parse().unwrap()
}

/// `pg_url()` through `addr` instead.
fn pg_url_at(addr: SocketAddr) -> String {
    let database = pg_url()
        .parse::<tokio_postgres::Config>()
        .unwrap()
        .get_dbname()
        .unwrap_or("test")
        .to_owned();
    format!("postgres://postgres@{addr}/{database}")
}

async fn db() -> Client {
    let (client, connection) = tokio_postgres::connect(&pg_url(), NoTls)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432, database test");
    tokio::spawn(connection);
    client
}

/// A connection to `url`, tried every 50 ms until PostgreSQL accepts it (it may be restarting).
async fn db_at(url: &str) -> Client {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        match tokio_postgres::connect(url, NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                return client;
            }
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "{url}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A fresh table `name` as the SQL creates it (and nothing of a previous run).
async fn fresh_table(db: &Client, name: &str) {
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {name}, {name}_meta, {name}_set_aside, {name}_data CASCADE;
         DROP SEQUENCE IF EXISTS {name}_seq;
         DROP FUNCTION IF EXISTS {name}_sequence() CASCADE;
         CREATE TABLE {name} (
           id         bigserial   PRIMARY KEY,
           topic      text        NOT NULL,
           event      text        NOT NULL,
           payload    jsonb       NOT NULL DEFAULT '{{}}',
           created_at timestamptz NOT NULL DEFAULT now()
         );
         CREATE TABLE {name}_data (id bigserial PRIMARY KEY, n bigint NOT NULL);"
    ))
    .await
    .unwrap();
}

/// A config file: the outbox on `table` at `url`, its topics `<table>:*` recoverable from it.
fn config(table: &str, url: &str) -> PathBuf {
    let dir = common::temp_dir(table);
    let path = dir.join("firebrand.toml");
    std::fs::write(
        &path,
        format!(
            "[outbox]\npostgres_url = \"{url}\"\ntable = \"{table}\"\npoll_ms = 500\n\n\
             [[namespace]]\nprefix = \"{table}:\"\nhistory = {{ size = 100000, max_age_ms = 600000 }}\n\
             outbox = true\n\n[[namespace]]\nprefix = \"\"\n"
        ),
    )
    .unwrap();
    path
}

/// `GET /ready`: `(status, body)`.
async fn ready(port: u16) -> (u16, Value) {
    http(port, "GET", "/ready", None, None).await
}

/// Polls `/ready` until it answers 200 (at most `within`).
async fn until_ready(port: u16, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (status, body) = ready(port).await;
        if status == 200 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready in time: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes rows until stopped: on `topics` in turn, in single-row transactions, multi-row ones
/// and transactions that also write `<table>_data` and roll back (their rows never to be
/// seen). A transaction that fails (PostgreSQL restarting) is not retried: the writer
/// reconnects and goes on. Returns the payloads' `n` committed on each topic, in commit order,
/// as `<table>_data` (written in the same transactions) says — exact even for a commit whose
/// answer was lost.
fn writer(
    url: String,
    table: String,
    topics: Vec<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<BTreeMap<String, Vec<i64>>> {
    tokio::spawn(async move {
        let mut db = db_at(&url).await;
        let insert = format!(
            "INSERT INTO {table} (topic, event, payload) VALUES ($1, 'row', jsonb_build_object('n', $2::bigint))"
        );
        let data = format!("INSERT INTO {table}_data (n) VALUES ($1)");
        let rows_of = |n: i64| -> Vec<i64> {
            if n % 5 == 0 {
                (0..3).map(|k| n * 10 + k).collect()
            } else {
                vec![n * 10]
            }
        };
        let mut pace = tokio::time::interval(Duration::from_millis(3));
        let mut n = 0i64;
        while !stop.load(Ordering::Relaxed) {
            pace.tick().await;
            n += 1;
            let topic = &topics[n as usize % topics.len()];
            let written = async {
                let tx = db.transaction().await?;
                tx.execute(&data, &[&n]).await?;
                for row in rows_of(n) {
                    tx.execute(&insert, &[topic, &row]).await?;
                }
                if n % 7 == 0 {
                    tx.rollback().await
                } else {
                    tx.commit().await
                }
            };
            if written.await.is_err() {
                db = db_at(&url).await;
            }
        }
        for topic in &topics {
            db.execute(
                &format!("INSERT INTO {table} (topic, event) VALUES ($1, 'end')"),
                &[topic],
            )
            .await
            .unwrap();
        }
        let mut committed: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for row in db
            .query(&format!("SELECT n FROM {table}_data ORDER BY n"), &[])
            .await
            .unwrap()
        {
            let n: i64 = row.get(0);
            let topic = &topics[n as usize % topics.len()];
            committed
                .entry(topic.clone())
                .or_default()
                .extend(rows_of(n));
        }
        committed
    })
}

/// What a client saw on a topic: every `row`'s `n`, and each join's `recovered`.
#[derive(Default, Debug)]
struct Seen {
    rows: Vec<i64>,
    joins: Vec<Option<bool>>,
}

/// Counters shared by the followers: channels joined, rows received.
#[derive(Default)]
struct Counts {
    joined: tokio::sync::watch::Sender<usize>,
    rows: tokio::sync::watch::Sender<usize>,
}

/// A firebrand-client socket (it reconnects, and rejoins with `since`, by itself) on `topics`
/// until each has sent `end`.
fn follower(
    url: String,
    topics: Vec<String>,
    count: Arc<Counts>,
) -> tokio::task::JoinHandle<BTreeMap<String, Seen>> {
    tokio::spawn(async move {
        let socket = Socket::builder(url)
            .reconnect_after(|_| Duration::from_millis(50))
            .jitter(0.0)
            .connect()
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut channels = Vec::new();
        for topic in &topics {
            let channel = socket.channel(topic.clone(), json!({}));
            let mut events = channel.events();
            channel.join().await.expect("joined");
            count.joined.send_modify(|c| *c += 1);
            let tx = tx.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    if tx.send((topic.clone(), event)).is_err() {
                        break;
                    }
                }
            });
            channels.push(channel);
        }
        let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
        let mut ended = 0;
        while ended < topics.len() {
            let (topic, event) = rx.recv().await.unwrap();
            let entry = seen.entry(topic).or_default();
            match &event {
                ChannelEvent::Message { event, payload } if event == "row" => {
                    entry
                        .rows
                        .push(payload.to_value().unwrap()["n"].as_i64().unwrap());
                    count.rows.send_modify(|c| *c += 1);
                }
                ChannelEvent::Message { event, .. } if event == "end" => ended += 1,
                ChannelEvent::Joined { .. } => entry.joins.push(event.recovered()),
                _ => {}
            }
        }
        socket.disconnect();
        seen
    })
}

/// Waits until `count` reaches `n`.
async fn until(count: &tokio::sync::watch::Sender<usize>, n: usize) {
    let mut rx = count.subscribe();
    tokio::time::timeout(WAIT * 3, rx.wait_for(|c| *c >= n))
        .await
        .expect("rows arrive")
        .unwrap();
}

/// Every client saw every committed row of each of its topics once, in commit order.
fn assert_every_row_once(
    committed: &BTreeMap<String, Vec<i64>>,
    clients: &[BTreeMap<String, Seen>],
) {
    for (i, client) in clients.iter().enumerate() {
        for (topic, rows) in committed {
            let seen = &client[topic];
            assert_eq!(
                seen.rows.len(),
                rows.len(),
                "client {i}, {topic}: {} rows seen, {} committed",
                seen.rows.len(),
                rows.len()
            );
            assert!(seen.rows == *rows, "client {i}, {topic}: once, in order");
        }
    }
}

/// A stream under way on the single server at `port`: `clients` followers of `<table>:a` and
/// `<table>:b`, and a writer to the database at `db_url`, once `rows` rows have arrived.
struct Streaming {
    topics: Vec<String>,
    count: Arc<Counts>,
    clients: Vec<tokio::task::JoinHandle<BTreeMap<String, Seen>>>,
    stop: Arc<AtomicBool>,
    writing: tokio::task::JoinHandle<BTreeMap<String, Vec<i64>>>,
}

async fn streaming(
    port: u16,
    table: &str,
    db_url: String,
    clients: usize,
    rows: usize,
) -> Streaming {
    let topics: Vec<String> = ["a", "b"].iter().map(|t| format!("{table}:{t}")).collect();
    let url = format!("ws://127.0.0.1:{port}/socket");
    let count = Arc::new(Counts::default());
    let followers: Vec<_> = (0..clients)
        .map(|_| follower(url.clone(), topics.clone(), count.clone()))
        .collect();
    until(&count.joined, clients * topics.len()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(db_url, table.into(), topics.clone(), stop.clone());
    until(&count.rows, rows).await;
    Streaming {
        topics,
        count,
        clients: followers,
        stop,
        writing,
    }
}

/// Stops the writer, waits for every client to see the end, and checks that each saw every
/// committed row once, in commit order: what was committed, and what each client saw.
async fn finish(
    stop: &AtomicBool,
    writing: tokio::task::JoinHandle<BTreeMap<String, Vec<i64>>>,
    clients: Vec<tokio::task::JoinHandle<BTreeMap<String, Seen>>>,
) -> (BTreeMap<String, Vec<i64>>, Vec<BTreeMap<String, Seen>>) {
    stop.store(true, Ordering::Relaxed);
    let committed = writing.await.unwrap();
    let mut seen = Vec::new();
    for client in clients {
        seen.push(
            tokio::time::timeout(WAIT * 3, client)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_every_row_once(&committed, &seen);
    (committed, seen)
}

/// The clients never left: one join each, no rejoin needed.
fn never_left(seen: &[BTreeMap<String, Seen>], topics: &[String]) {
    for client in seen {
        for topic in topics {
            assert_eq!(client[topic].joins.len(), 1, "{topic}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_server_restarts_and_clients_recover_every_row_once() {
    let table = "fb_srv_outbox_kill";
    let db = db().await;
    fresh_table(&db, table).await;
    let path = config(table, &pg_url());
    let path = path.to_str().unwrap();
    let server = spawn(&["--config", path], &[]).await;
    let port = server.port;
    until_ready(port, WAIT).await;

    let Streaming {
        topics,
        count,
        clients,
        stop,
        writing,
    } = streaming(port, table, pg_url(), 3, 150).await;

    // SIGKILL mid-stream: nothing is shut down cleanly, rows keep being committed.
    let mut server = server;
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    let at_kill = *count.rows.borrow();
    // The rows committed while no server runs are only in the table: let some be written.
    let before = db
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    loop {
        let now = db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get::<_, i64>(0);
        if now >= before + 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listen = format!("127.0.0.1:{port}");
    let restarted = spawn(&["--config", path], &[("FIREBRAND_LISTEN", &listen)]).await;
    until_ready(port, WAIT).await;
    // Rows after the restart, live, then the end.
    until(&count.rows, at_kill + 300).await;
    let (committed, seen) = finish(&stop, writing, clients).await;
    let rows: usize = committed.values().map(Vec::len).sum();
    eprintln!("{rows} rows committed, {at_kill} received (3 clients) before the SIGKILL");
    // Each channel joined, then rejoined the restarted server with `since` and recovered.
    for client in &seen {
        for topic in &topics {
            let joins = &client[topic].joins;
            assert!(joins.len() >= 2, "{topic}: rejoined: {joins:?}");
            assert!(
                joins[1..].iter().all(|r| *r == Some(true)),
                "{topic}: recovered on every rejoin: {joins:?}"
            );
        }
    }
    drop(restarted);
}

/// A TCP forwarder on `addr` to `upstream` (PostgreSQL), for the outbox unreachable at
/// start: nothing listens on `addr` until it runs.
async fn forward(addr: SocketAddr, upstream: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

#[tokio::test]
async fn unreachable_at_start_the_server_serves_and_connects_once_it_can() {
    let table = "fb_srv_outbox_late";
    let db = db().await;
    fresh_table(&db, table).await;
    // A port where nothing listens (yet).
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let path = config(table, &pg_url_at(addr));
    let server = spawn(&["--config", path.to_str().unwrap()], &[]).await;
    let port = server.port;

    // It serves: a client joins a topic outside the outbox's namespace; a join of an outbox
    // topic waits for the outbox (rows committed meanwhile could be missed) and is refused,
    // to be tried again by the client.
    let mut client = common::connect(&server.url(), None).await.open();
    let (status, _) = client.join("feed:1").await;
    assert_eq!(status, "ok");
    let topic = format!("{table}:a");
    let (status, reply) = client.join(&topic).await;
    assert_eq!(
        (status.as_str(), reply),
        ("error", json!({"reason": "outbox unavailable"}))
    );
    // And says why it is not ready.
    let (status, body) = ready(port).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["reason"], "outbox unreachable", "{body}");
    // Not yet connected: the error once the first attempt has failed.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = ready(port).await;
        if body["error"].as_str().is_some_and(|e| e != "connecting") {
            assert!(
                body["error"].as_str().unwrap().contains("connect"),
                "{body}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = http(port, "GET", "/metrics", None, None).await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("firebrand_outbox_connected 0"),
        "{metrics}"
    );

    // PostgreSQL becomes reachable: the server connects (its backoff is at most 5 s).
    let _forwarder = forward(addr, pg_addr()).await;
    until_ready(port, Duration::from_secs(15)).await;
    let (status, _) = client.join(&topic).await;
    assert_eq!(status, "ok");
    db.execute(
        &format!("INSERT INTO {table} (topic, event, payload) VALUES ($1, 'row', '{{\"n\": 1}}')"),
        &[&topic],
    )
    .await
    .unwrap();
    let frame = client.recv_event("row").await;
    assert_eq!(frame[4], json!({"n": 1}));
    assert!(frame[1].is_string(), "with a position: {frame}");
    let (_, metrics) = http(port, "GET", "/metrics", None, None).await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("firebrand_outbox_connected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("firebrand_outbox_rows_delivered_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_stream_reconnects_and_resumes_nothing_lost_or_doubled() {
    let table = "fb_srv_outbox_cut";
    let db = db().await;
    fresh_table(&db, table).await;
    let proxy = faults::Proxy::start(pg_addr()).await;
    let path = config(table, &pg_url_at(proxy.addr()));
    let server = spawn(&["--config", path.to_str().unwrap()], &[]).await;
    let port = server.port;
    until_ready(port, WAIT).await;

    let Streaming {
        topics,
        count,
        clients,
        stop,
        writing,
    } = streaming(port, table, pg_url(), 2, 100).await;

    // Cut the consumer's connection (RST both ways) three times, rows being committed.
    for cut in 1..=3u64 {
        let at = *count.rows.borrow();
        proxy.reset();
        proxy.until(WAIT, |c| c.resets >= cut && c.open >= 1).await;
        assert!(
            server.logged(&["outbox", "connection lost"]).await,
            "the cut is noticed"
        );
        until(&count.rows, at + 150).await;
    }
    let (_, seen) = finish(&stop, writing, clients).await;
    never_left(&seen, &topics);
    until_ready(port, WAIT).await;
}

/// A PostgreSQL of this test's own — `initdb` in a temp dir, on a free port — that it can
/// restart without disturbing the other tests' (127.0.0.1:5432). Its binaries: the newest
/// version under `/usr/lib/postgresql` (Debian's layout, installed by scripts/prereqs.sh) or
/// `FIREBRAND_TEST_PG_BIN`. Run as `postgres` when the test runs as root (PostgreSQL refuses
/// root). Stopped and removed when dropped.
struct OwnPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl OwnPostgres {
    fn start(name: &str) -> OwnPostgres {
        let bin = std::env::var_os("FIREBRAND_TEST_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
                    .expect(
                        "PostgreSQL's binaries in /usr/lib/postgresql (or FIREBRAND_TEST_PG_BIN)",
                    )
                    .filter_map(|e| {
                        let e = e.ok()?;
                        let version = e.file_name().to_str()?.parse().ok()?;
                        let bin = e.path().join("bin");
                        bin.join("initdb").exists().then_some((version, bin))
                    })
                    .collect();
                versions.sort();
                versions
                    .pop()
                    .expect("initdb under /usr/lib/postgresql/<version>/bin")
                    .1
            });
        let dir = std::env::temp_dir().join(format!("firebrand-pg-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = OwnPostgres { bin, dir, port };
        if as_root() {
            let status = std::process::Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&pg.dir)
                .status()
                .unwrap();
            assert!(status.success(), "chown postgres {}", pg.dir.display());
        }
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let log = pg.dir.join("log");
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            pg.dir.display()
        );
        pg.run(
            "pg_ctl",
            &[
                "-D",
                &data,
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
        pg
    }

    fn data(&self) -> String {
        self.dir.join("data").to_str().unwrap().to_owned()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart` with shutdown mode `mode` (`fast`: clients disconnected, a checkpoint;
    /// `immediate`: killed, crash recovery at start); returns once it accepts connections.
    fn restart(&self, mode: &str) {
        // With its log file again: without one, the new server would write to (and hold open)
        // pg_ctl's output, which `run` reads to its end.
        let log = self.dir.join("log");
        let log = log.to_str().unwrap();
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-l", log, "-m", mode, "-w", "restart"],
        );
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let mut command = if as_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            std::process::Command::new(&program)
        };
        let out = command
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let program = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if as_root() {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .output()
        } else {
            std::process::Command::new(&program).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether this process runs as root (`id -u`).
fn as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream_the_consumer_resumes_nothing_lost_or_doubled() {
    let table = "fb_srv_outbox_restart";
    let pg = tokio::task::spawn_blocking(|| OwnPostgres::start("restart"))
        .await
        .unwrap();
    let pg = Arc::new(pg);
    fresh_table(&db_at(&pg.url()).await, table).await;
    let path = config(table, &pg.url());
    let server = spawn(&["--config", path.to_str().unwrap()], &[]).await;
    let port = server.port;
    until_ready(port, WAIT).await;

    let Streaming {
        topics,
        count,
        clients,
        stop,
        writing,
    } = streaming(port, table, pg.url(), 2, 100).await;

    // Restart PostgreSQL twice while rows are being committed: cleanly (`fast`), then as a
    // crash (`immediate`: the server killed, crash recovery at start). The consumer's
    // connection ends each time; it connects again and resumes.
    let lost = || {
        server
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains("outbox: connection lost"))
            .count()
    };
    for (i, mode) in ["fast", "immediate"].into_iter().enumerate() {
        let at = *count.rows.borrow();
        let restarting = pg.clone();
        tokio::task::spawn_blocking(move || restarting.restart(mode))
            .await
            .unwrap();
        until(&count.rows, at + 150).await;
        assert!(lost() > i, "the restart ({mode}) was noticed");
    }
    let (committed, seen) = finish(&stop, writing, clients).await;
    never_left(&seen, &topics);
    until_ready(port, WAIT).await;
    let rows: usize = committed.values().map(Vec::len).sum();
    eprintln!("{rows} rows committed across two restarts of PostgreSQL");
}

/// Three nodes of one cluster (over the engine at `url`, `var` being `REDIS_URL` or
/// `NATS_URL`) consume one outbox: each delivers every row to its own subscribers, so every
/// client on every node sees every committed row once, in commit order, and with the same
/// position on every node (the table is the topic's history); a client that saw rows on one
/// node rejoins on another with `since` and recovers exactly what followed.
async fn three_nodes_consume_one_outbox(name: &str, var: &str, url: &str) {
    let table = format!("fb_srv_outbox_{name}");
    let db = db().await;
    fresh_table(&db, &table).await;
    let path = config(&table, &pg_url());
    let namespace = format!("firebrand-test-{}-{name}", std::process::id());
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(
            spawn(
                &["--config", path.to_str().unwrap()],
                &[(var, url), ("FIREBRAND_CLUSTER_NAMESPACE", &namespace)],
            )
            .await,
        );
    }
    for node in &nodes {
        until_ready(node.port, WAIT).await;
    }

    let topics: Vec<String> = ["a", "b"].iter().map(|t| format!("{table}:{t}")).collect();
    let count = Arc::new(Counts::default());
    let clients: Vec<_> = nodes
        .iter()
        .map(|node| {
            let url = format!("ws://127.0.0.1:{}/socket", node.port);
            follower(url, topics.clone(), count.clone())
        })
        .collect();
    // And two that look at the frames themselves, on nodes 1 and 3.
    let mut raw = Vec::new();
    for node in [&nodes[0], &nodes[2]] {
        let mut client = common::connect(&node.url(), None).await.open();
        assert_eq!(client.join(&topics[0]).await.0, "ok");
        raw.push(client);
    }
    until(&count.joined, 6).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(pg_url(), table.clone(), topics.clone(), stop.clone());

    // The same rows with the same positions on nodes 1 and 3.
    let mut frames = Vec::new();
    for client in &mut raw {
        let mut rows = Vec::new();
        for _ in 0..30 {
            let frame = client.recv_event("row").await;
            assert!(frame[1].is_string(), "with a position: {frame}");
            rows.push((frame[1].clone(), frame[4].clone()));
        }
        frames.push(rows);
    }
    assert_eq!(
        frames[0], frames[1],
        "the same rows and positions on two nodes"
    );
    drop(raw);
    // A client that saw the first 10 on node 1 rejoins on node 2 with the 10th's position:
    // recovered, and the 11th to the 30th follow, once, in order.
    let mut moved = common::connect(&nodes[1].url(), None).await.open();
    let (status, reply) = moved
        .join_with(&topics[0], json!({"since": frames[0][9].0}))
        .await;
    assert_eq!(
        (status.as_str(), &reply["recovered"]),
        ("ok", &json!(true)),
        "{reply}"
    );
    for expected in &frames[0][10..] {
        let frame = moved.recv_event("row").await;
        assert_eq!((&frame[1], &frame[4]), (&expected.0, &expected.1));
    }
    drop(moved);

    until(&count.rows, 600).await;
    let (committed, _) = finish(&stop, writing, clients).await;
    let rows: usize = committed.values().map(Vec::len).sum();
    eprintln!("{name}: {rows} rows, each once on each of 3 nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_redis_consume_one_outbox() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    three_nodes_consume_one_outbox("redis3", "REDIS_URL", &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_nats_consume_one_outbox() {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    three_nodes_consume_one_outbox("nats3", "NATS_URL", &url).await;
}
