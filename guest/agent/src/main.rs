//! `sbx-agent`: the exec-sandbox guest agent.
//!
//! In the VM it is `/init` (PID 1): it mounts the root disk, switches to it, hardens the
//! system, then serves the host's requests on the virtio-serial port
//! `org.exec-sandbox.control`: pings, interpreter warm-ups and code executions in persistent
//! Python, Bun and bash interpreters running as an unprivileged user.
//!
//! For development it serves the same protocol on stdin/stdout:
//!
//! ```text
//! sbx-agent --stdio [--no-setuid]
//! ```
//!
//! with interpreters taken from `SBX_AGENT_PYTHON`, `SBX_AGENT_BUN`, `SBX_AGENT_BASH`, driver
//! files written to `SBX_AGENT_RUN_DIR` and code run in `SBX_AGENT_HOME` (see `config.rs`).

mod certificates;
mod config;
mod context;
mod driver;
mod files;
mod init;
mod interpreter;
mod layer;
mod log;
mod memory;
mod network;
mod outbox;
mod port;
mod procscan;
mod reaper;
mod reseed;
mod script;
mod server;
mod streams;
mod sys;
mod warm;
mod worker;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use config::{Config, Mode, SHUTDOWN_FLUSH, env_vars, path_from_env, paths};
use context::Context;
use init::chain;
use reaper::Reaper;
use server::Stop;

const USAGE: &str = "\
usage: sbx-agent --stdio [--no-setuid]

The exec-sandbox guest agent. As PID 1 of the VM it takes no arguments.
  --stdio      serve the protocol on stdin/stdout (development)
  --no-setuid  keep the current user for interpreters even when running as root
Environment: SBX_AGENT_PYTHON, SBX_AGENT_BUN, SBX_AGENT_BASH (interpreter paths),
SBX_AGENT_RUN_DIR (driver files), SBX_AGENT_HOME (working directory of the code),
SBX_AGENT_PACKAGES (a directory laid out like a package layer).";

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        log::error(format_args!("panic: {info}"));
    }));
    if rustix::process::getpid().is_init() {
        run_init();
    }
    let mut stdio = false;
    let mut no_setuid = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--stdio" => stdio = true,
            "--no-setuid" => no_setuid = true,
            "--version" => {
                log::info(format_args!("{}", env!("CARGO_PKG_VERSION")));
                return ExitCode::SUCCESS;
            }
            "-h" | "--help" => {
                log::info(format_args!("{USAGE}"));
                return ExitCode::SUCCESS;
            }
            other => {
                log::error(format_args!("unknown argument {other:?}\n{USAGE}"));
                return ExitCode::from(2);
            }
        }
    }
    if !stdio {
        log::error(format_args!(
            "not PID 1: pass --stdio to serve on stdin/stdout\n{USAGE}"
        ));
        return ExitCode::from(2);
    }
    match std::panic::catch_unwind(|| run_stdio(no_setuid)) {
        Ok(Ok(code)) => code,
        Ok(Err(message)) => {
            log::error(format_args!("{message}"));
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sbx-agent")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn interpreter_paths() -> (PathBuf, PathBuf, PathBuf) {
    (
        path_from_env(env_vars::PYTHON, paths::PYTHON),
        path_from_env(env_vars::BUN, paths::BUN),
        path_from_env(env_vars::BASH, paths::BASH),
    )
}

/// PID 1: boot, serve, power off. Never returns: PID 1 exiting would panic the kernel.
fn run_init() -> ! {
    let result = std::panic::catch_unwind(|| -> Result<Stop, String> {
        let booted = init::boot().map_err(|e| chain(&e))?;
        let (python, bun, bash) = interpreter_paths();
        let config = Config {
            mode: Mode::Init,
            drop_privileges: true,
            home: PathBuf::from(paths::HOME),
            run_dir: booted.run_dir,
            python,
            bun,
            bash,
            root_mounted: booted.root_mounted,
            packages: booted.packages,
            boot: booted.timeline,
            emulated_cpu: booted.tcg,
        };
        if let Err(e) = init::install_drivers(&config.run_dir) {
            log::warn(format_args!(
                "cannot write drivers to {}: {e}",
                config.run_dir.display()
            ));
        }
        // Opened on this thread before the runtime starts: a blocking task would leave a
        // thread in tokio's blocking pool that ends on its own 10 s later, in every clone of a
        // template saved before then, running code no clone ran yet (`docs/measurements.md`).
        let port = port::open_virtio(Path::new(paths::VIRTIO_PORTS), Path::new("/dev"))
            .map_err(|e| chain(&e))?;
        runtime()?.block_on(async {
            let reaper = Reaper::start().map_err(|e| format!("cannot watch children: {e}"))?;
            let (inbound, out) = port::start_virtio(port).map_err(|e| chain(&e))?;
            let ctx = Arc::new(Context::new(config, reaper));
            let stop = server::serve(ctx, inbound, out.clone()).await;
            out.flushed(SHUTDOWN_FLUSH).await;
            Ok(stop)
        })
    });
    match result {
        Ok(Ok(Stop::Shutdown)) => log::info(format_args!("shutdown requested")),
        Ok(Ok(Stop::Desync(e))) => log::error(format_args!(
            "the host sent a corrupt frame ({e}); the stream cannot be resynchronised: powering off"
        )),
        Ok(Ok(Stop::Closed)) => log::error(format_args!("control channel closed")),
        Ok(Err(message)) => log::error(format_args!("{message}")),
        Err(_) => log::error(format_args!("the agent panicked")),
    }
    power_off()
}

fn power_off() -> ! {
    rustix::fs::sync();
    // Nothing else may outlive us.
    let _ = sys::kill_everyone(rustix::process::Signal::KILL);
    rustix::fs::sync();
    // With `reboot=t` on the kernel command line and QEMU's `-no-reboot`, a restart ends the
    // VM (a power-off would only halt a microvm without ACPI). Returns only on failure.
    if let Err(error) = rustix::system::reboot(rustix::system::RebootCommand::Restart) {
        log::error(format_args!("reboot failed: {error}"));
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

fn run_stdio(no_setuid: bool) -> Result<ExitCode, String> {
    // rustix takes the flag as an `Option<Pid>`: any `Some` turns it on.
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        log::warn(format_args!("cannot become a subreaper: {e}"));
    }
    let home = match std::env::var_os(env_vars::HOME) {
        Some(home) if !home.is_empty() => PathBuf::from(home),
        _ => std::env::current_dir().map_err(|e| format!("no working directory: {e}"))?,
    };
    let (run_dir, temporary_run_dir) = match std::env::var_os(env_vars::RUN_DIR) {
        Some(dir) if !dir.is_empty() => (PathBuf::from(dir), false),
        _ => (
            std::env::temp_dir().join(format!("sbx-agent-{}", sys::getpid())),
            true,
        ),
    };
    init::install_drivers(&run_dir)
        .map_err(|e| format!("cannot write drivers to {}: {e}", run_dir.display()))?;
    let (python, bun, bash) = interpreter_paths();
    let config = Config {
        mode: Mode::Stdio,
        drop_privileges: rustix::process::geteuid().is_root() && !no_setuid,
        home,
        run_dir: run_dir.clone(),
        python,
        bun,
        bash,
        root_mounted: false,
        packages: match std::env::var_os(env_vars::PACKAGES) {
            Some(dir) if !dir.is_empty() => {
                layer::LayerState::Mounted(layer::Layer::inspect(Path::new(&dir)))
            }
            _ => layer::LayerState::Absent,
        },
        boot: sbx_protocol::BootTimeline::default(),
        emulated_cpu: false,
    };
    let runtime = runtime()?;
    let stop = runtime.block_on(async {
        let reaper = Reaper::start().map_err(|e| format!("cannot watch children: {e}"))?;
        let (inbound, out) = port::start_stdio().map_err(|e| chain(&e))?;
        let ctx = Arc::new(Context::new(config, reaper));
        let stop = server::serve(ctx, inbound, out.clone()).await;
        out.flushed(SHUTDOWN_FLUSH).await;
        Ok::<_, String>(stop)
    })?;
    // Dropping the runtime drops the workers and so kills the interpreters.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if temporary_run_dir {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    match stop {
        Stop::Shutdown | Stop::Closed => Ok(ExitCode::SUCCESS),
        Stop::Desync(e) => Err(format!("the host sent a corrupt frame: {e}")),
    }
}
