//! Connector calls in flight at once, as many as each connector takes
//! ([`optinsync_plugin_api::MailTransport::concurrency`],
//! [`optinsync_plugin_api::CampaignsConnector::concurrency`]). The outbox keeps more units
//! in flight than that ([`crate::outbox::MAIL_UNITS_PER_CALL`],
//! [`crate::outbox::CAMPAIGNS_UNITS_PER_CALL`]): a unit spends much of its time outside the
//! call — reading its rows, waiting for its finish commit — and the other units' calls fill
//! that time.

use tokio::sync::{Semaphore, SemaphorePermit};

/// One gate per connector whose calls the outbox overlaps.
#[derive(Debug)]
pub(crate) struct CallGates {
    mail: Semaphore,
    campaigns: Semaphore,
}

impl CallGates {
    /// Sized once, when the engine is built (a connector's concurrency is part of its
    /// configuration).
    pub(crate) fn new(mail: usize, campaigns: usize) -> Self {
        Self {
            mail: Semaphore::new(mail.max(1)),
            campaigns: Semaphore::new(campaigns.max(1)),
        }
    }

    /// A slot for one mail transport call; `None` only once the engine is being dropped.
    pub(crate) async fn mail(&self) -> Option<SemaphorePermit<'_>> {
        self.mail.acquire().await.ok()
    }

    /// A slot for one campaigns call; `None` only once the engine is being dropped.
    pub(crate) async fn campaigns(&self) -> Option<SemaphorePermit<'_>> {
        self.campaigns.acquire().await.ok()
    }
}
