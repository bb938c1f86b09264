//! `/preferences/{token}`: the preference centre. Its link is in every mail (signed,
//! purpose `preferences`, never expiring, honoured only if mailed). `GET` shows every list of
//! the organisation with the person's state; the page's buttons `POST` (with the page's
//! nonce) to leave one list, leave all, or join another. Joining here confirms at once
//! (`Input::PreferencesJoin`): the link came to the mailbox, which is what a DOI proves; the
//! evidence names the mailed token, the page snapshot, IP and user agent.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use chrono::Utc;

use optinsync_engine::consent::{ConsentState, Input};
use optinsync_engine::engine::{Applied, Engine};
use optinsync_engine::ledger::{EventSource, Evidence};
use optinsync_engine::templates::{ListChoice, Page};
use optinsync_engine::tokens::Purpose;

use super::{ClientIp, LinkState, Req, Target, cross_site, fallback_lang, resolve};

/// Nonce purpose of the preference centre's forms.
const NONCE_PREFERENCES: &str = "preferences";

/// Every configured list with the person's state on it.
async fn choices(engine: &Engine, t: &Target<'_>) -> Result<Vec<ListChoice>, Response> {
    let consents = match engine.reads().consents_of_contact(&t.contact.id).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(contact_id = %t.contact.id, error = %e, "preference centre: consents not read");
            return Err(axum::response::IntoResponse::into_response(
                StatusCode::SERVICE_UNAVAILABLE,
            ));
        }
    };
    Ok(engine
        .lists()
        .iter()
        .map(|l| {
            let state = consents
                .iter()
                .find(|(id, _)| *id == l.id)
                .map_or(ConsentState::None, |(_, c)| c.state);
            let on = matches!(
                state,
                ConsentState::Confirmed | ConsentState::Revalidating | ConsentState::Pending
            );
            let blocked = matches!(
                state,
                ConsentState::Bounced | ConsentState::Complained | ConsentState::Erased
            );
            let campaigns_doi = l.doi == optinsync_engine::config::DoiMode::Campaigns;
            ListChoice {
                id: l.id.clone(),
                name: l.name.clone(),
                description: l.description.clone(),
                state: state.as_str().to_owned(),
                on,
                can_join: !on && !blocked && !campaigns_doi,
            }
        })
        .collect())
}

/// The page with the person's lists as they stand now.
async fn show(engine: &Engine, st: &LinkState, t: &Target<'_>) -> Response {
    let lists = match choices(engine, t).await {
        Ok(l) => l,
        Err(r) => return r,
    };
    let now = Utc::now().timestamp();
    let token_id = t.claims.token_id.clone();
    st.page_of(
        engine,
        StatusCode::OK,
        Page::Preferences,
        &t.lang,
        Some(t.list),
        &lists,
        |h| st.nonce(NONCE_PREFERENCES, &token_id, h, now),
    )
    .await
    .0
}

pub(super) async fn preferences_get(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    method: Method,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Response {
    let req = Req::new(&ip, &method, &headers);
    match resolve(&engine, &st, &req, &token, Purpose::Preferences).await {
        Ok((t, _, _)) => show(&engine, &st, &t).await,
        Err(page) => page,
    }
}

/// What a button of the page asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Leave,
    LeaveAll,
    Join,
}

impl Action {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "leave" => Some(Self::Leave),
            "leave_all" => Some(Self::LeaveAll),
            "join" => Some(Self::Join),
            _ => None,
        }
    }
}

pub(super) async fn preferences_post(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    headers: HeaderMap,
    Path(token): Path<String>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let req = Req::new(&ip, &Method::POST, &headers);
    let (t, _, mailed) = match resolve(&engine, &st, &req, &token, Purpose::Preferences).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    if cross_site(&headers, &st.public_origin).is_some() {
        return st
            .notice(
                &engine,
                StatusCode::FORBIDDEN,
                "cross_site",
                &t.lang,
                Some(t.list),
            )
            .await;
    }
    let form = form.map(|f| f.0).unwrap_or_default();
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let page_hash = field("page");
    let now = Utc::now().timestamp();
    let action = Action::parse(field("action"));
    if !st.verify_nonce(
        NONCE_PREFERENCES,
        &t.claims.token_id,
        page_hash,
        field("nonce"),
        now,
    ) || action.is_none()
    {
        return st
            .notice(
                &engine,
                StatusCode::BAD_REQUEST,
                "stale_page",
                &t.lang,
                Some(t.list),
            )
            .await;
    }
    let mut evidence = Evidence {
        ip: Some(req.ip.to_string()),
        user_agent: req.user_agent.clone(),
        method: Some(req.method.clone()),
        token_id: Some(t.claims.token_id.clone()),
        preferences_token_id: Some(t.claims.token_id.clone()),
        content_hash: Some(page_hash.to_owned()),
        ..Evidence::default()
    };
    if let Some(m) = mailed {
        evidence.message_id = m.message_id;
        evidence.mail_content_hash = m.content_hash;
    }
    let chosen = engine.list(field("list"));
    let work: Vec<(&optinsync_engine::config::ListConfig, Input, &str)> = match action {
        Some(Action::Leave) => chosen
            .map(|l| (l, Input::Unsubscribe, "left the list on the preference centre"))
            .into_iter()
            .collect(),
        // The lists the person is on (or waiting for): the others have nothing to leave.
        Some(Action::LeaveAll) => match choices(&engine, &t).await {
            Ok(lists) => lists
                .iter()
                .filter(|c| c.on)
                .filter_map(|c| engine.list(&c.id))
                .map(|l| (l, Input::Unsubscribe, "left all lists on the preference centre"))
                .collect(),
            Err(r) => return r,
        },
        Some(Action::Join) => chosen
            .map(|l| {
                let input = Input::PreferencesJoin {
                    token: t.claims.token_id.clone(),
                };
                (l, input, "joined the list on the preference centre (its link was mailed to this address)")
            })
            .into_iter()
            .collect(),
        None => Vec::new(),
    };
    for (list, input, detail) in work {
        // Leaving a list one is not on changes nothing (the machine says so).
        let mut ev = evidence.clone();
        ev.detail = Some(detail.to_owned());
        match engine
            .apply(&t.contact, list, input, EventSource::Web, ev)
            .await
        {
            Ok(Applied::Changed(_) | Applied::Unchanged | Applied::Refused(_)) => {}
            Err(e) => {
                tracing::error!(contact_id = %t.contact.id, error = %e, "preference change could not be recorded");
                return st.retry_later(&engine, &t).await;
            }
        }
    }
    show(&engine, &st, &t).await
}

/// `GET /preferences`: the "send me a link" form, in the browser's language.
pub(super) async fn request_get(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let req = Req::new(&ip, &method, &headers);
    let lang = fallback_lang(&engine, &req);
    st.page(
        &engine,
        StatusCode::OK,
        Page::PreferencesRequest,
        &lang,
        None,
        |_| String::new(),
    )
    .await
    .0
}

/// `POST /preferences`: mail the preference-centre link to a known address. The answer is
/// the same for known and unknown addresses (and for the honeypot and the per-address
/// limit), no sooner than `[signup] answer_floor`; the per-client limit is the signup's.
pub(super) async fn request_post(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    headers: HeaderMap,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let started = std::time::Instant::now();
    let req = Req::new(&ip, &Method::POST, &headers);
    let lang = fallback_lang(&engine, &req);
    if cross_site(&headers, &st.public_origin).is_some() {
        return st
            .notice(&engine, StatusCode::FORBIDDEN, "cross_site", &lang, None)
            .await;
    }
    if st.signup.client_over(req.ip) {
        return st
            .notice(
                &engine,
                StatusCode::TOO_MANY_REQUESTS,
                "too_many",
                &lang,
                None,
            )
            .await;
    }
    let form = form.map(|f| f.0).unwrap_or_default();
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let Ok(address) = optinsync_engine::email::normalise(field("email")) else {
        return st
            .notice(
                &engine,
                StatusCode::BAD_REQUEST,
                "signup_invalid",
                &lang,
                None,
            )
            .await;
    };
    let skip =
        !field(super::signup::HONEYPOT).trim().is_empty() || st.signup.address_over(&address);
    if !skip {
        let evidence = Evidence {
            ip: Some(req.ip.to_string()),
            user_agent: req.user_agent.clone(),
            method: Some(req.method.clone()),
            detail: Some("preference-centre link requested by address".into()),
            ..Evidence::default()
        };
        if let Err(e) = engine.request_preferences_link(&address, evidence).await {
            tracing::error!(error = %e, "preference-centre link request could not be recorded");
            return st
                .notice(
                    &engine,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "retry",
                    &lang,
                    None,
                )
                .await;
        }
    }
    st.signup.wait_floor(started).await;
    st.notice(
        &engine,
        StatusCode::OK,
        "preferences_link_sent",
        &lang,
        None,
    )
    .await
}
