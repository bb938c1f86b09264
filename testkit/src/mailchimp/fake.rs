//! The running fake: start and stop, seeding, inspection.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::DateTime;

use super::{
    Delivery, FakeList, Fault, MailchimpOptions, MailchimpState, MarketingPermission, Member,
    MergeField, RequestRecord, SeedMember, Shared, Status, Webhook, http, lock_state,
    subscriber_hash,
};

/// A running fake; stopped when dropped.
#[derive(Debug)]
pub struct FakeMailchimp {
    addr: SocketAddr,
    pub(super) state: Shared,
    pub(super) handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeMailchimp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl FakeMailchimp {
    /// Start with Mailchimp's real limits.
    pub fn start() -> FakeMailchimp {
        Self::start_with(MailchimpOptions::default())
    }

    /// Start on a free loopback port, on its own thread and runtime.
    pub fn start_with(options: MailchimpOptions) -> FakeMailchimp {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let state: Shared = Arc::new(Mutex::new(MailchimpState::new(options)));
        let server_state = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("fake-mailchimp".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("fake Mailchimp runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind the fake Mailchimp");
                    let addr = listener.local_addr().expect("fake Mailchimp address");
                    let _ = tx.send((addr, tokio::runtime::Handle::current()));
                    let app = http::router(server_state);
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stop_rx.await;
                        })
                        .await;
                });
            })
            .expect("spawn the fake Mailchimp thread");
        let (addr, handle) = rx.recv().expect("fake Mailchimp started");
        FakeMailchimp {
            addr,
            state,
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`: the base URL a connector takes as its override; the API is
    /// under `/3.0/`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/3.0`.
    pub fn api_root(&self) -> String {
        format!("{}/3.0", self.url())
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, MailchimpState> {
        lock_state(&self.state)
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut MailchimpState) -> R) -> R {
        f(&mut self.lock())
    }

    // ----- seeding ------------------------------------------------------------------------

    /// Create a list (no merge fields, no GDPR fields).
    pub fn add_list(&self, id: &str, name: &str) {
        let mut s = self.lock();
        let now = s.now();
        s.lists.insert(
            id.to_owned(),
            FakeList {
                id: id.to_owned(),
                name: name.to_owned(),
                web_id: MailchimpState::web_id(),
                double_optin: false,
                date_created: now,
                merge_fields: Vec::new(),
                permissions: Vec::new(),
                members: BTreeMap::new(),
                forgotten: BTreeSet::new(),
                confirmation_mails: Vec::new(),
                webhooks: Vec::new(),
            },
        );
    }

    fn list_mut<R>(&self, list: &str, f: impl FnOnce(&mut FakeList) -> R) -> R {
        let mut s = self.lock();
        let l = s
            .lists
            .get_mut(list)
            .unwrap_or_else(|| panic!("no list {list}"));
        f(l)
    }

    pub fn add_merge_field(&self, list: &str, mut field: MergeField) {
        self.list_mut(list, |l| {
            field.merge_id = l.merge_fields.len() as u32 + 1;
            l.merge_fields.push(field);
        });
    }

    /// Add a GDPR marketing permission (turns the list's `marketing_permissions` on).
    pub fn add_marketing_permission(&self, list: &str, id: &str, text: &str) {
        self.list_mut(list, |l| {
            l.permissions.push(MarketingPermission {
                id: id.to_owned(),
                text: text.to_owned(),
            })
        });
    }

    /// The list's `double_optin` flag. It governs Mailchimp's hosted signup forms only: over
    /// the API `pending` always sends the confirmation mail and `subscribed` never does,
    /// whatever the flag says.
    pub fn set_double_optin(&self, list: &str, on: bool) {
        self.list_mut(list, |l| l.double_optin = on);
    }

    /// Put a member on a list directly (as an import in Mailchimp's web app would).
    pub fn insert_member(&self, list: &str, seed: SeedMember) -> Member {
        let mut s = self.lock();
        let now = s.now();
        let seq = s.next_seq();
        let l = s
            .lists
            .get_mut(list)
            .unwrap_or_else(|| panic!("no list {list}"));
        let email = seed.email.trim().to_owned();
        let m = Member {
            id: subscriber_hash(&email),
            email_address: email,
            unique_email_id: MailchimpState::hex(10),
            contact_id: MailchimpState::hex(32),
            web_id: MailchimpState::web_id(),
            email_type: "html".into(),
            status: seed.status,
            archived_from: (seed.status == Status::Archived).then_some(Status::Subscribed),
            unsubscribed_by: seed.unsubscribed_by,
            unsubscribe_reason: String::new(),
            merge_fields: seed.merge_fields,
            language: String::new(),
            vip: false,
            marketing_permissions: l
                .permissions
                .iter()
                .map(|p| (p.id.clone(), false))
                .collect(),
            ip_signup: String::new(),
            timestamp_signup: String::new(),
            ip_opt: String::new(),
            timestamp_opt: String::new(),
            last_changed: seed
                .last_changed
                .and_then(|t| DateTime::from_timestamp(t.timestamp(), 0))
                .unwrap_or(now),
            source: "Import".into(),
            seq,
        };
        l.members.insert(m.id.clone(), m.clone());
        m
    }

    /// An address under compliance review: it can never be `subscribed` over the API.
    pub fn add_compliance_address(&self, email: &str) {
        self.lock().compliance.insert(email.trim().to_lowercase());
    }

    /// An address refused with "looks fake or invalid".
    pub fn add_fake_looking(&self, email: &str) {
        self.lock().fake_looking.insert(email.trim().to_lowercase());
    }

    pub fn add_api_key(&self, key: &str) {
        self.lock().api_keys.insert(key.to_owned());
    }

    /// Move the fake's clock (every timestamp it writes from now on).
    pub fn advance_clock(&self, by: Duration) {
        let mut s = self.lock();
        s.clock_offset += chrono::Duration::from_std(by).unwrap_or_default();
    }

    pub fn fail_next(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    // ----- inspection ---------------------------------------------------------------------

    pub fn member(&self, list: &str, email: &str) -> Option<Member> {
        self.lock()
            .lists
            .get(list)?
            .members
            .get(&subscriber_hash(email))
            .cloned()
    }

    /// Members in creation order.
    pub fn members(&self, list: &str) -> Vec<Member> {
        let mut v: Vec<Member> = self
            .lock()
            .lists
            .get(list)
            .map(|l| l.members.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by_key(|m| m.seq);
        v
    }

    /// Whether the address was permanently deleted from the list.
    pub fn is_forgotten(&self, list: &str, email: &str) -> bool {
        self.lock()
            .lists
            .get(list)
            .is_some_and(|l| l.forgotten.contains(&subscriber_hash(email)))
    }

    /// Addresses Mailchimp sent its confirmation mail to on `list`, one entry per mail.
    pub fn confirmation_mails(&self, list: &str) -> Vec<String> {
        self.lock()
            .lists
            .get(list)
            .map(|l| l.confirmation_mails.clone())
            .unwrap_or_default()
    }

    pub fn webhooks(&self, list: &str) -> Vec<Webhook> {
        self.lock()
            .lists
            .get(list)
            .map(|l| l.webhooks.clone())
            .unwrap_or_default()
    }

    /// Calls answered by `endpoint`, a label such as `PUT /lists/{list_id}/members/{subscriber_hash}`
    /// (see [`RequestRecord::endpoint`]), refused ones included.
    pub fn calls(&self, endpoint: &str) -> usize {
        self.lock()
            .log
            .iter()
            .filter(|r| r.endpoint == endpoint)
            .count()
    }

    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.lock().log.clone()
    }

    /// The most requests one credential ever had in flight at once.
    pub fn peak_concurrency(&self) -> usize {
        self.lock().peak_concurrency
    }

    /// Requests refused with 429 by the concurrency gate.
    pub fn refused_concurrency(&self) -> u64 {
        self.lock().refused_concurrency
    }

    /// Every webhook delivery attempt so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.lock().deliveries.clone()
    }

    /// URLs GET to validate webhooks, with what they answered.
    pub fn validations(&self) -> Vec<(String, Option<u16>)> {
        self.lock().validations.clone()
    }
}
