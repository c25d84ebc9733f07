//! IMAP as a mail source: the async-imap client with its guards ([`client`]) and the
//! first-contact policy ([`first_contact`]).

pub mod client;
pub mod first_contact;

pub use client::{
    COMMAND_TIMEOUT, Connection, FolderStatus, IdleEnd, ImapError, ImapSession, Io, Login, Pending,
    Stream, connect, uid_set,
};
