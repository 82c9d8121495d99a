//! The JSON of `GET /v1/status` and `GET /health/ready`.

use std::time::SystemTime;

use revwatch::mirror::Status as MirrorStatus;
use revwatch_policy::{Backend, DegradedReason, PolicyState, PolicyStatus, Rejection};
use serde_json::{Value, json};

use super::metrics::state_name;

pub fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Cedar => "cedar",
        Backend::Casbin => "casbin",
    }
}

fn time(at: Option<SystemTime>) -> Value {
    at.map_or(Value::Null, |t| {
        Value::from(humantime::format_rfc3339_millis(t).to_string())
    })
}

fn rejection(r: &Rejection) -> Value {
    json!({
        "key": r.key,
        "revision": r.revision,
        "key_revision": r.key_revision,
        "message": r.message,
    })
}

fn reasons(state: &PolicyState) -> Vec<String> {
    match state {
        PolicyState::Degraded(reasons) => reasons.iter().map(ToString::to_string).collect(),
        PolicyState::NotReady | PolicyState::Ready => Vec::new(),
    }
}

/// Mirror and policy state, for operators.
pub fn status(
    backend: Backend,
    prefix: &str,
    policy: &PolicyStatus,
    mirror: &MirrorStatus,
) -> Value {
    let counts = |m: Vec<(&'static str, u64)>| -> Value {
        m.into_iter()
            .map(|(k, v)| (k.to_owned(), json!(v)))
            .collect()
    };
    json!({
        "backend": backend_name(backend),
        "prefix": prefix,
        "policy": {
            "state": state_name(&policy.state),
            "degraded_reasons": reasons(&policy.state),
            "active_revision": policy.active_revision,
            "compiled_revision": policy.compiled_revision,
            "generation": policy.generation,
            "policy_count": policy.policy_count,
            "evaluated_revision": policy.evaluated_revision,
            "newest_rejected": policy.newest_rejected().is_some(),
            "last_rejection": policy.last_rejection.as_ref().map(rejection),
            "activations": policy.activations,
            "rejections": policy.rejections,
            "activated_at": time(policy.activated_at),
            "stray_keys": policy.stray_keys,
        },
        "mirror": {
            "state": mirror.state.to_string(),
            "revision": mirror.revision,
            "server_revision": mirror.server_revision,
            "lag": mirror.lag(),
            "endpoint": mirror.endpoint,
            "keys": mirror.keys,
            "last_event_at": time(mirror.last_event_at),
            "last_error": mirror.last_error.as_ref().map(|e| json!({
                "kind": e.kind.to_string(),
                "message": e.message,
                "at": time(Some(e.at)),
            })),
            "reconnects": counts(mirror.reconnects.iter().map(|(c, n)| (c.as_str(), *n)).collect()),
            "relists": counts(mirror.relists.iter().map(|(c, n)| (c.as_str(), *n)).collect()),
        },
    })
}

/// Whether the service is ready (a set is active and decisions do not fail closed),
/// and the body saying so, degraded or not.
pub fn readiness(policy: &PolicyStatus) -> (bool, Value) {
    let fail_closed = match &policy.state {
        PolicyState::Degraded(reasons) => reasons
            .iter()
            .any(|r| matches!(r, DegradedReason::FailClosed { .. })),
        PolicyState::NotReady | PolicyState::Ready => false,
    };
    let ready = policy.state != PolicyState::NotReady && !fail_closed;
    let body = json!({
        "ready": ready,
        "state": state_name(&policy.state),
        "degraded": matches!(policy.state, PolicyState::Degraded(_)),
        "revision": policy.active_revision,
        "reasons": reasons(&policy.state),
    });
    (ready, body)
}
