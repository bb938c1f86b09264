//! The consent vocabulary shared by the engine and connectors. The state machine that moves
//! between these states lives in the engine's core; a connector only reads them (e.g. to
//! write the state back into a CRM field).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// State of one (contact, list) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentState {
    None,
    Asserted,
    Pending,
    Confirmed,
    Revalidating,
    Lapsed,
    Withdrawn,
    Bounced,
    Complained,
    Erased,
}

impl ConsentState {
    pub const ALL: [ConsentState; 10] = [
        Self::None,
        Self::Asserted,
        Self::Pending,
        Self::Confirmed,
        Self::Revalidating,
        Self::Lapsed,
        Self::Withdrawn,
        Self::Bounced,
        Self::Complained,
        Self::Erased,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Asserted => "asserted",
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
            Self::Revalidating => "revalidating",
            Self::Lapsed => "lapsed",
            Self::Withdrawn => "withdrawn",
            Self::Bounced => "bounced",
            Self::Complained => "complained",
            Self::Erased => "erased",
        }
    }

    /// Whether the address belongs on the Campaigns list in this state (invariant: only a
    /// confirmation subscribes).
    pub fn on_list(self) -> bool {
        matches!(self, Self::Confirmed | Self::Revalidating)
    }

    /// States that only a fresh confirmation started by the person can leave (invariant:
    /// withdrawal wins).
    pub fn is_withdrawal(self) -> bool {
        matches!(
            self,
            Self::Withdrawn | Self::Bounced | Self::Complained | Self::Erased
        )
    }
}

impl fmt::Display for ConsentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown consent state `{0}`")]
pub struct UnknownState(pub String);

impl FromStr for ConsentState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}
