//! The gate every API call passes, and the OAuth token endpoint.
//!
//! * `Authorization: Bearer <token>`: unknown → 401 `INVALID_AUTHENTICATION`; an OAuth access
//!   token past its `expires_in` → 401 `EXPIRED_AUTHENTICATION`;
//! * scopes: a token with none of the endpoint's scopes → 403 `MISSING_SCOPES`, naming them in
//!   `errors[0].context.requiredGranularScopes`;
//! * limits: the daily count per portal (private apps only: HubSpot's usage page says public
//!   OAuth apps are "only subject to a limit of 100 requests every 10 seconds"), reset at the
//!   portal's local midnight → 429 `DAILY`; the rolling 10-second burst window per app → 429
//!   `TEN_SECONDLY_ROLLING`; search's own per-second window per portal → 429 `SECONDLY`.
//!   Every request with a valid token counts, refused ones included (stricter);
//! * `X-HubSpot-RateLimit-*` headers on every answer but search's: private-app tokens get
//!   `-Daily`, `-Daily-Remaining`, `-Interval-Milliseconds`, `-Max`, `-Remaining`,
//!   `-Secondly`, `-Secondly-Remaining`; OAuth tokens get `-Interval-Milliseconds`, `-Max`,
//!   `-Remaining` (HubSpot: "which set is present depends on auth type"; which set goes with
//!   which type is inferred); [`super::HubSpotState::rate_headers`] overrides it.
//!
//! The token endpoint (`POST /oauth/v1/token`, `/oauth/v3/token`, form-encoded) takes the
//! `refresh_token` grant and rotates the refresh token (stricter: the old one stops working).
//! Inferred (HubSpot's documentation gives no body for it): refresh errors answer 400
//! `{"status": "BAD_REFRESH_TOKEN" | "BAD_CLIENT_ID" | "BAD_CLIENT_SECRET" | "BAD_GRANT_TYPE",
//! "message": ..., "correlationId": ...}`.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use chrono::Utc;
use serde_json::json;

use super::http::{Query, Reply, error, error_with, uuid};
use super::{HubSpotState, RateHeaders, Token};

/// Rate-limit header values to add (`None` on search answers and unauthenticated ones).
pub(crate) type RateOut = Option<Vec<(&'static str, String)>>;

pub(crate) fn add_headers(resp: &mut Response, rate: RateOut) {
    for (name, value) in rate.unwrap_or_default() {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
}

/// The 429 body for a policy.
pub(crate) fn rate_limited(policy: &str) -> Reply {
    let message = match policy {
        "DAILY" => "You have reached your daily limit.".to_owned(),
        "SECONDLY" => "You have reached your secondly limit.".to_owned(),
        p => format!("You have reached your {} limit.", p.to_lowercase()),
    };
    Reply::new(
        429,
        json!({"status": "error", "message": message, "errorType": "RATE_LIMIT",
               "correlationId": uuid(), "policyName": policy, "requestId": uuid()}),
    )
}

fn prune(times: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while times
        .front()
        .is_some_and(|t| now.duration_since(*t) >= window)
    {
        times.pop_front();
    }
}

/// Auth, scopes and rate limits. `Ok(headers)` lets the request through.
pub(crate) fn check(
    s: &mut HubSpotState,
    headers: &HeaderMap,
    needs: &[&str],
    search: bool,
) -> Result<RateOut, (Reply, RateOut)> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default()
        .to_owned();
    let now = Instant::now();
    let token: Token = match s.tokens.get(&presented) {
        None => {
            return Err((
                error(
                    401,
                    "INVALID_AUTHENTICATION",
                    "Authentication credentials not found. This API supports OAuth 2.0 authentication and you can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
                ),
                None,
            ));
        }
        Some(t) if t.expires.is_some_and(|e| now >= e) => {
            let ago = t
                .expires
                .map(|e| now.duration_since(e).as_secs())
                .unwrap_or(0);
            return Err((
                error(
                    401,
                    "EXPIRED_AUTHENTICATION",
                    &format!("The OAuth token used to make this call expired {ago} second(s) ago."),
                ),
                None,
            ));
        }
        Some(t) => t.clone(),
    };

    // Limits: every request with a valid token counts (refused ones too); OAuth apps have
    // no daily limit.
    let today = Utc::now().with_timezone(&s.portal_offset).date_naive();
    if today != s.daily_date {
        s.daily_date = today;
        s.daily_used = 0;
    }
    if !token.oauth {
        s.daily_used += 1;
    }
    let window = s.scaled(Duration::from_secs(10));
    let second = s.scaled(Duration::from_secs(1));
    let burst_max = if token.oauth {
        s.oauth_burst_max
    } else {
        s.burst_max
    };
    let burst = s.burst.entry(token.app.clone()).or_default();
    prune(burst, now, window);
    burst.push_back(now);
    let in_window = burst.len();
    let in_second = burst
        .iter()
        .filter(|t| now.duration_since(**t) < second)
        .count();
    let secondly = burst_max.div_ceil(10) as usize;
    let rate: RateOut = if search {
        None
    } else {
        let remaining = (burst_max as usize).saturating_sub(in_window).to_string();
        let daily = s.daily_max.to_string();
        let daily_rem = s.daily_max.saturating_sub(s.daily_used).to_string();
        let interval = (
            "X-HubSpot-RateLimit-Interval-Milliseconds",
            window.as_millis().to_string(),
        );
        let max = ("X-HubSpot-RateLimit-Max", burst_max.to_string());
        let rem = ("X-HubSpot-RateLimit-Remaining", remaining);
        let d = ("X-HubSpot-RateLimit-Daily", daily);
        let dr = ("X-HubSpot-RateLimit-Daily-Remaining", daily_rem);
        let sec = ("X-HubSpot-RateLimit-Secondly", secondly.to_string());
        let secr = (
            "X-HubSpot-RateLimit-Secondly-Remaining",
            secondly.saturating_sub(in_second).to_string(),
        );
        let set = s.rate_headers.unwrap_or(if token.oauth {
            RateHeaders::Interval
        } else {
            RateHeaders::All
        });
        Some(match set {
            RateHeaders::All => vec![d, dr, interval, max, rem, sec, secr],
            RateHeaders::Interval => vec![interval, max, rem],
            RateHeaders::DailySecondly => vec![d, dr, sec, secr],
            RateHeaders::None => vec![],
        })
    };

    if !needs.is_empty() && !needs.iter().any(|n| token.scopes.contains(*n)) {
        let needed: Vec<&str> = needs.to_vec();
        return Err((
            error_with(
                403,
                "MISSING_SCOPES",
                "This app hasn't been granted all required scopes to make this call. Read more about required scopes here: https://developers.hubspot.com/scopes.",
                vec![
                    json!({"message": "One or more of the following scopes are required.",
                            "context": {"requiredGranularScopes": needed}}),
                ],
                None,
            ),
            rate,
        ));
    }
    if !token.oauth && s.daily_used > s.daily_max {
        return Err((rate_limited("DAILY"), rate));
    }
    if in_window > burst_max as usize {
        return Err((rate_limited("TEN_SECONDLY_ROLLING"), rate));
    }
    if search {
        let per_second = s.search_per_second as usize;
        prune(&mut s.search_times, now, second);
        s.search_times.push_back(now);
        if s.search_times.len() > per_second {
            return Err((rate_limited("SECONDLY"), None));
        }
    }
    Ok(rate)
}

/// `POST /oauth/v1/token` (and v3): the `refresh_token` grant, form-encoded.
pub(crate) fn token(s: &mut HubSpotState, body: &str, query: &str, v3: bool) -> Reply {
    s.token_requests += 1;
    let mut params = Query::parse(query);
    params.0.extend(Query::parse(body).0);
    let p = |k: &str| params.get(k).unwrap_or_default().to_owned();
    let bad = |status: &str, message: &str| {
        Reply::new(
            400,
            json!({"status": status, "message": message, "correlationId": uuid()}),
        )
    };
    if p("grant_type") != "refresh_token" {
        return bad("BAD_GRANT_TYPE", "Invalid grant type");
    }
    if p("client_id") != s.client_id {
        return bad("BAD_CLIENT_ID", "missing or unknown client id");
    }
    if p("client_secret") != s.client_secret {
        return bad("BAD_CLIENT_SECRET", "missing or invalid client secret");
    }
    let Some(granted) = s.refresh_tokens.remove(&p("refresh_token")) else {
        return bad("BAD_REFRESH_TOKEN", "missing or invalid refresh token");
    };
    let n = s.next_token;
    s.next_token += 1;
    let access = format!("oauth-access-{n}-{}", uuid());
    let refresh = format!("na1-refresh-{n}-{}", uuid());
    let ttl = s.token_ttl;
    s.tokens.insert(
        access.clone(),
        Token {
            app: "oauth-app".into(),
            oauth: true,
            scopes: granted.clone(),
            expires: Some(Instant::now() + ttl),
        },
    );
    s.refresh_tokens.insert(refresh.clone(), granted.clone());
    let mut out = json!({"token_type": "bearer", "refresh_token": refresh,
                         "access_token": access, "expires_in": ttl.as_secs()});
    if v3 {
        let scopes: Vec<&String> = granted
            .iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        out["token_use"] = json!("access_token");
        out["hub_id"] = json!(super::PORTAL_ID);
        out["user_id"] = json!(1);
        out["scopes"] = json!(scopes);
    }
    Reply::ok(out)
}
