// Helpers for the suite: the firebrand-server binary started with a temp config, phoenix.js sockets
// over the `ws` transport, and bounded waits.
//
// Each test file starts the servers it needs (`startServer(toml)`): the binary listens on
// 127.0.0.1:0 and prints `listening on 127.0.0.1:PORT` first, which gives the port. The servers
// are stopped with SIGTERM when the test file ends and must exit 0.
import {spawn} from "node:child_process"
import {mkdtempSync, rmSync, writeFileSync} from "node:fs"
import {tmpdir} from "node:os"
import {join} from "node:path"
import {createInterface} from "node:readline"
import {Socket} from "phoenix"
import WebSocket from "ws"

export const BIN = process.env.FIREBRAND_SERVER_BIN
if (!BIN) throw new Error("set FIREBRAND_SERVER_BIN to the firebrand-server binary (run.sh does this)")

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

/** A push's outcome: resolves with [status, response] ("ok", "error" or the client's "timeout"). */
export function outcome(push, what = `the reply to ${push.event}`) {
  return within(new Promise((resolve) => {
    for (const status of ["ok", "error", "timeout"]) push.receive(status, (resp) => resolve([status, resp]))
  }), what)
}

/** The next `event` on `channel` (registered now): resolves with its payload. */
export function next(channel, event) {
  let ref
  return within(new Promise((resolve) => { ref = channel.on(event, resolve) }),
    `event "${event}" on ${channel.topic}`).finally(() => channel.off(event, ref))
}

/** A random topic under `prefix`, so that tests never share subscribers. */
export const topic = (prefix) => `${prefix}${Math.random().toString(36).slice(2, 10)}`

/** Variables the server reads: not inherited, so that the caller's environment does not leak in. */
const cleanEnv = () => Object.fromEntries(Object.entries(process.env).filter(([k]) =>
  !k.startsWith("FIREBRAND_") && k !== "REDIS_URL" && k !== "NATS_URL"))

/**
 * Starts the binary with `toml` as its config file (written to a temp dir, with `files`, a map of
 * file name to contents, beside it) and the variables `env` (e.g. `FIREBRAND_LISTEN`, to start
 * again on the port of a killed one). Resolves with {port, ws, http, dir, log, stop(), kill()}.
 */
export async function startServer(toml, files = {}, env = {}) {
  const dir = mkdtempSync(join(tmpdir(), "firebrand-server-js-"))
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text)
  writeFileSync(join(dir, "firebrand.toml"), toml)
  const child = spawn(BIN, ["--config", join(dir, "firebrand.toml")], {env: {...cleanEnv(), ...env}, stdio: ["ignore", "pipe", "pipe"]})
  const log = []
  child.stderr.on("data", (d) => log.push(String(d)))
  const exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve({code, signal})))
  const lines = createInterface({input: child.stdout})
  const port = await within(new Promise((resolve, reject) => {
    lines.on("line", (line) => {
      log.push(line + "\n")
      const m = /^listening on 127\.0\.0\.1:(\d+)$/.exec(line)
      if (m) resolve(Number(m[1]))
    })
    exited.then(({code}) => reject(new Error(`firebrand-server exited (code ${code}) before listening:\n${log.join("")}`)))
  }), "firebrand-server to listen", 15000)
  return {
    port,
    ws: `ws://127.0.0.1:${port}/socket`,
    http: `http://127.0.0.1:${port}`,
    dir,
    log,
    /** SIGTERM; resolves with the exit code (0 expected). */
    async stop() {
      child.kill("SIGTERM")
      const {code} = await within(exited, "firebrand-server to exit on SIGTERM", 15000)
      rmSync(dir, {recursive: true, force: true})
      return code
    },
    /** SIGKILL: nothing shut down cleanly; resolves once it has exited. */
    async kill() {
      child.kill("SIGKILL")
      await within(exited, "firebrand-server to exit on SIGKILL")
      rmSync(dir, {recursive: true, force: true})
    },
  }
}

/** POST /api/<path> of `server` with the API key `key` and the JSON `body`: resolves with [status, JSON body]. */
export async function apiPost(server, key, path, body) {
  const res = await fetch(`${server.http}/api/${path}`, {
    method: "POST",
    headers: {authorization: `Bearer ${key}`, "content-type": "application/json"},
    body: JSON.stringify(body),
  })
  return [res.status, await res.json()]
}

const sockets = new Set()

/** A phoenix.js Socket over `ws` with `opts` (params, authToken, transport…), not yet connected. */
export function socket(url, opts = {}) {
  const s = new Socket(url, {transport: WebSocket, reconnectAfterMs: () => 60_000, ...opts})
  sockets.add(s)
  return s
}

/** Connects `s`: resolves when it opens, rejects on its first error. */
export function open(s) {
  return within(new Promise((resolve, reject) => {
    s.onOpen(resolve)
    s.onError((e) => reject(new Error(`socket error: ${e?.message ?? e}`)))
    s.connect()
  }), "the socket to open")
}

/** A connected socket (see `socket`). */
export async function connected(url, opts) {
  const s = socket(url, opts)
  await open(s)
  return s
}

/** Disconnects every socket made by `socket` (call in afterEach, so node can exit). */
export function disconnectAll() {
  for (const s of sockets) s.disconnect()
  sockets.clear()
}
