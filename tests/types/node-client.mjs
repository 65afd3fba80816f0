// @ts-check
/// <reference types="node" />
// The typed wrapper from Node: the official phoenix npm client and the chat's generated
// contract (examples/chat/assets/contract.d.ts, its runtime contract.js), type-checked by the
// same tsc run as the page. With a chat server's URL it also runs: joins a room, pushes a
// message and waits for it to come back as the room's `new_msg` event.
//
//   node node-client.mjs http://127.0.0.1:4000     (Node 20: add --experimental-websocket)
import {Socket, Presence} from "phoenix"
import {typedChannel, typedPresence} from "../../examples/chat/assets/contract.js"

/** @typedef {import("../../examples/chat/assets/contract.js").RoomContract} RoomContract */

const url = process.argv[2]
if (!url) {
  console.error("usage: node node-client.mjs http://HOST:PORT")
  process.exit(2)
}
const TIMEOUT_MS = 10_000
const body = `hello from node ${process.pid}`

const socket = new Socket(`${url.replace(/^http/, "ws")}/socket`, {params: {user: "node"}})
socket.connect()
/** @type {import("../../examples/chat/assets/contract.js").TypedChannel<RoomContract>} */
const room = typedChannel(socket, "room:node", {})
const presence = typedPresence(Presence, room)

/** @type {ReturnType<typeof setTimeout> | undefined} */
let timer
const done = new Promise((resolve, reject) => {
  timer = setTimeout(() => reject(new Error(`no reply within ${TIMEOUT_MS} ms`)), TIMEOUT_MS)
  room.on("new_msg", (msg, position) => {
    // `msg` is a Message: user, body, at (a number), as the Rust contract says.
    if (msg.body === body && msg.user === "node" && typeof msg.at === "number" && position) resolve(msg)
  })
  room.join()
    .receive("ok", ({position}) => {
      if (position === undefined) reject(new Error("a room is recoverable: its join reply has a position"))
      room.push("new_msg", {body})
        .receive("error", ({reason}) => reject(new Error(`push refused: ${reason}`)))
        .receive("timeout", () => reject(new Error("push timed out")))
    })
    .receive("error", ({reason}) => reject(new Error(`join refused: ${reason}`)))
    .receive("timeout", () => reject(new Error("join timed out")))
})

try {
  const msg = await done
  const online = presence.list((name, {metas}) => `${name} since ${metas[0]?.online_at}`)
  console.log(`node-client: got ${JSON.stringify(msg)} back; online: ${online.join(", ")}`)
} catch (e) {
  console.error(`node-client: ${e}`)
  process.exitCode = 1
} finally {
  clearTimeout(timer)
  socket.disconnect()
}
