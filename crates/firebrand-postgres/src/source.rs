//! The outbox table as a [`HistorySource`]: what a rejoin reads when a node's ring does not
//! reach back to its `since`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use firebrand::cluster::{
    HistoryError, HistorySource, Query, Retention, SourceEntries, SourceEntry,
};
use firebrand::{Payload, RawJson};
use serde_json::value::RawValue;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use crate::sql::Names;

/// Reads topics' histories from the outbox table, on a connection of its own (opened on the
/// first read, and again after it failed).
pub(crate) struct Source {
    url: String,
    names: Names,
    client: Mutex<Option<Arc<Client>>>,
}

impl Source {
    pub(crate) fn new(url: String, names: Names) -> Self {
        Source {
            url,
            names,
            client: Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<Arc<Client>, HistoryError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .map_err(|e| HistoryError(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "outbox history connection ended");
            }
        });
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// One snapshot of `topic`'s history (the contract's point 4): see the design doc, §3.
    async fn read_now(
        self: Arc<Self>,
        topic: String,
        query: Query,
        retention: Retention,
    ) -> Result<SourceEntries, HistoryError> {
        let err = |e: tokio_postgres::Error| HistoryError(e.to_string());
        let client = self.client().await?;
        let (after, limit) = match query {
            Query::After(s) => (i64::try_from(s).unwrap_or(i64::MAX), retention.size),
            Query::Last(n) => (0, n.min(retention.size)),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
        let row = client
            .query_one(&self.names.read(), &[&topic, &after, &limit])
            .await
            .map_err(err)?;
        let epoch = row.get::<_, i64>(0) as u64;
        let floor = row.get::<_, i64>(1).max(0) as u64;
        let topic_top = row.get::<_, i64>(2).max(0) as u64;
        let rows: Vec<(i64, String, Box<RawValue>, f64)> =
            serde_json::from_str(row.get::<_, &str>(3))
                .map_err(|e| HistoryError(format!("outbox read: {e}")))?;
        // Newest first; one more than asked tells that older ones exist.
        let mut rows = rows;
        let from = if rows.len() as i64 == limit {
            let oldest = rows.pop().map_or(0, |r| r.0.max(0) as u64);
            oldest.max(floor)
        } else {
            match query {
                // Nothing after `since` can be gone when it is at or above the floor.
                Query::After(s) => s.max(floor),
                Query::Last(_) => floor,
            }
        };
        let mut entries = Vec::with_capacity(rows.len());
        for (seq, event, payload, age) in rows.into_iter().rev() {
            let payload = RawJson::parse(payload.get().to_owned())
                .map(Payload::from)
                .map_err(|e| HistoryError(format!("outbox payload: {e}")))?;
            entries.push(SourceEntry {
                offset: seq.max(0) as u64,
                age: Duration::from_secs_f64(age.max(0.0)),
                event,
                payload,
            });
        }
        let top = topic_top.max(from);
        Ok(SourceEntries {
            epoch,
            from,
            top,
            entries,
        })
    }
}

/// A [`Source`] shared with the [`Outbox`](crate::Outbox) it came from.
pub(crate) struct Shared(pub(crate) Arc<Source>);

impl HistorySource for Shared {
    fn read(
        &self,
        topic: &str,
        query: Query,
        retention: Retention,
    ) -> Pin<Box<dyn Future<Output = Result<SourceEntries, HistoryError>> + Send + 'static>> {
        Box::pin(self.0.clone().read_now(topic.to_owned(), query, retention))
    }
}
