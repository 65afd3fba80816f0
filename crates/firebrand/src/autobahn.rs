//! An echo server on firebrand's own WebSocket layer (`transport/ws.rs`: the handshake, the
//! frame reader, the frame encoder and permessage-deflate), for the Autobahn TestSuite's
//! `fuzzingclient` (`scripts/autobahn.sh`, binary `autobahn-echo` in `crates/conformance`).
//! Not the Phoenix socket: every text and binary message is sent back as it came. Not part of
//! the API.

use std::convert::Infallible;

use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming as Body;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::node::queue::Frame;
use crate::transport::ws::{self, Incoming, Reader};

/// Serves WebSocket echo connections on `listener` until the task is dropped: messages and
/// frames over `max_size` bytes close the connection with 1009; `compress` offers
/// permessage-deflate as [`SocketBuilder::compress`](crate::SocketBuilder::compress) does.
pub async fn serve(listener: TcpListener, max_size: usize, compress: bool) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| upgrade(req, max_size, compress));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn upgrade(
    mut req: Request<Body>,
    max_size: usize,
    compress: bool,
) -> Result<Response<String>, Infallible> {
    let mut res = Response::new(String::new());
    let accept = match ws::accept_key(req.headers()) {
        Ok(accept) => accept,
        Err(why) => {
            *res.status_mut() = StatusCode::BAD_REQUEST;
            *res.body_mut() = why.into();
            return Ok(res);
        }
    };
    let deflate = compress
        .then(|| ws::negotiate_deflate(req.headers()))
        .flatten();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let reader = match deflate {
                Some(_) => Reader::inflating(max_size),
                None => Reader::new(max_size),
            };
            let compress = deflate.is_some_and(|d| d.compress);
            let _ = echo(TokioIo::new(upgraded), reader, compress).await;
        }
    });
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(v) = deflate.and_then(|d| HeaderValue::from_str(&d.response()).ok()) {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
    }
    Ok(res)
}

/// Echoes messages until the client closes or breaks the protocol (answered with the close
/// code the server uses for it).
async fn echo<T>(mut io: T, mut reader: Reader, compress: bool) -> std::io::Result<()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = io.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let mut out = Vec::new();
        let mut close = None;
        let fed = reader.feed(&buf[..n], |m| {
            if close.is_some() {
                return;
            }
            let frame = match m {
                Incoming::Text(b) => Frame::Text(b),
                Incoming::Binary(b) => Frame::Binary(b),
                Incoming::Ping(b) => Frame::Pong(b),
                Incoming::Pong => return,
                Incoming::Close(Ok(code)) => {
                    close = Some(ws::close_frame(code.unwrap_or(1000), ""));
                    return;
                }
                Incoming::Close(Err(e)) => {
                    let (code, reason) = e.close();
                    close = Some(ws::close_frame(code, reason));
                    return;
                }
            };
            ws::encode_queued(&frame, &mut out, compress, None);
        });
        if let Err(e) = fed {
            let (code, reason) = e.close();
            close.get_or_insert_with(|| ws::close_frame(code, reason));
        }
        io.write_all(&out).await?;
        if let Some(close) = close {
            io.write_all(&close).await?;
            return io.shutdown().await;
        }
    }
}
