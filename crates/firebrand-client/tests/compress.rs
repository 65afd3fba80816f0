//! permessage-deflate against the conformance app with `COMPRESS=1`, the bytes counted on the
//! wire by a proxy between client and server.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use firebrand_client::{Payload, Socket};
use firebrand_conformance::Config;
use serde_json::json as j;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy to `upstream` counting the bytes the server sends.
struct Proxy {
    addr: SocketAddr,
    from_server: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let from_server = Arc::new(AtomicU64::new(0));
        let counter = from_server.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(upstream).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    let _ = server_write.shutdown().await;
                });
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = server_read.read(&mut buf).await {
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = client_write.shutdown().await;
                });
            }
        });
        Proxy { addr, from_server }
    }

    fn socket(&self, compress: bool) -> Socket {
        Socket::builder(format!("ws://{}/socket", self.addr))
            .compress(compress)
            .connect()
            .unwrap()
    }

    fn bytes(&self) -> u64 {
        self.from_server.load(Ordering::Relaxed)
    }
}

/// A presence-like list: repetitive JSON, as deflate likes it.
fn users(n: usize) -> serde_json::Value {
    let users: Vec<_> = (0..n)
        .map(|i| j!({"user": format!("user{i}"), "online_at": 1_765_000_000 + i, "status": "online"}))
        .collect();
    j!({ "users": users })
}

/// Joins the lobby, then has the server send `list` three ways (a push to this client, a
/// broadcast, a reply) and a compressible binary reply; returns the bytes the server sent.
async fn exchange(proxy: &Proxy, compress: bool, list: &serde_json::Value) -> u64 {
    let socket = proxy.socket(compress);
    let lobby = socket.channel("room:lobby", j!({}));
    let mut events = lobby.events();
    lobby.join().await.unwrap();
    let before = proxy.bytes();

    assert_eq!(lobby.push("push_me", list.clone()).await, Ok(json(j!({}))));
    assert_eq!(message(&mut events, "pushed").await, json(list.clone()));
    let _ = lobby.push("new_msg", list.clone());
    assert_eq!(message(&mut events, "new_msg").await, json(list.clone()));
    assert_eq!(
        lobby.push("ping", list.clone()).await,
        Ok(json(list.clone()))
    );
    let data = Payload::binary(vec![7u8; 20_000]);
    assert_eq!(lobby.push("binary_echo", data.clone()).await, Ok(data));

    let sent = proxy.bytes() - before;
    socket.disconnect();
    sent
}

#[tokio::test]
async fn a_compressing_server_sends_fewer_bytes_and_the_client_reads_them_all() {
    let config = Config {
        compress: true,
        ..Config::default()
    };
    let server = start_with("127.0.0.1:0".parse().unwrap(), &config).await;
    let proxy = Proxy::start(server.addr).await;
    let list = users(500);
    let size = serde_json::to_vec(&list).unwrap().len() as u64;

    let plain = exchange(&proxy, false, &list).await;
    let compressed = exchange(&proxy, true, &list).await;
    // Three copies of the list and 20,000 binary bytes, uncompressed and compressed.
    assert!(plain > 3 * size + 20_000, "{plain} bytes uncompressed");
    assert!(
        compressed * 5 < plain,
        "{compressed} bytes compressed against {plain}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_server_that_does_not_compress_declines_and_nothing_changes() {
    let server = start().await;
    let proxy = Proxy::start(server.addr).await;
    let list = users(100);
    let size = serde_json::to_vec(&list).unwrap().len() as u64;
    let offered = exchange(&proxy, true, &list).await;
    assert!(offered > 3 * size + 20_000, "{offered} bytes");
    server.stop().await;
}
