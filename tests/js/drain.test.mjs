// A drain heals, with the unmodified official client: two conformance nodes share a Redis; the node
// a client is on is stopped with SIGTERM (it drains: closes its sockets with 1012); phoenix.js
// reconnects, to the other node, rejoins with the last position it saw, and gets every message
// published meanwhile, once, in order (the history lives in Redis, not in the stopped node).
//
// Starts its own nodes (the binary run.sh was given: $CONFORMANCE_BIN) on $REDIS_URL (default
// redis://127.0.0.1:6379), in a cluster namespace of its own.
import {test} from "node:test"
import assert from "node:assert/strict"
import {spawn} from "node:child_process"
import {Socket} from "phoenix"
import WebSocket from "ws"
import {once, outcome} from "./lib.mjs"

const BIN = process.env.CONFORMANCE_BIN
const REDIS = process.env.REDIS_URL ?? "redis://127.0.0.1:6379"

/** Starts a node; resolves with {port, proc, exited} once it listens. */
function node(namespace) {
  if (!BIN) throw new Error("set CONFORMANCE_BIN (run.sh does this)")
  const proc = spawn(BIN, ["--port", "0"], {
    stdio: ["ignore", "pipe", "inherit"],
    env: {...process.env, REDIS_URL: REDIS, CLUSTER_NAMESPACE: namespace, DRAIN_MS: "100", RUST_LOG: "warn"},
  })
  const exited = new Promise((resolve) => proc.on("exit", (code, signal) => resolve(code ?? signal)))
  return once("the node to listen", (done) => {
    let buf = ""
    proc.stdout.on("data", (d) => {
      buf += d
      const m = buf.match(/listening on 127\.0\.0\.1:(\d+)/)
      if (m) done(Number(m[1]))
    })
  }, 20000).then(([port]) => ({port, proc, exited}))
}

async function publish(port, topic, n) {
  const res = await fetch(`http://127.0.0.1:${port}/api/broadcast`, {
    method: "POST",
    headers: {"content-type": "application/json"},
    body: JSON.stringify({topic, event: "new_msg", payload: {n}}),
  })
  assert.equal(res.status, 200)
}

function until(what, cond, notify, ms = 10000) {
  return once(what, (done) => {
    const check = () => { if (cond()) done() }
    notify.add(check)
    check()
  }, ms)
}

test("a node drained with 1012: its clients recover on another node", async (t) => {
  const namespace = `drain-${process.pid}-${Date.now()}`
  const [a, b] = [await node(namespace), await node(namespace)]
  t.after(() => { a.proc.kill("SIGKILL"); b.proc.kill("SIGKILL") })

  // The network: the first connection goes to node a, reconnections to node b; while `hold` is
  // set, they fail at once (so that messages are published while the client is away).
  let target = a.port
  let hold = false
  class Network extends WebSocket {
    constructor(url, protocols) {
      const u = new URL(url)
      u.port = String(hold ? 1 : target)
      super(u.toString(), protocols)
    }
  }
  const socket = new Socket(`ws://127.0.0.1:${a.port}/socket`, {transport: Network})
  t.after(() => socket.disconnect())
  socket.connect()

  const topic = `stream:drain-${Math.random().toString(36).slice(2, 8)}`
  let last = null
  const seen = []
  const replies = []
  const notify = new Set()
  const ping = () => { for (const f of notify) f() }
  const channel = socket.channel(topic, () => (last ? {since: last} : {}))
  channel.on("new_msg", (msg, position) => { seen.push(msg.n); last = position; ping() })
  const [status] = await outcome(channel.join().receive("ok", (resp) => { replies.push(resp); ping() }))
  assert.equal(status, "ok")
  // The nodes' Redis subscriptions are made in the background: probe until node b's broadcasts
  // reach the client on node a.
  const probes = socket.channel(`room:probe-${namespace}`, {})
  assert.equal((await outcome(probes.join()))[0], "ok")
  let heard = false
  probes.on("probe", () => { heard = true })
  for (let i = 0; i < 100 && !heard; i++) {
    const res = await fetch(`http://127.0.0.1:${b.port}/api/broadcast`, {
      method: "POST",
      headers: {"content-type": "application/json"},
      body: JSON.stringify({topic: `room:probe-${namespace}`, event: "probe", payload: {}}),
    })
    await res.arrayBuffer()
    await new Promise((r) => setTimeout(r, 50))
  }
  assert.ok(heard, "node b's broadcasts reach node a")
  for (let n = 1; n <= 3; n++) await publish(b.port, topic, n)
  await until(`3 messages (seen ${seen})`, () => seen.length >= 3, notify)

  // Node a drains: 1012 to the client, which is held off while 4..6 are published on node b.
  const closed = once("the drain's close", (cb) => socket.onClose(cb))
  hold = true
  target = b.port
  a.proc.kill("SIGTERM")
  const [event] = await closed
  assert.equal(event.code, 1012)
  for (let n = 4; n <= 6; n++) await publish(b.port, topic, n)
  hold = false

  await until("the rejoin on node b", () => replies.length >= 2, notify)
  assert.equal(replies[1].recovered, true, JSON.stringify(replies[1]))
  await publish(b.port, topic, 7)
  await until(`7 messages (seen ${seen})`, () => seen.length >= 7, notify)
  assert.deepEqual(seen, [1, 2, 3, 4, 5, 6, 7])
  assert.equal(await a.exited, 0, "the drained node exits 0")
})
