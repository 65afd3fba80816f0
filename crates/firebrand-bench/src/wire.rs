//! `wire-bytes`: what permessage-deflate saves on the wire (issue 23). The conformance app with
//! `COMPRESS=1`, one client that offers permessage-deflate (as browsers do) and one that does
//! not, both on `room:wire`; three broadcasts through `POST /api/broadcast` — a chat message, a
//! presence list of 1,000 users (the `presence_state` Phoenix sends a joining client, with
//! Phoenix's 16-character refs) and a dashboard-like update of 50 metrics — and the size of the
//! frame each client receives for each (header included).

use anyhow::{Context, bail};

use crate::ws::{RSV1, Ws};
use crate::{Kind, Opts, Server, Trigger};

const TOPIC: &str = "room:wire";

/// A chat message as the chat demo sends it.
fn chat() -> String {
    r#"{"body":"Hey, are we still on for the 3pm sync? I pushed the fix for the login redirect, it needs a review","user":"alice","at":"2026-12-07T12:00:00Z","id":"8f14e45f-ceea-467d-9a5b-1c2d3e4f5a6b"}"#.into()
}

/// A deterministic xorshift, so that refs and values are not all alike (deflate would
/// flatter itself on repeats).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A Phoenix presence ref: 16 characters of URL-safe base64.
    fn phx_ref(&mut self) -> String {
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        (0..16)
            .map(|_| B64[(self.next() % 64) as usize] as char)
            .collect()
    }
}

/// `presence_state` of 1,000 users with one meta each.
fn presence(rng: &mut Rng) -> String {
    let users: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                r#""user-{i:04}":{{"metas":[{{"phx_ref":"{}","online_at":"{}","status":"{}"}}]}}"#,
                rng.phx_ref(),
                1_765_108_800 + rng.next() % 86_400,
                ["online", "away", "busy"][(rng.next() % 3) as usize]
            )
        })
        .collect();
    format!("{{{}}}", users.join(","))
}

/// A dashboard update: 50 metrics with their values.
fn dashboard(rng: &mut Rng) -> String {
    let metrics: Vec<String> = (0..50)
        .map(|i| {
            format!(
                r#"{{"name":"{}.host-{:02}","value":{}.{},"unit":"{}","ok":{}}}"#,
                ["cpu", "mem", "disk", "net_in", "net_out"][i % 5],
                i / 5,
                rng.next() % 100,
                rng.next() % 10,
                ["%", "%", "%", "MB/s", "MB/s"][i % 5],
                !rng.next().is_multiple_of(10)
            )
        })
        .collect();
    format!(
        r#"{{"ts":"2026-12-07T12:00:00Z","metrics":[{}]}}"#,
        metrics.join(",")
    )
}

/// A frame's size on the wire (server frames are unmasked).
fn wire_size(len: usize) -> usize {
    len + match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Reads frames until one whose (inflated) text holds `marker`: its size on the wire and
/// whether it was compressed.
async fn frame_with(ws: &mut Ws, marker: &str) -> anyhow::Result<(usize, bool)> {
    let mut found = None;
    while found.is_none() {
        let mut bad = None;
        let alive = ws
            .drain(|op, d| {
                if found.is_some() || op & 0x0f != 1 {
                    return;
                }
                let compressed = op & RSV1 != 0;
                let text = if compressed {
                    match inflate(d) {
                        Ok(t) => t,
                        Err(e) => {
                            bad = Some(e);
                            return;
                        }
                    }
                } else {
                    d.to_vec()
                };
                if memchr::memmem::find(&text, marker.as_bytes()).is_some() {
                    found = Some((wire_size(d.len()), compressed));
                }
            })
            .await?;
        if let Some(e) = bad {
            return Err(e);
        }
        if !alive {
            bail!("connection closed before {marker}");
        }
    }
    Ok(found.unwrap_or_default())
}

/// A compressed message's text (RFC 7692 §7.2.2: the stream's tail appended).
fn inflate(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut z = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(data.len() * 8 + 1024);
    while (z.total_in() as usize) < input.len() {
        if out.len() == out.capacity() {
            out.reserve(out.capacity());
        }
        let before = (z.total_in(), z.total_out());
        z.decompress_vec(
            &input[z.total_in() as usize..],
            &mut out,
            flate2::FlushDecompress::Sync,
        )
        .context("not a deflate stream")?;
        if (z.total_in(), z.total_out()) == before && out.len() < out.capacity() {
            bail!("deflate stream stuck");
        }
    }
    Ok(out)
}

pub(crate) async fn wire_bytes(o: &Opts) -> anyhow::Result<()> {
    let server = Server::start(Kind::ConformanceDeflate, o)?;
    let addr = server.addr;
    let mut plain = Ws::connect_offering(addr, "/socket/websocket?vsn=2.0.0", false).await?;
    let mut deflating = Ws::connect_offering(addr, "/socket/websocket?vsn=2.0.0", true).await?;
    for ws in [&mut plain, &mut deflating] {
        ws.send_text(format!(r#"["1","1","{TOPIC}","phx_join",{{}}]"#).as_bytes())
            .await?;
        frame_with(ws, "phx_reply").await?;
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut trigger = Trigger::connect(addr).await?;
    println!(
        "== wire-bytes (conformance app, COMPRESS=1: one client offering permessage-deflate, one not)"
    );
    println!(
        "{:<44} {:>10} {:>11} {:>7}",
        "message", "plain B", "deflated B", "ratio"
    );
    let messages = [
        ("chat message (new_msg)", "new_msg", chat()),
        (
            "presence_state, 1,000 users",
            "presence_list",
            presence(&mut rng),
        ),
        (
            "dashboard update, 50 metrics",
            "metrics",
            dashboard(&mut rng),
        ),
    ];
    for (what, event, payload) in messages {
        trigger.broadcast(TOPIC, event, &payload).await?;
        let marker = format!(r#""{event}""#);
        let (plain_size, plain_z) = frame_with(&mut plain, &marker).await?;
        let (deflated_size, deflated_z) = frame_with(&mut deflating, &marker).await?;
        if plain_z || !deflated_z {
            bail!("{what}: compressed where it should not be, or not where it should");
        }
        println!(
            "{what:<44} {plain_size:>10} {deflated_size:>11} {:>6.1}x",
            plain_size as f64 / deflated_size as f64
        );
    }
    Ok(())
}
