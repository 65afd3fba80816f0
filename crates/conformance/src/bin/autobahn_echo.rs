//! `autobahn-echo [--port PORT] [--max-size BYTES] [--no-compress]`: a WebSocket echo server on
//! firebrand's own RFC 6455 layer (not the Phoenix socket), for the Autobahn TestSuite's
//! `fuzzingclient` (`scripts/autobahn.sh`). Listens on 127.0.0.1:PORT (default 9001), prints
//! `listening on 127.0.0.1:PORT`, offers permessage-deflate unless `--no-compress`, and
//! closes with 1009 on a message over BYTES (default 16 MiB: Autobahn's section 9 sends up
//! to 16 MB).

use anyhow::{Context, bail};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let (mut port, mut max_size, mut compress) = (9001u16, 16usize << 20, true);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--port" => port = value("--port")?.parse().context("invalid --port")?,
            "--max-size" => {
                max_size = value("--max-size")?.parse().context("invalid --max-size")?
            }
            "--no-compress" => compress = false,
            other => bail!(
                "unknown argument {other:?} (usage: autobahn-echo [--port PORT] [--max-size BYTES] [--no-compress])"
            ),
        }
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on {}", listener.local_addr()?);
    firebrand::autobahn::serve(listener, max_size, compress).await?;
    Ok(())
}
