//! Helpers shared by the integration tests: a real `redis-server` on a
//! free loopback port, stopped when dropped.

#![allow(dead_code)] // Each test binary uses a different subset.
// Test helpers fail loudly: a panic is the report.
#![allow(clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (the listener is dropped, so the port is free
/// again; a race with another process is possible but unlikely).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// A `redis-server` child process with no persistence.
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers.
    pub fn start() -> RedisServer {
        RedisServer::start_on(free_port())
    }

    /// Starts one on `port` (a restart after `stop`).
    pub fn start_on(port: u16) -> RedisServer {
        RedisServer::start_with(port, &[], None)
    }

    /// Starts one requiring `password` (`requirepass`).
    pub fn start_with_password(password: &str) -> RedisServer {
        RedisServer::start_with(free_port(), &["--requirepass", password], Some(password))
    }

    fn start_with(port: u16, extra: &[&str], password: Option<&str>) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): it must be on PATH; run `make setup`")
            });
        let server = RedisServer {
            port,
            child: Some(child),
        };
        let url = match password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{port}"),
            None => server.url(),
        };
        server.wait_ready(&url);
        server
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn wait_ready(&self, url: &str) {
        let client = redis::Client::open(url).expect("redis url");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(mut conn) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "redis-server on port {} did not answer within 5 s",
            self.port
        );
    }

    /// Kills the server (as a crash would) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
