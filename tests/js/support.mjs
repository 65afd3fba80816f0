// Helpers for driving the official `phoenix` client (node, `ws` transport) against the conformance app.
//
// Every test runs inside `scenario(name, fn)`: it gets a Harness `h` whose sockets are all disconnected at
// the end (so node exits), and whose WebSocket frames are recorded; when the test fails, the frame
// transcript (in the style of /work/shared/conformance/FRAMES.md) is appended to the failure message.
import {test} from "node:test"
import {Socket} from "phoenix"
import WebSocket from "ws"

export const URL_ = process.env.FIREBRAND_URL
if (!URL_) throw new Error("set FIREBRAND_URL, e.g. ws://127.0.0.1:4100/socket (run.sh does this)")

/** Bound on every await of a server event, in ms. */
export const WAIT_MS = 5000

/** Rejects with a clear message when `promise` does not settle within `ms`. */
export function within(promise, what, ms = WAIT_MS) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

/** Resolves with the arguments of the first call of the callback given to `register`. */
export function once(what, register, ms = WAIT_MS) {
  return within(new Promise((resolve) => register((...args) => resolve(args))), what, ms)
}

/** A push's outcome: resolves with [status, response] for "ok", "error" or the client's "timeout". */
export function outcome(push, what = `the reply to ${push.event}`, ms = WAIT_MS) {
  return within(new Promise((resolve) => {
    for (const status of ["ok", "error", "timeout"]) push.receive(status, (resp) => resolve([status, resp]))
  }), what, ms)
}

/** The next `event` on `channel` (registered now): resolves with [payload, ref]. */
export function next(channel, event, ms = WAIT_MS) {
  let ref
  return within(new Promise((resolve) => {
    ref = channel.on(event, (payload, msgRef) => resolve([payload, msgRef]))
  }), `event "${event}" on ${channel.topic}`, ms).finally(() => channel.off(event, ref))
}

/** A list that records items as they happen and lets a test await the n-th one. */
export class Seen {
  constructor(what) { this.what = what; this.items = []; this.waiters = [] }
  add(item) {
    this.items.push(item)
    this.waiters = this.waiters.filter((w) => (this.items.length >= w.n ? (w.resolve(this.items[w.n - 1]), false) : true))
  }
  /** Resolves with the n-th item (1-based), at once if it already happened. */
  nth(n, ms = WAIT_MS) {
    if (this.items.length >= n) return Promise.resolve(this.items[n - 1])
    return within(new Promise((resolve) => this.waiters.push({n, resolve})),
      `${this.what} #${n} (seen ${this.items.length} so far)`, ms)
  }
}

/** A random topic `room:t-<name>-<random>` so that tests never share subscribers. */
export const topic = (name) => `room:t-${name}-${Math.random().toString(36).slice(2, 10)}`

const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join(" ")
const show = (data) => {
  if (typeof data === "string") return data
  const buf = data instanceof ArrayBuffer ? data : new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
  return `binary (${buf.byteLength} B) ${hex(buf)}`
}

/** One test's sockets and frame transcript. */
export class Harness {
  constructor() { this.t0 = Date.now(); this.lines = []; this.sockets = []; this.frames = [] }

  log(label, text) {
    this.lines.push(`+${String(Date.now() - this.t0).padStart(6)}ms [${label}] ${text}`)
  }

  /** A WebSocket class for phoenix's `transport` option that records what goes over the wire. */
  transport(label) {
    const h = this
    return class RecordingWebSocket extends WebSocket {
      constructor(url, protocols) {
        super(url, protocols)
        h.log(label, `CONNECT ${url}`)
        this.addEventListener("open", () => h.log(label, "OPEN"))
        this.addEventListener("message", ({data}) => {
          h.frames.push({label, dir: "in", data})
          h.log(label, `S->C ${show(data)}`)
        })
        this.addEventListener("error", (e) => h.log(label, `ERROR ${e.message ?? e}`))
        this.addEventListener("close", ({code, reason}) => h.log(label, `CLOSED code=${code} reason=${JSON.stringify(reason)}`))
      }
      send(data, ...rest) {
        h.frames.push({label, dir: "out", data})
        h.log(label, `C->S ${show(data)}`)
        return super.send(data, ...rest)
      }
      close(...args) {
        h.log(label, `C close ${args.length ? args.join(" ") : ""}`.trimEnd())
        return super.close(...args)
      }
    }
  }

  /** A phoenix Socket (not connected yet) over the recording ws transport. */
  socket(label, params = {}, opts = {}) {
    const socket = new Socket(URL_, {transport: this.transport(label), params, ...opts})
    socket.label = label
    this.sockets.push(socket)
    return socket
  }

  /** A connected phoenix Socket: resolves once it is open. */
  async connect(label, params = {}, opts = {}) {
    const socket = this.socket(label, params, opts)
    const opened = once(`socket [${label}] to open`, (cb) => socket.onOpen(cb))
    socket.connect()
    await opened
    return socket
  }

  /** Joins `topic`; resolves with [channel, response], rejects unless the join replies ok. */
  async join(socket, topic, params = {}) {
    const channel = socket.channel(topic, params)
    const [status, resp] = await outcome(channel.join(), `the join reply of ${topic} on [${socket.label}]`)
    if (status !== "ok") throw new Error(`join ${topic} on [${socket.label}]: ${status} ${JSON.stringify(resp)}`)
    return [channel, resp]
  }

  /** Frames of a socket, decoded when they are JSON text. */
  framesOf(label, dir) {
    return this.frames.filter((f) => f.label === label && f.dir === dir)
      .map((f) => (typeof f.data === "string" ? JSON.parse(f.data) : f.data))
  }

  async close() {
    await Promise.all(this.sockets.map((s) => new Promise((resolve) => s.disconnect(resolve))))
    this.sockets = []
  }

  transcript() { return this.lines.join("\n") }
}

/** A node:test test with a Harness; appends the wire transcript to any failure. */
export function scenario(name, fn, options = {}) {
  test(name, options, async (t) => {
    const h = new Harness()
    try {
      await fn(h, t)
    } catch (err) {
      // The spec reporter prints diagnostics under the failed test.
      t.diagnostic(`frames seen by this test:\n${h.transcript()}`)
      throw err
    } finally {
      await h.close()
    }
  })
}

/**
 * Pushes an event the server does not reply to. A short client-side timeout keeps phoenix's pending
 * push timers (10 s by default) from holding node's event loop open after the test.
 */
export const cast = (channel, event, payload) => channel.push(event, payload, 1000)
