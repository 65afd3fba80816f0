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
        "[server]\nlisten = \"127.0.0.1:4100\"\ndrain_ms = 500\n\n[auth]\njwt_hs256_secret = \"a-secret-of-32-bytes-0123456789a\"\n",
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

/// `--check-config` of a file holding `text`, with `envs`: `(exit code, stdout, stderr)`.
async fn check(name: &str, text: &str, envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = temp_dir(name);
    let path = dir.join("firebrand.toml");
    std::fs::write(&path, text).unwrap();
    run(&["--check-config", path.to_str().unwrap()], envs).await
}

const LONG_SECRET: &str = "a-secret-of-32-bytes-0123456789a";

#[tokio::test]
async fn no_auth_on_a_public_address_needs_allow_anonymous_written() {
    let public = "[server]\nlisten = \"0.0.0.0:4000\"\n";
    let (code, _, stderr) = check("public-open", public, &[]).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("firebrand.toml:2:"), "{stderr}");
    // The error names the fixes.
    for fix in ["FIREBRAND_JWT_SECRET", "allow_anonymous = true"] {
        assert!(stderr.contains(fix), "{fix}: {stderr}");
    }
    // From the variable too, and when serving.
    let (code, _, stderr) = run(&[], &[("FIREBRAND_LISTEN", "0.0.0.0:0")]).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("FIREBRAND_LISTEN"), "{stderr}");
    // Written explicitly (in the file or the variable): accepted.
    let anonymous = format!("{public}[auth]\nallow_anonymous = true\n");
    let (code, stdout, stderr) = check("public-anonymous", &anonymous, &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("anonymous connections allowed"), "{stdout}");
    let env = [("FIREBRAND_ALLOW_ANONYMOUS", "true")];
    let (code, _, stderr) = check("public-anonymous-env", public, &env).await;
    assert_eq!(code, Some(0), "{stderr}");
    // With a key: accepted; on loopback without a key: accepted (development mode).
    let env = [("FIREBRAND_JWT_SECRET", LONG_SECRET)];
    let (code, _, stderr) = check("public-keyed", public, &env).await;
    assert_eq!(code, Some(0), "{stderr}");
    let env = [("FIREBRAND_LISTEN", "[::1]:4000")];
    let (code, _, stderr) = check("loopback", "", &env).await;
    assert_eq!(code, Some(0), "{stderr}");
}

#[tokio::test]
async fn an_empty_variable_is_an_error_naming_it() {
    for var in [
        "FIREBRAND_JWT_SECRET",
        "FIREBRAND_API_KEY",
        "FIREBRAND_LISTEN",
        "REDIS_URL",
    ] {
        let (code, _, stderr) = check("empty-var", "", &[(var, "")]).await;
        assert_ne!(code, Some(0), "{var}: {stderr}");
        assert!(stderr.contains(&format!("{var}: is empty")), "{stderr}");
    }
    // FIREBRAND_CONFIG, which the binary reads itself.
    let (code, _, stderr) = run(&[], &[("FIREBRAND_CONFIG", "")]).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("FIREBRAND_CONFIG"), "{stderr}");
}

#[tokio::test]
async fn audience_or_issuer_without_a_key_is_an_error() {
    let (code, _, stderr) = check("audience", "[auth]\n\naudience = \"app\"\n", &[]).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("firebrand.toml:3:"), "{stderr}");
    assert!(stderr.contains("auth.audience"), "{stderr}");
    let env = [("FIREBRAND_JWT_ISSUER", "https://auth.example.com")];
    let (code, _, stderr) = check("issuer", "", &env).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("FIREBRAND_JWT_ISSUER"), "{stderr}");
    // With the connect backend but no key: nothing to check them with either.
    let text = "[auth]\nconnect_url = \"http://127.0.0.1:9/c\"\naudience = \"app\"\n";
    let (code, _, stderr) = check("audience-connect", text, &[]).await;
    assert_ne!(code, Some(0), "{stderr}");
    // With a key: fine.
    let env = [
        ("FIREBRAND_JWT_SECRET", LONG_SECRET),
        ("FIREBRAND_JWT_ISSUER", "https://auth.example.com"),
    ];
    let (code, _, stderr) = check("issuer-keyed", "", &env).await;
    assert_eq!(code, Some(0), "{stderr}");
}

#[tokio::test]
async fn secrets_shorter_than_32_bytes_are_refused() {
    let short = &LONG_SECRET[..31];
    let hooks = "[webhooks]\nurl = \"http://127.0.0.1:9/w\"\n";
    for (name, text, var) in [
        ("jwt", "", "FIREBRAND_JWT_SECRET"),
        ("webhook", hooks, "FIREBRAND_WEBHOOK_SECRET"),
        ("cluster", "", "FIREBRAND_CLUSTER_SECRET"),
    ] {
        let (code, _, stderr) = check(name, text, &[(var, short)]).await;
        assert_ne!(code, Some(0), "{var}: {stderr}");
        assert!(stderr.contains(var), "{stderr}");
        assert!(stderr.contains("32 bytes"), "{stderr}");
        assert!(!stderr.contains(short), "the secret is printed: {stderr}");
        let (code, _, stderr) = check(name, text, &[(var, LONG_SECRET)]).await;
        assert_eq!(code, Some(0), "{var}: {stderr}");
    }
    // In the file, with the line.
    let text = format!("[auth]\njwt_hs256_secret = \"{short}\"\n");
    let (code, _, stderr) = check("jwt-file", &text, &[]).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("firebrand.toml:2:"), "{stderr}");
    assert!(stderr.contains("auth.jwt_hs256_secret"), "{stderr}");
}

#[tokio::test]
async fn development_mode_and_a_cluster_without_secret_are_logged_as_warnings() {
    let (code, _, stderr) = check("warn-dev", "", &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains("development mode"),
        "{stderr}"
    );
    let env = [
        ("FIREBRAND_JWT_SECRET", LONG_SECRET),
        ("REDIS_URL", "redis://127.0.0.1:6379"),
    ];
    let (code, _, stderr) = check("warn-cluster", "", &env).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains("cluster.secret"),
        "{stderr}"
    );
    assert!(!stderr.contains("development mode"), "{stderr}");
    let env = [
        ("FIREBRAND_JWT_SECRET", LONG_SECRET),
        ("REDIS_URL", "redis://127.0.0.1:6379"),
        ("FIREBRAND_CLUSTER_SECRET", LONG_SECRET),
    ];
    let (code, _, stderr) = check("warn-none", "", &env).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("WARN"), "{stderr}");
}

#[tokio::test]
async fn passwords_in_urls_are_never_printed() {
    let password = "hunter2-password";
    // A Redis URL the client refuses: the server exits with an error naming it, redacted.
    let url = format!("redis://:{password}@127.0.0.1:notaport/0");
    let (code, _, stderr) = run(&[], &[("REDIS_URL", &url)]).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("Redis URL"), "{stderr}");
    assert!(!stderr.contains(password), "{stderr}");
    // Backend URLs with credentials are refused, without repeating them.
    let url = format!("http://user:{password}@127.0.0.1:9/c");
    let env = [("FIREBRAND_CONNECT_URL", url.as_str())];
    let (code, _, stderr) = check("connect-url", "", &env).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("FIREBRAND_CONNECT_URL"), "{stderr}");
    assert!(!stderr.contains(password), "{stderr}");
    let env = [
        ("FIREBRAND_WEBHOOK_URL", url.as_str()),
        ("FIREBRAND_WEBHOOK_SECRET", LONG_SECRET),
    ];
    let (code, _, stderr) = check("webhook-url", "", &env).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(!stderr.contains(password), "{stderr}");
    // A secret's key misspelt: the error quotes the line, without the value.
    let text = format!("[auth]\njwt_hs256_secrte = \"{password}-0123456789abcdef\"\n");
    let (code, _, stderr) = check("misspelt", &text, &[]).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("jwt_hs256_secrte"), "{stderr}");
    assert!(!stderr.contains(password), "{stderr}");
}

#[tokio::test]
async fn the_history_budget_is_read_from_the_file_or_the_environment() {
    let recoverable =
        "[[namespace]]\nprefix = \"stream:\"\nhistory = { size = 100, max_age_ms = 60000 }\n";
    // The library's default, 64 MiB, unless set.
    let (code, stdout, stderr) = check("budget-default", recoverable, &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(", history budget 64 MiB"), "{stdout}");
    let file = format!("[server]\nhistory_budget_mb = 16\n\n{recoverable}");
    let (code, stdout, stderr) = check("budget-file", &file, &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(", history budget 16 MiB"), "{stdout}");
    let envs = [("FIREBRAND_HISTORY_BUDGET_MB", "32")];
    let (code, stdout, stderr) = check("budget-env", &file, &envs).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(", history budget 32 MiB"), "{stdout}");

    // Zero, or not a number: an error naming the line or the variable.
    let (code, _, stderr) = check("budget-zero", "[server]\nhistory_budget_mb = 0\n", &[]).await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("firebrand.toml:2:") && stderr.contains("history_budget_mb"),
        "{stderr}"
    );
    let envs = [("FIREBRAND_HISTORY_BUDGET_MB", "lots")];
    let (code, _, stderr) = check("budget-bad-env", "", &envs).await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("FIREBRAND_HISTORY_BUDGET_MB"), "{stderr}");
}
