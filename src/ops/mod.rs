//! Operating the daemon: `doctor` (step-by-step diagnosis of each mailbox), the HTTP
//! endpoints (health, status), systemd notify and logging.

pub mod cluster;
pub mod doctor;
mod doctor_graph;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod status_page;
pub mod systemd;
