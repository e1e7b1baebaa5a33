//! The `sluice` subcommands that talk to a running server's admin API,
//! `sluice test`, which simulates a limit offline, and `sluice filter`,
//! which checks and simulates the filter's configuration.

mod client;
pub mod filter;
mod simulate;

use std::path::PathBuf;

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{json, Value};

pub use client::{Admin, CallError};
pub use filter::FilterCommand;
pub use simulate::{simulate, SimulateError, TestArgs};

/// Where the admin API is and how to authenticate.
#[derive(Args, Clone, Debug)]
pub struct Remote {
    /// The admin API's base URL.
    #[arg(
        long,
        global = true,
        env = "SLUICE_ADMIN_URL",
        default_value = "http://127.0.0.1:8082"
    )]
    pub admin: String,
    /// The admin token (also read from SLUICE_ADMIN_TOKEN).
    #[arg(
        long,
        global = true,
        env = "SLUICE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

impl Remote {
    fn admin(&self) -> Admin {
        Admin {
            base: self.admin.clone(),
            token: self.token.clone(),
        }
    }
}

/// Who did it and why, recorded in the audit log.
#[derive(Args, Clone, Debug)]
pub struct Why {
    /// Why (recorded in the audit log).
    #[arg(long)]
    pub reason: Option<String>,
    /// Who (recorded in the audit log; default `admin`).
    #[arg(long)]
    pub by: Option<String>,
}

/// The admin-calling subcommands.
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Lists, adds or removes runtime rules (layered over the file's).
    Rules {
        /// The subcommand.
        #[command(subcommand)]
        command: RulesCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Grants, revokes or lists overrides (unlimited or a raised limit for a key).
    Override {
        /// The subcommand.
        #[command(subcommand)]
        command: OverrideCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Bans a network or a key for a while.
    Ban {
        #[command(flatten)]
        target: BanTargetArgs,
        /// How long, e.g. `10m`.
        #[arg(long)]
        ttl: String,
        #[command(flatten)]
        why: Why,
        #[command(flatten)]
        remote: Remote,
    },
    /// Lifts a ban.
    Unban {
        #[command(flatten)]
        target: BanTargetArgs,
        #[command(flatten)]
        why: Why,
        #[command(flatten)]
        remote: Remote,
    },
    /// Adds a network to the allow list (limits bypassed), or removes it.
    Allow(ListArgs),
    /// Adds a network to the deny list (always refused), or removes it.
    Deny(ListArgs),
    /// Prints the server's metrics, or writes them to a file.
    Stats {
        /// Write to this file instead of standard output.
        #[arg(long)]
        export: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
}

/// `rules` subcommands.
#[derive(Subcommand, Debug)]
pub enum RulesCommand {
    /// Lists the limits in force and the runtime rules.
    List,
    /// Adds (or replaces) a top-level descriptor in a domain.
    Add {
        /// The domain.
        #[arg(long)]
        domain: String,
        /// The descriptor entry key, e.g. `user`.
        #[arg(long)]
        key: String,
        /// The entry value (absent: any value, each counted apart).
        #[arg(long)]
        value: Option<String>,
        /// Permits per window.
        #[arg(long, conflicts_with = "unlimited")]
        requests: Option<u64>,
        /// The window, e.g. `1m` or `10s`.
        #[arg(long, default_value = "1s")]
        per: String,
        /// The algorithm (default fixed_window).
        #[arg(long)]
        algorithm: Option<String>,
        /// Bucket capacity.
        #[arg(long)]
        burst: Option<u64>,
        /// Never limit.
        #[arg(long)]
        unlimited: bool,
        /// Count and report only.
        #[arg(long)]
        shadow: bool,
    },
    /// Removes a runtime rule.
    Remove {
        /// The domain.
        #[arg(long)]
        domain: String,
        /// The descriptor entry key.
        #[arg(long)]
        key: String,
        /// The entry value, if the rule has one.
        #[arg(long)]
        value: Option<String>,
    },
}

/// `override` subcommands.
#[derive(Subcommand, Debug)]
pub enum OverrideCommand {
    /// Grants an override until it expires.
    Grant {
        /// The key, an entry written `key=value` (e.g. `user=alice`).
        #[arg(long)]
        key: String,
        /// No limit at all.
        #[arg(long, conflicts_with = "limit", required_unless_present = "limit")]
        unlimited: bool,
        /// This many permits per window instead of the configured count.
        #[arg(long)]
        limit: Option<u64>,
        /// How long, e.g. `1h`.
        #[arg(long)]
        ttl: String,
        /// Why (required: recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// Who (default `admin`).
        #[arg(long)]
        by: Option<String>,
    },
    /// Revokes the override for a key.
    Revoke {
        /// The key.
        #[arg(long)]
        key: String,
        #[command(flatten)]
        why: Why,
    },
    /// Lists the overrides in force.
    List,
}

/// A network (`--cidr`) or a key (`--key`).
#[derive(Args, Clone, Debug)]
#[group(required = true, multiple = false)]
pub struct BanTargetArgs {
    /// A network, e.g. `10.0.0.0/8` or `2001:db8::1`.
    #[arg(long)]
    pub cidr: Option<String>,
    /// A key, an entry written `key=value`.
    #[arg(long)]
    pub key: Option<String>,
}

/// Arguments of `allow` and `deny`.
#[derive(Args, Clone, Debug)]
pub struct ListArgs {
    /// The network, e.g. `10.0.0.0/8` or `192.0.2.7`.
    pub cidr: String,
    /// How long it stays listed (default: until removed).
    #[arg(long, conflicts_with = "remove")]
    pub ttl: Option<String>,
    /// Remove it from the list instead.
    #[arg(long)]
    pub remove: bool,
    #[command(flatten)]
    pub why: Why,
    #[command(flatten)]
    pub remote: Remote,
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string from the pairs whose value is present.
fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// Runs an admin command; returns what to print.
pub async fn run(command: AdminCommand) -> Result<String, CallError> {
    match command {
        AdminCommand::Rules { command, remote } => rules(command, &remote.admin()).await,
        AdminCommand::Override { command, remote } => overrides(command, &remote.admin()).await,
        AdminCommand::Ban {
            target,
            ttl,
            why,
            remote,
        } => {
            let body = json!({
                "cidr": target.cidr, "key": target.key, "ttl": ttl,
                "reason": why.reason, "by": why.by,
            });
            remote
                .admin()
                .call(Method::POST, "/bans", Some(&body))
                .await
        }
        AdminCommand::Unban {
            target,
            why,
            remote,
        } => {
            let q = query(&[
                ("cidr", target.cidr.as_deref()),
                ("key", target.key.as_deref()),
                ("reason", why.reason.as_deref()),
                ("by", why.by.as_deref()),
            ]);
            remote
                .admin()
                .call(Method::DELETE, &format!("/bans{q}"), None)
                .await
        }
        AdminCommand::Allow(args) => list(args, "allow").await,
        AdminCommand::Deny(args) => list(args, "deny").await,
        AdminCommand::Stats { export, remote } => {
            let text = remote.admin().call(Method::GET, "/metrics", None).await?;
            match export {
                None => Ok(text),
                Some(path) => std::fs::write(&path, &text)
                    .map(|()| format!("wrote {} bytes to {}", text.len(), path.display()))
                    .map_err(|e| CallError::Request {
                        url: path.display().to_string(),
                        message: format!("cannot write the export file: {e}"),
                    }),
            }
        }
    }
}

async fn rules(command: RulesCommand, admin: &Admin) -> Result<String, CallError> {
    match command {
        RulesCommand::List => admin.call(Method::GET, "/rules", None).await,
        RulesCommand::Add {
            domain,
            key,
            value,
            requests,
            per,
            algorithm,
            burst,
            unlimited,
            shadow,
        } => {
            let rate_limit = if unlimited {
                json!({ "unlimited": true })
            } else {
                json!({
                    "requests_per_unit": requests, "per": per,
                    "algorithm": algorithm, "burst": burst,
                })
            };
            let mut descriptor = json!({ "key": key, "rate_limit": strip_nulls(rate_limit) });
            if let Some(v) = value {
                descriptor["value"] = Value::String(v);
            }
            if shadow {
                descriptor["shadow_mode"] = Value::Bool(true);
            }
            let body = json!({ "domain": domain, "descriptor": descriptor });
            admin.call(Method::POST, "/rules", Some(&body)).await
        }
        RulesCommand::Remove { domain, key, value } => {
            let q = query(&[
                ("domain", Some(&domain)),
                ("key", Some(&key)),
                ("value", value.as_deref()),
            ]);
            admin
                .call(Method::DELETE, &format!("/rules{q}"), None)
                .await
        }
    }
}

/// Drops `null` fields: the server refuses nulls where a field is optional.
fn strip_nulls(mut v: Value) -> Value {
    if let Value::Object(map) = &mut v {
        map.retain(|_, x| !x.is_null());
    }
    v
}

async fn overrides(command: OverrideCommand, admin: &Admin) -> Result<String, CallError> {
    match command {
        OverrideCommand::List => admin.call(Method::GET, "/overrides", None).await,
        OverrideCommand::Grant {
            key,
            unlimited,
            limit,
            ttl,
            reason,
            by,
        } => {
            let body = strip_nulls(json!({
                "key": key, "unlimited": unlimited, "limit": limit,
                "ttl": ttl, "reason": reason, "by": by,
            }));
            admin.call(Method::POST, "/overrides", Some(&body)).await
        }
        OverrideCommand::Revoke { key, why } => {
            let q = query(&[
                ("key", Some(&key)),
                ("reason", why.reason.as_deref()),
                ("by", why.by.as_deref()),
            ]);
            admin
                .call(Method::DELETE, &format!("/overrides{q}"), None)
                .await
        }
    }
}

async fn list(args: ListArgs, which: &str) -> Result<String, CallError> {
    let admin = args.remote.admin();
    let path = format!("/access/{which}");
    if args.remove {
        let q = query(&[
            ("cidr", Some(&args.cidr)),
            ("reason", args.why.reason.as_deref()),
            ("by", args.why.by.as_deref()),
        ]);
        admin
            .call(Method::DELETE, &format!("{path}{q}"), None)
            .await
    } else {
        let body = strip_nulls(json!({
            "cidr": args.cidr, "ttl": args.ttl,
            "reason": args.why.reason, "by": args.why.by,
        }));
        admin.call(Method::POST, &path, Some(&body)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            query(&[
                ("cidr", Some("10.0.0.0/8")),
                ("by", None),
                ("key", Some("user=a b"))
            ]),
            "?cidr=10.0.0.0%2F8&key=user%3Da%20b"
        );
        assert_eq!(query(&[("by", None)]), "");
    }
}
