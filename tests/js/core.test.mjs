// The official phoenix client against the conformance app: connect, join, push/reply,
// broadcasts, refusals, crash and automatic rejoin, intercepts, disconnect, binary.
import {test, afterEach} from "node:test"
import assert from "node:assert/strict"
import {Socket} from "phoenix"
import WebSocket from "ws"
import {URL_, connect, join, next, once, outcome, topic, disconnectAll} from "./lib.mjs"

afterEach(disconnectAll)

test("join replies: lobby, a named room, refusals", async () => {
  const s = await connect()
  assert.deepEqual((await join(s, "room:lobby"))[1], {})
  assert.deepEqual((await join(s, "room:42"))[1], {joined: "42"})
  assert.deepEqual(await outcome(s.channel("room:private").join()), ["error", {reason: "unauthorized"}])
  assert.deepEqual(await outcome(s.channel("room:join_crash").join()), ["error", {reason: "join crashed"}])
})

test("push and reply; error replies; pushed events; async replies", async () => {
  const s = await connect()
  const [ch] = await join(s, topic("r"))
  assert.deepEqual(await outcome(ch.push("ping", {n: 1, s: "x"})), ["ok", {n: 1, s: "x"}])
  assert.deepEqual(await outcome(ch.push("error_reply", {})), ["error", {reason: "requested"}])
  const pushed = next(ch, "pushed")
  assert.deepEqual(await outcome(ch.push("push_me", {k: "v"})), ["ok", {}])
  assert.deepEqual(await pushed, {k: "v"})
  assert.deepEqual(await outcome(ch.push("async_reply", {later: true})), ["ok", {later: true}])
})

test("broadcast reaches every subscriber; broadcast_from skips the sender", async () => {
  const t = topic("bc")
  const a = await connect(), b = await connect()
  const [ca] = await join(a, t), [cb] = await join(b, t)
  const seenByA = next(ca, "new_msg"), seenByB = next(cb, "new_msg")
  cb.push("new_msg", {body: "hi from B"})
  assert.deepEqual(await seenByA, {body: "hi from B"})
  assert.deepEqual(await seenByB, {body: "hi from B"})

  // B must not receive its own broadcast_from: it gets the later marker first.
  const bEvents = []
  cb.on("new_msg", (p) => bEvents.push(p))
  const aGets = next(ca, "new_msg")
  cb.push("new_msg_from", {body: "not to me"})
  assert.deepEqual(await aGets, {body: "not to me"})
  const marker = next(cb, "new_msg")
  ca.push("new_msg", {body: "marker"})
  assert.deepEqual(await marker, {body: "marker"})
  assert.deepEqual(bEvents, [{body: "marker"}])
})

test("a refused connection never opens while a good one does", async () => {
  const bad = new Socket(URL_, {transport: WebSocket, params: {token: "bad"}, reconnectAfterMs: () => 60_000})
  let opened = false
  bad.onOpen(() => { opened = true })
  const errored = once("the refused socket's error", (cb) => bad.onError(cb))
  bad.connect()
  await errored
  const good = await connect({token: "good"})
  await join(good, "room:lobby")
  assert.equal(opened, false)
  bad.disconnect()
})

test("a crash errors the channel, and the client rejoins by itself", async () => {
  const s = await connect()
  const [ch] = await join(s, topic("crash"))
  let joins = 0
  ch.joinPush.receive("ok", () => { joins += 1 })
  const errored = once("phx_error", (cb) => ch.onError(cb))
  ch.push("crash", {})
  const [reason] = await errored
  assert.deepEqual(reason, {reason: "channel_crash"})
  // phoenix.js schedules the rejoin (first after 1 s); the rejoined channel answers again.
  await once("the rejoin", (cb) => ch.joinPush.receive("ok", cb), 5000)
  assert.deepEqual(await outcome(ch.push("ping", {after: "rejoin"})), ["ok", {after: "rejoin"}])
  assert.ok(joins >= 1)
})

test("stop replies, then closes the channel", async () => {
  const s = await connect()
  const [ch] = await join(s, topic("stop"))
  const closed = once("the channel close", (cb) => ch.onClose(cb))
  assert.deepEqual(await outcome(ch.push("stop", {})), ["ok", {}])
  await closed
  assert.equal(ch.state, "closed")
})

test("shout is intercepted and addressed to each subscriber", async () => {
  const t = topic("shout")
  const alice = await connect({user: "alice"}), anon = await connect()
  const [ca] = await join(alice, t), [cn] = await join(anon, t)
  const toAlice = next(ca, "shout"), toAnon = next(cn, "shout")
  cn.push("shout", {msg: "hey"})
  assert.deepEqual(await toAlice, {msg: "hey", to: "alice"})
  assert.deepEqual(await toAnon, {msg: "hey", to: null})
})

test("disconnect_me closes every socket of the user with 1001, and they reconnect", async () => {
  const user = `dana${Math.random().toString(36).slice(2, 6)}`
  const s1 = await connect({user}), s2 = await connect({user})
  const [c1] = await join(s1, topic("dc"))
  const closed1 = once("s1 close", (cb) => s1.onClose(cb)), closed2 = once("s2 close", (cb) => s2.onClose(cb))
  const reopened = once("s1 to reopen", (cb) => s1.onOpen(cb))
  c1.push("disconnect_me", {})
  const [[e1], [e2]] = await Promise.all([closed1, closed2])
  assert.equal(e1.code, 1001)
  assert.equal(e2.code, 1001)
  await reopened
})

test("binary: echo as a binary reply, and binary broadcasts", async () => {
  const t = topic("bin")
  const a = await connect(), b = await connect()
  const [ca] = await join(a, t), [cb] = await join(b, t)
  const bytes = new Uint8Array([0, 1, 2, 253, 254, 255])
  const [status, resp] = await outcome(ca.push("binary_echo", bytes.buffer))
  assert.equal(status, "ok")
  assert.ok(resp instanceof ArrayBuffer)
  assert.deepEqual(new Uint8Array(resp), bytes)
  const got = next(cb, "binary_broadcast")
  ca.push("binary_broadcast", new Uint8Array([9, 8, 7]).buffer)
  const payload = await got
  assert.ok(payload instanceof ArrayBuffer)
  assert.deepEqual(new Uint8Array(payload), new Uint8Array([9, 8, 7]))
})

test("leave receives ok", async () => {
  const s = await connect()
  const [ch] = await join(s, topic("leave"))
  assert.deepEqual(await outcome(ch.leave()), ["ok", {}])
})

test("long-poll transport: join, push, broadcasts", async () => {
  const {LongPoll} = await import("phoenix")
  const lp = new Socket(URL_, {transport: LongPoll, params: {user: "lp"}})
  const t = topic("lp")
  const opened = once("the long-poll socket to open", (cb) => lp.onOpen(cb))
  lp.connect()
  await opened
  const [ch] = await join(lp, t)
  assert.deepEqual(await outcome(ch.push("ping", {lp: true})), ["ok", {lp: true}])
  const ws = await connect()
  const [cw] = await join(ws, t)
  const got = next(ch, "new_msg")
  cw.push("new_msg", {from: "ws"})
  assert.deepEqual(await got, {from: "ws"})
  lp.disconnect()
})
