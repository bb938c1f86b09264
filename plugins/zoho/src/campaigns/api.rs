//! The Zoho Campaigns endpoints the connector calls: names, paths, methods, documented quotas.

use reqwest::Method;

/// The Campaigns endpoints the connector calls, with their documented quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Api {
    GetMailingLists,
    ListSubscribe,
    ListUnsubscribe,
    BulkAdd,
    GetListSubscribers,
}

impl Api {
    /// The call is about one address on one list, so a "retry later" answer to it is about
    /// that address, not the service.
    pub(super) fn concerns_one_address(self) -> bool {
        matches!(self, Api::ListSubscribe | Api::ListUnsubscribe)
    }

    pub const ALL: [Api; 5] = [
        Api::GetMailingLists,
        Api::ListSubscribe,
        Api::ListUnsubscribe,
        Api::BulkAdd,
        Api::GetListSubscribers,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Api::GetMailingLists => "getmailinglists",
            Api::ListSubscribe => "listsubscribe",
            Api::ListUnsubscribe => "listunsubscribe",
            Api::BulkAdd => "addlistsubscribersinbulk",
            Api::GetListSubscribers => "getlistsubscribers",
        }
    }

    pub(super) fn path(self) -> &'static str {
        match self {
            Api::GetMailingLists => "/api/v1.1/getmailinglists",
            Api::ListSubscribe => "/api/v1.1/json/listsubscribe",
            Api::ListUnsubscribe => "/api/v1.1/json/listunsubscribe",
            Api::BulkAdd => "/api/v1.1/addlistsubscribersinbulk",
            Api::GetListSubscribers => "/api/v1.1/getlistsubscribers",
        }
    }

    pub(super) fn method(self) -> Method {
        match self {
            Api::GetMailingLists | Api::GetListSubscribers => Method::GET,
            _ => Method::POST,
        }
    }

    /// Documented quotas: (calls, window in seconds), and the lock in seconds.
    pub fn documented_limits(self) -> (&'static [(u32, u64)], u64) {
        match self {
            Api::ListSubscribe => (&[(500, 60), (12_500, 3_600), (75_000, 86_400)], 1_800),
            Api::BulkAdd => (&[(2_000, 60)], 600),
            Api::GetMailingLists | Api::ListUnsubscribe | Api::GetListSubscribers => {
                (&[(500, 300)], 1_800)
            }
        }
    }

    pub(super) fn from_name(name: &str) -> Option<Api> {
        Api::ALL.into_iter().find(|a| a.name() == name)
    }
}
