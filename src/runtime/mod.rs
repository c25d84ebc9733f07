//! The running daemon: the supervisor that owns one task per mailbox, the per-mailbox
//! loop where the exactly-once rules live, the mailboxes' states, and what a reloaded
//! configuration changes.

pub mod mailbox;
pub mod reload;
pub mod state;
pub mod supervisor;
