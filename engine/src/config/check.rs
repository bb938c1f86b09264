//! Validation of `config.toml`, one function per section: each resolves `${VAR}` values and
//! relative paths and refuses what is invalid, naming the key. Checks that span sections
//! come last.

use std::collections::BTreeSet;
use std::path::Path;

use super::{
    AdminConfig, Config, ConfigError, ConnectorsConfig, ConsoleConfig, DEMO_TOKEN_SECRET,
    ListConfig, RulesConfig, SenderConfig, ServerConfig, SignupConfig, StoreConfig,
    TemplatesConfig, TokenConfig, is_loopback_host, url_host,
};
use crate::templates::Templates;

/// Where the file being checked is: for error messages and relative paths.
pub(super) struct Place<'a> {
    pub path: &'a Path,
    pub base_dir: &'a Path,
}

impl Place<'_> {
    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn env(&self, value: &str, key: &str) -> Result<String, ConfigError> {
        resolve_env(value, key, self.path)
    }
}

/// `[store]`: a relative SQLite path is relative to the config file.
pub(super) fn store(store: &mut StoreConfig, at: &Place) -> Result<(), ConfigError> {
    store.url = at.env(&store.url, "store.url")?;
    if let Some(rel) = store.url.strip_prefix("sqlite://")
        && !Path::new(rel).is_absolute()
        && rel != ":memory:"
    {
        store.url = format!("sqlite://{}", at.base_dir.join(rel).display());
    }
    Ok(())
}

/// `[tokens]`: secrets of 32+ characters.
pub(super) fn tokens(tokens: &mut TokenConfig, at: &Place) -> Result<(), ConfigError> {
    tokens.secret = at.env(&tokens.secret, "tokens.secret")?;
    if tokens.secret.len() < 32 {
        return Err(at.invalid("tokens.secret", "must be at least 32 characters"));
    }
    for (i, k) in tokens.previous.iter_mut().enumerate() {
        k.secret = at.env(&k.secret, &format!("tokens.previous[{i}].secret"))?;
    }
    Ok(())
}

/// `[admin]`: the token, when set, of 32+ characters.
pub(super) fn admin(admin: &mut AdminConfig, at: &Place) -> Result<(), ConfigError> {
    if let Some(token) = admin.token.as_mut() {
        *token = at.env(token, "admin.token")?;
        if token.len() < 32 {
            return Err(at.invalid("admin.token", "must be at least 32 characters"));
        }
    }
    Ok(())
}

/// `[console]`: someone must be able to log in: a password hash (Argon2, PHC string) or
/// the admin token.
pub(super) fn console(
    console: &mut Option<ConsoleConfig>,
    admin: &AdminConfig,
    at: &Place,
) -> Result<(), ConfigError> {
    let Some(console) = console.as_mut() else {
        return Ok(());
    };
    match console.password_hash.as_mut() {
        Some(hash) => {
            *hash = at.env(hash, "console.password_hash")?;
            if !hash.starts_with("$argon2") {
                return Err(at.invalid(
                    "console.password_hash",
                    "must be an Argon2 hash in PHC form ($argon2id$v=19$...)",
                ));
            }
        }
        None if admin.token.is_none() => {
            return Err(at.invalid(
                "console.password_hash",
                "the console needs a password_hash or an [admin] token to log in with",
            ));
        }
        None => {}
    }
    if console.session_ttl.0.as_secs() < 60 {
        return Err(at.invalid("console.session_ttl", "must be at least a minute"));
    }
    Ok(())
}

/// `[rules]`: the directory, relative to the config file.
pub(super) fn rules(rules: &mut RulesConfig, at: &Place) {
    if rules.dir.is_relative() {
        rules.dir = at.base_dir.join(&rules.dir);
    }
}

/// `[connectors.*]`: `${VAR}` anywhere in a connector's settings (the connector checks the rest).
pub(super) fn connectors(c: &mut ConnectorsConfig, at: &Place) -> Result<(), ConfigError> {
    for (name, section) in [
        ("crm", &mut c.crm),
        ("campaigns", &mut c.campaigns),
        ("mail", &mut c.mail),
    ] {
        resolve_env_table(
            &mut section.settings,
            &format!("connectors.{name}"),
            at.path,
        )?;
    }
    Ok(())
}

/// `[[lists]]`: at least one, ids unique and fit for links and the ledger.
pub(super) fn lists(lists: &[ListConfig], at: &Place) -> Result<(), ConfigError> {
    if lists.is_empty() {
        return Err(at.invalid("lists", "at least one [[lists]] entry is required"));
    }
    let mut seen = BTreeSet::new();
    for (i, list) in lists.iter().enumerate() {
        let valid = !list.id.is_empty()
            && list.id.len() <= 64
            && list
                .id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !valid {
            return Err(at.invalid(
                &format!("lists[{i}].id"),
                format!("`{}` must be 1-64 characters of a-z, 0-9, _ or -", list.id),
            ));
        }
        if !seen.insert(list.id.as_str()) {
            return Err(at.invalid(
                &format!("lists[{i}].id"),
                format!("list id `{}` is used twice", list.id),
            ));
        }
        if let Err((key, message)) = super::sending::check(&list.sending) {
            return Err(at.invalid(&format!("lists[{i}].sending.{key}"), message));
        }
    }
    Ok(())
}

/// `[server]`: an http(s) public URL, kept without a trailing slash.
pub(super) fn server(server: &mut ServerConfig, at: &Place) -> Result<(), ConfigError> {
    if !(server.public_url.starts_with("http://") || server.public_url.starts_with("https://")) {
        return Err(at.invalid("server.public_url", "must start with http:// or https://"));
    }
    server.public_url = server.public_url.trim_end_matches('/').to_owned();
    Ok(())
}

/// `[signup]`: allowed origins are `scheme://host[:port]`, kept lower case as browsers
/// send them; the limits are at least one.
pub(super) fn signup(signup: &mut SignupConfig, at: &Place) -> Result<(), ConfigError> {
    for (i, o) in signup.allowed_origins.iter_mut().enumerate() {
        let lower = o.trim().trim_end_matches('/').to_ascii_lowercase();
        let authority = lower
            .strip_prefix("https://")
            .or_else(|| lower.strip_prefix("http://"));
        if authority.is_none_or(|a| a.is_empty() || a.contains(['/', '?', '#', '*', ' '])) {
            return Err(at.invalid(
                &format!("signup.allowed_origins[{i}]"),
                format!("`{o}` must be an origin like https://www.example.org (no path)"),
            ));
        }
        *o = lower;
    }
    if signup.per_client_per_hour == 0 || signup.per_address_per_hour == 0 {
        return Err(at.invalid(
            "signup.per_client_per_hour",
            "signup limits must be at least 1 (per_client_per_hour, per_address_per_hour)",
        ));
    }
    Ok(())
}

/// `[sender]`: newsletters and confirmation mails from different senders.
pub(super) fn sender(sender: &SenderConfig, at: &Place) -> Result<(), ConfigError> {
    if sender
        .newsletter_from
        .as_deref()
        .is_some_and(|n| n.trim().eq_ignore_ascii_case(sender.from.trim()))
    {
        return Err(at.invalid(
            "sender.newsletter_from",
            "must differ from `sender.from`: confirmation mails need their own transactional sender",
        ));
    }
    Ok(())
}

/// `[templates]`: loaded and checked now, so a broken template never reaches a mail.
pub(super) fn templates(t: &mut TemplatesConfig, at: &Place) -> Result<Templates, ConfigError> {
    if let Some(dir) = t.dir.as_mut()
        && dir.is_relative()
    {
        *dir = at.base_dir.join(&*dir);
    }
    match &t.dir {
        Some(dir) => Templates::load(dir),
        None => Templates::builtin(),
    }
    .map_err(|e| at.invalid("templates.dir", e.to_string()))
}

/// The published demo secret signs links only for the local demo (links on a loopback host,
/// mail written as `.eml` files): anywhere else anyone with the repository could forge them.
/// Key ids must be unique, or a link's key id would not say which key signed it.
pub(super) fn demo_secret_and_key_ids(config: &Config, at: &Place) -> Result<(), ConfigError> {
    let t = &config.tokens;
    let demo = is_loopback_host(url_host(&config.server.public_url))
        && config.connectors.mail.kind == "eml";
    let published = std::iter::once(("tokens.secret".to_owned(), &t.secret)).chain(
        t.previous
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("tokens.previous[{i}].secret"), &k.secret)),
    );
    for (key, secret) in published {
        if secret == DEMO_TOKEN_SECRET && !demo {
            return Err(at.invalid(
                &key,
                "is the published demo value, which anyone can use to forge unsubscribe and \
                 confirmation links; it is accepted only for the local demo (server.public_url on \
                 a loopback host and connectors.mail kind = \"eml\"). Set your own random secret \
                 of 32+ characters, e.g. secret = \"${OPTINSYNC_TOKEN_SECRET}\" with the variable \
                 set from `openssl rand -hex 32`",
            ));
        }
    }
    let mut ids = BTreeSet::new();
    for (i, id) in std::iter::once(&t.key_id)
        .chain(t.previous.iter().map(|k| &k.key_id))
        .enumerate()
    {
        let key = if i == 0 {
            "tokens.key_id".to_owned()
        } else {
            format!("tokens.previous[{}].key_id", i - 1)
        };
        let valid = !id.is_empty()
            && id.len() <= 32
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(at.invalid(
                &key,
                format!("`{id}` must be 1-32 characters of A-Z, a-z, 0-9, _ or -"),
            ));
        }
        if !ids.insert(id.as_str()) {
            return Err(at.invalid(&key, format!("key id `{id}` is used twice")));
        }
    }
    Ok(())
}

/// `"${NAME}"` reads environment variable NAME; any other value is taken as written.
fn resolve_env(value: &str, key: &str, path: &Path) -> Result<String, ConfigError> {
    match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
        Some(var) => std::env::var(var).map_err(|_| ConfigError::MissingEnv {
            path: path.to_owned(),
            key: key.into(),
            var: var.into(),
        }),
        None => Ok(value.to_owned()),
    }
}

fn resolve_env_table(
    table: &mut toml::Table,
    prefix: &str,
    path: &Path,
) -> Result<(), ConfigError> {
    for (k, v) in table.iter_mut() {
        let key = format!("{prefix}.{k}");
        match v {
            toml::Value::String(s) => *s = resolve_env(s, &key, path)?,
            toml::Value::Table(t) => resolve_env_table(t, &key, path)?,
            _ => {}
        }
    }
    Ok(())
}
