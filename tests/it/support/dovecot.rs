//! A real Dovecot IMAP server per test that enforces XOAUTH2 with Entra-shaped tokens, the
//! way Microsoft 365 enforces app-only access to shared mailboxes: the SASL `user=` picks
//! the mailbox, and login succeeds only when the token's grant list (claim `mailboxes`,
//! standing in for Exchange's FullAccess permissions) names it. Tokens are checked locally
//! (signature, issuer, expiry). Not the audience: Dovecot 2.3 checks one audience, and
//! Exchange takes two (app-only `https://outlook.office365.com`, delegated
//! `https://outlook.office.com`); the test endpoint's scope check stands in for it.
//!
//! The recipe is `../shared/testbed` (Debian's Dovecot 2.3.19) ported to Rust: a CA and a
//! leaf certificate from openssl, random loopback ports, and a shell wrapper that stops
//! Dovecot and removes its directory when this process drops the server or dies.

use super::entra::{Entra, KID, TENANT};
use base64::Engine;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Dovecot.
pub struct Dovecot {
    /// Its directory (config, certs, mail).
    pub root: PathBuf,
    /// Plain IMAP port (STARTTLS available; loopback counts as secure for plaintext auth).
    pub imap_port: u16,
    /// Implicit-TLS port.
    pub imaps_port: u16,
    /// The CA that signed the server certificate.
    pub ca_file: PathBuf,
    child: Option<Child>,
    next_file: std::sync::atomic::AtomicU64,
}

impl Dovecot {
    /// Starts a Dovecot trusting tokens signed by `entra`.
    pub fn start(entra: &Entra) -> Dovecot {
        Self::start_with(entra, "")
    }

    /// Like [`start`](Self::start), with more lines appended to dovecot.conf.
    pub fn start_with(entra: &Entra, extra_conf: &str) -> Dovecot {
        let root = tempfile::Builder::new()
            .prefix("m2t-dovecot-")
            .tempdir()
            .unwrap()
            .keep();
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        for dir in ["run", "state", "mail", "certs", "keys/default/HS256"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        make_certificates(&root.join("certs"));
        std::fs::write(
            root.join("keys/default/HS256").join(KID),
            base64::engine::general_purpose::STANDARD.encode(&entra.key),
        )
        .unwrap();
        std::fs::write(
            root.join("users.passwd"),
            "plainuser@example.test:{PLAIN}secret\njdoe:{PLAIN}secret\n",
        )
        .unwrap();
        let imap_port = super::postgres::free_port();
        let imaps_port = super::postgres::free_port();
        let r = root.display().to_string();
        std::fs::write(
            root.join("dovecot.conf"),
            dovecot_conf(&r, imap_port, imaps_port) + extra_conf + "\n",
        )
        .unwrap();
        std::fs::write(root.join("dovecot-oauth2.conf.ext"), oauth2_conf(&r)).unwrap();
        run(Command::new("chown")
            .args(["-R", "dovecot:dovecot"])
            .arg(root.join("mail")));

        let script = r#"dovecot -F -c "$ROOT/dovecot.conf" </dev/null >"$ROOT/dovecot.stdout" 2>&1 &
pid=$!
read -r _ || true
kill "$pid" 2>/dev/null
wait "$pid"
rm -rf "$ROOT"
"#;
        let child = Command::new("/bin/sh")
            .args(["-c", script])
            .env("ROOT", &root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start dovecot (apt-get install dovecot-imapd)");
        let server = Dovecot {
            ca_file: root.join("certs/ca.crt"),
            root,
            imap_port,
            imaps_port,
            child: Some(child),
            next_file: std::sync::atomic::AtomicU64::new(0),
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.imap_port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).is_ok() && &buf == b"* OK" {
                    return;
                }
            }
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.root.join("dovecot.log")).unwrap_or_default();
                let out =
                    std::fs::read_to_string(self.root.join("dovecot.stdout")).unwrap_or_default();
                panic!("Dovecot did not start in 20 s:\n{out}\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Delivers a message into `mailbox`'s INBOX (a file in Maildir/new, as an MTA would).
    pub fn deliver(&self, mailbox: &str, raw: &[u8]) {
        self.deliver_as(mailbox, raw, false, std::time::SystemTime::now());
    }

    /// Delivers a message already read (`\Seen`, in Maildir/cur) or not, received at
    /// `received` (Dovecot's INTERNALDATE of a Maildir message is its file's mtime).
    pub fn deliver_as(
        &self,
        mailbox: &str,
        raw: &[u8],
        seen: bool,
        received: std::time::SystemTime,
    ) {
        self.deliver_into(mailbox, "", raw, seen, received);
    }

    /// Delivers a message into `mailbox`'s `folder` ("" for INBOX; else the folder's
    /// directory name as Dovecot keeps it: Maildir++ in modified UTF-7, e.g. `Entw&APw-rfe`).
    pub fn deliver_into(
        &self,
        mailbox: &str,
        folder: &str,
        raw: &[u8],
        seen: bool,
        received: std::time::SystemTime,
    ) {
        let (uid, gid) = dovecot_ids();
        let maildir = self.maildir(mailbox, folder);
        if !maildir.join("new").exists() {
            let home = self.root.join("mail").join(mailbox.to_lowercase());
            let mut dirs = vec![home.clone(), home.join("Maildir")];
            if !folder.is_empty() {
                dirs.push(maildir.clone());
            }
            dirs.extend(["new", "cur", "tmp"].map(|sub| maildir.join(sub)));
            for dir in dirs {
                std::fs::create_dir_all(&dir).unwrap();
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
            }
        }
        let n = self
            .next_file
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!(
            "{}.M{n}P{}.m2t-test",
            chrono::Utc::now().timestamp(),
            std::process::id()
        );
        let tmp = maildir.join("tmp").join(&name);
        let mut file = std::fs::File::create(&tmp).unwrap();
        file.write_all(raw).unwrap();
        file.set_modified(received).unwrap();
        drop(file);
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).unwrap();
        let target = if seen {
            maildir.join("cur").join(format!("{name}:2,S"))
        } else {
            maildir.join("new").join(&name)
        };
        std::fs::rename(&tmp, target).unwrap();
    }

    /// How many messages `mailbox`'s `folder` holds ("" for INBOX, else the folder's
    /// directory name as in [`deliver_into`](Self::deliver_into)), counted in its Maildir.
    pub fn messages_in(&self, mailbox: &str, folder: &str) -> usize {
        let dir = self.maildir(mailbox, folder);
        ["new", "cur"]
            .iter()
            .map(|sub| std::fs::read_dir(dir.join(sub)).map_or(0, |d| d.count()))
            .sum()
    }

    /// The Maildir directory of `mailbox`'s `folder` ("" for INBOX, else the folder's
    /// directory name as in [`deliver_into`](Self::deliver_into)).
    pub fn maildir(&self, mailbox: &str, folder: &str) -> PathBuf {
        let maildir = (self.root.join("mail"))
            .join(mailbox.to_lowercase())
            .join("Maildir");
        match folder {
            "" => maildir,
            _ => maildir.join(format!(".{folder}")),
        }
    }

    /// Dovecot's log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("dovecot.log")).unwrap_or_default()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take()); // the wrapper stops Dovecot and removes the directory
            let _ = child.wait();
        }
    }
}

/// The uid and gid of the `dovecot` user, which owns the mail files.
fn dovecot_ids() -> (u32, u32) {
    static IDS: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *IDS.get_or_init(|| {
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .args([flag, "dovecot"])
                .output()
                .expect("id dovecot");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("the dovecot user exists")
        };
        (id("-u"), id("-g"))
    })
}

fn make_certificates(dir: &Path) {
    let d = dir.display().to_string();
    let script = format!(
        r#"set -e
cd "{d}"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=mail2ticket test CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null
printf 'basicConstraints=critical,CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' > leaf.cnf
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -extfile leaf.cnf -out server.crt 2>/dev/null
chmod 644 server.key
"#
    );
    run(Command::new("/bin/sh").args(["-c", &script]));
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a setup command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn dovecot_conf(root: &str, imap_port: u16, imaps_port: u16) -> String {
    format!(
        r#"protocols = imap
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
instance_name = m2t-{imap_port}
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
auth_verbose = yes
auth_verbose_passwords = no
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
mail_uid = dovecot
mail_gid = dovecot
first_valid_uid = 1
first_valid_gid = 1
ssl = yes
ssl_cert = <{root}/certs/server.crt
ssl_key = <{root}/certs/server.key
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = xoauth2 oauthbearer plain login
auth_failure_delay = 0
auth_cache_size = 0
auth_username_format = %Lu
mail_location = maildir:{root}/mail/%u/Maildir
namespace inbox {{
  inbox = yes
  separator = /
}}
mail_fsync = never
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 1
}}
service imap {{
  process_limit = 256
}}
service anvil {{
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/dovecot-oauth2.conf.ext
}}
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%Lu {root}/users.passwd
}}
userdb {{
  driver = static
  args = home={root}/mail/%u allow_all_users=yes
}}
protocol imap {{
  mail_max_userip_connections = 100
  imap_idle_notify_interval = 2 mins
}}
"#
    )
}

/// The grant check: the token's `mailboxes` claim (",a@x,b@y,") must name the login's
/// user, or hold `*@` its domain (a regular expression: a dot in an address matches any
/// character, which no test depends on).
fn oauth2_conf(root: &str) -> String {
    format!(
        r#"introspection_mode = local
local_validation_key_dict = fs:posix:prefix={root}/keys/
issuers = https://sts.windows.net/{TENANT}/
audience =
username_attribute = sub
username_format = any
active_attribute =
active_value =
pass_attrs = allow_nets=%{{if;%{{oauth2:mailboxes}};~;,(%Lu|[*]@%Ld),;127.0.0.0/8,::1;192.0.2.255/32}}
"#
    )
}
