//! A person: looked up by a `POST` of the address (never in a URL), the consent and history
//! as `contact show` prints them, the proof bundle (JSON or printable HTML) and erasure after
//! a confirmation step (the operator types the address again).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use optinsync_engine::email;
use optinsync_engine::export;
use optinsync_engine::ledger::EventSource;
use optinsync_engine::store::Contact;

use super::{Checked, Ctx, csrf_forms};
use crate::admin::timeline;

#[derive(Debug, serde::Deserialize)]
pub struct Lookup {
    csrf: String,
    email: String,
}

#[derive(Debug, serde::Deserialize)]
pub struct Erase {
    csrf: String,
    contact_id: String,
    /// The address typed again; absent on the first step (which asks for it).
    #[serde(default)]
    confirm: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Proof {
    csrf: String,
    contact_id: String,
    format: String,
}

csrf_forms!(Lookup, Erase, Proof);

fn render(cx: &Ctx, status: StatusCode, ctx: minijinja::Value) -> Response {
    cx.render("person.html", "person", status, ctx)
}

pub async fn search(cx: Ctx) -> Response {
    render(&cx, StatusCode::OK, minijinja::context! {})
}

pub async fn lookup(cx: Ctx, Checked(form): Checked<Lookup>) -> Response {
    let Ok(address) = email::normalise(&form.email) else {
        return render(
            &cx,
            StatusCode::BAD_REQUEST,
            minijinja::context! { message => "That is not an email address." },
        );
    };
    match cx.engine.reads().contact_by_email(&address).await {
        Ok(Some(contact)) => show(&cx, &contact, None).await,
        Ok(None) => render(
            &cx,
            StatusCode::NOT_FOUND,
            minijinja::context! { message => "No contact has this address." },
        ),
        Err(e) => {
            tracing::error!(error = %e, "console: contact lookup failed");
            cx.unavailable("Reading the store")
        }
    }
}

/// The person page of `contact`; `notice` says what an action just did.
async fn show(cx: &Ctx, contact: &Contact, notice: Option<String>) -> Response {
    let read = async {
        let consents = cx.engine.reads().consents_of_contact(&contact.id).await?;
        let events = cx.engine.reads().events_of_contact(&contact.id).await?;
        Ok::<_, optinsync_engine::store::StoreError>((consents, events))
    };
    let (consents, events) = match read.await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(contact_id = %contact.id, error = %e, "console: reading the contact failed");
            return cx.unavailable("Reading the store");
        }
    };
    let consents: Vec<_> = consents
        .iter()
        .map(|(list, c)| {
            minijinja::context! {
                list => list, state => c.state.as_str(),
                since => c.since.to_rfc3339(),
                confirmed_at => c.confirmed_at.map(|t| t.to_rfc3339()),
            }
        })
        .collect();
    render(
        cx,
        StatusCode::OK,
        minijinja::context! {
            contact => minijinja::context! {
                id => contact.id, email => contact.email, erased => contact.erased,
                language => contact.language,
                crm_records => contact.crm_records.iter().map(ToString::to_string).collect::<Vec<_>>(),
            },
            consents => consents,
            timeline => timeline(&events),
            notice => notice,
        },
    )
}

async fn contact_by_id(cx: &Ctx, id: &str) -> Result<Contact, Response> {
    match cx.engine.reads().contact_by_id(id).await {
        Ok(Some(c)) => Ok(c),
        Ok(None) => Err((StatusCode::NOT_FOUND, "no such contact\n").into_response()),
        Err(e) => {
            tracing::error!(error = %e, "console: reading the contact failed");
            Err(cx.unavailable("Reading the store"))
        }
    }
}

pub async fn erase(cx: Ctx, Checked(form): Checked<Erase>) -> Response {
    let contact = match contact_by_id(&cx, &form.contact_id).await {
        Ok(c) => c,
        Err(answer) => return answer,
    };
    let typed = form
        .confirm
        .as_deref()
        .map(|t| email::normalise(t).unwrap_or_default());
    if contact.erased || typed.as_deref() != Some(contact.email.as_str()) {
        // The confirmation step: nothing changes until the address is typed again.
        return render(
            &cx,
            if typed.is_some() {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::OK
            },
            minijinja::context! {
                confirm_erase => minijinja::context! { id => contact.id, email => contact.email, erased => contact.erased },
                message => typed.is_some().then_some("The address typed does not match; nothing was erased."),
            },
        );
    }
    match cx
        .engine
        .erase_as(
            &contact,
            EventSource::Admin,
            "erasure requested (GDPR Art. 17) through the operator console",
        )
        .await
    {
        Ok(report) => {
            tracing::info!(contact_id = %contact.id, "console: contact erased");
            cx.engine.outbox_wake().wake_all();
            let erased = match contact_by_id(&cx, &contact.id).await {
                Ok(c) => c,
                Err(answer) => return answer,
            };
            let notice = format!(
                "Erased: withdrawn and suppressed on {} list(s), evidence removed from {} ledger event(s); removals and CRM opt-outs are queued with legal priority.",
                report.lists, report.store.redacted_events
            );
            show(&cx, &erased, Some(notice)).await
        }
        Err(e) => {
            tracing::error!(contact_id = %contact.id, error = %e, "console: erasure failed");
            cx.unavailable("The erasure")
        }
    }
}

pub async fn proof(cx: Ctx, Checked(form): Checked<Proof>) -> Response {
    let contact = match contact_by_id(&cx, &form.contact_id).await {
        Ok(c) => c,
        Err(answer) => return answer,
    };
    let bundle = match cx.engine.proof_bundle(&contact).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(contact_id = %contact.id, error = %e, "console: proof bundle failed");
            return cx.unavailable("Building the proof bundle");
        }
    };
    let (body, content_type, ext) = if form.format == "html" {
        match export::proof_html(&bundle) {
            Ok(h) => (h, "text/html; charset=utf-8", "html"),
            Err(e) => {
                tracing::error!(error = %e, "console: proof HTML failed");
                return cx.unavailable("Rendering the proof");
            }
        }
    } else {
        (
            serde_json::to_string_pretty(&bundle).unwrap_or_default(),
            "application/json",
            "json",
        )
    };
    let mut resp = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    // The file name carries the contact id, never the address.
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"proof-{}.{ext}\"",
        contact
            .id
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
    )) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}
