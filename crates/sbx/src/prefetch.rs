//! `sbx prefetch`: readies every guest asset and decides the accelerator ahead of time.

use exec_sandbox::{Language, Scheduler};

use crate::cli::PrefetchArgs;
use crate::status;
use crate::{interrupt, output, term};

/// Runs `sbx prefetch` and returns the exit status.
pub async fn prefetch(args: PrefetchArgs) -> u8 {
    let scheduler = match status::scheduler_from_env(|config| {
        if args.no_validation {
            config.enable_package_validation = false;
        }
    }) {
        Ok(scheduler) => scheduler,
        Err(e) => {
            output::print_usage_error(&e);
            return e.status();
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
    let outcome = match interruptible(scheduler.prefetch()).await {
        Ok(outcome) => outcome,
        Err(code) => return code,
    };
    match outcome {
        Ok(choice) => {
            if !args.log.quiet {
                term::stderr_line(&format!(
                    "ready: accelerator {} ({})",
                    choice.accelerator, choice.reason
                ));
            }
            if let Some(language) = args.language.filter(|_| !args.packages.is_empty()) {
                return prefetch_packages(&args, &scheduler, language).await;
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
    let outcome = match interruptible(scheduler.prefetch_snapshots()).await {
        Ok(outcome) => outcome,
        Err(code) => return code,
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

/// Readies the layer of `-p` packages (and with `--snapshots` a memory snapshot of a VM with
/// it).
async fn prefetch_packages(args: &PrefetchArgs, scheduler: &Scheduler, language: Language) -> u8 {
    if !args.log.quiet {
        term::step(&format!(
            "readying {} package{} for {language}",
            args.packages.len(),
            if args.packages.len() == 1 { "" } else { "s" }
        ));
    }
    let outcome =
        match interruptible(scheduler.prefetch_packages(language, &args.packages, args.snapshots))
            .await
        {
            Ok(outcome) => outcome,
            Err(code) => return code,
        };
    match outcome {
        Ok(ready) => {
            if !args.log.quiet {
                let took = ready
                    .install_ms
                    .map(|ms| format!(", installed in {:.1} s", ms as f64 / 1000.0))
                    .unwrap_or_default();
                term::stderr_line(&format!(
                    "packages ready ({}{took}): {}",
                    output::package_source(ready.source),
                    ready.resolved.join(" ")
                ));
                term::stderr_line(&format!(
                    "the layer holds {} packages: {}",
                    ready.packages.len(),
                    ready.packages.join(" ")
                ));
                if ready.snapshot {
                    term::stderr_line("memory snapshot of a VM with these packages ready");
                }
            }
            scheduler.wait_for_uploads().await;
            if args.snapshots && !ready.snapshot && scheduler.config().l1_snapshots {
                term::stderr_line("the memory snapshot could not be saved (see the log above)");
                return status::SANDBOX_ERROR;
            }
            status::SUCCESS
        }
        Err(e) => {
            output::print_sandbox_error(None, &e);
            status::of_error(&e)
        }
    }
}

/// `work`'s outcome, or the exit status when the user stops `sbx` first (the live line
/// finished).
async fn interruptible<T>(work: impl std::future::Future<Output = T>) -> Result<T, u8> {
    tokio::select! {
        outcome = work => Ok(outcome),
        code = interrupt::wait() => {
            term::finish();
            Err(code)
        }
    }
}
