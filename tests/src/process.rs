//! Starting, killing and restarting the real binaries, with their output in a log file.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The folder holding the workspace's binaries: `TETHER_BIN_DIR`, or the cargo target
/// folder this program was built into (a test's `target/debug/deps/..`, or the folder of
/// a binary such as `target/release/tether-bench`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TETHER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let folder = exe.parent().expect("the program's folder");
    match folder.file_name() {
        Some(name) if name == "deps" => folder.parent().unwrap_or(folder).to_path_buf(),
        _ => folder.to_path_buf(),
    }
}

/// The path of a workspace binary; panics with the fix when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

/// A running (or stopped) server process. Dropping it SIGKILLs the process.
pub struct Server {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    /// Environment set for the process beside the test's own.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Server {
    /// Starts `program args`, appending stdout and stderr to `log`.
    pub fn start(name: &str, program: &Path, args: &[&str], log: &Path) -> Server {
        Server::start_with_env(name, program, args, log, Vec::new())
    }

    /// [`start`](Self::start) with `env` set for the process (kept across restarts).
    pub fn start_with_env(
        name: &str,
        program: &Path,
        args: &[&str],
        log: &Path,
        env: Vec<(String, String)>,
    ) -> Server {
        let mut server = Server {
            name: name.to_string(),
            program: program.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            log: log.to_path_buf(),
            env,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let err = out.try_clone().expect("clone log handle");
        let child = Command::new(&self.program)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("TETHER_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program.display()));
        self.child = Some(child);
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again with the same arguments and log.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Freezes the process (SIGSTOP): it holds its sockets and does nothing, as a server
    /// stuck in swap or a paused VM would.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a frozen process run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid().and_then(|pid| libc::pid_t::try_from(pid).ok()) {
            // SAFETY: kill(2) with our own child's pid has no memory effects.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process has exited (reaping it if so), with its status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends SIGINT (what Ctrl-C sends) and waits up to `limit` for the exit.
    pub fn interrupt(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.pid()?;
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.exited() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Everything the process has written so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; returns the matching line.
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) -> String {
        crate::wait_for(
            &format!("{:?} in the log of {}", needle, self.name),
            limit,
            || async {
                self.log_text()
                    .lines()
                    .find(|line| line.contains(needle))
                    .map(str::to_string)
            },
        )
        .await
    }

    /// How many log lines contain `needle`.
    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // The log is the best clue to why a test failed.
            eprintln!(
                "---- log of {} ({}) ----\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Runs `program args` until one of its stderr lines contains `until` (30 s at most), then
/// SIGKILLs it; answers the stderr lines read, that one last.
pub fn stderr_until(program: &Path, args: &[&str], until: &str) -> Vec<String> {
    use std::io::BufRead;
    let mut child = Command::new(program)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains(until);
                lines.push(line);
                if done {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

/// Every line is a JSON log event (`timestamp`, `level`, `fields.message`), the last one
/// holding `until`.
pub fn assert_json_logs(lines: &[String], until: &str) {
    assert!(
        lines.last().is_some_and(|l| l.contains(until)),
        "never logged {until:?}: {lines:?}"
    );
    for line in lines {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("not a JSON log line ({err}): {line}"));
        assert!(event["level"].is_string(), "{line}");
        assert!(event["timestamp"].is_string(), "{line}");
        assert!(event["fields"]["message"].is_string(), "{line}");
    }
}
