//! Durations written for humans in `config.toml`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written for humans: `"250ms"`, `"45s"`, `"10m"`, `"3h"`, `"14d"`, `"2w"`, `"3y"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The longest duration accepted: 1000 years.
    pub const MAX_SECS: u64 = 1000 * 366 * 86_400;

    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("`{s}` is not a duration like \"30s\", \"10m\", \"3h\", \"14d\"")
        })?;
        // Milliseconds, for the few settings below a second (`[signup] answer_floor`).
        if unit.trim() == "ms" {
            return Ok(Self(Duration::from_millis(n.min(Self::MAX_SECS))));
        }
        let factor: u64 = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            // A year of 365 days: retention periods are written in years.
            "y" => 365 * 86_400,
            other => {
                return Err(format!(
                    "unknown duration unit `{other}` in `{s}` (use ms, s, m, h, d, w or y)"
                ));
            }
        };
        // Bounded so that every date computed from it stays representable (windows are
        // added to timestamps; `99999999999999999w` overflowed).
        let secs = n
            .checked_mul(factor)
            .filter(|secs| *secs <= Self::MAX_SECS)
            .ok_or_else(|| format!("`{s}` is longer than 1000 years"))?;
        Ok(Self(Duration::from_secs(secs)))
    }

    pub fn secs(self) -> i64 {
        i64::try_from(self.0.as_secs()).unwrap_or(i64::MAX)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}
