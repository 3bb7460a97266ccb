//! `flowshard`: parse the command line, run the command, map failures to exit codes.

use std::process::ExitCode;

use clap::Parser;

/// Huge pages under the emulated NIC's tables (see `hw_sim::memory`).
#[global_allocator]
static ALLOC: hw_sim::memory::HugePageAlloc = hw_sim::memory::HugePageAlloc;

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
