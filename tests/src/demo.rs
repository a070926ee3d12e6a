//! `tether-master demo` as a fixture: a master, two edges and four devices from one
//! command, on free ports in a temporary folder, with what its banner says.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::ApiClient;
use crate::process::{Server, bin};

/// A running demo and what its banner said.
pub struct Demo {
    /// The `tether-master demo` process.
    pub process: Server,
    /// Its folder.
    pub dir: PathBuf,
    /// The master's API with the admin token.
    pub api: ApiClient,
    /// The dashboard's address with the token.
    pub dashboard: String,
    /// Process name to pid, as the banner lists them.
    pub pids: HashMap<String, u32>,
    _tmp: tempfile::TempDir,
}

/// The word after `label` on the first line that holds it.
fn after<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find_map(|line| line.split_once(label))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {label:?} in the demo's output:\n{text}"))
}

impl Demo {
    /// Starts `tether-master demo` in a new temporary folder on free ports, and waits for
    /// its banner.
    pub async fn start() -> Demo {
        Self::start_with(&[]).await
    }

    /// [`start`](Self::start), with more arguments (`--masters 3`).
    pub async fn start_with(more: &[&str]) -> Demo {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("demo");
        let log = tmp.path().join("demo.log");
        let mut args = vec!["demo", "--dir", dir.to_str().unwrap(), "--base-port", "0"];
        args.extend(more);
        let process = Server::start("demo", &bin("tether-master"), &args, &log);
        process
            .wait_for_log("Ctrl-C stops everything", Duration::from_secs(90))
            .await;
        let text = process.log_text();
        let token = after(&text, "Admin token").to_string();
        let dashboard = after(&text, "Dashboard").to_string();
        let base = dashboard.split("/dashboard/").next().unwrap().to_string();
        let api = ApiClient::new(&base, &dir.join("certs/ca.pem"), Some(token));
        let at = text
            .find("Processes:")
            .unwrap_or_else(|| panic!("no process list in the demo's output:\n{text}"));
        let list = text[at + "Processes:".len()..]
            .split_once('.')
            .map(|(list, _)| list)
            .unwrap_or_default()
            .replace('\n', " ");
        let pids = list
            .split(", ")
            .filter_map(|entry| {
                let (name, pid) = entry.trim().rsplit_once(' ')?;
                Some((name.to_string(), pid.parse().ok()?))
            })
            .collect();
        Demo {
            process,
            dir,
            api,
            dashboard,
            pids,
            _tmp: tmp,
        }
    }

    /// The API port in a server's configuration (`NAME.toml`).
    fn api_port(&self, name: &str) -> String {
        let config = std::fs::read_to_string(self.dir.join(format!("{name}.toml"))).unwrap();
        let listen = config
            .lines()
            .find_map(|line| line.strip_prefix("api_listen = "))
            .unwrap()
            .trim_matches('"');
        listen.rsplit_once(':').unwrap().1.to_string()
    }

    /// A client of master `name`'s API (`m2`, among several), with the banner's admin
    /// token (every master's works on each).
    pub fn master_api(&self, name: &str) -> ApiClient {
        self.api
            .at(&format!("https://localhost:{}", self.api_port(name)))
    }

    /// A client of an edge's API, with that edge's admin token.
    pub fn edge_api(&self, edge: &str) -> ApiClient {
        let port = self.api_port(edge);
        let token =
            std::fs::read_to_string(self.dir.join(format!("data/{edge}/admin.token"))).unwrap();
        // Development edge certificates name the loopback address, not `localhost` (the
        // master's name).
        ApiClient::new(
            &format!("https://127.0.0.1:{port}"),
            &self.dir.join("certs/ca.pem"),
            Some(token.trim().to_string()),
        )
    }

    /// The pid of a process by the banner's name (`edge site-1`, `master`, ...).
    pub fn pid(&self, name: &str) -> u32 {
        *self
            .pids
            .get(name)
            .unwrap_or_else(|| panic!("no process {name:?} in {:?}", self.pids))
    }
}

/// Whether a process with this pid is alive (a zombie, dead but not reaped, is not).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            !matches!(state, Some(Some('Z' | 'X')))
        })
        .unwrap_or(false)
}

/// Processes whose command line mentions `dir`.
pub fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) && alive(pid) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}
