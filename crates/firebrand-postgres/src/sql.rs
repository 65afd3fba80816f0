//! The names and statements of an outbox table and what the consumer installs beside it.

/// The advisory lock class of the installation (with the table's name hashed).
const INSTALL_CLASS: i32 = 0x6662_6f69; // "fboi"
/// The advisory lock class of sequencing (with the table's oid): taken by the trigger at
/// commit, and by the straggler sweep.
const SEQUENCE_CLASS: i32 = 0x6662_6f73; // "fbos"

/// The quoted names of an outbox table and of what goes with it.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    /// `schema.table` as the user wrote them (for logs and the lock's hash).
    pub(crate) plain: String,
    pub(crate) table: String,
    seq: String,
    /// The sequence's name as a string literal (for `nextval`).
    seq_literal: String,
    meta: String,
    pub(crate) set_aside: String,
    function: String,
    /// The trigger's bare name (unqualified, quoted).
    trigger: String,
    trigger_plain: String,
    seq_index: String,
    topic_index: String,
    /// The channel of the wake-ups: as a quoted identifier (LISTEN) and as a literal.
    pub(crate) channel: String,
    channel_literal: String,
}

/// `s` as a quoted identifier.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `s` as a string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl Names {
    pub(crate) fn new(schema: Option<&str>, table: &str) -> Self {
        let q = |name: &str| match schema {
            Some(s) => format!("{}.{}", ident(s), ident(name)),
            None => ident(name),
        };
        let plain = match schema {
            Some(s) => format!("{s}.{table}"),
            None => table.to_owned(),
        };
        let seq = q(&format!("{table}_seq"));
        Names {
            table: q(table),
            seq_literal: literal(&seq),
            seq,
            meta: q(&format!("{table}_meta")),
            set_aside: q(&format!("{table}_set_aside")),
            function: q(&format!("{table}_sequence")),
            trigger: ident(&format!("{table}_sequence")),
            trigger_plain: format!("{table}_sequence"),
            seq_index: ident(&format!("{table}_seq_idx")),
            topic_index: ident(&format!("{table}_topic_seq_idx")),
            channel: ident(&format!("firebrand_outbox:{plain}")),
            channel_literal: literal(&format!("firebrand_outbox:{plain}")),
            plain,
        }
    }

    /// The installation's lock: run first in its transaction, it serialises installations
    /// between nodes.
    pub(crate) fn install_lock(&self) -> String {
        format!(
            "SELECT pg_advisory_xact_lock({INSTALL_CLASS}, hashtext({}))",
            literal(&self.plain)
        )
    }

    /// The installation, run in one transaction after [`Names::install_lock`]: what the
    /// consumer needs beside the table (the table too, when missing). `full` when the trigger
    /// is missing (see [`Names::has_trigger`]); otherwise only the function is replaced (no
    /// lock on the table, so writers are not held up by a start).
    pub(crate) fn install(&self, full: bool) -> String {
        let Names {
            plain,
            table,
            seq,
            seq_literal,
            meta,
            set_aside,
            function,
            trigger,
            seq_index,
            topic_index,
            channel_literal,
            ..
        } = self;
        let _ = plain;
        let always = format!(
            "CREATE TABLE IF NOT EXISTS {meta} (
  one   boolean PRIMARY KEY DEFAULT true CHECK (one),
  epoch bigint  NOT NULL,
  floor bigint  NOT NULL DEFAULT 0
);
INSERT INTO {meta} (epoch) VALUES (floor(random() * 9223372036854775807)::bigint)
  ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS {set_aside} (
  id           bigint      PRIMARY KEY,
  seq          bigint,
  topic        text,
  event        text,
  payload      jsonb,
  created_at   timestamptz,
  reason       text        NOT NULL,
  set_aside_at timestamptz NOT NULL DEFAULT now()
);
CREATE SEQUENCE IF NOT EXISTS {seq};
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $fb$
BEGIN
  -- Held until the transaction ends: seq order is commit order (docs/design/outbox.md).
  PERFORM pg_advisory_xact_lock({SEQUENCE_CLASS}, TG_RELID::int);
  UPDATE {table} SET seq = nextval({seq_literal}) WHERE id = NEW.id AND seq IS NULL;
  PERFORM pg_notify({channel_literal}, '');
  RETURN NULL;
END
$fb$;
"
        );
        if !full {
            return always;
        }
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (
  id         bigserial   PRIMARY KEY,
  topic      text        NOT NULL,
  event      text        NOT NULL,
  payload    jsonb       NOT NULL DEFAULT '{{}}',
  created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS seq bigint;
CREATE INDEX IF NOT EXISTS {seq_index} ON {table} (seq);
CREATE INDEX IF NOT EXISTS {topic_index} ON {table} (topic, seq);
{always}
CREATE CONSTRAINT TRIGGER {trigger} AFTER INSERT ON {table}
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {function}();
"
        )
    }

    /// Whether the table has the trigger: `$1` none; one row, one bool.
    pub(crate) fn has_trigger(&self) -> String {
        format!(
            "SELECT to_regclass({}) IS NOT NULL AND EXISTS (SELECT 1 FROM pg_trigger \
             WHERE tgrelid = to_regclass({}) AND tgname = {})",
            literal(&self.table),
            literal(&self.table),
            literal(&self.trigger_plain)
        )
    }

    /// Gives a `seq`, in `id` order, to committed rows without one (inserted before the trigger
    /// existed, or with triggers disabled), under the sequencing lock. Run in a transaction.
    pub(crate) fn sequence_stragglers(&self) -> String {
        let Names {
            table,
            seq_literal,
            channel_literal,
            ..
        } = self;
        format!(
            "SELECT pg_advisory_xact_lock({SEQUENCE_CLASS}, {}::regclass::oid::int);
WITH late AS (SELECT id, nextval({seq_literal}) AS n
              FROM (SELECT id FROM {table} WHERE seq IS NULL ORDER BY id LIMIT 10000 FOR UPDATE) x)
UPDATE {table} t SET seq = late.n FROM late WHERE t.id = late.id;
SELECT pg_notify({channel_literal}, '');
",
            literal(table)
        )
    }

    /// The table's epoch and the highest `seq` now: one row (i64, i64).
    pub(crate) fn epoch_and_top(&self) -> String {
        format!(
            "SELECT m.epoch, (SELECT coalesce(max(seq), 0) FROM {}) FROM {} m",
            self.table, self.meta
        )
    }

    /// The next rows after `$1`, at most `$2`: (seq, id, topic, event, payload text, age s).
    pub(crate) fn tail(&self) -> String {
        format!(
            "SELECT seq, id, topic, event, payload::text, \
             extract(epoch FROM (clock_timestamp() - created_at))::float8 \
             FROM {} WHERE seq > $1 ORDER BY seq LIMIT $2",
            self.table
        )
    }

    /// The highest `seq` now: one row (i64).
    pub(crate) fn top(&self) -> String {
        format!("SELECT coalesce(max(seq), 0) FROM {}", self.table)
    }

    /// Sets row `$1` aside with reason `$2`.
    pub(crate) fn set_aside(&self) -> String {
        format!(
            "INSERT INTO {} (id, seq, topic, event, payload, created_at, reason) \
             SELECT id, seq, topic, event, payload, created_at, $2 FROM {} WHERE id = $1 \
             ON CONFLICT (id) DO NOTHING",
            self.set_aside, self.table
        )
    }

    /// Deletes the rows older than `$1` seconds and raises the floor past them: one
    /// transaction of two statements.
    pub(crate) fn expire(&self) -> [String; 2] {
        let Names { table, meta, .. } = self;
        [
            format!(
                "WITH f AS (SELECT coalesce(max(seq), 0) AS f FROM \
                   (SELECT seq, created_at FROM {table} \
                    WHERE seq > (SELECT floor FROM {meta}) ORDER BY seq LIMIT 10000) x \
                   WHERE created_at < now() - make_interval(secs => $1)) \
                 UPDATE {meta} SET floor = greatest(floor, (SELECT f FROM f)) RETURNING floor"
            ),
            format!("DELETE FROM {table} WHERE seq <= $1"),
        ]
    }

    /// A topic's history in one snapshot: `$1` topic, `$2` after this seq, `$3` at most this
    /// many rows plus one. One row: epoch, floor, topic's top, and the rows newest first as a
    /// JSON array of `[seq, event, payload, age]`.
    pub(crate) fn read(&self) -> String {
        let Names { table, meta, .. } = self;
        format!(
            "SELECT m.epoch, m.floor, \
               (SELECT coalesce(max(seq), 0) FROM {table} WHERE topic = $1), \
               coalesce((SELECT json_agg(json_build_array(seq, event, payload, age) ORDER BY seq DESC) \
                 FROM (SELECT seq, event, payload, \
                         extract(epoch FROM (clock_timestamp() - created_at))::float8 AS age \
                       FROM {table} WHERE topic = $1 AND seq > $2 \
                       ORDER BY seq DESC LIMIT $3) r), '[]')::text \
             FROM {meta} m"
        )
    }
}
