// permessage-deflate with Node's `ws` (the official client's transport here), which offers it by
// default: negotiated when the server runs with COMPRESS=1 (APP.md), not otherwise; a large
// reply and a broadcast arrive intact either way (`ws` inflates compressed messages itself).
import {test} from "node:test"
import assert from "node:assert/strict"
import WebSocket from "ws"
import {URL_, within} from "./support.mjs"

const compress = process.env.COMPRESS === "1"

/** Opens a raw V2 socket; resolves once open. */
function open() {
  const ws = new WebSocket(`${URL_}/websocket?vsn=2.0.0`, {perMessageDeflate: {}})
  let response = null
  ws.on("upgrade", (res) => { response = res.headers["sec-websocket-extensions"] ?? null })
  const frames = []
  const waiting = []
  ws.on("message", (data) => {
    const msg = JSON.parse(data.toString())
    const w = waiting.findIndex(([pred]) => pred(msg))
    if (w >= 0) waiting.splice(w, 1)[0][1](msg)
    else frames.push(msg)
  })
  const next = (pred, what) => within(new Promise((resolve) => {
    const i = frames.findIndex(pred)
    if (i >= 0) return resolve(frames.splice(i, 1)[0])
    waiting.push([pred, resolve])
  }), what)
  return within(new Promise((resolve, reject) => {
    ws.on("open", () => resolve({ws, next, response}))
    ws.on("error", reject)
  }), "the socket to open")
}

test(`permessage-deflate is ${compress ? "" : "not "}negotiated (COMPRESS=${process.env.COMPRESS ?? ""})`, async () => {
  const {ws, next, response} = await open()
  try {
    if (compress) {
      assert.equal(ws.extensions, "permessage-deflate")
      assert.equal(response, "permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    } else {
      assert.equal(ws.extensions, "")
      assert.equal(response, null)
    }
    ws.send(JSON.stringify(["1", "1", "room:deflate", "phx_join", {}]))
    await next((m) => m[3] === "phx_reply" && m[1] === "1", "the join reply")
    const payload = {items: Array.from({length: 200}, (_, i) => ({user: `user${i}`, status: "online"}))}
    // A large client message (compressed by ws when negotiated) and its echo.
    ws.send(JSON.stringify(["1", "2", "room:deflate", "ping", payload]))
    const reply = await next((m) => m[3] === "phx_reply" && m[1] === "2", "the ping reply")
    assert.deepEqual(reply[4], {status: "ok", response: payload})
    ws.send(JSON.stringify(["1", "3", "room:deflate", "new_msg", payload]))
    const b = await next((m) => m[3] === "new_msg", "the broadcast")
    assert.deepEqual(b[4], payload)
  } finally {
    ws.terminate()
  }
})
