//! The `conformance` binary as users run it: flags, the `listening on` line, SIGTERM.

mod common;

use common::*;
use serde_json::json;
use tokio::process::{Child, Command};

fn sigterm(child: &Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1012_and_exits_0() {
    let (mut child, port) = spawn_conformance(&[]).await;
    let url = format!("ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0");
    let mut a = Client::connect(&url).await;
    let mut b = Client::connect(&url).await;
    a.join("1", "room:lobby", json!({})).await;
    b.heartbeat("1").await;
    sigterm(&child);
    assert_eq!(a.expect_close(1012).await, "server restart");
    assert_eq!(b.expect_close(1012).await, "server restart");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// PROTOCOL-style drain: 2,000 clients, SIGTERM; each sees 1012 within the drain period (plus
/// slack for a loaded machine), spread over it rather than at once, with no reset; exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_2000_clients_gradually() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::{Error, Message};
    const CLIENTS: usize = 2000;
    let (mut child, port) = spawn_conformance(&[("DRAIN_MS", "2000")]).await;
    let url = format!("ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0");
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(Client::connect(&url).await);
    }
    let signalled = tokio::time::Instant::now();
    sigterm(&child);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut closed = None;
                loop {
                    match tokio::time::timeout(WAIT * 2, c.ws.next())
                        .await
                        .expect("no close within 10 s")
                    {
                        Some(Ok(Message::Close(Some(f)))) => {
                            closed = Some((u16::from(f.code), signalled.elapsed()))
                        }
                        Some(Ok(_)) => {}
                        // A clean end after the close handshake; a reset would be an I/O error.
                        None | Some(Err(Error::ConnectionClosed | Error::AlreadyClosed)) => break,
                        Some(Err(e)) => panic!("connection ended with {e}"),
                    }
                }
                closed.expect("no close frame")
            })
        })
        .collect();
    let mut times = Vec::with_capacity(CLIENTS);
    for t in tasks {
        let (code, at) = t.await.unwrap();
        assert_eq!(code, 1012);
        times.push(at);
    }
    times.sort();
    let (first, last) = (times[0], times[CLIENTS - 1]);
    assert!(
        last < std::time::Duration::from_secs(5),
        "last close after {last:?}"
    );
    assert!(
        last - first > std::time::Duration::from_millis(500),
        "closes not spread: {first:?}..{last:?}"
    );
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn idle_timeout_comes_from_the_environment() {
    let (mut child, port) = spawn_conformance(&[("IDLE_TIMEOUT_MS", "200")]).await;
    let mut c = Client::connect(&format!("ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0")).await;
    assert_eq!(c.expect_close(1001).await, "idle timeout");
    sigterm(&child);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn bad_arguments_fail_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_conformance"))
        .args(["--port", "nope"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid port \"nope\""));
}
