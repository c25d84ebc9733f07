//! `GET /status`: the status as an HTML page for a person. No JavaScript (it refreshes
//! itself with a meta refresh), no secret, token or message body, and every string escaped:
//! parser names are configured, but addresses and server errors are attacker-controlled.

use crate::auth::CredentialStatus;
use crate::ops::cluster::ClusterView;
use crate::runtime::state::MailboxStatus;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::fmt::Write;

/// The page for these mailboxes and credentials.
pub fn render(
    mailboxes: &[MailboxStatus],
    credentials: &[CredentialStatus],
    webhooks: &[crate::webhooks::EndpointStatus],
    cluster: &ClusterView,
    quarantine_pending: &HashMap<String, i64>,
    started_at: DateTime<Utc>,
) -> String {
    let mut page = String::from(HEAD);
    let _ = write!(
        page,
        "<h1>mail2ticket {}</h1>\n<p>Running since {} UTC; this page refreshes every 15 s.</p>\n",
        esc(env!("CARGO_PKG_VERSION")),
        time(Some(started_at))
    );
    page.push_str("<h2>Mailboxes</h2>\n<table id=\"mailboxes\">\n<tr><th>Mailbox</th><th>Address</th><th>State</th><th>Since</th><th>Last success</th><th>Backlog</th><th>Created</th><th>Appended</th><th>Held</th><th>Quarantined</th><th>Waiting in quarantine</th><th>Last error</th><th>Fix</th></tr>\n");
    for m in mailboxes {
        let t = &m.messages_total;
        let pending = quarantine_pending.get(&m.parser).copied().unwrap_or(0);
        let _ = writeln!(
            page,
            "<tr class=\"{state}\"><td>{}</td><td>{}</td><td class=\"state\">{state}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{pending}</td><td class=\"error\">{}</td><td>{}</td></tr>",
            esc(&m.parser),
            esc(&m.email),
            time(Some(m.since)),
            time(m.last_ok_at),
            m.backlog,
            t.created,
            t.appended,
            t.held,
            t.quarantined,
            esc(m.last_error.as_deref().unwrap_or("")),
            esc(m.fix.as_deref().unwrap_or("")),
            state = m.state.as_str(),
        );
    }
    page.push_str("</table>\n<h2>Credentials</h2>\n<table id=\"credentials\">\n<tr><th>Credential</th><th>Type</th><th>State</th><th>Token expires</th><th>Last refresh</th><th>Reason</th></tr>\n");
    for c in credentials {
        let _ = writeln!(
            page,
            "<tr class=\"{state}\"><td>{}</td><td>{}</td><td class=\"state\">{state}</td><td>{}</td><td>{}</td><td class=\"error\">{}</td></tr>",
            esc(&c.name),
            c.kind,
            time(c.token_expires_at),
            time(c.last_refresh_at),
            esc(c.reason.as_deref().unwrap_or("")),
            state = c.state,
        );
    }
    page.push_str("</table>\n");
    if !webhooks.is_empty() {
        page.push_str("<h2>Webhooks</h2>\n<table id=\"webhooks\">\n<tr><th>Webhook</th><th>Host</th><th>State</th><th>Pending</th><th>Dead</th><th>Delivered</th></tr>\n");
        for w in webhooks {
            let _ = writeln!(
                page,
                "<tr class=\"{state}\"><td>{}</td><td>{}</td><td class=\"state\">{state}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&w.name),
                esc(&w.host),
                w.pending,
                w.dead,
                w.delivered,
                state = w.state,
            );
        }
        page.push_str("</table>\n");
    }
    replicas(&mut page, cluster);
    page.push_str("</body>\n</html>\n");
    page
}

/// The live replicas and who holds which mailbox's lease.
fn replicas(page: &mut String, cluster: &ClusterView) {
    let _ = writeln!(
        page,
        "<h2>Replicas</h2>\n<p>This is replica <b>{}</b>; leases last {} s.{}</p>\n<table id=\"replicas\">\n<tr><th>Replica</th><th>Started</th><th>Last heartbeat</th><th>Leases</th></tr>",
        esc(&cluster.replica),
        cluster.lease_ttl_s,
        cluster
            .error
            .as_ref()
            .map(|e| format!(" <span class=\"error\">Cannot read them: {}</span>", esc(e)))
            .unwrap_or_default(),
    );
    for r in &cluster.replicas {
        let held = cluster
            .leases
            .iter()
            .filter(|l| l.held && l.owner == r.name)
            .count();
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{held}</td></tr>",
            esc(&r.name),
            time(Some(r.started_at)),
            time(Some(r.heartbeat_at)),
        );
    }
    page.push_str("</table>\n<table id=\"leases\">\n<tr><th>Mailbox</th><th>Owner</th><th>Epoch</th><th>Held</th><th>Expires</th><th>Acquired</th></tr>\n");
    for l in &cluster.leases {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&l.parser),
            esc(&l.owner),
            l.epoch,
            if l.held { "yes" } else { "no (free)" },
            time(Some(l.expires_at)),
            time(Some(l.acquired_at)),
        );
    }
    page.push_str("</table>\n");
}

const HEAD: &str = "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta http-equiv=\"refresh\" content=\"15\">\n<title>mail2ticket status</title>\n<style>\nbody{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:2em}\nth,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}\ntr.idle .state,tr.fetching .state,tr.ok .state{color:#176f2c}\ntr.disabled .state,tr.backoff .state,tr.stale .state,tr.needs_login .state,tr.failing .state,tr.stopped .state{color:#b00020;font-weight:bold}\ntd.error{max-width:40em;word-break:break-word}\n</style>\n</head>\n<body>\n";

/// Text made safe for HTML (ammonia escapes every character with a meaning in HTML).
fn esc(text: &str) -> String {
    ammonia::clean_text(text)
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(
        || "-".to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::state::{MailboxState, MessageTotals};

    #[test]
    fn attacker_text_is_escaped() {
        let m = MailboxStatus {
            parser: "support".into(),
            email: "<b>x</b>@example.com".into(),
            source: "imap",
            state: MailboxState::Backoff,
            since: Utc::now(),
            last_ok_at: None,
            last_error: Some("NO <script>alert(1)</script>".into()),
            last_error_at: None,
            fix: None,
            retry_at: None,
            backlog: 0,
            messages_total: MessageTotals::default(),
            stale_after: std::time::Duration::from_secs(1),
        };
        let cluster = ClusterView {
            replica: "<i>r1</i>".into(),
            lease_ttl_s: 15,
            replicas: Vec::new(),
            leases: Vec::new(),
            error: Some("<img src=x onerror=alert(1)>".into()),
        };
        let page = render(&[m], &[], &[], &cluster, &HashMap::new(), Utc::now());
        assert!(
            !page.contains("<script>")
                && !page.contains("<b>x")
                && !page.contains("<i>r1")
                && !page.contains("<img"),
            "{page}"
        );
        assert!(page.contains("&lt;script&gt;"), "{page}");
    }
}
