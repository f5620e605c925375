//! `sbx run`: checks every input before any VM boots, runs the sources concurrently, and prints
//! their outputs without interleaving.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use exec_sandbox::{
    EnvVars, ErrorKind, ExecutionResult, NetworkOptions, RunOptions, Scheduler, SchedulerConfig,
    ValidationError, validate,
};
use tokio::task::JoinSet;

use crate::cli::RunArgs;
use crate::output::{self, Ending};
use crate::source::{self, Source};
use crate::status::{self, UsageError};
use crate::{interrupt, term};

/// How program output reaches the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One source, no `--json`: output is written as it arrives.
    Stream,
    /// Several sources, or `--json`: each source's output is printed whole when it finishes
    /// and every source before it has been printed.
    Collect,
}

/// How one source ended.
enum Outcome {
    Ran(Box<ExecutionResult>),
    Failed(exec_sandbox::Error),
    /// The run's task panicked: a bug, reported rather than propagated.
    Crashed(String),
}

/// Runs `sbx run` and returns the exit status.
pub async fn run(args: RunArgs) -> u8 {
    let Prepared {
        scheduler,
        sources,
        env,
        network,
    } = match prepare(&args) {
        Ok(prepared) => prepared,
        Err(e) => {
            output::print_usage_error(&e);
            return e.status();
        }
    };
    // Packages are checked once for every source (they all share one language), before any
    // VM boots; a spec without a version gets the index's newest in its hint.
    if let Some(source) = sources.first().filter(|_| !args.packages.is_empty())
        && let Err(e) = scheduler
            .check_packages(source.language, &args.packages)
            .await
    {
        output::print_sandbox_error(None, &e);
        return status::of_error(&e);
    }
    let mode = if sources.len() == 1 && !args.json {
        Mode::Stream
    } else {
        Mode::Collect
    };
    let mut runner = Runner {
        args: &args,
        mode,
        scheduler,
        env,
        network,
        sources,
        tasks: JoinSet::new(),
        positions: HashMap::new(),
        finished: Vec::new(),
        statuses: Vec::new(),
    };
    runner.finished.resize_with(runner.sources.len(), || None);
    let signal = tokio::select! {
        () = runner.drive() => None,
        code = interrupt::wait() => Some(code),
    };
    if let Some(code) = signal {
        // Dropping a run kills its VM (kill_on_drop): wait until every run has been dropped.
        runner.tasks.shutdown().await;
        term::finish();
        return code;
    }
    // A memory snapshot being saved after a cold boot would die with this process, and the
    // next `sbx run` could not restore it. Results are printed already; Ctrl-C skips the wait.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    if runner.scheduler.snapshots_pending() && !args.log.quiet && term::is_live() {
        term::step("saving a memory snapshot so that the next runs start faster");
    }
    if runner.scheduler.uploads_pending() && !args.log.quiet && term::is_live() {
        term::step("uploading the package layer to S3 for other hosts");
    }
    tokio::select! {
        () = async {
            runner.scheduler.wait_for_snapshots().await;
            runner.scheduler.wait_for_uploads().await;
            // VMs of finished runs are destroyed after their results: wait for them too.
            runner.scheduler.shutdown().await;
        } => {}
        _ = interrupt::wait() => {}
    }
    status::combine(runner.statuses)
}

/// A run whose every input was checked.
struct Prepared {
    scheduler: Scheduler,
    sources: Vec<Source>,
    env: Vec<(String, String)>,
    network: NetworkOptions,
}

/// Everything is checked here, before any VM: flags, sources, configuration and code.
fn prepare(args: &RunArgs) -> Result<Prepared, UsageError> {
    let env = last_of_each_name(&args.env);
    validate::env_vars(&env).map_err(|e| UsageError::new("invalid --env").cause(e))?;
    // Each value was checked alone while parsing; this checks them together (counts, a port
    // forwarded twice).
    let network = args.network_options();
    validate::network(&network).map_err(network_usage_error)?;
    let planned = source::classify(&args.inputs, args.language, source::probe_path)?;
    if !args.uploads.is_empty() || !args.downloads.is_empty() {
        if planned.len() != 1 {
            return Err(UsageError::new(format!(
                "--upload and --download need exactly one source, got {}",
                planned.len()
            )));
        }
        crate::transfer::check_local(&args.uploads, &args.downloads)?;
    }
    if !args.packages.is_empty() && planned.windows(2).any(|w| w[0].language != w[1].language) {
        return Err(
            UsageError::new("-p/--package needs every source in one language")
                .hint("run the sources of each language in their own sbx run"),
        );
    }
    if planned.len() > 1 && network.expose_ports.iter().any(|p| p.external.is_some()) {
        // Every source's VM would bind the same host port.
        return Err(UsageError::new(format!(
            "--expose with a fixed host port needs exactly one source, got {}",
            planned.len()
        ))
        .hint("leave the host port out (INTERNAL or INTERNAL:0) to get one per source"));
    }

    let mut config = SchedulerConfig::from_env().map_err(|e| {
        UsageError::new(e.to_string()).hint("fix or unset the EXEC_SANDBOX_* environment variable")
    })?;
    // -j bounds the VMs too, unless the operator capped them for the host explicitly.
    if std::env::var_os(EnvVars::MAX_CONCURRENT_VMS).is_none() {
        config.max_concurrent_vms = args.concurrency;
    }
    // One-shot: warm VMs would boot alongside the runs and be thrown away at exit; so would
    // the standby clone started after a single run's restore.
    config.warm_pool_size = 0;
    if std::env::var_os(EnvVars::L1_STANDBY).is_none() {
        config.l1_standby = planned.len() > 1;
    }
    if args.no_validation {
        config.enable_package_validation = false;
    }
    let scheduler = Scheduler::new(config).map_err(status::scheduler_error)?;

    if planned.iter().any(|p| p.origin == source::Origin::Stdin)
        && std::io::stdin().is_terminal()
        && !args.log.quiet
    {
        term::stderr_line("reading code from stdin; end it with Ctrl-D");
    }
    let mut sources = Vec::with_capacity(planned.len());
    for planned in planned {
        let source = source::load(planned)?;
        validate::code(&source.code)
            .map_err(|e| UsageError::new(format!("invalid source `{}`", source.label)).cause(e))?;
        sources.push(source);
    }
    Ok(Prepared {
        scheduler,
        sources,
        env,
        network,
    })
}

/// A network validation error, naming the flag behind the library's field.
fn network_usage_error(error: ValidationError) -> UsageError {
    let flag = match &error {
        ValidationError::Network {
            field: "allowed_domains",
            ..
        } => "--allow-domain",
        ValidationError::Network {
            field: "expose_ports",
            ..
        } => "--expose",
        _ => "--network",
    };
    UsageError::new(format!(
        "invalid {flag}: {}",
        crate::cli::network_reason(error)
    ))
}

/// Repeated `-e` names: the last value wins, at the position of the first.
fn last_of_each_name(pairs: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(pairs.len());
    for (name, value) in pairs {
        match out.iter_mut().find(|(n, _)| n == name) {
            Some(existing) => existing.1.clone_from(value),
            None => out.push((name.clone(), value.clone())),
        }
    }
    out
}

struct Runner<'a> {
    args: &'a RunArgs,
    mode: Mode,
    scheduler: Scheduler,
    env: Vec<(String, String)>,
    network: NetworkOptions,
    sources: Vec<Source>,
    tasks: JoinSet<(usize, Result<ExecutionResult, exec_sandbox::Error>)>,
    /// Task id to source position, to place a task that panicked.
    positions: HashMap<tokio::task::Id, usize>,
    /// Results not printed yet because an earlier source is still running.
    finished: Vec<Option<Outcome>>,
    /// Exit statuses of the printed sources, in order.
    statuses: Vec<u8>,
}

impl Runner<'_> {
    /// Keeps up to `-j` sources running and prints each in order as soon as it can.
    async fn drive(&mut self) {
        let total = self.sources.len();
        let mut next_start = 0;
        loop {
            while self.tasks.len() < self.args.concurrency && next_start < total {
                self.start(next_start);
                next_start += 1;
            }
            let Some(joined) = self.tasks.join_next_with_id().await else {
                break;
            };
            let (position, outcome) = match joined {
                Ok((_, (position, Ok(result)))) => (position, Outcome::Ran(Box::new(result))),
                Ok((_, (position, Err(error)))) => (position, Outcome::Failed(error)),
                Err(e) => match self.positions.get(&e.id()) {
                    Some(&position) => (position, Outcome::Crashed(e.to_string())),
                    None => continue,
                },
            };
            self.finished[position] = Some(outcome);
            while let Some(Some(outcome)) =
                self.finished.get_mut(self.statuses.len()).map(Option::take)
            {
                let status = self.report(self.statuses.len(), outcome);
                self.statuses.push(status);
            }
        }
    }

    fn start(&mut self, position: usize) {
        let total = self.sources.len();
        let source = &mut self.sources[position];
        let mut options = RunOptions::new(source.language, std::mem::take(&mut source.code));
        options.env_vars = self.env.clone();
        options.timeout_seconds = self.args.timeout;
        options.memory_mb = self.args.memory;
        options.network = self.network.clone();
        options.packages = self.args.packages.clone();
        if !self.network.expose_ports.is_empty() && !self.args.log.quiet {
            let label = (total > 1).then(|| source.label.clone());
            options = options.on_ports(move |ports| {
                for line in output::port_lines(label.as_deref(), ports) {
                    term::stderr_line(&line);
                }
            });
        }
        if self.mode == Mode::Stream {
            options = options.on_stdout(term::stdout).on_stderr(term::stderr);
        }
        let console = self.args.log.debug.then(|| {
            let prefix = (total > 1).then(|| format!("[{}/{total}] ", position + 1));
            Arc::new(Console::new(prefix))
        });
        if let Some(console) = &console {
            let console = Arc::clone(console);
            options = options.on_boot_log(move |chunk| console.push(chunk));
        }
        let scheduler = self.scheduler.clone();
        let label = source.label.clone();
        let transfers = (!self.args.uploads.is_empty() || !self.args.downloads.is_empty())
            .then(|| (self.args.uploads.clone(), self.args.downloads.clone()));
        let handle = self.tasks.spawn(async move {
            let outcome = match transfers {
                None => scheduler.run(options).await,
                // Files need a VM that outlives the execution: a session.
                Some((uploads, downloads)) => {
                    crate::transfer::run_with_files(&scheduler, options, &uploads, &downloads).await
                }
            };
            if let Some(console) = console {
                console.flush();
            }
            if let Ok(r) = &outcome {
                tracing::debug!(
                    source = %label,
                    accelerator = %r.accelerator.accelerator,
                    cgroup = r.isolation.cgroup,
                    cgroup_version = r.isolation.cgroup_version.map(|v| v.to_string()),
                    unprivileged = r.isolation.unprivileged,
                    namespaces = %r.isolation.namespaces.join(","),
                    isolation_reason = r.isolation.reason.as_deref(),
                    setup_ms = r.timing.setup_ms,
                    admission_wait_ms = r.timing.admission_wait_ms,
                    boot_ms = r.timing.boot_ms,
                    vm_start_ms = r.timing.vm_start_ms,
                    guest_ready_ms = r.timing.guest_ready_ms,
                    execute_ms = r.timing.execute_ms,
                    interpreter_start_ms = r.timing.interpreter_start_ms,
                    teardown_ms = r.timing.teardown_ms,
                    total_ms = r.timing.total_ms,
                    "finished"
                );
            }
            (position, outcome)
        });
        self.positions.insert(handle.id(), position);
    }

    /// Prints one finished source and returns its exit status.
    fn report(&self, position: usize, outcome: Outcome) -> u8 {
        let source = &self.sources[position];
        let total = self.sources.len();
        let several = total > 1;
        let quiet = self.args.log.quiet;
        let label = several.then_some(source.label.as_str());
        match outcome {
            Outcome::Ran(result) => {
                if self.args.json {
                    let line = output::json_result(&source.label, source.language, &result);
                    term::stdout(format!("{line}\n").as_bytes());
                } else if self.mode == Mode::Collect {
                    if !quiet {
                        output::print_header(&output::header(
                            position + 1,
                            total,
                            &source.label,
                            Ending::Finished(&result),
                        ));
                    }
                    term::stdout(result.stdout.as_bytes());
                    term::stderr(result.stderr.as_bytes());
                }
                if !quiet && !self.args.json {
                    for warning in output::result_warnings(label, &result) {
                        term::stderr_line(&warning);
                    }
                }
                status::of_execution(&result)
            }
            Outcome::Failed(error) => {
                if self.args.json {
                    let line = output::json_failure(&source.label, source.language, &error);
                    term::stdout(format!("{line}\n").as_bytes());
                } else if several && !quiet {
                    output::print_header(&output::header(
                        position + 1,
                        total,
                        &source.label,
                        Ending::Failed,
                    ));
                }
                output::print_sandbox_error(label, &error);
                status::of_error(&error)
            }
            Outcome::Crashed(message) => {
                if self.args.json {
                    let line = output::json_internal_failure(
                        &source.label,
                        source.language,
                        ErrorKind::OutcomeUnknown,
                        &message,
                    );
                    term::stdout(format!("{line}\n").as_bytes());
                }
                let error = UsageError::new(format!("internal error: {message}"));
                output::print_error(label, &error, None);
                status::SANDBOX_ERROR
            }
        }
    }
}

/// The VM console under `--debug`: passed through as it comes with one source; with several,
/// whole lines prefixed by the source's position so consoles booting together stay readable.
struct Console {
    prefix: Option<String>,
    pending: Mutex<Vec<u8>>,
}

impl Console {
    fn new(prefix: Option<String>) -> Self {
        Self {
            prefix,
            pending: Mutex::new(Vec::new()),
        }
    }

    fn push(&self, chunk: &[u8]) {
        let Some(prefix) = &self.prefix else {
            term::stderr(chunk);
            return;
        };
        let lines = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.extend_from_slice(chunk);
            complete_lines(&mut pending, prefix)
        };
        if !lines.is_empty() {
            term::stderr(&lines);
        }
    }

    fn flush(&self) {
        let (Some(prefix), Ok(mut pending)) = (&self.prefix, self.pending.lock()) else {
            return;
        };
        if !pending.is_empty() {
            pending.push(b'\n');
            let lines = complete_lines(&mut pending, prefix);
            term::stderr(&lines);
        }
    }
}

/// Takes the complete lines out of `pending`, each with `prefix`.
fn complete_lines(pending: &mut Vec<u8>, prefix: &str) -> Vec<u8> {
    let Some(last_newline) = pending.iter().rposition(|&b| b == b'\n') else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(last_newline + 1);
    for line in pending
        .drain(..=last_newline)
        .collect::<Vec<_>>()
        .split_inclusive(|&b| b == b'\n')
    {
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_env_names_keep_the_last_value() {
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            last_of_each_name(&pairs(&[("A", "1"), ("B", "2"), ("A", "3")])),
            pairs(&[("A", "3"), ("B", "2")])
        );
    }

    #[test]
    fn console_lines_are_prefixed_whole() {
        let mut pending = b"Linux version".to_vec();
        assert!(complete_lines(&mut pending, "[1/2] ").is_empty());
        pending.extend_from_slice(b" 6.1\nvirtio ok\nmou");
        assert_eq!(
            complete_lines(&mut pending, "[1/2] "),
            b"[1/2] Linux version 6.1\n[1/2] virtio ok\n"
        );
        assert_eq!(pending, b"mou");
    }
}
