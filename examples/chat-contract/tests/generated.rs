//! The page's TypeScript is generated from this crate and checked in
//! (`examples/chat/assets/contract.d.ts`, with its runtime `contract.js`): this test fails when
//! the checked-in files differ from what the Rust types say, and writes them again with
//! `FIREBRAND_BLESS=1`.

use std::path::{Path, PathBuf};

const BLESS: &str = "FIREBRAND_BLESS=1 cargo test -p firebrand-chat-contract";

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../chat/assets")
}

/// Compares `path` with `expected`; with `FIREBRAND_BLESS` set, writes it instead.
fn check(path: &Path, expected: &str) {
    if std::env::var_os("FIREBRAND_BLESS").is_some() {
        std::fs::write(path, expected).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        return;
    }
    let actual = std::fs::read_to_string(path).unwrap_or_default();
    if actual != expected {
        let line = actual
            .lines()
            .zip(expected.lines())
            .position(|(a, e)| a != e)
            .unwrap_or_else(|| actual.lines().count().min(expected.lines().count()))
            + 1;
        panic!(
            "{} differs from what the Rust contract generates (first difference on line {line}).\n\
             Regenerate it with:\n\n    {BLESS}\n",
            path.display()
        );
    }
}

#[test]
fn the_checked_in_typescript_is_generated_from_the_contract() {
    let ts = firebrand_chat_contract::typescript();
    // The contract as the page sees it.
    assert!(
        ts.contains(r#""new_msg": { payload: NewMsg; reply: Empty };"#),
        "{ts}"
    );
    assert!(ts.contains("export interface RoomContract extends ContractShape"));
    assert!(ts.contains("since?: string"), "{ts}");
    assert!(ts.contains("position?: string | null"), "{ts}");
    assert!(
        ts.contains("at: number"),
        "a u64 that JSON carries as a number: {ts}"
    );
    check(&assets().join("contract.d.ts"), &ts);
    check(
        &assets().join("contract.js"),
        firebrand_protocol::contract::RUNTIME_JS,
    );
}

#[test]
fn payloads_have_the_wire_shape_the_page_uses() {
    use firebrand_chat_contract::{JoinParams, JoinReply, Message};
    // A newcomer's `{}` and a rejoin's `{since}`.
    let fresh: JoinParams = serde_json::from_str("{}").unwrap();
    assert_eq!(fresh.since, None);
    let back: JoinParams = serde_json::from_str(r#"{"since": "p1"}"#).unwrap();
    assert_eq!(back.since.as_deref(), Some("p1"));
    // The server leaves `position` and `recovered` to the history (it adds them to `{}`).
    assert_eq!(serde_json::to_string(&JoinReply::default()).unwrap(), "{}");
    let reply: JoinReply = serde_json::from_str(r#"{"position": null}"#).unwrap();
    assert_eq!(reply, JoinReply::default());
    let msg = Message {
        user: "ada".into(),
        body: "hi".into(),
        at: 1,
    };
    assert_eq!(
        serde_json::to_value(&msg).unwrap(),
        serde_json::json!({"user": "ada", "body": "hi", "at": 1})
    );
}
