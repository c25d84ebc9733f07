//! A parsed message's attachments and inline parts as the ticket stores them: decoded,
//! safely named, inline-ness decided from Content-ID and the HTML, winmail.dat unpacked.
//! Pure, no IO.

use super::mime::{Attachment, clean, hex_sha256, normalize_id};
use mail_parser::{MimeHeaders, PartType};

/// Longest attachment file name kept, in bytes.
const MAX_FILENAME_LEN: usize = 200;

/// The attachments and inline parts of a parsed message (winmail.dat unpacked).
pub(super) fn attachments(
    message: &mail_parser::Message,
    body_html: Option<&str>,
) -> Vec<Attachment> {
    let html_lower = body_html.map(str::to_ascii_lowercase);
    let parts: Vec<Attachment> = message
        .attachments()
        .enumerate()
        .map(|(index, part)| {
            let content = part.contents().to_vec();
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
            let is_inline = match (&content_id, &html_lower) {
                (Some(cid), Some(html)) => {
                    html.contains(&format!("cid:{}", cid.to_ascii_lowercase()))
                }
                _ => false,
            };
            Attachment {
                sha256: hex_sha256(&content),
                size: content.len(),
                filename,
                content_type,
                content: Some(content),
                content_id,
                is_inline,
            }
        })
        .collect();
    parts.into_iter().flat_map(unpack_tnef).collect()
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
}
