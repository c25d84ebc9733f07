//! [`TokenSources`]: the token caches of every credential, one per credential and scope,
//! and how a reloaded configuration swaps them.

use super::{AuthError, CredentialStatus, SealingKey, TokenSource};
use crate::config::{Config, CredentialConfig, CredentialKind};
use std::collections::HashMap;
use std::sync::Arc;

/// The token caches of every credential in the configuration, one per credential and
/// scope: one app registration can serve an IMAP mailbox and a Graph mailbox, with a
/// token (and a single-flight cache) for each resource. A reload swaps in the new
/// configuration's credentials and keeps the caches of those that did not change.
#[derive(Clone, Default)]
pub struct TokenSources {
    inner: Arc<std::sync::RwLock<Arc<Sources>>>,
}

#[derive(Default)]
struct Sources {
    credentials: HashMap<String, CredentialConfig>,
    pool: Option<sqlx::PgPool>,
    key: Option<Arc<SealingKey>>,
    config_path: std::path::PathBuf,
    by_scope: std::sync::Mutex<HashMap<(String, String), Arc<TokenSource>>>,
}

impl Sources {
    fn new(config: &Config, pool: Option<sqlx::PgPool>) -> Sources {
        Sources {
            credentials: config
                .credentials
                .iter()
                .map(|c| (c.name.clone(), c.clone()))
                .collect(),
            pool,
            key: config
                .secrets_key
                .as_ref()
                .map(|k| Arc::new(SealingKey::new(k))),
            config_path: config.path.clone(),
            by_scope: std::sync::Mutex::default(),
        }
    }

    /// The cache of credential `name` for `scope`, made on first use.
    fn get_for(&self, name: &str, scope: &str) -> Result<Option<Arc<TokenSource>>, AuthError> {
        let Some(credential) = self.credentials.get(name) else {
            return Ok(None);
        };
        let key = (name.to_string(), scope.to_string());
        let mut by_scope = self.by_scope.lock().expect("not poisoned");
        if let Some(source) = by_scope.get(&key) {
            return Ok(Some(source.clone()));
        }
        let source = Arc::new(TokenSource::new(
            credential,
            scope,
            self.pool.clone(),
            self.key.clone(),
            &self.config_path,
        )?);
        by_scope.insert(key, source.clone());
        Ok(Some(source))
    }

    /// Makes the cache of every credential for its configured scope.
    fn fill(&self) -> Result<(), AuthError> {
        for (name, c) in &self.credentials {
            self.get_for(name, &c.scope)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for TokenSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current();
        let mut names: Vec<&String> = current.credentials.keys().collect();
        names.sort();
        f.debug_struct("TokenSources")
            .field("credentials", &names)
            .finish_non_exhaustive()
    }
}

impl TokenSources {
    /// The caches of every `[[credential]]`, each for its configured scope (more scopes are
    /// added on demand by [`get_for`](Self::get_for)). Delegated credentials keep their
    /// sign-in in `pool` (without one, they report a database error when asked).
    pub fn from_config(config: &Config, pool: Option<sqlx::PgPool>) -> Result<Self, AuthError> {
        let sources = Sources::new(config, pool);
        sources.fill()?;
        Ok(TokenSources {
            inner: Arc::new(std::sync::RwLock::new(Arc::new(sources))),
        })
    }

    /// Switches to the credentials of a reloaded `config`. A credential whose settings are
    /// unchanged keeps its caches (its token, its failure hold); a changed one (or a
    /// delegated one whose `[secrets] key` changed) gets fresh caches. Returns the names
    /// of the credentials that changed or went away: the parsers using them must restart.
    pub fn reload(&self, old: &Config, config: &Config) -> Result<Vec<String>, AuthError> {
        let current = self.current();
        let sources = Sources::new(config, current.pool.clone());
        let key_changed = !old.same_secrets_key(config);
        let unchanged =
            |name: &str| match (current.credentials.get(name), sources.credentials.get(name)) {
                (Some(before), Some(now)) => {
                    before == now && !(now.kind == CredentialKind::Delegated && key_changed)
                }
                _ => false,
            };
        let kept: HashMap<(String, String), Arc<TokenSource>> = current
            .by_scope
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|((name, _), _)| unchanged(name))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        *sources.by_scope.lock().expect("not poisoned") = kept;
        sources.fill()?;
        let mut changed: Vec<String> = current
            .credentials
            .keys()
            .filter(|name| !unchanged(name))
            .cloned()
            .collect();
        changed.sort();
        *self.inner.write().expect("not poisoned") = Arc::new(sources);
        Ok(changed)
    }

    fn current(&self) -> Arc<Sources> {
        self.inner.read().expect("not poisoned").clone()
    }

    /// The status of every credential (its configured scope's cache), by name.
    pub async fn statuses(&self) -> Vec<CredentialStatus> {
        let current = self.current();
        let mut names: Vec<&String> = current.credentials.keys().collect();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            if let Some(source) = self.get(name) {
                out.push(source.status().await);
            }
        }
        out
    }

    /// The cache of that credential for its configured scope.
    pub fn get(&self, name: &str) -> Option<Arc<TokenSource>> {
        let current = self.current();
        let credential = current.credentials.get(name)?;
        current.get_for(name, &credential.scope).ok().flatten()
    }

    /// The cache of that credential for Microsoft Graph (its `graph_scope`).
    pub fn graph(&self, name: &str) -> Option<Arc<TokenSource>> {
        let current = self.current();
        let credential = current.credentials.get(name)?;
        current
            .get_for(name, &credential.graph_scope)
            .ok()
            .flatten()
    }

    /// The cache of that credential for `scope` (made on first use); `None` for an unknown
    /// credential.
    pub fn get_for(&self, name: &str, scope: &str) -> Result<Option<Arc<TokenSource>>, AuthError> {
        self.current().get_for(name, scope)
    }
}
