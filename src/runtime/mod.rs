//! The running daemon: the supervisor that owns one task per mailbox, the per-mailbox
//! loop where the exactly-once rules live, the mailboxes' states, what a reloaded
//! configuration changes, and the leases that share the mailboxes among replicas.

pub mod batch;
pub mod leases;
pub mod mailbox;
pub mod reload;
pub mod state;
pub mod supervisor;
mod tasks;
