//! The HTTP API: routes, bearer-token check, and the handlers.
//!
//! `/v1/*` and `/metrics` need the bearer token when one is configured; the health
//! endpoints never do (probes rarely carry credentials, and they reveal only the
//! state).

use std::{sync::Arc, time::Instant};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Request as HttpRequest, State, rejection::BytesRejection},
    http::{StatusCode, Uri, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use prometheus_client::registry::Registry;
use revwatch::mirror::Mirror;
use revwatch_policy::{Backend, Consistency, Decision, Policies, Request};
use serde::de::DeserializeOwned;

use super::{
    api::{
        AuthorizeRequest, BatchBody, BatchItem, BatchRequest, ConsistencyInput, DecisionBody,
        Question,
    },
    decision_log::DecisionLog,
    errors::{self, ApiError},
    metrics::{self, Metrics, Outcome},
    mirror_digest, report,
};

/// What the handlers share.
pub struct App {
    pub policies: Policies,
    pub mirror: Mirror,
    pub backend: Backend,
    pub prefix: String,
    pub registry: Registry,
    pub metrics: Metrics,
    pub log: Option<DecisionLog>,
    pub token: Option<String>,
}

type AppState = State<Arc<App>>;

/// The service's routes, with a body limit of `max_body` bytes.
pub fn router(app: Arc<App>, max_body: usize) -> Router {
    let mut guarded = Router::new()
        .route("/v1/authorize", post(authorize))
        .route("/v1/authorize/batch", post(authorize_batch))
        .route("/v1/status", get(status))
        .route("/v1/mirror/digest", get(mirror_digest))
        .route("/metrics", get(metrics_text));
    // Without a token there is nothing to check: no layer, no cost per request.
    if app.token.is_some() {
        guarded = guarded.route_layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            require_token,
        ));
    }
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .merge(guarded)
        .fallback(errors::not_found)
        .method_not_allowed_fallback(errors::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

async fn require_token(State(app): AppState, request: HttpRequest, next: Next) -> Response {
    if let Some(token) = &app.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => return ApiError::unauthorized("a bearer token is required").into_response(),
            Some(given) if !same_secret(given.as_bytes(), token.as_bytes()) => {
                return ApiError::unauthorized("the bearer token is not valid").into_response();
            }
            Some(_) => {}
        }
    }
    next.run(request).await
}

/// Compares without an early exit, so the time taken does not tell how much of a
/// guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The body as `T`; any failure is the client's (400, or 413 when too large).
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body?;
    serde_json::from_slice(&body).map_err(ApiError::malformed)
}

async fn authorize(
    State(app): AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (question, consistency) = parse::<AuthorizeRequest>(body)?.split();
    let consistency = ConsistencyInput::resolve(consistency)?;
    let request = question.into_request()?;
    match app.policies.decide_with(&request, consistency).await {
        Ok(decision) => {
            app.metrics
                .decided(outcome(&decision), 1, started.elapsed());
            if let Some(log) = &app.log {
                log.record("v1/authorize", &request, &decision);
            }
            Ok(Json(DecisionBody::from(&decision)).into_response())
        }
        Err(e) => {
            app.metrics.decided(Outcome::Error, 1, started.elapsed());
            Err(ApiError::from(&e))
        }
    }
}

fn outcome(decision: &Decision) -> Outcome {
    if decision.is_allowed() {
        Outcome::Allow
    } else {
        Outcome::Deny
    }
}

async fn authorize_batch(
    State(app): AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let batch = parse::<BatchRequest>(body)?;
    let consistency = ConsistencyInput::resolve(batch.consistency)?;
    let requests: Vec<Result<Request, ApiError>> = batch
        .requests
        .into_iter()
        .map(Question::into_request)
        .collect();
    let decided = decide_batch(&app, &requests, consistency).await;
    let took = started.elapsed();
    let (revision, results) = match decided {
        Ok(done) => done,
        Err(e) => {
            app.metrics.decided(Outcome::Error, requests.len(), took);
            return Err(e);
        }
    };
    let items = results
        .iter()
        .zip(&requests)
        .map(|(result, request)| match result {
            Ok(decision) => {
                app.metrics.decided(outcome(decision), 1, took);
                // Only a valid request has a decision.
                if let (Some(log), Ok(request)) = (&app.log, request) {
                    log.record("v1/authorize/batch", request, decision);
                }
                BatchItem::Decision(DecisionBody::from(decision))
            }
            Err(e) => {
                app.metrics.decided(Outcome::Error, 1, took);
                BatchItem::Error(e.body())
            }
        })
        .collect();
    Ok(Json(BatchBody {
        revision,
        results: items,
    })
    .into_response())
}

/// Decides every request on one active set: its revision, and each request's
/// decision or (for that request alone) error.
async fn decide_batch(
    app: &App,
    requests: &[Result<Request, ApiError>],
    consistency: Consistency,
) -> Result<(i64, Vec<Result<Decision, ApiError>>), ApiError> {
    let valid = requests.iter().filter_map(|r| r.as_ref().ok());
    let (revision, decided) = app
        .policies
        .decide_batch(valid, consistency)
        .await
        .map_err(|e| ApiError::from(&e))?;
    // One decision per valid request, in order: put them back between the
    // requests that did not parse.
    let mut decided = decided.into_iter();
    let results = requests
        .iter()
        .map(|request| match request {
            Err(e) => Err(e.clone()),
            Ok(_) => match decided.next() {
                Some(result) => result.map_err(|e| ApiError::from(&e)),
                None => Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "fewer decisions than requests",
                )),
            },
        })
        .collect();
    Ok((revision, results))
}

async fn status(State(app): AppState) -> Response {
    let body = report::status(
        app.backend,
        &app.prefix,
        &app.policies.status(),
        &app.mirror.status(),
    );
    Json(body).into_response()
}

/// The mirror's state for `revwatch verify --url`; 503 before it has any.
async fn mirror_digest(State(app): AppState, uri: Uri) -> Result<Response, ApiError> {
    let with_keys = mirror_digest::wants_keys(uri.query())?;
    let snapshot = app.mirror.snapshot();
    let state = app.mirror.status().state;
    // etcd revisions start at 1: 0 is the empty state before a first list (or a
    // snapshot file) gave the mirror one.
    if snapshot.revision() == 0 {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("the mirror has no state of the prefix yet (it is {state})"),
        ));
    }
    // Hashing every key of a large prefix is CPU work: off the request threads.
    let prefix = app.prefix.clone();
    let body = tokio::task::spawn_blocking(move || {
        mirror_digest::describe(&snapshot, &prefix, state.to_string(), with_keys)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("computing the digest: {e}"),
        )
    })?;
    Ok(Json(body).into_response())
}

async fn live() -> Response {
    Json(serde_json::json!({ "live": true })).into_response()
}

async fn ready(State(app): AppState) -> Response {
    let (ready, body) = report::readiness(&app.policies.status());
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics_text(State(app): AppState) -> Response {
    app.metrics.set_state(&app.policies.status().state);
    match metrics::encode(&app.registry) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics_encoding",
            e.to_string(),
        )
        .into_response(),
    }
}
