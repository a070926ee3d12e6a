//! An HTTPS client for the client API that trusts the test CA and sends a bearer token.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// An answer with what the tests look at.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status (0: unreachable).
    pub status: u16,
    /// The `Tether-Preferred-Server` header.
    pub preferred_server: Option<String>,
    /// The JSON body (Null when not JSON).
    pub body: Value,
    /// The `ETag` header (a model record's version).
    pub etag: Option<String>,
}

/// A client of one server's API.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client for `https://host:port`, trusting `ca` (PEM), with `token` if given.
    pub fn new(base: &str, ca: &Path, token: Option<String>) -> ApiClient {
        ApiClient::with_timeout(base, ca, token, Duration::from_secs(10))
    }

    /// As [`new`](Self::new), each request given up after `timeout` (status 0).
    pub fn with_timeout(
        base: &str,
        ca: &Path,
        token: Option<String>,
        timeout: Duration,
    ) -> ApiClient {
        let tls = tether_common::link::tls::api_client_config(ca).expect("load test CA");
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(timeout)
            .build()
            .expect("HTTP client");
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    /// The same token at another address (a proxy in front of the server).
    pub fn at(&self, base: &str) -> ApiClient {
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            ..self.clone()
        }
    }

    /// The token it sends.
    pub fn token(&self) -> Option<String> {
        self.token.clone()
    }

    /// The same server with another token (or none).
    pub fn with_token(&self, token: Option<String>) -> ApiClient {
        ApiClient {
            token,
            ..self.clone()
        }
    }

    /// GET `path`: the status and the JSON body (Null when the body is not JSON or the
    /// server could not be reached, with status 0).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    /// POST a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    /// PUT a JSON body.
    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    /// The server's address, `https://host:port`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether `url` (a `Tether-Preferred-Server` hint) names this server: the same port on
    /// loopback (the servers announce `https://127.0.0.1:PORT`, the tests dial `localhost`).
    pub fn is_at(&self, url: Option<&str>) -> bool {
        let port = |url: &str| url.rsplit(':').next().map(str::to_string);
        url.is_some_and(|url| url.starts_with("https://") && port(url) == port(&self.base))
    }

    /// GET `path` as text: the status, the content type and the body.
    pub async fn get_text(&self, path: &str) -> (u16, String, String) {
        match self.request(reqwest::Method::GET, path).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let kind = response
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                (status, kind, response.text().await.unwrap_or_default())
            }
            Err(_) => (0, String::new(), String::new()),
        }
    }

    /// A request to `path` with the token, if any.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Any request: the status and the JSON body (Null when the body is not JSON or empty;
    /// status 0 when the server could not be reached).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let answer = self.send_full(method, path, body).await;
        (answer.status, answer.body)
    }

    /// Any request, with the answer's headers.
    pub async fn send_full(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        self.send_if(method, path, body, None).await
    }

    /// Any request, with `If-Match: if_match` when given, and the answer's headers.
    pub async fn send_if(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> Answer {
        let mut request = self.request(method, path);
        if let Some(condition) = if_match {
            request = request.header("if-match", condition);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let preferred_server = response
                    .headers()
                    .get("tether-preferred-server")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let etag = response
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                Answer {
                    status,
                    preferred_server,
                    etag,
                    body: response.json().await.unwrap_or(Value::Null),
                }
            }
            Err(_) => Answer {
                status: 0,
                preferred_server: None,
                etag: None,
                body: Value::Null,
            },
        }
    }

    /// Runs a module method, with the answer's hint.
    pub async fn exec_full(
        &self,
        system: &str,
        name: &str,
        index: u32,
        method: &str,
        args: Value,
    ) -> Answer {
        let path = format!("/api/v1/systems/{system}/modules/{name}/{index}/exec");
        let body = serde_json::json!({ "method": method, "args": args });
        self.send_full(reqwest::Method::POST, &path, Some(body))
            .await
    }

    /// Runs a module method: `POST /api/v1/systems/{system}/modules/{name}/{index}/exec`.
    pub async fn exec(
        &self,
        system: &str,
        name: &str,
        index: u32,
        method: &str,
        args: Value,
    ) -> (u16, Value) {
        let path = format!("/api/v1/systems/{system}/modules/{name}/{index}/exec");
        self.post(&path, serde_json::json!({ "method": method, "args": args }))
            .await
    }

    /// A module's status map (Null unless 200).
    pub async fn status(&self, system: &str, name: &str, index: u32) -> Value {
        let path = format!("/api/v1/systems/{system}/modules/{name}/{index}/status");
        match self.get(&path).await {
            (200, body) => body,
            _ => Value::Null,
        }
    }

    /// GET `/api/v1/edges` and find one edge's entry.
    pub async fn edge(&self, id: &str) -> Option<Value> {
        let (status, body) = self.get("/api/v1/edges").await;
        if status != 200 {
            return None;
        }
        body.as_array()?.iter().find(|e| e["id"] == id).cloned()
    }

    /// Whether the master shows the edge online.
    pub async fn edge_online(&self, id: &str) -> Option<bool> {
        self.edge(id).await.and_then(|e| e["online"].as_bool())
    }
}
