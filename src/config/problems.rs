//! Configuration errors that name the file, the line, the key and the fix; all of a file's
//! problems are collected and reported together.

use std::fmt;
use std::path::PathBuf;

/// One problem in the configuration file, located as precisely as we can.
#[derive(Debug, Clone)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `parser[1].imap.port` (empty for a syntax error).
    pub key: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem found in one configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// The problems, in file order where known.
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.path.display())?;
            if let Some(line) = p.line {
                write!(f, ":{line}")?;
                if let Some(column) = p.column {
                    write!(f, ":{column}")?;
                }
            }
            if p.key.is_empty() {
                write!(f, ": {}", p.message)?;
            } else {
                write!(f, ": key `{}`: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

/// Collects problems with the line of the table they belong to.
pub(super) struct Problems<'a> {
    pub(super) text: &'a str,
    pub(super) list: Vec<ConfigProblem>,
}

impl Problems<'_> {
    pub(super) fn add(
        &mut self,
        key: impl Into<String>,
        span_start: Option<usize>,
        message: impl Into<String>,
    ) {
        let line = span_start.map(|offset| line_of(self.text, offset));
        self.list.push(ConfigProblem {
            key: key.into(),
            line,
            column: None,
            message: message.into(),
        });
    }
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

pub(super) fn column_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |p| p + 1);
    text[line_start..offset].chars().count() + 1
}

/// One table of the file (`parser[2]`, `credential[0]`): problems are reported under its
/// key prefix and at its line.
pub(super) struct Table<'p, 't> {
    problems: &'p mut Problems<'t>,
    prefix: String,
    at: Option<usize>,
}

impl<'p, 't> Table<'p, 't> {
    /// The table `prefix` (e.g. `parser[2]`) that starts at byte `at` of the file.
    pub(super) fn new(problems: &'p mut Problems<'t>, prefix: String, at: usize) -> Self {
        Table {
            problems,
            prefix,
            at: Some(at),
        }
    }

    /// Reports a problem with `field` of this table.
    pub(super) fn add(&mut self, field: &str, message: impl Into<String>) {
        let key = format!("{}.{field}", self.prefix);
        self.problems.add(key, self.at, message);
    }

    /// A parsed value, or `default` with the parse error reported under `field`.
    pub(super) fn parsed<T>(
        &mut self,
        field: &str,
        parsed: Option<Result<T, String>>,
        default: T,
    ) -> T {
        match parsed {
            None => default,
            Some(Ok(value)) => value,
            Some(Err(e)) => {
                self.add(field, e);
                default
            }
        }
    }
}
