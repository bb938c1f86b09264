//! One call to the Marketing API under the concurrency gate, and what its errors mean.

use std::time::Duration;

use optinsync_plugin_api::{ConnectorError, FailureScope};
use reqwest::Method;
use serde_json::Value;

use crate::{Mailchimp, SETTING_PREFIX};

/// A failed call: Mailchimp's problem document (for the caller to classify per item), or an
/// error already classified for the whole call.
#[derive(Debug, Clone)]
pub(crate) enum CallError {
    /// A 4xx with a problem document (`title`, `detail`, field `errors[]` names).
    Problem {
        status: u16,
        title: String,
        detail: String,
        fields: Vec<String>,
    },
    Connector(ConnectorError),
}

impl From<ConnectorError> for CallError {
    fn from(e: ConnectorError) -> Self {
        Self::Connector(e)
    }
}

fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

impl Mailchimp {
    /// Call `path` (below the API root) and read the JSON answer (`Null` for 204). At most
    /// `max_concurrency` calls are in flight at once: the permit is held until the answer is
    /// read.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        let _permit =
            self.gate.acquire().await.map_err(|_| {
                CallError::Connector(ConnectorError::transient("connector shut down"))
            })?;
        let url = format!("{}{path}", self.base_url);
        let mut rb = self
            .http
            .request(method.clone(), &url)
            .basic_auth("optinsync", Some(&self.api_key));
        if !query.is_empty() {
            rb = rb.query(query);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let answer = rb.send().await.map_err(|e| {
            let what = if e.is_timeout() {
                "timed out"
            } else {
                "failed"
            };
            CallError::Connector(ConnectorError::transient(format!(
                "Mailchimp call {method} {} {what}",
                self.endpoint_label(path)
            )))
        })?;
        let status = answer.status().as_u16();
        let bytes = answer.bytes().await.map_err(|_| {
            CallError::Connector(ConnectorError::transient(
                "Mailchimp's answer was cut off".to_owned(),
            ))
        })?;
        drop(_permit);
        let label = self.endpoint_label(path);
        if (200..300).contains(&status) {
            if status == 204 || bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|_| {
                CallError::Connector(ConnectorError::transient(format!(
                    "Mailchimp answered {method} {label} with a body that is not JSON"
                )))
            });
        }
        let problem: Option<Value> = serde_json::from_slice(&bytes).ok();
        let title = problem
            .as_ref()
            .map(|p| text(p, "title"))
            .unwrap_or_default();
        tracing::debug!(status, title = %title.escape_debug(), endpoint = %label, "Mailchimp refused a call");
        if status == 429 || (status == 403 && problem.is_none()) {
            metrics::counter!("optinsync_mailchimp_throttled_total").increment(1);
        }
        match status {
            429 => Err(CallError::Connector(ConnectorError::Transient {
                message: format!(
                    "Mailchimp: too many requests at once (429) on {method} {label}; another integration may share the key's 10 connections"
                ),
                retry_after: Some(self.throttle_wait),
                scope: FailureScope::Service,
            })),
            401 => Err(CallError::Connector(ConnectorError::Config {
                setting: format!("{SETTING_PREFIX}.api_key"),
                message: format!(
                    "Mailchimp refused the API key (401 {}): check the key and its data-centre suffix",
                    title.escape_debug()
                ),
            })),
            // A bare 403 is reported under heavy throttling; one with a problem document is
            // about the key or the account.
            403 if problem.is_none() => Err(CallError::Connector(ConnectorError::Transient {
                message: format!("Mailchimp answered {method} {label} with a bare 403 (throttled)"),
                retry_after: Some(self.throttle_wait),
                scope: FailureScope::Service,
            })),
            403 => Err(CallError::Connector(ConnectorError::Config {
                setting: format!("{SETTING_PREFIX}.api_key"),
                message: format!(
                    "Mailchimp refused the call (403 {}): the key's account or data centre does not allow it",
                    title.escape_debug()
                ),
            })),
            s if s >= 500 || s == 408 => Err(CallError::Connector(ConnectorError::transient(
                format!("Mailchimp answered {method} {label} with HTTP {s}"),
            ))),
            s => match problem {
                Some(p) => Err(CallError::Problem {
                    status: s,
                    title,
                    detail: text(&p, "detail"),
                    fields: p
                        .get("errors")
                        .and_then(Value::as_array)
                        .map(|errs| errs.iter().map(|e| text(e, "field")).collect())
                        .unwrap_or_default(),
                }),
                None => Err(CallError::Connector(ConnectorError::permanent(format!(
                    "Mailchimp answered {method} {label} with HTTP {s} and no problem document"
                )))),
            },
        }
    }

    /// The path with the member hash left out (logs and messages never carry it).
    fn endpoint_label(&self, path: &str) -> String {
        let segs: Vec<&str> = path.split('/').collect();
        segs.iter()
            .enumerate()
            .map(|(i, s)| {
                if i >= 1 && segs.get(i - 1) == Some(&"members") {
                    "{subscriber_hash}"
                } else {
                    s
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// What Mailchimp's refusal of one member means (for a subscribe or a `pending`). The
/// messages never carry the address (Mailchimp's `detail` does).
pub(crate) fn member_refusal(title: &str, detail: &str, fields: &[String]) -> ConnectorError {
    let d = detail.to_lowercase();
    if title == "Member In Compliance State" || d.contains("compliance state") {
        return ConnectorError::permanent(
            "Mailchimp holds this address in a compliance state (it unsubscribed, bounced or is under review) and will not subscribe it over the API; the status poll reports the unsubscribe or bounce",
        );
    }
    if title == "Forgotten Email Not Subscribed" || d.contains("permanently deleted") {
        return ConnectorError::permanent(
            "this address was permanently deleted from the Mailchimp audience and cannot be re-imported; only a Mailchimp-hosted signup form can add it again",
        );
    }
    if d.contains("looks fake or invalid")
        || d.contains("valid email address")
        || d.contains("must contain a single @")
    {
        return ConnectorError::rejected("Mailchimp refuses the address as not valid");
    }
    if d.contains("signed up to a lot of lists") {
        return ConnectorError::Transient {
            message: "Mailchimp throttles sign-ups of this address for now".into(),
            retry_after: Some(Duration::from_secs(3600)),
            scope: FailureScope::Record,
        };
    }
    if d.contains("merge fields were invalid") || !fields.is_empty() {
        return ConnectorError::permanent(format!(
            "Mailchimp refused the member's fields ({}): check the audience's merge fields and the mapping",
            fields
                .iter()
                .map(|f| f.escape_debug().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    ConnectorError::permanent(format!(
        "Mailchimp refused the member ({})",
        title.escape_debug()
    ))
}
