//! Where mail comes from. `imap` is the only code that speaks IMAP.

pub mod imap;
