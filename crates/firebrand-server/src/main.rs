//! `firebrand-server [--config PATH]`: serves Phoenix Channels as configured (see the
//! `config` module: a TOML file, environment variables, development defaults).
//! `firebrand-server --check-config PATH` validates a config file and exits.

/// jemalloc, as the conformance app: idle connections 15% smaller than with glibc's malloc
/// (`firebrand-bench idle`).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use firebrand_server::{Config, app};

const USAGE: &str = "usage: firebrand-server [--config PATH]   serve (config file optional)
       firebrand-server --check-config PATH   validate a config file (with the
                                              environment applied) and exit
Environment variables override the file: FIREBRAND_CONFIG, FIREBRAND_LISTEN, FIREBRAND_DRAIN_MS,
FIREBRAND_ORIGINS, FIREBRAND_LONGPOLL, FIREBRAND_METRICS, REDIS_URL, NATS_URL, FIREBRAND_CLUSTER_NAMESPACE,
FIREBRAND_CLUSTER_SECRET, FIREBRAND_JWT_SECRET, FIREBRAND_JWT_PUBLIC_KEY_FILE, FIREBRAND_JWT_ALGORITHM,
FIREBRAND_JWT_AUDIENCE, FIREBRAND_JWT_ISSUER, FIREBRAND_ALLOW_ANONYMOUS, FIREBRAND_API_KEY,
FIREBRAND_CONNECT_URL, FIREBRAND_BACKEND_TIMEOUT_MS, FIREBRAND_WEBHOOK_URL, FIREBRAND_WEBHOOK_SECRET,
FIREBRAND_OUTBOX_URL, FIREBRAND_OUTBOX_TABLE.";

enum Command {
    Serve(Option<PathBuf>),
    Check(PathBuf),
}

fn parse_args() -> Result<Command, String> {
    let mut args = std::env::args_os().skip(1);
    let mut command = None;
    while let Some(arg) = args.next() {
        let value = |args: &mut dyn Iterator<Item = std::ffi::OsString>| {
            args.next()
                .map(PathBuf::from)
                .ok_or_else(|| format!("{} needs a path", arg.to_string_lossy()))
        };
        let next = match arg.to_str() {
            Some("--config") => Command::Serve(Some(value(&mut args)?)),
            Some("--check-config") => Command::Check(value(&mut args)?),
            Some("-h" | "--help") => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        };
        if command.replace(next).is_some() {
            return Err("give one of --config and --check-config, once".into());
        }
    }
    match command {
        Some(command) => Ok(command),
        None => match std::env::var_os("FIREBRAND_CONFIG") {
            Some(v) if v.is_empty() => Err(
                "environment variable FIREBRAND_CONFIG: is empty: unset it, or name the config \
                 file (an empty variable is an error, not unset)"
                    .into(),
            ),
            v => Ok(Command::Serve(v.map(PathBuf::from))),
        },
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn main() -> ExitCode {
    let command = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("firebrand-server: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let (file, check) = match command {
        Command::Serve(file) => (file, false),
        Command::Check(file) => (Some(file), true),
    };
    let config = match Config::load(file.as_deref(), |name| std::env::var(name).ok()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("firebrand-server: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours on a terminal only: not as escape codes in a collected log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // What is unsafe about it, logged (for --check-config too).
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    if check {
        let file = file.as_deref().unwrap_or_else(|| "".as_ref()).display();
        println!("{file}: ok: {config}");
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("firebrand-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let endpoint = app::endpoint(&config)?;
    let router = app::router(&config, &endpoint);
    let server = firebrand::Server::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = server.local_addr()?;
    println!("listening on {addr}");
    print_next_steps(&config, addr);
    // Like axum::serve, plus a deadline on handshakes and a large listen backlog. It serves on
    // during the drain, so that /ready answers 503 (new sockets are refused with 503).
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(router, async move {
        let _ = stopped.await;
    }));
    shutdown_signal().await;
    // Close the sockets (1012) in batches spread over the drain period, so that clients
    // reconnect gradually; give up on stragglers after 30 s.
    let open = endpoint.drain(config.drain, Duration::from_secs(30)).await;
    if open > 0 {
        tracing::warn!(open, "connections still open at the shutdown deadline");
    }
    let _ = stop.send(());
    serving.await??;
    Ok(())
}

fn print_next_steps(config: &Config, addr: std::net::SocketAddr) {
    println!("configuration: {config}");
    let api = format!("http://{addr}/api");
    match config.api {
        firebrand_server::config::ApiAccess::Open => println!(
            "server API open without a key (development mode): curl {api}/info; \
             the OpenAPI document: {api}/openapi.json"
        ),
        firebrand_server::config::ApiAccess::Disabled => println!(
            "server API disabled: set FIREBRAND_API_KEY (or [api] key) to publish over HTTP"
        ),
        _ => println!("server API at {api}/ (Authorization: Bearer <key>); {api}/openapi.json"),
    }
    let url = format!("ws://{addr}/socket");
    if config.is_development() {
        println!(
            "development mode: no auth key is configured, so anyone may connect (anonymously).
  connect from phoenix.js: new Socket(\"{url}\")
  to require signed tokens (JWT, HS256, with `sub` and `exp`), set a shared secret:
    FIREBRAND_JWT_SECRET=... firebrand-server   (or [auth] jwt_hs256_secret in a --config file)
  clients then connect with new Socket(\"{url}\", {{params: {{token}}}})"
        );
    } else if let Some(hook) = &config.auth.connect {
        println!(
            "connects are decided by the backend ({:?}, within {:?}): new Socket(\"{url}\", {{params: {{..}}}})",
            hook.url,
            config.backend.timeout()
        );
    } else {
        println!(
            "connections need a JWT: new Socket(\"{url}\", {{params: {{token}}}}) or {{authToken: token}}{}",
            if config.auth.allow_anonymous {
                " (or none: anonymous connections are allowed)"
            } else {
                ""
            }
        );
    }
}
