//! The exec connector protocol, version 1 (`docs/connector-protocol.md`): the message
//! envelopes and the typed params and results of every method, as `serde` types.
//!
//! Types only, no I/O: the engine side (`optinsync-plugin-exec`) frames and transports them.
//! The payloads are the plugin API's own types wherever their JSON form is the wire form; only
//! the batch items (`{"key", "subscriber"}`, `{"key", "email"}`) and the per-item results have
//! wire types of their own here.
//!
//! Reading rules (the doc's): unknown fields are ignored everywhere, except in an ERROR object
//! ([`ConnectorError`] is read strictly); an answer line that is not an envelope, or whose
//! top-level `error` is not a strict ERROR, is a [`ProtocolError`]; a `result` of the wrong
//! shape is only that call's failure.

use std::fmt;
use std::num::NonZeroUsize;

use optinsync_plugin_api::{
    ConnectorError, ConnectorResult, ConsentWriteBack, CrmRecord, Cursor, Keyed, OutgoingMessage,
    RecordRef, Role, Subscriber,
};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

pub use optinsync_plugin_api::{
    ChangePage, Health, MemberPage, SentMessage, StatusPage, WebhookEvent, WebhookRequest,
};

/// The protocol version this crate describes.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest line either side may send, in bytes (without the `\n`).
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// `hello` is always id 0, `configure` always id 1; calls count on from here.
pub const HELLO_ID: u64 = 0;
pub const CONFIGURE_ID: u64 = 1;
pub const FIRST_CALL_ID: u64 = 2;

/// Every method name of version 1 (`cancel` is the one notification).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Hello,
    Configure,
    Health,
    Maintain,
    ExportState,
    Webhook,
    Shutdown,
    Cancel,
    Changes,
    Fetch,
    WriteBack,
    Subscribe,
    Remove,
    StatusEvents,
    RequestDoi,
    ListMembers,
    Send,
    Forget,
}

impl Method {
    pub const ALL: [Method; 18] = [
        Self::Hello,
        Self::Configure,
        Self::Health,
        Self::Maintain,
        Self::ExportState,
        Self::Webhook,
        Self::Shutdown,
        Self::Cancel,
        Self::Changes,
        Self::Fetch,
        Self::WriteBack,
        Self::Subscribe,
        Self::Remove,
        Self::StatusEvents,
        Self::RequestDoi,
        Self::ListMembers,
        Self::Send,
        Self::Forget,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::Configure => "configure",
            Self::Health => "health",
            Self::Maintain => "maintain",
            Self::ExportState => "export_state",
            Self::Webhook => "webhook",
            Self::Shutdown => "shutdown",
            Self::Cancel => "cancel",
            Self::Changes => "changes",
            Self::Fetch => "fetch",
            Self::WriteBack => "write_back",
            Self::Subscribe => "subscribe",
            Self::Remove => "remove",
            Self::StatusEvents => "status_events",
            Self::RequestDoi => "request_doi",
            Self::ListMembers => "list_members",
            Self::Send => "send",
            Self::Forget => "forget",
        }
    }

    /// The capability a connector must declare before the engine calls this method.
    pub fn capability(self) -> Option<Capability> {
        match self {
            Self::Webhook => Some(Capability::Webhook),
            Self::ExportState => Some(Capability::State),
            Self::Maintain => Some(Capability::Maintain),
            Self::RequestDoi => Some(Capability::RequestDoi),
            Self::ListMembers => Some(Capability::ListMembers),
            _ => None,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Optional methods a connector declares in `hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Webhook,
    State,
    Maintain,
    RequestDoi,
    ListMembers,
}

impl Capability {
    pub fn from_name(name: &str) -> Option<Self> {
        Self::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name))
            .ok()
    }
}

/// Capability names this engine does not know are dropped (a newer connector may list more).
fn known_capabilities<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Capability>, D::Error> {
    Ok(Vec::<String>::deserialize(d)?
        .iter()
        .filter_map(|n| Capability::from_name(n))
        .collect())
}

/// Present-but-null stays `Some(None)`: in `configure`'s answer, null and absent differ.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

// ---------------------------------------------------------------------------------------------
// Envelopes.

/// Engine → connector: `{"id": N, "method": "NAME", "params": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request<P = Value> {
    pub id: u64,
    pub method: Method,
    pub params: P,
}

/// Engine → connector notification `{"method": "cancel", "params": {"id": N}}`: the engine gave
/// up on request `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancel {
    pub id: u64,
}

#[derive(Serialize, Deserialize)]
struct CancelWire {
    method: Method,
    params: CancelParams,
}

#[derive(Serialize, Deserialize)]
struct CancelParams {
    id: u64,
}

impl Serialize for Cancel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        CancelWire {
            method: Method::Cancel,
            params: CancelParams { id: self.id },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Cancel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = CancelWire::deserialize(d)?;
        if wire.method != Method::Cancel {
            return Err(D::Error::custom("not a cancel notification"));
        }
        Ok(Cancel { id: wire.params.id })
    }
}

/// Connector → engine: `{"id": N, "result": R}` or `{"id": N, "error": ERROR}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Response<R = Value> {
    pub id: u64,
    pub outcome: ConnectorResult<R>,
}

/// An answer line the engine cannot trust: the process is killed and restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtocolError {}

impl Response {
    /// Read one answer line (without its `\n`). Only the envelope and a top-level ERROR are
    /// checked here; the result's shape is the caller's ([`Response::typed`]).
    pub fn parse_line(line: &str) -> Result<Self, ProtocolError> {
        let value: Value =
            serde_json::from_str(line).map_err(|e| ProtocolError(format!("not JSON ({e})")))?;
        Self::from_value(value)
    }

    pub fn from_value(value: Value) -> Result<Self, ProtocolError> {
        let Value::Object(mut map) = value else {
            return Err(ProtocolError("not a JSON object".into()));
        };
        let result = map.remove("result");
        let error = map.remove("error");
        let id = map.get("id").and_then(Value::as_u64);
        let outcome = match (result, error) {
            (Some(_), Some(_)) => {
                return Err(ProtocolError("an answer with both result and error".into()));
            }
            (None, None) => {
                return Err(ProtocolError(
                    "neither result nor error (not an answer)".into(),
                ));
            }
            (Some(r), None) => Ok(r),
            (None, Some(e)) => Err(ConnectorError::deserialize(e)
                .map_err(|e| ProtocolError(format!("the error is not a valid ERROR ({e})")))?),
        };
        let id =
            id.ok_or_else(|| ProtocolError("an answer without an unsigned integer id".into()))?;
        Ok(Self { id, outcome })
    }

    /// The result in its method's shape; a mismatch is a `transient` failure of this call.
    pub fn typed<R: DeserializeOwned>(self, method: Method) -> Response<R> {
        Response {
            id: self.id,
            outcome: self.outcome.and_then(|v| result_as(method, v)),
        }
    }
}

/// A result value in its method's shape; a mismatch is the connector's bug, reported as a
/// temporary failure of the call (`scope` service), never as done.
pub fn result_as<R: DeserializeOwned>(method: Method, value: Value) -> ConnectorResult<R> {
    serde_json::from_value(value).map_err(|e| {
        ConnectorError::transient(format!(
            "the connector's answer to `{method}` does not have the method's shape: {e}"
        ))
    })
}

impl<R: Serialize> Serialize for Response<R> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("id", &self.id)?;
        match &self.outcome {
            Ok(r) => m.serialize_entry("result", r)?,
            Err(e) => m.serialize_entry("error", e)?,
        }
        m.end()
    }
}

impl<'de, R: DeserializeOwned> Deserialize<'de> for Response<R> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Response::from_value(Value::deserialize(d)?).map_err(D::Error::custom)?;
        let outcome = match raw.outcome {
            Ok(v) => Ok(serde_json::from_value(v).map_err(D::Error::custom)?),
            Err(e) => Err(e),
        };
        Ok(Response {
            id: raw.id,
            outcome,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake.

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloParams {
    pub protocol_versions: Vec<u32>,
    #[serde(default)]
    pub engine: String,
    pub role: Role,
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloResult {
    pub protocol_version: u32,
    pub connector: String,
    /// Role names as given: one this engine does not know is not an error.
    pub roles: Vec<String>,
    #[serde(default, deserialize_with = "known_capabilities")]
    pub capabilities: Vec<Capability>,
    /// Campaigns only; absent = 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<NonZeroUsize>,
    /// Campaigns only; null = the daemon's `poll_interval`.
    #[serde(default)]
    pub status_interval_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigureParams {
    pub settings: Map<String, Value>,
    pub base_dir: String,
    pub state: Option<String>,
}

/// Both fields replace `hello`'s when present (`status_interval_ms: null` included).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigureResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<NonZeroUsize>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub status_interval_ms: Option<Option<u64>>,
}

// ---------------------------------------------------------------------------------------------
// Methods. `Empty` is `{}` both ways (params of health, maintain, export_state, shutdown; the
// result of configure's usual answer, maintain, write_back, request_doi, shutdown).

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

pub type HealthResult = Health;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportStateResult {
    pub state: Option<String>,
}

pub type WebhookParams = WebhookRequest;
pub type WebhookResult = WebhookEvent;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesParams {
    pub cursor: Option<Cursor>,
    pub limit: usize,
}

pub type ChangesResult = ChangePage;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchParams {
    pub record: RecordRef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchResult {
    pub record: Option<CrmRecord>,
}

pub type WriteBackParams = ConsentWriteBack;

/// One `subscribe` item: `{"key", "subscriber"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscribeItem {
    pub key: String,
    pub subscriber: Subscriber,
}

impl From<&Keyed<Subscriber>> for SubscribeItem {
    fn from(k: &Keyed<Subscriber>) -> Self {
        Self {
            key: k.key.clone(),
            subscriber: k.item.clone(),
        }
    }
}

impl From<SubscribeItem> for Keyed<Subscriber> {
    fn from(i: SubscribeItem) -> Self {
        Keyed::new(i.key, i.subscriber)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscribeParams {
    pub list: String,
    pub items: Vec<SubscribeItem>,
}

/// One `remove` item: `{"key", "email"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveItem {
    pub key: String,
    pub email: String,
}

impl From<&Keyed<String>> for RemoveItem {
    fn from(k: &Keyed<String>) -> Self {
        Self {
            key: k.key.clone(),
            email: k.item.clone(),
        }
    }
}

impl From<RemoveItem> for Keyed<String> {
    fn from(i: RemoveItem) -> Self {
        Keyed::new(i.key, i.email)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveParams {
    pub list: String,
    pub items: Vec<RemoveItem>,
}

/// One item's outcome in a batch answer: `{"ok": true}` or `{"error": ERROR}`. An ERROR here
/// is read as strictly as everywhere, but a bad one makes the *result* malformed (that call
/// fails), not the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemResult(pub ConnectorResult<()>);

#[derive(Deserialize)]
struct ItemResultWire {
    #[serde(default)]
    ok: Option<bool>,
    #[serde(default)]
    error: Option<ConnectorError>,
}

impl Serialize for ItemResult {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        match &self.0 {
            Ok(()) => m.serialize_entry("ok", &true)?,
            Err(e) => m.serialize_entry("error", e)?,
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for ItemResult {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match ItemResultWire::deserialize(d)? {
            ItemResultWire {
                ok: Some(true),
                error: None,
            } => Ok(Self(Ok(()))),
            ItemResultWire {
                ok: None | Some(false),
                error: Some(e),
            } => Ok(Self(Err(e))),
            _ => Err(D::Error::custom(
                r#"an item result is {"ok": true} or {"error": ERROR}"#,
            )),
        }
    }
}

/// The answer to `subscribe` and `remove`: one result per item, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResults {
    pub results: Vec<ItemResult>,
}

impl BatchResults {
    pub fn into_results(self) -> Vec<ConnectorResult<()>> {
        self.results.into_iter().map(|r| r.0).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEventsParams {
    pub list: String,
    pub cursor: Option<Cursor>,
}

pub type StatusEventsResult = StatusPage;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestDoiParams {
    pub list: String,
    pub key: String,
    pub subscriber: Subscriber,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListMembersParams {
    pub list: String,
    pub cursor: Option<Cursor>,
}

pub type ListMembersResult = MemberPage;

pub type SendParams = OutgoingMessage;
pub type SendResult = SentMessage;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetParams {
    pub keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetResult {
    pub deleted: u64,
}

#[cfg(test)]
mod tests;
