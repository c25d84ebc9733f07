//! The one integration-test binary: real Postgres (and later Dovecot) started by
//! `support`, one fresh database per test.

mod cli;
mod credentials;
mod daemon;
mod events;
mod first_day;
mod fuzz;
mod golden;
mod graph;
mod ingest;
mod operations;
mod replicas;
mod support;
mod threading;
mod webhooks;
