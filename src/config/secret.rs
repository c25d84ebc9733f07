//! Secret values in the configuration: where they come from and how they stay hidden.
//!
//! A secret (client secret, password, database URL) may be written in three forms:
//! a plain string, `{ env = "VAR" }` or `{ file = "/run/secrets/x" }`. It is resolved once,
//! when the configuration is loaded, into a [`secrecy::SecretString`], whose `Debug` prints
//! `[REDACTED]`: nothing in this crate can log or format a secret by accident.

use secrecy::SecretString;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where a secret is read from, as written in the TOML file.
///
/// `Debug` never shows an inline value, only that it was inline.
#[derive(Deserialize, Clone)]
#[serde(untagged, deny_unknown_fields)]
pub enum SecretSource {
    /// The value itself, written in the file (fine for tests, discouraged in production).
    Inline(String),
    /// The name of an environment variable holding the value.
    Env {
        /// Environment variable name.
        env: String,
    },
    /// A file holding the value (one trailing newline is ignored); relative paths are
    /// relative to the configuration file's directory.
    File {
        /// Path of the file.
        file: PathBuf,
    },
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("SecretSource::Inline([REDACTED])"),
            SecretSource::Env { env } => write!(f, "SecretSource::Env({env})"),
            SecretSource::File { file } => write!(f, "SecretSource::File({})", file.display()),
        }
    }
}

impl SecretSource {
    /// Reads the secret. The error text says where it looked, never what it found.
    pub fn resolve(&self, config_dir: &Path) -> Result<SecretString, String> {
        let value = match self {
            SecretSource::Inline(value) => value.clone(),
            SecretSource::Env { env } => std::env::var(env).map_err(|e| match e {
                std::env::VarError::NotPresent => {
                    format!("environment variable {env} is not set; export it or change the key")
                }
                std::env::VarError::NotUnicode(_) => {
                    format!("environment variable {env} is not valid UTF-8")
                }
            })?,
            SecretSource::File { file } => {
                let path = config_dir.join(file);
                let mut text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
                if text.ends_with('\n') {
                    text.pop();
                    if text.ends_with('\r') {
                        text.pop();
                    }
                }
                text
            }
        };
        if value.is_empty() {
            return Err("the secret is empty".to_string());
        }
        Ok(SecretString::from(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn debug_never_shows_an_inline_secret() {
        let s = SecretSource::Inline("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
        let resolved = s.resolve(Path::new(".")).unwrap();
        assert!(!format!("{resolved:?}").contains("hunter2"));
        assert_eq!(resolved.expose_secret(), "hunter2");
    }

    #[test]
    fn file_secret_drops_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "abc\n").unwrap();
        let s = SecretSource::File { file: "s".into() };
        assert_eq!(s.resolve(dir.path()).unwrap().expose_secret(), "abc");
    }

    #[test]
    fn missing_env_names_the_variable() {
        let s = SecretSource::Env {
            env: "MAIL2TICKET_SURELY_UNSET_VAR".into(),
        };
        let err = s.resolve(Path::new(".")).unwrap_err();
        assert!(err.contains("MAIL2TICKET_SURELY_UNSET_VAR"), "{err}");
    }
}
