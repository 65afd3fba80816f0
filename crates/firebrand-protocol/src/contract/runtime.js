// The runtime of a generated contract module (firebrand_protocol::contract::RUNTIME_JS): the
// same for every contract, with no imports (it works in a page without a build step, in a
// bundle and in Node alike). Its types are in the generated declarations next to it
// (contract.d.ts for contract.js). A typed channel is the official client's Channel itself and
// a typed presence its Presence: nothing changes on the wire.
// @ts-check

/**
 * `socket.channel(topic, params)`; params may be a function, re-read on every rejoin.
 * @param {import("phoenix").Socket} socket
 * @param {string} topic
 * @param {object | (() => object)} params
 * @returns {any} a `TypedChannel<C>` (see the declarations)
 */
export function typedChannel(socket, topic, params) {
  return socket.channel(topic, /** @type {object} */ (params))
}

/**
 * `new Presence(channel)`, with the client's own `Presence` class (passed in, so that this
 * module imports nothing).
 * @param {typeof import("phoenix").Presence} Presence
 * @param {any} channel a `TypedChannel<C>`
 * @returns {any} a `TypedPresence<C>` (see the declarations)
 */
export function typedPresence(Presence, channel) {
  return new Presence(channel)
}
