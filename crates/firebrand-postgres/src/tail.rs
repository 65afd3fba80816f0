//! The consumer's task: connects, installs, then hands every committed row to the endpoint in
//! `seq` order, woken by `NOTIFY` and by a poll; connects again when the connection is lost.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use firebrand::{Endpoint, Payload, RawJson};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::{Outbox, Shared};

/// How often expired rows are deleted and rows without a `seq` given one (or every half of the
/// retention, when that is shorter).
const JANITOR_EVERY: Duration = Duration::from_secs(10);
/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where the consumer is: the table's epoch and the last `seq` handed (kept across
/// reconnects, so rows committed meanwhile are handed once connected again).
#[derive(Default)]
struct Cursor {
    epoch: Option<u64>,
    seq: u64,
}

/// The consumer's task: sessions, one per connection, until dropped.
pub(crate) async fn run(outbox: Outbox, endpoint: Endpoint, shared: Arc<Shared>) {
    let mut cursor = Cursor::default();
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let Err(e) = session(&outbox, &endpoint, &shared, &mut cursor).await;
        shared.set_connected(false);
        tracing::warn!(table = %outbox.names.plain, error = %e, "outbox: connection lost or refused; connecting again");
        if let Ok(mut error) = shared.error.lock() {
            *error = Some(e.to_string());
        }
        if started.elapsed() > MAX_BACKOFF {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Aborts the connection's task when the session ends.
struct Driver(tokio::task::JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connection's life: returns only with the error that ended it.
async fn session(
    outbox: &Outbox,
    endpoint: &Endpoint,
    shared: &Shared,
    cursor: &mut Cursor,
) -> Result<std::convert::Infallible, tokio_postgres::Error> {
    let names = &outbox.names;
    let (mut client, mut connection) = tokio_postgres::connect(&outbox.url, NoTls).await?;
    // Wake-ups: a NOTIFY on the table's channel, or the connection's end (the next query
    // then fails and the session ends).
    let wake = Arc::new(Notify::new());
    let woken = wake.clone();
    let _driver = Driver(tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(_) = message {
                woken.notify_one();
            }
        }
        woken.notify_one();
    }));

    install(&mut client, outbox).await?;
    client
        .batch_execute(&format!("LISTEN {}", names.channel))
        .await?;
    let row = client.query_one(&names.epoch_and_top(), &[]).await?;
    let epoch = row.get::<_, i64>(0) as u64;
    if cursor.epoch != Some(epoch) {
        // A first start, or a table recreated: what is there already is history, not news.
        cursor.epoch = Some(epoch);
        cursor.seq = row.get::<_, i64>(1).max(0) as u64;
    }
    shared.cursor.store(cursor.seq, Ordering::Relaxed);
    shared.set_connected(true);
    if let Ok(mut error) = shared.error.lock() {
        *error = None;
    }
    tracing::info!(table = %names.plain, epoch, seq = cursor.seq, "outbox: consuming");

    let tail = client.prepare(&names.tail()).await?;
    let batch = outbox.batch as i64;
    let janitor_every = JANITOR_EVERY.min(outbox.retention / 2);
    let mut janitor = Instant::now();
    loop {
        let rows = client.query(&tail, &[&(cursor.seq as i64), &batch]).await?;
        let full = rows.len() as i64 == batch;
        let mut oldest_age = 0.0f64;
        for row in &rows {
            let seq = row.get::<_, i64>(0) as u64;
            let id = row.get::<_, i64>(1);
            let topic = row.get::<_, &str>(2);
            let event = row.get::<_, &str>(3);
            let payload = row.get::<_, &str>(4);
            let age = row.get::<_, f64>(5);
            if oldest_age == 0.0 {
                oldest_age = age;
            }
            match check(topic, event, payload, outbox.max_payload) {
                Ok(payload) => {
                    endpoint.broadcast_from_source(topic, event, payload, epoch, seq);
                    shared.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Err(reason) => {
                    tracing::warn!(table = %names.plain, id, seq, topic, event, reason, "outbox: row set aside");
                    client.execute(&names.set_aside(), &[&id, &reason]).await?;
                    shared.set_aside.fetch_add(1, Ordering::Relaxed);
                }
            }
            cursor.seq = seq;
            shared.cursor.store(seq, Ordering::Relaxed);
        }
        if full {
            let top = client.query_one(&names.top(), &[]).await?.get::<_, i64>(0) as u64;
            shared
                .lag_rows
                .store(top.saturating_sub(cursor.seq), Ordering::Relaxed);
            shared
                .lag_ms
                .store((oldest_age.max(0.0) * 1000.0) as u64, Ordering::Relaxed);
        } else {
            shared.lag_rows.store(0, Ordering::Relaxed);
            shared.lag_ms.store(0, Ordering::Relaxed);
        }
        if janitor.elapsed() >= janitor_every {
            janitor = Instant::now();
            housekeeping(&mut client, outbox).await?;
        }
        if full {
            continue;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(outbox.poll) => {}
        }
    }
}

/// Installs what the table needs (idempotently; one node at a time), and gives a `seq` to
/// rows that have none.
async fn install(client: &mut Client, outbox: &Outbox) -> Result<(), tokio_postgres::Error> {
    let names = &outbox.names;
    let tx = client.transaction().await?;
    tx.batch_execute(&names.install_lock()).await?;
    let installed = tx
        .query_one(&names.has_trigger(), &[])
        .await?
        .get::<_, bool>(0);
    tx.batch_execute(&names.install(!installed)).await?;
    tx.commit().await?;
    sequence_stragglers(client, outbox).await
}

/// Rows committed without a `seq` get one (see the design doc, §1).
async fn sequence_stragglers(
    client: &mut Client,
    outbox: &Outbox,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(&outbox.names.sequence_stragglers())
        .await?;
    tx.commit().await
}

/// Deletes rows past their retention (raising the floor in the same transaction), and
/// sequences stragglers.
async fn housekeeping(client: &mut Client, outbox: &Outbox) -> Result<(), tokio_postgres::Error> {
    let [floor, delete] = outbox.names.expire();
    let tx = client.transaction().await?;
    let secs = outbox.retention.as_secs_f64();
    let floor = tx.query_one(&floor, &[&secs]).await?.get::<_, i64>(0);
    let deleted = tx.execute(&delete, &[&floor]).await?;
    tx.commit().await?;
    if deleted > 0 {
        tracing::debug!(table = %outbox.names.plain, deleted, floor, "outbox: expired rows deleted");
    }
    sequence_stragglers(client, outbox).await
}

/// The row's payload, or why it is set aside.
fn check(
    topic: &str,
    event: &str,
    payload: &str,
    max_payload: usize,
) -> Result<Payload, &'static str> {
    if topic.is_empty() {
        return Err("empty topic");
    }
    if event.is_empty() {
        return Err("empty event");
    }
    if firebrand::is_protocol_event(event) {
        return Err("reserved event");
    }
    if payload.len() > max_payload {
        return Err("payload too large");
    }
    RawJson::parse(payload.to_owned())
        .map(Payload::from)
        .map_err(|_| "payload not JSON")
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn bad_rows_are_named() {
        assert_eq!(check("", "e", "{}", 10).err(), Some("empty topic"));
        assert_eq!(
            check("t", "phx_reply", "{}", 10).err(),
            Some("reserved event")
        );
        assert_eq!(
            check("t", "chan_reply_3", "{}", 10).err(),
            Some("reserved event")
        );
        assert_eq!(
            check("t", "e", "[1,2,3]", 4).err(),
            Some("payload too large")
        );
        assert!(check("t", "e", "{}", 10).is_ok());
    }
}
