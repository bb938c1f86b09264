//! `/confirm/{token}`: the page with the button (`GET`), the confirmation (`POST`), and the
//! resend of an expired link.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use chrono::Utc;

use optinsync_engine::consent::Input;
use optinsync_engine::engine::{Applied, Engine};
use optinsync_engine::ledger::EventSource;
use optinsync_engine::templates::Page;
use optinsync_engine::tokens::Purpose;

use super::{
    Binding, ClientIp, LinkState, NONCE_CONFIRM, NONCE_RESEND, Req, Standing, Target, binding,
    cross_site, resolve, standing,
};

pub(super) async fn confirm_get(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    method: Method,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Response {
    metrics::counter!("optinsync_link_fetches_total", "page" => "confirm").increment(1);
    let req = Req::new(&ip, &method, &headers);
    let now = Utc::now().timestamp();
    let (t, expired, _) = match resolve(&engine, &st, &req, &token, Purpose::Confirm).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    // After the fact the page says what happened instead of offering the button again.
    let settled = match standing(&t, expired) {
        Standing::Open => None,
        Standing::AlreadyConfirmed => Some("already_confirmed"),
        Standing::Closed => Some("refused"),
    };
    if let Some(notice) = settled {
        let status = if notice == "refused" {
            StatusCode::CONFLICT
        } else {
            StatusCode::OK
        };
        let (resp, hash) = st
            .list_page(&engine, &t, status, Page::Notice(notice))
            .await;
        st.record_fetch(
            &engine,
            &t,
            &req,
            hash,
            "confirmation link fetched after the fact",
        )
        .await;
        return resp;
    }
    let (page, status, purpose, detail) = if expired {
        (
            Page::Expired,
            StatusCode::GONE,
            NONCE_RESEND,
            "expired confirmation link fetched",
        )
    } else {
        (
            Page::Confirm,
            StatusCode::OK,
            NONCE_CONFIRM,
            "confirmation page fetched",
        )
    };
    let token_id = t.claims.token_id.clone();
    let (resp, hash) = st
        .page(&engine, status, page, &t.lang, Some(t.list), |h| {
            st.nonce(purpose, &token_id, h, now)
        })
        .await;
    st.record_fetch(&engine, &t, &req, hash, detail).await;
    resp
}

pub(super) async fn confirm_post(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    headers: HeaderMap,
    Path(token): Path<String>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let req = Req::new(&ip, &Method::POST, &headers);
    let now = Utc::now().timestamp();
    let (t, expired, mailed) = match resolve(&engine, &st, &req, &token, Purpose::Confirm).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    if let Some(why) = cross_site(&headers, &st.public_origin) {
        metrics::counter!("optinsync_link_refused_total", "reason" => "cross_site").increment(1);
        tracing::info!(contact_id = %t.contact.id, why, "confirmation POST from another site refused");
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
    let form = match form {
        Ok(f) => f.0,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return st
                .notice(
                    &engine,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    &t.lang,
                    Some(t.list),
                )
                .await;
        }
        Err(_) => HashMap::new(),
    };
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    // A link whose signup is settled answers as the state machine would, without a page's
    // nonce: pressing again after confirming (or a stale tab) changes nothing and says so, and
    // a link that can no longer confirm (withdrawn since, replaced) says that.
    match standing(&t, expired) {
        Standing::Open => {}
        Standing::AlreadyConfirmed => return st.confirmed(&engine, &t).await,
        Standing::Closed => {
            return st
                .notice(
                    &engine,
                    StatusCode::CONFLICT,
                    "refused",
                    &t.lang,
                    Some(t.list),
                )
                .await;
        }
    }
    let purpose = if expired { NONCE_RESEND } else { NONCE_CONFIRM };
    let page_hash = field("page");
    if !st.verify_nonce(purpose, &t.claims.token_id, page_hash, field("nonce"), now) {
        if expired {
            // A POST on an expired link (a stale tab, a scanner) gets the offer again.
            let token_id = t.claims.token_id.clone();
            return st
                .page(
                    &engine,
                    StatusCode::GONE,
                    Page::Expired,
                    &t.lang,
                    Some(t.list),
                    |h| st.nonce(NONCE_RESEND, &token_id, h, now),
                )
                .await
                .0;
        }
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
    if expired {
        return resend(&engine, &st, &t, &req, page_hash).await;
    }
    // The confirmation names the mail that carried the link; a link whose mail is not on
    // record (yet) confirms nothing.
    let mailed = match mailed {
        Some(m) => m,
        None => match binding(&engine, &t).await {
            Ok(Binding::Mailed(m)) => m,
            Ok(_) => {
                metrics::counter!("optinsync_link_refused_total", "reason" => "not_mailed")
                    .increment(1);
                return st
                    .notice(
                        &engine,
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        &t.lang,
                        Some(t.list),
                    )
                    .await;
            }
            Err(e) => {
                tracing::error!(contact_id = %t.contact.id, error = %e, "link lookup failed");
                return st.retry_later(&engine, &t).await;
            }
        },
    };
    let mut evidence = req.evidence(&t.claims.token_id);
    evidence.content_hash = Some(page_hash.to_owned());
    evidence.message_id = mailed.message_id;
    evidence.mail_content_hash = mailed.content_hash;
    let input = Input::Confirm {
        token: t.claims.token_id.clone(),
    };
    let applied = engine
        .apply_seen(
            &t.contact,
            t.list,
            t.consent.clone(),
            input,
            EventSource::Web,
            evidence,
        )
        .await;
    super::count_action("confirm", &applied);
    match applied {
        Ok(Applied::Changed(_)) | Ok(Applied::Unchanged) => st.confirmed(&engine, &t).await,
        Ok(Applied::Refused(_)) => {
            st.notice(
                &engine,
                StatusCode::CONFLICT,
                "refused",
                &t.lang,
                Some(t.list),
            )
            .await
        }
        Err(e) => {
            tracing::error!(contact_id = %t.contact.id, error = %e, "confirmation could not be recorded");
            st.retry_later(&engine, &t).await
        }
    }
}

/// The expired page's button: start a fresh signup (a new DOI mail), rate-limited.
pub(super) async fn resend(
    engine: &Engine,
    st: &LinkState,
    t: &Target<'_>,
    req: &Req,
    page_hash: &str,
) -> Response {
    let key = format!("{}/{}", t.contact.id, t.list.id);
    if st.resend_limiter.check_key(&key).is_err() {
        return st
            .notice(
                engine,
                StatusCode::TOO_MANY_REQUESTS,
                "too_many",
                &t.lang,
                Some(t.list),
            )
            .await;
    }
    let mut evidence = req.evidence(&t.claims.token_id);
    evidence.content_hash = Some(page_hash.to_owned());
    evidence.detail = Some("fresh confirmation mail requested from an expired link".into());
    let input = Input::PersonSignup {
        token: uuid::Uuid::new_v4().to_string(),
    };
    match engine
        .apply(&t.contact, t.list, input, EventSource::Web, evidence)
        .await
    {
        Ok(Applied::Changed(_)) => {
            st.notice(engine, StatusCode::OK, "resent", &t.lang, Some(t.list))
                .await
        }
        Ok(_) => {
            st.notice(engine, StatusCode::OK, "not_resent", &t.lang, Some(t.list))
                .await
        }
        Err(e) => {
            tracing::error!(contact_id = %t.contact.id, error = %e, "fresh signup could not be recorded");
            st.retry_later(engine, t).await
        }
    }
}
