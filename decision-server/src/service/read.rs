//! The reading desk: what the front ends read about a customer (usage history, top spenders,
//! budgets, the usage stream, the webhook delivery log, the model in force), each read
//! through the engine behind `Service`, so no front end reaches the engine or the store.

use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;

use super::Service;
use crate::core::alerts::Delivery;
use crate::core::{Model, Name};
use crate::store::StoreError;
use crate::usage::{
    Budget, EntityPage, Followed, History, HistoryRequest, Top, TopRequest, UsageError,
};

/// How often a usage stream polls the store for other replicas' events, besides waking on this
/// process's own: the bound on how late a replica's event reaches a subscriber elsewhere.
pub const FOLLOW_POLL: Duration = Duration::from_millis(500);

impl Service {
    /// The model in force.
    pub fn model(&self) -> Arc<Model> {
        self.engine.model()
    }

    /// Whether the model in force has customer `id`.
    pub fn knows_customer(&self, id: &str) -> bool {
        self.engine.model().customer(id).is_some()
    }

    /// `customer`'s usage over time (`GET /v1/customers/{id}/usage/history`).
    pub async fn usage_history(
        &self,
        customer: &str,
        req: HistoryRequest,
    ) -> Result<History, UsageError> {
        crate::usage::history(&self.engine, customer, req).await
    }

    /// `customer`'s top spenders.
    pub async fn usage_top(&self, customer: &str, req: TopRequest) -> Result<Top, UsageError> {
        crate::usage::top(&self.engine, customer, req).await
    }

    /// What `customer` spent, period over period.
    pub async fn usage_spend(
        &self,
        customer: &str,
        req: crate::usage::SpendRequest,
    ) -> Result<crate::usage::Spend, UsageError> {
        crate::usage::spend(&self.engine, customer, req).await
    }

    /// The budgets of `entities` of `customer`, in order.
    pub async fn budgets(
        &self,
        customer: &str,
        entities: &[&str],
    ) -> Result<Vec<Budget>, UsageError> {
        crate::usage::budgets(&self.engine, customer, entities).await
    }

    /// A page of `customer`'s entities under `parent` (the roots when `None`), those matching
    /// `query` when given.
    pub async fn entity_page(
        &self,
        customer: &str,
        parent: Option<&str>,
        query: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> Result<EntityPage, UsageError> {
        crate::usage::entity_page(&self.engine, customer, parent, query, offset, limit).await
    }

    /// The budget of one entity of `customer`.
    pub async fn budget(&self, customer: &str, entity: &str) -> Result<Budget, UsageError> {
        crate::usage::budget(&self.engine, customer, entity).await
    }

    /// The usage stream of `customer` (or of every customer), after cursor `after`, until the
    /// server stops: the one rule every front end's stream follows (a customer the model
    /// does not have is refused; the store's own events and other replicas', polled every
    /// `FOLLOW_POLL`).
    pub async fn follow_usage(
        &self,
        customer: Option<&str>,
        after: Option<String>,
    ) -> Result<impl Stream<Item = Followed> + Send + 'static, UsageError> {
        let name = match customer {
            Some(c) if !self.knows_customer(c) => {
                return Err(UsageError::UnknownCustomer(c.to_string()));
            }
            Some(c) => Some(Name::from(c)),
            None => None,
        };
        let after = after.filter(|a| !a.is_empty());
        Ok(crate::usage::follow(
            Arc::clone(self.engine.store()),
            name,
            after,
            FOLLOW_POLL,
            self.stopping(),
        )
        .await?)
    }

    /// `customer`'s webhook delivery log, newest first, at most `limit`; `None` when the
    /// model has no such customer.
    pub async fn deliveries(
        &self,
        customer: &str,
        limit: usize,
    ) -> Result<Option<Vec<Delivery>>, StoreError> {
        let Some(c) = self.engine.model().customer(customer).map(|c| c.id) else {
            return Ok(None);
        };
        self.engine
            .store()
            .alerts()
            .deliveries(c, limit)
            .await
            .map(Some)
    }

    /// Queues a test delivery to `customer`'s webhook `webhook`: its id, or `None` when there
    /// is no such webhook.
    pub async fn test_delivery(
        &self,
        customer: &str,
        webhook: &str,
    ) -> Result<Option<String>, StoreError> {
        crate::alerts::test_delivery(&self.engine, customer, webhook).await
    }

    /// Runs the alert checks that no decision triggers (denial bursts, projected
    /// exhaustion); how many alerts fired.
    pub async fn alerts_pass(&self) -> Result<usize, StoreError> {
        crate::alerts::background_pass(&self.engine).await
    }
}
