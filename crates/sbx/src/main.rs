//! `sbx`: the command-line front end of exec-sandbox.
//!
//! Thin on purpose: it parses the command line, wires flags to the library, and prints. Every
//! write to the terminal goes through `term` (so no `print!` and no `process::exit`: `main`
//! returns the status).

mod bench;
mod bench_packages;
mod cache;
mod cli;
mod interrupt;
mod mcp;
mod output;
mod prefetch;
mod progress;
mod run;
mod source;
mod status;
mod term;
mod transfer;

use std::process::ExitCode;
use std::time::Duration;

use cli::{Cli, Command};
use progress::Verbosity;

/// How long leftover blocking work (a lock wait, a read) may delay exit after an interrupt.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let cli = match Cli::parse_from_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with status 0; usage errors to stderr with 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(status::USAGE));
        }
    };
    progress::init(match &cli.command {
        Command::Run(a) => Verbosity::from_flags(&a.log),
        Command::Prefetch(a) => Verbosity::from_flags(&a.log),
        Command::Cache(a) => Verbosity::from_flags(&a.log),
        Command::Bench(a) => Verbosity::from_flags(&a.log),
        Command::Mcp(a) => Verbosity::from_flags(&a.log),
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            output::print_error(Some("cannot start the async runtime"), &e, None);
            return ExitCode::from(status::SANDBOX_ERROR);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(*args).await,
            Command::Prefetch(args) => prefetch::prefetch(args).await,
            Command::Cache(args) => cache::cache(args).await,
            Command::Bench(args) => bench::bench(args).await,
            Command::Mcp(args) => mcp::mcp(args).await,
        }
    });
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    term::finish();
    ExitCode::from(code)
}
