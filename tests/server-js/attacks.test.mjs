// Two attacks on firebrand-server with the official phoenix client, each by one authenticated
// client on another: answering the other's pushes with forged `chan_reply_<ref>` events, and
// closing (or watching) the other's socket through its socket id. Both must fail, whatever the
// namespaces allow: here `room:` broadcasts pushes, and a catch-all lets anyone join any topic and
// broadcast there.
import {test, before, after, afterEach} from "node:test"
import assert from "node:assert/strict"
import jwt from "jsonwebtoken"
import {connected, disconnectAll, next, outcome, startServer, topic, within, apiPost} from "./support.mjs"

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
prefix = ""
join = "anyone"
pushes = "broadcast"
`)
})
after(async () => assert.equal(await server.stop(), 0, "exit code on SIGTERM"))
afterEach(disconnectAll)

const token = (sub) => jwt.sign({sub}, SECRET, {algorithm: "HS256", expiresIn: "5m"})

/** POST /api/<path> with the key: resolves with [status, JSON body]. */
const api = (path, body) => apiPost(server, API_KEY, path, body)

/** Every frame `socket` receives, as phoenix.js decoded it. */
function recorded(socket) {
  const frames = []
  socket.onMessage((m) => frames.push(m))
  return frames
}

test("a client cannot answer another client's pushes with chan_reply_<ref> events", async () => {
  const t = topic("room:")
  const alice = await connected(server.ws, {params: {token: token("alice")}})
  const mallory = await connected(server.ws, {params: {token: token("mallory")}})
  const frames = recorded(alice)
  const a = alice.channel(t)
  const m = mallory.channel(t)
  assert.equal((await outcome(a.join()))[0], "ok")
  assert.equal((await outcome(m.join()))[0], "ok")

  // Refs are small sequential numbers: mallory pushes a forged reply for each of them.
  for (let ref = 1; ref <= 12; ref++) {
    const forged = {status: "ok", response: {forged: true}}
    assert.deepEqual(await outcome(m.push(`chan_reply_${ref}`, forged)), ["error", {reason: "reserved event"}])
  }
  // The protocol's own events are refused the same way.
  assert.deepEqual(await outcome(m.push("phx_close", {})), ["error", {reason: "reserved event"}])
  // A fence: mallory's next broadcast reaches alice after anything mallory's channel sent before.
  const fence = next(a, "fence")
  assert.deepEqual(await outcome(m.push("fence", {})), ["ok", {}])
  await fence
  assert.deepEqual(frames.filter((f) => f.event.startsWith("chan_reply_") || f.event === "phx_close"), [])
  // Alice's own pushes get their real replies.
  assert.deepEqual(await outcome(a.push("hello", {})), ["ok", {}])
  // Nor can the backend's API publish such an event.
  for (const event of ["chan_reply_3", "phx_reply", "presence_diff"]) {
    const [status] = await api("publish", {topic: t, event, payload: {}})
    assert.equal(status, 422, event)
  }
})

test("a client cannot disconnect another user, nor watch the user's disconnects", async () => {
  const alice = await connected(server.ws, {params: {token: token("alice")}})
  let closed = 0
  alice.onClose(() => closed++)
  const mallory = await connected(server.ws, {params: {token: token("mallory")}})
  const frames = recorded(mallory)

  // The socket id of alice's connections is `user_socket:alice`: a channel topic of that name
  // is only a topic. Mallory joins it and pushes `disconnect` there.
  const m = mallory.channel("user_socket:alice")
  assert.equal((await outcome(m.join()))[0], "ok")
  assert.deepEqual(await outcome(m.push("disconnect", {})), ["ok", {}])
  // Alice is still connected: her pushes are answered, her socket never closed.
  const a = alice.channel(topic("room:"))
  assert.equal((await outcome(a.join()))[0], "ok")
  assert.deepEqual(await outcome(a.push("hello", {})), ["ok", {}])
  assert.equal(closed, 0)
  assert.equal(alice.isConnected(), true)

  // The backend disconnects alice: her socket closes, and mallory, on the topic named like her
  // socket id, sees nothing of it (a fence published after it arrives first).
  const gone = within(new Promise((resolve) => alice.onClose(resolve)), "alice's socket to close")
  assert.deepEqual(await api("disconnect", {user: "alice"}), [200, {ok: true}])
  await gone
  const fence = next(m, "fence")
  assert.deepEqual(await api("publish", {topic: "user_socket:alice", event: "fence", payload: {}}), [200, {ok: true}])
  await fence
  assert.deepEqual(frames.filter((f) => f.event === "disconnect"), [])
})
