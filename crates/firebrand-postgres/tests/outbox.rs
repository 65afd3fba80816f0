//! The outbox against the real PostgreSQL (127.0.0.1:5432, database `test`; or
//! `FIREBRAND_TEST_POSTGRES_URL`). Each test has its own table, so they run in parallel.

use std::time::Duration;

use firebrand::{Broadcast, Endpoint, Subscription};
use firebrand_postgres::{Outbox, Running};
use tokio_postgres::{Client, NoTls};

fn url() -> String {
    std::env::var("FIREBRAND_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// How long a test waits for an event before it fails (never a stand-in for one).
const WAIT: Duration = Duration::from_secs(10);

async fn connect() -> Client {
    let (client, connection) = tokio_postgres::connect(&url(), NoTls)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432, database test");
    tokio::spawn(connection);
    client
}

/// A fresh table `name` as the SQL creates it (and nothing of a previous run).
async fn fresh_table(db: &Client, name: &str) {
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {name}, {name}_meta, {name}_set_aside CASCADE;
         DROP SEQUENCE IF EXISTS {name}_seq;
         DROP FUNCTION IF EXISTS {name}_sequence() CASCADE;
         CREATE TABLE {name} (
           id         bigserial   PRIMARY KEY,
           topic      text        NOT NULL,
           event      text        NOT NULL,
           payload    jsonb       NOT NULL DEFAULT '{{}}',
           created_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await
    .unwrap();
}

/// A node: an endpoint whose `<table>:*` topics have the table as history, and its consumer,
/// connected.
async fn node(table: &str, outbox: Outbox) -> (Endpoint, Running) {
    let endpoint = Endpoint::builder()
        .history_source(
            &format!("{table}:*"),
            1000,
            Duration::from_secs(300),
            outbox.source(),
        )
        .build();
    let running = outbox.start(&endpoint);
    tokio::time::timeout(WAIT, running.connected())
        .await
        .expect("the outbox connects");
    (endpoint, running)
}

async fn insert(db: &Client, table: &str, topic: &str, event: &str, n: i64) {
    db.execute(
        &format!(
            "INSERT INTO {table} (topic, event, payload) VALUES ($1, $2, jsonb_build_object('n', $3::bigint))"
        ),
        &[&topic, &event, &n],
    )
    .await
    .unwrap();
}

async fn next(sub: &mut Subscription) -> Broadcast {
    tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("a broadcast within the wait")
        .expect("no lag")
}

fn n(b: &Broadcast) -> i64 {
    b.payload().to_value().unwrap()["n"].as_i64().unwrap()
}

#[tokio::test]
async fn committed_rows_are_delivered_once_in_order_and_rolled_back_ones_never() {
    let table = "fb_outbox_once";
    let db = connect().await;
    fresh_table(&db, table).await;
    let (endpoint, running) = node(table, Outbox::new(url()).table(table)).await;
    let topic = format!("{table}:a");
    let mut sub = endpoint.subscribe(&topic, 4096);

    // Single-row transactions, a multi-row one, and a rolled-back one in between.
    for i in 1..=20 {
        insert(&db, table, &topic, "row", i).await;
    }
    db.batch_execute(&format!(
        "BEGIN; INSERT INTO {table} (topic, event, payload) VALUES ('{topic}', 'row', '{{\"n\": -1}}'); ROLLBACK;"
    ))
    .await
    .unwrap();
    db.batch_execute(&format!(
        "BEGIN; INSERT INTO {table} (topic, event, payload)
           SELECT '{topic}', 'row', jsonb_build_object('n', g) FROM generate_series(21, 40) g;
         COMMIT;"
    ))
    .await
    .unwrap();
    insert(&db, table, &topic, "marker", 41).await;

    let mut last: Option<String> = None;
    for want in 1..=41 {
        let b = next(&mut sub).await;
        assert_eq!(
            n(&b),
            want,
            "in commit order, none missing, none rolled back"
        );
        let position = b
            .position()
            .expect("a recoverable topic's row has a position");
        assert_ne!(Some(position), last.as_deref());
        last = Some(position.to_owned());
    }
    assert_eq!(running.stats().delivered, 41);
    assert!(sub.try_recv().is_none(), "nothing after the marker");
}

#[tokio::test]
async fn the_gap_a_row_with_a_smaller_id_that_commits_later_is_delivered_after() {
    let table = "fb_outbox_gap";
    let db = connect().await;
    fresh_table(&db, table).await;
    let (endpoint, _running) = node(table, Outbox::new(url()).table(table)).await;
    let topic = format!("{table}:a");
    let mut sub = endpoint.subscribe(&topic, 64);

    // A inserts first (the smaller id) and stays open; B inserts and commits.
    let a = connect().await;
    a.batch_execute("BEGIN").await.unwrap();
    let id_a: i64 = a
        .query_one(
            &format!("INSERT INTO {table} (topic, event, payload) VALUES ($1, 'a', '{{\"n\": 1}}') RETURNING id"),
            &[&topic],
        )
        .await
        .unwrap()
        .get(0);
    let id_b: i64 = db
        .query_one(
            &format!("INSERT INTO {table} (topic, event, payload) VALUES ($1, 'b', '{{\"n\": 2}}') RETURNING id"),
            &[&topic],
        )
        .await
        .unwrap()
        .get(0);
    assert!(id_a < id_b);
    // B is delivered while A is still open: a consumer reading `id > last` would now be past
    // A's id for ever.
    assert_eq!(next(&mut sub).await.event(), "b");
    a.batch_execute("COMMIT").await.unwrap();
    let late = next(&mut sub).await;
    assert_eq!(
        late.event(),
        "a",
        "A is not skipped: delivered after B, in commit order"
    );

    // Its position is after B's: a client that saw B and rejoins gets A.
    insert(&db, table, &topic, "c", 3).await;
    assert_eq!(next(&mut sub).await.event(), "c");
}

#[tokio::test]
async fn concurrent_writers_each_row_once_in_position_order() {
    let table = "fb_outbox_concurrent";
    let db = connect().await;
    fresh_table(&db, table).await;
    let (endpoint, running) = node(table, Outbox::new(url()).table(table).batch(64)).await;
    let topic = format!("{table}:a");
    let mut sub = endpoint.subscribe(&topic, 8192);

    let (writers, each) = (8i64, 40i64);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            let db = connect().await;
            for i in 0..each {
                insert(&db, table, &topic, "row", w * 1000 + i).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    let mut per_writer = vec![-1i64; writers as usize];
    for _ in 0..writers * each {
        let b = next(&mut sub).await;
        let v = n(&b);
        assert!(seen.insert(v), "row {v} twice");
        // One writer's rows commit one after the other: delivered in that order.
        let (w, i) = ((v / 1000) as usize, v % 1000);
        assert!(i > per_writer[w], "writer {w}: {i} after {}", per_writer[w]);
        per_writer[w] = i;
    }
    assert_eq!(running.stats().delivered, (writers * each) as u64);
}

#[tokio::test]
async fn a_bad_row_is_set_aside_with_its_reason_and_the_next_is_delivered() {
    let table = "fb_outbox_bad";
    let db = connect().await;
    fresh_table(&db, table).await;
    let outbox = Outbox::new(url()).table(table).max_payload(64);
    let (endpoint, running) = node(table, outbox).await;
    let topic = format!("{table}:a");
    let mut sub = endpoint.subscribe(&topic, 64);

    insert(&db, table, "", "row", 1).await;
    insert(&db, table, &topic, "phx_reply", 2).await;
    insert(&db, table, &topic, "chan_reply_7", 3).await;
    db.execute(
        &format!("INSERT INTO {table} (topic, event, payload) VALUES ($1, 'row', jsonb_build_object('n', 4, 'pad', repeat('x', 100)))"),
        &[&topic],
    )
    .await
    .unwrap();
    insert(&db, table, &topic, "row", 5).await;

    let b = next(&mut sub).await;
    assert_eq!(
        (b.event(), n(&b)),
        ("row", 5),
        "the good row after the bad ones"
    );
    let stats = running.stats();
    assert_eq!((stats.set_aside, stats.delivered), (4, 1));
    let reasons: Vec<String> = db
        .query(
            &format!("SELECT reason FROM {table}_set_aside ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        reasons,
        [
            "empty topic",
            "reserved event",
            "reserved event",
            "payload too large"
        ]
    );
}

#[tokio::test]
async fn a_restarted_consumer_delivers_nothing_twice_and_rejoins_recover_from_the_table() {
    let table = "fb_outbox_restart";
    let db = connect().await;
    fresh_table(&db, table).await;
    let topic = format!("{table}:a");

    // The first server: rows 1-3 delivered live.
    let (endpoint, running) = node(table, Outbox::new(url()).table(table)).await;
    let mut sub = endpoint.subscribe(&topic, 64);
    for i in 1..=3 {
        insert(&db, table, &topic, "row", i).await;
    }
    let mut seen = Vec::new();
    for _ in 1..=3 {
        seen.push(next(&mut sub).await);
    }
    let since = seen[2].position().unwrap().to_owned();
    // Gone (as if killed); rows 4-5 commit while no server runs.
    drop((sub, running, endpoint));
    insert(&db, table, &topic, "row", 4).await;
    insert(&db, table, &topic, "row", 5).await;

    // The second server: a new endpoint (an empty ring), the same table.
    let (endpoint, running) = node(table, Outbox::new(url()).table(table)).await;
    let mut sub = endpoint.subscribe(&topic, 64);
    insert(&db, table, &topic, "row", 6).await;
    let live = next(&mut sub).await;
    assert_eq!(n(&live), 6, "only rows committed after the start are live");
    assert_eq!(running.stats().delivered, 1, "nothing handed twice");

    // A client that saw row 3 rejoins with its position: rows 4, 5 and 6, once each, read
    // from the table (the ring starts at 6).
    let page = endpoint.history(&topic, Some(&since)).await.unwrap();
    assert_eq!(page.recovered, Some(true));
    let got: Vec<i64> = page.broadcasts.iter().map(n).collect();
    assert_eq!(got, [4, 5, 6]);
    assert_eq!(
        page.broadcasts[2].position(),
        live.position(),
        "same position live and read"
    );
    assert_eq!(page.position.as_deref(), live.position());

    // From the live row's position: nothing.
    let page = endpoint.history(&topic, live.position()).await.unwrap();
    assert_eq!(page.recovered, Some(true));
    assert!(page.broadcasts.is_empty());

    // A position of another table's epoch is not recovered.
    let other = "fb_outbox_restart_other";
    fresh_table(&db, other).await;
    let (endpoint2, _r2) = node(other, Outbox::new(url()).table(other)).await;
    let other_topic = format!("{other}:a");
    let mut sub2 = endpoint2.subscribe(&other_topic, 8);
    insert(&db, other, &other_topic, "row", 1).await;
    let b = next(&mut sub2).await;
    drop((sub2, endpoint2));
    db.batch_execute(&format!("DROP TABLE {other}_meta"))
        .await
        .unwrap();
    let (endpoint3, _r3) = node(other, Outbox::new(url()).table(other)).await;
    let page = endpoint3.history(&other_topic, b.position()).await.unwrap();
    assert_eq!(page.recovered, Some(false), "a new epoch: not recovered");
}

#[tokio::test]
async fn two_nodes_on_one_table_each_deliver_every_row_once_at_the_same_positions() {
    let table = "fb_outbox_two_nodes";
    let db = connect().await;
    fresh_table(&db, table).await;
    let topic = format!("{table}:a");
    let (a, _ra) = node(table, Outbox::new(url()).table(table)).await;
    let (b, _rb) = node(table, Outbox::new(url()).table(table)).await;
    let (mut sub_a, mut sub_b) = (a.subscribe(&topic, 256), b.subscribe(&topic, 256));
    for i in 1..=30 {
        insert(&db, table, &topic, "row", i).await;
    }
    insert(&db, table, &topic, "marker", 31).await;
    for want in 1..=31 {
        let (x, y) = (next(&mut sub_a).await, next(&mut sub_b).await);
        assert_eq!((n(&x), n(&y)), (want, want));
        assert_eq!(
            x.position(),
            y.position(),
            "a position means the same on every node"
        );
    }
    assert!(sub_a.try_recv().is_none() && sub_b.try_recv().is_none());
    // A client that saw row 10 on node A rejoins on node B: rows 11-31.
    let since = {
        let page = a.history(&topic, None).await.unwrap();
        page.broadcasts[9].position().unwrap().to_owned()
    };
    let page = b.history(&topic, Some(&since)).await.unwrap();
    assert_eq!(page.recovered, Some(true));
    assert_eq!(
        page.broadcasts.iter().map(n).collect::<Vec<_>>(),
        (11..=31).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn rows_committed_before_the_first_start_are_history_not_news() {
    let table = "fb_outbox_before";
    let db = connect().await;
    fresh_table(&db, table).await;
    let topic = format!("{table}:a");
    // Inserted before anything was installed: no seq yet.
    insert(&db, table, &topic, "row", 1).await;
    insert(&db, table, &topic, "row", 2).await;
    let (endpoint, running) = node(table, Outbox::new(url()).table(table)).await;
    let mut sub = endpoint.subscribe(&topic, 8);
    insert(&db, table, &topic, "row", 3).await;
    assert_eq!(n(&next(&mut sub).await), 3);
    assert_eq!(running.stats().delivered, 1);
    // Given a seq at install, in id order: read back as the topic's history.
    let page = endpoint.history(&topic, None).await.unwrap();
    assert_eq!(page.broadcasts.iter().map(n).collect::<Vec<_>>(), [1, 2, 3]);
}

#[tokio::test]
async fn the_janitor_deletes_expired_rows_and_rejoins_from_before_them_are_not_recovered() {
    let table = "fb_outbox_janitor";
    let db = connect().await;
    fresh_table(&db, table).await;
    let topic = format!("{table}:a");
    let outbox = || {
        Outbox::new(url())
            .table(table)
            .retention(Duration::from_millis(400))
            .poll(Duration::from_millis(50))
    };
    let (endpoint, running) = node(table, outbox()).await;
    let mut sub = endpoint.subscribe(&topic, 64);
    for i in 1..=3 {
        insert(&db, table, &topic, "row", i).await;
    }
    let mut seen = Vec::new();
    for _ in 1..=3 {
        seen.push(next(&mut sub).await);
    }

    // The rows expire: the janitor deletes them (every 200 ms here, half the retention).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left: i64 = db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{left} rows left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop((sub, running, endpoint));

    // A restarted node (an empty ring: only the table to read from).
    let (endpoint, _running) = node(table, outbox()).await;
    let mut sub = endpoint.subscribe(&topic, 64);
    // From row 1: rows 2 and 3 are gone, so not recovered (nothing replayed).
    let page = endpoint.history(&topic, seen[0].position()).await.unwrap();
    assert_eq!(page.recovered, Some(false));
    assert!(page.broadcasts.is_empty());
    // From row 3, the last: nothing was missed, the deletion notwithstanding.
    let page = endpoint.history(&topic, seen[2].position()).await.unwrap();
    assert_eq!(page.recovered, Some(true));
    assert!(page.broadcasts.is_empty());
    // And the rows after it still arrive, and are recovered from it.
    insert(&db, table, &topic, "row", 4).await;
    let live = next(&mut sub).await;
    assert_eq!(n(&live), 4);
    let page = endpoint.history(&topic, seen[2].position()).await.unwrap();
    assert_eq!(page.recovered, Some(true));
    assert_eq!(page.broadcasts.iter().map(n).collect::<Vec<_>>(), [4]);
}
