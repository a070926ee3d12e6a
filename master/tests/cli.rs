//! The master binary's command line: configuration errors are one line naming the file,
//! the key and what was expected, with a non-zero exit; `certs` writes a dev PKI.

use std::path::Path;
use std::process::Command;

fn master(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether-master"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

const GOOD: &str = "data_dir = \"data\"\napi_listen = \"127.0.0.1:0\"\nlink_listen = \"127.0.0.1:1\"\n\
[tls]\ncert = \"m.pem\"\nkey = \"m.key\"\nca = \"ca.pem\"\n";

/// The error is one line starting with the program's name (log lines may come before it).
fn assert_one_line_error(stderr: &str, needles: &[&str]) {
    let lines: Vec<_> = stderr
        .lines()
        .filter(|l| l.starts_with("tether-master: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected: {stderr}");
    for needle in needles {
        assert!(lines[0].contains(needle), "{needle:?} not in {stderr:?}");
    }
}

#[test]
fn a_missing_config_file_is_named() {
    let (code, _, stderr) = master(&["--config", "/nonexistent/master.toml"]);
    assert_ne!(code, 0);
    assert_one_line_error(&stderr, &["/nonexistent/master.toml", "cannot read"]);
}

#[test]
fn an_unknown_key_is_named_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "master.toml",
        &format!("hearbeat_ms = 5\n{GOOD}"),
    );
    let (code, _, stderr) = master(&["--config", &file]);
    assert_ne!(code, 0);
    assert_one_line_error(
        &stderr,
        &["master.toml:1", "hearbeat_ms", "expected one of"],
    );
}

#[test]
fn a_bad_value_names_the_key_and_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "master.toml",
        &GOOD.replace("127.0.0.1:1", "not-an-address"),
    );
    let (code, _, stderr) = master(&["--config", &file]);
    assert_ne!(code, 0);
    assert_one_line_error(
        &stderr,
        &["master.toml:3", "key `link_listen`", "socket address"],
    );

    let file = write(
        dir.path(),
        "master.toml",
        &format!("boot_wait_ms = -1\n{GOOD}"),
    );
    let (_, _, stderr) = master(&["--config", &file]);
    assert_one_line_error(&stderr, &["key `boot_wait_ms`"]);
}

#[test]
fn a_broken_site_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "site.toml",
        "[[edges]]\nid = \"site-1\"\nsecret_file = \"s\"\nstandby = \"hot\"\n",
    );
    let file = write(
        dir.path(),
        "master.toml",
        &format!("seed = \"site.toml\"\n{GOOD}"),
    );
    let (code, _, stderr) = master(&["--config", &file]);
    assert_ne!(code, 0);
    assert_one_line_error(&stderr, &["site.toml:4", "key `edges[0].standby`", "cold"]);
}

#[test]
fn missing_certificates_are_named_when_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "master.toml", GOOD);
    let (code, _, stderr) = master(&["--config", &file]);
    assert_ne!(code, 0);
    assert_one_line_error(&stderr, &[".pem", "No such file"]);
}

#[test]
fn certs_writes_a_dev_pki_and_refuses_bad_edge_ids() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let (code, stdout, _) = master(&[
        "certs",
        "--dir",
        out.to_str().unwrap(),
        "--edges",
        "site-1,site-2",
    ]);
    assert_eq!(code, 0);
    // The CA and the master's pairs, and per edge a link pair, an API pair and a secret.
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("created ")).count(),
        14,
        "{stdout}"
    );
    let (code, stdout, _) = master(&["certs", "--dir", out.to_str().unwrap(), "--edges", "site-1"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("all files exist already"), "{stdout}");
    let (code, _, stderr) = master(&["certs", "--dir", out.to_str().unwrap(), "--edges", "bad id"]);
    assert_ne!(code, 0);
    assert_one_line_error(&stderr, &["--edges", "bad id"]);
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let link = format!("127.0.0.1:{}", tether_tests::free_port());
    let config = GOOD.replace("127.0.0.1:1", &link) + "create_dev_certs = true\n";
    let file = write(dir.path(), "master.toml", &config);
    let program = Path::new(env!("CARGO_BIN_EXE_tether-master"));
    let lines = tether_tests::process::stderr_until(
        program,
        &["--config", &file, "--log-format", "json"],
        "master booted",
    );
    tether_tests::process::assert_json_logs(&lines, "master booted");
    let (code, _, stderr) = master(&["--config", &file, "--log-format", "yaml"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("text or json"), "{stderr}");
}
