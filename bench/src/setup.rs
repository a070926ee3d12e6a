//! The system under test: `tether-master demo` (a master, a site pair, an edge, simulated
//! devices), plus a logic module that answers at once (`Echo` in system `bench` on site-2, the
//! location of one edge), so a
//! measured call costs Tether and nothing else.

use std::time::Duration;

use serde_json::{Value, json};
use tether_tests::api::ApiClient;
use tether_tests::demo::Demo;

/// The echo driver: a logic module whose method returns its argument.
const ECHO: &str =
    "// A logic module that answers at once: a call's cost without a device.\nfn echo(x) { x }\n";

/// The demo with the echo module running on site-2's edge.
pub struct Bench {
    pub demo: Demo,
    /// site-2's edge API, with its admin token.
    pub edge: ApiClient,
}

async fn must(what: &str, answer: (u16, Value)) -> anyhow::Result<()> {
    let (status, body) = answer;
    anyhow::ensure!((200..300).contains(&status), "{what}: {status} {body}");
    Ok(())
}

impl Bench {
    pub async fn start() -> anyhow::Result<Bench> {
        let demo = Demo::start().await;
        std::fs::write(demo.dir.join("drivers/echo.rhai"), ECHO)?;
        let api = &demo.api;
        must(
            "pull",
            api.post("/api/v1/repositories/core/pull", json!({})).await,
        )
        .await?;
        let driver = json!({"id": "echo", "name": "Echo", "repository": "core",
            "file": "echo.rhai", "kind": "logic", "transport": "none"});
        must("driver", api.post("/api/v1/drivers", driver).await).await?;
        let module = json!({"id": "echo-1", "driver": "echo", "name": "Echo", "edge": "site-2"});
        must("module", api.post("/api/v1/modules", module).await).await?;
        let system =
            json!({"id": "bench", "name": "Bench", "edge": "site-2", "modules": ["echo-1"]});
        must("system", api.post("/api/v1/systems", system).await).await?;
        let edge = demo.edge_api("site-2");
        tether_tests::wait_for("the echo module on site-2", Duration::from_secs(30), || {
            let edge = edge.clone();
            async move {
                let (status, _) = edge.exec("bench", "Echo", 1, "echo", json!([1])).await;
                (status == 200).then_some(())
            }
        })
        .await;
        Ok(Bench { demo, edge })
    }
}
