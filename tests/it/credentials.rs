//! Every credential type against the test Entra endpoint, a real Dovecot and a real
//! Postgres: certificate assertions, the password grant, delegated sign-in (loopback
//! redirect, pasted address, device code), rotating refresh tokens kept encrypted in the
//! database, "needs login" isolated per credential, and doctor's explanations.

use crate::support::KillOnDrop;
use crate::support::entra::{App, Entra, TENANT, User, make_certificate};
use crate::support::env::{SHARED_A, SHARED_B, TestEnv, binary};
use mail2ticket::auth::TokenSources;
use mail2ticket::config::Config;
use mail2ticket::runtime::supervisor::{self, OnceReport};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Stdio};
use tokio_util::sync::CancellationToken;

const OWNER: &str = "agent@example.test";
const SECRETS_KEY: &str = "test-secrets-key-0123456789abcdef0123456789";

/// The shared test environment with this module's applications and users, and the
/// certificate files of "app-cert".
struct Bed {
    env: TestEnv,
    certs: tempfile::TempDir,
}

impl std::ops::Deref for Bed {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.env
    }
}

/// Applications: "app-cert" (certificate only), "app-public" (public client, consented),
/// "app-web" (confidential, secret only), "app-noconsent" (public, not consented),
/// "app-short" (public, 6-second tokens), "app-noperm" (secret, no IMAP.AccessAsApp),
/// "app-secret" (app-only with a secret). Users: OWNER (own mailbox + two shared),
/// "mfa@example.test" (MFA enforced).
async fn bed() -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, certificate) = make_certificate(dir.path());
    let mailboxes = vec![
        SHARED_A.to_string(),
        SHARED_B.to_string(),
        OWNER.to_string(),
    ];
    let entra = Entra::start_with(
        &[
            (
                "app-cert",
                App {
                    certificate: Some(certificate),
                    mailboxes: mailboxes.clone(),
                    ..App::default()
                },
            ),
            (
                "app-public",
                App {
                    public_client: true,
                    ..App::default()
                },
            ),
            (
                "app-web",
                App {
                    secret: "web-s3cret".into(),
                    ..App::default()
                },
            ),
            (
                "app-noconsent",
                App {
                    public_client: true,
                    consented: false,
                    ..App::default()
                },
            ),
            (
                "app-short",
                App {
                    public_client: true,
                    lifetime: 6,
                    ..App::default()
                },
            ),
            (
                "app-secret",
                App {
                    secret: "app-s3cret".into(),
                    mailboxes: mailboxes.clone(),
                    ..App::default()
                },
            ),
            (
                "app-noperm",
                App {
                    secret: "app-s3cret".into(),
                    mailboxes: mailboxes.clone(),
                    imap_permission: false,
                    ..App::default()
                },
            ),
        ],
        &[
            (
                OWNER,
                User {
                    password: "Owner-Passw0rd".into(),
                    mailboxes: mailboxes.clone(),
                    mfa: false,
                },
            ),
            (
                "mfa@example.test",
                User {
                    password: "Mfa-Passw0rd".into(),
                    mailboxes: vec!["mfa@example.test".into()],
                    mfa: true,
                },
            ),
        ],
    );
    Bed {
        env: TestEnv::with_entra(entra).await,
        certs: dir,
    }
}

impl Bed {
    fn credential(&self, name: &str, kind: &str, client_id: &str, extra: &str) -> String {
        format!(
            "\n[[credential]]\nname = \"{name}\"\ntype = \"{kind}\"\ntenant_id = \"{TENANT}\"\nclient_id = \"{client_id}\"\nauthority = \"{}\"\n{extra}\n",
            self.entra().url
        )
    }

    /// An app-only credential with a client secret, granted every test mailbox.
    fn app_credential(&self, name: &str) -> String {
        self.credential(
            name,
            "client_credentials",
            "app-secret",
            "client_secret = \"app-s3cret\"",
        )
    }

    /// A parser reading `email` through `credential`; the owner's own mailbox logs in as
    /// itself, the others as shared mailboxes. `start_at = "all"`: two parsers of these
    /// tests may read one mailbox, and the second must not skip what the first marked read.
    fn parser(&self, name: &str, email: &str, credential: &str) -> String {
        let shared = email != OWNER;
        format!(
            "\n[[parser]]\nname = \"{name}\"\nemail = \"{email}\"\nusername = \"{OWNER}\"\nshared_mailbox = {shared}\ncredential = \"{credential}\"\nstart_at = \"all\"\n[parser.imap]\nhost = \"localhost\"\nport = {}\nca_file = \"{}\"\n",
            self.dovecot().imaps_port,
            self.dovecot().ca_file.display()
        )
    }

    /// Writes a config file with `[database]`, `[secrets]` and the given tables.
    fn write_config(&self, file: &str, tables: &str) -> (PathBuf, Config) {
        let text = format!(
            "[database]\nurl = \"{}\"\n[secrets]\nkey = \"{SECRETS_KEY}\"\n{tables}",
            self.db.url
        );
        self.env.write_config(file, &text)
    }

    fn three_parsers(&self, credential: &str) -> String {
        [
            self.parser("own", OWNER, credential),
            self.parser("support", SHARED_A, credential),
            self.parser("sales", SHARED_B, credential),
        ]
        .concat()
    }

    fn deliver_one_each(&self, tag: &str) {
        for mailbox in [OWNER, SHARED_A, SHARED_B] {
            self.dovecot().deliver(mailbox, &message(tag, mailbox));
        }
    }

    /// One message into each of the three mailboxes, `run --once`, one ticket each.
    async fn run_once_tickets_one_each(&self, config: &Config, tag: &str) {
        self.deliver_one_each(tag);
        assert_all_ok(&self.run_once(config).await);
        for parser in ["own", "support", "sales"] {
            assert_eq!(self.tickets(parser).await, 1, "{parser}");
        }
    }

    async fn tickets(&self, parser: &str) -> i64 {
        sqlx::query_scalar("select count(*) from tickets where parser = $1")
            .bind(parser)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    async fn grant_status(&self, credential: &str) -> Option<(String, Option<String>)> {
        sqlx::query_as("select status, status_reason from credential_grants where credential = $1")
            .bind(credential)
            .fetch_optional(&self.db.pool)
            .await
            .unwrap()
    }
}

fn certificate_keys(cert: &Path, key: &Path) -> String {
    format!(
        "certificate = {{ file = \"{}\" }}\nprivate_key = {{ file = \"{}\" }}",
        cert.display(),
        key.display()
    )
}

fn message(tag: &str, to: &str) -> Vec<u8> {
    format!(
        "From: Customer <customer@example.com>\r\nTo: {to}\r\nSubject: {tag} for {to}\r\nMessage-ID: <{tag}-{to}>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nHello.\r\n"
    )
    .into_bytes()
}

fn assert_all_ok(reports: &[OnceReport]) {
    for r in reports {
        assert!(
            r.result.is_ok(),
            "{}: {:?}",
            r.parser,
            r.result.as_ref().err()
        );
    }
}

/// `mail2ticket login` running, its output read line by line.
struct Login {
    child: KillOnDrop,
    stdout: BufReader<ChildStdout>,
    seen: String,
}

impl Login {
    fn start(config: &Path, credential: &str, device_code: bool) -> Login {
        let mut cmd = binary(&["login", "--credential", credential, "--config"]);
        cmd.arg(config).stdin(Stdio::piped());
        if device_code {
            cmd.arg("--device-code");
        }
        let mut child = KillOnDrop(cmd.spawn().unwrap());
        let stdout = BufReader::new(child.0.stdout.take().unwrap());
        Login {
            child,
            stdout,
            seen: String::new(),
        }
    }

    /// Reads output until a line satisfies `pick`, and returns what it picked.
    fn read_until<T>(&mut self, pick: impl Fn(&str) -> Option<T>) -> T {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "login ended before printing what was expected: {}",
                self.seen
            );
            self.seen.push_str(&line);
            if let Some(found) = pick(line.trim()) {
                return found;
            }
        }
    }

    fn sign_in_url(&mut self) -> String {
        self.read_until(|l| l.starts_with("http").then(|| l.to_string()))
    }

    fn paste(&mut self, text: &str) {
        let stdin = self.child.0.stdin.as_mut().unwrap();
        writeln!(stdin, "{text}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the exit; returns (success, all stdout, stderr).
    fn finish(mut self) -> (bool, String, String) {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(self.child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        let status = self.child.0.wait().unwrap();
        (status.success(), self.seen + &rest, stderr)
    }
}

/// The browser side of a sign-in: the authorize page, then (following the redirect)
/// login's loopback listener.
async fn browse(url: &str) -> String {
    mail2ticket::tls::install_crypto_provider();
    let response = reqwest::get(url).await.unwrap();
    response.text().await.unwrap()
}

/// The address the browser ends on, without visiting it (as on a headless server).
async fn redirected_address(url: &str) -> String {
    mail2ticket::tls::install_crypto_provider();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 302, "{:?}", response.text().await);
    response.headers()["location"].to_str().unwrap().to_string()
}

/// Signs `credential` in through the binary with the loopback redirect.
async fn login_with_browser(bed: &Bed, config: &Path, credential: &str) -> String {
    bed.entra().sign_in_as(OWNER);
    let mut login = Login::start(config, credential, false);
    let url = login.sign_in_url();
    let page = browse(&url).await;
    assert!(page.contains("Signed in"), "{page}");
    let (ok, out, err) = tokio::task::spawn_blocking(move || login.finish())
        .await
        .unwrap();
    assert!(ok, "login failed: {out}\n{err}");
    out
}

#[tokio::test]
async fn a_certificate_credential_reads_three_mailboxes_with_one_token_request() {
    let bed = bed().await;
    let cert = bed.certs.path().join("app.pem");
    let key = bed.certs.path().join("app.key");
    let tables = bed.credential(
        "cert",
        "client_credentials",
        "app-cert",
        &certificate_keys(&cert, &key),
    ) + &bed.three_parsers("cert");
    let (_, config) = bed.write_config("cert.toml", &tables);
    bed.run_once_tickets_one_each(&config, "cert").await;
    assert_eq!(bed.entra().requests_of("client_credentials"), 1);

    // Another key pair than the registered one: refused with the certificate fix.
    let other = tempfile::tempdir().unwrap();
    let (_, other_key, _) = make_certificate(other.path());
    let tables = bed.credential(
        "cert",
        "client_credentials",
        "app-cert",
        &certificate_keys(&cert, &other_key),
    ) + &bed.parser("support", SHARED_A, "cert");
    let (_, config) = bed.write_config("wrongkey.toml", &tables);
    let reports = bed.run_once(&config).await;
    let error = reports[0].result.as_ref().unwrap_err().to_string();
    assert!(
        error.contains("AADSTS700027") && error.contains("certificate"),
        "{error}"
    );
}

#[tokio::test]
async fn a_password_credential_reads_the_owners_and_two_shared_mailboxes_with_one_token_request() {
    let bed = bed().await;
    let tables = bed.credential(
        "pw",
        "password",
        "app-public",
        &format!("username = \"{OWNER}\"\npassword = \"Owner-Passw0rd\""),
    ) + &bed.three_parsers("pw");
    let (_, config) = bed.write_config("pw.toml", &tables);
    bed.run_once_tickets_one_each(&config, "pw").await;
    assert_eq!(bed.entra().requests_of("password"), 1);
}

#[tokio::test]
async fn a_delegated_sign_in_survives_restarts_and_a_revoked_grant_needs_login_alone() {
    let bed = bed().await;
    let tables = bed.credential("user", "delegated", "app-public", "")
        + &bed.app_credential("app")
        + &bed.three_parsers("user")
        + &bed.parser("app-support", SHARED_A, "app");
    let (path, config) = bed.write_config("delegated.toml", &tables);

    // Before any sign-in: "needs login" naming the command, and the app credential works.
    bed.deliver_one_each("first");
    let reports = bed.run_once(&config).await;
    let own = reports.iter().find(|r| r.parser == "own").unwrap();
    let error = own.result.as_ref().unwrap_err().to_string();
    assert!(
        error.contains("needs login") && error.contains("mail2ticket login --config"),
        "{error}"
    );
    assert!(
        reports
            .iter()
            .find(|r| r.parser == "app-support")
            .unwrap()
            .result
            .is_ok()
    );
    let (status, reason) = bed.grant_status("user").await.unwrap();
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("needs_login", Some("nobody has signed in with it yet"))
    );

    let out = login_with_browser(&bed, &path, "user").await;
    assert!(out.contains(&format!("signed in as {OWNER}")), "{out}");
    let sealed: Vec<u8> =
        sqlx::query_scalar("select refresh_token from credential_grants where credential = 'user'")
            .fetch_one(&bed.db.pool)
            .await
            .unwrap();
    assert!(
        !sealed.windows(3).any(|w| w == b"rt-"),
        "the refresh token is stored encrypted"
    );

    // Three mailboxes (the owner's own and two shared), one refresh per renewal.
    assert_all_ok(&bed.run_once(&config).await);
    for parser in ["own", "support", "sales"] {
        assert_eq!(bed.tickets(parser).await, 1, "{parser}");
    }
    assert_eq!(bed.entra().requests_of("refresh_token"), 1);

    // Restarts: each redeems the refresh token saved by the previous one. The endpoint
    // accepts a refresh token once, so this works only if every rotation was saved.
    for round in ["second", "third"] {
        bed.deliver_one_each(round);
        assert_all_ok(&bed.run_once(&config).await);
    }
    assert_eq!(bed.entra().requests_of("refresh_token"), 3);
    assert_eq!(bed.entra().live_refresh_tokens(), 1);
    assert_eq!(bed.tickets("own").await, 3);

    // Another [secrets] key cannot open the stored sign-in: "needs login" naming the key,
    // nothing sent to Entra, and the stored sign-in left as it is for the right key.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(SECRETS_KEY, &"z".repeat(40));
    let other_key = Config::from_toml(&path, &text).unwrap();
    let reports = bed.run_once(&other_key).await;
    let own = reports.iter().find(|r| r.parser == "own").unwrap();
    let error = own.result.as_ref().unwrap_err().to_string();
    assert!(
        error.contains("needs login") && error.contains("[secrets] key"),
        "{error}"
    );
    assert_eq!(bed.entra().requests_of("refresh_token"), 3);
    assert_eq!(bed.grant_status("user").await.unwrap().0, "ok");

    // The user's sessions are revoked: this credential needs login, visibly in the
    // database; the app-only credential keeps working in the same run.
    bed.entra().revoke_user(OWNER);
    bed.deliver_one_each("fourth");
    let reports = bed.run_once(&config).await;
    for r in &reports {
        if r.parser == "app-support" {
            assert!(r.result.is_ok(), "{:?}", r.result.as_ref().err());
        } else {
            let e = r.result.as_ref().unwrap_err().to_string();
            assert!(
                e.contains("needs login") && e.contains("AADSTS50173"),
                "{e}"
            );
        }
    }
    let (status, reason) = bed.grant_status("user").await.unwrap();
    assert_eq!(status, "needs_login");
    assert!(reason.unwrap().contains("AADSTS50173"));
    let refreshes = bed.entra().requests_of("refresh_token");
    bed.run_once(&config).await;
    assert_eq!(
        bed.entra().requests_of("refresh_token"),
        refreshes,
        "a dead grant is not retried against Entra"
    );

    // doctor says so and exits 1.
    let out = binary(&["doctor", "--parser", "own", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("needs login") && report.contains("mail2ticket login"),
        "{report}"
    );

    // Signing in again on a headless server: paste the redirected address.
    let mut login = Login::start(&path, "user", false);
    let url = login.sign_in_url();
    let address = redirected_address(&url).await;
    login.paste("this is not it");
    login.paste(&address);
    let (ok, out, err) = tokio::task::spawn_blocking(move || login.finish())
        .await
        .unwrap();
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("That is not the redirected address"), "{out}");
    assert_eq!(bed.grant_status("user").await.unwrap().0, "ok");
    assert_all_ok(&bed.run_once(&config).await);
    assert_eq!(bed.tickets("own").await, 4);
    let out = binary(&["doctor", "--parser", "own", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains("IMAP.AccessAsUser.All"),
        "{report}"
    );
}

#[tokio::test]
async fn a_wrong_pkce_verifier_or_missing_consent_is_refused_and_nothing_is_stored() {
    let bed = bed().await;
    let tables =
        bed.credential("user", "delegated", "app-public", "") + &bed.parser("own", OWNER, "user");
    let (path, _) = bed.write_config("pkce.toml", &tables);
    bed.entra().sign_in_as(OWNER);
    let mut login = Login::start(&path, "user", false);
    let url = url::Url::parse(&login.sign_in_url()).unwrap();
    // The same request with another code_challenge: the code is bound to a verifier login
    // does not have.
    let mut forged = url.clone();
    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    forged.query_pairs_mut().clear();
    for (k, v) in pairs {
        let v = if k == "code_challenge" {
            "A".repeat(43)
        } else {
            v
        };
        forged.query_pairs_mut().append_pair(&k, &v);
    }
    let address = redirected_address(forged.as_str()).await;
    login.paste(&address);
    let (ok, out, err) = tokio::task::spawn_blocking(move || login.finish())
        .await
        .unwrap();
    assert!(!ok, "{out}");
    assert!(
        err.contains("AADSTS501481") && err.contains("login again"),
        "{err}"
    );
    assert!(bed.grant_status("user").await.is_none());

    // Consent missing: Entra redirects back with an error, which login explains.
    let tables = bed.credential("user", "delegated", "app-noconsent", "")
        + &bed.parser("own", OWNER, "user");
    let (path, _) = bed.write_config("noconsent.toml", &tables);
    let mut login = Login::start(&path, "user", false);
    let url = login.sign_in_url();
    let page = browse(&url).await;
    assert!(page.contains("sign-in failed"), "{page}");
    let (ok, out, err) = tokio::task::spawn_blocking(move || login.finish())
        .await
        .unwrap();
    assert!(!ok, "{out}");
    assert!(
        err.contains("AADSTS65001") && err.contains("consent"),
        "{err}"
    );
    assert!(bed.grant_status("user").await.is_none());
}

#[tokio::test]
async fn the_device_code_flow_signs_in() {
    let bed = bed().await;
    let tables =
        bed.credential("user", "delegated", "app-public", "") + &bed.parser("own", OWNER, "user");
    let (path, config) = bed.write_config("device.toml", &tables);
    let mut login = Login::start(&path, "user", true);
    let code = login.read_until(|l| {
        l.split("enter the code ")
            .nth(1)
            .map(|rest| rest.split_whitespace().next().unwrap().to_string())
    });
    assert!(bed.entra().approve_device(&code, OWNER));
    let (ok, out, err) = tokio::task::spawn_blocking(move || login.finish())
        .await
        .unwrap();
    assert!(ok, "{out}\n{err}");
    assert!(
        bed.entra()
            .requests_of("urn:ietf:params:oauth:grant-type:device_code")
            >= 1
    );
    bed.dovecot().deliver(OWNER, &message("device", OWNER));
    assert_all_ok(&bed.run_once(&config).await);
    assert_eq!(bed.tickets("own").await, 1);
}

#[tokio::test]
async fn doctor_names_the_cause_of_each_sign_in_failure() {
    let bed = bed().await;
    let cases: [(&str, &str, &str, String, &str); 9] = [
        (
            "badsecret",
            "client_credentials",
            "app-secret",
            "client_secret = \"wrong-secret-value\"".into(),
            "AADSTS7000215",
        ),
        (
            "noapp",
            "client_credentials",
            "app-missing",
            "client_secret = \"x\"".into(),
            "AADSTS700016",
        ),
        (
            "badscope",
            "client_credentials",
            "app-secret",
            "client_secret = \"app-s3cret\"\nscope = \"https://outlook.office365.com/IMAP.AccessAsApp\""
                .into(),
            "AADSTS1002012",
        ),
        (
            "badpassword",
            "password",
            "app-public",
            format!("username = \"{OWNER}\"\npassword = \"wrong-password-value\""),
            "AADSTS50126",
        ),
        (
            "mfa",
            "password",
            "app-public",
            "username = \"mfa@example.test\"\npassword = \"Mfa-Passw0rd\"".into(),
            "AADSTS50076",
        ),
        (
            "noconsent",
            "password",
            "app-noconsent",
            format!("username = \"{OWNER}\"\npassword = \"Owner-Passw0rd\""),
            "AADSTS65001",
        ),
        (
            "webapp",
            "password",
            "app-web",
            format!("username = \"{OWNER}\"\npassword = \"Owner-Passw0rd\""),
            "AADSTS7000218",
        ),
        (
            "expired",
            "delegated",
            "app-public",
            String::new(),
            "AADSTS700082",
        ),
        (
            "badtenant",
            "client_credentials",
            "app-secret",
            "client_secret = \"app-s3cret\"".into(),
            "AADSTS90002",
        ),
    ];
    let fixes = [
        ("badsecret", "client_secret is wrong"),
        ("noapp", "not an application in this tenant"),
        ("badscope", "the scope is wrong"),
        ("badpassword", "username or password is wrong"),
        ("mfa", "multi-factor"),
        ("noconsent", "consent"),
        ("webapp", "Mobile and desktop applications"),
        ("expired", "mail2ticket login"),
        ("badtenant", "tenant_id does not exist"),
    ];
    let mut tables = String::new();
    for (name, kind, app, extra, _) in &cases {
        let mut credential = bed.credential(name, kind, app, extra);
        if *name == "badtenant" {
            credential = credential.replace(TENANT, "99999999-0000-0000-0000-000000000000");
        }
        tables.push_str(&credential);
        tables.push_str(&bed.parser(name, OWNER, name));
    }
    // A token without the IMAP permission: the claims step says which one to add.
    tables.push_str(&bed.credential(
        "noperm",
        "client_credentials",
        "app-noperm",
        "client_secret = \"app-s3cret\"",
    ));
    tables.push_str(&bed.parser("noperm", SHARED_A, "noperm"));
    let (path, _) = bed.write_config("doctor.toml", &tables);
    // The delegated credential signs in, then its refresh token expires.
    login_with_browser(&bed, &path, "expired").await;
    bed.entra().expire_user(OWNER);

    let out = binary(&["doctor", "--config"]).arg(&path).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{report}");
    let section = |name: &str| crate::support::doctor_section(&report, name);
    for ((name, _, _, _, code), (_, fix)) in cases.iter().zip(fixes) {
        let s = section(name);
        assert!(
            s.contains("FAIL token") && s.contains(code) && s.contains(fix),
            "{name}: {s}"
        );
    }
    let noperm = section("noperm");
    assert!(
        noperm.contains("OK   token ")
            && noperm.contains("FAIL token claims")
            && noperm.contains("IMAP.AccessAsApp")
            && noperm.contains("admin consent"),
        "{noperm}"
    );
    for secret in [
        "wrong-secret-value",
        "app-s3cret",
        "wrong-password-value",
        "Owner-Passw0rd",
        "Mfa-Passw0rd",
        SECRETS_KEY,
    ] {
        assert!(!report.contains(secret), "{secret} in {report}");
    }
}

#[tokio::test]
async fn a_running_daemon_refreshes_once_per_renewal_for_three_mailboxes() {
    let bed = bed().await;
    let tables = bed.credential("user", "delegated", "app-short", "") + &bed.three_parsers("user");
    let (path, config) = bed.write_config("renew.toml", &tables);
    login_with_browser(&bed, &path, "user").await;
    let tokens = TokenSources::from_config(&config, Some(bed.db.pool.clone())).unwrap();
    let cancel = CancellationToken::new();
    let daemon = {
        let (config, pool, cancel) = (config.clone(), bed.db.pool.clone(), cancel.clone());
        tokio::spawn(async move { supervisor::run(&config, &pool, &tokens, &cancel).await })
    };
    // Tokens live 6 s and are renewed 1.2 s early: wait for three renewals after the first.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while bed.entra().requests_of("refresh_token") < 4 {
        assert!(std::time::Instant::now() < deadline, "no renewals");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    bed.deliver_one_each("renewed");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for parser in ["own", "support", "sales"] {
        while bed.tickets(parser).await < 1 {
            assert!(std::time::Instant::now() < deadline, "{parser}: no ticket");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    cancel.cancel();
    daemon.await.unwrap();
    // Three pollers renewing on their own would ask three times within moments; through
    // the shared cache, renewals are a token lifetime apart.
    let times = bed.entra().request_times("refresh_token");
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap > std::time::Duration::from_secs(2),
            "two refreshes {gap:?} apart: {times:?}"
        );
    }
    assert_eq!(bed.entra().live_refresh_tokens(), 1);
    assert_eq!(bed.grant_status("user").await.unwrap().0, "ok");
}

#[tokio::test]
async fn the_daemon_logs_needs_login_once_while_it_retries_and_another_credential_tickets() {
    let bed = bed().await;
    let tables = bed.credential("user", "delegated", "app-public", "")
        + &bed.app_credential("app")
        + &bed.parser("own", OWNER, "user")
        + &bed.parser("app-support", SHARED_A, "app");
    let (path, _) = bed.write_config("daemon.toml", &tables);
    bed.dovecot()
        .deliver(SHARED_A, &message("daemon", SHARED_A));
    // Every retry is logged at debug; the state change once at warn.
    let mut daemon = KillOnDrop(
        binary(&["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info,mail2ticket::runtime::supervisor=debug")
            .spawn()
            .unwrap(),
    );
    let stderr = BufReader::new(daemon.0.stderr.take().unwrap());
    // Read until three retries have been logged. The reader then closes the pipe: the
    // daemon must carry on (and stop on SIGTERM) with its stderr gone.
    let reader = std::thread::spawn(move || {
        let (mut announced, mut retries) = (0, 0);
        let mut seen = String::new();
        for line in stderr.lines() {
            let line = line.unwrap();
            if line.contains("needs login") && line.contains("mail2ticket login --config") {
                if line.contains("mailbox failing") {
                    announced += 1;
                } else if line.contains("poller failed") {
                    retries += 1;
                }
            }
            seen.push_str(&line);
            seen.push('\n');
            if retries >= 3 {
                break;
            }
        }
        ((announced, retries), seen)
    });
    let (needs_login, seen) = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert_eq!(needs_login, (1, 3), "{seen}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while bed.tickets("app-support").await < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "app-support: no ticket; {seen}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not stop on SIGTERM with its stderr closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status:?}");
    // The outbox heard it once too, for the credential and for its mailbox.
    let needs_login = bed
        .count("select count(*) from ticket_events where kind = 'credential.needs_login' and payload->>'credential' = 'user' and parser = 'own'")
        .await;
    assert_eq!(needs_login, 1);
    let changed = bed
        .count("select count(*) from ticket_events where kind = 'mailbox.state_changed' and parser = 'own' and payload->>'state' = 'needs_login'")
        .await;
    assert_eq!(changed, 1);
    assert!(
        !seen.contains("app-s3cret") && !seen.contains(SECRETS_KEY),
        "{seen}"
    );
}

#[tokio::test]
async fn a_wrong_password_is_tried_once_per_process_so_retries_cannot_lock_the_account() {
    let bed = bed().await;
    let tables = bed.credential(
        "pw",
        "password",
        "app-public",
        &format!("username = \"{OWNER}\"\npassword = \"wrong-password-value\""),
    ) + &bed.three_parsers("pw");
    let (_, config) = bed.write_config("lockout.toml", &tables);
    let tokens = TokenSources::from_config(&config, Some(bed.db.pool.clone())).unwrap();
    let cancel = CancellationToken::new();
    let daemon = {
        let (config, pool, cancel) = (config.clone(), bed.db.pool.clone(), cancel.clone());
        tokio::spawn(async move { supervisor::run(&config, &pool, &tokens, &cancel).await })
    };
    // Three pollers retrying with backoff (1, 2, 4, 8, 16 s) for longer than the 20-second
    // hold of other failures: without the guard, Entra would be asked again.
    tokio::time::sleep(mail2ticket::auth::FAILURE_HOLD + std::time::Duration::from_secs(5)).await;
    cancel.cancel();
    daemon.await.unwrap();
    assert_eq!(bed.entra().requests_of("password"), 1);
}
