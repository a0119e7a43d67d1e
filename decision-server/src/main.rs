//! The `tollgate` command line: validate a config file (and, later, serve it).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Tollgate usage-governance decision sidecar"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a config file: print every problem with its file and YAML path, exit non-zero
    /// if there is any.
    Validate {
        /// The YAML config file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { file } => match tollgate::config::load_file(&file) {
            Ok(model) => {
                let limits: usize = model.customers.values().map(|c| c.limits.len()).sum();
                println!(
                    "{}: ok ({} customers, {} limits, {} features)",
                    file.display(),
                    model.customers.len(),
                    limits,
                    model.features.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("{}: {} problem(s) found", file.display(), errors.0.len());
                ExitCode::FAILURE
            }
        },
    }
}
