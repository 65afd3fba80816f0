// Tokens minted by the backend's usual JWT libraries — npm `jsonwebtoken` (HS256, RS256) and
// Python's PyJWT — accepted by firebrand-server through phoenix.js's `params` and `authToken`;
// bad tokens refused (phoenix.js sees the socket error).
import {test, before, after, afterEach} from "node:test"
import assert from "node:assert/strict"
import {execFileSync} from "node:child_process"
import {generateKeyPairSync} from "node:crypto"
import jwt from "jsonwebtoken"
import {connected, disconnectAll, outcome, socket, startServer, topic, within} from "./support.mjs"

const SECRET = "js-suite-secret-not-for-production"
const NAMESPACES = `
[[namespace]]
prefix = "room:"
`
let hs, rs, rsKeys

before(async () => {
  hs = await startServer(`[server]\nlisten = "127.0.0.1:0"\n[auth]\njwt_hs256_secret = "${SECRET}"\n${NAMESPACES}`)
  rsKeys = generateKeyPairSync("rsa", {
    modulusLength: 2048,
    publicKeyEncoding: {type: "spki", format: "pem"},
    privateKeyEncoding: {type: "pkcs8", format: "pem"},
  })
  rs = await startServer(
    `[server]\nlisten = "127.0.0.1:0"\n[auth]\njwt_public_key_file = "jwt.pub.pem"\njwt_algorithm = "RS256"\n${NAMESPACES}`,
    {"jwt.pub.pem": rsKeys.publicKey},
  )
})
after(async () => {
  assert.equal(await hs.stop(), 0, "exit code on SIGTERM")
  assert.equal(await rs.stop(), 0, "exit code on SIGTERM")
})
afterEach(disconnectAll)

/** Joins a fresh room: resolves with [status, response]. */
const joinRoom = (s) => outcome(s.channel(topic("room:")).join())

test("HS256 token from jsonwebtoken in params", async () => {
  const token = jwt.sign({sub: "alice", info: {name: "Alice"}}, SECRET, {algorithm: "HS256", expiresIn: "5m"})
  const s = await connected(hs.ws, {params: {token}})
  assert.deepEqual(await joinRoom(s), ["ok", {user: "alice"}])
})

test("HS256 token from jsonwebtoken as authToken", async () => {
  const token = jwt.sign({sub: "bob"}, SECRET, {algorithm: "HS256", expiresIn: "5m"})
  const s = await connected(hs.ws, {authToken: token})
  assert.deepEqual(await joinRoom(s), ["ok", {user: "bob"}])
})

test("RS256 token from jsonwebtoken, in params and as authToken", async () => {
  const token = jwt.sign({sub: "carol"}, rsKeys.privateKey, {algorithm: "RS256", expiresIn: "5m"})
  const a = await connected(rs.ws, {params: {token}})
  assert.deepEqual(await joinRoom(a), ["ok", {user: "carol"}])
  const b = await connected(rs.ws, {authToken: token})
  assert.deepEqual(await joinRoom(b), ["ok", {user: "carol"}])
})

test("HS256 token from PyJWT (python3-jwt)", async () => {
  const py = `import os, time, jwt
print(jwt.encode({"sub": "dave", "exp": int(time.time()) + 300}, os.environ["SECRET"], algorithm="HS256"))`
  const token = execFileSync("/usr/bin/python3", ["-c", py], {env: {...process.env, SECRET}, encoding: "utf8"}).trim()
  const s = await connected(hs.ws, {params: {token}})
  assert.deepEqual(await joinRoom(s), ["ok", {user: "dave"}])
})

/** Resolves with the socket error phoenix.js reports; fails if the socket opens. */
function refused(url, opts) {
  const s = socket(url, opts)
  return within(new Promise((resolve, reject) => {
    s.onOpen(() => reject(new Error("the socket opened")))
    s.onError((e) => resolve(e))
    s.connect()
  }), "the socket error")
}

test("bad tokens are refused: phoenix.js sees the socket error", async () => {
  const now = Math.floor(Date.now() / 1000)
  const bad = {
    "wrong secret": jwt.sign({sub: "eve"}, "another-secret", {algorithm: "HS256", expiresIn: "5m"}),
    expired: jwt.sign({sub: "eve", exp: now - 3600}, SECRET, {algorithm: "HS256"}),
    "no exp": jwt.sign({sub: "eve"}, SECRET, {algorithm: "HS256"}),
    "HS256 on the RS256 server": jwt.sign({sub: "eve"}, SECRET, {algorithm: "HS256", expiresIn: "5m"}),
  }
  for (const [name, token] of Object.entries(bad)) {
    const url = name.includes("RS256") ? rs.ws : hs.ws
    await refused(url, {params: {token}}).catch((e) => assert.fail(`${name} in params: ${e.message}`))
    await refused(url, {authToken: token}).catch((e) => assert.fail(`${name} as authToken: ${e.message}`))
  }
  // No token at all: refused too (a key is configured, so anonymous connections are not allowed).
  await refused(hs.ws, {})
})
