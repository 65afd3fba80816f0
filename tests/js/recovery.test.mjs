// Recovery on rejoin with the unmodified official client (APP.md, "StreamChannel"): the channel's
// params are a function, re-evaluated on every rejoin, that sends the last position seen (the
// second argument of `channel.on` callbacks). A connection that drops while messages are
// published gets them all, in order and once, when phoenix.js reconnects and rejoins by itself.
import {test, afterEach} from "node:test"
import assert from "node:assert/strict"
import {randomBytes} from "node:crypto"
import WebSocket from "ws"
import {HTTP, connect, once, outcome, disconnectAll} from "./lib.mjs"

afterEach(disconnectAll)

const streamTopic = (name) => `stream:${name}-${Math.random().toString(36).slice(2, 8)}`

async function publish(topic, n) {
  const res = await fetch(`${HTTP}/api/broadcast`, {
    method: "POST",
    headers: {"content-type": "application/json"},
    body: JSON.stringify({topic, event: "new_msg", payload: {n}}),
  })
  assert.equal(res.status, 200)
}

/** Resolves once `cond()` holds, checked now and whenever the function given to `register`
 *  is called; fails after 5 s. */
function until(what, cond, register, ms) {
  return once(what, (done) => {
    const check = () => { if (cond()) done() }
    register(check)
    check()
  }, ms)
}

test("a dropped connection rejoins with its last position and misses nothing", async () => {
  // The network: while `offline`, new connections fail at once (as with no route).
  let offline = false
  class Network extends WebSocket {
    constructor(url, protocols) { super(offline ? "ws://127.0.0.1:1/" : url, protocols) }
  }
  // (`connect` registers the socket, so that it is disconnected after the test however it ends.)
  const socket = await connect({}, {transport: Network})

  const topic = streamTopic("drop")
  let last = null
  const seen = []
  const notify = new Set()
  const channel = socket.channel(topic, () => (last ? {since: last} : {}))
  channel.on("new_msg", (msg, position) => {
    seen.push(msg.n)
    last = position
    for (const f of notify) f()
  })
  const replies = []
  const joined = outcome(channel.join().receive("ok", (resp) => {
    replies.push(resp)
    for (const f of notify) f()
  }), "the join")
  assert.equal((await joined)[0], "ok")
  assert.equal(typeof replies[0].position, "string")
  assert.equal(replies[0].recovered, undefined, "a first join sends no since")

  const seenAll = (n) => until(`${n} messages (seen ${seen})`, () => seen.length >= n, (f) => notify.add(f))
  for (const n of [1, 2, 3]) await publish(topic, n)
  await seenAll(3)

  // The connection drops (no close frame) and stays down while 4, 5, 6 are published.
  offline = true
  const closed = once("the socket to close", (cb) => socket.onClose(cb))
  socket.conn._socket.destroy()
  await closed
  for (const n of [4, 5, 6]) await publish(topic, n)
  offline = false

  // phoenix.js reconnects and rejoins by itself; the rejoin carries `since`.
  await until("the rejoin's reply", () => replies.length >= 2, (f) => notify.add(f))
  assert.equal(replies[1].recovered, true)
  await seenAll(6)
  await publish(topic, 7)
  await seenAll(7)
  assert.deepEqual(seen, [1, 2, 3, 4, 5, 6, 7])
  socket.disconnect()
})

test("a position the server cannot resume from is answered recovered: false", async () => {
  const socket = await connect()
  const channel = socket.channel(streamTopic("stale"), () => ({since: "not a position"}))
  const [status, resp] = await outcome(channel.join())
  assert.equal(status, "ok")
  assert.equal(resp.recovered, false)
  assert.equal(typeof resp.position, "string")
  socket.disconnect()
})

test("a client closed as a slow consumer (1008) heals on its rejoin", async () => {
  const socket = await connect()
  const topic = streamTopic("slow")
  let last = null
  const seen = []
  const notify = new Set()
  const replies = []
  const channel = socket.channel(topic, () => (last ? {since: last} : {}))
  channel.on("new_msg", (msg, position) => {
    seen.push(msg.n)
    last = position
    for (const f of notify) f()
  })
  const [status] = await outcome(channel.join().receive("ok", (resp) => {
    replies.push(resp)
    for (const f of notify) f()
  }))
  assert.equal(status, "ok")

  // The client stops reading; 300 messages of 64 KB (19 MB) overflow the server's 4 MiB queue
  // for it plus the kernel's buffers: the server gives up on it. The pad is random base64, so
  // that it does so with compression on too (COMPRESS=1: each message still ~48 KB deflated).
  const closed = once("the server to close the slow client", (cb) => socket.onClose(cb), 20000)
  socket.conn._socket.pause()
  const pad = randomBytes(48 * 1024).toString("base64")
  const total = 300
  for (let n = 1; n <= total; n++) {
    const res = await fetch(`${HTTP}/api/broadcast`, {
      method: "POST",
      headers: {"content-type": "application/json"},
      body: JSON.stringify({topic, event: "new_msg", payload: {n, pad}}),
    })
    assert.equal(res.status, 200)
  }
  socket.conn._socket.resume()
  const [event] = await closed
  assert.ok([1008, 1006].includes(event.code), `closed with ${event.code}`)

  // It reconnects, rejoins with the last position it read, and gets the rest: each once.
  const state = () => `seen ${seen.length} (last ${seen.at(-1)}), replies ${JSON.stringify(replies)}, closed with ${event.code}`
  await until("every message", () => seen.length >= total && replies.length >= 2, (f) => notify.add(f), 15000)
    .catch((e) => { throw new Error(`${e.message}: ${state()}`) })
  assert.equal(replies[1].recovered, true)
  assert.deepEqual(seen, Array.from({length: total}, (_, i) => i + 1))
  socket.disconnect()
})
