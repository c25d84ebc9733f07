//! `ingest`: raw messages from files, directories or standard input, committed in batches.

use super::{EXIT_FAILED, EXIT_USAGE, connect_and_migrate};
use crate::config::Config;
use crate::pipeline::{self, Arrival, Decision, Incoming, Outcome, Pipeline};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// `ingest` commits this many messages per transaction at most (one fsync per batch)...
const BATCH_MESSAGES: usize = 100;
/// ...or about this many bytes, whichever comes first.
const BATCH_BYTES: usize = 32 << 20;

/// One message to ingest: where it came from, for the report.
enum Input {
    Stdin,
    File(PathBuf),
}

impl Input {
    fn label(&self) -> String {
        match self {
            Input::Stdin => "<stdin>".to_string(),
            Input::File(p) => p.display().to_string(),
        }
    }

    fn read(&self) -> std::io::Result<Vec<u8>> {
        match self {
            Input::Stdin => {
                let mut raw = Vec::new();
                std::io::stdin().lock().read_to_end(&mut raw)?;
                Ok(raw)
            }
            Input::File(p) => std::fs::read(p),
        }
    }
}

/// Expands directories (recursively, sorted, hidden entries skipped) into files.
fn collect_inputs(args: Vec<PathBuf>) -> Result<Vec<Input>, String> {
    if args.is_empty() {
        return Ok(vec![Input::Stdin]);
    }
    let mut inputs = Vec::new();
    for arg in args {
        if arg.as_os_str() == "-" {
            inputs.push(Input::Stdin);
        } else if arg.is_dir() {
            walk(&arg, &mut inputs)
                .map_err(|e| format!("cannot read directory {}: {e}", arg.display()))?;
        } else {
            inputs.push(Input::File(arg));
        }
    }
    Ok(inputs)
}

fn walk(dir: &Path, out: &mut Vec<Input>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(Input::File(path));
        }
    }
    Ok(())
}

/// One batch of inputs, read and decided, ready to store in one transaction.
struct ReadBatch {
    /// How many inputs it covers (read or not).
    consumed: usize,
    /// Label and raw bytes of each message read.
    messages: Vec<(String, Vec<u8>)>,
    /// One decision per message.
    decisions: Vec<Option<Decision>>,
    /// The inputs that could not be read: label and error.
    unreadable: Vec<String>,
}

impl ReadBatch {
    /// Reads up to [`BATCH_MESSAGES`] messages or [`BATCH_BYTES`] from the start of
    /// `inputs` and decides them (blocking: file reads and MIME parsing).
    fn read(inputs: &[Input], pipeline: &Pipeline) -> ReadBatch {
        let mut batch = ReadBatch {
            consumed: 0,
            messages: Vec::new(),
            decisions: Vec::new(),
            unreadable: Vec::new(),
        };
        let mut bytes = 0;
        for input in inputs {
            if batch.messages.len() >= BATCH_MESSAGES
                || (bytes >= BATCH_BYTES && !batch.messages.is_empty())
            {
                break;
            }
            batch.consumed += 1;
            match input.read() {
                Ok(raw) => {
                    bytes += raw.len();
                    batch.messages.push((input.label(), raw));
                }
                Err(e) => batch
                    .unreadable
                    .push(format!("{}: cannot read: {e}", input.label())),
            }
        }
        let items: Vec<Incoming> = batch
            .messages
            .iter()
            .map(|(_, raw)| Incoming::whole(raw, Arrival::FromDateHeader))
            .collect();
        batch.decisions = pipeline::decide_batch(pipeline, &items);
        batch
    }
}

pub(super) async fn ingest_command(
    config: &Config,
    parser_name: &str,
    files: Vec<PathBuf>,
) -> ExitCode {
    let Some(parser) = config.parser(parser_name) else {
        let known: Vec<&str> = config.parsers.iter().map(|p| p.name.as_str()).collect();
        eprintln!(
            "{}: no [[parser]] is named {parser_name:?} (defined: {known:?})",
            config.path.display()
        );
        return ExitCode::from(EXIT_USAGE);
    };
    let inputs = match collect_inputs(files) {
        Ok(inputs) => inputs,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let pool = match connect_and_migrate(config).await {
        Ok(pool) => pool,
        Err(code) => return code,
    };
    let pipeline = Arc::new(Pipeline::from(parser));
    let inputs: Arc<[Input]> = inputs.into();
    // The next batch is read and parsed on a blocking thread while this one commits.
    let read_from = |start: usize| {
        let (inputs, pipeline) = (inputs.clone(), pipeline.clone());
        tokio::task::spawn_blocking(move || ReadBatch::read(&inputs[start..], &pipeline))
    };
    let mut tally = Tally::default();
    let mut next = Some(read_from(0));
    let mut done = 0;
    while let Some(reading) = next.take() {
        let batch = match reading.await {
            Ok(batch) => batch,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        done += batch.consumed;
        if done < inputs.len() {
            next = Some(read_from(done));
        }
        for unreadable in &batch.unreadable {
            println!("failed       {unreadable}");
            tally.failed += 1;
        }
        if batch.messages.is_empty() {
            continue;
        }
        let items: Vec<Incoming> = batch
            .messages
            .iter()
            .map(|(_, raw)| Incoming::whole(raw, Arrival::FromDateHeader))
            .collect();
        match pipeline::commit_decided(&pool, &pipeline, &items, &batch.decisions).await {
            Ok(outcomes) => {
                for ((label, _), outcome) in batch.messages.iter().zip(&outcomes) {
                    println!("{}", describe(outcome, label));
                    tally.count(outcome);
                }
            }
            Err(e) => {
                for (label, _) in &batch.messages {
                    println!("failed       {label}: {e}");
                }
                tally.failed += batch.messages.len();
                tally.not_attempted = inputs.len() - done;
                tracing::error!(parser = parser_name, error = %e, "stopping: messages could not be stored");
                break;
            }
        }
    }
    println!("{}", tally.summary());
    if tally.failed == 0 && tally.not_attempted == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

pub(super) fn describe(outcome: &Outcome, label: &str) -> String {
    match outcome {
        Outcome::Created { ticket_id } => format!("created      ticket {ticket_id:<8} {label}"),
        Outcome::Appended { ticket_id } => format!("appended     ticket {ticket_id:<8} {label}"),
        Outcome::Held { id, reason } => {
            format!("held         quarantine #{id:<2} {label}: {reason}")
        }
        Outcome::Duplicate { ticket_id } => format!("duplicate    ticket {ticket_id:<8} {label}"),
        Outcome::Quarantined { id, reason } => {
            format!("quarantined  #{id:<13} {label}: {reason}")
        }
        Outcome::DuplicateQuarantined { id } => {
            format!("duplicate    quarantine #{id:<2} {label}")
        }
    }
}

#[derive(Default)]
struct Tally {
    outcomes: pipeline::OutcomeCounts,
    failed: usize,
    not_attempted: usize,
}

impl Tally {
    fn count(&mut self, outcome: &Outcome) {
        self.outcomes.count(outcome);
    }

    fn summary(&self) -> String {
        let o = &self.outcomes;
        let mut s = format!(
            "summary: {} created, {} appended, {} held, {} duplicate, {} quarantined, {} failed",
            o.created, o.appended, o.held, o.duplicate, o.quarantined, self.failed
        );
        if self.not_attempted > 0 {
            s.push_str(&format!(", {} not attempted", self.not_attempted));
        }
        s
    }
}
