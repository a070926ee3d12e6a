//! `tether` against a real master and edge: tables, `--json`, exec with its hint, status,
//! watch and debug over the WebSocket, restore and audit; flags and environment variables;
//! errors with their exit codes.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tether_tests::cluster::{Cluster, ClusterSpec};
use tether_tests::wait_for;

const NOTE: &str = r#"
fn remember(text) { log("remembering " + text); status("note", text); text }
"#;

const SITE: &str = r#"
[[repositories]]
id = "extra"
path = "repos/extra-drivers"

[[drivers]]
id = "note"
repository = "extra"
file = "note.rhai"
transport = "none"

[[modules]]
id = "note"
driver = "note"
name = "Note"
edge = "site-1"

[[systems]]
id = "room"
name = "Room"
edge = "site-1"
modules = ["note"]
"#;

struct Cli {
    server: String,
    ca: String,
    token_file: String,
}

impl Cli {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command
            .args([
                "--server",
                &self.server,
                "--ca",
                &self.ca,
                "--token-file",
                &self.token_file,
            ])
            .args(args)
            .env_remove("TETHER_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run tether")
    }
}

/// A running `tether watch`: its lines as they come, each waited for at most 10 s; killed
/// when dropped, so a watch that never gets its value cannot hang the test.
struct Watch {
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Watch {
    fn start(mut command: Command) -> Watch {
        let mut child = command.spawn().expect("start tether watch");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Watch { child, lines }
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.lines.recv())
            .await
            .expect("tether watch printed its next line within 10 s")
            .expect("tether watch ended before its next line")
    }

    async fn exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for tether watch") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "tether watch did not stop after its --count"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn the_command_line_client_covers_the_api() {
    let mut spec = ClusterSpec::edges(1);
    spec.site_extra = SITE.into();
    spec.files = vec![("repos/extra-drivers/note.rhai".into(), NOTE.into())];
    let cluster = Cluster::start(spec).await;
    cluster.wait_edge_api_up(0).await;
    let master = cluster.master_api();
    wait_for("the room to run", Duration::from_secs(10), || async {
        let answer = master
            .exec_full("room", "Note", 1, "remember", json!(["x"]))
            .await;
        (answer.status == 200 && answer.preferred_server.is_some()).then_some(())
    })
    .await;
    let cli = Cli {
        server: master.base().to_string(),
        ca: cluster.ca().display().to_string(),
        token_file: cluster
            .path("data/master/admin.token")
            .display()
            .to_string(),
    };

    // A table of edges, and the same as JSON.
    let out = cli.run(&["edges"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains("site-1") && table.contains("edge"),
        "{table}"
    );
    let out = cli.run(&["--json", "edges"]);
    let edges: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(edges[0]["id"], "site-1");

    // The same client from the master's binary (what the demo's banner suggests).
    let out = Command::new(tether_tests::process::bin("tether-master"))
        .args(["cli", "--server", &cli.server, "--ca", &cli.ca])
        .args(["--token-file", &cli.token_file, "edges"])
        .env_remove("TETHER_TOKEN")
        .output()
        .expect("run tether-master cli");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let same = text(&out.stdout);
    assert!(same.starts_with("ID") && same.contains("site-1"), "{same}");

    // The masters: one, itself, holding site-1's link.
    let out = cli.run(&["masters"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains("site-1") && table.contains("true"),
        "{table}"
    );

    // Exec through the master: the result, who ran it, and the hint on stderr.
    let out = cli.run(&["exec", "room", "Note", "1", "remember", "hello"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n(executed by edge:site-1)\n");
    assert!(
        text(&out.stderr).contains("controls this system"),
        "{}",
        text(&out.stderr)
    );
    let out = cli.run(&["status", "room", "Note", "1"]);
    assert!(
        text(&out.stdout).contains("note  \"hello\""),
        "{}",
        text(&out.stdout)
    );
    let out = cli.run(&["systems", "room"]);
    assert!(
        text(&out.stdout).contains("edge:site-1"),
        "{}",
        text(&out.stdout)
    );

    // Watch: the current value, then a change; it stops after --count. The change is made
    // once the watch has printed the current value, so a slow start cannot miss it.
    let mut watch =
        Watch::start(cli.command(&["watch", "room", "Note", "1", "note", "--count", "2"]));
    assert_eq!(watch.line().await, "note = \"hello\"");
    master
        .exec("room", "Note", 1, "remember", json!(["world"]))
        .await;
    assert_eq!(watch.line().await, "note = \"world\"");
    let status = watch.exit().await;
    assert!(status.success(), "tether watch ended with {status}");

    // Debug: the module's log, from the edge where it runs.
    let out = cli.run(&["debug", "room", "Note", "1", "--count", "2"]);
    assert!(
        text(&out.stdout).contains("remembering"),
        "{}",
        text(&out.stdout)
    );

    // Restore when the edge already controls: the API's 409, exit code 1.
    let out = cli.run(&["restore", "site-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("409 conflict"),
        "{}",
        text(&out.stderr)
    );
    // Pull: unchanged, then a changed driver; reset back; audit lists the code change.
    let out = cli.run(&["pull", "extra"]);
    assert!(
        text(&out.stdout).contains("stays at"),
        "{}",
        text(&out.stdout)
    );
    let (_, repository) = cluster.master_api().get("/api/v1/repositories/extra").await;
    let first = repository["commit"].as_str().unwrap().to_string();
    std::fs::write(
        cluster.path("repos/extra-drivers/note.rhai"),
        format!("{NOTE}\nfn added() {{ 1 }}\n"),
    )
    .unwrap();
    let out = cli.run(&["pull", "extra"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let moved = text(&out.stdout);
    assert!(moved.contains(&format!("moved {first} -> ")), "{moved}");
    assert!(moved.contains("drivers reloaded: note"), "{moved}");
    let out = cli.run(&["reset", "extra", &first]);
    assert!(
        text(&out.stdout).ends_with(&format!(
            "-> {first}\nfiles changed: note.rhai\ndrivers reloaded: note\n"
        )),
        "{}",
        text(&out.stdout)
    );
    let out = cli.run(&["reset", "extra", "f00d"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("404"), "{}", text(&out.stderr));
    let out = cli.run(&["audit"]);
    let audit = text(&out.stdout);
    assert!(audit.starts_with("TIME"), "{audit}");
    assert!(audit.contains("repository extra: pulled"), "{audit}");

    // The environment instead of flags; a wrong token is 401; no server is exit 3.
    let token = std::fs::read_to_string(&cli.token_file).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["edges"])
        .env("TETHER_SERVER", &cli.server)
        .env("TETHER_CA", &cli.ca)
        .env("TETHER_TOKEN", token.trim())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "--server",
            &cli.server,
            "--ca",
            &cli.ca,
            "--token",
            "wrong",
            "edges",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("401"), "{}", text(&out.stderr));
    let port = tether_tests::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "--server",
            &format!("https://127.0.0.1:{port}"),
            "--ca",
            &cli.ca,
            "--token",
            "x",
            "edges",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
}
