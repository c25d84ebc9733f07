//! The `mail2ticket` binary: see [`mail2ticket::cli`].

fn main() -> std::process::ExitCode {
    mail2ticket::cli::main()
}
