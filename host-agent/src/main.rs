//! `flowshard`: parse the command line, run the command, map failures to exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = flowshard::cli::Cli::parse();
    match flowshard::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flowshard: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
