//! Mail and page templates (minijinja), per language, and the check that keeps confirmation
//! mails free of advertising.
//!
//! A template set is a directory with one sub-directory per language (`en/`, `es/`, ...), each
//! holding the files in [`REQUIRED_FILES`]: for each mail kind a subject line, a text body and
//! an HTML body, and the pages (`page.html` is their layout). The set shipped in the
//! repository's `templates/` directory is compiled into the binary and used when
//! `[templates] dir` is not set. `en` must exist: it is the last fallback language.
//!
//! Everything a person is shown is rendered here, and each rendering has a content hash: the
//! engine stores the rendering as a snapshot and puts the hash into the ledger.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::consent::MailKind;

/// Files every language directory must have.
pub const REQUIRED_FILES: &[&str] = &[
    "doi.subject.txt",
    "doi.txt",
    "doi.html",
    "reminder.subject.txt",
    "reminder.txt",
    "reminder.html",
    "revalidation.subject.txt",
    "revalidation.txt",
    "revalidation.html",
    "page.html",
    "confirm.html",
    "confirmed.html",
    "expired.html",
    "unsubscribe.html",
    "unsubscribed.html",
    "notice.html",
    "signup.html",
    "preferences.html",
    "preferences_link.subject.txt",
    "preferences_link.txt",
    "preferences_link.html",
    "preferences_request.html",
];

/// `notice.html` variants, each rendered by the start-up check.
pub const NOTICES: &[&str] = &[
    "invalid",
    "refused",
    "stale_page",
    "resent",
    "not_resent",
    "too_many",
    "retry",
    "cross_site",
    "unsubscribe_invalid",
    "already_confirmed",
    "too_large",
    "signup_received",
    "signup_invalid",
    "signup_cross_site",
    "preferences_link_sent",
];

macro_rules! builtin {
    ($($lang:literal),*) => {
        &[$(
            ($lang, &[
                ("doi.subject.txt", include_str!(concat!("../../templates/", $lang, "/doi.subject.txt"))),
                ("doi.txt", include_str!(concat!("../../templates/", $lang, "/doi.txt"))),
                ("doi.html", include_str!(concat!("../../templates/", $lang, "/doi.html"))),
                ("reminder.subject.txt", include_str!(concat!("../../templates/", $lang, "/reminder.subject.txt"))),
                ("reminder.txt", include_str!(concat!("../../templates/", $lang, "/reminder.txt"))),
                ("reminder.html", include_str!(concat!("../../templates/", $lang, "/reminder.html"))),
                ("revalidation.subject.txt", include_str!(concat!("../../templates/", $lang, "/revalidation.subject.txt"))),
                ("revalidation.txt", include_str!(concat!("../../templates/", $lang, "/revalidation.txt"))),
                ("revalidation.html", include_str!(concat!("../../templates/", $lang, "/revalidation.html"))),
                ("page.html", include_str!(concat!("../../templates/", $lang, "/page.html"))),
                ("confirm.html", include_str!(concat!("../../templates/", $lang, "/confirm.html"))),
                ("confirmed.html", include_str!(concat!("../../templates/", $lang, "/confirmed.html"))),
                ("expired.html", include_str!(concat!("../../templates/", $lang, "/expired.html"))),
                ("unsubscribe.html", include_str!(concat!("../../templates/", $lang, "/unsubscribe.html"))),
                ("unsubscribed.html", include_str!(concat!("../../templates/", $lang, "/unsubscribed.html"))),
                ("notice.html", include_str!(concat!("../../templates/", $lang, "/notice.html"))),
                ("signup.html", include_str!(concat!("../../templates/", $lang, "/signup.html"))),
                ("preferences.html", include_str!(concat!("../../templates/", $lang, "/preferences.html"))),
                ("preferences_link.subject.txt", include_str!(concat!("../../templates/", $lang, "/preferences_link.subject.txt"))),
                ("preferences_link.txt", include_str!(concat!("../../templates/", $lang, "/preferences_link.txt"))),
                ("preferences_link.html", include_str!(concat!("../../templates/", $lang, "/preferences_link.html"))),
                ("preferences_request.html", include_str!(concat!("../../templates/", $lang, "/preferences_request.html"))),
            ]),
        )*]
    };
}

/// The shipped templates, compiled in.
const BUILTIN: &[(&str, &[(&str, &str)])] = builtin!("en", "es");

/// A template set that cannot be used; names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct TemplateError {
    pub file: String,
    pub message: String,
}

fn terr(file: impl Into<String>, message: impl Into<String>) -> TemplateError {
    TemplateError {
        file: file.into(),
        message: message.into(),
    }
}

/// Who asks, for what: the values every mail and page may use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Common {
    pub organisation: String,
    pub postal_address: String,
    pub list_name: String,
    pub list_description: String,
    /// `[sender] unsubscribe_mailbox`, or empty: the way out offered when a link fails.
    pub unsubscribe_mailbox: String,
}

/// One rendered mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedMail {
    pub language: String,
    pub subject: String,
    pub text: String,
    pub html: String,
    /// SHA-256 over subject, text and HTML (length-prefixed).
    pub content_hash: String,
}

/// One list as the preference centre shows it to a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListChoice {
    pub id: String,
    pub name: String,
    pub description: String,
    /// The consent state's name (`confirmed`, `pending`, ...).
    pub state: String,
    /// Receiving it (or waiting to confirm): the page offers "leave".
    pub on: bool,
    /// Not receiving it and allowed to join from the page: the page offers "join".
    pub can_join: bool,
}

/// One rendered page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedPage {
    pub language: String,
    pub html: String,
    /// Hash of the page as recorded: rendered with the per-request fields (nonce) left empty,
    /// so every person who saw the same text gets the same hash.
    pub content_hash: String,
    /// The page without per-request fields, as stored in the snapshot.
    pub snapshot: String,
}

/// The pages the HTTP server shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Page {
    Confirm,
    Confirmed,
    Expired,
    Unsubscribe,
    Unsubscribed,
    /// The hosted signup form of a list (`GET /signup/{list}`).
    Signup,
    /// The preference centre (`/preferences/{token}`): every list with the person's state.
    Preferences,
    /// "Send me a link" to the preference centre (`GET /preferences`).
    PreferencesRequest,
    Notice(&'static str),
}

impl Page {
    fn file(self) -> &'static str {
        match self {
            Self::Confirm => "confirm.html",
            Self::Confirmed => "confirmed.html",
            Self::Expired => "expired.html",
            Self::Unsubscribe => "unsubscribe.html",
            Self::Unsubscribed => "unsubscribed.html",
            Self::Signup => "signup.html",
            Self::Preferences => "preferences.html",
            Self::PreferencesRequest => "preferences_request.html",
            Self::Notice(_) => "notice.html",
        }
    }

    /// Snapshot kind, e.g. `page:confirm`, `page:notice:invalid`.
    pub fn kind(self) -> String {
        match self {
            Self::Notice(n) => format!("page:notice:{n}"),
            other => format!("page:{}", other.file().trim_end_matches(".html")),
        }
    }
}

/// A loaded, checked template set.
pub struct Templates {
    env: Environment<'static>,
    languages: Vec<String>,
    /// SHA-256 over every file name and content: the template set's version.
    version: String,
    origin: String,
    /// Pages rendered before, by a hash of (page, language, common values). A page without
    /// the person's lists is the same for everyone who sees it but for its nonce, so it is
    /// rendered (twice: snapshot and served form) once per set, not per request.
    pages: Mutex<HashMap<u64, Arc<CachedPage>>>,
}

/// Cached pages at most; past it the cache starts again (a set has some dozens of pages per
/// language and list).
const PAGE_CACHE_MAX: usize = 1_000;

/// Stands for the nonce when a page is rendered for the cache: escaping leaves it as it is
/// (ASCII letters, digits and `-`), and a page whose text holds it anyway is not cached.
const NONCE_SLOT: &str = "optinsync-nonce-slot-8c1f0e5b27d94a36";

/// A page rendered for the cache: its snapshot and hash, and the served HTML cut where the
/// nonce goes (`None`: the template does more with the nonce than print it, so each request
/// renders it).
#[derive(Debug)]
struct CachedPage {
    key: (Page, String, Common),
    snapshot: String,
    content_hash: String,
    served: Option<Vec<String>>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates")
            .field("origin", &self.origin)
            .field("languages", &self.languages)
            .field("version", &self.version)
            .finish()
    }
}

fn valid_language(tag: &str) -> bool {
    let mut parts = tag.split('-');
    let primary = parts.next().unwrap_or("");
    (2..=3).contains(&primary.len())
        && primary.chars().all(|c| c.is_ascii_lowercase())
        && parts.all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()))
}

impl Templates {
    /// The set compiled into the binary (the repository's `templates/`).
    pub fn builtin() -> Result<Self, TemplateError> {
        let mut files = BTreeMap::new();
        for (lang, list) in BUILTIN {
            for (name, src) in *list {
                files.insert(format!("{lang}/{name}"), (*src).to_owned());
            }
        }
        Self::from_files(files, "built-in templates".into())
    }

    /// Load every language directory under `dir`.
    pub fn load(dir: &Path) -> Result<Self, TemplateError> {
        let shown = dir.display().to_string();
        let entries =
            std::fs::read_dir(dir).map_err(|e| terr(&shown, format!("cannot read: {e}")))?;
        let mut files = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| terr(&shown, e.to_string()))?;
            let lang = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().is_dir() || lang.starts_with('.') {
                continue;
            }
            if !valid_language(&lang) {
                return Err(terr(
                    entry.path().display().to_string(),
                    "directory name is not a language tag like `en` or `pt-br`",
                ));
            }
            let sub = std::fs::read_dir(entry.path())
                .map_err(|e| terr(entry.path().display().to_string(), e.to_string()))?;
            for f in sub {
                let f = f.map_err(|e| terr(entry.path().display().to_string(), e.to_string()))?;
                let name = f.file_name().to_string_lossy().into_owned();
                let path: PathBuf = f.path();
                if !(name.ends_with(".txt") || name.ends_with(".html")) || !path.is_file() {
                    continue;
                }
                let src = std::fs::read_to_string(&path)
                    .map_err(|e| terr(path.display().to_string(), e.to_string()))?;
                files.insert(format!("{lang}/{name}"), src);
            }
        }
        Self::from_files(files, shown)
    }

    fn from_files(files: BTreeMap<String, String>, origin: String) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // HTML-escape like `mail::html_escape`: minijinja's own escaper also turns `/` into
        // `&#x2f;`, which mangles the links in mails.
        env.set_formatter(|out, state, value| {
            if state.auto_escape() == AutoEscape::Html && !value.is_safe() && !value.is_none() {
                out.write_str(&html_escape(&value.to_string()))
                    .map_err(minijinja::Error::from)
            } else {
                minijinja::escape_formatter(out, state, value)
            }
        });
        let mut hasher = Sha256::new();
        let mut languages: Vec<String> = Vec::new();
        for (name, src) in &files {
            hasher.update((name.len() as u64).to_be_bytes());
            hasher.update(name.as_bytes());
            hasher.update((src.len() as u64).to_be_bytes());
            hasher.update(src.as_bytes());
            if let Some((lang, _)) = name.split_once('/')
                && !languages.iter().any(|l| l == lang)
            {
                languages.push(lang.to_owned());
            }
            env.add_template_owned(name.clone(), src.clone())
                .map_err(|e| terr(format!("{origin}: {name}"), e.to_string()))?;
        }
        if !languages.iter().any(|l| l == "en") {
            return Err(terr(
                origin,
                "an `en` directory is required (fallback language)",
            ));
        }
        for lang in &languages {
            for f in REQUIRED_FILES {
                if !files.contains_key(&format!("{lang}/{f}")) {
                    return Err(terr(format!("{origin}: {lang}/{f}"), "missing"));
                }
            }
        }
        let t = Self {
            env,
            languages,
            version: hex::encode(hasher.finalize()),
            origin,
            pages: Mutex::new(HashMap::new()),
        };
        t.check()?;
        Ok(t)
    }

    pub fn languages(&self) -> &[String] {
        &self.languages
    }

    /// SHA-256 of the whole set.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The language to use: the contact's (`es-ES` falls back to `es`), else the list's
    /// default, else `en`.
    pub fn language_for(&self, contact: Option<&str>, list_default: &str) -> String {
        let has = |l: &str| self.languages.iter().any(|x| x == l);
        for cand in contact.into_iter().chain(std::iter::once(list_default)) {
            let tag = cand.trim().to_ascii_lowercase().replace('_', "-");
            if has(&tag) {
                return tag;
            }
            if let Some(primary) = tag.split('-').next()
                && has(primary)
            {
                return primary.to_owned();
            }
        }
        "en".into()
    }

    fn render(&self, lang: &str, file: &str, ctx: &Value) -> Result<String, TemplateError> {
        let name = format!("{lang}/{file}");
        let t = self
            .env
            .get_template(&name)
            .map_err(|e| terr(&name, e.to_string()))?;
        t.render(ctx).map_err(|e| terr(&name, e.to_string()))
    }

    /// Render a confirmation mail (`lang` as chosen by [`Templates::language_for`]).
    pub fn render_mail(
        &self,
        kind: MailKind,
        lang: &str,
        common: &Common,
        confirm_url: &str,
        unsubscribe_url: &str,
        preferences_url: &str,
    ) -> Result<RenderedMail, TemplateError> {
        let ctx = minijinja::context! {
            lang => lang,
            confirm_url => confirm_url,
            unsubscribe_url => unsubscribe_url,
            preferences_url => preferences_url,
            ..Value::from_serialize(common)
        };
        self.render_mail_files(kind.as_str(), lang, &ctx)
    }

    /// The mail with a preference-centre link a person asked for (`GET /preferences`).
    pub fn render_preferences_link(
        &self,
        lang: &str,
        common: &Common,
        preferences_url: &str,
    ) -> Result<RenderedMail, TemplateError> {
        let ctx = minijinja::context! {
            lang => lang,
            preferences_url => preferences_url,
            ..Value::from_serialize(common)
        };
        self.render_mail_files("preferences_link", lang, &ctx)
    }

    /// Subject, text and HTML of the mail whose files start with `k`.
    fn render_mail_files(
        &self,
        k: &str,
        lang: &str,
        ctx: &Value,
    ) -> Result<RenderedMail, TemplateError> {
        let subject = self
            .render(lang, &format!("{k}.subject.txt"), ctx)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let text = self.render(lang, &format!("{k}.txt"), ctx)? + "\n";
        let html = self.render(lang, &format!("{k}.html"), ctx)? + "\n";
        let content_hash = content_hash(&[&subject, &text, &html]);
        Ok(RenderedMail {
            language: lang.to_owned(),
            subject,
            text,
            html,
            content_hash,
        })
    }

    /// Render a page. `nonce` is the per-request form field; the recorded hash is of the page
    /// rendered without it, and the served page carries that hash in its `page` form field.
    pub fn render_page(
        &self,
        page: Page,
        lang: &str,
        common: &Common,
        nonce: impl Fn(&str) -> String,
    ) -> Result<RenderedPage, TemplateError> {
        self.render_page_of(page, lang, common, &[], nonce)
    }

    /// [`Templates::render_page`] with the person's lists (the preference centre).
    pub fn render_page_of(
        &self,
        page: Page,
        lang: &str,
        common: &Common,
        lists: &[ListChoice],
        nonce: impl Fn(&str) -> String,
    ) -> Result<RenderedPage, TemplateError> {
        if !lists.is_empty() {
            // The person's own lists: rendered for them alone.
            return self.render_page_uncached(page, lang, common, lists, nonce);
        }
        let cached = self.cached_page(page, lang, common, &nonce)?;
        let Some(served) = &cached.served else {
            return self.render_page_uncached(page, lang, common, lists, nonce);
        };
        Ok(RenderedPage {
            language: lang.to_owned(),
            html: served.join(&nonce(&cached.content_hash)),
            content_hash: cached.content_hash.clone(),
            snapshot: cached.snapshot.clone(),
        })
    }

    /// The cache's entry for (`page`, `lang`, `common`), rendered now if it has none.
    fn cached_page(
        &self,
        page: Page,
        lang: &str,
        common: &Common,
        nonce: &impl Fn(&str) -> String,
    ) -> Result<Arc<CachedPage>, TemplateError> {
        let mut h = DefaultHasher::new();
        (page, lang, common).hash(&mut h);
        let slot = h.finish();
        let is_key = |c: &CachedPage| c.key.0 == page && c.key.1 == lang && c.key.2 == *common;
        let found = self
            .pages
            .lock()
            .ok()
            .and_then(|m| m.get(&slot).cloned())
            .filter(|c| is_key(c));
        if let Some(c) = found {
            return Ok(c);
        }
        let with_slot =
            self.render_page_uncached(page, lang, common, &[], |_| NONCE_SLOT.into())?;
        let served: Vec<String> = with_slot
            .html
            .split(NONCE_SLOT)
            .map(str::to_owned)
            .collect();
        // Cut only where the template printed the nonce as it is: checked against the page
        // rendered with a real nonce, and never if the page's own text holds the slot.
        let real = self.render_page_uncached(page, lang, common, &[], nonce)?;
        let exact = !with_slot.snapshot.contains(NONCE_SLOT)
            && served.join(&nonce(&real.content_hash)) == real.html;
        let c = Arc::new(CachedPage {
            key: (page, lang.to_owned(), common.clone()),
            snapshot: real.snapshot,
            content_hash: real.content_hash,
            served: exact.then_some(served),
        });
        if let Ok(mut m) = self.pages.lock() {
            if m.len() >= PAGE_CACHE_MAX {
                m.clear();
            }
            // A colliding slot keeps its first page; the other renders per request.
            m.entry(slot).or_insert_with(|| Arc::clone(&c));
        }
        Ok(c)
    }

    /// Render a page from its template: once without the per-request fields (the snapshot
    /// and its hash), once with them.
    fn render_page_uncached(
        &self,
        page: Page,
        lang: &str,
        common: &Common,
        lists: &[ListChoice],
        nonce: impl Fn(&str) -> String,
    ) -> Result<RenderedPage, TemplateError> {
        let notice = match page {
            Page::Notice(n) => n,
            _ => "",
        };
        let ctx = |nonce: &str, page_hash: &str| {
            minijinja::context! {
                lang => lang,
                notice => notice,
                nonce => nonce,
                page_hash => page_hash,
                lists => Value::from_serialize(lists),
                ..Value::from_serialize(common)
            }
        };
        let snapshot = self.render(lang, page.file(), &ctx("", ""))? + "\n";
        let content_hash = content_hash(&[&snapshot]);
        let html = self.render(
            lang,
            page.file(),
            &ctx(&nonce(&content_hash), &content_hash),
        )? + "\n";
        Ok(RenderedPage {
            language: lang.to_owned(),
            html,
            content_hash,
            snapshot,
        })
    }

    /// Render everything once with sample values, and refuse confirmation mails that
    /// advertise or track (see [`check_confirmation_mail`]).
    pub fn check(&self) -> Result<(), TemplateError> {
        let common = Common {
            organisation: "Sample Organisation".into(),
            postal_address: "1 Sample Street".into(),
            list_name: "Sample list".into(),
            list_description: "Sample description.".into(),
            unsubscribe_mailbox: "unsubscribe@optinsync.invalid".into(),
        };
        let confirm = "https://optinsync.invalid/confirm/CHECK.TOKEN";
        let unsub = "https://optinsync.invalid/unsubscribe/CHECK.TOKEN";
        let prefs = "https://optinsync.invalid/preferences/CHECK.TOKEN";
        for lang in &self.languages {
            for kind in [MailKind::Doi, MailKind::Reminder, MailKind::Revalidation] {
                let m = self.render_mail(kind, lang, &common, confirm, unsub, prefs)?;
                let footer = [unsub, prefs];
                check_confirmation_mail(&m.html, &m.text, confirm, &footer).map_err(|e| {
                    terr(format!("{}: {lang}/{}.html", self.origin, kind.as_str()), e)
                })?;
                check_confirmation_mail("", &m.subject, confirm, &footer).map_err(|e| {
                    terr(
                        format!("{}: {lang}/{}.subject.txt", self.origin, kind.as_str()),
                        e,
                    )
                })?;
            }
            self.render_preferences_link(lang, &common, prefs)?;
            let pages = [
                Page::Confirm,
                Page::Confirmed,
                Page::Expired,
                Page::Unsubscribe,
                Page::Unsubscribed,
                Page::Signup,
                Page::Preferences,
                Page::PreferencesRequest,
            ]
            .into_iter()
            .chain(NOTICES.iter().map(|n| Page::Notice(n)));
            for p in pages {
                // Not through the cache: it is for the pages served.
                self.render_page_uncached(p, lang, &common, &[], |_| "NONCE".into())?;
            }
        }
        Ok(())
    }
}

/// Elements and attributes that load something or run something: images, tracking pixels,
/// frames, scripts, remote styles.
const FORBIDDEN: &[(&str, &str)] = &[
    ("<img", "an image (<img>)"),
    ("<picture", "an image (<picture>)"),
    ("<svg", "an image (<svg>)"),
    ("<iframe", "a frame"),
    ("<object", "an embedded object"),
    ("<embed", "an embedded object"),
    ("<video", "a video"),
    ("<audio", "audio"),
    ("<script", "a script"),
    ("<link", "an external resource (<link>)"),
    ("<form", "a form"),
    ("<input", "a form field"),
    ("background=", "a background image"),
    ("url(", "a CSS resource (url(...))"),
    ("@import", "a CSS import"),
    ("src=", "an external resource (src=)"),
];

fn attribute_values<'a>(html: &'a str, lower: &str, attr: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = lower[from..].find(attr) {
        let start = from + i + attr.len();
        let rest = &html[start..];
        let value = match rest.chars().next() {
            Some(q @ ('"' | '\'')) => rest[1..].split(q).next().unwrap_or(""),
            _ => rest
                .split(|c: char| c.is_whitespace() || c == '>')
                .next()
                .unwrap_or(""),
        };
        out.push(value);
        from = start;
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&amp;", "&")
        .replace("&#x2f;", "/")
        .replace("&#47;", "/")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
}

/// A confirmation mail says who asks, for what list, offers one confirm button and says
/// "ignore this if it was not you" — nothing else (LG Stendal 22 S 87/20, BGH VI ZR 134/15:
/// a DOI mail that advertises is itself unlawful advertising). Refuses images and tracking
/// pixels, anything loaded from elsewhere, and any link other than one confirm link and at
/// most one unsubscribe link in the footer.
pub fn check_confirmation_mail(
    html: &str,
    text: &str,
    confirm_url: &str,
    footer: &[&str],
) -> Result<(), String> {
    let lower = html.to_ascii_lowercase();
    for (needle, what) in FORBIDDEN {
        if lower.contains(needle) {
            return Err(format!(
                "contains {what}: a confirmation mail must carry no images, tracking or advertising"
            ));
        }
    }
    let mut confirm = 0;
    let mut unsub = 0;
    let mut seen = vec![0usize; footer.len()];
    for v in attribute_values(html, &lower, "href=") {
        let v = unescape(v);
        if v == confirm_url {
            confirm += 1;
        } else if let Some(i) = footer.iter().position(|f| *f == v) {
            seen[i] += 1;
            unsub += 1;
        } else {
            return Err(format!(
                "links to `{v}`: a confirmation mail may link only to the confirm page (and the unsubscribe and preferences pages in its footer)"
            ));
        }
    }
    let anchors = lower.matches("<a ").count() + lower.matches("<a\n").count();
    if !html.is_empty() && confirm != 1 {
        return Err(format!(
            "has {confirm} confirm links: it must have exactly one confirm button"
        ));
    }
    if seen.iter().any(|n| *n > 1) {
        return Err("has more than one unsubscribe (or preferences) link".into());
    }
    if anchors > confirm + unsub {
        return Err(
            "has a link (<a>) that is neither the confirm, unsubscribe nor preferences link".into(),
        );
    }
    // Bare addresses in the text (and in the HTML's text) are links too for mail clients.
    for body in [text, html] {
        let lower = body.to_ascii_lowercase();
        for scheme in ["http://", "https://", "www.", "mailto:", "ftp://"] {
            let mut from = 0;
            while let Some(i) = lower[from..].find(scheme) {
                let start = from + i;
                let url: String = body[start..]
                    .chars()
                    .take_while(|c| !c.is_whitespace() && !matches!(c, '"' | '\'' | '<' | '>'))
                    .collect();
                let url = unescape(&url);
                if url != confirm_url && !footer.contains(&url.as_str()) {
                    return Err(format!(
                        "mentions `{url}`: a confirmation mail may link only to the confirm page (and the unsubscribe page)"
                    ));
                }
                from = start + scheme.len();
            }
        }
    }
    Ok(())
}

/// SHA-256 over length-prefixed parts: the hash a mail's or page's text is cited by in the
/// ledger (length prefixes, so moving text between parts changes it).
pub fn content_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

/// HTML-escape text for the mail and page templates.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const C: &str = "https://x.invalid/confirm/T";
    const U: &str = "https://x.invalid/unsubscribe/T";

    fn copy_builtin(dir: &Path) {
        for (lang, files) in BUILTIN {
            std::fs::create_dir_all(dir.join(lang)).unwrap();
            for (name, src) in *files {
                std::fs::write(dir.join(lang).join(name), src).unwrap();
            }
        }
    }

    #[test]
    fn builtin_set_loads_and_passes_the_check() {
        let t = Templates::builtin().unwrap();
        assert_eq!(t.languages(), ["en", "es"]);
        assert_eq!(t.language_for(Some("es-ES"), "en"), "es");
        assert_eq!(t.language_for(Some("de"), "es"), "es");
        assert_eq!(t.language_for(None, "fr"), "en");
    }

    #[test]
    fn mails_render_per_language_with_intact_links() {
        let t = Templates::builtin().unwrap();
        let common = Common {
            organisation: "Uni <Test>".into(),
            postal_address: "Street 1".into(),
            list_name: "News".into(),
            list_description: String::new(),
            ..Common::default()
        };
        let en = t
            .render_mail(MailKind::Doi, "en", &common, C, U, U)
            .unwrap();
        assert_eq!(en.subject, "Please confirm: News");
        assert!(en.html.contains(&format!("href=\"{C}\"")), "{}", en.html);
        assert!(en.html.contains("Uni &lt;Test&gt;"), "{}", en.html);
        assert!(en.text.contains("Uni <Test>") && en.text.contains(C));
        let es = t
            .render_mail(MailKind::Doi, "es", &common, C, U, U)
            .unwrap();
        assert!(es.subject.starts_with("Confirme"), "{}", es.subject);
        assert_ne!(en.content_hash, es.content_hash);
    }

    #[test]
    fn page_hash_ignores_the_nonce() {
        let t = Templates::builtin().unwrap();
        let common = Common::default();
        let a = t
            .render_page(Page::Confirm, "en", &common, |_| "n1".into())
            .unwrap();
        let b = t
            .render_page(Page::Confirm, "en", &common, |_| "n2".into())
            .unwrap();
        assert_eq!(a.content_hash, b.content_hash);
        assert_ne!(a.html, b.html);
        assert!(a.html.contains(&format!("value=\"{}\"", a.content_hash)));
        assert!(!a.html.contains("<script"));
    }

    #[test]
    fn check_refuses_images_and_second_links() {
        let ok = format!("<p><a href=\"{C}\">Confirm</a></p><p><a href=\"{U}\">Stop</a></p>");
        assert_eq!(check_confirmation_mail(&ok, C, C, &[U]), Ok(()));
        let img = format!("<img src=\"https://x.invalid/logo.png\">{ok}");
        assert!(
            check_confirmation_mail(&img, "", C, &[U])
                .unwrap_err()
                .contains("image")
        );
        let pixel = format!("{ok}<img width=1 height=1 src=\"https://t.invalid/p.gif\">");
        assert!(check_confirmation_mail(&pixel, "", C, &[U]).is_err());
        let second = format!("{ok}<a href=\"https://x.invalid/offers\">Our offers</a>");
        assert!(
            check_confirmation_mail(&second, "", C, &[U])
                .unwrap_err()
                .contains("offers")
        );
        let twice = format!("{ok}<a href=\"{C}\">Confirm again</a>");
        assert!(check_confirmation_mail(&twice, "", C, &[U]).is_err());
        let text_link = format!("Visit https://x.invalid/shop now\n{C}");
        assert!(check_confirmation_mail(&ok, &text_link, C, &[U]).is_err());
    }

    #[test]
    fn a_template_directory_with_an_image_or_extra_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        copy_builtin(dir.path());
        assert!(Templates::load(dir.path()).is_ok());

        let doi = dir.path().join("es/doi.html");
        let orig = std::fs::read_to_string(&doi).unwrap();
        std::fs::write(
            &doi,
            orig.replace(
                "<p>Hola:</p>",
                "<p><img src=\"https://example.org/logo.png\" alt=\"\"></p><p>Hola:</p>",
            ),
        )
        .unwrap();
        let e = Templates::load(dir.path()).unwrap_err();
        assert!(
            e.file.ends_with("es/doi.html") && e.message.contains("image"),
            "{e}"
        );

        std::fs::write(
            &doi,
            orig.replace(
                "<hr>",
                "<p><a href=\"https://example.org/masters\">Our masters</a></p><hr>",
            ),
        )
        .unwrap();
        let e = Templates::load(dir.path()).unwrap_err();
        assert!(e.message.contains("example.org/masters"), "{e}");
    }

    #[test]
    fn missing_files_and_bad_syntax_are_named() {
        let dir = tempfile::tempdir().unwrap();
        copy_builtin(dir.path());
        std::fs::remove_file(dir.path().join("en/expired.html")).unwrap();
        let e = Templates::load(dir.path()).unwrap_err();
        assert!(e.file.ends_with("en/expired.html"), "{e}");
        copy_builtin(dir.path());
        std::fs::write(dir.path().join("en/confirmed.html"), "{% if %}").unwrap();
        let e = Templates::load(dir.path()).unwrap_err();
        assert!(e.file.contains("en/confirmed.html"), "{e}");
    }

    /// Every page of the set, served from the cache, equals the page rendered from its
    /// template for the same nonce, and the cache renders each page once.
    #[test]
    fn cached_pages_equal_pages_rendered_afresh() {
        let t = Templates::builtin().unwrap();
        let common = Common {
            organisation: "Uni <Test> & Co".into(),
            list_name: "News".into(),
            ..Common::default()
        };
        let pages = [Page::Confirm, Page::Expired, Page::Signup, Page::Confirmed]
            .into_iter()
            .chain(NOTICES.iter().map(|n| Page::Notice(n)));
        for page in pages {
            for lang in ["en", "es"] {
                for k in 0..3 {
                    let nonce = |hash: &str| format!("{k}.{}", &hash[..8]);
                    let cached = t.render_page(page, lang, &common, nonce).unwrap();
                    let fresh = t
                        .render_page_uncached(page, lang, &common, &[], nonce)
                        .unwrap();
                    assert_eq!(cached, fresh, "{page:?} {lang} nonce {k}");
                }
            }
        }
        let cut = t.pages.lock().unwrap();
        assert_eq!(cut.len(), (4 + NOTICES.len()) * 2);
        assert!(cut.values().all(|c| c.served.is_some()));
        let confirm = cut.values().find(|c| c.key.0 == Page::Confirm).unwrap();
        assert!(
            confirm.served.as_ref().unwrap().len() >= 2,
            "the form's nonce is cut out"
        );
    }

    /// Another list (other common values) is another page; a template that does more with
    /// the nonce than print it, or whose text holds the slot, is rendered per request.
    #[test]
    fn pages_the_cache_cannot_cut_are_rendered_per_request() {
        let dir = tempfile::tempdir().unwrap();
        copy_builtin(dir.path());
        let confirm = dir.path().join("en/confirm.html");
        let orig = std::fs::read_to_string(&confirm).unwrap();
        std::fs::write(
            &confirm,
            orig.replace("value=\"{{ nonce }}\"", "value=\"{{ nonce|upper }}\""),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("en/confirmed.html"),
            format!("{{% extends \"en/page.html\" %}}{{% block body %}}<p>{NONCE_SLOT}</p>{{% endblock %}}"),
        )
        .unwrap();
        let t = Templates::load(dir.path()).unwrap();
        let a = Common {
            list_name: "A".into(),
            ..Common::default()
        };
        let b = Common {
            list_name: "B".into(),
            ..Common::default()
        };
        for k in 0..2 {
            let nonce = |_: &str| format!("{k}.abc_def-x");
            for page in [Page::Confirm, Page::Confirmed] {
                let cached = t.render_page(page, "en", &a, nonce).unwrap();
                let fresh = t.render_page_uncached(page, "en", &a, &[], nonce).unwrap();
                assert_eq!(cached, fresh, "{page:?} nonce {k}");
            }
            let page = t.render_page(Page::Confirm, "en", &a, nonce).unwrap();
            assert!(
                page.html.contains(&format!("{k}.ABC_DEF-X")),
                "{}",
                page.html
            );
            let other = t.render_page(Page::Expired, "en", &b, nonce).unwrap();
            let mine = t.render_page(Page::Expired, "en", &a, nonce).unwrap();
            assert_ne!(other.content_hash, mine.content_hash);
            assert!(other.html.contains(&format!("{k}.abc_def-x")));
        }
        let cut = t.pages.lock().unwrap();
        for page in [Page::Confirm, Page::Confirmed] {
            let c = cut.values().find(|c| c.key.0 == page).unwrap();
            assert!(c.served.is_none(), "{page:?} was cut");
        }
    }
}
