// Channels on firebrand-server with phoenix.js: a broadcast published by the backend over the
// server API with fetch(), Presence on a presence namespace, and the long-poll fallback.
import {test, before, after, afterEach} from "node:test"
import assert from "node:assert/strict"
import jwt from "jsonwebtoken"
import {LongPoll, Presence} from "phoenix"
import {connected, disconnectAll, next, outcome, socket, startServer, topic, within, apiPost} from "./support.mjs"

const SECRET = "js-suite-secret-not-for-production"
const API_KEY = "js-suite-api-key-0123456789"
let server

before(async () => {
  server = await startServer(`
[server]
listen = "127.0.0.1:0"

[auth]
jwt_hs256_secret = "${SECRET}"

[api]
key = "${API_KEY}"

[[namespace]]
prefix = "room:"
pushes = "broadcast"

[[namespace]]
prefix = "lobby:"
presence = true
`)
})
after(async () => assert.equal(await server.stop(), 0, "exit code on SIGTERM"))
afterEach(disconnectAll)

const token = (sub, info) => jwt.sign({sub, info}, SECRET, {algorithm: "HS256", expiresIn: "5m"})

/** POST /api/<path> with the key: resolves with [status, JSON body]. */
const api = (path, body) => apiPost(server, API_KEY, path, body)

test("join, then receive what the backend publishes with fetch()", async () => {
  const t = topic("room:")
  const s = await connected(server.ws, {params: {token: token("alice")}})
  const ch = s.channel(t)
  assert.deepEqual(await outcome(ch.join()), ["ok", {user: "alice"}])
  const got = next(ch, "new_msg")
  assert.deepEqual(await api("publish", {topic: t, event: "new_msg", payload: {body: "hello"}}), [200, {ok: true}])
  assert.deepEqual(await got, {body: "hello"})
  // Without the key: 401, nothing published.
  const res = await fetch(`${server.http}/api/publish`, {method: "POST", body: "{}"})
  assert.equal(res.status, 401)
})

/** Waits until `presence` satisfies `ok(list)`, where list is [[key, presence]…]; resolves with it. */
function synced(presence, ok) {
  const list = () => presence.list((key, p) => [key, p])
  return within(new Promise((resolve) => {
    const check = () => { if (ok(list())) resolve(list()) }
    presence.onSync(check)
    check()
  }), "presence to sync")
}

test("Presence on a presence namespace: users with their info, joins and leaves", async () => {
  const t = topic("lobby:")
  const alice = await connected(server.ws, {params: {token: token("alice", {name: "Alice"})}})
  const ach = alice.channel(t)
  const presence = new Presence(ach)
  assert.deepEqual(await outcome(ach.join()), ["ok", {user: "alice"}])
  await synced(presence, (l) => l.length === 1)

  const bob = await connected(server.ws, {authToken: token("bob", {name: "Bob"})})
  const bch = bob.channel(t)
  await outcome(bch.join())
  const both = await synced(presence, (l) => l.length === 2)
  const metas = Object.fromEntries(both.map(([key, p]) => [key, p.metas.map(({user, info}) => ({user, info}))]))
  assert.deepEqual(metas, {
    alice: [{user: "alice", info: {name: "Alice"}}],
    bob: [{user: "bob", info: {name: "Bob"}}],
  })

  await outcome(bch.leave())
  await synced(presence, (l) => l.length === 1 && l[0][0] === "alice")
  // Pushes are rejected on this namespace (the default).
  assert.deepEqual(await outcome(ach.push("shout", {})), ["error", {reason: "pushes are not allowed"}])
})

test("long-poll fallback: a token in params, join, push broadcast to a WebSocket client", async () => {
  const t = topic("room:")
  const lp = socket(server.ws, {transport: LongPoll, params: {token: token("lp")}})
  await within(new Promise((resolve, reject) => {
    lp.onOpen(resolve)
    lp.onError((e) => reject(new Error(`long-poll error: ${e}`)))
    lp.connect()
  }), "the long-poll socket to open")
  const lch = lp.channel(t)
  assert.deepEqual(await outcome(lch.join()), ["ok", {user: "lp"}])

  const ws = await connected(server.ws, {params: {token: token("ws")}})
  const wch = ws.channel(t)
  await outcome(wch.join())
  // WebSocket -> long-poll.
  const got = next(lch, "new_msg")
  assert.deepEqual(await outcome(wch.push("new_msg", {from: "ws"})), ["ok", {}])
  assert.deepEqual(await got, {from: "ws"})
  // Long-poll -> WebSocket.
  const back = next(wch, "new_msg")
  assert.deepEqual(await outcome(lch.push("new_msg", {from: "lp"})), ["ok", {}])
  assert.deepEqual(await back, {from: "lp"})
  // The backend's publish reaches the long-poll client too.
  const pub = next(lch, "news")
  assert.deepEqual(await api("publish", {topic: t, event: "news", payload: {n: 1}}), [200, {ok: true}])
  assert.deepEqual(await pub, {n: 1})
})

test("long-poll with a bad token is refused", async () => {
  const lp = socket(server.ws, {transport: LongPoll, params: {token: "garbage"}})
  await within(new Promise((resolve, reject) => {
    lp.onOpen(() => reject(new Error("the long-poll socket opened")))
    lp.onError(resolve)
    lp.connect()
  }), "the long-poll error")
})
