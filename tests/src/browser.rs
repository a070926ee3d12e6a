//! Headless Chromium driven over the DevTools protocol, for the dashboard's tests: the page
//! runs for real (its scripts, its WebSocket) and the test reads the page by evaluating
//! expressions in it. Chromium is Debian's (`/usr/bin/chromium`, or `TETHER_CHROMIUM`);
//! `.ci/run` installs it when missing. The browser is killed when the handle drops.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A headless browser showing one page.
pub struct Browser {
    child: Child,
    page: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium() -> PathBuf {
    std::env::var_os("TETHER_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

impl Browser {
    /// Opens `url` in a new headless Chromium with a fresh profile. Certificate errors
    /// are ignored: the servers' certificates come from a test CA.
    pub async fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().expect("a browser profile folder");
        let program = chromium();
        let child = Command::new(&program)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--ignore-certificate-errors",
                "--remote-debugging-port=0",
                "--window-size=1300,1400",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start {} ({err}): install Debian's chromium (.ci/run does) or set TETHER_CHROMIUM",
                    program.display()
                )
            });
        // Chromium writes its DevTools port to the profile once it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let port: u16 =
            crate::wait_for("Chromium's DevTools port", Duration::from_secs(30), || {
                let text = std::fs::read_to_string(&port_file).unwrap_or_default();
                async move { text.lines().next()?.trim().parse().ok() }
            })
            .await;
        let list_url = format!("http://127.0.0.1:{port}/json/list");
        let page_url: String = crate::wait_for(
            "the page's DevTools target",
            Duration::from_secs(30),
            || {
                let list_url = list_url.clone();
                async move {
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(5))
                        .build()
                        .ok()?;
                    let targets: Value =
                        http.get(&list_url).send().await.ok()?.json().await.ok()?;
                    targets
                    .as_array()?
                    .iter()
                    .find(|t| t["type"] == "page")?["webSocketDebuggerUrl"]
                    .as_str()
                    .map(str::to_string)
                }
            },
        )
        .await;
        let (page, _) = tokio_tungstenite::connect_async(page_url.as_str())
            .await
            .expect("connect to the page's DevTools socket");
        Browser {
            child,
            page,
            next_id: 1,
            _profile: profile,
        }
    }

    /// Saves a PNG of the page to `path` (for people: a test may offer one on request).
    pub async fn screenshot(&mut self, path: &std::path::Path) {
        let data = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let Some(encoded) = data["data"].as_str() else {
            return;
        };
        use base64::Engine;
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(encoded) {
            let _ = std::fs::write(path, bytes);
        }
    }

    /// Sends one DevTools command and returns its `result`; a browser that does not
    /// answer within 30 s fails the test.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let answer =
            tokio::time::timeout(Duration::from_secs(30), self.call_unbounded(method, params));
        answer
            .await
            .unwrap_or_else(|_| panic!("Chromium did not answer {method} within 30 s"))
    }

    async fn call_unbounded(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let command = json!({"id": id, "method": method, "params": params});
        self.page
            .send(Message::Text(command.to_string().into()))
            .await
            .expect("send to DevTools");
        while let Some(message) = self.page.next().await {
            let Ok(Message::Text(text)) = message else {
                continue;
            };
            let answer: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
            if answer["id"] == id {
                return answer["result"].clone();
            }
        }
        panic!("the DevTools socket closed");
    }

    /// Evaluates `expression` in the page; its value (JSON), or `Null` when it throws.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let params = json!({"expression": expression, "returnByValue": true, "awaitPromise": true});
        let result = self.call("Runtime.evaluate", params).await;
        if result.get("exceptionDetails").is_some() {
            return Value::Null;
        }
        result["result"]["value"].clone()
    }

    /// Polls `expression` until `wanted` accepts its value; panics naming `what`.
    pub async fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        expression: &str,
        wanted: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = std::time::Instant::now();
        loop {
            let value = self.eval(expression).await;
            if wanted(&value) {
                return value;
            }
            if start.elapsed() > limit {
                panic!(
                    "timed out after {} ms waiting for {what}; last value: {value}",
                    limit.as_millis()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
