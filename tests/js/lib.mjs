// Shared helpers: sockets of the official client with the ws transport, awaiting events, and a
// TCP proxy that stalls a link (jitter.mjs --stall-one, stall.test.mjs).
import net from "node:net"
import {Socket} from "phoenix"
import WebSocket from "ws"

export const URL_ = process.env.FIREBRAND_URL ?? "ws://127.0.0.1:4000/socket"
export const HTTP = process.env.FIREBRAND_HTTP ?? "http://127.0.0.1:4000"
const WAIT_MS = 5000

/** Resolves with the callback's arguments when `register(cb)` fires, or fails after a bound. */
export function once(what, register, ms = WAIT_MS) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms)
    register((...args) => { clearTimeout(timer); resolve(args) })
  })
}

/** A push's outcome: resolves with [status, response]. */
export function outcome(push, what = "a reply") {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), WAIT_MS)
    for (const status of ["ok", "error", "timeout"]) {
      push.receive(status, (resp) => { clearTimeout(timer); resolve([status, resp]) })
    }
  })
}

const sockets = new Set()

/** A connected socket (resolves on open). Options go to the phoenix Socket. */
export async function connect(params = {}, opts = {}) {
  const socket = new Socket(URL_, {transport: WebSocket, params, reconnectAfterMs: () => 50, ...opts})
  sockets.add(socket)
  const opened = once("the socket to open", (cb) => socket.onOpen(cb))
  socket.connect()
  await opened
  return socket
}

/** Joins `topic` and resolves with the ok response (rejects on error). */
export async function join(socket, topic, params = {}) {
  const channel = socket.channel(topic, params)
  const [status, resp] = await outcome(channel.join(), `the join of ${topic}`)
  if (status !== "ok") throw new Error(`join ${topic}: ${status} ${JSON.stringify(resp)}`)
  return [channel, resp]
}

/** The next `event` on `channel`: resolves with its payload. */
export function next(channel, event) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${event}`)), WAIT_MS)
    const ref = channel.on(event, (payload) => { clearTimeout(timer); channel.off(event, ref); resolve(payload) })
  })
}

export const topic = (name) => `room:${name}-${Math.random().toString(36).slice(2, 8)}`

export function disconnectAll() {
  for (const s of sockets) s.disconnect()
  sockets.clear()
}

/**
 * A TCP proxy on a free loopback port in front of 127.0.0.1:`upstream` (a node's engine link goes
 * through it): `hold()` stops reading both ways (the bytes wait in the kernel's buffers, the
 * connections stay open: no FIN, no RST), `pass()` delivers everything held, in order, and forwards
 * again. `close()` ends every connection and the listener.
 */
export async function stallProxy(upstream) {
  let held = false
  const pairs = new Set()
  const forward = (from, to) => {
    from.on("data", (d) => { if (!to.write(d)) from.pause() })
    to.on("drain", () => { if (!held) from.resume() })
    from.on("end", () => to.end())
    from.on("error", () => to.destroy())
    from.on("close", () => { to.destroy(); pairs.delete(from) })
  }
  const srv = net.createServer((c) => {
    const u = net.connect(upstream, "127.0.0.1")
    forward(c, u)
    forward(u, c)
    pairs.add(c).add(u)
    if (held) { c.pause(); u.pause() }
  })
  await new Promise((resolve) => srv.listen(0, "127.0.0.1", resolve))
  return {
    port: srv.address().port,
    hold() { held = true; for (const s of pairs) s.pause() },
    pass() { held = false; for (const s of pairs) s.resume() },
    close() {
      for (const s of pairs) s.destroy()
      return new Promise((resolve) => srv.close(() => resolve()))
    },
  }
}
