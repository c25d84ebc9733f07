//! The running daemon: the supervisor that owns one task per mailbox, and the per-mailbox
//! loop where the exactly-once rules live.

pub mod mailbox;
pub mod state;
pub mod supervisor;
