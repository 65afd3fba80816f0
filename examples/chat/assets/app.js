// @ts-check
// The chat page: the official phoenix client (embedded by the server from npm), a socket per
// tab, a channel per room, and Presence for who is online.
//
// Plain JavaScript, served as it is: no build step. Its types come from the Rust contract
// (examples/chat-contract), generated into contract.d.ts; `tsc --strict` checks this file
// against them and against @types/phoenix (tests/types/run.sh). "phoenix" is mapped to the
// embedded client by the import map in index.html.
import {Socket, Presence} from "phoenix"
import {typedChannel, typedPresence} from "./contract.js"

/**
 * @typedef {import("./contract.js").RoomContract} RoomContract
 * @typedef {import("./contract.js").TypedChannel<RoomContract>} RoomChannel
 * @typedef {import("./contract.js").TypedPresence<RoomContract>} RoomPresence
 */

/**
 * An element of the page (index.html has them all).
 * @param {string} id
 * @returns {HTMLElement}
 */
function $(id) {
  const element = document.getElementById(id)
  if (!element) throw new Error(`no #${id} in the page`)
  return element
}

/**
 * An input of the page.
 * @param {string} id
 * @returns {HTMLInputElement}
 */
function input(id) {
  const element = $(id)
  if (!(element instanceof HTMLInputElement)) throw new Error(`#${id} is not an input`)
  return element
}

const ROOMS = ["lobby", "rust", "elixir"]

/** What a click on a room does (set by `start`). @type {(room: string) => void} */
let pickRoom = () => {}

// The user name: ?user=… (handy for several users in one browser), else remembered, else asked.
const user = new URLSearchParams(location.search).get("user") || localStorage.getItem("chat:user")
if (user) {
  start(user)
} else {
  $("login").hidden = false
  $("login").addEventListener("submit", (e) => {
    e.preventDefault()
    const name = input("name").value.trim()
    localStorage.setItem("chat:user", name)
    $("login").hidden = true
    start(name)
  })
}

/** @param {string} user */
function start(user) {
  $("me").textContent = user
  // The server authenticates the socket in its `connect` callback from these params.
  // If the WebSocket cannot open (a proxy that blocks it), fall back to long-poll after 2.5 s.
  const socket = new Socket("/socket", {params: {user}, longPollFallbackMs: 2500})
  // The client reconnects by itself (with backoff) and rejoins its channels: show it.
  socket.onOpen(() => setStatus("connected"))
  socket.onError(() => setStatus("reconnecting"))
  socket.onClose(() => setStatus("reconnecting"))
  socket.connect()

  /** @type {RoomChannel | null} */
  let channel = null
  /** @param {string} room */
  const joinRoom = (room) => {
    if (channel) channel.leave()
    $("messages").replaceChildren()
    $("online").replaceChildren()
    // The position of the last message shown: phoenix.js re-evaluates the params on every
    // rejoin, so a tab that lost its connection asks for what it missed (`since`), and gets it
    // before newer messages, each once.
    /** @type {string | null | undefined} */
    let last = null
    /** @type {RoomChannel} */
    const joined = typedChannel(socket, `room:${room}`, () => (last ? {since: last} : {}))
    channel = joined
    // Presence merges presence_state and presence_diff into a list of users with their metas
    // (one meta per open tab).
    const presence = typedPresence(Presence, joined)
    presence.onSync(() => renderOnline(presence))
    joined.on("new_msg", ({user, body}, position) => {
      last = position
      addMessage(user, body)
    })
    joined.join()
      .receive("ok", ({position, recovered}) => {
        // Not recovered: the server restarted, or the tab was away for longer than the room's
        // history reaches. Say so, and go on from now.
        if (recovered === false) addMessage("server", "messages sent while you were away are missing", true)
        if (last === null || recovered === false) last = position
        renderRooms(room)
      })
      .receive("error", ({reason}) => addMessage("server", `cannot join ${room}: ${reason}`, true))
  }

  $("send").addEventListener("submit", (e) => {
    e.preventDefault()
    const body = input("body").value.trim()
    if (!body || !channel) return
    channel.push("new_msg", {body})
      .receive("ok", () => { input("body").value = "" })
      .receive("error", ({reason}) => addMessage("server", reason, true))
      .receive("timeout", () => addMessage("server", "not sent: the server did not answer", true))
  })
  $("new-room").addEventListener("submit", (e) => {
    e.preventDefault()
    const room = input("room-name").value.trim().toLowerCase()
    if (!room) return
    if (!ROOMS.includes(room)) ROOMS.push(room)
    input("room-name").value = ""
    joinRoom(room)
  })
  pickRoom = joinRoom
  joinRoom("lobby")
}

/** @param {"connected" | "reconnecting"} state */
function setStatus(state) {
  $("status").className = state
  $("status").textContent = state === "connected" ? "connected" : "reconnecting…"
}

/** @param {string} current */
function renderRooms(current) {
  $("rooms").replaceChildren(...ROOMS.map((room) => {
    const button = document.createElement("button")
    button.textContent = `# ${room}`
    button.className = room === current ? "current" : ""
    button.addEventListener("click", () => pickRoom(room))
    const li = document.createElement("li")
    li.append(button)
    return li
  }))
}

/** @param {RoomPresence} presence */
function renderOnline(presence) {
  const items = presence.list((name, {metas}) => {
    const li = document.createElement("li")
    li.dataset.user = name
    li.textContent = metas.length > 1 ? `${name} (${metas.length} tabs)` : name
    return li
  })
  $("online").replaceChildren(...items)
}

/**
 * @param {string} user
 * @param {string} body
 * @param {boolean} [error]
 */
function addMessage(user, body, error = false) {
  const li = document.createElement("li")
  if (error) li.className = "error"
  const who = document.createElement("span")
  who.className = "user"
  who.textContent = user
  li.append(who, document.createTextNode(body))
  $("messages").append(li)
  li.scrollIntoView()
}
