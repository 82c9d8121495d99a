//! The JSON bodies of the HTTP API. Requests reject unknown fields, so a typo
//! (`"principle"`) is a 400 rather than a silently different question.

use revwatch_policy::{Consistency, Decision, Effect, Request};
use serde::{Deserialize, Serialize};

use super::errors::{ApiError, ErrorBody};

/// `POST /v1/authorize`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeRequest {
    pub principal: String,
    pub action: String,
    pub resource: String,
    #[serde(default)]
    pub context: Option<serde_json::Value>,
    #[serde(default)]
    pub consistency: Option<ConsistencyInput>,
}

impl AuthorizeRequest {
    /// The question, and the consistency it is asked with.
    pub fn split(self) -> (Question, Option<ConsistencyInput>) {
        let question = Question {
            principal: self.principal,
            action: self.action,
            resource: self.resource,
            context: self.context,
        };
        (question, self.consistency)
    }
}

/// One question: who, what, on what, and the request attributes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Question {
    pub principal: String,
    pub action: String,
    pub resource: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<serde_json::Value>,
}

/// `POST /v1/authorize/batch`: every request is decided on one policy set.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub requests: Vec<Question>,
    #[serde(default)]
    pub consistency: Option<ConsistencyInput>,
}

/// `"default"`, `"fully_consistent"` or `{"min_revision": R}`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ConsistencyInput {
    Default,
    FullyConsistent,
    MinRevision(i64),
}

impl ConsistencyInput {
    pub fn resolve(input: Option<Self>) -> Result<Consistency, ApiError> {
        Ok(match input {
            None | Some(ConsistencyInput::Default) => Consistency::Default,
            Some(ConsistencyInput::FullyConsistent) => Consistency::FullyConsistent,
            Some(ConsistencyInput::MinRevision(r)) if r >= 0 => Consistency::MinRevision(r),
            Some(ConsistencyInput::MinRevision(r)) => {
                return Err(ApiError::malformed(format!(
                    "consistency.min_revision must not be negative, got {r}"
                )));
            }
        })
    }
}

impl Question {
    /// The engine's request; the context must be an object (or absent or null).
    pub fn to_request(&self) -> Result<Request, ApiError> {
        self.clone().into_request()
    }

    /// [`to_request`](Self::to_request) taking the strings over: no copy on the hot
    /// path.
    pub fn into_request(self) -> Result<Request, ApiError> {
        let context = match self.context {
            None | Some(serde_json::Value::Null) => serde_json::Value::Null,
            Some(c @ serde_json::Value::Object(_)) => c,
            Some(_) => {
                return Err(ApiError::malformed("context must be a JSON object"));
            }
        };
        Ok(Request::new(self.principal, self.action, self.resource).with_context(context))
    }
}

/// A request as its [`Question`] reads in JSON (the decision log's `input`), without
/// copying it back into one.
#[derive(Debug, Serialize)]
pub struct QuestionOf<'a> {
    pub principal: &'a str,
    pub action: &'a str,
    pub resource: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<&'a serde_json::Value>,
}

impl<'a> From<&'a Request> for QuestionOf<'a> {
    fn from(r: &'a Request) -> Self {
        QuestionOf {
            principal: &r.principal,
            action: &r.action,
            resource: &r.resource,
            // A null context is an absent one (`into_request` made it null).
            context: (!r.context.is_null()).then_some(&r.context),
        }
    }
}

/// The answer to one question.
#[derive(Debug, Serialize)]
pub struct DecisionBody<'a> {
    pub decision: &'static str,
    pub policy_ids: &'a [String],
    pub revision: i64,
    pub decision_id: &'a str,
    /// Why the request was denied without evaluating policies (failing closed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// Policies that failed to evaluate and were skipped.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub errors: &'a [String],
}

impl<'a> From<&'a Decision> for DecisionBody<'a> {
    fn from(d: &'a Decision) -> Self {
        DecisionBody {
            decision: effect_name(d.effect),
            policy_ids: &d.policy_ids,
            revision: d.revision,
            decision_id: &d.decision_id,
            reason: d.fail_closed.as_deref(),
            errors: &d.errors,
        }
    }
}

pub fn effect_name(effect: Effect) -> &'static str {
    match effect {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
    }
}

/// One item of a batch answer: a decision, or why this request alone failed.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum BatchItem<'a> {
    Decision(DecisionBody<'a>),
    Error(ErrorBody<'a>),
}

/// The answer to a batch.
#[derive(Debug, Serialize)]
pub struct BatchBody<'a> {
    /// The revision every decision of the batch was made at.
    pub revision: i64,
    pub results: Vec<BatchItem<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<AuthorizeRequest, serde_json::Error> {
        serde_json::from_str(body)
    }

    #[test]
    fn consistency_forms() {
        let base = r#""principal":"p","action":"a","resource":"r""#;
        let c = |json: &str| {
            let req = parse(&format!("{{{base}{json}}}")).map_err(|e| e.to_string())?;
            ConsistencyInput::resolve(req.consistency).map_err(|e| e.detail)
        };
        assert_eq!(c(""), Ok(Consistency::Default));
        assert_eq!(c(r#","consistency":null"#), Ok(Consistency::Default));
        assert_eq!(
            c(r#","consistency":"fully_consistent""#),
            Ok(Consistency::FullyConsistent)
        );
        assert_eq!(
            c(r#","consistency":{"min_revision":7}"#),
            Ok(Consistency::MinRevision(7))
        );
        for bad in [
            r#","consistency":"sometimes""#,
            r#","consistency":{"min_revision":"7"}"#,
            r#","consistency":{"min_revision":-1}"#,
            r#","consistency":{"max_revision":7}"#,
        ] {
            assert!(c(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn unknown_and_missing_fields_are_rejected() {
        assert!(parse(r#"{"principal":"p","action":"a","resource":"r","x":1}"#).is_err());
        assert!(parse(r#"{"principle":"p","action":"a","resource":"r"}"#).is_err());
        assert!(parse(r#"{"principal":"p","action":"a"}"#).is_err());
        let batch = r#"{"requests":[{"principal":"p","action":"a","resource":"r","y":2}]}"#;
        assert!(serde_json::from_str::<BatchRequest>(batch).is_err());
    }
}
