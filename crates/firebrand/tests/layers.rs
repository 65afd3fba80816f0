//! The crate's layers point one way (ARCHITECTURE.md, "Layers"): read from the `crate::` paths
//! of every source file (outside its `#[cfg(test)]` module and comments), no file reaches a
//! higher layer, and no two files of a layer reach each other in a circle — except a trait and
//! its context, one concept in one module (`model/channel.rs` and `model/context.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first. A file may use its own layer and those before it.
const LAYERS: &[&str] = &[
    "limits",
    "token",
    "deflate",
    "node",
    "cluster",
    "endpoint",
    "model",
    "transport",
    "metrics",
    "fuzzing",
    "autobahn",
    "benching",
];

/// What the crate root re-exports, by the module that defines it.
fn reexported(name: &str) -> Option<&'static str> {
    Some(match name {
        "Endpoint" | "EndpointBuilder" | "Stats" => "endpoint",
        "Channel" | "HandleResult" | "Info" | "JoinError" | "Joined" | "Reply" | "StopReason" => {
            "model/channel"
        }
        "ChannelContext" | "ChannelSender" | "JoinContext" | "ReplyRef" | "SendError" => {
            "model/context"
        }
        "ConnectError" | "ConnectInfo" | "Socket" => "model/socket",
        "PresenceError" | "presence" => "node/presence",
        "Broadcast" => "node/pubsub",
        "TokenError" | "TokenSigner" => "token",
        "SocketBuilder" => "transport/http",
        "CheckOrigin" => "transport/origin",
        "Server" | "LISTEN_BACKLOG" => "transport/server",
        "testing" => "transport/testing",
        _ => return None,
    })
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `node/presence/mod.rs` → `node/presence`.
fn module_of(rel: &str) -> String {
    let m = rel.trim_end_matches(".rs");
    m.strip_suffix("/mod").unwrap_or(m).to_owned()
}

/// The module a `crate::a::b::c` path names: the longest prefix that is a module.
fn resolve(path: &[&str], modules: &BTreeSet<String>) -> Option<String> {
    if let Some(first) = path.first()
        && let Some(m) = reexported(first)
    {
        return Some(m.to_owned());
    }
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("/"))
        .find(|m| modules.contains(m))
}

fn layer(module: &str) -> usize {
    let top = module.split('/').next().unwrap();
    LAYERS
        .iter()
        .position(|l| *l == top)
        .unwrap_or_else(|| panic!("module {module} is in no layer: add it to LAYERS"))
}

/// The `crate::` paths of a file's code: comments and its test module left out.
fn paths(text: &str) -> Vec<Vec<String>> {
    let code = match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        for (i, _) in line.match_indices("crate::") {
            let rest = &line[i + "crate::".len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let segments: Vec<String> = rest[..end]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            if !segments.is_empty() {
                out.push(segments);
            }
        }
    }
    out
}

#[test]
fn layers_point_one_way_and_files_import_no_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let rel = |p: &Path| {
        p.strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/")
    };
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&rel(f))).collect();
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut upward = Vec::new();
    for file in &files {
        let from = module_of(&rel(file));
        if from == "lib" {
            continue; // the root declares and re-exports every layer
        }
        let text = std::fs::read_to_string(file).unwrap();
        for path in paths(&text) {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            let Some(to) = resolve(&path, &modules) else {
                continue; // a macro or an item of the root
            };
            if to == from || from.starts_with(&format!("{to}/")) {
                continue; // itself, or its own parent module
            }
            if layer(&to) > layer(&from) {
                upward.push(format!("{from} uses crate::{}", path.join("::")));
            }
            uses.entry(from.clone()).or_default().insert(to);
        }
    }
    assert!(
        upward.is_empty(),
        "lower layers reach up:\n{}",
        upward.join("\n")
    );

    // Circles between files: a path from a module back to itself.
    let allowed = |a: &str, b: &str| {
        let pair = ["model/channel", "model/context"];
        pair.contains(&a) && pair.contains(&b)
    };
    let mut circles = Vec::new();
    for start in uses.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, trail)) = stack.pop() {
            for next in uses.get(&at).into_iter().flatten() {
                if allowed(&at, next) {
                    continue;
                }
                if next == start {
                    circles.push(format!("{} -> {start}", trail.join(" -> ")));
                } else if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
    }
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
    // The check reads something: the model reaches the node, the transports the model.
    assert!(uses["model/runner"].contains("node/pubsub"));
    assert!(uses["transport/conn"].contains("model/runner"));
}
