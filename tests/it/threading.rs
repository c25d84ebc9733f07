//! The service-desk rules on realistic mail, through the real pipeline and Postgres:
//! replies thread (Gmail, Outlook, Thunderbird styles, subject tag), automatic mail is
//! appended when it threads and held back when it does not, replies never cross parsers,
//! and loop protection holds back a flood from one sender.

use crate::support::env::TestEnv;
use mail2ticket::pipeline::{self, Outcome, Pipeline};
use std::collections::HashMap;

/// What a step must lead to; the letters name tickets opened earlier in the scenario.
#[derive(Debug)]
enum Expect {
    New(&'static str),
    Append(&'static str),
    Held(&'static str),
}

struct Step {
    what: &'static str,
    parser: &'static str,
    raw: String,
    expect: Expect,
}

fn step(what: &'static str, parser: &'static str, raw: &str, expect: Expect) -> Step {
    Step {
        what,
        parser,
        raw: raw.replace('\n', "\r\n"),
        expect,
    }
}

#[tokio::test]
async fn replies_thread_and_automatic_mail_is_appended_or_held() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let pipelines: HashMap<&str, Pipeline> = [
        ("support", env.pipeline("support", "add_ccs = true")),
        ("sales", env.pipeline("sales", "")),
    ]
    .into_iter()
    .collect();
    let steps = vec![
        step("Gmail original", "support", "From: Ann Lee <ann.lee@gmail.com>
To: support@contoso.com
Subject: Printer offline again
Date: Mon, 23 Nov 2026 09:00:00 +0000
Message-ID: <CAF=gmail-orig-1@mail.gmail.com>
Content-Type: text/plain; charset=UTF-8

The printer on floor 3 is offline again.
", Expect::New("A")),
        step("Gmail reply", "support", "From: Ann Lee <ann.lee@gmail.com>
To: support@contoso.com
Subject: Re: Printer offline again
Date: Mon, 23 Nov 2026 10:00:00 +0000
Message-ID: <CAF=gmail-reply-2@mail.gmail.com>
In-Reply-To: <CAF=gmail-orig-1@mail.gmail.com>
References: <CAF=gmail-orig-1@mail.gmail.com>
Content-Type: text/plain; charset=UTF-8

Still offline.

On Mon, Nov 23, 2026 at 9:00 AM Ann Lee <ann.lee@gmail.com> wrote:
> The printer on floor 3 is offline again.
", Expect::Append("A")),
        step("Outlook reply by a colleague, References only", "support", "From: Bob Stone <bob.stone@ann-corp.example>
To: \"support@contoso.com\" <support@contoso.com>
CC: Carol Diaz <carol.diaz@ann-corp.example>
Subject: RE: Printer offline again
Thread-Topic: Printer offline again
Thread-Index: AQHZ1234abcd
Date: Mon, 23 Nov 2026 11:00:00 +0000
Message-ID: <AM0PR01MB1234ABCD@AM0PR01MB1234.eurprd01.prod.outlook.com>
References: <CAF=gmail-orig-1@mail.gmail.com> <CAF=gmail-reply-2@mail.gmail.com>
X-MS-Has-Attach:
X-Auto-Response-Suppress: All
Content-Type: text/plain; charset=\"us-ascii\"

Same here on floor 4.
", Expect::Append("A")),
        step("Thunderbird reply to the colleague", "support", "From: Ann Lee <ann.lee@gmail.com>
To: support@contoso.com
Subject: Re: Printer offline again
Message-ID: <5f0e1c2a-tb-3@gmail.com>
In-Reply-To: <AM0PR01MB1234ABCD@AM0PR01MB1234.eurprd01.prod.outlook.com>
References: <CAF=gmail-orig-1@mail.gmail.com>
 <CAF=gmail-reply-2@mail.gmail.com>
 <AM0PR01MB1234ABCD@AM0PR01MB1234.eurprd01.prod.outlook.com>
User-Agent: Mozilla Thunderbird
Content-Type: text/plain; charset=UTF-8; format=flowed

Thanks Bob.
", Expect::Append("A")),
        step("reply that only carries the ticket tag", "support", "From: Ann Lee <ann.lee@gmail.com>
To: support@contoso.com
Subject: Re: [#{A}] Printer offline again
Message-ID: <tag-only-5@gmail.com>
In-Reply-To: <helpdesk-outbound-77@contoso.com>

Any news?
", Expect::Append("A")),
        step("Exchange out-of-office that threads", "support", "From: Bob Stone <bob.stone@ann-corp.example>
To: support@contoso.com
Subject: Automatic reply: Printer offline again
Message-ID: <AM0PR01MB9999OOF@AM0PR01MB1234.eurprd01.prod.outlook.com>
In-Reply-To: <helpdesk-outbound-78@contoso.com>
References: <CAF=gmail-orig-1@mail.gmail.com> <helpdesk-outbound-78@contoso.com>
Auto-Submitted: auto-generated
X-Auto-Response-Suppress: All
X-MS-Exchange-Inbox-Rules-Loop: bob.stone@ann-corp.example
Content-Type: text/plain

I am out of the office until Monday.
", Expect::Append("A")),
        step("Gmail vacation reply that threads nowhere", "support", "From: Dan Park <dan.park@gmail.com>
To: support@contoso.com
Subject: Out of office
Message-ID: <CAF=vacation-7@mail.gmail.com>
In-Reply-To: <helpdesk-newsletter-1@contoso.com>
Auto-Submitted: auto-replied
Precedence: bulk
Content-Type: text/plain; charset=UTF-8

I am on vacation.
", Expect::Held("automatic")),
        step("a bounce for mail the desk sent", "support", "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>
To: support@contoso.com
Subject: Undelivered Mail Returned to Sender
Message-ID: <bounce-8@mx.example.net>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary=\"b8\"

--b8
Content-Type: text/plain

This is the mail system at host mx.example.net. I'm sorry to have to inform you that your message could not be delivered.
--b8
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net
Final-Recipient: rfc822; gone@example.net
Action: failed
Status: 5.1.1
--b8--
", Expect::Held("automatic")),
        step("mail from the parser's own address", "support", "From: Support <support@contoso.com>
To: support@contoso.com
Subject: Your request was received
Message-ID: <own-9@contoso.com>

We received your request.
", Expect::Held("automatic")),
        step("a newsletter (Precedence: list)", "support", "From: news@vendor.example
To: support@contoso.com
Subject: November news
Message-ID: <news-10@vendor.example>
Precedence: list
List-Id: <news.vendor.example>

News.
", Expect::Held("automatic")),
        step("X-Auto-Response-Suppress alone is a person's mail", "support", "From: Eve Moss <eve.moss@contoso-partner.example>
To: support@contoso.com
Subject: VPN token
Message-ID: <AM0PR02MB5555@AM0PR02MB5555.eurprd02.prod.outlook.com>
X-Auto-Response-Suppress: All
Content-Type: text/plain

My VPN token expired.
", Expect::New("B")),
        step("a reply to a support message arriving at sales does not cross parsers", "sales", "From: Ann Lee <ann.lee@gmail.com>
To: sales@contoso.com
Subject: Re: Printer offline again
Message-ID: <CAF=gmail-cross-12@mail.gmail.com>
In-Reply-To: <CAF=gmail-orig-1@mail.gmail.com>
References: <CAF=gmail-orig-1@mail.gmail.com>

Also, can I buy a new printer?
", Expect::New("C")),
        step("a tag naming another parser's ticket does not cross parsers", "sales", "From: Ann Lee <ann.lee@gmail.com>
To: sales@contoso.com
Subject: Re: [#{A}] quote
Message-ID: <cross-tag-13@gmail.com>

Quote please.
", Expect::New("D")),
    ];

    let mut tickets: HashMap<&str, i64> = HashMap::new();
    for s in steps {
        let mut raw = s.raw.clone();
        for (label, id) in &tickets {
            raw = raw.replace(&format!("{{{label}}}"), &id.to_string());
        }
        let outcome = pipeline::ingest_one(&db.pool, &pipelines[s.parser], raw.as_bytes())
            .await
            .unwrap();
        match (&s.expect, &outcome) {
            (Expect::New(label), Outcome::Created { ticket_id }) => {
                tickets.insert(label, *ticket_id);
            }
            (Expect::Append(label), Outcome::Appended { ticket_id })
                if tickets[label] == *ticket_id => {}
            (Expect::Held(kind), Outcome::Held { id, .. }) => {
                let got: String = sqlx::query_scalar("select kind from quarantine where id = $1")
                    .bind(id)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
                assert_eq!(&got, kind, "{}", s.what);
            }
            (expect, got) => panic!("{}: expected {expect:?}, got {got:?}", s.what),
        }
        // Replaying any message changes nothing.
        let again = pipeline::ingest_one(&db.pool, &pipelines[s.parser], raw.as_bytes())
            .await
            .unwrap();
        assert!(
            matches!(
                again,
                Outcome::Duplicate { .. } | Outcome::DuplicateQuarantined { .. }
            ),
            "{}: {again:?}",
            s.what
        );
    }

    let a = tickets["A"];
    let messages: i64 =
        sqlx::query_scalar("select count(*) from ticket_messages where ticket_id = $1")
            .bind(a)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        messages, 6,
        "original, three replies, the tagged reply and the out-of-office"
    );
    let people: Vec<(String, String)> =
        sqlx::query_as("select email, role from participants where ticket_id = $1 order by email")
            .bind(a)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        people,
        vec![
            ("ann.lee@gmail.com".to_string(), "requester".to_string()),
            ("bob.stone@ann-corp.example".to_string(), "cc".to_string()),
            ("carol.diaz@ann-corp.example".to_string(), "cc".to_string()),
        ]
    );
    let (moved, ooo): (bool, Option<String>) = sqlx::query_as(
        "select t.updated_at > t.created_at,
                (select automatic_reason from ticket_messages m where m.ticket_id = t.id and m.subject like 'Automatic reply%')
         from tickets t where t.id = $1",
    )
    .bind(a)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(moved, "updated_at moves with each appended message");
    assert_eq!(ooo.as_deref(), Some("Auto-Submitted: auto-generated"));
    let held_raw: i64 = sqlx::query_scalar(
        "select count(*) from quarantine where kind = 'automatic' and length(raw) > 0",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(held_raw, 4, "held messages keep their raw bytes");
}

#[tokio::test]
async fn loop_protection_holds_back_a_flood_from_one_sender() {
    let env = TestEnv::database().await;
    let db = &env.db;
    let p = env.pipeline("support", "max_tickets_per_sender = 3\nsender_window = 600");
    let mut outcomes = Vec::new();
    for n in 0..5 {
        let raw = format!(
            "From: robot@monitoring.example\r\nTo: support@contoso.com\r\nSubject: Alert {n}\r\nMessage-ID: <alert-{n}@monitoring.example>\r\n\r\nDisk full.\r\n"
        );
        outcomes.push(
            pipeline::ingest_one(&db.pool, &p, raw.as_bytes())
                .await
                .unwrap(),
        );
    }
    let created = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Created { .. }))
        .count();
    let held = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Held { .. }))
        .count();
    assert_eq!((created, held), (3, 2), "{outcomes:?}");
    let loops: i64 = sqlx::query_scalar("select count(*) from quarantine where kind = 'loop' and sender = 'robot@monitoring.example'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(loops, 2);
    // Another sender is not affected.
    let other =
        "From: human@example.com\r\nSubject: hi\r\nMessage-ID: <h-1@example.com>\r\n\r\nhello\r\n";
    assert!(matches!(
        pipeline::ingest_one(&db.pool, &p, other.as_bytes())
            .await
            .unwrap(),
        Outcome::Created { .. }
    ));
}
