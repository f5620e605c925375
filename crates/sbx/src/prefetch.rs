//! `sbx prefetch`: readies every guest asset and decides the accelerator ahead of time.

use exec_sandbox::{Language, Scheduler, SchedulerConfig};

use crate::cli::PrefetchArgs;
use crate::status::{self, UsageError};
use crate::{interrupt, output, term};

/// Runs `sbx prefetch` and returns the exit status.
pub async fn prefetch(args: PrefetchArgs) -> u8 {
    let scheduler = match SchedulerConfig::from_env()
        .map_err(|e| {
            UsageError::new(e.to_string())
                .hint("fix or unset the EXEC_SANDBOX_* environment variable")
        })
        .and_then(|config| {
            Scheduler::new(config).map_err(|e| UsageError::new("invalid configuration").cause(e))
        }) {
        Ok(scheduler) => scheduler,
        Err(e) => {
            output::print_usage_error(&e);
            return status::USAGE;
        }
    };
    if !args.log.quiet {
        let languages: Vec<_> = Language::ALL.iter().map(|l| l.as_str()).collect();
        term::step(&format!(
            "readying guest assets for {} in {}",
            languages.join(", "),
            scheduler.config().images_dir.display()
        ));
    }
    let outcome = tokio::select! {
        outcome = scheduler.prefetch() => outcome,
        code = interrupt::wait() => {
            term::finish();
            return code;
        }
    };
    match outcome {
        Ok(choice) => {
            if !args.log.quiet {
                term::stderr_line(&format!(
                    "ready: accelerator {} ({})",
                    choice.accelerator, choice.reason
                ));
            }
            if args.snapshots {
                return prefetch_snapshots(&args, &scheduler).await;
            }
            status::SUCCESS
        }
        Err(e) => {
            output::print_sandbox_error(None, &e);
            status::of_error(&e)
        }
    }
}

/// Saves a memory snapshot per language (`--snapshots`).
async fn prefetch_snapshots(args: &PrefetchArgs, scheduler: &Scheduler) -> u8 {
    if !scheduler.config().l1_snapshots {
        term::stderr_line(&format!(
            "memory snapshots are switched off ({}=0): nothing to save",
            exec_sandbox::EnvVars::L1_SNAPSHOTS
        ));
        return status::SUCCESS;
    }
    if !args.log.quiet {
        term::step(&format!(
            "saving memory snapshots in {}",
            scheduler.config().snapshot_cache_dir.display()
        ));
    }
    let outcome = tokio::select! {
        outcome = scheduler.prefetch_snapshots() => outcome,
        code = interrupt::wait() => {
            term::finish();
            return code;
        }
    };
    match outcome {
        Ok(ready) => {
            if !args.log.quiet {
                let names: Vec<_> = ready.iter().map(|l| l.as_str()).collect();
                term::stderr_line(&format!("memory snapshots ready: {}", names.join(", ")));
            }
            if ready.len() == Language::ALL.len() {
                status::SUCCESS
            } else {
                term::stderr_line("some memory snapshots could not be saved (see the log above)");
                status::SANDBOX_ERROR
            }
        }
        Err(e) => {
            output::print_sandbox_error(None, &e);
            status::of_error(&e)
        }
    }
}
