//! The admin HTTP API (JSON) and `/metrics`, on `listen.admin`.
//!
//! Every route but `/metrics` requires `Authorization: Bearer <token>`
//! (the scheme name in any case; `admin.token`, or `SLUICE_ADMIN_TOKEN`
//! which wins); without a token the listener does not start at all. `/metrics` needs no token so that
//! Prometheus scrapes without secrets; it holds no keys or addresses.

pub mod replay;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::net::TcpListener;

use crate::auth;
use crate::config::{AdminConfig, ServerConfig};
use crate::shared::Shared;
use crate::source::ConfigSource;
use crate::storage::system_now;

/// How often expired list entries, bans and overrides are dropped.
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The environment variable holding the admin token (it wins over the file).
pub const TOKEN_ENV: &str = "SLUICE_ADMIN_TOKEN";

/// The token in force: `SLUICE_ADMIN_TOKEN`, else `admin.token`; empty counts as none.
pub fn token(config: &AdminConfig) -> Option<String> {
    std::env::var(TOKEN_ENV)
        .ok()
        .or_else(|| config.token.clone())
        .filter(|t| !t.is_empty())
}

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AdminState {
    shared: Arc<Shared>,
    source: Arc<ConfigSource>,
    token: Arc<str>,
}

impl AdminState {
    /// State over the server's shared state and configuration source.
    pub fn new(shared: Arc<Shared>, source: Arc<ConfigSource>, token: &str) -> AdminState {
        AdminState {
            shared,
            source,
            token: token.into(),
        }
    }
}

/// Serves the admin API on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: AdminState) -> std::io::Result<()> {
    axum::serve(listener, routes::router(state)).await
}

/// Binds `listen.admin` and serves the admin API in the background, if a
/// token is configured; returns the bound address, or `None` (with a
/// warning saying how to enable it) when there is no token.
pub async fn start(
    config: &ServerConfig,
    shared: Arc<Shared>,
    source: Arc<ConfigSource>,
) -> std::io::Result<Option<SocketAddr>> {
    let Some(token) = token(&config.admin) else {
        tracing::warn!(
            "admin API and /metrics not started: no admin token; set admin.token in the \
             configuration or the SLUICE_ADMIN_TOKEN environment variable"
        );
        return Ok(None);
    };
    let listener = TcpListener::bind(&config.listen.admin).await?;
    let addr = listener.local_addr()?;
    let state = AdminState::new(shared.clone(), source, &token);
    // Runs as long as the server: expired entries are dropped every
    // PURGE_EVERY (lookups ignore them meanwhile).
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PURGE_EVERY);
        loop {
            tick.tick().await;
            shared.controls.purge(system_now());
        }
    });
    tokio::spawn(async move {
        if let Err(e) = serve(listener, state).await {
            tracing::error!(%e, "admin API stopped");
        }
    });
    Ok(Some(addr))
}

/// An error answer: a status and a message saying what to do.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message });
        (self.status, Json(body)).into_response()
    }
}

/// Refuses requests without the right bearer token.
async fn require_token(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer);
    match presented {
        Some(t) if auth::matches(t, &state.token) => Ok(next.run(request).await),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "wrong admin token")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer <token>` (the admin.token or SLUICE_ADMIN_TOKEN)",
        )),
    }
}
