//! The demo's traffic through both Envoys of a [`LocalStack`] and its
//! summary (`make demo`; checked by `tests/tests/demo.rs`).
//!
//! HTTP requests, gRPC calls and WebSocket upgrades alternate between
//! `envoy-a` and `envoy-b` against the stack's synced rules (one budget for
//! the fleet, kept by the quota server); each open WebSocket connection
//! then sends messages against a local rule of each Envoy, per connection.
//! Then the clients' address is banned through the quota server's admin
//! API and the ban lifted ([`super::ban`]).
//! Every loop is bounded in count, and each exchange in time.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{anyhow, bail, Context as _, Result};
use futures_util::SinkExt as _;
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;

use super::ban::{ban_and_lift, BanRun, BANNED};
use super::files;
use super::local::{LocalStack, ENVOY_NAMES};
use crate::client::Reply;
use crate::grpc::user::user_service_client::UserServiceClient;
use crate::grpc::user::GetUserRequest;
use crate::ws_client::{connect, next_message, until_closed, Upgrade};

/// `GET /api/items`, against the synced rule `api`.
pub const HTTP_REQUESTS: usize = 300;
/// `user.UserService/GetUser` calls, against the synced rule `grpc-calls`.
pub const GRPC_CALLS: usize = 16;
/// Upgrades of `/ws`, against the synced rule `ws-upgrades`.
pub const WS_UPGRADES: usize = 6;
/// Messages each open connection sends, against the local rule
/// `ws-messages`.
pub const WS_MESSAGES: usize = 7;

/// The rule each protocol's requests meet, as in `envoy/stack/filter.json`.
pub const HTTP_RULE: &str = "api";
/// See [`HTTP_RULE`].
pub const GRPC_RULE: &str = "grpc-calls";
/// See [`HTTP_RULE`].
pub const WS_UPGRADE_RULE: &str = "ws-upgrades";
/// The local per-connection message rule.
pub const WS_MESSAGE_RULE: &str = "ws-messages";

/// Allowed and limited counts per Envoy (indexed as [`ENVOY_NAMES`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Allowed by each Envoy.
    pub allowed: [u64; 2],
    /// Limited by each Envoy.
    pub limited: [u64; 2],
}

impl Tally {
    fn count(&mut self, envoy: usize, allowed: bool) {
        let slot = if allowed {
            &mut self.allowed[envoy]
        } else {
            &mut self.limited[envoy]
        };
        *slot += 1;
    }

    /// Allowed by the fleet.
    pub fn fleet_allowed(&self) -> u64 {
        self.allowed.iter().sum()
    }

    /// Limited by the fleet.
    pub fn fleet_limited(&self) -> u64 {
        self.limited.iter().sum()
    }
}

/// What the demo's clients saw.
#[derive(Debug)]
pub struct DemoRun {
    /// `GET /api/items`.
    pub http: Tally,
    /// `GetUser` calls.
    pub grpc: Tally,
    /// Upgrades of `/ws`.
    pub ws_upgrades: Tally,
    /// Messages echoed back, and refused (the connection then closed).
    pub ws_messages: Tally,
    /// The Close each limited connection got: code and reason.
    pub ws_closes: Vec<(u16, String)>,
    /// The first allowed and the first refused HTTP reply.
    pub http_examples: (Option<Reply>, Option<Reply>),
    /// Quota server answers, summed over both Envoys
    /// (`sluice_sync.rule.<rule>.outcome.ok`), by synced rule: one per
    /// request of an exact rule, one per request that found no lease of a
    /// leased rule.
    pub quota_answers: BTreeMap<String, u64>,
    /// What both Envoys answered the banned address, then after the ban.
    pub ban: BanRun,
}

/// Drives the demo's traffic through `stack`.
pub async fn drive(stack: &LocalStack) -> Result<DemoRun> {
    let mut run = DemoRun {
        http: Tally::default(),
        grpc: Tally::default(),
        ws_upgrades: Tally::default(),
        ws_messages: Tally::default(),
        ws_closes: Vec::new(),
        http_examples: (None, None),
        quota_answers: BTreeMap::new(),
        ban: BanRun {
            during: Vec::new(),
            after: Vec::new(),
        },
    };
    http(stack, &mut run).await?;
    grpc(stack, &mut run).await?;
    websocket(stack, &mut run).await?;
    // Read before the ban: its probes add requests of their own.
    for rule in files::sync_modes(&stack.filter)?.keys() {
        let name = format!("wasmcustom.sluice_sync.rule.{rule}.outcome.ok");
        let mut total = 0;
        for envoy in &stack.envoys {
            total += envoy.stat(&name).await?.unwrap_or(0);
        }
        run.quota_answers.insert(rule.clone(), total);
    }
    run.ban = ban_and_lift(stack).await?;
    Ok(run)
}

async fn http(stack: &LocalStack, run: &mut DemoRun) -> Result<()> {
    for i in 0..HTTP_REQUESTS {
        let envoy = i % 2;
        let reply = stack.envoys[envoy].client().get("/api/items").await?;
        let allowed = match reply.status {
            200 => true,
            429 => false,
            other => bail!(
                "GET /api/items: unexpected status {other}: {}",
                reply.text()
            ),
        };
        run.http.count(envoy, allowed);
        let example = if allowed {
            &mut run.http_examples.0
        } else {
            &mut run.http_examples.1
        };
        example.get_or_insert(reply);
    }
    Ok(())
}

async fn grpc(stack: &LocalStack, run: &mut DemoRun) -> Result<()> {
    let mut clients = Vec::new();
    for envoy in &stack.envoys {
        clients.push(UserServiceClient::new(
            crate::grpc::connect(envoy.addr()).await?,
        ));
    }
    for i in 0..GRPC_CALLS {
        let envoy = i % 2;
        let request = GetUserRequest { user_id: i as u64 };
        let call = clients[envoy].get_user(request);
        let allowed = match tokio::time::timeout(crate::client::REQUEST_TIMEOUT, call).await {
            Err(_) => bail!(
                "GetUser: no answer within {:?}",
                crate::client::REQUEST_TIMEOUT
            ),
            Ok(Ok(_)) => true,
            Ok(Err(status)) if status.code() == Code::ResourceExhausted => false,
            Ok(Err(status)) => bail!("GetUser: unexpected status {status:?}"),
        };
        run.grpc.count(envoy, allowed);
    }
    Ok(())
}

async fn websocket(stack: &LocalStack, run: &mut DemoRun) -> Result<()> {
    let mut open = Vec::new();
    for i in 0..WS_UPGRADES {
        let envoy = i % 2;
        match connect(stack.envoys[envoy].addr(), "/ws", &[]).await? {
            Upgrade::Open(ws) => {
                run.ws_upgrades.count(envoy, true);
                open.push((envoy, ws));
            }
            Upgrade::Refused(response) if response.status() == 429 => {
                run.ws_upgrades.count(envoy, false);
            }
            Upgrade::Refused(response) => {
                bail!("upgrade of /ws: unexpected status {}", response.status())
            }
        }
    }
    for (envoy, mut ws) in open {
        for n in 0..WS_MESSAGES {
            let text = format!("message {n}");
            ws.send(Message::text(text.clone()))
                .await
                .with_context(|| format!("sending {text:?}"))?;
            match next_message(&mut ws).await? {
                Message::Text(echo) if echo.as_str() == text => run.ws_messages.count(envoy, true),
                Message::Close(frame) => {
                    run.ws_messages.count(envoy, false);
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
                        .ok_or_else(|| anyhow!("a Close without a code"))?;
                    run.ws_closes.push((code, reason));
                    until_closed(&mut ws).await?;
                    break;
                }
                other => bail!("after {text:?}: unexpected {other:?}"),
            }
        }
    }
    Ok(())
}

/// The documented least a leased rule admits under sustained demand:
/// `limit - 2 x envoys x max_lease` (README, "Worst-case undershoot").
pub fn leased_floor(limit: u64, envoys: u64, max_lease: u64) -> u64 {
    limit.saturating_sub(2 * envoys * max_lease)
}

/// The rate-limit headers of a reply, one per line.
fn rate_limit_headers(reply: &Reply) -> String {
    let mut out = format!("      HTTP {}\n", reply.status);
    for name in [
        "ratelimit-policy",
        "ratelimit",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "retry-after",
    ] {
        if let Some(value) = reply.header(name) {
            let _ = writeln!(out, "      {name}: {value}");
        }
    }
    if reply.status == 429 {
        let _ = writeln!(out, "      body: {}", reply.text().trim());
    }
    out
}

/// The readable summary. Its table rows read
/// `<row> <rule> <a allowed> <a limited> <b allowed> <b limited> <fleet allowed> <fleet limited> <limit>`
/// (`-` where there is no fleet-wide limit); `tests/tests/demo.rs` reads
/// them back.
pub fn summary(run: &DemoRun, filter: &str, limits: &BTreeMap<String, u64>) -> String {
    let modes = files::sync_modes(filter).unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Traffic alternated between {} and {} ({HTTP_REQUESTS} HTTP requests, {GRPC_CALLS} gRPC calls, \
         {WS_UPGRADES} WebSocket upgrades, then {WS_MESSAGES} messages on each open connection).\n",
        ENVOY_NAMES[0], ENVOY_NAMES[1]
    );
    let _ = writeln!(
        out,
        "{:<11} {:<12} {:>16} {:>16} {:>16} {:>6}",
        "", "", ENVOY_NAMES[0], ENVOY_NAMES[1], "fleet", ""
    );
    let _ = writeln!(
        out,
        "{:<11} {:<12} {:>8}{:>8} {:>8}{:>8} {:>8}{:>8} {:>6}",
        "what", "rule", "allowed", "limited", "allowed", "limited", "allowed", "limited", "limit"
    );
    let rows = [
        ("http", HTTP_RULE, &run.http),
        ("grpc", GRPC_RULE, &run.grpc),
        ("ws-upgrade", WS_UPGRADE_RULE, &run.ws_upgrades),
        ("ws-message", WS_MESSAGE_RULE, &run.ws_messages),
    ];
    for (what, rule, tally) in rows {
        let limit = limits
            .get(rule)
            .map_or_else(|| "-".to_owned(), u64::to_string);
        let _ = writeln!(
            out,
            "{what:<11} {rule:<12} {:>8}{:>8} {:>8}{:>8} {:>8}{:>8} {limit:>6}",
            tally.allowed[0],
            tally.limited[0],
            tally.allowed[1],
            tally.limited[1],
            tally.fleet_allowed(),
            tally.fleet_limited(),
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "Global limits (the quota server holds one budget for both Envoys):"
    );
    for (what, rule, tally) in &rows[..3] {
        let limit = limits.get(*rule).copied().unwrap_or(0);
        let mode = modes.get(*rule).map_or("?", String::as_str);
        let answers = run.quota_answers.get(*rule).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "  {rule:<12} {what:<10}: {mode}, fleet-wide {} admitted against a limit of {limit} \
             per minute ({} by {}, {} by {})",
            tally.fleet_allowed(),
            tally.allowed[0],
            ENVOY_NAMES[0],
            tally.allowed[1],
            ENVOY_NAMES[1],
        );
        match files::max_lease(filter, rule) {
            Some(lease) => {
                let envoys = ENVOY_NAMES.len() as u64;
                let _ = writeln!(
                    out,
                    "  {:<23}  each Envoy admits from permits it leased (max_lease {lease}): \
                     never above the limit, at least the documented floor {} \
                     (limit - 2 x {envoys} Envoys x {lease}); {answers} of its requests \
                     found no lease and asked the quota server",
                    "",
                    leased_floor(limit, envoys, lease)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  {:<23}  every request asked the quota server ({answers} answers): \
                     exactly the limit",
                    ""
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "  Synced rules count requests: HTTP requests, gRPC calls and WebSocket upgrades; \
         a refused gRPC call ends with RESOURCE_EXHAUSTED, a refused upgrade with HTTP 429."
    );
    let mut closes: BTreeMap<String, usize> = BTreeMap::new();
    for (code, reason) in &run.ws_closes {
        *closes.entry(format!("{code} {reason:?}")).or_default() += 1;
    }
    let closes: Vec<String> = closes
        .iter()
        .map(|(close, n)| format!("{n} x Close {close}"))
        .collect();
    let per_connection = files::local_limit(filter, WS_MESSAGE_RULE)
        .map_or_else(|| "?".to_owned(), |n| n.to_string());
    let _ = writeln!(
        out,
        "Local limit (each Envoy on its own: message rules stay local; keyed on the \
         connection's sec-websocket-key, so per connection):\n  {WS_MESSAGE_RULE:<12} \
         {per_connection} messages per connection per minute: {} echoed, {} refused, \
         each refusal closing its connection ({})",
        run.ws_messages.fleet_allowed(),
        run.ws_messages.fleet_limited(),
        if closes.is_empty() {
            "none".to_owned()
        } else {
            closes.join(", ")
        }
    );
    out.push('\n');
    let _ = writeln!(
        out,
        "Ban through the quota server's admin API (POST /bans {{\"cidr\": \"{BANNED}\", \
         \"ttl\": \"1m\"}}), on the Envoys within a sync interval or two:"
    );
    for (name, reply) in ENVOY_NAMES.iter().zip(&run.ban.during) {
        let _ = writeln!(
            out,
            "  banned {name}: HTTP {} {}",
            reply.status,
            reply.text().trim()
        );
    }
    let _ = writeln!(out, "Lifted (DELETE /bans?cidr={BANNED}):");
    for (name, reply) in ENVOY_NAMES.iter().zip(&run.ban.after) {
        let _ = writeln!(
            out,
            "  lifted {name}: HTTP {} (the rules decide again)",
            reply.status
        );
    }
    out.push('\n');
    let _ = writeln!(out, "Rate-limit headers a client saw on GET /api/items:");
    for (label, reply) in [
        ("allowed", &run.http_examples.0),
        ("refused", &run.http_examples.1),
    ] {
        let _ = writeln!(out, "  {label}:");
        match reply {
            Some(reply) => out.push_str(&rate_limit_headers(reply)),
            None => out.push_str("      (none)\n"),
        }
    }
    out
}
