// Long-poll smoke test, moved unchanged out of the former core.test.mjs (uses the older lib.mjs helpers).
import {test, afterEach} from "node:test"
import assert from "node:assert/strict"
import {Socket} from "phoenix"
import {URL_, connect, join, next, once, outcome, topic, disconnectAll} from "./lib.mjs"

afterEach(disconnectAll)

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
