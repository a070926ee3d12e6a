//! The edge binary's command line: configuration errors are one line naming the file, the
//! key and what was expected, with a non-zero exit.

use std::process::Command;

fn edge_with(text: &str) -> (i32, String) {
    edge_in(&tempfile::tempdir().unwrap(), text)
}

/// Runs the edge on `text` written as `edge.toml` in `dir` (which may hold other files).
fn edge_in(dir: &tempfile::TempDir, text: &str) -> (i32, String) {
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tether-edge"))
        .args(["--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = "edge_id = \"site-1\"\ndata_dir = \"data\"\napi_listen = \"127.0.0.1:0\"\n\
master = \"127.0.0.1:17400\"\nmaster_name = \"localhost\"\nsecret_file = \"s.secret\"\n\
[tls]\ncert = \"e.pem\"\nkey = \"e.key\"\nca = \"ca.pem\"\n";

/// The error is one line starting with the program's name (log lines may come before it).
fn assert_one_line(stderr: &str, needles: &[&str]) {
    let lines: Vec<_> = stderr
        .lines()
        .filter(|l| l.starts_with("tether-edge: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
    }
}

#[test]
fn a_master_address_without_port_is_named() {
    let (code, stderr) = edge_with(&GOOD.replace("127.0.0.1:17400", "127.0.0.1"));
    assert_ne!(code, 0);
    assert_one_line(
        &stderr,
        &["edge.toml", "key `master`", "expected host:port"],
    );
}

#[test]
fn an_unknown_key_in_tls_is_named() {
    let (code, stderr) = edge_with(&format!("{GOOD}certificate = \"x\"\n"));
    assert_ne!(code, 0);
    assert_one_line(&stderr, &["edge.toml:11", "certificate", "expected one of"]);
}

#[test]
fn a_missing_secret_file_is_named() {
    // Certificates are checked after the secret; the secret is missing first.
    let (code, stderr) = edge_with(GOOD);
    assert_ne!(code, 0);
    assert_one_line(&stderr, &["s.secret", "cannot read the secret file"]);
}

#[test]
fn a_short_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s.secret"), "abcd\n").unwrap();
    let (code, stderr) = edge_in(&dir, GOOD);
    assert_ne!(code, 0);
    assert_one_line(&stderr, &["s.secret", "64 hex digits"]);
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    // No master to reach: the edge boots from its (empty) replica all the same.
    let config = GOOD.replace("127.0.0.1:17400", "127.0.0.1:1") + "create_dev_certs = true\n";
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, config).unwrap();
    let program = std::path::Path::new(env!("CARGO_BIN_EXE_tether-edge"));
    let lines = tether_tests::process::stderr_until(
        program,
        &["--config", path.to_str().unwrap(), "--log-format", "json"],
        "edge booted",
    );
    tether_tests::process::assert_json_logs(&lines, "edge booted");
}
