//! Error responses: a status code and a JSON body `{"error": CODE, "detail": TEXT}`.

use axum::{
    extract::rejection::BytesRejection,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use revwatch_policy::DecideError;
use serde::Serialize;

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// A stable, machine-readable code.
    pub error: &'static str,
    /// A human-readable explanation.
    pub detail: String,
}

/// The JSON body of an [`ApiError`] (also an item of a batch answer).
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: &'a str,
    pub detail: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            detail: detail.into(),
        }
    }

    /// A body that is not the JSON the endpoint expects (syntax, unknown or missing
    /// fields, wrong types).
    pub fn malformed(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed_request",
            format!("{detail}"),
        )
    }

    pub fn unauthorized(detail: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: self.error,
            detail: &self.detail,
        }
    }
}

impl From<&DecideError> for ApiError {
    fn from(e: &DecideError) -> Self {
        let (status, error) = match e {
            // Well-formed JSON naming something the engine cannot parse.
            DecideError::BadRequest { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            DecideError::NotReady { .. } => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            DecideError::NotFreshEnough { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "not_fresh_enough")
            }
            DecideError::Consistency(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "consistent_read_failed")
            }
            DecideError::Engine(_) => (StatusCode::INTERNAL_SERVER_ERROR, "engine_error"),
        };
        ApiError::new(status, error, e.to_string())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        let status = r.status();
        let error = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "unreadable_body"
        };
        ApiError::new(status, error, r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Unknown paths.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// Known paths with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not accept that method",
    )
}
