//! The demo's ban: the quota server's admin API bans the clients' address
//! (`POST /bans`), both Envoys refuse it with 403 once the ban reached them
//! (on the sync channel, within about 200 ms), then the ban is lifted
//! (`DELETE /bans`) and both stop refusing it.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;

use super::local::LocalStack;
use crate::client::{send, Reply};
use crate::wait;

/// The address banned: every demo client's, as each Envoy sees it.
pub const BANNED: &str = "127.0.0.1";
/// The path the banned client asks for.
const PATH: &str = "/api/items";
/// How long a ban, or its lifting, may take to reach an Envoy.
const REACH_WITHIN: Duration = Duration::from_secs(5);

/// What each Envoy answered while the ban held, and once lifted.
#[derive(Debug)]
pub struct BanRun {
    /// The first 403 of each Envoy.
    pub during: Vec<Reply>,
    /// Each Envoy's first answer that was not 403 after the lifting.
    pub after: Vec<Reply>,
}

/// Bans [`BANNED`] for a minute, waits until both Envoys refuse it, lifts
/// the ban, waits until neither does.
pub async fn ban_and_lift(stack: &LocalStack) -> Result<BanRun> {
    let body = format!(r#"{{"cidr": "{BANNED}", "ttl": "1m", "reason": "make demo"}}"#);
    admin(stack, "POST", "/bans", body).await?;
    let mut during = Vec::new();
    for envoy in &stack.envoys {
        let client = envoy.client();
        during.push(
            wait::until("the ban to reach the Envoy", REACH_WITHIN, || async move {
                match client.get(PATH).await {
                    Ok(reply) if reply.status == 403 => Ok(reply),
                    Ok(reply) => Err(format!("status {}", reply.status)),
                    Err(e) => Err(format!("{e:#}")),
                }
            })
            .await?,
        );
    }
    admin(
        stack,
        "DELETE",
        &format!("/bans?cidr={BANNED}"),
        String::new(),
    )
    .await?;
    let mut after = Vec::new();
    for envoy in &stack.envoys {
        let client = envoy.client();
        after.push(
            wait::until(
                "the lifting to reach the Envoy",
                REACH_WITHIN,
                || async move {
                    match client.get(PATH).await {
                        Ok(reply) if reply.status == 403 => Err("still 403".to_owned()),
                        Ok(reply) => Ok(reply),
                        Err(e) => Err(format!("{e:#}")),
                    }
                },
            )
            .await?,
        );
    }
    Ok(BanRun { during, after })
}

/// `method path` on the stack's admin API with its token; errors unless
/// the answer is 2xx.
async fn admin(stack: &LocalStack, method: &str, path: &str, body: String) -> Result<Reply> {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, stack.admin_addr.to_string())
        .header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {}", stack.admin_token),
        )
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .with_context(|| format!("building {method} {path}"))?;
    let reply = send(stack.admin_addr, request).await?;
    if !(200..300).contains(&reply.status) {
        bail!(
            "admin API {method} {path}: status {}: {}",
            reply.status,
            reply.text()
        );
    }
    Ok(reply)
}
