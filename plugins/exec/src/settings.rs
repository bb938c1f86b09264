//! The `[connectors.ROLE]` keys of `kind = "exec"`.

use std::time::Duration;

use optinsync_plugin_api::{Settings, SettingsError};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    command: Vec<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    startup_timeout: Option<String>,
    #[serde(default)]
    settings: Map<String, Value>,
}

/// Checked settings of one exec connector.
#[derive(Debug, Clone)]
pub(crate) struct ExecSettings {
    pub command: Vec<String>,
    pub timeout: Duration,
    pub startup_timeout: Duration,
    /// Sent in `configure`; never logged (it holds credentials).
    pub settings: Map<String, Value>,
}

impl ExecSettings {
    pub fn parse(settings: &Settings) -> Result<Self, SettingsError> {
        let raw: Raw = settings.parse()?;
        if raw.command.is_empty() || raw.command[0].trim().is_empty() {
            return Err(SettingsError::invalid(
                "command",
                "must name the program to run, e.g. [\"python3\", \"connector.py\"]",
            ));
        }
        let duration = |key: &str, text: Option<String>, default: Duration| match text {
            None => Ok(default),
            Some(t) => parse_duration(&t).map_err(|m| SettingsError::invalid(key, m)),
        };
        Ok(Self {
            command: raw.command,
            timeout: duration("timeout", raw.timeout, Duration::from_secs(30))?,
            startup_timeout: duration(
                "startup_timeout",
                raw.startup_timeout,
                Duration::from_secs(10),
            )?,
            settings: raw.settings,
        })
    }
}

/// `"500ms"`, `"30s"`, `"2m"`, `"1h"`; more than zero.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{t}` is not a duration like \"30s\" or \"500ms\""))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{t}` (use ms, s, m or h)"
            ));
        }
    };
    if d.is_zero() {
        return Err("must be more than 0s".into());
    }
    Ok(d)
}

/// A duration as it would be written in the config.
pub(crate) fn duration_text(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: Value) -> Result<ExecSettings, SettingsError> {
        match v {
            Value::Object(m) => ExecSettings::parse(&Settings::new(m)),
            _ => unreachable!("a table"),
        }
    }

    #[test]
    fn settings_are_checked_and_errors_name_the_key() {
        let ok = parse(json!({"command": ["python3", "x.py"]})).expect("valid");
        assert_eq!(ok.timeout, Duration::from_secs(30));
        assert_eq!(ok.startup_timeout, Duration::from_secs(10));
        assert!(ok.settings.is_empty());
        let key = |v| parse(v).expect_err("refused").key;
        assert_eq!(key(json!({})).as_deref(), Some("command"));
        assert_eq!(key(json!({"command": []})).as_deref(), Some("command"));
        assert_eq!(key(json!({"command": [""]})).as_deref(), Some("command"));
        assert_eq!(key(json!({"command": "x.py"})).as_deref(), Some("command"));
        assert_eq!(
            key(json!({"command": ["x"], "comand": 1})).as_deref(),
            Some("comand")
        );
        assert_eq!(
            key(json!({"command": ["x"], "timeout": "soon"})).as_deref(),
            Some("timeout")
        );
        assert_eq!(
            key(json!({"command": ["x"], "startup_timeout": "0s"})).as_deref(),
            Some("startup_timeout")
        );
        assert_eq!(
            key(json!({"command": ["x"], "settings": 3})).as_deref(),
            Some("settings")
        );
        let t = parse(json!({"command": ["x"], "timeout": "500ms", "settings": {"a": 1}}))
            .expect("valid");
        assert_eq!(t.timeout, Duration::from_millis(500));
        assert_eq!(t.settings.get("a"), Some(&json!(1)));
        assert_eq!(duration_text(Duration::from_millis(500)), "500ms");
        assert_eq!(duration_text(Duration::from_secs(10)), "10s");
    }
}
