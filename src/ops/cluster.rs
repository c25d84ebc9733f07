//! The replicas and the mailbox leases as `/status.json` and the status page show them:
//! read from the database at each request, so every replica shows the whole cluster.

use crate::config::ClusterConfig;
use crate::store::leases::{self, LeaseRow, ReplicaRow};
use serde::Serialize;

/// Who reads which mailbox.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// This process's `[cluster] replica_name`.
    pub replica: String,
    /// The lease TTL in seconds.
    pub lease_ttl_s: u64,
    /// The replicas alive (heartbeat younger than the TTL).
    pub replicas: Vec<ReplicaRow>,
    /// Every mailbox's lease (held or not).
    pub leases: Vec<LeaseRow>,
    /// Set when the database could not be read (the lists are empty then).
    pub error: Option<String>,
}

impl ClusterView {
    /// Reads the replicas and leases (within 2 s; the status must show while the database
    /// is down too).
    pub async fn load(pool: &sqlx::PgPool, cluster: &ClusterConfig) -> ClusterView {
        let read = async {
            let mut conn = pool.acquire().await?;
            let replicas = leases::live_replicas(&mut conn, cluster.lease_ttl).await?;
            let leases = leases::list(&mut conn).await?;
            Ok::<_, crate::store::StoreError>((replicas, leases))
        };
        let (replicas, leases, error) =
            match tokio::time::timeout(std::time::Duration::from_secs(2), read).await {
                Ok(Ok((replicas, leases))) => (replicas, leases, None),
                Ok(Err(e)) => (Vec::new(), Vec::new(), Some(e.to_string())),
                Err(_) => (
                    Vec::new(),
                    Vec::new(),
                    Some("the database did not answer within 2 s".to_string()),
                ),
            };
        ClusterView {
            replica: cluster.replica_name.clone(),
            lease_ttl_s: cluster.lease_ttl.as_secs(),
            replicas,
            leases,
            error,
        }
    }

    /// The lease of `parser`, if it was ever taken.
    pub fn lease(&self, parser: &str) -> Option<&LeaseRow> {
        self.leases.iter().find(|l| l.parser == parser)
    }
}
