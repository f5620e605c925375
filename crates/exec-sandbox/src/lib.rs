//! Run untrusted Python, JavaScript/TypeScript and shell code inside disposable QEMU microVMs.
//!
//! Every [`Scheduler::run`] boots a fresh microVM from this project's own guest images, runs the
//! code in a persistent interpreter inside it as an unprivileged user, streams its output back,
//! enforces the timeout and output limits, and destroys the VM.
//!
//! ```no_run
//! use exec_sandbox::{Language, RunOptions, Scheduler, SchedulerConfig};
//!
//! # async fn demo() -> Result<(), exec_sandbox::Error> {
//! let scheduler = Scheduler::new(SchedulerConfig::from_env()?)?;
//! let result = scheduler
//!     .run(RunOptions::new(Language::Python, "print(6 * 7)").timeout_seconds(10))
//!     .await?;
//! assert_eq!(result.stdout, "42\n");
//! assert_eq!(result.exit_code, 0);
//! println!("ran on {} in {} ms", result.accelerator.accelerator, result.timing.total_ms);
//! # Ok(())
//! # }
//! ```

#[macro_use]
mod builders;
pub mod admission;
pub mod assets;
mod config;
mod env;
mod error;
pub mod files;
pub mod gateway;
pub mod limits;
pub mod network;
mod pool;
mod result;
mod run;
mod scheduler;
mod session;
mod sys;
pub mod validate;
pub mod vm;

pub use config::SchedulerConfig;
pub use env::EnvVars;
pub use error::{Error, ErrorKind};
pub use network::{ExposePort, ExposedPort, NetworkOptions, PortProtocol};
pub use result::{ExecutionResult, Timing};
pub use run::RunOptions;
pub use sbx_protocol::{FileEntry, Language};
pub use scheduler::Scheduler;
pub use session::{ExecOptions, Session, SessionCloseReason, SessionOptions};
pub use validate::ValidationError;
pub use vm::OutputCallback;
pub use vm::accel::{Accelerator, AcceleratorChoice};
