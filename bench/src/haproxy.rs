//! The peer for the latency scenario: HAProxy (Debian's package, installed when missing)
//! terminating TLS in front of an edge and opening TLS to it, as a generic proxy hop would;
//! and the same HAProxy as a plain TCP relay, passing the bytes on without reading them: the
//! least a hop through another process costs on the machine.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// A running HAProxy, killed on drop.
pub struct HaProxy {
    child: Child,
    pub port: u16,
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn installed() -> bool {
    Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs Debian's haproxy if it is missing (as root, or through sudo).
pub fn ensure_installed() -> anyhow::Result<()> {
    if installed() {
        return Ok(());
    }
    eprintln!("installing haproxy (Debian's package) ...");
    let root = Command::new("id").arg("-u").output()?.stdout == b"0\n";
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let mut command = if root {
            Command::new(args[0])
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg(args[0]);
            sudo
        };
        let status = command
            .args(&args[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "{args:?} failed: {status}");
        Ok(())
    };
    run(&["apt-get", "update", "-qq"])?;
    run(&["apt-get", "install", "-y", "-qq", "haproxy"])?;
    anyhow::ensure!(
        installed(),
        "haproxy is still missing after apt-get install"
    );
    Ok(())
}

/// Starts HAProxy on a free port in front of site-2's API on `backend`, with the demo's
/// master certificate for its own TLS and its CA to check the edge's (named `site-2`).
pub fn start(dir: &Path, backend: u16) -> anyhow::Result<HaProxy> {
    ensure_installed()?;
    let certs = dir.join("certs");
    let mut pem = std::fs::read(certs.join("master.pem"))?;
    pem.extend(std::fs::read(certs.join("master.key"))?);
    let crt = dir.join("haproxy.pem");
    std::fs::write(&crt, pem)?;
    let port = tether_tests::free_port();
    let config = format!(
        "global\n  maxconn 4096\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n\
         frontend bench\n  bind 127.0.0.1:{port} ssl crt {crt}\n  default_backend edge\n\n\
         backend edge\n  http-reuse always\n  server edge 127.0.0.1:{backend} ssl verify required ca-file {ca} sni str(site-2) verifyhost site-2\n",
        crt = crt.display(),
        ca = certs.join("ca.pem").display(),
    );
    run(dir, "haproxy.cfg", &config, port)
}

/// Starts HAProxy on a free port as a TCP relay in front of site-2's API on `backend`: the
/// client's TLS goes through to the edge.
pub fn start_relay(dir: &Path, backend: u16) -> anyhow::Result<HaProxy> {
    ensure_installed()?;
    let port = tether_tests::free_port();
    let config = format!(
        "global\n  maxconn 4096\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n\
         frontend relay\n  bind 127.0.0.1:{port}\n  default_backend edge\n\n\
         backend edge\n  server edge 127.0.0.1:{backend}\n",
    );
    run(dir, "haproxy-relay.cfg", &config, port)
}

fn run(dir: &Path, name: &str, config: &str, port: u16) -> anyhow::Result<HaProxy> {
    let file = dir.join(name);
    std::fs::write(&file, config)?;
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start haproxy")?;
    Ok(HaProxy { child, port })
}
