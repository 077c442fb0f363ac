//! `tso`: the timestamp oracle's one binary. Parses flags, wires parts, maps errors to exit
//! codes; everything else is library code.

use std::process::ExitCode;

mod admin;
mod cli;
mod cluster;
mod config;
mod get;
mod lab;
mod lease;
mod members;
mod ops;
mod parse;
mod recover;
mod seq;
mod serve;
mod tls;

/// Exit code of a failure at run time (clap uses 2 for usage errors).
const EXIT_FAILURE: u8 = 1;
/// Exit code of a bad `--config` file: a usage error, as clap's.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = match config::parse() {
        Ok(config::Parsed {
            print_config: Some(text),
            ..
        }) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(parsed) => parsed.cli,
        Err(err) => {
            eprintln!("tso: error: {err:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result = match cli.command {
        cli::Command::Serve(args) => serve::run(*args),
        cli::Command::Init(args) => serve::init(args),
        cli::Command::Export(args) => recover::export(args),
        cli::Command::Get(args) => get::run(args),
        cli::Command::Seq(args) => seq::run(args),
        cli::Command::Lease(args) => lease::run(args),
        cli::Command::Frontier(args) => lease::frontier(args),
        cli::Command::Parse(args) => parse::run(args),
        cli::Command::Bench(args) => lab::bench(args),
        cli::Command::Check(args) => return lab::check(args),
        cli::Command::Admin(args) => admin::run(args),
        cli::Command::Status(args) => {
            return match ops::status(args) {
                Ok(code) => ExitCode::from(code),
                Err(err) => {
                    eprintln!("tso: error: {err:#}");
                    ExitCode::from(ops::DOWN)
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tso: error: {err:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
