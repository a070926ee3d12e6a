//! The demo's child processes: each is this binary again (`demo-child ...`), its output in
//! a log file, its stdin a pipe from the demo. Closing that pipe stops it cleanly; if the
//! demo dies, even by SIGKILL, the pipe closes all the same, so nothing outlives it.

use std::fs::File;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

/// One process the demo runs.
pub struct Process {
    /// A name for people: `master`, `edge site-1`, `projector room-101`.
    pub name: String,
    /// Arguments after `demo-child`.
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// The last pid, kept after it exits, for the exit message.
    pub pid: u32,
}

impl Process {
    pub fn new(name: impl Into<String>, args: Vec<String>, log: PathBuf) -> Self {
        Process {
            name: name.into(),
            args,
            log,
            child: None,
            pid: 0,
        }
    }

    /// Starts (or starts again) the process.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("cannot find this program to start it again")?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let child = Command::new(exe)
            .arg("demo-child")
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.name))?;
        self.pid = child.id().unwrap_or(0);
        self.child = Some(child);
        Ok(())
    }

    /// How it ended, once it has (and only the first time it is asked).
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(describe(status))
    }

    /// Whether it runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The log's last lines, for an error message.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops it: closes its stdin (it shuts down cleanly) and waits up to `grace`, then
    /// kills it.
    pub async fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        drop(child.stdin.take());
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
        return format!("killed by signal {signal}");
    }
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => "exited".to_string(),
    }
}
