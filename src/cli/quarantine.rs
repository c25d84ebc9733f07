//! `quarantine list` and `quarantine replay`.

use super::ingest::describe;
use super::{EXIT_FAILED, QuarantineAction, connect_and_migrate};
use crate::config::Config;
use crate::pipeline::{self, Pipeline};
use crate::store;
use std::process::ExitCode;

/// `quarantine list|replay`.
pub(super) async fn quarantine_command(config: &Config, action: QuarantineAction) -> ExitCode {
    let pool = match connect_and_migrate(config).await {
        Ok(pool) => pool,
        Err(code) => return code,
    };
    match action {
        QuarantineAction::List { parser, all, .. } => list(&pool, parser.as_deref(), all).await,
        QuarantineAction::Replay {
            ids, all, parser, ..
        } => replay(config, &pool, ids, all, parser.as_deref()).await,
    }
}

/// `quarantine list`: one line per row.
async fn list(pool: &sqlx::PgPool, parser: Option<&str>, all: bool) -> ExitCode {
    let rows = async {
        let mut conn = pool.acquire().await?;
        store::quarantine::list_quarantine(&mut conn, parser, all).await
    };
    match rows.await {
        Ok(rows) => {
            for r in &rows {
                println!(
                    "#{:<6} {} {:<12} {:<9} {:>9} B  {}{}{}",
                    r.id,
                    r.created_at.format("%Y-%m-%d %H:%M:%S"),
                    r.parser,
                    r.kind,
                    r.raw_size,
                    r.reason,
                    if r.header_only { " [header only]" } else { "" },
                    r.replay_outcome
                        .as_deref()
                        .map(|o| format!(" [replayed: {o}]"))
                        .unwrap_or_default(),
                );
            }
            println!("{} row(s)", rows.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// `quarantine replay`: each row through the current pipeline, exactly once.
async fn replay(
    config: &Config,
    pool: &sqlx::PgPool,
    ids: Vec<i64>,
    all: bool,
    parser: Option<&str>,
) -> ExitCode {
    let pipelines: std::collections::HashMap<String, Pipeline> = config
        .parsers
        .iter()
        .map(|p| (p.name.clone(), Pipeline::from(p)))
        .collect();
    let ids = if all {
        let pending = async {
            let mut conn = pool.acquire().await?;
            store::quarantine::pending_quarantine_ids(&mut conn, parser).await
        };
        match pending.await {
            Ok(ids) => ids,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
    } else {
        ids
    };
    let (mut stored, mut held, mut skipped) = (0, 0, 0);
    for id in ids {
        match pipeline::replay(pool, &pipelines, id).await {
            Ok(pipeline::Replay::Stored(outcome)) => {
                stored += 1;
                println!("{}", describe(&outcome, &format!("quarantine #{id}")));
            }
            Ok(pipeline::Replay::StillHeld) => {
                held += 1;
                println!("still held   quarantine #{id}");
            }
            Ok(pipeline::Replay::Skipped(why)) => {
                skipped += 1;
                println!("skipped      quarantine #{id}: {why}");
            }
            Err(e) => {
                eprintln!("error: quarantine #{id}: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
    }
    println!("replay: {stored} stored, {held} still held, {skipped} skipped");
    ExitCode::SUCCESS
}
