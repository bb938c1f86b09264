//! Calling a campaigns connector one way for tests that check what one call does to the
//! vendor: items keyed in order, and the per-item answers folded into one — the first
//! failure, or success. Tests of partial success use the trait's own methods.

use async_trait::async_trait;
use optinsync_plugin_api::{CampaignsConnector, ConnectorResult, Keyed, Subscriber, per_item};

/// `sub` and `rm`: [`CampaignsConnector::subscribe`] and [`CampaignsConnector::remove`] with
/// plain items and one folded answer.
#[async_trait]
pub trait PlainCalls {
    async fn sub(&self, list: &str, subscribers: &[Subscriber]) -> ConnectorResult<()>;
    async fn rm(&self, list: &str, emails: &[String]) -> ConnectorResult<()>;
}

fn keyed<T: Clone>(items: &[T]) -> Vec<Keyed<T>> {
    items
        .iter()
        .enumerate()
        .map(|(i, t)| Keyed::new(format!("test-{i}"), t.clone()))
        .collect()
}

fn fold(n: usize, answer: optinsync_plugin_api::BatchResult) -> ConnectorResult<()> {
    per_item(n, answer).into_iter().collect()
}

#[async_trait]
impl<C: CampaignsConnector + ?Sized> PlainCalls for C {
    async fn sub(&self, list: &str, subscribers: &[Subscriber]) -> ConnectorResult<()> {
        fold(
            subscribers.len(),
            self.subscribe(list, &keyed(subscribers)).await,
        )
    }

    async fn rm(&self, list: &str, emails: &[String]) -> ConnectorResult<()> {
        fold(emails.len(), self.remove(list, &keyed(emails)).await)
    }
}
