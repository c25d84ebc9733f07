//! A parsed message's attachments and inline parts as the ticket stores them: decoded,
//! safely named, inline-ness decided from Content-ID and the HTML, winmail.dat unpacked.
//! Pure, no IO.

use super::mime::{Attachment, clean, hex_sha256, normalize_id};
use base64::Engine;
use mail_parser::{Encoding, MimeHeaders, PartType};

/// Longest attachment file name kept, in bytes.
const MAX_FILENAME_LEN: usize = 200;

/// The attachments and inline parts of a parsed message (winmail.dat unpacked). Their
/// decoded bytes are moved out of `message` (read everything else from it first).
pub(super) fn attachments(
    message: &mut mail_parser::Message,
    body_html: Option<&str>,
) -> Vec<Attachment> {
    let html_lower = body_html.map(str::to_ascii_lowercase);
    let ids = message.attachments.clone();
    // mail-parser pushes a part's id once, as it reads the part, so each attachment's bytes
    // can be moved out instead of copied (a copy is ~200 MB per 5,000 messages of the
    // benchmark mix); were an id ever listed twice, they are copied.
    let unique = ids.iter().collect::<std::collections::HashSet<_>>().len() == ids.len();
    let parts: Vec<Attachment> = ids
        .iter()
        .enumerate()
        // As `Message::attachments()`: up to the first id without a part.
        .map_while(|(index, &id)| {
            let part = message.parts.get_mut(id as usize)?;
            let mut attachment = describe(part, index, html_lower.as_deref());
            let content = match &mut part.body {
                PartType::Binary(b) | PartType::InlineBinary(b) if unique => {
                    std::mem::take(b).into_owned()
                }
                PartType::Text(t) | PartType::Html(t) if unique => {
                    std::mem::take(t).into_owned().into_bytes()
                }
                _ => part.contents().to_vec(),
            };
            attachment.sha256 = hex_sha256(&content);
            attachment.size = content.len();
            attachment.content = Some(content);
            Some(attachment)
        })
        .collect();
    parts.into_iter().flat_map(unpack_tnef).collect()
}

/// An attachment's name, type, Content-ID, inline-ness and encoded range, without its
/// content (`html_lower`: the message's HTML body, lowercased).
fn describe(part: &mail_parser::MessagePart, index: usize, html_lower: Option<&str>) -> Attachment {
    let content_type = match part.content_type() {
        Some(ct) => {
            let subtype = ct.subtype().unwrap_or(match &part.body {
                PartType::Text(_) => "plain",
                _ => "octet-stream",
            });
            clean(&format!("{}/{}", ct.ctype(), subtype).to_ascii_lowercase())
        }
        None => match &part.body {
            PartType::Message(_) => "message/rfc822".to_string(),
            PartType::Text(_) => "text/plain".to_string(),
            PartType::Html(_) => "text/html".to_string(),
            _ => "application/octet-stream".to_string(),
        },
    };
    let filename = match part.attachment_name().map(safe_filename) {
        Some(name) if !name.is_empty() => name,
        _ => fallback_filename(part, index, &content_type),
    };
    let content_id = part.content_id().and_then(normalize_id);
    let is_inline = match (&content_id, html_lower) {
        (Some(cid), Some(html)) => html.contains(&format!("cid:{}", cid.to_ascii_lowercase())),
        _ => false,
    };
    Attachment {
        sha256: String::new(),
        size: 0,
        filename,
        content_type,
        content: None,
        content_id,
        is_inline,
        raw_range: (part.encoding == Encoding::Base64)
            .then_some(part.offset_body as usize..part.offset_end as usize),
    }
}

/// Keeps each attachment's [`Attachment::raw_range`] only where `raw` holds, at that range,
/// base64 text that decodes to exactly its content (the range came from parsing, which may
/// have read a repaired copy of the message); `in_raw` false clears them all.
pub fn place_in_raw(attachments: &mut [Attachment], raw: &[u8], in_raw: bool) {
    for attachment in attachments {
        let range = attachment.raw_range.take();
        attachment.raw_range = range.filter(|range| {
            let encoded = raw.get(range.clone());
            let content = attachment.content.as_deref();
            in_raw && matches!((encoded, content), (Some(e), Some(c)) if base64_decodes_to(e, c))
        });
    }
}

/// True when `encoded` is canonical base64 (the alphabet, `=` padding only at the end)
/// with no other characters than the whitespace Postgres' `decode(_, 'base64')` skips
/// (space, tab, CR, LF), and decodes to exactly `content`: then the `attachment_files` view
/// gives back `content` from the raw message.
///
/// Compared by encoding `content` (canonical base64 is the one encoding with padding and
/// no trailing bits, so equal text means both conditions) line by line: no decoded or
/// compacted copy, and a memcmp per line (the byte-wise split only on lines that hold
/// spaces or tabs).
pub fn base64_decodes_to(encoded: &[u8], content: &[u8]) -> bool {
    let canonical = base64::engine::general_purpose::STANDARD.encode(content);
    let mut expected = canonical.as_bytes();
    let mut take = |piece: &[u8]| match expected.split_at_checked(piece.len()) {
        Some((head, rest)) if head == piece => {
            expected = rest;
            true
        }
        _ => false,
    };
    let mut lines = encoded;
    while !lines.is_empty() {
        let (line, rest) = match memchr::memchr(b'\n', lines) {
            Some(end) => (&lines[..end], &lines[end + 1..]),
            None => (lines, &b""[..]),
        };
        lines = rest;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let whole = memchr::memchr3(b' ', b'\t', b'\r', line).is_none();
        let fits = if whole {
            take(line)
        } else {
            line.split(|b| matches!(b, b' ' | b'\t' | b'\r'))
                .all(&mut take)
        };
        if !fits {
            return false;
        }
    }
    expected.is_empty()
}

/// Outlook's `winmail.dat` becomes the files inside it; one that holds no file (only a
/// rich-text body) is kept as it is.
fn unpack_tnef(attachment: Attachment) -> Vec<Attachment> {
    let looks_tnef = attachment.content_type == "application/ms-tnef"
        || attachment.content_type == "application/vnd.ms-tnef"
        || attachment.filename.eq_ignore_ascii_case("winmail.dat");
    let files = match &attachment.content {
        Some(content) if looks_tnef => crate::pipeline::tnef::files(content),
        _ => Vec::new(),
    };
    if files.is_empty() {
        return vec![attachment];
    }
    files
        .into_iter()
        .enumerate()
        .map(|(i, file)| {
            let filename = match safe_filename(&clean(&file.name)) {
                name if name.is_empty() => format!("winmail-{}.bin", i + 1),
                name => name,
            };
            Attachment {
                sha256: hex_sha256(&file.data),
                size: file.data.len(),
                filename,
                content_type: file
                    .mime_type
                    .map(|m| clean(m.trim()).to_ascii_lowercase())
                    .unwrap_or_else(|| "application/octet-stream".to_string()),
                content: Some(file.data),
                content_id: None,
                is_inline: false,
                raw_range: None,
            }
        })
        .collect()
}

/// A name for a part that has none: a forwarded message is named after its subject.
fn fallback_filename(part: &mail_parser::MessagePart, index: usize, content_type: &str) -> String {
    if let PartType::Message(nested) = &part.body {
        let subject = safe_filename(nested.subject().unwrap_or_default());
        if !subject.is_empty() {
            let mut name = subject;
            truncate_utf8(&mut name, MAX_FILENAME_LEN - 4);
            return format!("{name}.eml");
        }
        return format!("forwarded-message-{}.eml", index + 1);
    }
    let extension = match content_type {
        "text/plain" => "txt",
        "text/html" => "html",
        "text/calendar" => "ics",
        "application/pdf" => "pdf",
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/gif" => "gif",
        "message/rfc822" => "eml",
        "message/delivery-status" => "txt",
        t if t.starts_with("text/") => "txt",
        _ => "bin",
    };
    format!("attachment-{}.{extension}", index + 1)
}

/// Reduces a sender-chosen name to a bare file name: the last path component, no control
/// characters, no leading dots, at most [`MAX_FILENAME_LEN`] bytes. May return "".
pub fn safe_filename(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let mut out: String = last
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .trim_start_matches('.')
        .trim()
        .to_string();
    if out.len() > MAX_FILENAME_LEN {
        // Keep the extension: "very-long-name….pdf".
        let ext = out
            .rsplit_once('.')
            .map(|(_, e)| e.to_string())
            .filter(|e| !e.is_empty() && e.len() <= 16 && !e.contains(' '));
        match ext {
            Some(ext) => {
                let mut stem = out[..out.len() - ext.len() - 1].to_string();
                truncate_utf8(&mut stem, MAX_FILENAME_LEN - ext.len() - 1);
                out = format!("{stem}.{ext}");
            }
            None => truncate_utf8(&mut out, MAX_FILENAME_LEN),
        }
    }
    out
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_filename_strips_paths_and_controls() {
        assert_eq!(safe_filename("../../../etc/passwd"), "passwd");
        assert_eq!(safe_filename("C:\\Users\\x\\evil.exe"), "evil.exe");
        assert_eq!(safe_filename("..hidden"), "hidden");
        assert_eq!(safe_filename("a\0b\r\n.txt"), "a b  .txt");
        assert_eq!(safe_filename("/"), "");
        let long = format!("{}.pdf", "ü".repeat(300));
        let s = safe_filename(&long);
        assert!(s.len() <= MAX_FILENAME_LEN && s.ends_with(".pdf"), "{s}");
    }

    #[test]
    fn only_base64_that_postgres_decodes_the_same_way_is_kept_as_a_range() {
        // Line breaks, spaces and tabs are skipped, as Postgres skips them.
        assert!(base64_decodes_to(
            b"aGVs\r\nbG8g\r\n d29y\tbGQ=\r\n",
            b"hello world"
        ));
        assert!(base64_decodes_to(b"", b""));
        // Anything else is not stored as a range: other characters (Postgres would fail),
        // missing or misplaced padding, nonzero trailing bits, or other content.
        assert!(!base64_decodes_to(b"aGVs*bG8=", b"hel\x96o"));
        assert!(!base64_decodes_to(b"aGVsbA", b"hell"));
        assert!(!base64_decodes_to(b"aGVsbA==aGVs", b"hellhel"));
        assert!(!base64_decodes_to(b"aGVsbB==", b"hell"));
        assert!(!base64_decodes_to(b"aGVsbA==", b"help"));
        assert!(!base64_decodes_to(b"aGVsbA==\x0c", b"hell"));
    }

    #[test]
    fn a_range_is_kept_only_when_asked_for_and_when_it_decodes_to_the_content() {
        let raw = b"header\r\n\r\naGVsbG8=\r\n--b--";
        let attachment = |range: std::ops::Range<usize>, content: &[u8]| Attachment {
            filename: "a.bin".into(),
            content_type: "application/octet-stream".into(),
            content: Some(content.to_vec()),
            size: content.len(),
            sha256: String::new(),
            content_id: None,
            is_inline: false,
            raw_range: Some(range),
        };
        let mut kept = vec![attachment(10..20, b"hello"), attachment(11..19, b"hello")];
        place_in_raw(&mut kept, raw, true);
        assert_eq!(kept[0].raw_range, Some(10..20));
        assert_eq!(kept[0].stored_content(), None);
        assert_eq!(
            kept[1].raw_range, None,
            "a range that does not decode to the content"
        );
        assert_eq!(kept[1].stored_content(), Some(&b"hello"[..]));
        let mut not_asked = vec![attachment(10..20, b"hello")];
        place_in_raw(&mut not_asked, raw, false);
        assert_eq!(not_asked[0].raw_range, None);
        let mut outside = vec![attachment(10..99, b"hello")];
        place_in_raw(&mut outside, raw, true);
        assert_eq!(outside[0].raw_range, None);
    }
}
