// The server asking the backend (a node:http server here, as a Node backend would be): phoenix.js
// clients (WebSocket and long-poll) whose connects, joins and pushes the backend decides.
import {test, before, after, afterEach} from "node:test"
import assert from "node:assert/strict"
import {createServer} from "node:http"
import {LongPoll} from "phoenix"
import {connected, disconnectAll, next, outcome, socket, startServer, topic, within} from "./support.mjs"

let backend, server
const calls = []

/** The backend: sessions "s-alice" and "s-bob" are users; members only on "club:vip"; pushes rewritten. */
function answer(path, body) {
  switch (path) {
    case "/connect": {
      const user = {"s-alice": "alice", "s-bob": "bob"}[body.params.session]
      return user ? {allow: true, user, info: {via: "backend"}} : {allow: false}
    }
    case "/join":
      return body.topic === "club:vip" ? {allow: false, reply: {reason: "members only"}} : {allow: true, reply: {hello: body.user}}
    case "/push":
      return body.event === "spam"
        ? {action: "reject", reply: {reason: "no spam"}}
        : {action: "broadcast", payload: {...body.payload, by: body.user}, reply: {seen: true}}
  }
}

before(async () => {
  backend = createServer((req, res) => {
    let data = ""
    req.on("data", (d) => { data += d })
    req.on("end", () => {
      const body = JSON.parse(data)
      calls.push([req.url, body])
      res.setHeader("content-type", "application/json")
      res.end(JSON.stringify(answer(req.url, body)))
    })
  })
  await new Promise((resolve) => backend.listen(0, "127.0.0.1", resolve))
  const at = `http://127.0.0.1:${backend.address().port}`
  server = await startServer(`
[server]
listen = "127.0.0.1:0"

[auth]
connect_url = "${at}/connect"

[[namespace]]
prefix = "club:"
join = "backend"
join_url = "${at}/join"
pushes = "backend"
push_url = "${at}/push"
`)
})
after(async () => {
  assert.equal(await server.stop(), 0, "exit code on SIGTERM")
  backend.close()
})
afterEach(disconnectAll)

test("the backend decides connects (WebSocket and long-poll)", async () => {
  await connected(server.ws, {params: {session: "s-alice"}})
  assert.equal(calls.at(-1)[1].params.session, "s-alice")
  await connected(server.ws, {transport: LongPoll, params: {session: "s-bob"}})
  const s = socket(server.ws, {params: {session: "nobody"}})
  await within(new Promise((resolve, reject) => {
    s.onOpen(() => reject(new Error("the socket opened")))
    s.onError(resolve)
    s.connect()
  }), "the socket error")
})

test("the backend decides joins and their replies, and rewrites or rejects pushes", async () => {
  const t = topic("club:")
  const alice = (await connected(server.ws, {params: {session: "s-alice"}})).channel(t)
  assert.deepEqual(await outcome(alice.join()), ["ok", {hello: "alice"}])
  const bob = (await connected(server.ws, {transport: LongPoll, params: {session: "s-bob"}})).channel(t)
  assert.deepEqual(await outcome(bob.join()), ["ok", {hello: "bob"}])

  const got = next(bob, "say")
  assert.deepEqual(await outcome(alice.push("say", {text: "hi"})), ["ok", {seen: true}])
  assert.deepEqual(await got, {text: "hi", by: "alice"})
  assert.deepEqual(await outcome(alice.push("spam", {})), ["error", {reason: "no spam"}])

  const vip = (await connected(server.ws, {params: {session: "s-alice"}})).channel("club:vip")
  assert.deepEqual(await outcome(vip.join()), ["error", {reason: "members only"}])
})
