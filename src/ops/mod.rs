//! Operating the daemon: `doctor` (step-by-step diagnosis of each mailbox) and logging.

pub mod doctor;
pub mod logging;
