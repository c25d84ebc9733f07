//! The only code that speaks IMAP (through async-imap), with typed errors: connecting,
//! TLS, the greeting and login here; the commands of a logged-in session in
//! [`super::session`].
//!
//! async-imap is trusted for the protocol grammar only. This module adds what it lacks or
//! gets wrong where losing mail is at stake:
//! - a timeout on every network step (async-imap has none) and TCP keepalive;
//! - the server greeting is read explicitly (async-imap does not);
//! - a FETCH that returns fewer messages than asked is an error (async-imap reports a
//!   tagged NO/BAD or a clean close in mid-fetch as success: upstream #95), and the
//!   listing (UID FETCH of sizes and dates), UID SEARCH, UID STORE and EXPUNGE read their
//!   tagged answer themselves (`ImapSession::run_checked`) for the same reason: a refused
//!   or cut listing or search is not "nothing new", a refused or cut `\Seen` is not
//!   "marked read";
//! - `UID FETCH n:*` returns the last message even when n is past it: results are filtered;
//! - the unsolicited-response channel (which drops items past 100) is drained after each
//!   command, and a BYE found there is a lost connection;
//! - an IDLE that ends without our asking (a server-side kill) is a lost connection.

use super::session::ImapSession;
use crate::config::{Encryption, ImapConfig};
use async_imap::Client;
use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Timeout for connecting, the TLS handshake and each command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Any byte stream the IMAP client runs over (plain TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + fmt::Debug {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + fmt::Debug> Io for T {}

/// The stream type of every session.
pub type Stream = Box<dyn Io>;

/// What went wrong talking to the IMAP server, by step.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    /// TCP connection failed.
    #[error("cannot connect to {host}:{port}: {reason}")]
    Connect {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// Why.
        reason: String,
    },
    /// TLS could not be set up.
    #[error("TLS with {host} failed: {reason}")]
    Tls {
        /// Host.
        host: String,
        /// Why (certificate problems are named here).
        reason: String,
    },
    /// A step did not finish in time.
    #[error("the IMAP server did not answer within {}s during {step}", .after.as_secs())]
    Timeout {
        /// The step.
        step: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The server refused the login.
    #[error("the IMAP server refused the {mechanism} login as {user}: {reason}")]
    AuthRejected {
        /// XOAUTH2, OAUTHBEARER or LOGIN.
        mechanism: &'static str,
        /// The user= sent.
        user: String,
        /// The server's words.
        reason: String,
    },
    /// Login worked but the mailbox cannot be opened (Exchange's "User is authenticated but
    /// not connected").
    #[error(
        "logged in, but the mailbox {user} cannot be opened: {reason} (check the mailbox address, the app's FullAccess permission on it, and that IMAP is enabled for it)"
    )]
    NotConnected {
        /// The mailbox.
        user: String,
        /// The server's words.
        reason: String,
    },
    /// SELECT failed.
    #[error("cannot select folder {folder:?}: {reason}")]
    Select {
        /// The folder.
        folder: String,
        /// The server's words.
        reason: String,
    },
    /// The server returned fewer messages than asked for.
    #[error("UID FETCH returned {got} of {asked} messages: treating the connection as lost")]
    ShortFetch {
        /// Asked.
        asked: usize,
        /// Got.
        got: usize,
    },
    /// The connection ended.
    #[error("the IMAP connection was lost during {step}: {reason}")]
    ConnectionLost {
        /// The step.
        step: &'static str,
        /// Details.
        reason: String,
    },
    /// The server answered NO/BAD or something unexpected.
    #[error("IMAP {step} failed: {reason}")]
    Command {
        /// The step.
        step: &'static str,
        /// The server's words.
        reason: String,
    },
}

impl ImapError {
    /// True when the server rejected our credentials (a token may need renewing).
    pub fn is_auth_rejected(&self) -> bool {
        matches!(self, ImapError::AuthRejected { .. })
    }
}

pub(super) fn command_error(step: &'static str, e: async_imap::error::Error) -> ImapError {
    use async_imap::error::Error;
    match e {
        Error::Io(io) => ImapError::ConnectionLost {
            step,
            reason: io.to_string(),
        },
        Error::ConnectionLost => ImapError::ConnectionLost {
            step,
            reason: "the server closed the connection".into(),
        },
        other => ImapError::Command {
            step,
            reason: other.to_string(),
        },
    }
}

pub(super) async fn timed<T>(
    step: &'static str,
    fut: impl Future<Output = Result<T, async_imap::error::Error>>,
) -> Result<T, ImapError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(result) => result.map_err(|e| command_error(step, e)),
        Err(_) => Err(ImapError::Timeout {
            step,
            after: COMMAND_TIMEOUT,
        }),
    }
}

/// How to log in.
pub enum Login<'a> {
    /// SASL XOAUTH2 (or OAUTHBEARER when that is all the server offers).
    OAuth {
        /// The mailbox (`user=`).
        user: &'a str,
        /// The access token.
        token: &'a SecretString,
    },
    /// Plain LOGIN.
    Password {
        /// User name.
        user: &'a str,
        /// Password.
        password: &'a SecretString,
    },
}

/// An unauthenticated connection, greeting read.
pub struct Connection {
    client: Client<Stream>,
    greeting: String,
}

/// Opens a connection as `imap` says: TLS, STARTTLS or plain.
pub async fn connect(imap: &ImapConfig) -> Result<Connection, ImapError> {
    let tcp = tcp_connect(&imap.host, imap.port).await?;
    let tls_config = || {
        crate::tls::client_config(imap.ca_file.as_deref()).map_err(|reason| ImapError::Tls {
            host: imap.host.clone(),
            reason,
        })
    };
    match imap.encryption {
        Encryption::Ssl => {
            let tls = tls_wrap(&imap.host, tls_config()?, Box::new(tcp)).await?;
            greet(Client::new(tls)).await
        }
        Encryption::None => greet(Client::new(Box::new(tcp) as Stream)).await,
        Encryption::Starttls => {
            let plain = greet(Client::new(Box::new(tcp) as Stream)).await?;
            let mut client = plain.client;
            timed(
                "STARTTLS",
                client.run_command_and_check_ok("STARTTLS", None),
            )
            .await?;
            let tls = tls_wrap(&imap.host, tls_config()?, client.into_inner()).await?;
            Ok(Connection {
                client: Client::new(tls),
                greeting: plain.greeting,
            })
        }
    }
}

async fn tcp_connect(host: &str, port: u16) -> Result<TcpStream, ImapError> {
    let fail = |reason: String| ImapError::Connect {
        host: host.to_string(),
        port,
        reason,
    };
    let tcp = tokio::time::timeout(COMMAND_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| fail(format!("no answer within {}s", COMMAND_TIMEOUT.as_secs())))?
        .map_err(|e| fail(e.to_string()))?;
    // Keepalive notices a peer that vanished without a FIN (NAT timeouts, dead hosts).
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(15));
    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

async fn tls_wrap(
    host: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
    io: Stream,
) -> Result<Stream, ImapError> {
    let fail = |reason: String| ImapError::Tls {
        host: host.to_string(),
        reason,
    };
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| fail(format!("not a valid TLS server name: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = tokio::time::timeout(COMMAND_TIMEOUT, connector.connect(name, io))
        .await
        .map_err(|_| fail("the TLS handshake timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    Ok(Box::new(tls))
}

async fn greet(mut client: Client<Stream>) -> Result<Connection, ImapError> {
    let response = tokio::time::timeout(COMMAND_TIMEOUT, client.read_response())
        .await
        .map_err(|_| ImapError::Timeout {
            step: "greeting",
            after: COMMAND_TIMEOUT,
        })?
        .map_err(|e| ImapError::ConnectionLost {
            step: "greeting",
            reason: e.to_string(),
        })?
        .ok_or_else(|| ImapError::ConnectionLost {
            step: "greeting",
            reason: "closed before the greeting".into(),
        })?;
    let greeting = String::from_utf8_lossy(response.borrow_owner()).into_owned();
    if !greeting.starts_with("* OK") && !greeting.starts_with("* PREAUTH") {
        return Err(ImapError::Command {
            step: "greeting",
            reason: greeting.trim().to_string(),
        });
    }
    Ok(Connection { client, greeting })
}

/// The XOAUTH2 / OAUTHBEARER client side: the initial response, then an empty answer to
/// the server's error challenge so that the command ends with NO.
struct OAuthResponder {
    initial: Vec<u8>,
    sent: bool,
}

impl async_imap::Authenticator for OAuthResponder {
    type Response = Vec<u8>;
    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        if self.sent {
            return Vec::new();
        }
        self.sent = true;
        std::mem::take(&mut self.initial)
    }
}

impl Connection {
    /// Logs in; the session is ready for [`ImapSession::select`].
    pub async fn login(self, login: Login<'_>) -> Result<ImapSession, ImapError> {
        let Connection { client, greeting } = self;
        let (mechanism, user, result) = match login {
            Login::Password { user, password } => {
                let r = tokio::time::timeout(
                    COMMAND_TIMEOUT,
                    client.login(user, password.expose_secret()),
                )
                .await;
                ("LOGIN", user, r.map(|r| r.map_err(|(e, _)| e)))
            }
            Login::OAuth { user, token } => {
                // Exchange and Dovecot both offer XOAUTH2; use OAUTHBEARER only when the
                // greeting's capabilities list it and not XOAUTH2.
                let upper = greeting.to_ascii_uppercase();
                let bearer_only =
                    upper.contains("AUTH=OAUTHBEARER") && !upper.contains("AUTH=XOAUTH2");
                let (mechanism, initial) = if bearer_only {
                    let escaped = user.replace('=', "=3D").replace(',', "=2C");
                    (
                        "OAUTHBEARER",
                        format!(
                            "n,a={escaped},\x01auth=Bearer {}\x01\x01",
                            token.expose_secret()
                        ),
                    )
                } else {
                    (
                        "XOAUTH2",
                        format!(
                            "user={user}\x01auth=Bearer {}\x01\x01",
                            token.expose_secret()
                        ),
                    )
                };
                let responder = OAuthResponder {
                    initial: initial.into_bytes(),
                    sent: false,
                };
                let r = tokio::time::timeout(
                    COMMAND_TIMEOUT,
                    client.authenticate(mechanism, responder),
                )
                .await;
                (mechanism, user, r.map(|r| r.map_err(|(e, _)| e)))
            }
        };
        match result {
            Err(_) => Err(ImapError::Timeout {
                step: "login",
                after: COMMAND_TIMEOUT,
            }),
            Ok(Ok(session)) => Ok(ImapSession::new(session, user.to_string())),
            Ok(Err(
                async_imap::error::Error::No(reason) | async_imap::error::Error::Bad(reason),
            )) => Err(ImapError::AuthRejected {
                mechanism,
                user: user.to_string(),
                reason,
            }),
            Ok(Err(e)) => Err(command_error("login", e)),
        }
    }
}
