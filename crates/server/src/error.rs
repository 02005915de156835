//! Errors: [`ServerError`] for starting the server, [`ApiError`] for one request (rendered as
//! OpenAI's error body `{"error": {"message", "type", "param", "code"}}`).

use std::net::SocketAddr;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {detail} (is another server using the port? pick another with --port)")]
    Bind { addr: SocketAddr, detail: String },

    #[error("cannot start the async runtime: {0}")]
    Runtime(String),

    #[error("cannot start the engine worker thread: {0}")]
    Worker(String),

    #[error("the server failed: {0}")]
    Io(String),
}

/// One failed request: an HTTP status plus OpenAI's error fields.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
struct ErrorFields<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// 400 `invalid_request_error` about `param` (when one field is to blame).
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn model_not_found(asked: &str, served: &str) -> Self {
        Self::invalid(
            format!(
                "The model '{}' does not exist; this server serves '{served}' (see GET /v1/models)",
                asked.escape_debug()
            ),
            Some("model"),
        )
        .with_status(StatusCode::NOT_FOUND)
        .with_code("model_not_found")
    }

    pub fn unauthorized() -> Self {
        Self::invalid(
            "Incorrect or missing API key: send the header 'Authorization: Bearer <key>' with the server's --api-key",
            None,
        )
        .with_status(StatusCode::UNAUTHORIZED)
        .with_code("invalid_api_key")
    }

    pub fn busy(waiting: usize) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("The server is busy ({waiting} requests waiting); retry later"),
            kind: "server_error",
            param: None,
            code: Some("server_busy"),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// OpenAI's error body for this error.
    fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorFields {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        }
    }

    /// The JSON body alone (also sent as an SSE event when a stream fails midway).
    pub fn body_json(&self) -> String {
        serde_json::to_string(&self.body()).unwrap_or_else(|_| String::from("{\"error\":{\"message\":\"error\"}}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}
