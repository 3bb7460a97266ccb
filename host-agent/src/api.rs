//! The agent's HTTP API: JSON reads, token-guarded JSON writes, `/metrics`.
//!
//! Reads are served from the view the loop published at its last tick. Writes are
//! requests to the loop, which answers once the NIC committed (or refused) the change,
//! so a 200 means the NIC steers by it. Errors are `{"error": "..."}` with a status
//! code saying whose fault it is.

use std::sync::mpsc::Sender;
use std::sync::{Arc, RwLock};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nic_firmware::config::NodeState;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::json;

use crate::agent::{Answer, Refusal, Reply, Request, View};
use crate::agent_config::Secret;

/// Most flows `/flows?top=N` lists.
pub const MAX_TOP: usize = 10_000;

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct Api {
    pub view: Arc<RwLock<View>>,
    pub requests: Sender<(Request, Option<Answer>)>,
    pub token: Option<Secret>,
    pub registry: Arc<Registry>,
}

/// An API error: status and message, sent as JSON.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"flowshard\""),
            );
        }
        r
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        match r {
            Refusal::NotFound(m) => ApiError(StatusCode::NOT_FOUND, m),
            Refusal::Invalid(m) => ApiError(StatusCode::UNPROCESSABLE_ENTITY, m),
            Refusal::Conflict(m) => ApiError(StatusCode::CONFLICT, m),
            Refusal::Device(m) => ApiError(StatusCode::BAD_GATEWAY, m),
        }
    }
}

fn bad_request(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, e.to_string())
}

/// The API's routes.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/nodes", get(nodes))
        .route("/shards", get(shards))
        .route("/flows", get(flows))
        .route("/forecast", get(forecast))
        .route("/migrations", get(migrations).post(migrate))
        .route("/decisions", get(decisions))
        .route("/metrics", get(metrics))
        .route("/nodes/{id}/drain", post(drain))
        .route("/nodes/{id}/up", post(up))
        .route("/nodes/{id}/down", post(down))
        .route("/nodes/{id}/weight", post(weight))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such endpoint; see GET /status, /nodes, /shards, /flows, /forecast, /migrations, /decisions, /metrics".into(),
            )
        })
        .with_state(api)
}

impl Api {
    fn view(&self) -> View {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Mutating calls need the configured bearer token.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.token else {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "changes through the API are disabled: set `token` in the agent's configuration file (flowshard agent --config FILE) and send it as `Authorization: Bearer TOKEN`".into(),
            ));
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if token.matches(g.trim()) => Ok(()),
            Some(_) => Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "wrong bearer token".into(),
            )),
            None => Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "this call needs `Authorization: Bearer TOKEN` with the agent's token".into(),
            )),
        }
    }

    /// Hand a request to the loop and wait for its answer.
    async fn ask(&self, req: Request) -> Result<Reply, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gone = || {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the control loop has stopped".into(),
            )
        };
        self.requests.send((req, Some(tx))).map_err(|_| gone())?;
        Ok(rx.await.map_err(|_| gone())??)
    }
}

async fn status(State(api): State<Api>) -> Json<serde_json::Value> {
    let v = api.view();
    let nodes_by_state = |s: NodeState| v.nodes.iter().filter(|n| n.state == s).count();
    Json(json!({
        "device": v.device,
        "image_version": v.image_version,
        "nic_time_ns": v.nic_time_ns,
        "nic_active_flows": v.flows_active_on_nic,
        "tracked_flows": v.tracked_flows,
        "untracked_flows": v.untracked_flows,
        "nodes": v.nodes.len(),
        "nodes_active": nodes_by_state(NodeState::Active),
        "nodes_draining": nodes_by_state(NodeState::Draining),
        "nodes_down": nodes_by_state(NodeState::Down),
        "shards": v.shards.len(),
        "migrations_total": v.migrations_total,
        "flows_handed_off_total": v.flows_handed_off_total,
        "state_bytes_handed_off_total": v.state_bytes_handed_off_total,
        "policy": v.policy,
        "observe_only": v.observe_only,
        "decisions_total": v.decisions_total,
        "forecast_refits_total": v.forecast.refits_total,
        "rings": v.rings,
        "loop": v.loop_,
    }))
}

async fn nodes(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!(api.view().nodes))
}

async fn shards(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!(api.view().shards))
}

/// Steps `/forecast` shows per series unless `?steps=N` asks for more (up to the
/// horizon): 228 series of the default image at the full horizon are megabytes.
pub const DEFAULT_FORECAST_STEPS: usize = 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForecastQuery {
    steps: Option<usize>,
    scope: Option<String>,
}

/// Per series (class, node, shard × packets/s, bytes/s, new flows/s): the chosen
/// model and the point forecast and interval for the next steps, read from the last
/// refit at the current tick's offset.
async fn forecast(
    State(api): State<Api>,
    q: Result<Query<ForecastQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(bad_request)?;
    let v = api.view();
    let f = &v.forecast;
    let steps = q.steps.unwrap_or(DEFAULT_FORECAST_STEPS);
    if steps == 0 || steps > f.horizon {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("steps={steps}: must be 1..={} (the horizon)", f.horizon),
        ));
    }
    if let Some(s) = q
        .scope
        .as_deref()
        .filter(|s| !["class", "node", "shard"].contains(s))
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("scope={s}: must be class, node or shard"),
        ));
    }
    let series: Vec<_> = f
        .series
        .iter()
        .filter(|s| q.scope.as_deref().is_none_or(|w| w == s.scope))
        .map(|s| {
            let mut out = json!(s);
            if let Some(fc) = &s.forecast {
                let off = (f.tick.saturating_sub(s.made_at_tick) as usize).min(fc.point.len());
                let end = (off + steps).min(fc.point.len());
                out["point"] = json!(fc.point[off..end]);
                out["lower"] = json!(fc.lower[off..end]);
                out["upper"] = json!(fc.upper[off..end]);
            }
            out
        })
        .collect();
    let nodes: Vec<_> = v
        .nodes
        .iter()
        .map(|n| json!({"node": n.id, "load_gbps": n.load_gbps, "forecast_gbps": n.forecast_gbps, "capacity_gbps": n.capacity_gbps, "power": n.power}))
        .collect();
    Ok(Json(json!({
        "policy": v.policy,
        "nic_time_ns": v.nic_time_ns,
        "tick": f.tick,
        "level": f.level,
        "horizon": f.horizon,
        "refit_ticks": f.refit_ticks,
        "refits_total": f.refits_total,
        "steps": steps,
        "nodes": nodes,
        "series": series,
    })))
}

async fn decisions(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!(api.view().decisions))
}

async fn migrations(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!(api.view().migrations))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Top {
    top: Option<usize>,
}

async fn flows(
    State(api): State<Api>,
    q: Result<Query<Top>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(bad_request)?;
    let n = q.top.unwrap_or(20);
    if n == 0 || n > MAX_TOP {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("top={n}: must be 1..={MAX_TOP}"),
        ));
    }
    match api.ask(Request::TopFlows(n)).await? {
        Reply::Flows(f) => Ok(Json(json!(f))),
        Reply::Done(_) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unexpected answer".into(),
        )),
    }
}

async fn metrics(State(api): State<Api>) -> Result<Response, ApiError> {
    let text = crate::metrics::render(&api.registry)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

fn done(reply: Reply) -> Json<serde_json::Value> {
    match reply {
        Reply::Done(m) => Json(json!({ "migrations": m })),
        Reply::Flows(f) => Json(json!(f)),
    }
}

async fn set_state(
    api: Api,
    headers: HeaderMap,
    id: Result<Path<u16>, PathRejection>,
    state: NodeState,
) -> Result<Json<serde_json::Value>, ApiError> {
    api.authorize(&headers)?;
    let Path(id) = id.map_err(bad_request)?;
    Ok(done(api.ask(Request::SetState(id, state)).await?))
}

async fn drain(
    State(api): State<Api>,
    headers: HeaderMap,
    id: Result<Path<u16>, PathRejection>,
    _body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    set_state(api, headers, id, NodeState::Draining).await
}

async fn up(
    State(api): State<Api>,
    headers: HeaderMap,
    id: Result<Path<u16>, PathRejection>,
    _body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    set_state(api, headers, id, NodeState::Active).await
}

async fn down(
    State(api): State<Api>,
    headers: HeaderMap,
    id: Result<Path<u16>, PathRejection>,
    _body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    set_state(api, headers, id, NodeState::Down).await
}

/// A request body the call does not use, read anyway: a body left unread makes the
/// server close the connection, and a client reusing it then fails.
type Body = axum::body::Bytes;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Weight {
    weight: u32,
}

async fn weight(
    State(api): State<Api>,
    headers: HeaderMap,
    id: Result<Path<u16>, PathRejection>,
    body: Result<Json<Weight>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    api.authorize(&headers)?;
    let Path(id) = id.map_err(bad_request)?;
    let Json(w) = body.map_err(bad_request)?;
    Ok(done(api.ask(Request::SetWeight(id, w.weight)).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Move {
    shard: u16,
    node: u16,
}

async fn migrate(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Result<Json<Move>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    api.authorize(&headers)?;
    let Json(m) = body.map_err(bad_request)?;
    Ok(done(
        api.ask(Request::Migrate {
            shard: m.shard,
            node: m.node,
        })
        .await?,
    ))
}
