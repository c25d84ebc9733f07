//! Property tests: no input makes the MIME parser or the ticket mapping panic, and what
//! they produce is always storable (no NUL in text, safe file names).

use crate::support;
use mail2ticket::pipeline::ticket::TicketRules;
use mail2ticket::pipeline::{Decision, Pipeline, decide};
use proptest::prelude::*;

fn pipeline() -> Pipeline {
    Pipeline {
        rules: TicketRules {
            parser: "fuzz".into(),
            mailbox_email: "support@contoso.com".into(),
            add_attachments: true,
            max_attachment_size: 1 << 20,
            add_ccs: true,
            ticket_tag: "[#{id}]".into(),
            max_tickets_per_sender: 20,
            sender_window: std::time::Duration::from_secs(600),
        },
        max_message_size: 1 << 20,
        keep_raw: true,
        attachments_in_raw: false,
    }
}

fn corpus() -> Vec<Vec<u8>> {
    support::corpus_files()
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

fn check_storable(raw: &[u8]) {
    match decide(&pipeline(), raw) {
        Decision::Quarantine(reason) => assert!(!reason.is_empty()),
        Decision::Ticket(t) => {
            let m = &t.message;
            for text in [
                &t.subject,
                &t.requester_email,
                &m.message_id,
                &m.body_text,
                &m.from_email,
            ] {
                assert!(!text.contains('\0'));
            }
            assert!(!m.message_id.is_empty());
            assert!(m.message_id.len() <= 512 + 64);
            if let Some(html) = &m.body_html {
                assert!(!html.contains('\0'));
            }
            for a in &t.attachments {
                assert!(!a.filename.is_empty());
                assert!(!a.filename.contains(['/', '\\', '\0']));
                assert!(!a.filename.starts_with('.'));
                assert!(!a.content_type.contains('\0'));
            }
        }
    }
}

/// Mutations of real messages: cut, byte flips, duplicated slices.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let corpus = corpus();
    (
        0..corpus.len(),
        any::<u64>(),
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        0usize..4,
    )
        .prop_map(move |(i, cut, flips, dup)| {
            let mut raw = corpus[i].clone();
            if !raw.is_empty() {
                raw.truncate((cut as usize % raw.len()) + 1);
                for (pos, byte) in flips {
                    let len = raw.len();
                    raw[pos % len] = byte;
                }
                for _ in 0..dup {
                    let half = raw[raw.len() / 2..].to_vec();
                    raw.extend_from_slice(&half);
                }
            }
            raw
        })
}

/// Header-and-MIME-shaped noise, more likely than random bytes to reach deep code.
fn mime_shaped() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just("Content-Type: multipart/mixed; boundary=\"b\"\r\n".to_string()),
        Just("Content-Type: multipart/alternative; boundary=b\r\n".to_string()),
        Just("Content-Type: text/html; charset=iso-2022-jp\r\n".to_string()),
        Just("Content-Type: message/rfc822\r\n".to_string()),
        Just("Content-Transfer-Encoding: base64\r\n".to_string()),
        Just("Content-Transfer-Encoding: quoted-printable\r\n".to_string()),
        Just(
            "Content-Disposition: attachment; filename*0*=utf-8''%E2%82; filename*1=\"../x\"\r\n"
                .to_string()
        ),
        Just("From: =?utf-8?B?////?= <@>\r\n".to_string()),
        Just("Subject: =?gb2312?Q?=FF=FE?=\r\n".to_string()),
        Just("\r\n".to_string()),
        Just("--b\r\n".to_string()),
        Just("--b--\r\n".to_string()),
        Just("<html><body><table><tr><td><img src=cid:x>".to_string()),
        "[ -~]{0,40}\r\n",
    ];
    prop::collection::vec(piece, 0..40).prop_map(|parts| parts.concat().into_bytes())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(raw in prop::collection::vec(any::<u8>(), 0..4096)) {
        check_storable(&raw);
    }

    #[test]
    fn mutated_real_messages_never_panic(raw in mutated()) {
        check_storable(&raw);
    }

    #[test]
    fn mime_shaped_noise_never_panics(raw in mime_shaped()) {
        check_storable(&raw);
    }

    #[test]
    fn tnef_shaped_noise_never_panics(body in prop::collection::vec(any::<u8>(), 0..2048), level in 1u8..3) {
        // The TNEF signature, then attribute-shaped records with random ids and lengths.
        let mut data = vec![0x78, 0x9F, 0x3E, 0x22, 0, 0];
        for chunk in body.chunks(16) {
            data.push(level);
            data.extend_from_slice(chunk);
        }
        for file in mail2ticket::pipeline::tnef::files(&data) {
            prop_assert!(!file.data.is_empty());
        }
    }

    /// The check that keeps an attachment only inside the raw message answers as decoding
    /// the text without its whitespace would: for base64 of the content with line breaks,
    /// spaces and tabs anywhere, and for the same text with one byte changed.
    #[test]
    fn base64_in_raw_check_agrees_with_decoding(
        content in prop::collection::vec(any::<u8>(), 0..300),
        breaks in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(vec![&b"\r\n"[..], b"\n", b" ", b"\t", b"\r\n\r\n"])), 0..12),
        change in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
    ) {
        use base64::Engine;
        let engine = base64::engine::general_purpose::STANDARD;
        let mut text = engine.encode(&content).into_bytes();
        for (at, gap) in breaks {
            let at = at.index(text.len() + 1);
            text.splice(at..at, gap.iter().copied());
        }
        if let Some((at, byte)) = change.filter(|_| !text.is_empty()) {
            let at = at.index(text.len());
            text[at] = byte;
        }
        let compact: Vec<u8> = text.iter().copied().filter(|b| !b" \t\r\n".contains(b)).collect();
        let decodes = engine.decode(&compact).is_ok_and(|d| d == content);
        prop_assert_eq!(mail2ticket::pipeline::attachments::base64_decodes_to(&text, &content), decodes);
    }
}

#[test]
fn deeply_nested_multiparts_do_not_overflow_the_stack() {
    let mut raw = String::from("From: a@b.c\r\nSubject: deep\r\n");
    for depth in 0..200 {
        raw.push_str(&format!(
            "Content-Type: multipart/mixed; boundary=\"b{depth}\"\r\n\r\n--b{depth}\r\n"
        ));
    }
    raw.push_str("Content-Type: text/plain\r\n\r\ndeep text\r\n");
    let html = format!(
        "From: a@b.c\r\nContent-Type: text/html\r\n\r\n{}x",
        "<div>".repeat(5000)
    );
    for raw in [raw.into_bytes(), html.into_bytes()] {
        let handle = std::thread::Builder::new()
            .stack_size(2 << 20) // a tokio worker's default stack
            .spawn(move || check_storable(&raw))
            .unwrap();
        handle.join().expect("no panic or stack overflow");
    }
}
