//! What can go wrong: [`ConnectorError`] for calls (it tells the engine what to do with the
//! work), [`SettingsError`] for a connector's settings at construction.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a temporary failure is about, so the engine can tell one bad record from a dead
/// service: only [`FailureScope::Service`] failures count against a connector's circuit
/// breaker; a [`FailureScope::Record`] failure retries that record alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureScope {
    /// The connection or the service as a whole: a timeout, a refused or broken connection,
    /// an HTTP 5xx or 429, a quota lock-out, an authentication problem. Other calls would
    /// most likely fail the same way. The default, so an unclassified failure stays cautious.
    #[default]
    Service,
    /// This one record only (this address, this list): the service answered, so it is
    /// alive, but not yet with what this record needs. Must never pause other records.
    Record,
}

/// Errors a connector reports. The variant tells the engine what to do with the work item.
///
/// `serde` as `{"kind": "transient", "message": ..., "retry_after_ms": ..., "scope": ...}`
/// (and `permanent`, `rejected`, `config`, `invalid_input`), so a connector outside the
/// process could report one; the wait is in whole milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ConnectorError {
    /// Try again later (network, 429, 5xx, or a "retry later" about one record).
    /// `retry_after` when the server said so; `scope` says whether the failure concerns the
    /// whole service or only this record.
    #[error("temporary failure: {message}")]
    Transient {
        message: String,
        #[serde(
            rename = "retry_after_ms",
            default,
            with = "millis",
            skip_serializing_if = "Option::is_none"
        )]
        retry_after: Option<Duration>,
        #[serde(default)]
        scope: FailureScope,
    },
    /// Will never succeed as asked (e.g. invalid address); goes to the dead letters.
    #[error("permanent failure: {message}")]
    Permanent { message: String },
    /// The receiving side refused the message for this address: `class` says whether for
    /// good (a hard bounce, the default), for now (a soft bounce: mailbox full) or because of
    /// the sender (a policy refusal: spam block, reputation). `message` is the reply text,
    /// kept as evidence.
    #[error("address rejected ({class}): {message}")]
    Rejected {
        message: String,
        /// Left out on the wire when hard: the form every rejection had before classes.
        #[serde(default, skip_serializing_if = "BounceClass::is_hard")]
        class: BounceClass,
    },
    /// The connector is misconfigured; names the setting to fix.
    #[error("configuration error in `{setting}`: {message}")]
    Config { setting: String, message: String },
    /// A webhook or record that is not acceptable input.
    #[error("invalid input: {message}")]
    InvalidInput { message: String },
}

/// Why a receiving side refused a message, as a bounce is classed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BounceClass {
    /// The address does not exist or never will take mail (SMTP 5.1.x): the person is
    /// suppressed at once.
    #[default]
    Hard,
    /// The mailbox cannot take mail now (full, over quota, temporarily disabled): counted
    /// against a soft-bounce threshold over time, never suppressed on the first.
    Soft,
    /// The receiving side refuses the *sender* (spam block, reputation, policy; SMTP 5.7.x):
    /// counts for a wave's stop rule and never suppresses the person.
    Policy,
}

impl BounceClass {
    pub const ALL: [BounceClass; 3] = [Self::Hard, Self::Soft, Self::Policy];

    pub fn is_hard(&self) -> bool {
        *self == Self::Hard
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hard => "hard",
            Self::Soft => "soft",
            Self::Policy => "policy",
        }
    }
}

impl std::fmt::Display for BounceClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `Option<Duration>` as whole milliseconds on the wire.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

impl ConnectorError {
    /// A temporary failure of the service or the connection ([`FailureScope::Service`]).
    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient {
            message: message.into(),
            retry_after: None,
            scope: FailureScope::Service,
        }
    }
    /// A temporary failure of one record only ([`FailureScope::Record`]): retried with
    /// backoff, never counted against the connector's circuit breaker.
    pub fn record_transient(message: impl Into<String>) -> Self {
        Self::Transient {
            message: message.into(),
            retry_after: None,
            scope: FailureScope::Record,
        }
    }
    /// The scope of a temporary failure; `None` for every other error (those prove the
    /// service answered, or are not about it).
    pub fn transient_scope(&self) -> Option<FailureScope> {
        match self {
            Self::Transient { scope, .. } => Some(*scope),
            _ => None,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
        }
    }
    /// The address refused for good: a hard bounce.
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::bounced(BounceClass::Hard, message)
    }
    /// The message refused for this address, in `class`.
    pub fn bounced(class: BounceClass, message: impl Into<String>) -> Self {
        Self::Rejected {
            message: message.into(),
            class,
        }
    }
}

pub type ConnectorResult<T> = Result<T, ConnectorError>;

/// A connector's settings are not usable: the one error type every connector reports at
/// construction, naming the key so the config loader can point at its line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{}", match key { Some(k) => format!("setting `{k}`: {message}"), None => message.clone() })]
pub struct SettingsError {
    /// The offending key, dotted for nested tables (`lists.news.id`); `None` when the problem
    /// is not about one key.
    pub key: Option<String>,
    pub message: String,
}

impl SettingsError {
    /// A setting has an acceptable type but an unusable value.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: Some(key.into()),
            message: message.into(),
        }
    }

    /// A problem with the settings as a whole.
    pub fn general(message: impl Into<String>) -> Self {
        Self {
            key: None,
            message: message.into(),
        }
    }
}
