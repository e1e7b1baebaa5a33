//! Headless Chromium driven over WebDriver (chromedriver's HTTP protocol),
//! for the playground's page: Debian's `chromium` and `chromium-driver`
//! (`make setup`). Both processes are this one's children, stopped by PID
//! when the [`Browser`] is dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};

use crate::envoy::{die_with_parent, terminate};
use crate::{client, free_port, wait};

/// How long a page may take to reach a state a test waits for.
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A process started here (it gets SIGTERM should this one die), stopped
/// by its PID when dropped: SIGTERM, so Chromium ends its own helpers,
/// then SIGKILL after 5 s.
struct Started(Child);

impl Started {
    fn spawn(mut command: Command, what: &str) -> Result<Started> {
        die_with_parent(&mut command);
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {what} (make setup installs it)"))?;
        Ok(Started(child))
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        terminate(&mut self.0);
    }
}

/// Headless Chromium with a fresh profile, and chromedriver attached to it
/// with one session.
pub struct Browser {
    // Dropped in this order: the driver, then the browser, then its profile.
    _driver: Started,
    _chromium: Started,
    _profile: tempfile::TempDir,
    driver: SocketAddr,
    session: String,
}

impl Browser {
    /// Starts Chromium (its DevTools on a loopback port it picks), then
    /// chromedriver on a free loopback port, and opens a session.
    pub async fn start() -> Result<Browser> {
        let profile = tempfile::tempdir().context("a profile directory")?;
        let mut chromium = Command::new("chromium");
        chromium
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--window-size=1200,1500",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank");
        let chromium = Started::spawn(chromium, "chromium")?;
        // Chromium writes the port it chose into the profile.
        let active = profile.path().join("DevToolsActivePort");
        let devtools_port = wait::until("chromium's DevTools port", PAGE_TIMEOUT, || {
            let active = active.clone();
            async move {
                std::fs::read_to_string(&active)
                    .ok()
                    .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u16>().ok()))
                    .ok_or_else(|| "no DevToolsActivePort yet".to_owned())
            }
        })
        .await?;
        let port = free_port()?;
        let mut driver = Command::new("chromedriver");
        driver.arg(format!("--port={port}"));
        let driver_process = Started::spawn(driver, "chromedriver (chromium-driver)")?;
        let driver = SocketAddr::from(([127, 0, 0, 1], port));
        wait::until("chromedriver", PAGE_TIMEOUT, || async move {
            match call(driver, "GET", "/status", None).await {
                Ok(v) if v["value"]["ready"] == true => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await?;
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {"debuggerAddress": format!("127.0.0.1:{devtools_port}")}
        }}});
        let created = call(driver, "POST", "/session", Some(capabilities)).await?;
        let session = created["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("chromedriver opened no session: {created}"))?
            .to_owned();
        Ok(Browser {
            _driver: driver_process,
            _chromium: chromium,
            _profile: profile,
            driver,
            session,
        })
    }

    /// A WebDriver command of this session; its `value`.
    pub async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let path = format!("/session/{}{path}", self.session);
        let reply = call(self.driver, method, &path, body).await?;
        if reply["value"]["error"].is_string() {
            bail!("{method} {path}: {}", reply["value"]);
        }
        Ok(reply["value"].clone())
    }

    /// Loads `url`.
    pub async fn open(&self, url: &str) -> Result<()> {
        self.command("POST", "/url", Some(json!({ "url": url })))
            .await
            .map(drop)
    }

    /// Runs `script` (a function body) in the page; what it returns.
    pub async fn run(&self, script: &str) -> Result<Value> {
        let body = json!({"script": script, "args": []});
        self.command("POST", "/execute/sync", Some(body)).await
    }

    /// The WebDriver id of the element `css` selects.
    async fn element(&self, css: &str) -> Result<String> {
        let found = self
            .command(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no element {css}: {found}"))
    }

    /// Replaces a field's text by typing `text` into it.
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let id = self.element(css).await?;
        self.command("POST", &format!("/element/{id}/clear"), Some(json!({})))
            .await?;
        let body = json!({ "text": text });
        self.command("POST", &format!("/element/{id}/value"), Some(body))
            .await
            .map(drop)
    }

    /// Clicks the element `css` selects.
    pub async fn click(&self, css: &str) -> Result<()> {
        let id = self.element(css).await?;
        self.command("POST", &format!("/element/{id}/click"), Some(json!({})))
            .await
            .map(drop)
    }

    /// Polls `script` until it returns something other than null.
    pub async fn until(&self, what: &str, script: &str) -> Result<Value> {
        wait::until(what, PAGE_TIMEOUT, || async {
            match self.run(script).await {
                Ok(Value::Null) => Err("null".to_owned()),
                Ok(v) => Ok(v),
                Err(e) => Err(format!("{e:#}")),
            }
        })
        .await
    }

    /// Saves a PNG of the window at `path`.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let png = self.command("GET", "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .context("the screenshot is no base64")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }
}

/// One WebDriver HTTP call to chromedriver at `driver`.
async fn call(driver: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", driver.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    client::send(driver, request).await?.json()
}
