//! Installs the official `phoenix` client from npm (pinned by assets/package-lock.json) and
//! hands its ES module to the server, which embeds it. Nothing from npm is kept in the repo.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    println!("cargo:rerun-if-changed=assets/package.json");
    println!("cargo:rerun-if-changed=assets/package-lock.json");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let npm_dir = out.join("npm");
    std::fs::create_dir_all(&npm_dir).expect("create OUT_DIR/npm");
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(assets.join(file), npm_dir.join(file))
            .unwrap_or_else(|e| panic!("copy assets/{file}: {e}"));
    }
    let client = npm_dir.join("node_modules/phoenix/priv/static/phoenix.mjs");
    if !client.exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&npm_dir)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run npm ({e}): the chat demo needs Node.js and npm to install the phoenix client")
            });
        assert!(
            status.success(),
            "`npm ci` for the phoenix client failed ({status})"
        );
    }
    std::fs::copy(&client, out.join("phoenix.mjs")).expect("copy phoenix.mjs");
}
