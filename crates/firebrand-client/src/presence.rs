//! Presence syncing, as phoenix.js's `Presence` class does it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::channel::ChannelEvent;

/// Presences by key: what `presence_state` carries, `{"<key>": {"metas": [...]}}`.
///
/// Keys are ordered (phoenix.js keeps insertion order); the contents are the same.
pub type PresenceState = BTreeMap<String, PresenceEntry>;

/// One key's presences: a meta per tracked connection, plus any fields the server's `fetch`
/// added (e.g. `"user"`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PresenceEntry {
    /// The metas, each an object with a `phx_ref` (and `phx_ref_prev` after an update).
    pub metas: Vec<Value>,
    /// Other fields of the entry, kept as the server sent them.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// A `presence_diff` payload: `{"joins": {...}, "leaves": {...}}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PresenceDiff {
    /// Presences that joined (for an update, the new meta).
    #[serde(default)]
    pub joins: PresenceState,
    /// Presences that left (for an update, the old meta).
    #[serde(default)]
    pub leaves: PresenceState,
}

fn phx_ref(meta: &Value) -> Option<&Value> {
    meta.get("phx_ref")
}

fn refs(metas: &[Value]) -> Vec<Option<&Value>> {
    metas.iter().map(phx_ref).collect()
}

/// Merges a full `presence_state` into `state` (phoenix.js `Presence.syncState`): the
/// difference, by `phx_ref`, becomes joins and leaves applied with [`sync_diff`], so the
/// callbacks see exactly what changed.
///
/// `on_join(key, current, joined)` and `on_leave(key, current, left)` are called as in
/// phoenix.js (`current` is `None` for a key that was absent; on leave it is the entry after the
/// removal).
pub fn sync_state(
    state: PresenceState,
    new_state: PresenceState,
    on_join: impl FnMut(&str, Option<&PresenceEntry>, &PresenceEntry),
    on_leave: impl FnMut(&str, &PresenceEntry, &PresenceEntry),
) -> PresenceState {
    let mut diff = PresenceDiff::default();
    for (key, presence) in &state {
        if !new_state.contains_key(key) {
            diff.leaves.insert(key.clone(), presence.clone());
        }
    }
    for (key, mut new_presence) in new_state {
        let Some(current) = state.get(&key) else {
            diff.joins.insert(key, new_presence);
            continue;
        };
        let new_refs = refs(&new_presence.metas);
        let cur_refs = refs(&current.metas);
        let left: Vec<Value> = current
            .metas
            .iter()
            .filter(|m| !new_refs.contains(&phx_ref(m)))
            .cloned()
            .collect();
        let joined: Vec<Value> = new_presence
            .metas
            .iter()
            .filter(|m| !cur_refs.contains(&phx_ref(m)))
            .cloned()
            .collect();
        if !left.is_empty() {
            let mut leave = current.clone();
            leave.metas = left;
            diff.leaves.insert(key.clone(), leave);
        }
        if !joined.is_empty() {
            new_presence.metas = joined;
            diff.joins.insert(key, new_presence);
        }
    }
    sync_diff(state, diff, on_join, on_leave)
}

/// Applies a `presence_diff` to `state` (phoenix.js `Presence.syncDiff`): **joins first**, each
/// replacing the key's entry and keeping the old metas whose `phx_ref` is not re-sent (in front),
/// **then leaves**, removing metas by `phx_ref` and the key when none remain.
pub fn sync_diff(
    mut state: PresenceState,
    diff: PresenceDiff,
    mut on_join: impl FnMut(&str, Option<&PresenceEntry>, &PresenceEntry),
    mut on_leave: impl FnMut(&str, &PresenceEntry, &PresenceEntry),
) -> PresenceState {
    for (key, new_presence) in diff.joins {
        let mut entry = new_presence.clone();
        let current = state.remove(&key);
        if let Some(current) = &current {
            let joined_refs = refs(&entry.metas);
            let mut metas: Vec<Value> = current
                .metas
                .iter()
                .filter(|m| !joined_refs.contains(&phx_ref(m)))
                .cloned()
                .collect();
            metas.append(&mut entry.metas);
            entry.metas = metas;
        }
        state.insert(key.clone(), entry);
        on_join(&key, current.as_ref(), &new_presence);
    }
    for (key, left) in diff.leaves {
        let Some(current) = state.get_mut(&key) else {
            continue;
        };
        let gone = refs(&left.metas);
        current.metas.retain(|m| !gone.contains(&phx_ref(m)));
        on_leave(&key, current, &left);
        if current.metas.is_empty() {
            state.remove(&key);
        }
    }
    state
}

type OnJoin = Box<dyn FnMut(&str, Option<&PresenceEntry>, &PresenceEntry) + Send>;
type OnLeave = Box<dyn FnMut(&str, &PresenceEntry, &PresenceEntry) + Send>;

/// The presences of one channel, kept in sync from its `presence_state` and `presence_diff`
/// events, with the results of phoenix.js's `Presence` class.
///
/// Feed it every event of the channel ([`Channel::events`](crate::Channel::events)); it picks
/// its own. Diffs that arrive before the first `presence_state` after a (re)join are queued and
/// applied right after that state, as phoenix.js does with `pendingDiffs`.
///
/// ```
/// use firebrand_client::{ChannelEvent, Presence};
/// use serde_json::json;
///
/// let mut presence = Presence::new();
/// let state = json!({"alice": {"metas": [{"phx_ref": "a1"}]}});
/// let synced = presence.handle(&ChannelEvent::Message {
///     event: "presence_state".into(),
///     payload: state.into(),
/// });
/// assert!(synced);
/// assert_eq!(presence.list().map(|(k, _)| k).collect::<Vec<_>>(), ["alice"]);
/// ```
pub struct Presence {
    state: PresenceState,
    pending: Vec<PresenceDiff>,
    synced: bool,
    state_event: String,
    diff_event: String,
    on_join: Option<OnJoin>,
    on_leave: Option<OnLeave>,
}

impl fmt::Debug for Presence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Presence")
            .field("state", &self.state)
            .field("pending", &self.pending.len())
            .field("synced", &self.synced)
            .finish_non_exhaustive()
    }
}

impl Default for Presence {
    fn default() -> Self {
        Presence::new()
    }
}

impl Presence {
    /// An empty presence list listening to `presence_state` and `presence_diff`.
    pub fn new() -> Self {
        Presence::with_events("presence_state", "presence_diff")
    }

    /// Listens to other event names (phoenix.js's `opts.events`).
    pub fn with_events(state: impl Into<String>, diff: impl Into<String>) -> Self {
        Presence {
            state: PresenceState::new(),
            pending: Vec::new(),
            synced: false,
            state_event: state.into(),
            diff_event: diff.into(),
            on_join: None,
            on_leave: None,
        }
    }

    /// Calls `f(key, current, joined)` for every join (phoenix.js `onJoin`).
    pub fn on_join(
        mut self,
        f: impl FnMut(&str, Option<&PresenceEntry>, &PresenceEntry) + Send + 'static,
    ) -> Self {
        self.on_join = Some(Box::new(f));
        self
    }

    /// Calls `f(key, current, left)` for every leave (phoenix.js `onLeave`).
    pub fn on_leave(
        mut self,
        f: impl FnMut(&str, &PresenceEntry, &PresenceEntry) + Send + 'static,
    ) -> Self {
        self.on_leave = Some(Box::new(f));
        self
    }

    /// Takes one channel event. Returns `true` when the list changed and is in sync (the moment
    /// phoenix.js calls `onSync`); other events are ignored. A payload that is not a presence
    /// state or diff is logged and ignored.
    pub fn handle(&mut self, event: &ChannelEvent) -> bool {
        let (name, payload) = match event {
            // A (re)join has a new join ref: diffs wait for its state.
            ChannelEvent::Joined { .. } => {
                self.synced = false;
                return false;
            }
            ChannelEvent::Message { event, payload } => (event, payload),
            _ => return false,
        };
        if *name == self.state_event {
            let Ok(new_state) = payload.decode::<PresenceState>() else {
                tracing::warn!(%payload, "presence_state payload is not a presence state");
                return false;
            };
            let state = std::mem::take(&mut self.state);
            let (on_join, on_leave) = self.callbacks();
            let mut state = sync_state(state, new_state, on_join, on_leave);
            for diff in std::mem::take(&mut self.pending) {
                let (on_join, on_leave) = self.callbacks();
                state = sync_diff(state, diff, on_join, on_leave);
            }
            self.state = state;
            self.synced = true;
            true
        } else if *name == self.diff_event {
            let Ok(diff) = payload.decode::<PresenceDiff>() else {
                tracing::warn!(%payload, "presence_diff payload is not a presence diff");
                return false;
            };
            if !self.synced {
                self.pending.push(diff);
                return false;
            }
            let state = std::mem::take(&mut self.state);
            let (on_join, on_leave) = self.callbacks();
            self.state = sync_diff(state, diff, on_join, on_leave);
            true
        } else {
            false
        }
    }

    #[allow(clippy::type_complexity)]
    fn callbacks(
        &mut self,
    ) -> (
        impl FnMut(&str, Option<&PresenceEntry>, &PresenceEntry) + '_,
        impl FnMut(&str, &PresenceEntry, &PresenceEntry) + '_,
    ) {
        let (on_join, on_leave) = (&mut self.on_join, &mut self.on_leave);
        (
            move |k: &str, c: Option<&PresenceEntry>, n: &PresenceEntry| {
                if let Some(f) = on_join.as_mut() {
                    f(k, c, n);
                }
            },
            move |k: &str, c: &PresenceEntry, l: &PresenceEntry| {
                if let Some(f) = on_leave.as_mut() {
                    f(k, c, l);
                }
            },
        )
    }

    /// The current presences.
    pub fn state(&self) -> &PresenceState {
        &self.state
    }

    /// The presences as `(key, entry)` pairs, ordered by key (phoenix.js `list()`; map the
    /// iterator for its `chooser`).
    pub fn list(&self) -> impl Iterator<Item = (&str, &PresenceEntry)> {
        self.state.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Whether a `presence_state` has been applied since the last (re)join.
    pub fn is_synced(&self) -> bool {
        self.synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn st(v: Value) -> PresenceState {
        serde_json::from_value(v).unwrap()
    }

    fn diff(v: Value) -> PresenceDiff {
        serde_json::from_value(v).unwrap()
    }

    fn val(s: &PresenceState) -> Value {
        serde_json::to_value(s).unwrap()
    }

    fn none_j(_: &str, _: Option<&PresenceEntry>, _: &PresenceEntry) {}
    fn none_l(_: &str, _: &PresenceEntry, _: &PresenceEntry) {}

    // The cases below are phoenix.js's own presence tests (assets/test/presence_test.js).

    #[test]
    fn sync_state_syncs_empty_state() {
        let new = st(json!({"u1": {"metas": [{"id": 1, "phx_ref": "1"}]}}));
        let state = sync_state(PresenceState::new(), new.clone(), none_j, none_l);
        assert_eq!(state, new);
    }

    #[test]
    fn sync_state_reports_joins_and_leaves() {
        let old = st(json!({
            "u1": {"metas": [{"id": 1, "phx_ref": "1"}]},
            "u2": {"metas": [{"id": 2, "phx_ref": "2"}]},
            "u4": {"metas": [{"id": 4, "phx_ref": "4"}]}
        }));
        let new = st(json!({
            "u1": {"metas": [{"id": 1, "phx_ref": "1"}]},
            "u2": {"metas": [{"id": 2, "phx_ref": "2"}, {"id": 2, "phx_ref": "2.2"}]},
            "u3": {"metas": [{"id": 3, "phx_ref": "3"}]}
        }));
        let mut joined = Vec::new();
        let mut left = Vec::new();
        let state = sync_state(
            old,
            new.clone(),
            |k, cur, n| joined.push((k.to_owned(), cur.map(|c| c.metas.len()), n.metas.clone())),
            |k, cur, l| left.push((k.to_owned(), cur.metas.len(), l.metas.clone())),
        );
        assert_eq!(state, new);
        assert_eq!(
            joined,
            [
                (
                    "u2".into(),
                    Some(1),
                    vec![json!({"id": 2, "phx_ref": "2.2"})]
                ),
                ("u3".into(), None, vec![json!({"id": 3, "phx_ref": "3"})]),
            ]
        );
        assert_eq!(
            left,
            [("u4".into(), 0, vec![json!({"id": 4, "phx_ref": "4"})])]
        );
    }

    #[test]
    fn sync_state_keeps_current_metas_in_front() {
        let old = st(
            json!({"u1": {"metas": [{"id": 1, "phx_ref": "1"}, {"id": 1, "phx_ref": "1.old"}]}}),
        );
        let new = st(
            json!({"u1": {"metas": [{"id": 1, "phx_ref": "1.new"}, {"id": 1, "phx_ref": "1"}]}}),
        );
        let state = sync_state(old, new, none_j, none_l);
        assert_eq!(
            val(&state),
            json!({"u1": {"metas": [{"id": 1, "phx_ref": "1"}, {"id": 1, "phx_ref": "1.new"}]}})
        );
    }

    #[test]
    fn sync_diff_joins_then_leaves() {
        let state = st(json!({"u1": {"metas": [{"id": 1, "phx_ref": "1"}]}}));
        let d = diff(json!({
            "joins": {"u2": {"metas": [{"id": 2, "phx_ref": "2"}]}},
            "leaves": {"u1": {"metas": [{"id": 1, "phx_ref": "1"}]}}
        }));
        let state = sync_diff(state, d, none_j, none_l);
        assert_eq!(
            val(&state),
            json!({"u2": {"metas": [{"id": 2, "phx_ref": "2"}]}})
        );
    }

    #[test]
    fn sync_diff_removes_only_left_metas() {
        let state =
            st(json!({"u1": {"metas": [{"id": 1, "phx_ref": "1"}, {"id": 1, "phx_ref": "1.2"}]}}));
        let d =
            diff(json!({"joins": {}, "leaves": {"u1": {"metas": [{"id": 1, "phx_ref": "1"}]}}}));
        let mut left = Vec::new();
        let state = sync_diff(state, d, none_j, |k, cur, _| {
            left.push((k.to_owned(), cur.metas.clone()))
        });
        let expect = json!({"u1": {"metas": [{"id": 1, "phx_ref": "1.2"}]}});
        assert_eq!(val(&state), expect);
        assert_eq!(
            left,
            [("u1".into(), vec![json!({"id": 1, "phx_ref": "1.2"})])]
        );
    }

    #[test]
    fn update_diff_leaves_only_the_new_meta() {
        // Same key joins with B (phx_ref_prev A) and leaves A in one diff: joins first, so the
        // result holds B only.
        let state = st(json!({"u1": {"metas": [{"phx_ref": "A", "s": "on"}]}}));
        let d = diff(json!({
            "joins": {"u1": {"metas": [{"phx_ref": "B", "phx_ref_prev": "A", "s": "away"}]}},
            "leaves": {"u1": {"metas": [{"phx_ref": "A", "s": "on"}]}}
        }));
        let state = sync_diff(state, d, none_j, none_l);
        assert_eq!(
            val(&state),
            json!({"u1": {"metas": [{"phx_ref": "B", "phx_ref_prev": "A", "s": "away"}]}})
        );
    }

    #[test]
    fn leave_for_an_unknown_key_is_ignored_and_fields_are_kept() {
        let d = diff(json!({
            "joins": {"u1": {"metas": [{"phx_ref": "1"}], "user": {"name": "A"}}},
            "leaves": {"nobody": {"metas": [{"phx_ref": "9"}]}}
        }));
        let state = sync_diff(PresenceState::new(), d, none_j, none_l);
        assert_eq!(
            val(&state),
            json!({"u1": {"metas": [{"phx_ref": "1"}], "user": {"name": "A"}}})
        );
    }

    fn msg(event: &str, v: Value) -> ChannelEvent {
        ChannelEvent::Message {
            event: event.into(),
            payload: v.into(),
        }
    }

    #[test]
    fn diffs_before_the_state_are_applied_after_it() {
        let mut p = Presence::new();
        assert!(!p.handle(&msg(
            "presence_diff",
            json!({"joins": {"u2": {"metas": [{"phx_ref": "2"}]}}, "leaves": {}})
        )));
        assert!(p.state().is_empty());
        assert!(p.handle(&msg(
            "presence_state",
            json!({"u1": {"metas": [{"phx_ref": "1"}]}})
        )));
        assert_eq!(
            val(p.state()),
            json!({"u1": {"metas": [{"phx_ref": "1"}]}, "u2": {"metas": [{"phx_ref": "2"}]}})
        );
        // A rejoin: diffs wait again for the new state.
        p.handle(&ChannelEvent::Joined {
            response: json!({}).into(),
        });
        assert!(!p.handle(&msg(
            "presence_diff",
            json!({"joins": {}, "leaves": {"u1": {"metas": [{"phx_ref": "1"}]}}})
        )));
        assert_eq!(p.state().len(), 2);
        assert!(p.handle(&msg(
            "presence_state",
            json!({"u1": {"metas": [{"phx_ref": "1"}]}, "u3": {"metas": [{"phx_ref": "3"}]}})
        )));
        assert_eq!(p.list().map(|(k, _)| k).collect::<Vec<_>>(), ["u3"]);
    }

    #[test]
    fn callbacks_and_custom_events() {
        use std::sync::{Arc, Mutex};
        let log = Arc::new(Mutex::new(Vec::new()));
        let (j, l) = (log.clone(), log.clone());
        let mut p = Presence::with_events("s", "d")
            .on_join(move |k, cur, _| {
                j.lock()
                    .unwrap()
                    .push(format!("join {k} {}", cur.is_some()))
            })
            .on_leave(move |k, cur, _| {
                l.lock()
                    .unwrap()
                    .push(format!("leave {k} {}", cur.metas.len()))
            });
        assert!(!p.handle(&msg(
            "presence_state",
            json!({"x": {"metas": [{"phx_ref": "1"}]}})
        )));
        assert!(p.handle(&msg("s", json!({"u1": {"metas": [{"phx_ref": "1"}]}}))));
        assert!(p.handle(&msg(
            "d",
            json!({"joins": {"u1": {"metas": [{"phx_ref": "2"}]}}, "leaves": {"u1": {"metas": [{"phx_ref": "1"}]}}})
        )));
        assert_eq!(
            *log.lock().unwrap(),
            ["join u1 false", "join u1 true", "leave u1 1"]
        );
    }
}
