// The chat demo as people use it: two users in two browser contexts, messages, who is online
// (several tabs per user), leaving, and the reconnecting state when the server goes away.
//
// Env: CHAT_BIN (the chat binary), CHROMIUM (default /usr/bin/chromium), ARTIFACTS (screenshots).
import {test, before, after} from "node:test"
import assert from "node:assert/strict"
import {spawn} from "node:child_process"
import {createInterface} from "node:readline"
import {mkdirSync} from "node:fs"
import {chromium} from "playwright-core"

const CHAT_BIN = process.env.CHAT_BIN ?? new URL("../../target/release/chat", import.meta.url).pathname
const ARTIFACTS = process.env.ARTIFACTS ?? new URL("../../artifacts", import.meta.url).pathname
const WAIT = {timeout: 10_000}

let server, base, browser

/** Starts the chat on a free port; resolves with its URL once it prints its listening line. */
function startServer(env = {}) {
  const child = spawn(CHAT_BIN, ["--port", "0"], {stdio: ["ignore", "pipe", "inherit"], env: {...process.env, ...env}})
  return new Promise((resolve, reject) => {
    child.on("error", reject)
    child.on("exit", (code) => reject(new Error(`chat exited early with ${code}`)))
    createInterface({input: child.stdout}).on("line", (line) => {
      const m = line.match(/listening on (http:\/\/127\.0\.0\.1:\d+)/)
      if (m) resolve({child, url: m[1]})
    })
  })
}

before(async () => {
  ;({child: server, url: base} = await startServer())
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  })
  mkdirSync(ARTIFACTS, {recursive: true})
})

after(async () => {
  await browser?.close()
  server?.kill("SIGTERM")
})

/** A page of its own browser context (own storage), as `user`, in the lobby. */
async function open(user, context, url = base) {
  context ??= await browser.newContext()
  const page = await context.newPage()
  page.on("pageerror", (e) => assert.fail(`page error for ${user}: ${e}`))
  await page.goto(`${url}/?user=${encodeURIComponent(user)}`)
  await page.locator("#status.connected").waitFor(WAIT)
  await page.locator("#rooms button.current", {hasText: "lobby"}).waitFor(WAIT)
  return page
}

const online = (page, user) => page.locator(`#online li[data-user="${user}"]`)

test("two users chat and see each other online, tabs and leaving included", async () => {
  const alice = await open("alice")
  const bob = await open("bob")
  await online(alice, "bob").waitFor(WAIT)
  await online(bob, "alice").waitFor(WAIT)

  await alice.fill("#body", "hello from alice")
  await alice.press("#body", "Enter")
  await bob.locator("#messages li", {hasText: "hello from alice"}).waitFor(WAIT)
  await alice.locator("#messages li", {hasText: "hello from alice"}).waitFor(WAIT)
  assert.equal(await alice.inputValue("#body"), "", "the input clears once the server says ok")

  // A second tab of alice's: one user, two metas.
  const aliceTab2 = await open("alice", alice.context())
  await online(bob, "alice").filter({hasText: "2 tabs"}).waitFor(WAIT)
  await bob.screenshot({path: `${ARTIFACTS}/chat.png`})

  // Rooms are separate: a message in #rust does not reach the lobby.
  await aliceTab2.click("#rooms button:has-text('rust')")
  await aliceTab2.locator("#rooms button.current", {hasText: "rust"}).waitFor(WAIT)
  await online(bob, "alice").filter({hasText: "2 tabs"}).waitFor({state: "detached", ...WAIT})
  await aliceTab2.fill("#body", "only in rust")
  await aliceTab2.press("#body", "Enter")
  await aliceTab2.locator("#messages li", {hasText: "only in rust"}).waitFor(WAIT)
  await bob.fill("#body", "still in the lobby")
  await bob.press("#body", "Enter")
  await alice.locator("#messages li", {hasText: "still in the lobby"}).waitFor(WAIT)
  assert.equal(await bob.locator("#messages li", {hasText: "only in rust"}).count(), 0)

  // Alice closes everything: bob sees her leave.
  await alice.context().close()
  await online(bob, "alice").waitFor({state: "detached", ...WAIT})
  await bob.context().close()
})

test("without WebSocket the page falls back to long-poll and still chats", async () => {
  // A page whose WebSocket never opens (as behind a proxy that blocks upgrades).
  const context = await browser.newContext()
  await context.addInitScript(() => {
    window.WebSocket = class BlockedWebSocket {
      static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3
      constructor() {
        this.readyState = 0
        setTimeout(() => { this.readyState = 3; this.onerror?.(new Event("error")); this.onclose?.({code: 1006}) }, 10)
      }
      send() {}
      close() {}
    }
  })
  const longpolls = []
  context.on("request", (r) => { if (r.url().includes("/socket/longpoll")) longpolls.push(r.url()) })
  const dave = await open("dave", context)
  const erin = await open("erin")
  await online(dave, "erin").waitFor(WAIT)
  await erin.fill("#body", "hello dave")
  await erin.press("#body", "Enter")
  await dave.locator("#messages li", {hasText: "hello dave"}).waitFor(WAIT)
  await dave.fill("#body", "hi erin, over long-poll")
  await dave.press("#body", "Enter")
  await erin.locator("#messages li", {hasText: "over long-poll"}).waitFor(WAIT)
  assert.ok(longpolls.length > 0, "the page used long-poll")
  await context.close()
  await erin.context().close()
})

test("two chat nodes sharing Redis: messages and presence cross nodes", async () => {
  const env = {REDIS_URL: process.env.REDIS_URL ?? "redis://127.0.0.1:6379"}
  const [a, b] = [await startServer(env), await startServer(env)]
  try {
    const frank = await open("frank", undefined, a.url)
    const grace = await open("grace", undefined, b.url)
    // Presence gossips between nodes (every second): each sees the other online.
    await online(frank, "grace").waitFor(WAIT)
    await online(grace, "frank").waitFor(WAIT)
    // Broadcasts cross at once; the link is up once presence crossed. (Unique text: the rooms'
    // history in Redis outlives a run.)
    const text = `from node A ${Date.now()}`
    await frank.fill("#body", text)
    await frank.press("#body", "Enter")
    await grace.locator("#messages li", {hasText: text}).waitFor(WAIT)
    // Clustered rooms keep history too (in Redis): a newcomer on node B sees what was said on A.
    const heidi = await open("heidi", undefined, b.url)
    await heidi.locator("#messages li", {hasText: text}).waitFor(WAIT)
    await frank.context().close()
    await grace.context().close()
    await heidi.context().close()
  } finally {
    a.child.kill("SIGTERM")
    b.child.kill("SIGTERM")
  }
})

test("against a compressing server (COMPRESS=1) Chromium negotiates permessage-deflate and chats", async () => {
  const node = await startServer({COMPRESS: "1"})
  try {
    // The handshake's answer, as Chromium saw it (DevTools protocol), for each page.
    const pageWithHandshake = async (user) => {
      const context = await browser.newContext()
      const page = await context.newPage()
      page.on("pageerror", (e) => assert.fail(`page error for ${user}: ${e}`))
      const cdp = await context.newCDPSession(page)
      await cdp.send("Network.enable")
      const handshake = new Promise((resolve) => cdp.on("Network.webSocketHandshakeResponseReceived", (e) => resolve(e.response)))
      await page.goto(`${node.url}/?user=${encodeURIComponent(user)}`)
      await page.locator("#status.connected").waitFor(WAIT)
      const response = await handshake
      const headers = Object.fromEntries(Object.entries(response.headers).map(([k, v]) => [k.toLowerCase(), v]))
      return {page, extensions: headers["sec-websocket-extensions"]}
    }
    const ivan = await pageWithHandshake("ivan")
    const judy = await pageWithHandshake("judy")
    for (const {extensions} of [ivan, judy]) {
      assert.match(extensions ?? "", /^permessage-deflate/, `negotiated: ${extensions}`)
      assert.match(extensions, /server_no_context_takeover/)
    }
    await online(ivan.page, "judy").waitFor(WAIT)
    // Long enough to be compressed both ways (the server compresses from 128 bytes; Chromium
    // compresses what it sends once negotiated), and inflated right on each side.
    const text = `compressed ${"all work and no play makes a long message ".repeat(5)}${Date.now()}`
    await ivan.page.fill("#body", text)
    await ivan.page.press("#body", "Enter")
    await judy.page.locator("#messages li", {hasText: text}).waitFor(WAIT)
    await ivan.page.locator("#messages li", {hasText: text}).waitFor(WAIT)
    await ivan.page.context().close()
    await online(judy.page, "ivan").waitFor({state: "detached", ...WAIT})
    await judy.page.context().close()
  } finally {
    node.child.kill("SIGTERM")
  }
})

test("a tab whose network goes away and comes back shows every message sent meanwhile, once", async () => {
  // Dave's network: the page's WebSockets pass through this route; "offline", the open one is
  // cut and new ones are refused, as when the network goes (Chromium's offline mode alone
  // leaves open WebSockets up).
  const context = await browser.newContext()
  let offline = false
  const open_ = new Set()
  await context.routeWebSocket(/\/socket\/websocket/, (ws) => {
    if (offline) return ws.close({code: 4000, reason: "offline"})
    ws.connectToServer()
    open_.add(ws)
  })
  const dave = await open("dave", context)
  const erin = await open("erin")
  await erin.fill("#body", "before the outage")
  await erin.press("#body", "Enter")
  await dave.locator("#messages li", {hasText: "before the outage"}).waitFor(WAIT)

  offline = true
  await context.setOffline(true)
  for (const ws of open_) await ws.close({code: 4000, reason: "offline"})
  open_.clear()
  await dave.locator("#status.reconnecting").waitFor(WAIT)
  for (const body of ["while away 1", "while away 2"]) {
    await erin.fill("#body", body)
    await erin.press("#body", "Enter")
    await erin.locator("#messages li", {hasText: body}).waitFor(WAIT)
  }

  offline = false
  await context.setOffline(false)
  await dave.locator("#status.connected").waitFor(WAIT)
  await dave.locator("#messages li", {hasText: "while away 2"}).waitFor(WAIT)
  await erin.fill("#body", "after the outage")
  await erin.press("#body", "Enter")
  await dave.locator("#messages li", {hasText: "after the outage"}).waitFor(WAIT)
  const shown = await dave.locator("#messages li").allTextContents()
  const ours = shown.filter((t) => /outage|while away/.test(t))
  assert.deepEqual(ours, ["erinbefore the outage", "erinwhile away 1", "erinwhile away 2", "erinafter the outage"])
  await dave.screenshot({path: `${ARTIFACTS}/chat-recovered.png`})
  // Someone entering the room now sees its recent messages.
  const frank = await open("frank")
  await frank.locator("#messages li", {hasText: "after the outage"}).waitFor(WAIT)
  await frank.context().close()
  await context.close()
  await erin.context().close()
})

test("the page shows that it is reconnecting when the server goes away", async () => {
  const carol = await open("carol")
  server.kill("SIGTERM")
  await carol.locator("#status.reconnecting").waitFor(WAIT)
  await carol.screenshot({path: `${ARTIFACTS}/chat-reconnecting.png`})
  await carol.context().close()
})
