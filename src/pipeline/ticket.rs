//! A [`ParsedMessage`] to the rows of a new ticket: pure code, no IO, no SQL.
//!
//! Decides who the requester is, who else takes part, which attachments are kept, what
//! ticket the message may thread onto (its references and subject tag), and whether it was
//! sent by a machine. Whether those tickets exist is the store's question.

use crate::config::ParserConfig;
use crate::pipeline::mime::{Attachment, Mailbox, ParsedMessage};
use chrono::{DateTime, Utc};

/// The per-parser settings that shape a ticket (a narrow view of [`ParserConfig`]).
#[derive(Debug, Clone)]
pub struct TicketRules {
    /// Parser name: the key of every row written for it.
    pub parser: String,
    /// The mailbox's own address: never a participant of its own tickets.
    pub mailbox_email: String,
    /// Keep attachments.
    pub add_attachments: bool,
    /// Attachments larger than this keep only their name, type, size and hash.
    pub max_attachment_size: u64,
    /// Cc and other To addresses become participants.
    pub add_ccs: bool,
    /// Subject tag with `{id}` for the ticket id, e.g. `[#{id}]`.
    pub ticket_tag: String,
    /// Loop protection: at most this many new tickets per sender within `sender_window`.
    pub max_tickets_per_sender: u32,
    /// Loop protection window.
    pub sender_window: std::time::Duration,
}

impl From<&ParserConfig> for TicketRules {
    fn from(p: &ParserConfig) -> Self {
        TicketRules {
            parser: p.name.clone(),
            mailbox_email: normalize_email(&p.email),
            add_attachments: p.add_attachments,
            max_attachment_size: p.max_attachment_size,
            add_ccs: p.add_ccs,
            ticket_tag: p.ticket_tag.clone(),
            max_tickets_per_sender: p.max_tickets_per_sender,
            sender_window: p.sender_window,
        }
    }
}

/// Role of a participant, as stored in `participants.role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The person who asked.
    Requester,
    /// Someone copied.
    Cc,
}

impl Role {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Requester => "requester",
            Role::Cc => "cc",
        }
    }
}

/// A person on a ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    /// Normalized (trimmed, lower-case) address.
    pub email: String,
    /// Display name.
    pub name: Option<String>,
    /// Requester or cc.
    pub role: Role,
}

/// The rows of one incoming message.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Deduplication key together with the parser.
    pub message_id: String,
    /// True when the Message-ID was derived from the content.
    pub message_id_derived: bool,
    /// In-Reply-To.
    pub in_reply_to: Option<String>,
    /// References.
    pub references: Vec<String>,
    /// Subject.
    pub subject: String,
    /// Sender address ("" when the message names nobody).
    pub from_email: String,
    /// Sender name.
    pub from_name: Option<String>,
    /// To addresses (normalized).
    pub to: Vec<String>,
    /// Cc addresses (normalized).
    pub cc: Vec<String>,
    /// Date header.
    pub sent_at: Option<DateTime<Utc>>,
    /// Text body.
    pub body_text: String,
    /// HTML body.
    pub body_html: Option<String>,
    /// Raw size in bytes.
    pub raw_size: i64,
    /// Notes on how the message was read.
    pub warnings: Vec<String>,
    /// Why the message counts as automatic (auto-reply, bounce, own address), if it does.
    pub automatic_reason: Option<String>,
}

/// A new ticket with its first message.
#[derive(Debug, Clone)]
pub struct NewTicket {
    /// Parser that received it.
    pub parser: String,
    /// Ticket subject.
    pub subject: String,
    /// Requester address ("" when unknown).
    pub requester_email: String,
    /// Requester name.
    pub requester_name: Option<String>,
    /// The message.
    pub message: NewMessage,
    /// Requester and, with `add_ccs`, everyone copied.
    pub participants: Vec<Participant>,
    /// Attachments kept (none when `add_attachments = false`).
    pub attachments: Vec<Attachment>,
    /// Message-IDs this message answers, most recent first (In-Reply-To, then References
    /// from the end).
    pub thread_refs: Vec<String>,
    /// The ticket id named by the subject tag, if any.
    pub tagged_ticket: Option<i64>,
}

/// Lower-cases and trims an address so that one person is one participant.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Builds the ticket for one parsed message.
pub fn new_ticket(rules: &TicketRules, mut parsed: ParsedMessage) -> NewTicket {
    let mut warnings = std::mem::take(&mut parsed.warnings);
    let requester = choose_requester(&parsed, &mut warnings);
    let automatic_reason = automatic_reason(&parsed, requester.as_ref(), rules);
    let mut thread_refs: Vec<String> = parsed.in_reply_to.iter().cloned().collect();
    for r in parsed.references.iter().rev() {
        if !thread_refs.contains(r) {
            thread_refs.push(r.clone());
        }
    }
    let tagged_ticket = tagged_ticket(&parsed.subject, &rules.ticket_tag);
    let (requester_email, requester_name) = match &requester {
        Some(m) => (normalize_email(&m.email), m.name.clone()),
        None => (String::new(), None),
    };

    let participants = participants(rules, &parsed, &requester_email, &requester_name);
    let attachments = kept_attachments(rules, &mut parsed, &mut warnings);

    NewTicket {
        parser: rules.parser.clone(),
        subject: parsed.subject.clone(),
        requester_email: requester_email.clone(),
        requester_name: requester_name.clone(),
        message: NewMessage {
            message_id: parsed.message_id,
            message_id_derived: parsed.message_id_derived,
            in_reply_to: parsed.in_reply_to,
            references: parsed.references,
            subject: parsed.subject,
            from_email: requester_email,
            from_name: requester_name,
            to: parsed
                .to
                .iter()
                .map(|m| normalize_email(&m.email))
                .collect(),
            cc: parsed
                .cc
                .iter()
                .map(|m| normalize_email(&m.email))
                .collect(),
            sent_at: parsed.date,
            body_text: parsed.body_text,
            body_html: parsed
                .body_html
                .as_deref()
                .map(crate::pipeline::html::sanitize),
            raw_size: parsed.raw_size as i64,
            warnings,
            automatic_reason,
        },
        participants,
        attachments,
        thread_refs,
        tagged_ticket,
    }
}

/// The requester, and with `add_ccs` every Cc and To address but the mailbox's own, each
/// once.
fn participants(
    rules: &TicketRules,
    parsed: &ParsedMessage,
    requester_email: &str,
    requester_name: &Option<String>,
) -> Vec<Participant> {
    let mut participants = Vec::new();
    if !requester_email.is_empty() {
        participants.push(Participant {
            email: requester_email.to_string(),
            name: requester_name.clone(),
            role: Role::Requester,
        });
    }
    if rules.add_ccs {
        for m in parsed.cc.iter().chain(parsed.to.iter()) {
            let email = normalize_email(&m.email);
            if email.is_empty()
                || email == rules.mailbox_email
                || participants.iter().any(|p| p.email == email)
            {
                continue;
            }
            participants.push(Participant {
                email,
                name: m.name.clone(),
                role: Role::Cc,
            });
        }
    }
    participants
}

/// The attachments kept (none without `add_attachments`); one over
/// `max_attachment_size` keeps its name, type, size and hash but not its content.
fn kept_attachments(
    rules: &TicketRules,
    parsed: &mut ParsedMessage,
    warnings: &mut Vec<String>,
) -> Vec<Attachment> {
    let mut attachments = if rules.add_attachments {
        std::mem::take(&mut parsed.attachments)
    } else {
        Vec::new()
    };
    for a in &mut attachments {
        if a.size as u64 > rules.max_attachment_size {
            a.content = None;
            warnings.push(format!(
                "attachment {:?} ({} bytes) is over max_attachment_size ({} bytes): stored without its content",
                a.filename, a.size, rules.max_attachment_size
            ));
        }
    }
    attachments
}

/// Why a message was sent by a machine, following RFC 3834 and common practice; `None`
/// for a person's message. `X-Auto-Response-Suppress` alone does not count (Outlook sets it
/// on ordinary mail).
pub fn automatic_reason(
    parsed: &ParsedMessage,
    requester: Option<&Mailbox>,
    rules: &TicketRules,
) -> Option<String> {
    let signals = &parsed.auto;
    if let Some(value) = &signals.auto_submitted
        && value.split(';').next().is_some_and(|v| v.trim() != "no")
    {
        return Some(format!("Auto-Submitted: {value}"));
    }
    if signals.x_autoreply {
        return Some("X-Autoreply / X-Autorespond header".into());
    }
    if let Some(p) = &signals.precedence
        && ["bulk", "junk", "list", "auto_reply"].contains(&p.as_str())
    {
        return Some(format!("Precedence: {p}"));
    }
    if signals.is_report {
        return Some("delivery status report (multipart/report)".into());
    }
    let sender = requester
        .map(|m| normalize_email(&m.email))
        .unwrap_or_default();
    let local = sender.split('@').next().unwrap_or_default();
    if local == "mailer-daemon" || local == "postmaster" {
        return Some(format!("sent by {local}"));
    }
    if !sender.is_empty() && sender == rules.mailbox_email {
        return Some("sent from the parser's own address (a mail loop)".into());
    }
    None
}

/// The ticket id in a subject carrying `tag` (`{id}` marks the number), e.g. 42 for
/// "Re: [#42] Printer" with the tag "[#{id}]".
pub fn tagged_ticket(subject: &str, tag: &str) -> Option<i64> {
    let (prefix, suffix) = tag.split_once("{id}")?;
    let mut rest = subject;
    while let Some(pos) = rest.find(prefix) {
        let after = &rest[pos + prefix.len()..];
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() && after[digits.len()..].starts_with(suffix) {
            return digits.parse().ok();
        }
        rest = &rest[pos + prefix.len().max(1)..];
    }
    None
}

/// From, else Sender, else Reply-To, else Return-Path; a note says when From was missing.
fn choose_requester(parsed: &ParsedMessage, warnings: &mut Vec<String>) -> Option<Mailbox> {
    if let Some(from) = parsed.from.first() {
        return Some(from.clone());
    }
    let (fallback, header) = if let Some(sender) = &parsed.sender {
        (Some(sender.clone()), "Sender")
    } else if let Some(reply_to) = parsed.reply_to.first() {
        (Some(reply_to.clone()), "Reply-To")
    } else if let Some(path) = &parsed.return_path {
        (
            Some(Mailbox {
                email: path.clone(),
                name: None,
            }),
            "Return-Path",
        )
    } else {
        (None, "")
    };
    match &fallback {
        Some(_) => warnings.push(format!(
            "no From address; the requester was taken from {header}"
        )),
        None => warnings.push(
            "no From, Sender, Reply-To or Return-Path address: the requester is unknown"
                .to_string(),
        ),
    }
    fallback
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(add_ccs: bool, add_attachments: bool) -> TicketRules {
        TicketRules {
            parser: "support".into(),
            mailbox_email: "support@contoso.com".into(),
            add_attachments,
            max_attachment_size: 1 << 20,
            add_ccs,
            ticket_tag: "[#{id}]".into(),
            max_tickets_per_sender: 20,
            sender_window: std::time::Duration::from_secs(600),
        }
    }

    #[test]
    fn subject_tags() {
        assert_eq!(tagged_ticket("Re: [#42] Printer", "[#{id}]"), Some(42));
        assert_eq!(tagged_ticket("[#] no [#7x] [#9]", "[#{id}]"), Some(9));
        assert_eq!(tagged_ticket("Ticket#123: x", "Ticket#{id}:"), Some(123));
        assert_eq!(tagged_ticket("no tag", "[#{id}]"), None);
    }

    const MAIL: &[u8] = b"From: Ann <ANN@Example.com>\r\nTo: support@contoso.com, Bob <bob@example.com>\r\nCc: Carol <carol@example.com>, ann@example.com, Support@Contoso.com\r\nSubject: help\r\nMessage-ID: <1@x>\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: application/pdf; name=a.pdf\r\n\r\n%PDF\r\n--b--\r\n";

    #[test]
    fn ccs_exclude_the_mailbox_and_the_requester() {
        let t = new_ticket(
            &rules(true, true),
            crate::pipeline::mime::parse(MAIL).unwrap(),
        );
        let got: Vec<(&str, Role)> = t
            .participants
            .iter()
            .map(|p| (p.email.as_str(), p.role))
            .collect();
        assert_eq!(
            got,
            vec![
                ("ann@example.com", Role::Requester),
                ("carol@example.com", Role::Cc),
                ("bob@example.com", Role::Cc),
            ]
        );
    }

    #[test]
    fn without_add_ccs_only_the_requester_and_no_attachments_when_off() {
        let t = new_ticket(
            &rules(false, false),
            crate::pipeline::mime::parse(MAIL).unwrap(),
        );
        assert_eq!(t.participants.len(), 1);
        assert!(t.attachments.is_empty());
        let t = new_ticket(
            &rules(false, true),
            crate::pipeline::mime::parse(MAIL).unwrap(),
        );
        assert_eq!(t.attachments.len(), 1);
    }

    #[test]
    fn requester_falls_back_to_sender_then_reply_to_then_return_path() {
        let cases: [(&[u8], &str); 4] = [
            (
                b"Sender: s@x.com\r\nReply-To: r@x.com\r\nSubject: a\r\n\r\nb",
                "s@x.com",
            ),
            (
                b"Reply-To: r@x.com\r\nReturn-Path: <p@x.com>\r\nSubject: a\r\n\r\nb",
                "r@x.com",
            ),
            (b"Return-Path: <p@x.com>\r\nSubject: a\r\n\r\nb", "p@x.com"),
            (b"Subject: a\r\n\r\nb", ""),
        ];
        for (raw, want) in cases {
            let t = new_ticket(
                &rules(false, true),
                crate::pipeline::mime::parse(raw).unwrap(),
            );
            assert_eq!(t.requester_email, want);
            assert!(!t.message.warnings.is_empty());
        }
    }
}
