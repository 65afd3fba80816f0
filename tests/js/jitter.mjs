#!/usr/bin/env node
// Messages delivered under network jitter, with the unmodified official `phoenix` client (node, `ws`).
//
//   node tests/js/jitter.mjs [--topic room:jitter] [--clients 200] [--duration 60] [path/to/conformance]
//
// Starts the conformance app (the binary given as the last argument, --bin, $CONFORMANCE_BIN, or
// ../../target/release/conformance relative to this script) on a free loopback port with --port and waits
// for its line "listening on 127.0.0.1:PORT" (or, with --url ws://HOST:PORT/socket, uses a server that is
// already running: e.g. the Phoenix 1.8 reference app, for the side-by-side figure). Then:
//
// - N clients (--clients, default 200), each one `new Socket(url, {transport})` of phoenix.js, where the
//   transport is a subclass of `ws`'s WebSocket that only adds the network fault below. Each client joins
//   every --topic (repeatable, or comma-separated; default room:jitter) with the params closure
//   `() => last ? {since: last} : {}`, where `last` is the ref of the last broadcast it saw on that channel
//   (or the join reply's `position`, before the first one)
//   (phoenix.js hands it to `channel.on` callbacks as the 2nd argument; it is null on room: topics and a
//   position on stream: topics, see /work/shared/conformance/APP.md, "StreamChannel"). phoenix.js
//   re-evaluates the closure on every rejoin.
// - The network fault: client i's network drops at phase (i + 0.5) * PERIOD / N, then every PERIOD
//   (--period, default 15 s) for OUTAGE (--outage, default 2 s): the TCP socket under its WebSocket is
//   destroyed (no close frame: the client sees code 1006), and every connection attempt during the outage
//   fails at once (ECONNREFUSED). phoenix.js reconnects and rejoins by itself on its default backoff.
// - A publisher POSTs /api/broadcast `{"topic": T, "event": "tick", "payload": {"seq": s, "t": ms}}` with
//   s = 1..K to every topic at RATE per second (--rate, default 2) for DURATION (--duration, default 120 s),
//   awaiting each round so that the server receives the seqs of a topic in order.
// - After DURATION the faults stop (an outage under way runs to its end); once every channel has
//   rejoined (bounded by --settle, default 20 s) and 1 s more has passed, it counts, per topic:
//   delivered % = unique seqs seen / seqs expected, where a client expects the seqs published (POST sent)
//   after its first join reply; duplicates (a seq seen again); out of order (a seq lower than one seen
//   before on that channel, duplicates excluded); joins by the `recovered` field of their reply
//   (true / false / absent); delivery latency from POST to callback.
//
// In a cluster (--nodes N, with --engine redis or nats: REDIS_URL=redis://127.0.0.1:6379 or
// NATS_URL=nats://127.0.0.1:4222 and a CLUSTER_NAMESPACE of this run's own), N conformance nodes are started;
// every connection a client makes (its first and each reconnect) goes to a node picked at random, and the
// publisher spreads its POSTs over the nodes in turn. With --kill-one, node 1 is SIGKILLed halfway through
// the run: its clients lose their connections (1006) and reconnect to the others. The publisher stops using
// it 1 s before (a POST that a node answered and then died before handing to its engine would be lost for
// everyone: a publisher that needs certainty retries on another node).
//
// Prints a table and one line `SUMMARY jitter: ...`. Exits 0 when the run completed (every client joined,
// every broadcast answered 200, every channel back by the end, and the server it started exited 0 on
// SIGTERM), and, with --expect-delivered P, when every topic delivered at least P %; 1 otherwise; 2 on a
// usage error. Loopback only, bounded in clients (<= 5000) and time (a hard deadline of
// duration + settle + 120 s).
import {spawn} from "node:child_process"
import {accessSync, constants as fsConstants, readFileSync} from "node:fs"
import {createRequire} from "node:module"
import net from "node:net"
import path from "node:path"
import {fileURLToPath} from "node:url"
import {Socket} from "phoenix"
import WebSocket from "ws"
import {stallProxy} from "./lib.mjs"

const here = path.dirname(fileURLToPath(import.meta.url))

// ---------------------------------------------------------------- options
const USAGE = `usage: node jitter.mjs [options] [path/to/conformance]
  --topic T            topic to join and publish to; repeat or comma-separate for several (default room:jitter)
  --clients N          phoenix.js clients, one Socket each (default 200, at most 5000)
  --duration S         seconds of publishing (default 120)
  --rate R             broadcasts per second per topic (default 2)
  --period S           each client's network drops every S seconds (default 15)
  --together           every client drops at the same moment (a reconnect storm): at half the period,
                       then every period; reports when the last client has caught up
  --outage S           ... for S seconds (default 2)
  --settle S           at most S seconds for every channel to rejoin after the last broadcast (default 20)
  --event E            event name of the broadcasts (default tick)
  --bin PATH           conformance binary (default: $CONFORMANCE_BIN or ../../target/release/conformance)
  --url URL            use a running server, e.g. ws://127.0.0.1:4000/socket (loopback only), start nothing
  --expect-delivered P exit 1 unless every topic delivered at least P percent
  --label L            name of the server in the SUMMARY line (default firebrand, or the --url)
  --nodes N            start N conformance nodes in a cluster (default 1; needs --engine when N > 1)
  --engine E           the cluster's engine: redis (127.0.0.1:6379) or nats (127.0.0.1:4222)
  --kill-one           SIGKILL node 1 halfway through the run
  --stall-one S        node 1 reaches the engine through a proxy that holds every byte both ways (no FIN, no
                       RST) for S seconds from a third of the run, then delivers them in order; the
                       broadcasts are published on the other nodes`

function parseArgs(argv) {
  const o = {
    topics: [], clients: 200, duration: 120, rate: 2, period: 15, outage: 2, settle: 20, event: "tick", together: false,
    bin: process.env.CONFORMANCE_BIN || path.join(here, "../../target/release/conformance"),
    url: null, expectDelivered: null, label: null, nodes: 1, engine: null, killOne: false, stallOne: 0,
  }
  const num = (name, v, min, max) => {
    const x = Number(v)
    if (!Number.isFinite(x) || x < min || x > max) usage(`${name} must be a number in [${min}, ${max}], got ${v}`)
    return x
  }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const val = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`)
      return argv[++i]
    }
    switch (a) {
      case "--topic": o.topics.push(...val().split(",").map((s) => s.trim()).filter(Boolean)); break
      case "--clients": o.clients = Math.floor(num(a, val(), 1, 10000)); break
      case "--together": o.together = true; break
      case "--duration": o.duration = num(a, val(), 1, 3600); break
      case "--rate": o.rate = num(a, val(), 0.01, 1000); break
      case "--period": o.period = num(a, val(), 0.1, 3600); break
      case "--outage": o.outage = num(a, val(), 0, 3600); break
      case "--settle": o.settle = num(a, val(), 1, 600); break
      case "--event": o.event = val(); break
      case "--bin": o.bin = val(); break
      case "--url": o.url = val(); break
      case "--expect-delivered": o.expectDelivered = num(a, val(), 0, 100); break
      case "--label": o.label = val(); break
      case "--nodes": o.nodes = Math.floor(num(a, val(), 1, 8)); break
      case "--engine": o.engine = val(); break
      case "--kill-one": o.killOne = true; break
      case "--stall-one": o.stallOne = num(a, val(), 1, 3600); break
      case "-h": case "--help": console.log(USAGE); process.exit(0)
      default:
        if (a.startsWith("-")) usage(`unknown option ${a}`)
        o.bin = a
    }
  }
  if (o.topics.length === 0) o.topics = ["room:jitter"]
  if (o.nodes > 1 && !["redis", "nats"].includes(o.engine)) usage("--nodes > 1 needs --engine redis or --engine nats")
  if (o.killOne && o.nodes < 2) usage("--kill-one needs --nodes 2 or more")
  if (o.stallOne && o.nodes < 2) usage("--stall-one needs --nodes 2 or more")
  if (o.stallOne && o.killOne) usage("--stall-one and --kill-one do not go together")
  if (o.url && o.nodes > 1) usage("--url and --nodes do not go together")
  if (o.outage >= o.period) usage("--outage must be shorter than --period")
  if (o.url) {
    const u = new URL(o.url)
    if (!["127.0.0.1", "localhost", "[::1]"].includes(u.hostname)) usage("--url must be a loopback address")
  }
  return o
}

function usage(msg) {
  console.error(`jitter: ${msg}\n${USAGE}`)
  process.exit(2)
}

const opts = parseArgs(process.argv.slice(2))
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const now = () => performance.timeOrigin + performance.now()
const log = (msg) => console.error(`jitter: ${msg}`)

// ---------------------------------------------------------------- the servers
let server = null // the first node: {proc, port, exited: Promise<code>, tail: string[], killed}
const servers = [] // every node

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer()
    s.on("error", reject)
    s.listen(0, "127.0.0.1", () => { const {port} = s.address(); s.close(() => resolve(port)) })
  })
}

async function startServer(bin, env = {}) {
  try {
    accessSync(bin, fsConstants.X_OK)
  } catch {
    throw new Error(`no executable conformance binary at ${bin} (build it with: cargo build --release --bin conformance; ` +
      "or pass its path as the last argument, --bin or $CONFORMANCE_BIN)")
  }
  const port = await freePort()
  const proc = spawn(bin, ["--port", String(port)], {stdio: ["ignore", "pipe", "pipe"], env: {...process.env, ...env}})
  const tail = []
  const keep = (line) => { tail.push(line); if (tail.length > 40) tail.shift() }
  const exited = new Promise((resolve) => proc.on("exit", (code, signal) => resolve(code ?? `signal ${signal}`)))
  proc.on("error", (e) => keep(`spawn error: ${e.message}`))
  let buf = ""
  const listening = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no 'listening on 127.0.0.1:${port}' line within 30 s`)), 30000)
    proc.stdout.on("data", (d) => {
      buf += d
      let nl
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl); buf = buf.slice(nl + 1)
        keep(line)
        if (line === `listening on 127.0.0.1:${port}`) { clearTimeout(timer); resolve() }
      }
    })
    exited.then((code) => { clearTimeout(timer); reject(new Error(`the server exited (${code}) before listening`)) })
  })
  proc.stderr.on("data", (d) => String(d).split("\n").filter(Boolean).forEach(keep))
  const node = {proc, port, exited, tail, killed: false}
  servers.push(node)
  if (!server) server = node
  await listening
  return port
}

async function stopServer(node) {
  node.proc.kill("SIGTERM")
  const code = await Promise.race([node.exited, sleep(15000).then(() => "timeout")])
  if (code === "timeout") { node.proc.kill("SIGKILL"); await node.exited }
  return code
}

let stall = null

/** The nodes clients may connect to, and those the publisher uses (both shrink with --kill-one). */
let connectPorts = []
let publishPorts = []
const randomPort = () => connectPorts[Math.floor(Math.random() * connectPorts.length)]

// ---------------------------------------------------------------- clients
/** A connection attempt that fails at once, as when the network is down. */
function refusedConnection() {
  const s = new net.Socket()
  process.nextTick(() => {
    const err = new Error("connect ECONNREFUSED (network down)")
    err.code = "ECONNREFUSED"
    s.destroy(err)
  })
  return s
}

/** Close codes the clients' sockets saw (1006: the connection was lost without a close frame). */
const closeCodes = {}

class Client {
  constructor(index, wsUrl) {
    this.index = index
    this.down = false
    this.sockets = new Set() // TCP sockets under this client's WebSockets
    this.drops = 0
    this.refused = 0
    this.channels = new Map() // topic -> ChannelRecord
    const client = this
    // The transport: `ws` as is, with its TCP connections made through a function that knows the fault.
    class JitterWebSocket extends WebSocket {
      constructor(url, protocols) {
        if (connectPorts.length > 1) {
          // In a cluster: each connection to a node picked at random.
          const u = new URL(url)
          u.port = String(randomPort())
          url = u.toString()
        }
        super(url, protocols, {
          createConnection(options) {
            if (client.down) { client.refused++; return refusedConnection() }
            options.path = options.socketPath // what ws's own netConnect does
            const s = net.connect(options)
            client.sockets.add(s)
            s.on("close", () => client.sockets.delete(s))
            return s
          },
        })
      }
    }
    this.socket = new Socket(wsUrl, {transport: JitterWebSocket})
    this.socket.onClose((e) => { closeCodes[e.code] = (closeCodes[e.code] || 0) + 1 })
  }

  /** The network goes away: no close frame, the TCP connection is just gone. */
  drop() {
    this.down = true
    this.drops++
    const t = now()
    for (const s of this.sockets) s.destroy()
    this.sockets.clear()
    for (const ch of this.channels.values()) ch.dropAt = t
  }

  restore() { this.down = false }
}

class ChannelRecord {
  constructor(client, topic) {
    this.topic = topic
    this.last = null // the ref (position) of the last broadcast seen
    this.firstJoinAt = null
    this.seen = new Set()
    this.maxSeq = 0
    this.received = 0
    this.duplicates = 0
    this.outOfOrder = 0
    this.latencies = []
    this.joins = 0
    this.recovered = {true: 0, false: 0, absent: 0}
    this.joinErrors = 0
    this.joinTimeouts = 0
    this.dropAt = null
    this.gaps = [] // ms from a drop to the rejoin reply
    this.channel = client.socket.channel(topic, () => (this.last ? {since: this.last} : {}))
    this.channel.on(opts.event, (payload, ref) => this.onMessage(payload, ref))
    this.joined = new Promise((resolve) => { this.resolveJoined = resolve })
    this.channel.join()
      .receive("ok", (resp) => this.onJoin(resp))
      .receive("error", (resp) => { this.joinErrors++; this.lastJoinError = resp })
      .receive("timeout", () => { this.joinTimeouts++ })
  }

  onJoin(resp) {
    const t = now()
    this.joins++
    if (this.firstJoinAt === null) { this.firstJoinAt = t; this.resolveJoined() }
    this.lastJoinAt = t
    const r = resp && resp.recovered
    if (r === true) this.recovered.true++
    else if (r === false) this.recovered.false++
    else this.recovered.absent++
    if (this.dropAt !== null) { this.gaps.push(t - this.dropAt); this.dropAt = null }
    // A recoverable topic's reply carries its position: the client resumes from there if it
    // drops before its first broadcast (and after `recovered: false`, where an app reloads).
    if (resp && typeof resp.position === "string" && (this.last === null || r === false)) {
      this.last = resp.position
    }
  }

  onMessage(payload, ref) {
    const t = now()
    const seq = payload && payload.seq
    if (!Number.isInteger(seq)) return
    this.received++
    this.lastAt = t
    if (ref !== null && ref !== undefined) this.last = ref
    if (typeof payload.t === "number") this.latencies.push(t - payload.t)
    if (this.seen.has(seq)) { this.duplicates++; return }
    this.seen.add(seq)
    if (seq < this.maxSeq) this.outOfOrder++
    else this.maxSeq = seq
  }
}

// ---------------------------------------------------------------- the run
function pct(sorted, p) {
  if (sorted.length === 0) return NaN
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]
}
const f1 = (x) => (Number.isFinite(x) ? x.toFixed(1) : "-")

async function main() {
  const hardDeadline = setTimeout(() => {
    log("hard deadline passed: aborting")
    for (const node of servers) node.proc.kill("SIGKILL")
    process.exit(1)
  }, (opts.duration + opts.settle + 120) * 1000)
  hardDeadline.unref()

  let wsUrl, httpBase
  if (opts.url) {
    wsUrl = opts.url
    const u = new URL(opts.url)
    httpBase = `http://${u.host}`
  } else {
    const env = {}
    if (opts.nodes > 1) {
      env[opts.engine === "redis" ? "REDIS_URL" : "NATS_URL"] =
        opts.engine === "redis" ? "redis://127.0.0.1:6379" : "nats://127.0.0.1:4222"
      env.CLUSTER_NAMESPACE = `jitter-${process.pid}-${Date.now()}`
    }
    if (opts.stallOne) {
      // Node 1's engine link goes through the proxy.
      const engine = opts.engine === "redis" ? 6379 : 4222
      stall = await stallProxy(engine)
      const key = opts.engine === "redis" ? "REDIS_URL" : "NATS_URL"
      await startServer(opts.bin, {...env, [key]: `${opts.engine}://127.0.0.1:${stall.port}`})
    }
    for (let i = servers.length; i < opts.nodes; i++) await startServer(opts.bin, env)
    const port = server.port
    wsUrl = `ws://127.0.0.1:${port}/socket`
    httpBase = `http://127.0.0.1:${port}`
    log(`conformance ${opts.bin} on ${servers.map((n) => `127.0.0.1:${n.port} (pid ${n.proc.pid})`).join(", ")}` +
      (opts.nodes > 1 ? ` over ${opts.engine}` : ""))
  }
  connectPorts = servers.map((n) => n.port)
  // With --stall-one, broadcasts are published on the other nodes (node 1 is the stalled one).
  publishPorts = opts.stallOne ? connectPorts.slice(1) : [...connectPorts]
  let nextPublish = 0
  const publishBase = () => (publishPorts.length > 1 ? `http://127.0.0.1:${publishPorts[nextPublish++ % publishPorts.length]}` : httpBase)
  const label = opts.label || (opts.url ? opts.url
    : opts.nodes > 1 ? `firebrand, ${opts.nodes} nodes over ${opts.engine}${opts.killOne ? ", one SIGKILLed" : ""}` +
      `${opts.stallOne ? `, node 1's engine link held ${opts.stallOne} s` : ""}` : "firebrand")
  const failures = []

  // Clients: connect and join, all before the first broadcast.
  const clients = []
  for (let i = 0; i < opts.clients; i++) {
    const c = new Client(i, wsUrl)
    for (const topic of opts.topics) c.channels.set(topic, new ChannelRecord(c, topic))
    c.socket.connect()
    clients.push(c)
    if (i % 50 === 49) await sleep(20) // do not open them all in one tick
  }
  const allJoined = Promise.all(clients.flatMap((c) => [...c.channels.values()].map((ch) => ch.joined)))
  const refusedJoin = new Promise((resolve) => {
    const check = setInterval(() => {
      const ch = clients.flatMap((c) => [...c.channels.values()]).find((x) => x.firstJoinAt === null && x.joinErrors > 0)
      if (ch) { clearInterval(check); resolve(ch) }
    }, 100)
    allJoined.then(() => clearInterval(check))
  })
  const ok = await Promise.race([allJoined.then(() => true), sleep(30000).then(() => false),
    refusedJoin.then((ch) => { throw new Error(`the join of ${ch.topic} was refused: ${JSON.stringify(ch.lastJoinError)}`) })])
  if (!ok) {
    const missing = clients.flatMap((c) => [...c.channels.values()]).filter((ch) => ch.firstJoinAt === null).length
    throw new Error(`${missing} channels had not joined within 30 s`)
  }
  log(`${clients.length} clients joined ${opts.topics.join(", ")}; publishing ${opts.rate}/s for ${opts.duration} s, ` +
    `each client's network down ${opts.outage} s every ${opts.period} s`)

  // Faults: each client on its own phase, evenly spread over the period.
  const t0 = now() + 200
  const tEnd = t0 + opts.duration * 1000
  let faultsOn = true
  const timers = new Set()
  const at = (t, fn) => {
    const h = setTimeout(() => { timers.delete(h); fn() }, Math.max(0, t - now()))
    timers.add(h)
  }
  for (const c of clients) {
    const phase = opts.together ? (opts.period * 1000) / 2 : ((c.index + 0.5) * opts.period * 1000) / clients.length
    const schedule = (start) => {
      if (start >= tEnd) return
      at(start, () => {
        if (!faultsOn) return
        c.drop()
        at(start + opts.outage * 1000, () => c.restore())
        schedule(start + opts.period * 1000)
      })
    }
    schedule(t0 + phase)
  }
  if (opts.killOne) {
    // Node 1 dies halfway: first the publisher stops using it, 1 s later it is SIGKILLed.
    const victim = servers[0]
    at(t0 + (opts.duration * 1000) / 2 - 1000, () => { publishPorts = publishPorts.filter((p) => p !== victim.port) })
    at(t0 + (opts.duration * 1000) / 2, () => {
      connectPorts = connectPorts.filter((p) => p !== victim.port)
      victim.killed = true
      victim.proc.kill("SIGKILL")
      log(`node 127.0.0.1:${victim.port} SIGKILLed`)
    })
  }

  if (opts.stallOne) {
    // Node 1's engine link stalls from a third of the run.
    const from = t0 + (opts.duration * 1000) / 3
    at(from, () => { stall.hold(); log(`node 1's engine link held`) })
    at(from + opts.stallOne * 1000, () => { stall.pass(); log(`node 1's engine link passes again`) })
  }

  // The publisher.
  const K = Math.floor(opts.duration * opts.rate)
  const publishedAt = new Array(K + 1)
  let publishErrors = 0
  let maxLag = 0
  for (let seq = 1; seq <= K; seq++) {
    const due = t0 + ((seq - 1) * 1000) / opts.rate
    const wait = due - now()
    if (wait > 0) await sleep(wait)
    else maxLag = Math.max(maxLag, -wait)
    const t = now()
    publishedAt[seq] = t
    await Promise.all(opts.topics.map(async (topic) => {
      try {
        const res = await fetch(`${publishBase()}/api/broadcast`, {
          method: "POST",
          headers: {"content-type": "application/json"},
          body: JSON.stringify({topic, event: opts.event, payload: {seq, t}}),
        })
        await res.arrayBuffer()
        if (res.status !== 200) publishErrors++
      } catch (e) {
        publishErrors++
        if (publishErrors <= 3) log(`POST /api/broadcast seq ${seq} on ${topic}: ${e.message}`)
      }
    }))
    if (seq % Math.max(1, Math.round(opts.rate * 10)) === 0) log(`published ${seq}/${K}`)
  }
  if (publishErrors) failures.push(`${publishErrors} broadcasts were not answered 200`)

  // Settle: faults last DURATION; then no new ones (an outage under way runs to its end); wait for every
  // channel to be joined again, then 1 s for what is in flight.
  if (tEnd > now()) await sleep(tEnd - now())
  faultsOn = false
  const settleUntil = now() + opts.settle * 1000
  const allBack = () => clients.every((c) => !c.down && [...c.channels.values()].every((ch) => ch.channel.isJoined()))
  while (!allBack() && now() < settleUntil) await sleep(100)
  const notBack = clients.filter((c) => c.down || [...c.channels.values()].some((ch) => !ch.channel.isJoined())).length
  if (notBack) failures.push(`${notBack} clients had not rejoined ${opts.settle} s after the last broadcast`)
  await sleep(1000)
  for (const h of timers) clearTimeout(h)

  // Count.
  const rows = []
  for (const topic of opts.topics) {
    let expected = 0, delivered = 0, duplicates = 0, outOfOrder = 0, joins = 0, gaps = [], lat = []
    const rec = {true: 0, false: 0, absent: 0}
    let joinErrors = 0, joinTimeouts = 0
    for (const c of clients) {
      const ch = c.channels.get(topic)
      for (let seq = 1; seq <= K; seq++) {
        if (publishedAt[seq] >= ch.firstJoinAt) {
          expected++
          if (ch.seen.has(seq)) delivered++
        }
      }
      duplicates += ch.duplicates
      outOfOrder += ch.outOfOrder
      joins += ch.joins
      for (const k of ["true", "false", "absent"]) rec[k] += ch.recovered[k]
      joinErrors += ch.joinErrors
      joinTimeouts += ch.joinTimeouts
      gaps = gaps.concat(ch.gaps)
      lat = lat.concat(ch.latencies)
    }
    gaps.sort((a, b) => a - b)
    lat.sort((a, b) => a - b)
    rows.push({
      topic, expected, delivered, pct: expected ? (100 * delivered) / expected : NaN, duplicates, outOfOrder,
      joins, rejoins: joins - clients.length, rec, joinErrors, joinTimeouts,
      gapMean: gaps.length ? gaps.reduce((a, b) => a + b, 0) / gaps.length : NaN, gapP99: pct(gaps, 99),
      latP50: pct(lat, 50), latP99: pct(lat, 99), latMax: lat.length ? lat[lat.length - 1] : NaN,
    })
  }
  const drops = clients.reduce((a, c) => a + c.drops, 0)
  const refused = clients.reduce((a, c) => a + c.refused, 0)

  // Stop.
  await Promise.all(clients.map((c) => new Promise((resolve) => {
    const t = setTimeout(resolve, 2000)
    c.socket.disconnect(() => { clearTimeout(t); resolve() })
  })))
  let serverCpuMs = null
  for (const node of servers.filter((n) => !n.killed)) {
    try {
      const f = readFileSync(`/proc/${node.proc.pid}/stat`, "utf8").split(") ")[1].split(" ")
      serverCpuMs = (serverCpuMs ?? 0) + ((Number(f[11]) + Number(f[12])) * 1000) / 100 // utime + stime, 100 Hz ticks
    } catch { /* not Linux: no figure */ }
    const code = await stopServer(node)
    if (code !== 0) failures.push(`the conformance node on ${node.port} exited with ${code} on SIGTERM (expected 0)`)
  }

  // Report.
  const cfg = `${opts.nodes > 1 ? `${opts.nodes} nodes over ${opts.engine}${opts.killOne ? ", node 1 SIGKILLed halfway" : ""}, ` : ""}${clients.length} clients, network down ${opts.outage} s every ${opts.period} s (own phase each), ` +
    `${opts.rate} broadcasts/s for ${opts.duration} s (${K} per topic), phoenix.js ${phoenixVersion()} over ws`
  console.log(`\n== jitter (${label}; ${cfg})`)
  const codes = Object.entries(closeCodes).map(([k, v]) => `${k} x${v}`).join(", ") || "none"
  console.log(`network drops ${drops}, connection attempts refused during outages ${refused}, close codes seen by the clients: ${codes}; publisher max lag ${f1(maxLag)} ms`)
  const head = ["topic", "expected", "delivered", "delivered%", "dups", "out-of-order", "joins", "rejoins",
    "recov:true", "recov:false", "recov:absent", "join err/t-o", "drop->rejoin mean/p99 ms", "latency p50/p99/max ms"]
  const table = [head, ...rows.map((r) => [
    r.topic, r.expected, r.delivered, r.pct.toFixed(2), r.duplicates, r.outOfOrder, r.joins, r.rejoins,
    r.rec.true, r.rec.false, r.rec.absent, `${r.joinErrors}/${r.joinTimeouts}`,
    `${f1(r.gapMean)}/${f1(r.gapP99)}`, `${f1(r.latP50)}/${f1(r.latP99)}/${f1(r.latMax)}`,
  ].map(String))]
  const widths = head.map((_, i) => Math.max(...table.map((row) => row[i].length)))
  for (const row of table) console.log(row.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join("  "))

  if (opts.together) {
    // The storm: every client dropped at t0 + period/2 (+ k periods). Once publishing has
    // stopped, each channel's last message is the last it had missed: how long after the last
    // outage ended the slowest client had caught up, and the server's CPU over the whole run.
    const lastDrop = Math.floor((opts.duration * 1000 - (opts.period * 1000) / 2) / (opts.period * 1000))
    const outageEnd = t0 + (opts.period * 1000) / 2 + lastDrop * opts.period * 1000 + opts.outage * 1000
    const channels = clients.flatMap((c) => [...c.channels.values()])
    const caughtUp = Math.max(...channels.map((ch) => ch.lastAt ?? 0))
    const afterRejoin = Math.max(...channels.map((ch) => (ch.lastAt ?? 0) - (ch.lastJoinAt ?? 0)))
    const lastRejoin = Math.max(...channels.map((ch) => ch.lastJoinAt ?? 0))
    console.log(`storm: the last client rejoined ${f1(lastRejoin - outageEnd)} ms after the network came back ` +
      `(phoenix.js's reconnect backoff) and had caught up ${f1(caughtUp - outageEnd)} ms after it; ` +
      `the longest from a rejoin reply to its last missed message: ${f1(afterRejoin)} ms` +
      (serverCpuMs !== null ? `; server CPU over the run ${f1(serverCpuMs)} ms` : ""))
  }
  if (opts.expectDelivered !== null) {
    for (const r of rows) {
      if (!(r.pct >= opts.expectDelivered)) failures.push(`${r.topic}: ${r.pct.toFixed(2)}% delivered < ${opts.expectDelivered}%`)
    }
  }
  const parts = rows.map((r) => `${r.topic} ${r.pct.toFixed(2)}% delivered (${r.delivered}/${r.expected}), ` +
    `${r.duplicates} duplicates, ${r.outOfOrder} out of order, ${r.rejoins} rejoins ` +
    `(recovered true ${r.rec.true}, false ${r.rec.false}, absent ${r.rec.absent - clients.length})`)
  console.log(`SUMMARY jitter: ${label}: ${parts.join("; ")}; ${clients.length} clients, down ${opts.outage} s every ` +
    `${opts.period} s, ${opts.rate}/s for ${opts.duration} s${failures.length ? `; FAILED: ${failures.join("; ")}` : ""}`)
  return failures.length ? 1 : 0
}

function phoenixVersion() {
  try {
    const main = createRequire(import.meta.url).resolve("phoenix") // .../phoenix/priv/static/phoenix.cjs.js
    return JSON.parse(readFileSync(path.join(main, "../../../package.json"), "utf8")).version
  } catch { return "?" }
}

main().then((code) => process.exit(code), async (err) => {
  log(`error: ${err && err.message ? err.message : err}`)
  for (const node of servers) {
    log(`last lines of the output of the node on ${node.port}:\n${node.tail.join("\n")}`)
    node.proc.kill("SIGKILL")
  }
  process.exit(1)
})
