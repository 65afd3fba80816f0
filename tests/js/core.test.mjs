// The official phoenix client (node, ws transport) against the conformance app's socket and RoomChannel
// (contract: /work/shared/conformance/APP.md). Each test opens its own sockets and topics and closes them;
// a failing test prints the frames it saw. Run with: bash run.sh
import assert from "node:assert/strict"
import {Seen, cast, next, once, outcome, scenario, topic} from "./support.mjs"

const inFrame = (h, label, pred, what) => {
  const frame = h.framesOf(label, "in").find((f) => Array.isArray(f) && pred(f))
  assert.ok(frame, `no frame ${what} reached [${label}]`)
  return frame
}

// ---- joins ----------------------------------------------------------------------------------------------

scenario("connect and join room:lobby: ok with response {}", async (h) => {
  const s = await h.connect("A")
  assert.equal(s.isConnected(), true)
  const [ch, resp] = await h.join(s, "room:lobby")
  assert.deepEqual(resp, {})
  assert.equal(ch.state, "joined")
})

scenario("join room:42: ok with response {joined: \"42\"}", async (h) => {
  const s = await h.connect("A")
  const [, resp] = await h.join(s, "room:42", {some: "param"})
  assert.deepEqual(resp, {joined: "42"})
})

scenario("join room:<any other>: ok with response {joined: <x>}", async (h) => {
  const s = await h.connect("A")
  const t = topic("any")
  const [, resp] = await h.join(s, t)
  assert.deepEqual(resp, {joined: t.slice("room:".length)})
})

scenario("join room:private is refused: error {reason: \"unauthorized\"}; the socket lives on", async (h) => {
  const s = await h.connect("A")
  const ch = s.channel("room:private")
  assert.deepEqual(await outcome(ch.join(), "the join reply of room:private"), ["error", {reason: "unauthorized"}])
  assert.notEqual(ch.state, "joined")
  const [, resp] = await h.join(s, "room:lobby")
  assert.deepEqual(resp, {})
})

scenario("join room:join_crash is refused: error {reason: \"join crashed\"}; the socket lives on", async (h) => {
  const s = await h.connect("A")
  const ch = s.channel("room:join_crash")
  assert.deepEqual(await outcome(ch.join(), "the join reply of room:join_crash"), ["error", {reason: "join crashed"}])
  assert.notEqual(ch.state, "joined")
  const [, resp] = await h.join(s, "room:lobby")
  assert.deepEqual(resp, {})
})

// ---- push / reply ---------------------------------------------------------------------------------------

scenario("ping: ok reply carries the payload back", async (h) => {
  const s = await h.connect("A")
  const [ch] = await h.join(s, topic("ping"))
  const payload = {n: 1, s: "x", f: 1.5, neg: -7, t: true, z: null, list: [1, "two", {three: 3}], nested: {a: {b: "ü€😀"}}}
  assert.deepEqual(await outcome(ch.push("ping", payload)), ["ok", payload])
  assert.deepEqual(await outcome(ch.push("ping", {})), ["ok", {}])
})

scenario("error_reply: error reply {reason: \"requested\"}", async (h) => {
  const s = await h.connect("A")
  const [ch] = await h.join(s, topic("err"))
  assert.deepEqual(await outcome(ch.push("error_reply", {any: "thing"})), ["error", {reason: "requested"}])
  // The channel is still joined and answers.
  assert.deepEqual(await outcome(ch.push("ping", {still: "here"})), ["ok", {still: "here"}])
})

scenario("push_me: event \"pushed\" with the payload arrives, then the ok reply", async (h) => {
  const s = await h.connect("A")
  const t = topic("push-me")
  const [ch] = await h.join(s, t)
  const order = []
  ch.on("pushed", (payload, ref) => order.push(["pushed", payload, ref]))
  const push = ch.push("push_me", {k: "v", n: [1, 2]})
  push.receive("ok", (resp) => order.push(["ok", resp]))
  assert.deepEqual(await outcome(push), ["ok", {}])
  assert.deepEqual(order, [["pushed", {k: "v", n: [1, 2]}, null], ["ok", {}]])
  // A server push carries the channel's join_ref and no ref.
  const frame = inFrame(h, "A", (f) => f[3] === "pushed", "\"pushed\"")
  assert.deepEqual(frame, [ch.joinRef(), null, t, "pushed", {k: "v", n: [1, 2]}])
})

scenario("async_reply: the ok reply with the payload arrives later for the same push", async (h) => {
  const s = await h.connect("A")
  const [ch] = await h.join(s, topic("async"))
  const push = ch.push("async_reply", {later: true, n: 42})
  assert.deepEqual(await outcome(push), ["ok", {later: true, n: 42}])
  const reply = inFrame(h, "A", (f) => f[3] === "phx_reply" && f[1] === push.ref, `phx_reply for ref ${push.ref}`)
  assert.deepEqual(reply, [ch.joinRef(), push.ref, ch.topic, "phx_reply", {status: "ok", response: {later: true, n: 42}}])
})

scenario("async_reply does not block the channel: a ping sent after it is answered first", async (h) => {
  const s = await h.connect("A")
  const [ch] = await h.join(s, topic("async-order"))
  const order = []
  const slow = ch.push("async_reply", {id: "async"})
  slow.receive("ok", (r) => order.push(r.id))
  const fast = ch.push("ping", {id: "ping"})
  fast.receive("ok", (r) => order.push(r.id))
  await Promise.all([outcome(slow), outcome(fast)])
  assert.deepEqual(order, ["ping", "async"])
})

scenario("heartbeat: socket.ping gets its reply on topic phoenix", async (h) => {
  const s = await h.connect("A")
  const [rtt] = await once("the heartbeat reply (socket.ping)", (cb) => assert.equal(s.ping(cb), true))
  assert.equal(typeof rtt, "number")
  const sent = h.framesOf("A", "out").find((f) => f[3] === "heartbeat")
  assert.deepEqual(sent, [null, sent[1], "phoenix", "heartbeat", {}])
  const reply = inFrame(h, "A", (f) => f[1] === sent[1], `reply to heartbeat ref ${sent[1]}`)
  assert.deepEqual(reply, [null, sent[1], "phoenix", "phx_reply", {status: "ok", response: {}}])
})

// ---- broadcasts -----------------------------------------------------------------------------------------

scenario("new_msg: the broadcast reaches both sockets, the sender included", async (h) => {
  const t = topic("new-msg")
  const a = await h.connect("A"), b = await h.connect("B")
  const [ca] = await h.join(a, t), [cb] = await h.join(b, t)
  const atA = next(ca, "new_msg"), atB = next(cb, "new_msg")
  cast(cb, "new_msg", {body: "hi from B"})
  const [[pa, refA], [pb, refB]] = await Promise.all([atA, atB])
  assert.deepEqual(pa, {body: "hi from B"})
  assert.deepEqual(pb, {body: "hi from B"})
  assert.equal(refA, null)
  assert.equal(refB, null)
  // A broadcast frame has neither join_ref nor ref.
  assert.deepEqual(inFrame(h, "A", (f) => f[3] === "new_msg", "new_msg"), [null, null, t, "new_msg", {body: "hi from B"}])
})

scenario("new_msg_from: reaches the other socket but not the sender", async (h) => {
  const t = topic("new-msg-from")
  const a = await h.connect("A"), b = await h.connect("B")
  const [ca] = await h.join(a, t), [cb] = await h.join(b, t)
  const atA = new Seen("new_msg at A"), atB = new Seen("new_msg at B")
  ca.on("new_msg", (p) => atA.add(p))
  cb.on("new_msg", (p) => atB.add(p))
  cast(cb, "new_msg_from", {body: "not for B"})
  assert.deepEqual(await atA.nth(1), {body: "not for B"})
  // B then broadcasts a marker to everyone, itself included. The server handles B's events in order,
  // so had B been sent its own new_msg_from, it would have arrived before the marker.
  cast(cb, "new_msg", {body: "marker"})
  assert.deepEqual(await atB.nth(1), {body: "marker"}, "B's first new_msg must be the marker")
  assert.deepEqual(await atA.nth(2), {body: "marker"})
  assert.deepEqual(atB.items, [{body: "marker"}])
})

scenario("shout (intercepted): each subscriber gets it with to = its own user, null without one", async (h) => {
  const t = topic("shout")
  const alice = await h.connect("alice", {user: "alice"})
  const bob = await h.connect("bob", {user: "bob"})
  const anon = await h.connect("anon")
  const [ca] = await h.join(alice, t), [cb] = await h.join(bob, t), [cn] = await h.join(anon, t)
  const got = [next(ca, "shout"), next(cb, "shout"), next(cn, "shout")]
  cast(cn, "shout", {msg: "hey"})
  const [[pa], [pb], [pn]] = await Promise.all(got)
  assert.deepEqual(pa, {msg: "hey", to: "alice"})
  assert.deepEqual(pb, {msg: "hey", to: "bob"})
  assert.deepEqual(pn, {msg: "hey", to: null})
  // handle_out pushes: the frame carries the subscriber's join_ref and no ref.
  assert.deepEqual(inFrame(h, "bob", (f) => f[3] === "shout", "shout"), [cb.joinRef(), null, t, "shout", {msg: "hey", to: "bob"}])
})

// ---- refused connection ---------------------------------------------------------------------------------

scenario("connect refused (token \"bad\"): the socket never opens and onError fires; a good socket works", async (h) => {
  const bad = h.socket("bad", {token: "bad"}, {reconnectAfterMs: () => 60_000})
  let opened = 0
  bad.onOpen(() => { opened += 1 })
  const errored = once("onError of the refused socket", (cb) => bad.onError(cb))
  const closed = once("onClose of the refused socket", (cb) => bad.onClose(cb))
  bad.connect()
  const [error] = await errored
  await closed
  // ws reports the refused upgrade with its HTTP status.
  assert.match(String(error?.message), /Unexpected server response: 403/)

  const good = await h.connect("good", {token: "good"})
  const [, resp] = await h.join(good, "room:lobby")
  assert.deepEqual(resp, {})
  assert.equal(opened, 0)
  assert.equal(bad.isConnected(), false)
})

// ---- channel lifecycle ----------------------------------------------------------------------------------

scenario("crash: phx_error {reason: \"channel_crash\"}, the client rejoins by itself, ping works again", async (h) => {
  const s = await h.connect("A")
  const t = topic("crash")
  const ch = s.channel(t)
  const joins = new Seen(`join ok of ${t}`), errors = new Seen(`onError of ${t}`)
  ch.joinPush.receive("ok", (resp) => joins.add(resp))
  ch.onError((reason) => errors.add(reason))
  ch.join()
  assert.deepEqual(await joins.nth(1), {joined: t.slice("room:".length)})
  const firstJoinRef = ch.joinRef()
  const [bystander] = await h.join(s, topic("bystander"))

  cast(ch, "crash", {})
  assert.deepEqual(await errors.nth(1), {reason: "channel_crash"})
  assert.equal(ch.state, "errored")
  assert.deepEqual(inFrame(h, "A", (f) => f[3] === "phx_error", "phx_error"),
    [firstJoinRef, firstJoinRef, t, "phx_error", {reason: "channel_crash"}])
  // The socket and the other channel live on.
  assert.deepEqual(await outcome(bystander.push("ping", {alive: true})), ["ok", {alive: true}])

  // phoenix.js rejoins an errored channel after rejoinAfterMs (first try: 1000 ms).
  assert.deepEqual(await joins.nth(2, 5000), {joined: t.slice("room:".length)})
  assert.notEqual(ch.joinRef(), firstJoinRef)
  assert.equal(ch.state, "joined")
  assert.equal(errors.items.length, 1)
  assert.deepEqual(await outcome(ch.push("ping", {after: "rejoin"})), ["ok", {after: "rejoin"}])
})

scenario("stop: ok reply, then the channel is closed (onClose)", async (h) => {
  const s = await h.connect("A")
  const t = topic("stop")
  const [ch] = await h.join(s, t)
  const order = []
  ch.onError((r) => order.push(["error", r]))
  const closed = once("onClose after stop", (cb) => ch.onClose(cb))
  const push = ch.push("stop", {})
  push.receive("ok", (r) => order.push(["ok", r]))
  ch.onClose(() => order.push("close"))
  await closed
  assert.deepEqual(order, [["ok", {}], "close"])
  assert.equal(ch.state, "closed")
  assert.deepEqual(inFrame(h, "A", (f) => f[3] === "phx_close", "phx_close"), [ch.joinRef(), ch.joinRef(), t, "phx_close", {}])
  // The socket lives on.
  assert.deepEqual((await h.join(s, "room:lobby"))[1], {})
})

scenario("leave: leave() receives ok, then the channel closes", async (h) => {
  const s = await h.connect("A")
  const t = topic("leave")
  const [ch] = await h.join(s, t)
  const joinRef = ch.joinRef()
  const serverClose = new Seen("phx_close frame")
  s.onMessage((m) => { if (m.topic === t && m.event === "phx_close") serverClose.add(m) })
  const closed = once("onClose after leave", (cb) => ch.onClose(cb))
  assert.deepEqual(await outcome(ch.leave()), ["ok", {}])
  await closed
  assert.equal(ch.state, "closed")
  // The server confirms with phx_close for the channel's join_ref (the client has already removed it).
  const m = await serverClose.nth(1)
  assert.deepEqual([m.join_ref, m.ref, m.payload], [joinRef, joinRef, {}])
})

// ---- disconnect by socket id ----------------------------------------------------------------------------

scenario("disconnect_me: every socket of the user closes with 1001 and reconnects by itself", async (h) => {
  const user = `u${Math.random().toString(36).slice(2, 8)}`
  const s1 = await h.connect("s1", {user}), s2 = await h.connect("s2", {user})
  const other = await h.connect("other", {user: `${user}x`}), anon = await h.connect("anon")
  const closes = {s1: new Seen("s1 onClose"), s2: new Seen("s2 onClose"), other: new Seen("other onClose"), anon: new Seen("anon onClose")}
  const opens = {s1: new Seen("s1 reopen"), s2: new Seen("s2 reopen")}
  for (const s of [s1, s2, other, anon]) s.onClose((e) => closes[s.label].add(e))
  for (const s of [s1, s2]) s.onOpen(() => opens[s.label].add(true))

  const t = topic("dc")
  const c1 = s1.channel(t)
  const joins = new Seen(`join ok of ${t} on s1`)
  c1.joinPush.receive("ok", (r) => joins.add(r))
  c1.join()
  await joins.nth(1)

  cast(c1, "disconnect_me", {})
  const [e1, e2] = await Promise.all([closes.s1.nth(1), closes.s2.nth(1)])
  assert.equal(e1.code, 1001, "s1 close code")
  assert.equal(e2.code, 1001, "s2 close code")
  // The client reconnects by itself, and rejoins the channel on the new connection.
  await Promise.all([opens.s1.nth(1), opens.s2.nth(1)])
  await joins.nth(2)
  assert.deepEqual(await outcome(c1.push("ping", {back: true})), ["ok", {back: true}])
  // Sockets of another user (whose id merely starts the same) and without a user stay connected.
  for (const s of [other, anon]) {
    const [ch] = await h.join(s, "room:lobby")
    assert.deepEqual(await outcome(ch.push("ping", {})), ["ok", {}])
  }
  assert.equal(closes.other.items.length, 0, "the other user's socket closed")
  assert.equal(closes.anon.items.length, 0, "the anonymous socket closed")
})

// ---- binary ---------------------------------------------------------------------------------------------

scenario("binary_echo: an ArrayBuffer push gets an ArrayBuffer ok reply with the same bytes", async (h) => {
  const s = await h.connect("A")
  const [ch] = await h.join(s, topic("bin-echo"))
  const bytes = Uint8Array.from({length: 300}, (_, i) => (i * 7 + 3) % 256)
  const [status, resp] = await outcome(ch.push("binary_echo", bytes.buffer))
  assert.equal(status, "ok")
  assert.ok(resp instanceof ArrayBuffer, `reply response is ${Object.prototype.toString.call(resp)}, not an ArrayBuffer`)
  assert.deepEqual(new Uint8Array(resp), bytes)
  // Sent as a binary push (kind 0), answered by a binary reply (kind 1).
  assert.equal(new Uint8Array(h.framesOf("A", "out").find((f) => f instanceof ArrayBuffer))[0], 0)
  const reply = h.framesOf("A", "in").find((f) => f instanceof ArrayBuffer)
  assert.ok(reply, "no binary frame came back")
  assert.equal(new Uint8Array(reply)[0], 1, "binary reply kind")

  const empty = await outcome(ch.push("binary_echo", new ArrayBuffer(0)))
  assert.equal(empty[0], "ok")
  assert.ok(empty[1] instanceof ArrayBuffer)
  assert.equal(empty[1].byteLength, 0)
})

scenario("binary_broadcast: another socket receives an ArrayBuffer payload", async (h) => {
  const t = topic("bin-bc")
  const a = await h.connect("A"), b = await h.connect("B")
  const [ca] = await h.join(a, t), [cb] = await h.join(b, t)
  const atB = next(cb, "binary_broadcast")
  const bytes = new Uint8Array([0, 1, 2, 127, 128, 253, 254, 255])
  cast(ca, "binary_broadcast", bytes.buffer)
  const [payload, ref] = await atB
  assert.ok(payload instanceof ArrayBuffer, `payload is ${Object.prototype.toString.call(payload)}, not an ArrayBuffer`)
  assert.deepEqual(new Uint8Array(payload), bytes)
  assert.equal(ref, null)
  const frame = h.framesOf("B", "in").find((f) => f instanceof ArrayBuffer)
  assert.equal(new Uint8Array(frame)[0], 2, "binary broadcast kind")
})

// ---- serializer versions --------------------------------------------------------------------------------

scenario("vsn: the client's default is 2.0.0 and the server speaks V2 JSON arrays", async (h) => {
  const s = await h.connect("A")
  assert.equal(s.vsn, "2.0.0")
  assert.match(s.endPointURL(), /\/socket\/websocket\?vsn=2\.0\.0$/)
  const [ch] = await h.join(s, "room:lobby")
  const jr = ch.joinRef()
  assert.deepEqual(h.framesOf("A", "out")[0], [jr, jr, "room:lobby", "phx_join", {}])
  assert.deepEqual(h.framesOf("A", "in")[0], [jr, jr, "room:lobby", "phx_reply", {status: "ok", response: {}}])
})

// phoenix 1.8.16 has the `vsn` option (socket.js: `this.vsn = opts.vsn || DEFAULT_VSN`) but its serializer
// always speaks V2, so a V1 client passes V1 encode/decode functions along with it.
const v1 = {
  vsn: "1.0.0",
  encode: ({topic, event, payload, ref, join_ref}, cb) => cb(JSON.stringify({topic, event, payload, ref, join_ref})),
  decode: (raw, cb) => {
    const {topic, event, payload, ref, join_ref} = JSON.parse(raw)
    cb({topic, event, payload, ref, join_ref: join_ref ?? null})
  },
}

scenario("vsn 1.0.0: V1 JSON objects; join, ping, refusal and broadcast work", async (h) => {
  const s = await h.connect("v1", {}, v1)
  assert.match(s.endPointURL(), /[?&]vsn=1\.0\.0$/)
  const t = topic("v1")
  const [ch, resp] = await h.join(s, t)
  assert.deepEqual(resp, {joined: t.slice("room:".length)})
  assert.deepEqual(await outcome(ch.push("ping", {v: 1})), ["ok", {v: 1}])
  assert.deepEqual(await outcome(s.channel("room:private").join()), ["error", {reason: "unauthorized"}])
  const got = next(ch, "new_msg")
  cast(ch, "new_msg", {body: "v1"})
  assert.deepEqual((await got)[0], {body: "v1"})

  const frames = h.framesOf("v1", "in")
  assert.ok(frames.length >= 4)
  for (const f of frames) {
    assert.ok(f && typeof f === "object" && !Array.isArray(f), `not a V1 object frame: ${JSON.stringify(f)}`)
    assert.deepEqual(Object.keys(f).sort(), ["event", "payload", "ref", "topic"], `V1 frame keys: ${JSON.stringify(f)}`)
  }
  const joinRef = ch.joinRef()
  assert.deepEqual(frames.find((f) => f.ref === joinRef),
    {topic: t, event: "phx_reply", ref: joinRef, payload: {status: "ok", response: {joined: t.slice("room:".length)}}})
  assert.deepEqual(frames.find((f) => f.event === "new_msg"), {topic: t, event: "new_msg", ref: null, payload: {body: "v1"}})
})
