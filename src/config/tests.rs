//! Unit tests of loading and validation.

use super::raw::parse_byte_size;
use super::*;

const GOOD: &str = r#"
[database]
url = "postgres://localhost/x"

[[credential]]
name = "app"
type = "client_credentials"
tenant_id = "t"
client_id = "c"
client_secret = "s3cr3t-value"

[[parser]]
name = "support"
email = "support@contoso.com"
username = "helpdesk@contoso.com"
shared_mailbox = true
credential = "app"
max_message_size = "10 MB"
[parser.imap]
host = "outlook.office365.com"
"#;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(Path::new("/etc/m2t.toml"), text)
}

#[test]
fn good_config_gets_defaults() {
    let c = load(GOOD).unwrap();
    let p = &c.parsers[0];
    let SourceConfig::Imap(imap) = &p.source else {
        panic!("an IMAP parser")
    };
    assert_eq!(imap.port, 993);
    assert_eq!(imap.encryption, Encryption::Ssl);
    assert_eq!(imap.folder, "INBOX");
    assert!(p.add_attachments);
    assert!(!p.add_ccs);
    assert_eq!(p.status, ParserStatus::Active);
    assert_eq!(p.max_message_size, 10 << 20);
    assert_eq!(p.login_user(), "support@contoso.com");
    assert_eq!(p.after, AfterIngest::MarkSeen);
    assert_eq!(p.poll_interval.as_secs(), 60);
    assert_eq!(c.credentials[0].authority, DEFAULT_AUTHORITY);
    assert_eq!(c.credentials[0].scope, DEFAULT_APP_SCOPE);
}

#[test]
fn debug_output_hides_secrets() {
    let c = load(GOOD).unwrap();
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cr3t-value"), "{debug}");
    assert!(!debug.contains("postgres://localhost/x"), "{debug}");
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let text = GOOD.replace("shared_mailbox = true", "shared_mailbox = true\ncolour = 1");
    let err = load(&text).unwrap_err().to_string();
    assert!(err.starts_with("/etc/m2t.toml:"), "{err}");
    assert!(err.contains("colour"), "{err}");
    assert!(
        err.contains("m2t.toml:17:"),
        "line number expected in {err}"
    );
}

#[test]
fn unknown_credential_is_named_with_its_table_line() {
    let text = GOOD.replace("credential = \"app\"", "credential = \"nope\"");
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("parser[0].credential"), "{err}");
    assert!(err.contains("\"nope\""), "{err}");
    assert!(
        err.contains("m2t.toml:12:"),
        "the [[parser]] line expected in {err}"
    );
}

#[test]
fn plaintext_imap_to_a_remote_host_is_refused() {
    let text = GOOD.replace(
        "host = \"outlook.office365.com\"",
        "host = \"imap.example.com\"\nencryption = \"none\"",
    );
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("parser[0].imap.encryption"), "{err}");
    let text = text.replace(
        "encryption = \"none\"",
        "encryption = \"none\"\nallow_insecure = true",
    );
    load(&text).unwrap();
    let local = GOOD.replace(
        "host = \"outlook.office365.com\"",
        "host = \"127.0.0.1\"\nencryption = \"none\"",
    );
    load(&local).unwrap();
}

#[test]
fn all_problems_are_reported_together() {
    let text = GOOD
        .replace("tenant_id = \"t\"\n", "")
        .replace("email = \"support@contoso.com\"", "email = \"nobody\"");
    let err = load(&text).unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"credential[0].tenant_id"), "{keys:?}");
    assert!(keys.contains(&"parser[0].email"), "{keys:?}");
}

#[test]
fn duplicate_parser_names_are_refused() {
    let second = &GOOD[GOOD.find("[[parser]]").unwrap()..];
    let text = format!("{GOOD}\n{second}");
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("already defined"), "{err}");
}

fn credential(body: &str) -> String {
    GOOD.replace(
        "type = \"client_credentials\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s3cr3t-value\"\n",
        body,
    )
}

#[test]
fn password_credentials_need_a_user_and_get_the_delegated_imap_scope() {
    let c = load(&credential(
        "type = \"password\"\ntenant_id = \"t\"\nclient_id = \"c\"\nusername = \"agent@contoso.com\"\npassword = \"pw-value-123\"\n",
    ))
    .unwrap();
    let cred = &c.credentials[0];
    assert_eq!(cred.kind, CredentialKind::Password);
    assert_eq!(cred.scope, DEFAULT_PASSWORD_SCOPE);
    assert!(matches!(cred.client_auth, ClientAuth::Public));
    assert_eq!(cred.user.as_ref().unwrap().username, "agent@contoso.com");
    assert!(!format!("{c:?}").contains("pw-value-123"));
    let err = load(&credential(
        "type = \"password\"\ntenant_id = \"t\"\nclient_id = \"c\"\n",
    ))
    .unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert!(
        keys.contains(&"credential[0].username") && keys.contains(&"credential[0].password"),
        "{keys:?}"
    );
}

#[test]
fn delegated_credentials_need_the_secrets_key_and_offline_access() {
    let delegated = credential("type = \"delegated\"\ntenant_id = \"t\"\nclient_id = \"c\"\n");
    let err = load(&delegated).unwrap_err().to_string();
    assert!(
        err.contains("key `secrets.key`") && err.contains("MAIL2TICKET_KEY"),
        "{err}"
    );
    let with_key = format!("[secrets]\nkey = \"{}\"\n{delegated}", "k".repeat(40));
    let c = load(&with_key).unwrap();
    assert_eq!(c.credentials[0].scope, DEFAULT_DELEGATED_SCOPE);
    assert_eq!(c.credentials[0].redirect_port, 0);
    assert!(!format!("{c:?}").contains(&"k".repeat(40)));
    let short = format!("[secrets]\nkey = \"short\"\n{delegated}");
    assert!(load(&short).unwrap_err().to_string().contains("too short"));
    let no_offline = with_key.replace(
        "client_id = \"c\"\n",
        "client_id = \"c\"\nscope = \"https://outlook.office.com/IMAP.AccessAsUser.All\"\n",
    );
    let err = load(&no_offline).unwrap_err().to_string();
    assert!(
        err.contains("credential[0].scope") && err.contains("offline_access"),
        "{err}"
    );
}

#[test]
fn client_proof_is_a_secret_or_a_certificate_never_both() {
    let both = GOOD.replace(
        "client_secret = \"s3cr3t-value\"\n",
        "client_secret = \"s3cr3t-value\"\ncertificate = \"x\"\nprivate_key = \"y\"\n",
    );
    assert!(load(&both).unwrap_err().to_string().contains("not both"));
    let none = GOOD.replace("client_secret = \"s3cr3t-value\"\n", "");
    let err = load(&none).unwrap_err().to_string();
    assert!(
        err.contains("credential[0].client_secret") && err.contains("private_key"),
        "{err}"
    );
    let lonely = GOOD.replace(
        "client_secret = \"s3cr3t-value\"\n",
        "certificate = \"x\"\n",
    );
    assert!(
        load(&lonely)
            .unwrap_err()
            .to_string()
            .contains("credential[0].private_key")
    );
    let garbage = GOOD.replace(
        "client_secret = \"s3cr3t-value\"\n",
        "certificate = \"not a pem\"\nprivate_key = \"secret-key-text\"\n",
    );
    let err = load(&garbage).unwrap_err().to_string();
    assert!(
        err.contains("credential[0].certificate") && !err.contains("secret-key-text"),
        "{err}"
    );
    let port = GOOD.replace(
        "client_secret = \"s3cr3t-value\"\n",
        "client_secret = \"s3cr3t-value\"\nredirect_port = 8400\n",
    );
    assert!(
        load(&port)
            .unwrap_err()
            .to_string()
            .contains("credential[0].redirect_port")
    );
}

#[test]
fn after_actions() {
    assert_eq!(
        AfterIngest::parse("move:Done").unwrap(),
        AfterIngest::Move("Done".into())
    );
    assert_eq!(AfterIngest::parse("delete").unwrap(), AfterIngest::Delete);
    assert!(AfterIngest::parse("move:").is_err());
    assert!(AfterIngest::parse("archive").is_err());
}

#[test]
fn usernames_must_be_addresses_only_where_they_are_the_xoauth2_user() {
    let password = GOOD
        .replace(
            "username = \"helpdesk@contoso.com\"",
            "username = 'CONTOSO\\jdoe'",
        )
        .replace("credential = \"app\"", "password = \"pw\"");
    let c = load(&password).unwrap();
    assert_eq!(c.parsers[0].username, "CONTOSO\\jdoe");
    // With a credential and shared_mailbox = true, user= is `email`: username is free.
    load(&GOOD.replace("username = \"helpdesk@contoso.com\"", "username = \"jdoe\"")).unwrap();
    // With shared_mailbox = false, username is the XOAUTH2 user= and must be an address.
    let own = GOOD
        .replace("username = \"helpdesk@contoso.com\"", "username = \"jdoe\"")
        .replace("shared_mailbox = true", "shared_mailbox = false");
    let err = load(&own).unwrap_err().to_string();
    assert!(
        err.contains("parser[0].username") && err.contains("XOAUTH2"),
        "{err}"
    );
    let empty = password.replace("username = 'CONTOSO\\jdoe'", "username = \" \"");
    assert!(
        load(&empty)
            .unwrap_err()
            .to_string()
            .contains("parser[0].username")
    );
}

#[test]
fn start_at_values() {
    assert_eq!(load(GOOD).unwrap().parsers[0].start_at, StartAt::Unseen);
    for (text, value) in [
        ("all", StartAt::All),
        ("now", StartAt::Now),
        ("unseen", StartAt::Unseen),
        (
            "2026-11-01",
            StartAt::Since(chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap()),
        ),
    ] {
        assert_eq!(StartAt::parse(text).unwrap(), value);
        assert_eq!(value.to_string(), text);
    }
    let bad = GOOD.replace(
        "shared_mailbox = true",
        "shared_mailbox = true\nstart_at = \"yesterday\"",
    );
    let err = load(&bad).unwrap_err().to_string();
    assert!(
        err.contains("parser[0].start_at") && err.contains("2026-11-01"),
        "{err}"
    );
}

#[test]
fn http_listens_on_loopback_or_with_a_token() {
    let with = |http: &str| format!("{GOOD}\n[http]\n{http}\n");
    let c = load(&with("listen = \"127.0.0.1:9187\"")).unwrap();
    let http = c.http.unwrap();
    assert_eq!(http.listen.port(), 9187);
    assert!(http.token.is_none());
    let err = load(&with("listen = \"0.0.0.0:9187\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("http.token") && err.contains("MAIL2TICKET_HTTP_TOKEN"),
        "{err}"
    );
    let c = load(&with("listen = \"0.0.0.0:9187\"\ntoken = \"t0ken-value\"")).unwrap();
    assert!(!format!("{c:?}").contains("t0ken-value"));
    let err = load(&with("listen = \"everywhere\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("http.listen"), "{err}");
    assert!(load(GOOD).unwrap().http.is_none());
}

#[test]
fn byte_sizes() {
    assert_eq!(parse_byte_size("35 MB").unwrap(), 35 << 20);
    assert_eq!(parse_byte_size("512KiB").unwrap(), 512 << 10);
    assert_eq!(parse_byte_size("100").unwrap(), 100);
    assert!(parse_byte_size("12 parsecs").is_err());
    assert!(parse_byte_size("MB").is_err());
}

#[test]
fn a_graph_parser_needs_a_credential_and_one_source() {
    let base = "[database]\nurl = \"postgres://x/y\"\n[[credential]]\nname = \"app\"\ntype = \"client_credentials\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
    let graph = format!(
        "{base}[[parser]]\nname = \"g\"\nemail = \"g@x.test\"\ncredential = \"app\"\n[parser.graph]\nfolder = \"Inbox/Support\"\n"
    );
    let config = Config::from_toml(Path::new("t.toml"), &graph).unwrap();
    let SourceConfig::Graph(g) = &config.parsers[0].source else {
        panic!("a Graph parser")
    };
    assert_eq!(
        (g.folder.as_str(), g.base_url.as_str()),
        ("Inbox/Support", DEFAULT_GRAPH_BASE_URL)
    );
    assert_eq!(g.poll_interval, std::time::Duration::from_secs(30));
    assert_eq!(config.credentials[0].graph_scope, DEFAULT_GRAPH_APP_SCOPE);

    let both = format!("{graph}[parser.imap]\nhost = \"h\"\n");
    let err = Config::from_toml(Path::new("t.toml"), &both)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("parser[0].graph") && err.contains("either"),
        "{err}"
    );
    let neither =
        format!("{base}[[parser]]\nname = \"g\"\nemail = \"g@x.test\"\ncredential = \"app\"\n");
    let err = Config::from_toml(Path::new("t.toml"), &neither)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[parser.graph]"), "{err}");
    let password = graph.replace("credential = \"app\"", "password = \"pw\"");
    let err = Config::from_toml(Path::new("t.toml"), &password)
        .unwrap_err()
        .to_string();
    assert!(err.contains("parser[0].password"), "{err}");
    let insecure = graph.replace(
        "folder = \"Inbox/Support\"",
        "base_url = \"http://graph.example.com/v1.0\"",
    );
    let err = Config::from_toml(Path::new("t.toml"), &insecure)
        .unwrap_err()
        .to_string();
    assert!(err.contains("parser[0].graph.base_url"), "{err}");
}

#[test]
fn webhooks_need_a_standard_secret_https_and_known_kinds_and_parsers() {
    let base = "[database]\nurl = \"postgres://x/y\"\n[[parser]]\nname = \"support\"\nemail = \"s@x.test\"\npassword = \"pw\"\n[parser.imap]\nhost = \"127.0.0.1\"\nencryption = \"none\"\n";
    let good = format!(
        "{base}[[webhook]]\nname = \"desk\"\nurl = \"https://desk.example.com/h\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nparsers = [\"support\"]\nevents = [\"ticket.created\"]\n[events]\nkeep_days = 7\n"
    );
    let config = Config::from_toml(Path::new("t.toml"), &good).unwrap();
    let w = &config.webhooks[0];
    assert_eq!(
        (w.name.as_str(), w.timeout.as_secs(), w.signing_key().len()),
        ("desk", 10, 24)
    );
    assert_eq!(config.events.keep_days, 7);
    assert!(
        !format!("{config:?}").contains("MfKQ9r8G"),
        "the secret never prints"
    );

    let bad = format!(
        "{base}[[webhook]]\nname = \"desk\"\nurl = \"http://desk.example.com/h\"\nsecret = \"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nparsers = [\"nope\"]\nevents = [\"ticket.exploded\"]\n[[webhook]]\nname = \"short\"\nurl = \"http://127.0.0.1:9/h\"\nsecret = \"whsec_c2hvcnQ=\"\n"
    );
    let err = Config::from_toml(Path::new("t.toml"), &bad).unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "webhook[0].url",
        "webhook[0].secret",
        "webhook[0].parsers",
        "webhook[0].events",
        "webhook[1].secret",
    ] {
        assert!(keys.contains(&key), "{key} in {keys:?}");
    }
    let text = err.to_string();
    assert!(
        text.contains("whsec_") && text.contains("allow_insecure"),
        "{text}"
    );
}

#[test]
fn cluster_defaults_to_a_unique_name_and_15_s_leases_and_checks_its_keys() {
    let base = "[database]\nurl = \"postgres://x/y\"\n";
    let config = Config::from_toml(Path::new("t.toml"), base).unwrap();
    assert_eq!(config.cluster.lease_ttl.as_secs(), 15);
    assert!(
        config
            .cluster
            .replica_name
            .ends_with(&format!("-{}", std::process::id())),
        "{}",
        config.cluster.replica_name
    );
    let named = format!("{base}[cluster]\nreplica_name = \"desk-a\"\nlease_ttl = 30\n");
    let config = Config::from_toml(Path::new("t.toml"), &named).unwrap();
    assert_eq!(
        (
            config.cluster.replica_name.as_str(),
            config.cluster.lease_ttl.as_secs()
        ),
        ("desk-a", 30)
    );
    let bad = format!("{base}\n[cluster]\nreplica_name = \" \"\nlease_ttl = 1\n");
    let err = Config::from_toml(Path::new("t.toml"), &bad).unwrap_err();
    let text = err.to_string();
    for key in ["cluster.lease_ttl", "cluster.replica_name"] {
        assert!(text.contains(key), "{key} in {text}");
    }
    assert!(
        err.problems.iter().all(|p| p.line == Some(4)),
        "the [cluster] line: {text}"
    );
}
