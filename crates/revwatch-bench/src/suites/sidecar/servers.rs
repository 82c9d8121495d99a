//! The two servers `revwatch serve` is compared with, each run in a child process of
//! this binary on the HTTP stack `serve` uses (axum 0.8 over HTTP/1, its default
//! settings, the same body limit):
//!
//! * **trivial**: reads the request body and answers a constant JSON decision, the
//!   cost of the HTTP stack alone;
//! * **plain Cedar**: cedar-agent-style, parses the JSON request and evaluates it with
//!   a plain `cedar_policy::Authorizer` on the whole policy set and entities.

use std::{net::SocketAddr, path::Path, str::FromStr, sync::Arc};

use anyhow::Context as _;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use cedar_policy::{Authorizer, Context, Decision, Entities, EntityUid, PolicySet};
use serde::{Deserialize, Serialize};

use super::generator::PATH;

/// Hidden subcommand of the children: `__sidecar-server trivial ADDR` or
/// `__sidecar-server plain-cedar ADDR POLICIES_FILE ENTITIES_FILE`.
pub const CHILD_ARG: &str = "__sidecar-server";
pub const TRIVIAL: &str = "trivial";
pub const PLAIN_CEDAR: &str = "plain-cedar";

/// The body limit of `revwatch serve`'s default (`--max-body-bytes`).
const MAX_BODY: usize = 1 << 20;

/// The trivial server's answer: the shape and about the size of `serve`'s.
const CONSTANT_ANSWER: &str = r#"{"decision":"allow","policy_ids":["editors-read-write"],"revision":1,"decision_id":"0000000000000000-1"}"#;

/// The child's body: serve until killed.
pub async fn child_main(args: &[String]) -> anyhow::Result<()> {
    let usage = || {
        anyhow::anyhow!(
            "usage: {CHILD_ARG} {TRIVIAL} ADDR | {CHILD_ARG} {PLAIN_CEDAR} ADDR POLICIES ENTITIES"
        )
    };
    let (kind, addr) = match args {
        [kind, addr, ..] => (kind.as_str(), addr.parse::<SocketAddr>()?),
        _ => return Err(usage()),
    };
    let router = match (kind, &args[2..]) {
        (TRIVIAL, []) => Router::new().route(PATH, post(trivial)),
        (PLAIN_CEDAR, [policies, entities]) => {
            let plain = PlainCedar::load(Path::new(policies), Path::new(entities))?;
            Router::new()
                .route(PATH, post(plain_cedar))
                .with_state(Arc::new(plain))
        }
        _ => return Err(usage()),
    };
    let router = router.layer(DefaultBodyLimit::max(MAX_BODY));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    axum::serve(listener, router).await?;
    Ok(())
}

async fn trivial(_body: Bytes) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        CONSTANT_ANSWER,
    )
        .into_response()
}

async fn plain_cedar(State(plain): State<Arc<PlainCedar>>, body: Bytes) -> Response {
    match plain.answer(&body) {
        Ok(answer) => Json(answer).into_response(),
        Err(detail) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "bad_request", "detail": detail })),
        )
            .into_response(),
    }
}

/// `POST /v1/authorize`'s body, as `serve` reads it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Question {
    principal: String,
    action: String,
    resource: String,
    #[serde(default)]
    context: Option<serde_json::Value>,
}

/// What plain Cedar answers: the decision and the determining policies.
#[derive(Debug, Serialize, PartialEq)]
pub struct Answer {
    pub decision: &'static str,
    pub policy_ids: Vec<String>,
}

/// A plain `cedar_policy::Authorizer` on a whole policy set and its entities.
pub struct PlainCedar {
    policies: PolicySet,
    entities: Entities,
    authorizer: Authorizer,
}

impl PlainCedar {
    /// From Cedar policy text and an entities JSON array.
    pub fn new(policies: &str, entities: &str) -> anyhow::Result<PlainCedar> {
        Ok(PlainCedar {
            policies: PolicySet::from_str(policies).context("parsing the policies")?,
            entities: Entities::from_json_str(entities, None).context("parsing the entities")?,
            authorizer: Authorizer::new(),
        })
    }

    fn load(policies: &Path, entities: &Path) -> anyhow::Result<PlainCedar> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
        };
        PlainCedar::new(&read(policies)?, &read(entities)?)
    }

    /// The answer to one request body, or why it is malformed.
    pub fn answer(&self, body: &[u8]) -> Result<Answer, String> {
        let question: Question = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let uid = |field: &str, text: &str| {
            EntityUid::from_str(text).map_err(|e| format!("{field}: {e}"))
        };
        let context = match question.context {
            None | Some(serde_json::Value::Null) => Context::empty(),
            Some(value) => Context::from_json_value(value, None).map_err(|e| e.to_string())?,
        };
        let request = cedar_policy::Request::new(
            uid("principal", &question.principal)?,
            uid("action", &question.action)?,
            uid("resource", &question.resource)?,
            context,
            None,
        )
        .map_err(|e| e.to_string())?;
        let response = self
            .authorizer
            .is_authorized(&request, &self.policies, &self.entities);
        let decision = match response.decision() {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        };
        // The `@id` annotation, as `serve` reports it, else Cedar's own id.
        let policy_ids = response
            .diagnostics()
            .reason()
            .map(|id| {
                self.policies
                    .policy(id)
                    .and_then(|p| p.annotation("id"))
                    .map_or_else(|| id.to_string(), str::to_owned)
            })
            .collect();
        Ok(Answer {
            decision,
            policy_ids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICIES: &str = r#"
        @id("viewers-read")
        permit(principal in Role::"viewer", action == Action::"read", resource);
        @id("editors-read-write")
        permit(principal in Role::"editor", action in [Action::"read", Action::"write"], resource);
    "#;
    const ENTITIES: &str = r#"[
        {"uid": {"type": "User", "id": "alice"}, "attrs": {}, "parents": [{"type": "Role", "id": "editor"}]},
        {"uid": {"type": "User", "id": "bob"}, "attrs": {}, "parents": [{"type": "Role", "id": "viewer"}]},
        {"uid": {"type": "Role", "id": "editor"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Role", "id": "viewer"}, "attrs": {}, "parents": []}
    ]"#;

    fn ask(plain: &PlainCedar, principal: &str, action: &str) -> Result<Answer, String> {
        let body = serde_json::json!({
            "principal": format!("User::\"{principal}\""),
            "action": format!("Action::\"{action}\""),
            "resource": "Doc::\"plan\"",
        });
        plain.answer(body.to_string().as_bytes())
    }

    #[test]
    fn plain_cedar_decides_with_roles_and_names_the_policy() {
        let plain = PlainCedar::new(POLICIES, ENTITIES).unwrap();
        assert_eq!(
            ask(&plain, "alice", "write"),
            Ok(Answer {
                decision: "allow",
                policy_ids: vec!["editors-read-write".into()],
            })
        );
        assert_eq!(
            ask(&plain, "bob", "write"),
            Ok(Answer {
                decision: "deny",
                policy_ids: vec![],
            })
        );
        assert_eq!(ask(&plain, "bob", "read").unwrap().decision, "allow");
    }

    #[test]
    fn plain_cedar_rejects_what_serve_rejects() {
        let plain = PlainCedar::new(POLICIES, ENTITIES).unwrap();
        for bad in [
            r#"{"principal":"User::\"a\"","action":"Action::\"read\"","resource":"Doc::\"d\"","x":1}"#,
            r#"{"principal":"User::\"a\"","action":"Action::\"read\""}"#,
            r#"{"principal":"alice","action":"Action::\"read\"","resource":"Doc::\"d\""}"#,
            r#"{"principal":"User::\"a\"","action":"Action::\"read\"","resource":"Doc::\"d\"","context":[1]}"#,
            "not json",
        ] {
            assert!(plain.answer(bad.as_bytes()).is_err(), "{bad} accepted");
        }
    }
}
