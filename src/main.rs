use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// percept: offline, real-time media analysis.
#[derive(Debug, Parser)]
#[command(name = "percept", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Inspect or run a Gemma 4 checkpoint.
    #[command(subcommand)]
    Model(percept::model::cli::ModelCmd),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Gemma 4 decoder at real shapes with random weights.
    Model(percept::model::bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::Model(m)) => percept::model::cli::run(m, None),
        Some(Cmd::Bench(BenchCmd::Model(b))) => percept::model::bench::run(&b),
        None => {
            println!("percept");
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
