//! The HTTP listener's router: the API and the portal side by side. It sits above both, so
//! neither needs the other to be served.

use std::sync::Arc;

use crate::service::Service;

/// The HTTP router: the API and the portal, each request's body bounded by `max_body_bytes`.
pub fn router(state: Arc<Service>, max_body_bytes: usize) -> axum::Router {
    let portal = crate::portal::router(Arc::clone(&state));
    crate::api::router_and_doc(state, max_body_bytes)
        .0
        .merge(portal)
}
