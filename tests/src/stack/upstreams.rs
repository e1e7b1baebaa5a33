//! What the `upstreams` binary prints once it serves, and reading it back.

use std::net::SocketAddr;

/// Each listener's line starts with this, then `http|grpc|ws <address>`.
pub const SERVING_PREFIX: &str = "upstreams: serving ";
/// The last line, once every listener serves.
pub const READY_LINE: &str = "upstreams: ready";

/// Where the upstreams listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamAddrs {
    /// HTTP/1.1 and h2c echo.
    pub http: SocketAddr,
    /// gRPC services.
    pub grpc: SocketAddr,
    /// WebSocket echo and rooms.
    pub ws: SocketAddr,
}

/// The addresses in the `upstreams` binary's output, once it printed
/// [`READY_LINE`].
pub fn parse_output(output: &str) -> Option<UpstreamAddrs> {
    if !output.lines().any(|l| l.trim() == READY_LINE) {
        return None;
    }
    let addr = |kind: &str| {
        output.lines().find_map(|line| {
            let rest = line.trim().strip_prefix(SERVING_PREFIX)?;
            let (k, addr) = rest.split_once(' ')?;
            (k == kind).then(|| addr.parse().ok()).flatten()
        })
    };
    Some(UpstreamAddrs {
        http: addr("http")?,
        grpc: addr("grpc")?,
        ws: addr("ws")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_addresses_only_once_ready() {
        let out = format!(
            "{SERVING_PREFIX}http 127.0.0.1:1\n{SERVING_PREFIX}grpc 127.0.0.1:2\n{SERVING_PREFIX}ws 127.0.0.1:3\n"
        );
        assert_eq!(parse_output(&out), None);
        let ready = parse_output(&format!("{out}{READY_LINE}\n")).unwrap();
        assert_eq!(ready.grpc.port(), 2);
        assert_eq!(ready.ws.port(), 3);
    }
}
