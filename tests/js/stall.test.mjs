// A stalled engine link (issue 26), with the unmodified official client, on Redis and on NATS: two
// conformance nodes in a cluster of their own, node A's engine link through a proxy that holds every
// byte both ways (no FIN, no RST: the engine's client sees a connection that is up), node B direct.
// Six phoenix.js clients on a stream topic, three on each node, each rejoining with the last
// position it saw (params as a function). While the link is held (5 s), B publishes, and one
// client of B moves to A, rejoining there with B's latest position, which A can only resume from by
// reading the engine: A must not answer `recovered: false` (the messages are in the engine), so it
// either refuses the join (`history unavailable`; phoenix.js retries by itself) or answers
// `recovered: true` once healed. A notices the silent link by its own heartbeats not coming back
// (the conformance app has no readiness route: the node's log line says it). After the heal, every
// client has every message exactly once, in order, with the same positions everywhere.
//
// Starts its own nodes (the binary run.sh was given: $CONFORMANCE_BIN) on $REDIS_URL (default
// redis://127.0.0.1:6379) and $NATS_URL (default nats://127.0.0.1:4222, with JetStream), each case in
// a cluster namespace of its own (the JetStream stream of the NATS case is deleted afterwards).
import {test} from "node:test"
import assert from "node:assert/strict"
import {spawn} from "node:child_process"
import net from "node:net"
import {Socket} from "phoenix"
import WebSocket from "ws"
import {once, stallProxy} from "./lib.mjs"

/** `promise`, or a rejection after `ms`. */
function within(promise, what, ms) {
  let timer
  const timeout = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms) })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

const BIN = process.env.CONFORMANCE_BIN
const ENGINES = {
  redis: {var: "REDIS_URL", url: process.env.REDIS_URL ?? "redis://127.0.0.1:6379"},
  nats: {var: "NATS_URL", url: process.env.NATS_URL ?? "nats://127.0.0.1:4222"},
}
/** How long node A's engine link is held. */
const HOLD_MS = 5000
/** How many messages are published before the hold, during it (before and after the move), after it. */
const [BEFORE, DURING, AFTER_MOVE, AFTER] = [5, 5, 2, 3]
const TOTAL = BEFORE + DURING + AFTER_MOVE + AFTER

const t0 = performance.now()
const stamp = () => `+${((performance.now() - t0) / 1000).toFixed(2)}s`

/**
 * Starts a node with `env` added; resolves once it listens with {port, proc, exited, stop,
 * logLine}. `logLine(re, what, ms)` resolves with [line, time] for the first stderr line (from
 * now on) matching `re`.
 */
async function startNode(env) {
  if (!BIN) throw new Error("set CONFORMANCE_BIN (run.sh does this)")
  const base = {...process.env}
  delete base.REDIS_URL
  delete base.NATS_URL
  const proc = spawn(BIN, ["--port", "0"], {
    stdio: ["ignore", "pipe", "pipe"],
    env: {...base, DRAIN_MS: "100", RUST_LOG: "warn", ...env},
  })
  const exited = new Promise((resolve) => proc.on("exit", (code, signal) => resolve(code ?? signal)))
  const tail = []
  const watchers = new Set()
  let err = ""
  proc.stderr.on("data", (d) => {
    err += d
    let nl
    while ((nl = err.indexOf("\n")) >= 0) {
      const line = err.slice(0, nl)
      err = err.slice(nl + 1)
      tail.push(line)
      if (tail.length > 40) tail.shift()
      for (const w of watchers) w(line)
    }
  })
  const node = {
    proc,
    exited,
    tail,
    logLine(re, what, ms) {
      let watcher
      return once(what, (done) => {
        watcher = (line) => { if (re.test(line)) done(line, performance.now()) }
        watchers.add(watcher)
      }, ms).finally(() => watchers.delete(watcher))
    },
    /** SIGTERM (the node drains and exits 0), SIGKILL if it has not exited after 10 s. */
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return exited
      proc.kill("SIGTERM")
      const timer = setTimeout(() => proc.kill("SIGKILL"), 10000)
      const code = await exited
      clearTimeout(timer)
      return code
    },
  }
  let listening = false
  node.port = await within(new Promise((resolve, reject) => {
    let out = ""
    proc.stdout.on("data", (d) => {
      out += d
      const m = out.match(/listening on 127\.0\.0\.1:(\d+)/)
      if (m && !listening) { listening = true; resolve(Number(m[1])) }
    })
    exited.then((code) => { if (!listening) reject(new Error(`the node exited (${code}) before listening: ${tail.join("\n")}`)) })
  }), "the node to listen", 20000).catch((e) => { proc.kill("SIGKILL"); throw e })
  return node
}

async function publish(port, topic, event, payload) {
  const res = await fetch(`http://127.0.0.1:${port}/api/broadcast`, {
    method: "POST",
    headers: {"content-type": "application/json"},
    body: JSON.stringify({topic, event, payload}),
  })
  await res.arrayBuffer()
  assert.equal(res.status, 200)
}

/** A connected phoenix.js Socket on a node. */
function socketOn(port) {
  const socket = new Socket(`ws://127.0.0.1:${port}/socket`, {transport: WebSocket})
  socket.connect()
  return socket
}

/**
 * Waits until the cluster carries broadcasts from node `from` to node `to`: a client on `to` joins
 * a probe topic, `from` publishes probes until one arrives (engine subscriptions are made in the
 * background). The test's clients never join that topic.
 */
async function awaitLink(from, to, namespace) {
  const probeTopic = `room:probe-${namespace}`
  const socket = socketOn(to.port)
  try {
    const channel = socket.channel(probeTopic, {})
    let heard = null
    const arrived = new Promise((resolve) => { heard = resolve })
    channel.on("probe", () => heard(true))
    await once(`the probe channel's join on ${to.port}`, (done) => channel.join().receive("ok", done), 5000)
    for (let i = 0; i < 100; i++) {
      await publish(from.port, probeTopic, "probe", {i})
      const timeout = new Promise((resolve) => setTimeout(resolve, 100, false))
      if (await Promise.race([arrived, timeout])) return
    }
    throw new Error(`broadcasts of node ${from.port} never reached node ${to.port}`)
  } finally {
    socket.disconnect()
  }
}

/** Deletes a JetStream stream through the NATS protocol ($JS.API.STREAM.DELETE), if it exists. */
function deleteNatsStream(url, name) {
  const u = new URL(url)
  return new Promise((resolve, reject) => {
    const sock = net.connect(Number(u.port || 4222), u.hostname)
    const timer = setTimeout(() => { sock.destroy(); reject(new Error(`no answer deleting ${name}`)) }, 5000)
    let buf = ""
    let sent = false
    sock.on("error", (e) => { clearTimeout(timer); reject(e) })
    sock.on("data", (d) => {
      buf += d
      if (!sent && buf.includes("\r\n")) {
        sent = true
        sock.write(`CONNECT {"verbose":false,"pedantic":false}\r\nSUB _INBOX.stalltest 1\r\n` +
          `PUB $JS.API.STREAM.DELETE.${name} _INBOX.stalltest 0\r\n\r\n`)
      }
      if (buf.includes("PING\r\n")) { sock.write("PONG\r\n"); buf = buf.replaceAll("PING\r\n", "") }
      const m = buf.match(/MSG _INBOX\.stalltest 1 (\d+)\r\n/)
      if (m && buf.length >= m.index + m[0].length + Number(m[1])) {
        const body = buf.slice(m.index + m[0].length, m.index + m[0].length + Number(m[1]))
        clearTimeout(timer)
        sock.end()
        // Deleted, or no such stream (the case failed before any history was written).
        if (/"success":true/.test(body) || /stream not found/.test(body)) resolve(body)
        else reject(new Error(`deleting ${name}: ${body}`))
      }
    })
  })
}

async function stalledLink(t, engineName) {
  const engine = ENGINES[engineName]
  const namespace = `stall-${engineName}-${process.pid}-${Date.now()}`
  const upstream = new URL(engine.url)
  assert.ok(["127.0.0.1", "localhost"].includes(upstream.hostname), `${engine.var} must be on loopback`)
  const log = (msg) => t.diagnostic(`${stamp()} ${engineName}: ${msg}`)

  // Clean-up on every path, in this order: clients, nodes, proxy, the NATS stream.
  const sockets = new Set()
  const nodes = []
  let proxy = null
  t.after(async () => {
    for (const s of sockets) s.disconnect()
    await Promise.all(nodes.map((n) => n.stop()))
    if (proxy) await proxy.close()
    if (engineName === "nats") {
      await deleteNatsStream(engine.url, `FIREBRAND_${namespace}`)
        .then((body) => /"success":true/.test(body) && log(`clean-up: JetStream stream FIREBRAND_${namespace} deleted`))
        .catch((e) => log(`clean-up: ${e.message}`))
    }
  })

  proxy = await stallProxy(Number(upstream.port || (engineName === "redis" ? 6379 : 4222)))
  const proxied = new URL(engine.url)
  proxied.hostname = "127.0.0.1"
  proxied.port = String(proxy.port)
  const a = await startNode({[engine.var]: proxied.toString(), CLUSTER_NAMESPACE: namespace})
  nodes.push(a)
  const b = await startNode({[engine.var]: engine.url, CLUSTER_NAMESPACE: namespace})
  nodes.push(b)
  await awaitLink(b, a, namespace)
  await awaitLink(a, b, namespace)
  log(`nodes A (:${a.port}, engine link through the proxy :${proxy.port}) and B (:${b.port}) linked`)

  // The clients: each records every new_msg (n and position) and every join reply; its channel's
  // params are a function, re-evaluated on every (re)join, sending the last position it saw.
  const topic = `stream:stall-${Math.random().toString(36).slice(2, 8)}`
  const notify = new Set()
  const ping = () => { for (const f of notify) f() }
  // Resolves once `cond()` holds (checked on every message and join reply); fails after `ms`,
  // saying what every client had then.
  const until = (what, cond, ms = 10000) => new Promise((resolve, reject) => {
    const check = () => { if (cond()) { notify.delete(check); clearTimeout(timer); resolve() } }
    const timer = setTimeout(() => { notify.delete(check); reject(new Error(`timed out waiting for ${what}: ${state()}`)) }, ms)
    notify.add(check)
    check()
  })
  const clients = []
  const attach = (c, node) => {
    c.node = node
    c.socket = socketOn(node.port)
    sockets.add(c.socket)
    const channel = c.socket.channel(topic, () => (c.last ? {since: c.last} : {}))
    channel.on("new_msg", (msg, position) => {
      c.seen.push(msg.n)
      c.positions.push(position)
      c.last = position
      ping()
    })
    const reply = (status) => (resp) => {
      c.replies.push({status, resp, on: node === a ? "A" : "B", at: performance.now()})
      if (status === "ok" && c.last === null && typeof resp.position === "string") c.last = resp.position
      ping()
    }
    channel.join().receive("ok", reply("ok")).receive("error", reply("error")).receive("timeout", reply("timeout"))
  }
  for (let i = 0; i < 6; i++) {
    const c = {name: `c${i}`, seen: [], positions: [], last: null, replies: []}
    attach(c, i < 3 ? a : b)
    clients.push(c)
  }
  const onA = clients.slice(0, 3)
  const onB = clients.slice(3)
  const has = (list, n) => () => list.every((c) => c.seen.length >= n)
  const state = () => clients.map((c) => `${c.name}@${c.node === a ? "A" : "B"} [${c.seen}] ` +
    `replies ${JSON.stringify(c.replies.map((r) => [r.on, r.status, r.resp]))}`).join("; ")
  await until("every client's first join", () => clients.every((c) => c.replies.some((r) => r.status === "ok")))

  let n = 0
  const publishUpTo = async (last) => { while (n < last) await publish(b.port, topic, "new_msg", {n: ++n}) }
  await publishUpTo(BEFORE)
  await until(`${BEFORE} messages everywhere`, has(clients, BEFORE))

  // The stall.
  const silent = a.logLine(/cluster engine link silent/, "node A to notice the silent link", HOLD_MS + 5000)
  const carries = a.logLine(/cluster engine link carries again/, "node A's link to carry again", HOLD_MS + 20000)
  for (const p of [silent, carries]) p.catch(() => {}) // awaited below; not unhandled if the case fails first
  proxy.hold()
  const heldAt = performance.now()
  log("node A's engine link held")
  await publishUpTo(BEFORE + DURING)
  await until(`${BEFORE + DURING} messages on B`, has(onB, BEFORE + DURING))
  assert.ok(onA.every((c) => c.seen.length === BEFORE), `node A's clients got messages through a held link: ${state()}`)

  // One of B's clients moves to A: a new Socket on A, rejoining with B's latest position (one A's
  // own cache cannot have: it was published during the stall).
  const moved = onB[0]
  const movedSince = moved.last
  sockets.delete(moved.socket)
  await new Promise((resolve) => moved.socket.disconnect(resolve))
  const movedReplies = moved.replies.length
  const movedAt = performance.now()
  attach(moved, a)
  log(`${moved.name} moved from B to A ${((movedAt - heldAt) / 1000).toFixed(2)} s into the hold, since = position of n=${moved.seen.at(-1)}`)
  await publishUpTo(BEFORE + DURING + AFTER_MOVE)
  await until(`${n} messages on B`, has(onB.slice(1), n))

  const [, noticedAt] = await silent
  log(`node A noticed the silent link ${((noticedAt - heldAt) / 1000).toFixed(2)} s after the hold`)
  const rest = heldAt + HOLD_MS - performance.now()
  if (rest > 0) await new Promise((resolve) => setTimeout(resolve, rest)) // the deliberate stall
  const movedDuringHold = moved.replies.slice(movedReplies).map((r) => `${r.status} ${JSON.stringify(r.resp)}`)
  proxy.pass()
  const healedAt = performance.now()
  log(`released after ${((healedAt - heldAt) / 1000).toFixed(2)} s; ${moved.name}'s join replies on A meanwhile: ` +
    `${movedDuringHold.length ? movedDuringHold.join(", ") : "none yet"}`)

  await publishUpTo(TOTAL)
  await until("every message everywhere", has(clients, TOTAL), 30000)
  const [, carriedAt] = await carries
  const allAt = performance.now()
  const rejoinOk = moved.replies.slice(movedReplies).find((r) => r.status === "ok")
  log(`node A's link carried again ${((carriedAt - healedAt) / 1000).toFixed(3)} s after the release; ` +
    `${moved.name}'s joins on A: ${moved.replies.slice(movedReplies).map((r) =>
      `${r.status} ${JSON.stringify(r.resp)} at ${((r.at - heldAt) / 1000).toFixed(2)} s`).join(", ")} ` +
    `(since the hold); all ${TOTAL} everywhere ${((allAt - healedAt) / 1000).toFixed(3)} s after the release`)

  // Every client: exactly 1..TOTAL, in order, once; the same position for each n everywhere; no
  // join ever answered recovered: false, and a refusal only ever `history unavailable`.
  const expected = Array.from({length: TOTAL}, (_, i) => i + 1)
  for (const c of clients) {
    assert.deepEqual(c.seen, expected, `${c.name}: messages lost, twice or out of order: ${state()}`)
    assert.deepEqual(c.positions, clients[0].positions, `${c.name}: other positions than ${clients[0].name}'s`)
    for (const r of c.replies) {
      if (r.status === "ok") {
        assert.notEqual(r.resp.recovered, false, `${c.name}: a join answered recovered: false: ${state()}`)
      } else {
        assert.deepEqual([r.status, r.resp], ["error", {reason: "history unavailable"}], `${c.name}: ${state()}`)
      }
    }
  }
  assert.ok(rejoinOk, `${moved.name} never joined on A: ${state()}`)
  assert.equal(rejoinOk.resp.recovered, true, `${moved.name}'s join on A with since: ${JSON.stringify(rejoinOk.resp)}`)
  assert.equal(moved.positions[BEFORE + DURING - 1], movedSince, "the moved client's since")

  // Clean stop: the clients first (a drained node's 1012 would make them reconnect), then the nodes.
  for (const s of sockets) s.disconnect()
  sockets.clear()
  assert.deepEqual(await Promise.all([a.stop(), b.stop()]), [0, 0], "the nodes exit 0 on SIGTERM")
}

for (const engine of ["redis", "nats"]) {
  test(`a 5 s stall of a node's ${engine} link: nothing lost, nothing twice, no false recovered`,
    {timeout: 60000}, (t) => stalledLink(t, engine))
}
