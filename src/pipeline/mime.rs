//! Raw RFC 5322 bytes to a [`ParsedMessage`]: pure code, no IO, no SQL.
//!
//! mail-parser does the MIME work; this module decides what the ticket pipeline needs from
//! it and guards the parser's known weak spots:
//! - every string handed on is free of NUL (Postgres rejects NUL in `text`);
//! - attachment names are reduced to a bare file name, never a path;
//! - inline-ness of an attachment is decided here from Content-ID and the HTML, since
//!   mail-parser reports `cid:` images among the attachments;
//! - a `--boundary` that is not a real delimiter line makes mail-parser 0.11 cut the part
//!   (and, followed by `--`, drop every later part) silently: such messages are read again
//!   with fresh boundaries ([`crate::pipeline::boundary`]); one that still cannot be read whole
//!   carries a warning so the raw bytes are kept with the ticket (see [`BOUNDARY_WARNING`]).

use chrono::{DateTime, Utc};
use mail_parser::{Address, HeaderName, HeaderValue, MessageParser, MimeHeaders, PartType};
use sha2::{Digest, Sha256};

/// Warning attached to a message in which a boundary string appears off a delimiter line.
pub const BOUNDARY_WARNING: &str = "a MIME boundary appears inside a part, not on a delimiter line: the body may be cut short; the raw message is kept";
/// Message-IDs longer than this are replaced by a hash (a btree index entry must stay small).
pub const MAX_MESSAGE_ID_LEN: usize = 512;
/// Domain of Message-IDs we make up; `.invalid` can never collide with a real one.
const DERIVED_ID_DOMAIN: &str = "mail2ticket.invalid";

/// Why raw bytes could not be read as an email at all (the message goes to quarantine).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Zero bytes.
    #[error("the message is empty")]
    Empty,
    /// No RFC 5322 header fields could be read.
    #[error("not an RFC 5322 message: no header fields could be read")]
    NoHeaders,
}

/// One address from a header: the address itself and the display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// The address as written (trimmed, without angle brackets).
    pub email: String,
    /// The display name, when there is one.
    pub name: Option<String>,
}

/// An attachment or inline part, decoded.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// A safe file name (no directories, no control characters, never empty).
    pub filename: String,
    /// Lower-case `type/subtype`.
    pub content_type: String,
    /// Decoded content; `None` when it is not kept (over `max_attachment_size`).
    pub content: Option<Vec<u8>>,
    /// Size of the decoded content in bytes.
    pub size: usize,
    /// Hex SHA-256 of the decoded content.
    pub sha256: String,
    /// Content-ID without angle brackets.
    pub content_id: Option<String>,
    /// True when the HTML body shows it through `cid:`.
    pub is_inline: bool,
    /// Where its base64 text lies in the message's bytes. Parsing sets it for every base64
    /// part; deciding keeps it only where the part is stored inside the raw message (see
    /// [`crate::pipeline::Pipeline::attachments_in_raw`]) and those bytes were checked to
    /// decode to `content`.
    pub raw_range: Option<std::ops::Range<usize>>,
}

impl Attachment {
    /// The bytes to store in `attachments.content`: none when they are read from the raw
    /// message instead ([`Attachment::raw_range`]), or not kept.
    pub fn stored_content(&self) -> Option<&[u8]> {
        match self.raw_range {
            Some(_) => None,
            None => self.content.as_deref(),
        }
    }
}

/// Headers that mark a message as sent by a machine (RFC 3834 and common practice).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoSignals {
    /// `Auto-Submitted` value, lower-case.
    pub auto_submitted: Option<String>,
    /// `X-Autoreply` or `X-Autorespond` present.
    pub x_autoreply: bool,
    /// `Precedence` value, lower-case.
    pub precedence: Option<String>,
    /// The message is a `multipart/report` (delivery or disposition notification).
    pub is_report: bool,
}

/// Everything the ticket pipeline uses from one message.
#[derive(Debug, Clone)]
pub struct ParsedMessage {
    /// Message-ID without angle brackets; made up from the content when missing.
    pub message_id: String,
    /// True when `message_id` was made up here.
    pub message_id_derived: bool,
    /// First In-Reply-To id.
    pub in_reply_to: Option<String>,
    /// References ids, oldest first.
    pub references: Vec<String>,
    /// Decoded subject ("" when missing).
    pub subject: String,
    /// From addresses.
    pub from: Vec<Mailbox>,
    /// Sender address.
    pub sender: Option<Mailbox>,
    /// Reply-To addresses.
    pub reply_to: Vec<Mailbox>,
    /// Return-Path address.
    pub return_path: Option<String>,
    /// To addresses.
    pub to: Vec<Mailbox>,
    /// Cc addresses.
    pub cc: Vec<Mailbox>,
    /// Date header, when present and valid.
    pub date: Option<DateTime<Utc>>,
    /// Plain text body (from text/plain parts, else converted from HTML).
    pub body_text: String,
    /// HTML body, unsanitized, when the message has one.
    pub body_html: Option<String>,
    /// Attachments and inline parts.
    pub attachments: Vec<Attachment>,
    /// Machine-sender signals.
    pub auto: AutoSignals,
    /// Things a person should know about how this message was read.
    pub warnings: Vec<String>,
    /// Size of the raw message in bytes.
    pub raw_size: usize,
}

/// Parses one raw message. A message in which a boundary string appears off a delimiter
/// line is read through [`crate::pipeline::boundary::rewrite`] (fresh boundaries), so that no text
/// or attachment is lost; only when that cannot help does it carry [`BOUNDARY_WARNING`].
pub fn parse(raw: &[u8]) -> Result<ParsedMessage, ParseError> {
    if raw.is_empty() {
        return Err(ParseError::Empty);
    }
    let message = MessageParser::default()
        .parse(raw)
        .ok_or(ParseError::NoHeaders)?;
    if super::boundary::is_misplaced(&message, raw)
        && let Some(repaired) = crate::pipeline::boundary::rewrite(raw)
        && let Some(message) = MessageParser::default().parse(&repaired[..])
    {
        return read(message, &repaired, raw);
    }
    read(message, raw, raw)
}

/// Builds the [`ParsedMessage`] from a parsed message; `bytes` are the bytes it was parsed
/// from (offsets point into them), `original` the message as received (for the derived
/// Message-ID and the size).
fn read(
    mut message: mail_parser::Message,
    bytes: &[u8],
    original: &[u8],
) -> Result<ParsedMessage, ParseError> {
    let raw = bytes;
    // mail-parser turns any first line into a "header"; require one real field name
    // (RFC 5322 ftext: printable ASCII without space or colon).
    let has_real_header = message.root_part().headers().iter().any(|h| {
        let name = h.name();
        !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
    });
    if !has_real_header {
        return Err(ParseError::NoHeaders);
    }
    let mut warnings = Vec::new();

    let (message_id, message_id_derived) = message_id(&message, original, &mut warnings);
    let in_reply_to =
        first_id(message.header(HeaderName::InReplyTo)).filter(|id| id.len() <= MAX_MESSAGE_ID_LEN);
    let references = all_ids(message.header(HeaderName::References))
        .into_iter()
        .filter(|id| id.len() <= MAX_MESSAGE_ID_LEN)
        .collect();

    let date = message
        .date()
        .filter(|d| d.is_valid())
        .and_then(|d| DateTime::from_timestamp(d.to_timestamp(), 0));

    let (mut body_text, body_html) = bodies(&message, raw, &mut warnings);
    let misplaced = super::boundary::is_misplaced(&message, raw);
    let subject = subject(&message, raw);
    let auto = auto_signals(&message);
    let (from, sender) = (mailboxes(message.from()), mailboxes(message.sender()));
    let (reply_to, to, cc) = (
        mailboxes(message.reply_to()),
        mailboxes(message.to()),
        mailboxes(message.cc()),
    );
    let return_path = message
        .return_address()
        .map(|a| clean(a.trim().trim_matches(|c| c == '<' || c == '>')))
        .filter(|a| !a.is_empty());
    // Last: this moves the attachments' bytes out of `message`.
    let mut attachments = super::attachments::attachments(&mut message, body_html.as_deref());
    read_unbounded_multipart(&mut attachments, &mut body_text, &mut warnings);
    if misplaced {
        warnings.push(BOUNDARY_WARNING.to_string());
        // The desk must see that text may be missing, not only a database column.
        body_text.push_str("\n\n[mail2ticket: part of this message may be hidden by its MIME structure; the raw message is kept with the ticket]");
    }

    Ok(ParsedMessage {
        message_id,
        message_id_derived,
        in_reply_to,
        references,
        subject,
        from,
        sender: sender.into_iter().next(),
        reply_to,
        return_path,
        to,
        cc,
        date,
        body_text,
        body_html,
        attachments,
        auto,
        warnings,
        raw_size: original.len(),
    })
}

/// The Message-ID (without brackets), and whether it was made up here: from the content
/// when missing, from a hash when too long for an index.
fn message_id(
    message: &mail_parser::Message,
    original: &[u8],
    warnings: &mut Vec<String>,
) -> (String, bool) {
    match first_id(message.header(HeaderName::MessageId)) {
        Some(id) if id.len() <= MAX_MESSAGE_ID_LEN => (id, false),
        Some(id) => {
            warnings.push(format!(
                "Message-ID was {} bytes long; replaced by a hash of it",
                id.len()
            ));
            (
                format!("long.{}@{DERIVED_ID_DOMAIN}", hex_sha256(id.as_bytes())),
                true,
            )
        }
        None => (derived_message_id(original), true),
    }
}

/// A multipart whose boundary never occurs reaches us as one "attachment" of type
/// multipart/*: its bytes are the text the sender wrote.
fn read_unbounded_multipart(
    attachments: &mut Vec<Attachment>,
    body_text: &mut String,
    warnings: &mut Vec<String>,
) {
    if let Some(pos) = attachments
        .iter()
        .position(|a| a.content_type.starts_with("multipart/"))
        && body_text.trim().is_empty()
    {
        let broken = attachments.remove(pos);
        let bytes = broken.content.unwrap_or_default();
        *body_text = normalize_newlines(&clean(&String::from_utf8_lossy(&bytes)));
        warnings.push(
            "the multipart body has no boundary lines; it was read as plain text".to_string(),
        );
    }
}

fn auto_signals(message: &mail_parser::Message) -> AutoSignals {
    let text = |name: &str| {
        message
            .header_raw(name)
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
    };
    AutoSignals {
        auto_submitted: text("Auto-Submitted"),
        x_autoreply: text("X-Autoreply").is_some() || text("X-Autorespond").is_some(),
        precedence: text("Precedence"),
        is_report: message.root_part().content_type().is_some_and(|ct| {
            ct.ctype().eq_ignore_ascii_case("multipart")
                && ct
                    .subtype()
                    .is_some_and(|s| s.eq_ignore_ascii_case("report"))
        }),
    }
}

/// A stable Message-ID for a message without one: the same bytes give the same id, whether
/// they arrive with CRLF (IMAP) or LF (a file) line ends.
pub fn derived_message_id(raw: &[u8]) -> String {
    let mut normalized = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(pos) = memchr::memmem::find(rest, b"\r\n") {
        normalized.extend_from_slice(&rest[..pos]);
        normalized.push(b'\n');
        rest = &rest[pos + 2..];
    }
    normalized.extend_from_slice(rest);
    let end = normalized
        .iter()
        .rposition(|&b| b != b'\n' && b != b'\r')
        .map_or(0, |p| p + 1);
    format!("{}@{DERIVED_ID_DOMAIN}", hex_sha256(&normalized[..end]))
}

/// Hex SHA-256 of bytes.
pub fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Replaces NUL, which Postgres refuses in text, with U+FFFD so the gap stays visible.
pub fn clean(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_string()
    }
}

/// The key a Message-ID is stored under (as [`parse`] stores it), for a Message-ID a
/// source reports before the message is downloaded; `None` when it would be stored under
/// a made-up key instead (empty or too long).
pub fn stored_message_id(id: &str) -> Option<String> {
    normalize_id(id).filter(|id| id.len() <= MAX_MESSAGE_ID_LEN)
}

pub(super) fn normalize_id(id: &str) -> Option<String> {
    let id: String = clean(id)
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    (!id.is_empty()).then_some(id)
}

fn all_ids(value: Option<&HeaderValue>) -> Vec<String> {
    match value {
        Some(HeaderValue::Text(id)) => normalize_id(id).into_iter().collect(),
        Some(HeaderValue::TextList(ids)) => ids.iter().filter_map(|id| normalize_id(id)).collect(),
        _ => Vec::new(),
    }
}

fn first_id(value: Option<&HeaderValue>) -> Option<String> {
    all_ids(value).into_iter().next()
}

fn mailboxes(address: Option<&Address>) -> Vec<Mailbox> {
    let Some(address) = address else {
        return Vec::new();
    };
    address
        .iter()
        .filter_map(|addr| {
            let email = clean(
                addr.address()?
                    .trim()
                    .trim_matches(|c| c == '<' || c == '>'),
            );
            if email.is_empty() {
                return None;
            }
            let name = addr
                .name()
                .map(|n| clean(n.trim()))
                .filter(|n| !n.is_empty() && *n != email);
            Some(Mailbox { email, name })
        })
        .collect()
}

/// The plain-text and HTML bodies. Several inline text parts (as Apple Mail sends around
/// inline images) are joined in order. Text line ends become `\n`.
fn bodies(
    message: &mail_parser::Message,
    raw: &[u8],
    warnings: &mut Vec<String>,
) -> (String, Option<String>) {
    let mut html_parts = Vec::new();
    for part in message.html_bodies() {
        if let PartType::Html(html) = &part.body {
            html_parts.push(html.as_ref());
        }
    }
    let body_html = (!html_parts.is_empty()).then(|| clean(&html_parts.join("\n")));

    let mut text_parts = Vec::new();
    for part in message.text_bodies() {
        match &part.body {
            PartType::Text(text) => {
                text_parts.push(undeclared_8bit_text(part, raw).unwrap_or_else(|| text.to_string()))
            }
            PartType::Html(html) => text_parts.push(html_to_text(html, warnings)),
            _ => {}
        }
    }
    let mut body_text = normalize_newlines(&clean(&text_parts.join("\n")));
    if body_text.trim().is_empty()
        && let Some(html) = &body_html
    {
        body_text = clean(&html_to_text(html, warnings));
    }
    (body_text, body_html)
}

fn normalize_newlines(s: &str) -> String {
    if s.contains('\r') {
        s.replace("\r\n", "\n")
    } else {
        s.to_string()
    }
}

/// Old mailers send 8-bit text without declaring a charset; mail-parser then decodes it as
/// UTF-8 and loses every accented letter. Such bytes are nearly always Windows-1252 (a
/// superset of Latin-1), so a text part with no charset (or us-ascii), no transfer
/// encoding that hides the bytes, and bytes that are not UTF-8 is decoded as that.
fn undeclared_8bit_text(part: &mail_parser::MessagePart, raw: &[u8]) -> Option<String> {
    let charset = part.content_type().and_then(|ct| ct.attribute("charset"));
    if !charset.is_none_or(|c| c.eq_ignore_ascii_case("us-ascii")) {
        return None;
    }
    let encoding = part.content_transfer_encoding().unwrap_or("7bit");
    if !["7bit", "8bit", "binary"]
        .iter()
        .any(|e| encoding.eq_ignore_ascii_case(e))
    {
        return None;
    }
    let bytes = raw.get(part.raw_body_offset() as usize..part.raw_end_offset() as usize)?;
    if std::str::from_utf8(bytes).is_ok() {
        return None;
    }
    let decode = mail_parser::decoders::charsets::map::charset_decoder(b"windows-1252")?;
    Some(decode(bytes))
}

/// The decoded subject; a raw 8-bit subject that is not UTF-8 is read as Windows-1252
/// (see [`undeclared_8bit_text`]).
fn subject(message: &mail_parser::Message, raw: &[u8]) -> String {
    let decoded = message.subject().unwrap_or_default();
    if decoded.contains('\u{FFFD}')
        && let Some(header) = message
            .root_part()
            .headers()
            .iter()
            .find(|h| h.name.eq(&HeaderName::Subject))
        && let Some(bytes) = raw.get(header.offset_start() as usize..header.offset_end() as usize)
        && std::str::from_utf8(bytes).is_err()
        && memchr::memmem::find(bytes, b"=?").is_none()
        && let Some(decode) = mail_parser::decoders::charsets::map::charset_decoder(b"windows-1252")
    {
        let text = decode(bytes);
        let unfolded: Vec<&str> = text
            .split(['\r', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        return clean(&unfolded.join(" "));
    }
    clean(decoded)
}

/// HTML to readable text with html2text (links become numbered footnotes).
///
/// html2text is run under `catch_unwind`: its input is a stranger's HTML, and a panic in a
/// dependency must cost one message its text, not the daemon. mail-parser's simpler
/// converter is the fallback.
pub fn html_to_text(html: &str, warnings: &mut Vec<String>) -> String {
    // Converting the sanitized HTML keeps `javascript:` links out of the text's footnotes.
    let converted = std::panic::catch_unwind(|| {
        html2text::config::plain()
            .string_from_read(crate::pipeline::html::sanitize(html).as_bytes(), 10_000)
            .ok()
    });
    match converted {
        Ok(Some(text)) => text.trim_end().to_string(),
        _ => {
            warnings.push(
                "the HTML body could not be converted well; a simpler conversion was used"
                    .to_string(),
            );
            mail_parser::decoders::html::html_to_text(html)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_id_ignores_line_ending_style() {
        let lf = b"Subject: x\n\nbody\n";
        let crlf = b"Subject: x\r\n\r\nbody\r\n";
        assert_eq!(derived_message_id(lf), derived_message_id(crlf));
        assert_ne!(
            derived_message_id(lf),
            derived_message_id(b"Subject: y\n\nbody\n")
        );
    }

    #[test]
    fn empty_and_headerless_input_is_refused() {
        assert_eq!(parse(b"").unwrap_err(), ParseError::Empty);
        assert_eq!(
            parse(b"\x00\x01\x02garbage without any header").unwrap_err(),
            ParseError::NoHeaders
        );
        assert_eq!(parse(b"just some text").unwrap_err(), ParseError::NoHeaders);
        assert_eq!(parse(b"\n\nbody only").unwrap_err(), ParseError::NoHeaders);
        assert!(parse(b"Subject: hi\n\nbody").is_ok());
    }
}

#[cfg(test)]
mod boundary_tests {
    use super::*;

    #[test]
    fn a_boundary_inside_a_part_no_longer_hides_text_or_attachments() {
        let raw = b"Subject: t\nContent-Type: multipart/mixed; boundary=\"XY\"\n\n--XY\nContent-Type: text/plain\n\nbefore --XY-- after\nmore\n--XY\nContent-Type: text/plain; name=a.txt\nContent-Disposition: attachment; filename=a.txt\n\nfile\n--XY--\n";
        let parsed = parse(raw).unwrap();
        assert_eq!(parsed.body_text, "before --XY-- after\nmore");
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        assert_eq!(parsed.attachments.len(), 1);
        assert_eq!(parsed.attachments[0].filename, "a.txt");
        assert_eq!(parsed.raw_size, raw.len());
    }

    #[test]
    fn a_message_that_cannot_be_repaired_keeps_the_warning_and_the_note() {
        // An RFC 2231 boundary parameter is not rewritten: the guard's warning stays.
        let raw = b"Subject: t\nContent-Type: multipart/mixed; boundary*0=\"XY\"\n\n--XY\nContent-Type: text/plain\n\nbefore --XY-- after\n--XY--\n";
        let parsed = parse(raw).unwrap();
        assert_eq!(parsed.warnings, vec![BOUNDARY_WARNING.to_string()]);
        assert!(
            parsed.body_text.contains("may be hidden"),
            "{}",
            parsed.body_text
        );
    }
}
