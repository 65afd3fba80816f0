//! Contracts as TypeScript, with [ts-rs](https://docs.rs/ts-rs): every payload type derives
//! `ts_rs::TS` next to its serde derives (ts-rs reads the serde attributes, so the TypeScript
//! says what the JSON is), and [`typescript`] writes one self-contained declaration file.

use std::any::TypeId;
use std::collections::HashSet;
use std::fmt::Write as _;

use ts_rs::{TS, TypeVisitor};

use super::{Contract, Empty, ErrorReply, Event, EventList, Push, PushList};

/// A tuple of [`Push`] types whose payloads and replies have TypeScript types.
pub trait TsPushes: PushList {
    /// Adds `"event": {payload: P; reply: R}` entries and the types they name.
    #[doc(hidden)]
    fn write(out: &mut Writer);
}

/// A tuple of [`Event`] types with TypeScript types.
pub trait TsEvents: EventList {
    /// Adds `"event": T` entries and the types they name.
    #[doc(hidden)]
    fn write(out: &mut Writer);
}

/// What [`typescript`] collects: the declarations (each type once, dependencies first) and the
/// entries of the contract being written.
#[doc(hidden)]
#[derive(Default)]
pub struct Writer {
    seen: HashSet<TypeId>,
    decls: String,
    entries: String,
}

impl Writer {
    /// Declares `T` (and what it names) unless it is built in or declared already; returns how
    /// the contract refers to it.
    fn declare<T: TS + 'static + ?Sized>(&mut self) -> String {
        struct Deps<'a>(&'a mut Writer);
        impl TypeVisitor for Deps<'_> {
            fn visit<T: TS + 'static + ?Sized>(&mut self) {
                self.0.declare::<T>();
            }
        }
        if TypeId::of::<T>() == TypeId::of::<Empty>() {
            return "Empty".into();
        }
        // Only types with a declaration of their own (derived ones) are written out; built-in
        // and generic container types are inlined.
        if T::output_path().is_some() && self.seen.insert(TypeId::of::<T>()) {
            T::visit_dependencies(&mut Deps(self));
            if let Some(docs) = T::docs() {
                self.decls.push_str(&docs);
            }
            let _ = writeln!(self.decls, "export {}\n", T::decl());
        }
        T::name()
    }

    #[doc(hidden)]
    pub fn push<P: Push + TS>(&mut self)
    where
        P::Reply: TS,
    {
        let (payload, reply) = (self.declare::<P>(), self.declare::<P::Reply>());
        let _ = writeln!(
            self.entries,
            "    {:?}: {{ payload: {payload}; reply: {reply} }};",
            P::EVENT
        );
    }

    #[doc(hidden)]
    pub fn event<E: Event + TS>(&mut self) {
        let ty = self.declare::<E>();
        let _ = writeln!(self.entries, "    {:?}: {ty};", E::EVENT);
    }

    fn take_entries(&mut self) -> String {
        std::mem::take(&mut self.entries)
    }
}

macro_rules! ts_lists {
    ($( ($($t:ident),+) )+) => { $(
        impl<$($t: Push + TS),+> TsPushes for ($($t,)+) where $($t::Reply: TS),+ {
            fn write(out: &mut Writer) {
                $(out.push::<$t>();)+
            }
        }
        impl<$($t: Event + TS),+> TsEvents for ($($t,)+) {
            fn write(out: &mut Writer) {
                $(out.event::<$t>();)+
            }
        }
    )+ };
}

ts_lists! {
    (A)
    (A, B)
    (A, B, C)
    (A, B, C, D)
    (A, B, C, D, E)
    (A, B, C, D, E, F)
    (A, B, C, D, E, F, G)
    (A, B, C, D, E, F, G, H)
    (A, B, C, D, E, F, G, H, I)
    (A, B, C, D, E, F, G, H, I, J)
    (A, B, C, D, E, F, G, H, I, J, K)
    (A, B, C, D, E, F, G, H, I, J, K, L)
    (A, B, C, D, E, F, G, H, I, J, K, L, M)
    (A, B, C, D, E, F, G, H, I, J, K, L, M, N)
    (A, B, C, D, E, F, G, H, I, J, K, L, M, N, O)
    (A, B, C, D, E, F, G, H, I, J, K, L, M, N, O, Q)
}

impl TsPushes for () {
    fn write(_: &mut Writer) {}
}

impl TsEvents for () {
    fn write(_: &mut Writer) {}
}

/// The generic part of every generated file: the official client's `Channel` and `Presence`,
/// typed by a contract (views of the same objects: nothing changes on the wire). Declarations
/// only: the two functions are [`RUNTIME_JS`], the module served next to the declarations.
const PRELUDE: &str = r#"import type { Channel, Presence, Push, Socket } from "phoenix";

/** The payload `{}`. */
export type Empty = Record<string, never>;

/** Every error reply of a typed channel: a refused join, a failed push, a payload that does not decode. */
export type ErrorReply = { reason: string };

/** What a contract says: see the interfaces below. */
export interface ContractShape {
  joinParams: unknown;
  joinReply: unknown;
  pushes: Record<string, { payload: unknown; reply: unknown }>;
  events: Record<string, unknown>;
  meta: unknown;
}

/** A push (or join) whose replies are typed. */
export interface TypedPush<Reply> {
  receive(status: "ok", callback: (response: Reply) => void): TypedPush<Reply>;
  receive(status: "error", callback: (response: ErrorReply) => void): TypedPush<Reply>;
  receive(status: "timeout", callback: () => void): TypedPush<Reply>;
}

/** The official client's Channel, typed by contract `C`: the same object, the same wire. */
export interface TypedChannel<C extends ContractShape> {
  readonly topic: string;
  readonly state: Channel["state"];
  join(timeout?: number): TypedPush<C["joinReply"]>;
  leave(timeout?: number): Push;
  push<E extends keyof C["pushes"] & string>(
    event: E,
    payload: C["pushes"][E]["payload"],
    timeout?: number,
  ): TypedPush<C["pushes"][E]["reply"]>;
  /** `position` is the message's position on a recoverable topic (send it back as `since`). */
  on<E extends keyof C["events"] & string>(
    event: E,
    callback: (payload: C["events"][E], position?: string | null) => void,
  ): number;
  off(event: keyof C["events"] & string, ref?: number): void;
  onClose(callback: (payload: unknown, ref: unknown, joinRef: unknown) => void): number;
  onError(callback: (reason?: unknown) => void): number;
}

/** A presence: one meta per open connection (tab, device) of its key, each with its `phx_ref`. */
export interface PresenceEntry<Meta> {
  metas: (Meta & { phx_ref: string })[];
}

/** The official client's Presence over a typed channel: its metas typed by the contract. */
export interface TypedPresence<C extends ContractShape> {
  onSync(callback: () => void): void;
  onJoin(callback: (key: string, current: PresenceEntry<C["meta"]> | undefined, joined: PresenceEntry<C["meta"]>) => void): void;
  onLeave(callback: (key: string, current: PresenceEntry<C["meta"]>, left: PresenceEntry<C["meta"]>) => void): void;
  list<T>(chooser: (key: string, presence: PresenceEntry<C["meta"]>) => T): T[];
}

/** `socket.channel(topic, params)`, typed by contract `C` (params may be a function, re-read on every rejoin). */
export function typedChannel<C extends ContractShape>(
  socket: Socket,
  topic: string,
  params: C["joinParams"] | (() => C["joinParams"]),
): TypedChannel<C>;

/** `new Presence(channel)` with the client's `Presence` class, its metas typed by contract `C`. */
export function typedPresence<C extends ContractShape>(
  presence: typeof Presence,
  channel: TypedChannel<C>,
): TypedPresence<C>;
"#;

/// The runtime of every generated module: `typedChannel()` and `typedPresence()` as a plain
/// JavaScript ES module (with JSDoc types) that imports nothing. Serve or ship it as `X.js`
/// next to the declarations written by [`typescript`] as `X.d.ts`: TypeScript (and editors
/// checking JavaScript) read the types from `X.d.ts`, browsers and Node run `X.js`, with no
/// build step.
pub const RUNTIME_JS: &str = include_str!("runtime.js");

/// Writes contracts as one TypeScript declaration module (a `.d.ts`): the payload types (each
/// once), an interface per contract, and `TypedChannel<C>` / `typedChannel()` over the
/// official `phoenix` client's `Channel`, `TypedPresence<C>` / `typedPresence()` over its
/// `Presence` (typings from `@types/phoenix`: the phoenix package ships none of its own). The
/// functions' code is [`RUNTIME_JS`], the same for every contract.
///
/// `contracts` pairs each contract's TypeScript name with its description, made by
/// [`contract`]:
///
/// ```
/// # use firebrand_protocol::contract::{self, Contract, Empty, Event, Push};
/// # #[derive(serde::Serialize, serde::Deserialize, ts_rs::TS)] struct NewMsg { body: String }
/// # impl Push for NewMsg { const EVENT: &'static str = "new_msg"; type Reply = Empty; }
/// # struct Room;
/// # impl Contract for Room { type JoinParams = Empty; type JoinReply = Empty; type Pushes = (NewMsg,); type Events = (); type Meta = Empty; }
/// let ts = contract::typescript(&[contract::contract::<Room>("RoomContract")]);
/// assert!(ts.contains(r#""new_msg": { payload: NewMsg; reply: Empty };"#));
/// assert!(ts.contains("export type NewMsg = { body: string, };"));
/// ```
pub fn typescript(contracts: &[Described]) -> String {
    let mut out = Writer::default();
    out.seen.insert(TypeId::of::<ErrorReply>());
    let mut interfaces = String::new();
    for c in contracts {
        interfaces.push_str(&(c.write)(&mut out, c.name));
    }
    let text = format!(
        "// Generated by firebrand from Rust contracts (firebrand_protocol::contract::typescript).\n\
         // Do not edit: change the Rust types and generate again. Declarations only: the code of\n\
         // typedChannel() and typedPresence() is the JavaScript module of the same name\n\
         // (firebrand_protocol::contract::RUNTIME_JS).\n\n{PRELUDE}\n{}{interfaces}",
        out.decls
    );
    // ts-rs ends some lines with a space: none in the file (linters and diffs flag them).
    text.lines()
        .map(|l| l.trim_end().to_owned() + "\n")
        .collect()
}

/// A contract ready to be written by [`typescript`].
pub struct Described {
    name: &'static str,
    write: fn(&mut Writer, &str) -> String,
}

/// Describes contract `C` under the TypeScript name `name`.
pub fn contract<C: Contract>(name: &'static str) -> Described
where
    C::JoinParams: TS,
    C::JoinReply: TS,
    C::Meta: TS,
    C::Pushes: TsPushes,
    C::Events: TsEvents,
{
    fn write<C: Contract>(out: &mut Writer, name: &str) -> String
    where
        C::JoinParams: TS,
        C::JoinReply: TS,
        C::Meta: TS,
        C::Pushes: TsPushes,
        C::Events: TsEvents,
    {
        let params = out.declare::<C::JoinParams>();
        let reply = out.declare::<C::JoinReply>();
        let meta = out.declare::<C::Meta>();
        C::Pushes::write(out);
        let pushes = out.take_entries();
        C::Events::write(out);
        let events = out.take_entries();
        format!(
            "export interface {name} extends ContractShape {{\n  joinParams: {params};\n  \
             joinReply: {reply};\n  pushes: {{\n{pushes}  }};\n  events: {{\n{events}  }};\n  \
             meta: {meta};\n}}\n\n"
        )
    }
    Described {
        name,
        write: write::<C>,
    }
}
