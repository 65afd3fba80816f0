// The official client's Presence class stays in sync with the server's presence list through
// joins, a second tab, updates, a crash, a leave and a disconnect.
import {test, afterEach} from "node:test"
import assert from "node:assert/strict"
import {Presence} from "phoenix"
import {connect, join, next, outcome, topic, disconnectAll} from "./lib.mjs"

afterEach(disconnectAll)

/** `{key: [sorted phx_refs]}` of a Presence list or a presence_state payload. */
function refs(state) {
  const out = {}
  for (const [key, {metas}] of Object.entries(state)) out[key] = metas.map((m) => m.phx_ref).sort()
  return out
}

/** Waits until the observer's Presence satisfies `ok(state)`; resolves with its refs. */
function synced(presence, ok) {
  return new Promise((resolve, reject) => {
    const state = () => Object.fromEntries(presence.list((k, p) => [k, p]))
    const check = () => { if (ok(state())) { clearTimeout(timer); resolve(state()) } }
    const timer = setTimeout(() => reject(new Error(`presence never synced: ${JSON.stringify(state())}`)), 5000)
    presence.onSync(check)
    check()
  })
}

/** The server's list: a checker joins and reads its presence_state (without its own key). */
async function serverList(t) {
  const checker = await connect({user: "checker"})
  const ch = checker.channel(t)
  const state = next(ch, "presence_state")
  await outcome(ch.join())
  const list = refs(await state)
  delete list.checker
  checker.disconnect()
  return list
}

const count = (key, n) => (s) => (s[key]?.metas.length ?? 0) === n

test("Presence follows joins, tabs, updates, crashes, leaves and disconnects", async () => {
  const t = topic("presence")
  const obs = await connect({user: "obs"})
  const observed = obs.channel(t)
  const presence = new Presence(observed)
  await outcome(observed.join())
  await synced(presence, count("obs", 1))

  const alice = await connect({user: "alice"})
  const [ca] = await join(alice, t)
  const bob1 = await connect({user: "bob"}), bob2 = await connect({user: "bob"})
  await join(bob1, t)
  const [cb2] = await join(bob2, t)
  let state = await synced(presence, (s) => count("alice", 1)(s) && count("bob", 2)(s))
  // The checker's own meta comes and goes; wait for it to be gone before comparing.
  const afterJoins = await serverList(t)
  state = await synced(presence, (s) => !s.checker)
  assert.deepEqual(refs(state), afterJoins)

  // An update replaces alice's meta (one join carrying phx_ref_prev, one leave).
  const oldRef = state.alice.metas[0].phx_ref
  assert.deepEqual(await outcome(ca.push("update_presence", {status: "away"})), ["ok", {}])
  state = await synced(presence, (s) => s.alice?.metas[0]?.status === "away")
  assert.equal(state.alice.metas.length, 1)
  assert.equal(state.alice.metas[0].phx_ref_prev, oldRef)

  // A crash in bob's second tab removes that meta only.
  cb2.push("crash", {})
  state = await synced(presence, count("bob", 1))

  // Alice leaves; bob's last tab disconnects.
  await outcome(ca.leave())
  bob1.disconnect()
  state = await synced(presence, (s) => !s.alice && !s.bob && !s.checker)
  assert.deepEqual(Object.keys(state), ["obs"])
  assert.deepEqual(refs(state), await serverList(t))
})
