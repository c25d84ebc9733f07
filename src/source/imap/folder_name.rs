//! Folder names on the wire. IMAP4rev1 writes mailbox names in modified UTF-7 (RFC 3501
//! section 5.1.3): printable ASCII stands for itself (`&` as `&-`), anything else is a run
//! of UTF-16BE in base64 with `,` for `/` and no padding, between `&` and `-`. The
//! configuration holds names as people read them in Outlook ("Überprüfung"); a server
//! refuses them raw ("Mailbox name is not valid mUTF-7").
//!
//! Written by hand: the one crate for it (utf7-imap 0.3) passes DEL through unencoded and
//! brings an old base64 and regex, while encoding is a few lines over the base64 crate in
//! use here. Only encoding is needed: mail2ticket never reads folder names from a server.

use base64::Engine;
use base64::alphabet::Alphabet;
use base64::engine::{GeneralPurpose, GeneralPurposeConfig};

/// Base64 with `,` in place of `/`, and no padding.
const MODIFIED_BASE64: GeneralPurpose = GeneralPurpose::new(
    &match Alphabet::new("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,") {
        Ok(alphabet) => alphabet,
        Err(_) => panic!("64 distinct printable characters"),
    },
    GeneralPurposeConfig::new().with_encode_padding(false),
);

/// `name` as IMAP4rev1 writes it.
pub fn to_wire(name: &str) -> String {
    let mut wire = String::with_capacity(name.len());
    let mut shifted: Vec<u8> = Vec::new();
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            shift_out(&mut wire, &mut shifted);
            match c {
                '&' => wire.push_str("&-"),
                _ => wire.push(c),
            }
        } else {
            for unit in c.encode_utf16(&mut [0; 2]) {
                shifted.extend_from_slice(&unit.to_be_bytes());
            }
        }
    }
    shift_out(&mut wire, &mut shifted);
    wire
}

/// Writes a pending run of UTF-16BE bytes as `&...-`.
fn shift_out(wire: &mut String, shifted: &mut Vec<u8>) {
    if shifted.is_empty() {
        return;
    }
    wire.push('&');
    MODIFIED_BASE64.encode_string(&shifted, wire);
    wire.push('-');
    shifted.clear();
}

#[cfg(test)]
mod tests {
    use super::to_wire;

    #[test]
    fn names_are_written_in_modified_utf7() {
        let cases = [
            ("INBOX", "INBOX"),
            ("Processed/2026", "Processed/2026"),
            // RFC 3501 section 5.1.3's own example.
            ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
            ("Entwürfe", "Entw&APw-rfe"),
            ("R&D", "R&-D"),
            ("Отправленные", "&BB4EQgQ,BEAEMAQyBDsENQQ9BD0ESwQ1-"),
            // Outside the BMP: a surrogate pair in one run.
            ("📨 Eingang", "&2D3c6A- Eingang"),
            // DEL is not printable: encoded.
            ("a\u{7f}", "a&AH8-"),
        ];
        for (name, wire) in cases {
            assert_eq!(to_wire(name), wire, "{name}");
        }
    }
}
