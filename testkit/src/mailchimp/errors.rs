//! Mailchimp's errors: problem+json bodies (`type`, `title`, `status`, `detail`, `instance`,
//! optional `errors[]`) with the `X-Request-Id` and `Link` headers, and the glossary's titles
//! and texts.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::MailchimpState;

const ERROR_TYPE: &str = "https://mailchimp.com/developer/marketing/docs/errors/";

/// A Mailchimp error.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub title: String,
    pub detail: String,
    /// `errors[]`: (field, message).
    pub errors: Vec<(String, String)>,
    /// The batch call's `error_code` for this error.
    pub batch_code: &'static str,
}

impl ApiError {
    pub fn new(status: u16, title: &str, detail: &str) -> Self {
        Self {
            status,
            title: title.to_owned(),
            detail: detail.to_owned(),
            errors: Vec::new(),
            batch_code: "ERROR_GENERIC",
        }
    }

    /// 400 `Invalid Resource` with this detail.
    pub fn invalid(detail: &str) -> Self {
        Self::new(400, "Invalid Resource", detail)
    }

    /// 400 `Invalid Resource` naming one field in `errors[]`.
    pub fn field(field: &str, message: &str) -> Self {
        let mut e = Self::invalid(
            "The resource submitted could not be validated. For field-specific details, see the 'errors' array.",
        );
        e.errors.push((field.to_owned(), message.to_owned()));
        e
    }

    pub fn not_found() -> Self {
        Self::new(
            404,
            "Resource Not Found",
            "The requested resource could not be found.",
        )
    }

    /// The glossary's error for a status.
    pub fn glossary(status: u16) -> Self {
        let (title, detail) = match status {
            400 => ("Bad Request", "Your request could not be processed."),
            401 => (
                "API Key Invalid",
                "Your API key may be invalid, or you've attempted to access the wrong data center.",
            ),
            403 => (
                "Forbidden",
                "You are not permitted to access this resource.",
            ),
            404 => return Self::not_found(),
            405 => (
                "Method Not Allowed",
                "The requested method and resource are not compatible. See the Allow header for this resource's available methods.",
            ),
            429 => (
                "Too Many Requests",
                "You have exceeded the limit of 10 simultaneous connections.",
            ),
            503 => ("Compliance Related", "This method has been disabled."),
            _ => (
                "Internal Server Error",
                "An unexpected internal error has occurred.",
            ),
        };
        Self::new(status, title, detail)
    }
}

/// What a call answers.
#[derive(Debug)]
pub(super) enum Answer {
    Json(u16, Value),
    NoContent,
    Problem(ApiError),
    Raw(u16, &'static str, String),
}

pub(super) fn render(answer: Answer, request_id: &str, s: &MailchimpState) -> Response {
    let mut r = match answer {
        Answer::Json(status, v) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            v.to_string(),
        )
            .into_response(),
        Answer::NoContent => StatusCode::NO_CONTENT.into_response(),
        Answer::Raw(status, content_type, body) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(header::CONTENT_TYPE, content_type)],
            body,
        )
            .into_response(),
        Answer::Problem(e) => {
            let mut body = Map::new();
            if !s.omit_type_titles.contains(&e.title) {
                body.insert("type".into(), json!(ERROR_TYPE));
            }
            body.insert("title".into(), json!(e.title));
            body.insert("status".into(), json!(e.status));
            body.insert("detail".into(), json!(e.detail));
            body.insert("instance".into(), json!(request_id));
            if !e.errors.is_empty() {
                let errors: Vec<Value> = e
                    .errors
                    .iter()
                    .map(|(f, m)| json!({"field": f, "message": m}))
                    .collect();
                body.insert("errors".into(), Value::Array(errors));
            }
            let mut r = (
                StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
                [(
                    header::CONTENT_TYPE,
                    "application/problem+json; charset=utf-8",
                )],
                Value::Object(body).to_string(),
            )
                .into_response();
            let link = format!(
                "<https://{}.api.mailchimp.com/schema/3.0/Definitions/ProblemDetailDocument.json>; rel=\"describedBy\"",
                s.options.dc
            );
            if let Ok(v) = HeaderValue::from_str(&link) {
                r.headers_mut().insert(header::LINK, v);
            }
            r
        }
    };
    if let Ok(v) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert("x-request-id", v);
    }
    r.headers_mut()
        .insert(header::SERVER, HeaderValue::from_static("openresty"));
    r
}
