//! Test support: the conformance app on 127.0.0.1 (restartable on the same port) and event
//! helpers that wait for events, with a timeout only as a failure bound.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use firebrand::Endpoint;
use firebrand_client::{ChannelEvent, Events, Payload, Socket, SocketEvent, SocketEvents};
use firebrand_conformance::{Config, app};
use tokio::task::JoinHandle;

/// How long any single expected event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Server {
    pub addr: SocketAddr,
    pub endpoint: Endpoint,
    serve: JoinHandle<()>,
}

pub async fn start() -> Server {
    start_on("127.0.0.1:0".parse().unwrap()).await
}

/// The conformance app on `addr` (a fixed port to restart a server where it was).
pub async fn start_on(addr: SocketAddr) -> Server {
    start_with(addr, &Config::default()).await
}

/// The conformance app with `config`.
pub async fn start_with(addr: SocketAddr, config: &Config) -> Server {
    let (router, endpoint) = app(config);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    Server {
        addr,
        endpoint,
        serve,
    }
}

impl Server {
    /// The socket's mount URL, `ws://127.0.0.1:<port>/socket`.
    pub fn url(&self) -> String {
        format!("ws://{}/socket", self.addr)
    }

    /// A client socket with connect params.
    pub fn socket(&self, params: &[(&str, &str)]) -> Socket {
        let mut b = Socket::builder(self.url());
        for (k, v) in params {
            b = b.param(*k, *v);
        }
        b.connect().unwrap()
    }

    /// Stops the server: no more accepts (the listener is dropped), then every connection is
    /// closed with 1012.
    pub async fn stop(self) {
        self.serve.abort();
        let _ = self.serve.await;
        let open = self.endpoint.shutdown(WAIT).await;
        assert_eq!(open, 0, "connections still open after shutdown");
    }
}

/// The next channel event.
pub async fn next(events: &mut Events) -> ChannelEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("timed out waiting for a channel event")
        .expect("channel event stream ended")
}

/// Skips events until `pick` returns `Some`.
pub async fn until<T>(events: &mut Events, mut pick: impl FnMut(ChannelEvent) -> Option<T>) -> T {
    loop {
        if let Some(t) = pick(next(events).await) {
            return t;
        }
    }
}

/// The payload of the next message named `name` (other events skipped).
pub async fn message(events: &mut Events, name: &str) -> Payload {
    until(events, |e| match e {
        ChannelEvent::Message { event, payload } if event == name => Some(payload),
        _ => None,
    })
    .await
}

/// The next socket event.
pub async fn next_socket(events: &mut SocketEvents) -> SocketEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("timed out waiting for a socket event")
        .expect("socket event stream ended")
}

pub fn json(v: serde_json::Value) -> Payload {
    Payload::from(v)
}
