// Shared helpers: sockets of the official client with the ws transport, and awaiting events.
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
