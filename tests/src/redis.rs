//! A real `redis-server` (Debian's, `make setup`) on a loopback port, with
//! no persistence: killed when dropped, restartable on the same port.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::free_port;

/// How long `redis-server` may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// A running `redis-server` on 127.0.0.1.
pub struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    /// Starts one on a free port.
    pub fn start() -> Result<Redis> {
        Redis::start_on(free_port()?)
    }

    /// Starts one on `port` (a restart after [`Redis::stop`]) and waits until
    /// it accepts connections.
    pub fn start_on(port: u16) -> Result<Redis> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server (run `make setup`)")?;
        let mut redis = Redis {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() >= deadline {
                redis.stop();
                bail!("redis-server on port {port} did not accept connections within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(redis)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (as a crash would) and waits for it to exit; its data is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
