//! The config file as the binary reads it: `--check-config`, and errors that name the key and
//! the line.

mod common;

use common::*;

async fn run(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(WAIT, command(args, envs).output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn check_config_accepts_a_good_file() {
    let dir = temp_dir("good");
    let path = dir.join("firebrand.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:4100\"\ndrain_ms = 500\n\n[auth]\njwt_hs256_secret = \"s\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run(&["--check-config", path.to_str().unwrap()], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("ok: listen 127.0.0.1:4100, JWT HS256, single node"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_bad_key_fails_with_the_key_and_the_line() {
    let dir = temp_dir("bad");
    let path = dir.join("firebrand.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[auth]\njwt_hs256_secrte = \"s\"\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    for args in [&["--check-config", p], &["--config", p]] {
        let (code, _, stderr) = run(args, &[]).await;
        assert_ne!(code, Some(0));
        assert!(stderr.contains(&format!("{p}:5:1:")), "{stderr}");
        assert!(stderr.contains("jwt_hs256_secrte"), "{stderr}");
    }
}

#[tokio::test]
async fn a_bad_value_fails_with_the_line() {
    let dir = temp_dir("bad-value");
    let path = dir.join("firebrand.toml");
    std::fs::write(
        &path,
        "[auth]\njwt_public_key_file = \"k.pem\"\njwt_algorithm = \"none\"\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let (code, _, stderr) = run(&["--check-config", p], &[]).await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains(&format!("{p}:3:")), "{stderr}");
    assert!(stderr.contains("jwt_algorithm"), "{stderr}");
}

#[tokio::test]
async fn a_bad_variable_is_named() {
    let (code, _, stderr) = run(&[], &[("FIREBRAND_LISTEN", "nowhere")]).await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("FIREBRAND_LISTEN"), "{stderr}");
}
