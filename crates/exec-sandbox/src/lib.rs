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
mod acquire;
mod admission;
pub mod assets;
mod background;
mod cgroup;
mod config;
mod disk;
mod env;
mod error;
mod error_kind;
mod execute;
mod files;
mod gateway;
pub mod limits;
mod network;
mod packages;
mod pool;
mod result;
mod run;
mod scheduler;
mod session;
mod snapshot;
mod sys;
#[cfg(feature = "testing")]
pub mod testing;
mod trust;
pub mod validate;
mod vm;

pub use admission::{Blocker, CapacityError, Cost};
pub use config::SchedulerConfig;
pub use env::EnvVars;
pub use error::Error;
pub use error_kind::ErrorKind;
pub use files::FileError;
pub use gateway::GatewayError;
pub use network::{ExposeParseError, ExposePort, ExposedPort, NetworkOptions, PortProtocol};
pub use packages::{Ecosystem, LayerInfo, PackageError, PackageSource, Rule, SpecError, SpecText};
pub use result::{
    CacheReport, CacheUsage, CgroupVersion, ExecutionResult, Isolation, MemoryUse,
    PreparedPackages, PruneReport, Timing, WarmVm,
};
pub use run::RunOptions;
pub use sbx_protocol::{FileEntry, GuestErrorKind, Language};
pub use scheduler::Scheduler;
pub use session::{ExecOptions, Session, SessionCloseReason, SessionOptions};
pub use trust::TrustError;
pub use validate::ValidationError;
pub use vm::accel::{Accelerator, AcceleratorChoice};
pub use vm::jail::JailError;
pub use vm::qmp::QmpError;
pub use vm::{AckError, ChannelError, OutputCallback, VmError};
