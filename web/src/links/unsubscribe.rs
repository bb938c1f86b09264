//! `/unsubscribe/{token}`: the page (`GET`) and the unsubscribe (`POST`, also RFC 8058
//! one-click), with the form decoding both need.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;

use optinsync_engine::consent::Input;
use optinsync_engine::engine::Engine;
use optinsync_engine::ledger::EventSource;
use optinsync_engine::templates::Page;
use optinsync_engine::tokens::Purpose;

use super::{ClientIp, LinkState, Req, resolve};

pub(super) async fn unsubscribe_get(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    method: Method,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Response {
    metrics::counter!("optinsync_link_fetches_total", "page" => "unsubscribe").increment(1);
    let req = Req::new(&ip, &method, &headers);
    let t = match resolve(&engine, &st, &req, &token, Purpose::Unsubscribe).await {
        Ok((t, _, _)) => t,
        Err(page) => return page,
    };
    let (resp, hash) = st
        .list_page(&engine, &t, StatusCode::OK, Page::Unsubscribe)
        .await;
    st.record_fetch(&engine, &t, &req, hash, "unsubscribe page fetched")
        .await;
    resp
}

/// Percent-decode one `application/x-www-form-urlencoded` component.
pub(super) fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                if let Some(v) = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    out.push(v);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Form fields of a POST body, urlencoded or multipart (RFC 8058 allows both).
pub fn form_fields(content_type: &str, body: &[u8]) -> HashMap<String, String> {
    let body = String::from_utf8_lossy(body);
    let ct = content_type.to_ascii_lowercase();
    let mut out = HashMap::new();
    if ct.starts_with("multipart/form-data") {
        let boundary = content_type
            .split(';')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
            .map(|(_, v)| v.trim().trim_matches('"').to_owned());
        let Some(boundary) = boundary else {
            return out;
        };
        for part in body.split(&format!("--{boundary}")).skip(1) {
            if part.starts_with("--") {
                break;
            }
            let part = part.trim_start_matches(['\r', '\n']);
            let Some((head, value)) = part
                .split_once("\r\n\r\n")
                .or_else(|| part.split_once("\n\n"))
            else {
                continue;
            };
            let name = head
                .split([';', '\r', '\n'])
                .filter_map(|p| p.trim().strip_prefix("name="))
                .next()
                .map(|n| n.trim_matches('"').to_owned());
            if let Some(name) = name {
                let value = value
                    .strip_suffix("\r\n")
                    .or_else(|| value.strip_suffix('\n'))
                    .unwrap_or(value);
                out.insert(name, value.to_owned());
            }
        }
    } else {
        for pair in body.trim().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.insert(form_decode(k), form_decode(v));
        }
    }
    out
}

pub(super) async fn unsubscribe_post(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    headers: HeaderMap,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    let req = Req::new(&ip, &Method::POST, &headers);
    let t = match resolve(&engine, &st, &req, &token, Purpose::Unsubscribe).await {
        Ok((t, _, _)) => t,
        Err(page) => return page,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let fields = form_fields(content_type, &body);
    let one_click = fields.get("List-Unsubscribe").map(String::as_str) == Some("One-Click");
    let mut evidence = req.evidence(&t.claims.token_id);
    evidence.content_hash = fields.get("page").filter(|p| !p.is_empty()).cloned();
    evidence.detail = Some(
        if one_click {
            "RFC 8058 one-click unsubscribe"
        } else {
            "unsubscribe page"
        }
        .into(),
    );
    let applied = engine
        .apply(
            &t.contact,
            t.list,
            Input::Unsubscribe,
            EventSource::Web,
            evidence,
        )
        .await;
    super::count_action("unsubscribe", &applied);
    match applied {
        // No redirect (RFC 8058 §3.2): the answer is the page itself.
        Ok(_) => {
            st.list_page(&engine, &t, StatusCode::OK, Page::Unsubscribed)
                .await
                .0
        }
        Err(e) => {
            tracing::error!(contact_id = %t.contact.id, error = %e, "unsubscribe could not be recorded");
            st.retry_later(&engine, &t).await
        }
    }
}
