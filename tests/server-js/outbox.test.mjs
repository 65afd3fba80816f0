// Broadcast from the database (issue 25): rows inserted into the outbox table by three backend
// writers — psql, Python's psycopg (Debian's python3-psycopg, psycopg 3) and Node's pg — inside
// transactions that also write another table, some rolled back, reach the official phoenix
// client through firebrand-server: every committed row once, in commit order, with a position;
// no rolled-back row. And the server SIGKILLed mid-stream and restarted: phoenix.js rejoins with
// `since` by itself and every client ends with every committed row once, on one node, where the
// table is the only durable record. And three nodes of a cluster, over Redis and over NATS,
// consuming one table: phoenix.js clients on every node get every row once, at the same positions. Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust, database test;
// or FIREBRAND_TEST_POSTGRES_URL), as scripts/prereqs.sh sets up.
import {test, after} from "node:test"
import assert from "node:assert/strict"
import {execFileSync} from "node:child_process"
import pg from "pg"
import {startServer, connected, outcome, socket, open, within, disconnectAll} from "./support.mjs"

const URL = process.env.FIREBRAND_TEST_POSTGRES_URL ?? "postgres://postgres@127.0.0.1:5432/test"
const table = `fb_js_outbox_${process.pid}`
const orders = `${table}_orders`
const killed = `fb_js_outbox_kill_${process.pid}`
/** Tables made by the tests, dropped at the end. */
const tables = [table, killed]

const db = new pg.Client({connectionString: URL})
await db.connect()
after(async () => {
  disconnectAll()
  for (const t of tables) {
    await db.query(`DROP TABLE IF EXISTS ${t}, ${t}_meta, ${t}_set_aside, ${t}_orders CASCADE;
      DROP SEQUENCE IF EXISTS ${t}_seq; DROP FUNCTION IF EXISTS ${t}_sequence() CASCADE`)
  }
  await db.end()
})

/** Drops `name` and what the server installed for it, then creates it with the SQL, and `sql` after it. */
async function freshTable(name, sql = "") {
  await db.query(`DROP TABLE IF EXISTS ${name}, ${name}_meta, ${name}_set_aside, ${name}_orders CASCADE;
    DROP SEQUENCE IF EXISTS ${name}_seq; DROP FUNCTION IF EXISTS ${name}_sequence() CASCADE;
    CREATE TABLE ${name} (
      id         bigserial   PRIMARY KEY,
      topic      text        NOT NULL,
      event      text        NOT NULL,
      payload    jsonb       NOT NULL DEFAULT '{}',
      created_at timestamptz NOT NULL DEFAULT now()
    ); ${sql}`)
}

/** Polls GET /ready until it answers 200 (the outbox connected). */
async function ready(server) {
  const deadline = Date.now() + 10_000
  for (;;) {
    const res = await fetch(`${server.http}/ready`)
    if (res.status === 200) return
    const body = await res.json()
    if (Date.now() > deadline) throw new Error(`not ready: ${JSON.stringify(body)}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

test("rows committed by psql, psycopg and pg reach phoenix.js once, in commit order; rolled back ones never", async () => {
  // The SQL, and the app's own table.
  await freshTable(table, `CREATE TABLE ${orders} (id bigserial PRIMARY KEY, src text NOT NULL, n int NOT NULL)`)
  const server = await startServer(`
[server]
listen = "127.0.0.1:0"

[outbox]
postgres_url = "${URL}"
table = "${table}"

[[namespace]]
prefix = "orders:"
history = { size = 1000, max_age_ms = 300000 }
outbox = true
`)
  try {
    await ready(server)
    const topic = "orders:42"
    const socket = await connected(server.ws)
    const channel = socket.channel(topic, {})
    const got = []
    let ended
    const end = new Promise((resolve) => { ended = resolve })
    channel.on("shipped", (payload, position) => got.push({...payload, position}))
    channel.on("end", () => ended())
    const [status] = await outcome(channel.join(), "the join")
    assert.equal(status, "ok")

    // psql: one transaction committed (with two rows), one rolled back.
    const psql = (sql) => execFileSync("psql", [URL, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
    const row = (src, n) => `INSERT INTO ${orders} (src, n) VALUES ('${src}', ${n});
      INSERT INTO ${table} (topic, event, payload) VALUES ('${topic}', 'shipped', '{"src": "${src}", "n": ${n}}');`
    psql(`BEGIN; ${row("psql", 1)} ${row("psql", 2)} COMMIT;`)
    psql(`BEGIN; ${row("psql", -1)} ROLLBACK;`)

    // Python, psycopg 3: `with conn.transaction()` commits, or rolls back on an exception.
    execFileSync("/usr/bin/python3", ["-c", `
import sys, psycopg
from psycopg.types.json import Jsonb
url, table, orders, topic = sys.argv[1:]
with psycopg.connect(url) as conn:
    def order(src, n):
        conn.execute(f"INSERT INTO {orders} (src, n) VALUES (%s, %s)", (src, n))
        conn.execute(f"INSERT INTO {table} (topic, event, payload) VALUES (%s, %s, %s)",
                     (topic, "shipped", Jsonb({"src": src, "n": n})))
    with conn.transaction():
        order("python", 1)
    try:
        with conn.transaction():
            order("python", -1)
            raise RuntimeError("payment declined")
    except RuntimeError:
        pass
    with conn.transaction():
        order("python", 2)
`, URL, table, orders, topic])

    // Node, pg: BEGIN … COMMIT, and a ROLLBACK.
    const client = new pg.Client({connectionString: URL})
    await client.connect()
    const order = async (src, n) => {
      await client.query(`INSERT INTO ${orders} (src, n) VALUES ($1, $2)`, [src, n])
      await client.query(`INSERT INTO ${table} (topic, event, payload) VALUES ($1, $2, $3)`,
        [topic, "shipped", {src, n}])
    }
    await client.query("BEGIN")
    await order("node", 1)
    await order("node", 2)
    await client.query("COMMIT")
    await client.query("BEGIN")
    await order("node", -1)
    await client.query("ROLLBACK")
    await client.query(`INSERT INTO ${table} (topic, event) VALUES ($1, 'end')`, [topic])
    await client.end()

    await within(end, "the end row")
    assert.deepEqual(got.map(({src, n}) => `${src}:${n}`),
      ["psql:1", "psql:2", "python:1", "python:2", "node:1", "node:2"])
    // Each with its position (an opaque token, what a rejoin sends as `since`), all distinct.
    for (const {position} of got) assert.ok(typeof position === "string" && position.length > 0, `a position: ${position}`)
    assert.equal(new Set(got.map(({position}) => position)).size, got.length)
    // The app's rows went with them: committed ones only.
    const {rows} = await db.query(`SELECT src || ':' || n AS o FROM ${orders} ORDER BY id`)
    assert.deepEqual(rows.map((r) => r.o), ["psql:1", "psql:2", "python:1", "python:2", "node:1", "node:2"])
  } finally {
    disconnectAll()
    assert.equal(await server.stop(), 0)
  }
})

/** Resolves once `probe()` holds (polled every 20 ms), or rejects after `ms`. */
async function until(probe, what, ms = 15_000) {
  const deadline = Date.now() + ms
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

test("a SIGKILLed server restarts: phoenix.js rejoins with since and every client ends with every committed row once", async () => {
  await freshTable(killed, `CREATE TABLE ${killed}_orders (id bigserial PRIMARY KEY, n int NOT NULL)`)
  const toml = `
[server]
listen = "127.0.0.1:0"

[outbox]
postgres_url = "${URL}"
table = "${killed}"
poll_ms = 500

[[namespace]]
prefix = "orders:"
history = { size = 100000, max_age_ms = 300000 }
outbox = true
`
  let server = await startServer(toml)
  const port = server.port
  await ready(server)
  const topic = "orders:live"

  // Three phoenix.js clients that reconnect quickly; each rejoin sends the last position seen.
  const clients = []
  for (let i = 0; i < 3; i++) {
    const s = socket(server.ws, {reconnectAfterMs: () => 100, rejoinAfterMs: () => 200})
    await open(s)
    const client = {rows: [], joins: [], last: null, ended: null}
    client.end = new Promise((resolve) => { client.ended = resolve })
    const channel = s.channel(topic, () => (client.last ? {since: client.last} : {}))
    channel.on("row", ({n}, position) => { client.rows.push(n); client.last = position })
    channel.on("end", () => client.ended())
    const joined = new Promise((resolve) => channel.join().receive("ok", (reply) => {
      client.joins.push(reply.recovered)
      resolve()
    }))
    await within(joined, "the join")
    clients.push(client)
  }

  // The backend: transactions of one or two rows with an order, every seventh rolled back,
  // until stopped. What committed is what `<table>_orders` holds at the end.
  const writer = new pg.Client({connectionString: URL})
  await writer.connect()
  let stop = false
  let n = 0
  const rowsOf = (n) => (n % 5 === 0 ? [n * 10, n * 10 + 1] : [n * 10])
  const writing = (async () => {
    while (!stop) {
      n += 1
      await writer.query("BEGIN")
      await writer.query(`INSERT INTO ${killed}_orders (n) VALUES ($1)`, [n])
      for (const row of rowsOf(n)) {
        await writer.query(`INSERT INTO ${killed} (topic, event, payload) VALUES ($1, 'row', $2)`, [topic, {n: row}])
      }
      await writer.query(n % 7 === 0 ? "ROLLBACK" : "COMMIT")
      await new Promise((r) => setTimeout(r, 3))
    }
    await writer.query(`INSERT INTO ${killed} (topic, event) VALUES ($1, 'end')`, [topic])
  })()

  const least = () => Math.min(...clients.map((c) => c.rows.length))
  await until(() => least() >= 100, "100 rows on every client")
  // SIGKILL mid-stream; rows keep being committed while no server runs.
  await server.kill()
  const atKill = n
  await until(() => n >= atKill + 100, "100 transactions while the server is down")
  server = await startServer(toml, {}, {FIREBRAND_LISTEN: `127.0.0.1:${port}`})
  await ready(server)
  const atRestart = least()
  await until(() => least() >= atRestart + 300, "300 more rows on every client after the restart", 30_000)
  stop = true
  await writing
  await writer.end()
  await Promise.all(clients.map((c) => within(c.end, "the end row", 15_000)))

  const {rows} = await db.query(`SELECT n FROM ${killed}_orders ORDER BY n`)
  const committed = rows.flatMap(({n}) => rowsOf(Number(n)))
  for (const [i, client] of clients.entries()) {
    assert.equal(client.rows.length, committed.length, `client ${i}: every committed row, once`)
    assert.deepEqual(client.rows, committed, `client ${i}: in commit order`)
    // The first join sent no since; every rejoin (at least the one after the restart) recovered.
    assert.equal(client.joins[0], undefined)
    assert.ok(client.joins.length >= 2, `client ${i} rejoined: ${JSON.stringify(client.joins)}`)
    assert.ok(client.joins.slice(1).every((r) => r === true), `client ${i} recovered: ${JSON.stringify(client.joins)}`)
  }
  disconnectAll()
  assert.equal(await server.stop(), 0)
})

for (const engine of ["redis", "nats"]) {
  test(`three nodes over ${engine} consume one outbox: phoenix.js on each node gets every committed row once, at the same positions`, async () => {
    const t = `fb_js_outbox_${engine}3_${process.pid}`
    tables.push(t)
    await freshTable(t)
    const toml = `
[server]
listen = "127.0.0.1:0"

[outbox]
postgres_url = "${URL}"
table = "${t}"

[[namespace]]
prefix = "orders:"
history = { size = 1000, max_age_ms = 300000 }
outbox = true
`
    const env = engine === "redis"
      ? {REDIS_URL: process.env.REDIS_URL ?? "redis://127.0.0.1:6379"}
      : {NATS_URL: process.env.NATS_URL ?? "nats://127.0.0.1:4222"}
    env.FIREBRAND_CLUSTER_NAMESPACE = `fb-js-outbox-${engine}-${process.pid}`
    const nodes = []
    for (let i = 0; i < 3; i++) nodes.push(await startServer(toml, {}, env))
    try {
      for (const node of nodes) await ready(node)
      const topic = "orders:cluster"
      // Two phoenix.js clients on each node.
      const clients = []
      for (const node of nodes) {
        for (let k = 0; k < 2; k++) {
          const s = await connected(node.ws)
          const client = {got: [], ended: null}
          client.end = new Promise((resolve) => { client.ended = resolve })
          const channel = s.channel(topic, {})
          channel.on("row", ({n}, position) => client.got.push(`${n}@${position}`))
          channel.on("end", () => client.ended())
          const [status] = await outcome(channel.join(), "the join")
          assert.equal(status, "ok")
          clients.push(client)
        }
      }
      // 60 transactions of 1 to 3 rows, every fifth rolled back.
      const writer = new pg.Client({connectionString: URL})
      await writer.connect()
      const committed = []
      for (let n = 1; n <= 60; n++) {
        const rows = Array.from({length: 1 + (n % 3)}, (_, k) => n * 10 + k)
        await writer.query("BEGIN")
        for (const row of rows) {
          await writer.query(`INSERT INTO ${t} (topic, event, payload) VALUES ($1, 'row', $2)`, [topic, {n: row}])
        }
        if (n % 5 === 0) {
          await writer.query("ROLLBACK")
        } else {
          await writer.query("COMMIT")
          committed.push(...rows)
        }
      }
      await writer.query(`INSERT INTO ${t} (topic, event) VALUES ($1, 'end')`, [topic])
      await writer.end()
      await Promise.all(clients.map((c) => within(c.end, "the end row", 15_000)))
      const first = clients[0].got
      assert.deepEqual(first.map((s) => Number(s.split("@")[0])), committed, "every committed row once, in commit order")
      for (const [i, client] of clients.entries()) {
        assert.deepEqual(client.got, first, `client ${i} (node ${Math.floor(i / 2) + 1}): the same rows at the same positions`)
      }
    } finally {
      disconnectAll()
      for (const node of nodes) assert.equal(await node.stop(), 0)
    }
  })
}
