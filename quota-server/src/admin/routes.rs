//! The admin routes. Times in answers are nanoseconds since the Unix epoch;
//! durations in requests are written as in the config (`30s`, `10m`).

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{middleware, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice_core::access::wire::check_key;
use sluice_core::access::{
    AuditAction, AuditEvent, Ban, BanTarget, Cidr, Full, Grant, ListEntry, ListKind, Override,
};
use sluice_core::time::{Nanos, Span};

use super::{require_token, AdminState, ApiError};
use crate::limits::{Limit, Limits, Resolved};
use crate::metrics;
use crate::source::{RuleError, RuntimeRule};
use crate::storage::{system_now, StorageError};

/// Every route; all but `/metrics` behind the token.
pub(super) fn router(state: AdminState) -> Router {
    let admin = Router::new()
        .route("/rules", get(rules).post(add_rule).delete(remove_rule))
        .route("/access", get(access))
        .route("/access/allow", axum::routing::post(allow).delete(unallow))
        .route("/access/deny", axum::routing::post(deny).delete(undeny))
        .route("/bans", get(bans).post(ban).delete(unban))
        .route("/overrides", get(overrides).post(grant).delete(revoke))
        .route("/audit", get(audit))
        .route("/counters", get(counter).delete(reset))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .merge(admin)
        .with_state(state)
}

type Answer = Result<Json<Value>, ApiError>;

fn full(e: Full) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, e.to_string())
}

/// One audited change: `apply` makes it, returning its audit event and
/// what `undo` needs to take it back; the event is then recorded, and if
/// the audit log cannot be written the change is undone: nothing stays
/// granted unrecorded.
fn audited<T>(
    state: &AdminState,
    apply: impl FnOnce() -> Result<(AuditEvent, T), ApiError>,
    undo: impl FnOnce(T),
) -> Result<(), ApiError> {
    let (event, applied) = apply()?;
    state.shared.controls.audit.record(&event).map_err(|e| {
        undo(applied);
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write the audit log ({e}); the change was undone"),
        )
    })
}

/// The audit event of `action` on `subject` `target` at `now`, signed
/// with the caller's reason and name (`admin` when not given).
fn event(
    action: AuditAction,
    subject: &str,
    target: String,
    now: Nanos,
    reason: Option<String>,
    by: Option<String>,
) -> AuditEvent {
    AuditEvent {
        at: now,
        action,
        subject: subject.into(),
        target,
        detail: String::new(),
        until: None,
        reason: reason.unwrap_or_default(),
        by: by.unwrap_or_else(|| "admin".into()),
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.shared.metrics.render(),
    )
}

// ---- rules ----

/// One limit in force, as listed.
#[derive(Serialize)]
struct LimitView {
    name: String,
    algorithm: &'static str,
    count: u64,
    per: Span,
    burst: u64,
    shadow: bool,
}

async fn rules(State(state): State<AdminState>) -> Answer {
    let limits = state.shared.limits();
    let view: Vec<LimitView> = (0..limits.len())
        .filter_map(|id| limits.limit(id))
        .map(|l| LimitView {
            name: l.name.to_string(),
            algorithm: l.algorithm().name(),
            count: l.quota().count(),
            per: l.quota().per(),
            burst: l.quota().burst(),
            shadow: l.shadow,
        })
        .collect();
    Ok(Json(json!({
        "domains": limits.domain_names(),
        "limits": view,
        "runtime": state.source.rules(),
    })))
}

fn rule_error(e: RuleError) -> ApiError {
    match e {
        RuleError::Full => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        RuleError::Invalid(e) => ApiError::bad_request(e.to_string()),
    }
}

async fn add_rule(State(state): State<AdminState>, Json(rule): Json<RuntimeRule>) -> Answer {
    let now = system_now();
    let d = &rule.descriptor;
    let target = node_name(&rule.domain, &d.key, d.value.as_deref());
    audited(
        &state,
        || {
            let replaced = state
                .source
                .add_rule(&state.shared, rule.clone())
                .map_err(rule_error)?;
            let e = AuditEvent {
                detail: serde_json::to_string(d).unwrap_or_default(),
                ..event(AuditAction::Grant, "rule", target, now, None, None)
            };
            Ok((e, replaced))
        },
        |replaced| {
            let _ = match replaced {
                Some(old) => state.source.add_rule(&state.shared, old).map(|_| ()),
                None => state
                    .source
                    .remove_rule(&state.shared, &rule.domain, &d.key, d.value.as_deref())
                    .map(|_| ()),
            };
        },
    )?;
    Ok(Json(json!({ "added": rule })))
}

fn node_name(domain: &str, key: &str, value: Option<&str>) -> String {
    match value {
        Some(v) => format!("{domain}/{key}={v}"),
        None => format!("{domain}/{key}"),
    }
}

#[derive(Deserialize)]
struct RuleQuery {
    domain: String,
    key: String,
    value: Option<String>,
}

async fn remove_rule(State(state): State<AdminState>, Query(q): Query<RuleQuery>) -> Answer {
    let now = system_now();
    let target = node_name(&q.domain, &q.key, q.value.as_deref());
    audited(
        &state,
        || {
            let removed = state
                .source
                .remove_rule(&state.shared, &q.domain, &q.key, q.value.as_deref())
                .map_err(rule_error)?
                .ok_or_else(|| {
                    ApiError::not_found(format!(
                        "no runtime rule {target} (rules from the file are changed in the file)"
                    ))
                })?;
            let e = event(AuditAction::Revoke, "rule", target.clone(), now, None, None);
            Ok((e, removed))
        },
        |removed| {
            let _ = state.source.add_rule(&state.shared, removed);
        },
    )?;
    Ok(Json(json!({ "removed": target })))
}

// ---- allow and deny lists ----

/// A network to list.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListBody {
    cidr: Cidr,
    ttl: Option<Span>,
    reason: Option<String>,
    by: Option<String>,
}

#[derive(Deserialize)]
struct CidrQuery {
    cidr: Cidr,
    by: Option<String>,
    reason: Option<String>,
}

async fn access(State(state): State<AdminState>) -> Answer {
    let now = system_now();
    let lists = state.shared.controls.access();
    Ok(Json(json!({
        "allow": lists.entries(ListKind::Allow, now),
        "deny": lists.entries(ListKind::Deny, now),
        "bans": lists.bans(now),
    })))
}

fn subject(kind: ListKind) -> &'static str {
    match kind {
        ListKind::Allow => "allow",
        ListKind::Deny => "deny",
    }
}

fn list_add(state: &AdminState, kind: ListKind, body: ListBody) -> Answer {
    let now = system_now();
    let until = body.ttl.map(|t| now.plus(t));
    let entry = ListEntry {
        cidr: body.cidr,
        until,
        reason: body.reason.clone().unwrap_or_default(),
    };
    let controls = &state.shared.controls;
    audited(
        state,
        || {
            let replaced = controls
                .access_mut()
                .add(kind, entry.clone(), now)
                .map_err(full)?;
            let target = body.cidr.to_string();
            let e = AuditEvent {
                until,
                ..event(
                    AuditAction::Grant,
                    subject(kind),
                    target,
                    now,
                    body.reason,
                    body.by,
                )
            };
            Ok((e, replaced))
        },
        |replaced| {
            let mut lists = controls.access_mut();
            lists.remove(kind, &body.cidr);
            if let Some(old) = replaced {
                let _ = lists.add(kind, old, now);
            }
        },
    )?;
    Ok(Json(json!({ "added": entry })))
}

fn list_remove(state: &AdminState, kind: ListKind, q: CidrQuery) -> Answer {
    let now = system_now();
    let controls = &state.shared.controls;
    audited(
        state,
        || {
            let old = controls.access_mut().remove(kind, &q.cidr).ok_or_else(|| {
                ApiError::not_found(format!("{} is not on the {} list", q.cidr, subject(kind)))
            })?;
            let target = q.cidr.to_string();
            let e = event(
                AuditAction::Revoke,
                subject(kind),
                target,
                now,
                q.reason,
                q.by,
            );
            Ok((e, old))
        },
        |old| {
            let _ = controls.access_mut().add(kind, old, now);
        },
    )?;
    Ok(Json(json!({ "removed": q.cidr })))
}

async fn allow(State(state): State<AdminState>, Json(body): Json<ListBody>) -> Answer {
    list_add(&state, ListKind::Allow, body)
}

async fn unallow(State(state): State<AdminState>, Query(q): Query<CidrQuery>) -> Answer {
    list_remove(&state, ListKind::Allow, q)
}

async fn deny(State(state): State<AdminState>, Json(body): Json<ListBody>) -> Answer {
    list_add(&state, ListKind::Deny, body)
}

async fn undeny(State(state): State<AdminState>, Query(q): Query<CidrQuery>) -> Answer {
    list_remove(&state, ListKind::Deny, q)
}

// ---- bans ----

/// A ban: of a network or of a key (`entry_key=value`), for a while.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BanBody {
    cidr: Option<Cidr>,
    key: Option<String>,
    ttl: Span,
    reason: Option<String>,
    by: Option<String>,
}

#[derive(Deserialize)]
struct BanQuery {
    cidr: Option<Cidr>,
    key: Option<String>,
    reason: Option<String>,
    by: Option<String>,
}

fn ban_target(cidr: Option<Cidr>, key: Option<String>) -> Result<BanTarget, ApiError> {
    match (cidr, key) {
        (Some(c), None) => Ok(BanTarget::Cidr(c)),
        (None, Some(k)) if !k.is_empty() => {
            check_key(&k).map_err(|e| ApiError::bad_request(e.to_string()))?;
            Ok(BanTarget::Key(k))
        }
        _ => Err(ApiError::bad_request(
            "give exactly one of `cidr` (e.g. 10.0.0.0/8) or `key` (e.g. user=mallory)",
        )),
    }
}

fn target_text(t: &BanTarget) -> String {
    match t {
        BanTarget::Cidr(c) => c.to_string(),
        BanTarget::Key(k) => k.clone(),
    }
}

async fn bans(State(state): State<AdminState>) -> Answer {
    Ok(Json(
        json!({ "bans": state.shared.controls.access().bans(system_now()) }),
    ))
}

async fn ban(State(state): State<AdminState>, Json(body): Json<BanBody>) -> Answer {
    let now = system_now();
    let target = ban_target(body.cidr, body.key)?;
    let b = Ban {
        target: target.clone(),
        until: now.plus(body.ttl),
        reason: body.reason.clone().unwrap_or_default(),
    };
    let controls = &state.shared.controls;
    audited(
        &state,
        || {
            let replaced = controls.access_mut().ban(b.clone(), now).map_err(full)?;
            let text = target_text(&target);
            let e = AuditEvent {
                until: Some(b.until),
                ..event(AuditAction::Grant, "ban", text, now, body.reason, body.by)
            };
            Ok((e, replaced))
        },
        |replaced| {
            let mut lists = controls.access_mut();
            lists.unban(&target);
            if let Some(old) = replaced {
                let _ = lists.ban(old, now);
            }
        },
    )?;
    Ok(Json(json!({ "banned": b })))
}

async fn unban(State(state): State<AdminState>, Query(q): Query<BanQuery>) -> Answer {
    let now = system_now();
    let target = ban_target(q.cidr, q.key)?;
    let controls = &state.shared.controls;
    let text = target_text(&target);
    audited(
        &state,
        || {
            let old = controls
                .access_mut()
                .unban(&target)
                .ok_or_else(|| ApiError::not_found(format!("{text} is not banned")))?;
            let e = event(
                AuditAction::Revoke,
                "ban",
                text.clone(),
                now,
                q.reason,
                q.by,
            );
            Ok((e, old))
        },
        |old| {
            let _ = controls.access_mut().ban(old, now);
        },
    )?;
    Ok(Json(json!({ "unbanned": target })))
}

// ---- overrides ----

/// An override: `unlimited: true` or a `limit`, for `ttl`, with a reason.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    key: String,
    #[serde(default)]
    unlimited: bool,
    limit: Option<u64>,
    ttl: Span,
    reason: String,
    by: Option<String>,
}

#[derive(Deserialize)]
struct RevokeQuery {
    key: String,
    reason: Option<String>,
    by: Option<String>,
}

async fn overrides(State(state): State<AdminState>) -> Answer {
    Ok(Json(
        json!({ "overrides": state.shared.controls.overrides().list(system_now()) }),
    ))
}

async fn grant(State(state): State<AdminState>, Json(body): Json<GrantBody>) -> Answer {
    let now = system_now();
    let grant = match (body.unlimited, body.limit) {
        (true, None) => Grant::Unlimited,
        (false, Some(n)) if n > 0 => Grant::Limit(n),
        _ => {
            return Err(ApiError::bad_request(
                "give either `unlimited: true` or a `limit` of at least 1",
            ))
        }
    };
    if body.key.is_empty() || body.reason.trim().is_empty() {
        return Err(ApiError::bad_request(
            "`key` (e.g. user=alice) and a `reason` are required",
        ));
    }
    check_key(&body.key).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let o = Override {
        key: body.key.clone(),
        grant,
        until: now.plus(body.ttl),
        reason: body.reason,
        by: body.by.unwrap_or_else(|| "admin".into()),
        granted_at: now,
    };
    let controls = &state.shared.controls;
    audited(
        &state,
        || controls.overrides_mut().grant(o.clone(), now).map_err(full),
        |replaced| {
            let mut overrides = controls.overrides_mut();
            overrides.revoke(&body.key, "", "", now);
            if let Some(old) = replaced {
                let _ = overrides.grant(old, now);
            }
        },
    )?;
    Ok(Json(json!({ "granted": o })))
}

async fn revoke(State(state): State<AdminState>, Query(q): Query<RevokeQuery>) -> Answer {
    let now = system_now();
    let controls = &state.shared.controls;
    let by = q.by.unwrap_or_else(|| "admin".into());
    let reason = q.reason.unwrap_or_default();
    audited(
        &state,
        || {
            let previous = controls.overrides().get(&q.key, now).cloned();
            let e = controls
                .overrides_mut()
                .revoke(&q.key, &by, &reason, now)
                .ok_or_else(|| ApiError::not_found(format!("no override for {:?}", q.key)))?;
            Ok((e, previous))
        },
        |previous| {
            if let Some(old) = previous {
                let _ = controls.overrides_mut().grant(old, now);
            }
        },
    )?;
    Ok(Json(json!({ "revoked": q.key })))
}

async fn audit(State(state): State<AdminState>) -> Answer {
    Ok(Json(
        json!({ "events": state.shared.controls.audit.recent() }),
    ))
}

// ---- counters ----

/// The domain and descriptor entries a counter query names: `domain=D`
/// and the entries as further parameters, in order.
fn counter_target(query: &[(String, String)]) -> Result<(String, Vec<(String, String)>), ApiError> {
    let mut domain = None;
    let mut entries = Vec::new();
    for (k, v) in query {
        if k == "domain" && domain.is_none() {
            domain = Some(v.clone());
        } else {
            entries.push((k.clone(), v.clone()));
        }
    }
    let domain = domain.ok_or_else(|| {
        ApiError::bad_request(
            "give `domain=` and the descriptor's entries, e.g. ?domain=api&user=alice",
        )
    })?;
    if entries.is_empty() {
        return Err(ApiError::bad_request(
            "give the descriptor's entries after the domain, e.g. ?domain=api&user=alice",
        ));
    }
    Ok((domain, entries))
}

fn storage_error(e: StorageError) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, format!("storage: {e}"))
}

async fn counter(
    State(state): State<AdminState>,
    Query(query): Query<Vec<(String, String)>>,
) -> Answer {
    let (domain_name, entries) = counter_target(&query)?;
    let limits = state.shared.limits();
    let limit = resolve(&limits, &domain_name, &entries)?;
    let key = limit.storage_key(&entries);
    let outcome = state
        .shared
        .store
        .peek(limit, key.clone())
        .await
        .map_err(storage_error)?;
    Ok(Json(json!({
        "limit": &*limit.name,
        "key": key,
        "count": limit.quota().count(),
        "remaining": outcome.remaining,
        "reset_after_ms": outcome.reset_after.as_millis_ceil(),
    })))
}

async fn reset(
    State(state): State<AdminState>,
    Query(query): Query<Vec<(String, String)>>,
) -> Answer {
    let (domain_name, entries) = counter_target(&query)?;
    let limits = state.shared.limits();
    let limit = resolve(&limits, &domain_name, &entries)?;
    let key = limit.storage_key(&entries);
    state
        .shared
        .store
        .reset(limit, key.clone())
        .await
        .map_err(storage_error)?;
    Ok(Json(json!({ "limit": &*limit.name, "reset": key })))
}

fn resolve<'a>(
    limits: &'a Limits,
    domain: &str,
    entries: &[(String, String)],
) -> Result<&'a Limit, ApiError> {
    let d = limits
        .domain(domain)
        .ok_or_else(|| ApiError::not_found(format!("no domain {domain:?}")))?;
    match limits.resolve(d, entries) {
        Resolved::Limited(limit) => Ok(limit),
        Resolved::Unlimited => Err(ApiError::not_found(
            "this descriptor is unlimited: no counter",
        )),
        Resolved::NoLimit => Err(ApiError::not_found("no limit matches this descriptor")),
    }
}
