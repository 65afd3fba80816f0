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

/**
 * A Presence whose callbacks are counted per meta (phx_ref): onJoin must announce each real
 * join once, onLeave each real leave once, and never a leave of a meta it was not told of.
 */
function counted(channel) {
  const presence = new Presence(channel)
  const joins = new Map(), leaves = new Map(), problems = []
  presence.onJoin((key, _current, joined) => {
    for (const {phx_ref} of joined.metas) {
      joins.set(phx_ref, (joins.get(phx_ref) ?? 0) + 1)
      if (joins.get(phx_ref) > 1) problems.push(`onJoin twice for ${key} ${phx_ref}`)
    }
  })
  presence.onLeave((key, _current, left) => {
    for (const {phx_ref} of left.metas) {
      leaves.set(phx_ref, (leaves.get(phx_ref) ?? 0) + 1)
      if (leaves.get(phx_ref) > 1) problems.push(`onLeave twice for ${key} ${phx_ref}`)
      if (!joins.has(phx_ref)) problems.push(`onLeave for ${key} ${phx_ref}, never joined`)
    }
  })
  return {presence, joins, leaves, problems}
}

test("under a burst, onJoin fires once per real join and onLeave once per real leave", async () => {
  const USERS = 30
  const t = topic("burst")
  const obs = await connect({user: "obs"})
  const watched = counted(obs.channel(t))
  await outcome(watched.presence.channel.join())

  const users = await Promise.all(Array.from({length: USERS}, (_, i) => connect({user: `u${i}`})))
  const joined = users.map((s) => join(s, t))
  // A newcomer joins in the middle of the burst, while its diffs are pending.
  const late = await connect({user: "late"})
  const newcomer = counted(late.channel(t))
  const lateJoin = outcome(newcomer.presence.channel.join())
  await Promise.all([...joined, lateJoin])
  // Half of them leave at once.
  for (const s of users.slice(0, USERS / 2)) s.disconnect()

  const gone = (s) => users.slice(0, USERS / 2).every((_, i) => !s[`u${i}`])
  const all = (s) => users.slice(USERS / 2).every((_, i) => s[`u${i + USERS / 2}`]) && s.obs && s.late
  for (const c of [watched, newcomer]) {
    const state = await synced(c.presence, (s) => gone(s) && all(s))
    assert.deepEqual(c.problems, [])
    // Every meta it lists was announced by exactly one onJoin.
    for (const {metas} of Object.values(state)) {
      for (const {phx_ref} of metas) assert.equal(c.joins.get(phx_ref), 1, phx_ref)
    }
  }
  // The watcher saw every user come; the leavers leave once each.
  assert.equal(watched.leaves.size, USERS / 2)
  const server = await serverList(t)
  for (const c of [watched, newcomer]) {
    const state = await synced(c.presence, (s) => !s.checker)
    assert.deepEqual(refs(state), server)
  }
})
