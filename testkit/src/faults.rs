//! Seeded random faults for the fake HTTP servers (Zoho CRM, Zoho Campaigns): a
//! [`FaultPlan`] rolls a die for every request and, at its rate, answers with one of
//!
//! * 429 with `Retry-After: 1`, or 429 without it (request not processed);
//! * 500 / 503 (request not processed);
//! * a dropped connection: the response starts, then the connection breaks mid-body
//!   (request not processed);
//! * a slow answer: the request **is** processed, the answer comes after `slow` (set it past
//!   the client's timeout, so the client gives up on a call that took effect);
//! * truncated JSON: the request **is** processed, the body is cut in half.
//!
//! The same seed gives the same sequence of rolls; which request gets which roll still
//! depends on arrival order. Counts per endpoint and kind are kept for the report.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomFault {
    TooManyRequests { retry_after: bool },
    ServerError(u16),
    Drop,
    Slow,
    Truncated,
}

impl RandomFault {
    pub fn label(self) -> &'static str {
        match self {
            RandomFault::TooManyRequests { retry_after: true } => "429+retry-after",
            RandomFault::TooManyRequests { retry_after: false } => "429",
            RandomFault::ServerError(_) => "5xx",
            RandomFault::Drop => "dropped",
            RandomFault::Slow => "slow",
            RandomFault::Truncated => "truncated",
        }
    }
}

/// A seeded fault schedule for one fake server.
#[derive(Debug)]
pub struct FaultPlan {
    rng: StdRng,
    /// Probability of a fault per request (0.1 = 10 %).
    pub rate: f64,
    /// Delay of a slow answer.
    pub slow: Duration,
    /// Endpoint (`METHOD /path`) → fault label → count.
    pub injected: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// Requests seen per endpoint (faulted or not).
    pub requests: BTreeMap<String, u64>,
}

impl FaultPlan {
    pub fn new(seed: u64, rate: f64, slow: Duration) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            rate,
            slow,
            injected: BTreeMap::new(),
            requests: BTreeMap::new(),
        }
    }

    /// Roll for one request to `endpoint`.
    pub fn roll(&mut self, endpoint: &str) -> Option<RandomFault> {
        *self.requests.entry(endpoint.to_owned()).or_default() += 1;
        if !self.rng.gen_bool(self.rate.clamp(0.0, 1.0)) {
            return None;
        }
        let fault = match self.rng.gen_range(0..6) {
            0 => RandomFault::TooManyRequests { retry_after: true },
            1 => RandomFault::TooManyRequests { retry_after: false },
            2 => RandomFault::ServerError(if self.rng.gen_bool(0.5) { 500 } else { 503 }),
            3 => RandomFault::Drop,
            4 => RandomFault::Slow,
            _ => RandomFault::Truncated,
        };
        *self
            .injected
            .entry(endpoint.to_owned())
            .or_default()
            .entry(fault.label())
            .or_default() += 1;
        Some(fault)
    }

    pub fn total(&self) -> u64 {
        self.injected.values().flat_map(|m| m.values()).sum()
    }

    /// One line per endpoint: requests, faults by kind.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for (endpoint, n) in &self.requests {
            let faults = self.injected.get(endpoint);
            let total: u64 = faults.map(|f| f.values().sum()).unwrap_or(0);
            let detail = faults
                .map(|f| {
                    f.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            out.push_str(&format!(
                "  {endpoint:<40} {n:>5} requests {total:>4} faults  {detail}\n"
            ));
        }
        out
    }
}

/// `METHOD /path` of a request, record ids (all-digit segments) written as `{id}`.
pub fn endpoint_of(req: &Request) -> String {
    let path = req
        .uri()
        .path()
        .split('/')
        .map(|seg| {
            if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
                "{id}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/");
    format!("{} {path}", req.method())
}

/// Carry out `fault` around the rest of the stack.
pub async fn apply(
    fault: Option<RandomFault>,
    slow: Duration,
    req: Request,
    next: Next,
) -> Response {
    match fault {
        None => next.run(req).await,
        Some(RandomFault::TooManyRequests { retry_after }) => {
            let mut r = (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"code":"TOO_MANY_REQUESTS","status":"error","message":"injected rate limit"}"#,
            )
                .into_response();
            if retry_after {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, "1".parse().unwrap());
            }
            r
        }
        Some(RandomFault::ServerError(code)) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(header::CONTENT_TYPE, "text/html")],
            "<html>injected server error</html>",
        )
            .into_response(),
        Some(RandomFault::Drop) => {
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from_static(b"{\"data\":[{\"id\":")),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "injected connection drop",
                )),
            ];
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                Body::from_stream(futures_util::stream::iter(chunks)),
            )
                .into_response()
        }
        Some(RandomFault::Slow) => {
            let r = next.run(req).await;
            tokio::time::sleep(slow).await;
            r
        }
        Some(RandomFault::Truncated) => {
            let r = next.run(req).await;
            let (mut parts, body) = r.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            let cut = bytes.slice(..bytes.len() / 2);
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(cut))
        }
    }
}
