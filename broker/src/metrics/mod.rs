//! Observability over plain HTTP on `--metrics-listen`: Prometheus
//! `/metrics`, `/healthz` and `/readyz`.
//!
//! Owns the counting of job transitions (`counters`, fed by the state
//! machine adapter with the tallies the pure state machine returns) and
//! the rendering of every series (`exposition`). It must not change any
//! state, propose anything or block apply: a scrape takes the applied
//! state's read lock only as long as ListQueues does.

pub mod counters;
pub mod exposition;
pub mod http;

pub use counters::Counters;
