//! permessage-deflate with context takeover, the usual way (Phoenix's): the conformance app in
//! the benchmark's per-connection mode keeps one compressor per connection and answers without
//! `server_no_context_takeover`, so each message may refer back to the ones before it. The
//! client keeps its inflate window to match. (A file of its own: the mode is process-wide.)

mod common;

use common::*;
use firebrand_client::Socket;
use firebrand_conformance::Config;
use serde_json::json as j;

#[tokio::test]
async fn messages_that_refer_back_to_earlier_ones_inflate() {
    firebrand::benching::compress_per_connection(true);
    let config = Config {
        compress: true,
        ..Config::default()
    };
    let server = start_with("127.0.0.1:0".parse().unwrap(), &config).await;
    let socket = Socket::builder(server.url())
        .compress(true)
        .connect()
        .unwrap();
    let lobby = socket.channel("room:lobby", j!({}));
    let mut events = lobby.events();
    lobby.join().await.unwrap();
    // The same list again and again, and then changed: every copy after the first is
    // mostly references into the window.
    for n in 0..20 {
        let list: Vec<_> = (0..50)
            .map(|i| j!({"user": format!("user{i}"), "n": n, "status": "online"}))
            .collect();
        let _ = lobby.push("new_msg", j!({ "users": list.clone() }));
        assert_eq!(
            message(&mut events, "new_msg").await,
            json(j!({ "users": list.clone() }))
        );
        assert_eq!(
            lobby.push("ping", j!({ "users": list.clone() })).await,
            Ok(json(j!({ "users": list })))
        );
    }
    let stats = server.endpoint.stats();
    assert!(
        stats.compressed >= 40,
        "{} messages compressed",
        stats.compressed
    );
    server.stop().await;
}
