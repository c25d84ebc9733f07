//! Repairs messages whose MIME boundary string appears inside a part (pure, no IO).
//!
//! mail-parser 0.11 splits a multipart at any `--<boundary>` it meets, also mid-line or at
//! the start of a line that goes on with text (upstream #156); followed by `--` it drops
//! every later part. RFC 2046 section 5.1.1 says only a *delimiter line* separates parts:
//! `--` boundary, optional linear white space, end of line (the close delimiter has `--`
//! after the boundary). [`rewrite`] reads the multipart structure by that rule and gives
//! every multipart a fresh boundary that occurs nowhere in the message: each proper
//! delimiter line and each `boundary=` parameter is rewritten, every other byte stays as
//! it was. The rewritten bytes then parse whole with mail-parser.
//!
//! Hand-written on purpose: mail-parser's own structure is exactly what is wrong for these
//! messages, and no maintained crate exposes byte offsets of delimiter lines.

use std::ops::Range;

/// Nesting deeper than this is left as it is (mail-parser stops well before).
const MAX_DEPTH: usize = 64;

/// The message with every multipart's boundary replaced by a fresh one, or `None` when
/// there is no multipart or a boundary parameter cannot be rewritten safely (an RFC 2231
/// `boundary*=` form, for example).
pub fn rewrite(raw: &[u8]) -> Option<Vec<u8>> {
    let mut rewriter = Rewriter {
        raw,
        edits: Vec::new(),
        fresh: FreshBoundaries::new(raw),
        failed: false,
    };
    rewriter.entity(0..raw.len(), false, 0);
    if rewriter.failed || rewriter.edits.is_empty() {
        return None;
    }
    let mut edits = rewriter.edits;
    edits.sort_by_key(|(range, _)| range.start);
    let mut out = Vec::with_capacity(raw.len() + edits.len() * 8);
    let mut at = 0;
    for (range, replacement) in edits {
        if range.start < at {
            return None; // overlapping edits: never expected; give up rather than guess
        }
        out.extend_from_slice(&raw[at..range.start]);
        out.extend_from_slice(&replacement);
        at = range.end;
    }
    out.extend_from_slice(&raw[at..]);
    Some(out)
}

struct Rewriter<'a> {
    raw: &'a [u8],
    /// (bytes to replace, replacement), non-overlapping.
    edits: Vec<(Range<usize>, Vec<u8>)>,
    fresh: FreshBoundaries,
    failed: bool,
}

impl Rewriter<'_> {
    /// One MIME entity (header and body) in `range`. `digest_part`: a part of a
    /// multipart/digest, whose default type is message/rfc822.
    fn entity(&mut self, range: Range<usize>, digest_part: bool, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        let (header, body) = split_header(self.raw, range);
        let content_type = find_field(self.raw, header, b"content-type");
        let media = content_type
            .as_ref()
            .map(|value| media_type(&self.raw[value.clone()]))
            .unwrap_or_else(|| {
                if digest_part {
                    b"message/rfc822".to_vec()
                } else {
                    b"text/plain".to_vec()
                }
            });
        if media.starts_with(b"multipart/") {
            let Some(value) = content_type else { return };
            match boundary_param(self.raw, value) {
                Param::Found { range, boundary } => {
                    let fresh = self.fresh.next();
                    self.edits
                        .push((range, format!("\"{fresh}\"").into_bytes()));
                    let digest = media == b"multipart/digest";
                    self.multipart_body(body, &boundary, &fresh, digest, depth);
                }
                Param::Unsupported => self.failed = true,
                Param::Missing => {}
            }
        } else if media == b"message/rfc822" || media == b"message/global" {
            self.entity(body, false, depth + 1);
        }
    }

    /// The body of a multipart: rewrites its delimiter lines and reads each part.
    fn multipart_body(
        &mut self,
        body: Range<usize>,
        boundary: &[u8],
        fresh: &str,
        digest: bool,
        depth: usize,
    ) {
        let body_end = body.end;
        let mut part_start: Option<usize> = None;
        for line in lines(self.raw, body) {
            let Some(close) = delimiter(&self.raw[line.clone()], boundary) else {
                continue;
            };
            let name = line.start + 2..line.start + 2 + boundary.len();
            self.edits.push((name, fresh.as_bytes().to_vec()));
            if let Some(start) = part_start {
                self.entity(start..line.start, digest, depth + 1);
            }
            if close {
                return; // what follows is the epilogue
            }
            part_start = Some(line.end);
        }
        // No close delimiter: the last part runs to the end of the body.
        if let Some(start) = part_start {
            self.entity(start..body_end, digest, depth + 1);
        }
    }
}

/// Boundaries of the form `m2t.<hash>.<n>.x`: none is a prefix of another, and each is
/// checked not to occur in the message.
struct FreshBoundaries {
    base: String,
    next: usize,
    raw_lowercase: Vec<u8>,
}

impl FreshBoundaries {
    fn new(raw: &[u8]) -> Self {
        let hash = crate::pipeline::mime::hex_sha256(raw);
        FreshBoundaries {
            base: format!("m2t.{}", &hash[..24]),
            next: 1,
            raw_lowercase: raw.to_ascii_lowercase(),
        }
    }

    fn next(&mut self) -> String {
        loop {
            let candidate = format!("{}.{}.x", self.base, self.next);
            self.next += 1;
            if memchr::memmem::find(&self.raw_lowercase, candidate.as_bytes()).is_none() {
                return candidate;
            }
        }
    }
}

/// Lines of `range` (each with its line end), as byte ranges.
fn lines(raw: &[u8], range: Range<usize>) -> impl Iterator<Item = Range<usize>> + '_ {
    let end = range.end;
    let mut at = range.start;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let stop = memchr::memchr(b'\n', &raw[at..end]).map_or(end, |p| at + p + 1);
        let line = at..stop;
        at = stop;
        Some(line)
    })
}

/// `Some(false)` for a delimiter line of `boundary`, `Some(true)` for its close delimiter
/// line, `None` for any other line (RFC 2046 section 5.1.1).
fn delimiter(line: &[u8], boundary: &[u8]) -> Option<bool> {
    let rest = line.strip_prefix(b"--")?.strip_prefix(boundary)?;
    let (close, rest) = match rest.strip_prefix(b"--") {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    rest.iter()
        .all(|&b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .then_some(close)
}

/// The header and body of an entity: the header ends at the first empty line.
fn split_header(raw: &[u8], range: Range<usize>) -> (Range<usize>, Range<usize>) {
    for line in lines(raw, range.clone()) {
        let text = &raw[line.clone()];
        if text == b"\n" || text == b"\r\n" {
            return (range.start..line.start, line.end..range.end);
        }
    }
    (range.clone(), range.end..range.end)
}

/// The value (after the colon, folding included) of the first header field `name`.
fn find_field(raw: &[u8], header: Range<usize>, name: &[u8]) -> Option<Range<usize>> {
    let mut found: Option<Range<usize>> = None;
    for line in lines(raw, header) {
        let text = &raw[line.clone()];
        let folded = matches!(text.first(), Some(b' ' | b'\t'));
        match (&mut found, folded) {
            (Some(value), true) => value.end = line.end,
            (Some(_), false) => break,
            (None, false) => {
                if let Some(colon) = memchr::memchr(b':', text)
                    && text[..colon].trim_ascii().eq_ignore_ascii_case(name)
                {
                    found = Some(line.start + colon + 1..line.end);
                }
            }
            (None, true) => {}
        }
    }
    found
}

/// Lower-case `type/subtype` of a Content-Type value.
fn media_type(value: &[u8]) -> Vec<u8> {
    let end = memchr::memchr(b';', value).unwrap_or(value.len());
    value[..end]
        .iter()
        .filter(|b| !b.is_ascii_whitespace())
        .map(u8::to_ascii_lowercase)
        .collect()
}

/// What became of the search for the `boundary` parameter.
enum Param {
    /// `range` covers the value as written (with its quotes); `boundary` is the value.
    Found {
        range: Range<usize>,
        boundary: Vec<u8>,
    },
    /// A form this module does not rewrite (RFC 2231 `boundary*=`).
    Unsupported,
    /// No boundary parameter.
    Missing,
}

/// Finds the `boundary` parameter in the Content-Type value at `value` (a range of `raw`).
fn boundary_param(raw: &[u8], value: Range<usize>) -> Param {
    let text = &raw[value.clone()];
    let mut at = 0;
    // Skip the media type.
    while at < text.len() && text[at] != b';' {
        at += 1;
    }
    while at < text.len() {
        at += 1; // the ';'
        while at < text.len() && text[at].is_ascii_whitespace() {
            at += 1;
        }
        let name_start = at;
        while at < text.len() && !matches!(text[at], b'=' | b';') {
            at += 1;
        }
        let name = text[name_start..at].trim_ascii();
        let has_value = at < text.len() && text[at] == b'=';
        if has_value {
            at += 1;
        }
        while at < text.len() && matches!(text[at], b' ' | b'\t' | b'\r' | b'\n') {
            at += 1;
        }
        let value_start = at;
        let mut unquoted = Vec::new();
        if at < text.len() && text[at] == b'"' {
            at += 1;
            while at < text.len() && text[at] != b'"' {
                if text[at] == b'\\' && at + 1 < text.len() {
                    at += 1;
                }
                unquoted.push(text[at]);
                at += 1;
            }
            at = (at + 1).min(text.len()); // the closing quote
        } else {
            while at < text.len() && !matches!(text[at], b';' | b' ' | b'\t' | b'\r' | b'\n') {
                unquoted.push(text[at]);
                at += 1;
            }
        }
        let value_end = at;
        if name.eq_ignore_ascii_case(b"boundary") && has_value && !unquoted.is_empty() {
            return Param::Found {
                range: value.start + value_start..value.start + value_end,
                boundary: unquoted,
            };
        }
        if name.len() >= 9 && name[..9].eq_ignore_ascii_case(b"boundary*") {
            return Param::Unsupported;
        }
        while at < text.len() && text[at] != b';' {
            at += 1;
        }
    }
    Param::Missing
}

/// True when some multipart boundary of the message occurs in the raw bytes anywhere but
/// on a proper delimiter line: mail-parser 0.11 splits at such an occurrence and loses
/// text (upstream issue #156). This is the guard that sends a message to [`rewrite`].
pub fn is_misplaced(message: &mail_parser::Message, raw: &[u8]) -> bool {
    use mail_parser::MimeHeaders;
    let boundaries: Vec<&str> = message
        .parts
        .iter()
        .filter(|p| p.is_multipart())
        .filter_map(|p| p.content_type()?.attribute("boundary"))
        .filter(|b| !b.is_empty())
        .collect();
    boundaries.iter().any(|boundary| {
        let needle = format!("--{boundary}");
        memchr::memmem::find_iter(raw, needle.as_bytes()).any(|at| {
            // A longer boundary that starts with this one ("--abc-1" vs "--abc") is fine.
            !boundaries
                .iter()
                .any(|b| is_delimiter_line(raw, at, b.as_bytes()))
        })
    })
}

/// True when the line starting at `at` is a delimiter line of `boundary`.
fn is_delimiter_line(raw: &[u8], at: usize, boundary: &[u8]) -> bool {
    if at > 0 && raw[at - 1] != b'\n' {
        return false;
    }
    let end = memchr::memchr(b'\n', &raw[at..]).map_or(raw.len(), |p| at + p + 1);
    delimiter(&raw[at..end], boundary).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delimiter_line_rules() {
        let raw = b"--b\r\nx\n--b--  \n--b tail\n";
        assert!(is_delimiter_line(raw, 0, b"b"));
        assert!(is_delimiter_line(raw, 7, b"b"));
        assert!(!is_delimiter_line(raw, 15, b"b"));
        assert!(!is_delimiter_line(raw, 6, b"b"));
    }

    #[test]
    fn only_delimiter_lines_and_the_parameter_change() {
        let raw = b"Content-Type: multipart/mixed; boundary=\"XY\"\r\n\r\n--XY\r\n\r\na --XY b\r\n--XY tail\r\n--XY--  \r\nepilogue --XY\r\n--XY\r\n";
        let out = String::from_utf8(rewrite(raw).unwrap()).unwrap();
        let fresh = out.split('"').nth(1).unwrap().to_string();
        assert!(fresh.starts_with("m2t."), "{out}");
        assert_eq!(
            out,
            format!(
                "Content-Type: multipart/mixed; boundary=\"{fresh}\"\r\n\r\n--{fresh}\r\n\r\na --XY b\r\n--XY tail\r\n--{fresh}--  \r\nepilogue --XY\r\n--XY\r\n"
            )
        );
    }

    #[test]
    fn nested_multiparts_and_folded_headers_get_their_own_boundaries() {
        let raw = b"Content-Type: multipart/mixed;\n boundary=abc\n\n--abc\nContent-Type: multipart/alternative; boundary=\"abc-1\"\n\n--abc-1\n\nx\n--abc-1--\n--abc--\n";
        let out = String::from_utf8(rewrite(raw).unwrap()).unwrap();
        assert!(!out.contains("abc"), "{out}");
        assert_eq!(out.matches(".1.x").count(), 3, "{out}");
        assert_eq!(out.matches(".2.x").count(), 3, "{out}");
    }

    #[test]
    fn forwarded_messages_are_read_inside() {
        let raw = b"Content-Type: multipart/mixed; boundary=o\n\n--o\nContent-Type: message/rfc822\n\nContent-Type: multipart/mixed; boundary=i\n\n--i\n\ntext --i text\n--i--\n--o--\n";
        let out = String::from_utf8(rewrite(raw).unwrap()).unwrap();
        assert!(out.contains("text --i text"), "{out}");
        assert!(
            !out.contains("\n--i\n") && !out.contains("boundary=i"),
            "{out}"
        );
    }

    #[test]
    fn unsupported_or_absent_parameters_are_left_alone() {
        assert!(rewrite(b"Content-Type: multipart/mixed; boundary*0=ab\n\n--ab\n").is_none());
        assert!(rewrite(b"Content-Type: text/plain\n\n--ab\n").is_none());
        assert!(rewrite(b"Subject: x\n\nbody").is_none());
    }

    #[test]
    fn a_fresh_boundary_never_occurs_in_the_message() {
        let base = format!("m2t.{}", &crate::pipeline::mime::hex_sha256(b"x")[..24]);
        let mut fresh = FreshBoundaries::new(b"x");
        fresh.raw_lowercase = format!("{base}.1.x {base}.2.x").into_bytes();
        assert_eq!(fresh.next(), format!("{base}.3.x"));
    }
}
