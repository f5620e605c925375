//! Memory snapshots of one VM through QEMU's migration: boot a template with its RAM in a file,
//! save its device state over QMP, and start clones that map that RAM copy-on-write.
//!
//! The sequence (QEMU 7.2 under TCG or KVM; measured in `docs/measurements.md`):
//!
//! - Template: `-object memory-backend-file,share=on` + `-M memory-backend=`; once the
//!   interpreter is warm, `migrate-set-capabilities {x-ignore-shared}`, `stop`, `getfd` (the
//!   open vmstate file travels over the monitor socket: QEMU's sandbox forbids `exec:` and 7.2
//!   has no `file:`), `migrate {uri: fd:vmstate}`, poll `query-migrate`, `quit`. The RAM is the
//!   file itself, so the stream holds only device state (~60 KB).
//! - Clone: the same command line with `share=off` and `-incoming defer`, the RAM and vmstate
//!   inherited as open descriptors, `migrate-set-capabilities {x-ignore-shared, events}`,
//!   `migrate-incoming {uri: fd:N}`, wait for the `MIGRATION` event, `cont`; then the guest is
//!   told it is a clone ([`Request::Reseed`]): clones share the template's random state and
//!   clock otherwise.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use sbx_protocol::{AgentHello, Event, Request};
use serde_json::json;

use super::qemu::{self, INCOMING_FD, Launch, RAM_FD, RamFile, VmSpec};
use super::qmp::Qmp;
use super::{Qemu, Started, Vm, VmError, exit_text, settle_logs, start};
use crate::gateway::{Gateway, GatewayConfig};

/// Deadline of each monitor exchange of a template save.
const QMP_DEADLINE: Duration = Duration::from_secs(10);

/// What a clone is restored from: its template's files, open and checked by the caller.
pub(crate) struct Saved {
    /// The template's RAM file (mapped copy-on-write; never modified).
    pub ram: std::fs::File,
    /// The template's device state.
    pub vmstate: std::fs::File,
    /// What the template's agent said when it started, given to the clone.
    pub hello: AgentHello,
}

/// What a VM warms before it is pooled or saved: its language's interpreter, and modules to
/// import in it (a package set's, for its template).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Warmup {
    /// The interpreter.
    pub language: sbx_protocol::Language,
    /// Modules to import (best effort, in the agent), none for a plain interpreter.
    pub modules: Vec<String>,
}

impl From<sbx_protocol::Language> for Warmup {
    fn from(language: sbx_protocol::Language) -> Self {
        Warmup {
            language,
            modules: Vec::new(),
        }
    }
}

impl Vm {
    /// Boots a template: guest RAM in `ram` (an empty file the QEMU user can open read-write,
    /// shared, so it holds the guest's memory when saved) and a QMP monitor, for
    /// [`Vm::save_template`]. A template with a NIC (`spec.nic`) gets a gateway that allows
    /// nothing: the guest configures its NIC at boot, and its clones are given their own
    /// gateways when restored.
    pub(crate) async fn boot_template(
        qemu: &Qemu,
        spec: &VmSpec,
        ram: std::fs::File,
        deadline: Duration,
    ) -> Result<Vm, VmError> {
        let launch = Launch {
            ram_file: Some(RamFile { shared: true }),
            qmp: true,
            incoming: false,
        };
        let mut fds = vec![(OwnedFd::from(ram), RAM_FD)];
        let mut gateway = None;
        if spec.nic {
            let mut closed =
                Gateway::start(GatewayConfig::closed()).map_err(|source| VmError::Gateway {
                    name: spec.name.clone(),
                    source,
                })?;
            if let Some(fd) = closed.take_qemu_end() {
                fds.push((fd, qemu::NIC_FD));
            }
            gateway = Some(closed);
        }
        let (mut vm, qmp) = Self::boot_with(qemu, spec, &launch, fds, deadline, None).await?;
        vm.gateway = gateway;
        if let Some(stream) = qmp {
            let qmp = Qmp::handshake(stream, tokio::time::Instant::now() + QMP_DEADLINE)
                .await
                .map_err(|source| VmError::Qmp {
                    name: vm.name.clone(),
                    source,
                })?;
            vm.qmp = Some(qmp);
        }
        Ok(vm)
    }

    /// Starts the interpreter and imports the modules of `warmup`, and waits until it is warm
    /// (for a template, before its snapshot; for a warm-pool VM, before it is pooled). Returns
    /// the guest's warm-up time.
    pub(crate) async fn warm(&self, warmup: &Warmup, deadline: Duration) -> Result<u64, VmError> {
        let warmed = self
            .link()
            .acknowledged(
                &Request::Warm {
                    language: warmup.language,
                    modules: warmup.modules.clone(),
                },
                deadline,
                |event| matches!(event, Event::Warmed { .. }),
            )
            .await
            .map_err(|source| VmError::Warm {
                name: self.name.clone(),
                source,
            })?;
        Ok(match warmed {
            Event::Warmed { elapsed_ms } => elapsed_ms,
            _ => 0,
        })
    }

    /// Saves a template booted with [`Vm::boot_template`]: pauses the guest for good, writes
    /// its device state to `vmstate` (the RAM is already in the template's RAM file) and ends
    /// QEMU. The VM is consumed: a saved template is never resumed.
    pub(crate) async fn save_template(mut self, vmstate: &std::fs::File) -> Result<(), VmError> {
        let name = self.name.clone();
        let qmp_error = |source| VmError::Qmp {
            name: name.clone(),
            source,
        };
        let Some(mut qmp) = self.qmp.take() else {
            return Err(VmError::NotATemplate { name });
        };
        let until = tokio::time::Instant::now() + QMP_DEADLINE;
        let capabilities =
            json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
        qmp.execute("migrate-set-capabilities", Some(capabilities), until)
            .await
            .map_err(qmp_error)?;
        qmp.execute("stop", None, until).await.map_err(qmp_error)?;
        // QEMU's own sandbox forbids `exec:` URIs (spawn=deny) and 7.2 has no `file:`: the
        // open file travels over the monitor socket and `fd:` names it.
        qmp.execute_with_fd(
            "getfd",
            Some(json!({"fdname": "vmstate"})),
            vmstate.as_fd(),
            until,
        )
        .await
        .map_err(qmp_error)?;
        qmp.execute("migrate", Some(json!({"uri": "fd:vmstate"})), until)
            .await
            .map_err(qmp_error)?;
        loop {
            let info = qmp
                .execute("query-migrate", None, until)
                .await
                .map_err(qmp_error)?;
            match info["status"].as_str() {
                Some("completed") => break,
                Some("failed" | "cancelled") => {
                    return Err(VmError::SaveState {
                        name,
                        qemu_error: info["error-desc"]
                            .as_str()
                            .unwrap_or("no reason given")
                            .to_string(),
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        // `quit` may close the socket before answering.
        let _ = qmp.execute("quit", None, until).await;
        if tokio::time::timeout(QMP_DEADLINE, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
        }
        Ok(())
    }

    /// Starts a clone of a template: its RAM file mapped copy-on-write (`share=off`, the file
    /// is never modified), its device state read from the saved vmstate, then the guest
    /// resumed and told it is a clone (fresh entropy, clock, interpreter generators) before it
    /// is handed out. `nic` is the NIC backend socket of a networked clone.
    pub(crate) async fn restore(
        qemu: &Qemu,
        spec: &VmSpec,
        saved: Saved,
        nic: Option<OwnedFd>,
        deadline: Duration,
    ) -> Result<Vm, VmError> {
        let started_at = Instant::now();
        let standby = Standby::start(qemu, spec, saved, nic, deadline).await?;
        let remaining = deadline.saturating_sub(started_at.elapsed());
        standby.resume_from(started_at, remaining).await
    }

    /// Read requests the guest has made of its disks since QEMU started (QMP
    /// `query-blockstats`); `None` for a VM without a monitor (booted cold) or when QEMU does
    /// not answer. Testing only.
    #[cfg(feature = "testing")]
    pub(crate) async fn disk_reads(&mut self) -> Option<u64> {
        let qmp = self.qmp.as_mut()?;
        let until = tokio::time::Instant::now() + QMP_DEADLINE;
        let devices = qmp.execute("query-blockstats", None, until).await.ok()?;
        devices
            .as_array()?
            .iter()
            .map(|device| device["stats"]["rd_operations"].as_u64())
            .sum()
    }

    /// Tells a restored guest it is a clone: host entropy for its CRNG, the current time, and
    /// fresh seeds for running interpreters. Also the first request after `cont`, so it pays
    /// the empty translation cache for the paths every request takes (the channel, the agent,
    /// the driver's command loop) rather than the user's code; Python's driver runs the reseed
    /// compiled in advance, so the user's code pays only for the compiling it needs
    /// (`docs/measurements.md`). A template runs one too before its snapshot
    /// (`snapshot::templates::build`), so its clones find the reseed's paths run.
    pub(crate) async fn reseed(&self, deadline: Duration) -> Result<(), VmError> {
        let mut entropy = vec![0u8; 64];
        let urandom = Path::new("/dev/urandom");
        std::fs::File::open(urandom)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut entropy))
            .map_err(|source| VmError::Prepare {
                path: urandom.to_path_buf(),
                source,
            })?;
        let unix_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.link()
            .acknowledged(
                &Request::Reseed {
                    entropy,
                    unix_time_ns,
                },
                deadline,
                |event| matches!(event, Event::Reseeded { .. }),
            )
            .await
            .map(drop)
            .map_err(|source| VmError::Reseed {
                name: self.name.clone(),
                source,
            })
    }
}

/// A clone's QEMU started ahead of its run: spawned in its jail and cgroup with the template's
/// files and `-incoming defer`, its device state loaded over QMP (`x-ignore-shared`, so no RAM
/// is read), the guest paused as its template was saved. Most of a clone's host-side start is
/// QEMU's own process start and initialisation before its monitor answers (~13 of ~17 ms on the
/// build machine, `docs/measurements.md`); a standby has paid it and the load, and
/// [`Standby::resume`] is left with `cont` and the reseed. Dropping it kills QEMU.
pub(crate) struct Standby {
    name: String,
    /// QEMU (killed on drop before its cgroup is removed), its channel and files.
    started: Started,
    qmp: Qmp,
    hello: AgentHello,
}

impl std::fmt::Debug for Standby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standby").field("name", &self.name).finish()
    }
}

impl Standby {
    /// Starts QEMU for a clone of `saved` shaped like `spec` and loads its device state, within
    /// `deadline`.
    pub(crate) async fn start(
        qemu: &Qemu,
        spec: &VmSpec,
        saved: Saved,
        nic: Option<OwnedFd>,
        deadline: Duration,
    ) -> Result<Standby, VmError> {
        let name = spec.name.clone();
        let launch = Launch {
            // The open file, not a path: nothing can swap it between check and use.
            ram_file: Some(RamFile { shared: false }),
            qmp: true,
            incoming: true,
        };
        let started_at = Instant::now();
        let until = tokio::time::Instant::now() + deadline;
        let mut started = start(
            qemu,
            spec,
            &launch,
            [
                (OwnedFd::from(saved.vmstate), INCOMING_FD),
                (OwnedFd::from(saved.ram), RAM_FD),
            ]
            .into_iter()
            .chain(nic.map(|fd| (fd, qemu::NIC_FD)))
            .collect(),
            None,
        )
        .await?;
        let Some(qmp) = started.qmp.take() else {
            unreachable!("a clone is always started with a QMP socket");
        };
        let ready = async {
            let mut qmp = Qmp::handshake(qmp, until).await.map_err(qmp_error(&name))?;
            // The template's RAM is the file itself: only device state is in the stream.
            let capabilities = json!({"capabilities": [
                {"capability": "x-ignore-shared", "state": true},
                {"capability": "events", "state": true},
            ]});
            qmp.execute("migrate-set-capabilities", Some(capabilities), until)
                .await
                .map_err(qmp_error(&name))?;
            qmp.execute(
                "migrate-incoming",
                Some(json!({"uri": format!("fd:{INCOMING_FD}")})),
                until,
            )
            .await
            .map_err(qmp_error(&name))?;
            let done = qmp
                .wait_event(
                    "MIGRATION",
                    |data| matches!(data["status"].as_str(), Some("completed" | "failed")),
                    until,
                )
                .await
                .map_err(qmp_error(&name))?;
            if done["status"] != "completed" {
                return Err(VmError::LoadState { name: name.clone() });
            }
            tracing::debug!(vm = %name, elapsed_ms = started_at.elapsed().as_millis() as u64, "device state loaded");
            Ok(qmp)
        };
        let qmp = watch_exit(&mut started.child, &started.log, &name, ready).await?;
        Ok(Standby {
            name,
            started,
            qmp,
            hello: saved.hello,
        })
    }

    /// The QEMU process's name for the VM.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Gives a standby started in the background the weight of a run, before it resumes: its
    /// reseed is part of a run, and the next standby starts alongside it. Best effort, as
    /// [`Vm::to_foreground`].
    pub(crate) fn to_foreground(&self) {
        super::to_foreground(self.started.cgroup.as_ref(), &self.name);
    }

    /// Resumes the guest and reseeds it, within `deadline`; its `vm_start` counts from now.
    pub(crate) async fn resume(self, deadline: Duration) -> Result<Vm, VmError> {
        self.resume_from(Instant::now(), deadline).await
    }

    /// [`Self::resume`], with `vm_start` counted from `started_at`.
    async fn resume_from(self, started_at: Instant, deadline: Duration) -> Result<Vm, VmError> {
        let Standby {
            name,
            mut started,
            mut qmp,
            hello,
        } = self;
        let until = tokio::time::Instant::now() + deadline;
        // The template was saved paused, so the clone stays paused until told.
        let resume = async {
            qmp.execute("cont", None, until)
                .await
                .map_err(qmp_error(&name))
        };
        watch_exit(&mut started.child, &started.log, &name, resume).await?;
        let vm_start = started_at.elapsed();
        let mut vm = started.into_vm(
            name,
            hello,
            Some(qmp),
            super::StartPhases {
                vm_start,
                guest_ready: Duration::ZERO,
            },
        );
        let remaining = deadline.saturating_sub(started_at.elapsed());
        vm.reseed(remaining).await?;
        vm.phases.guest_ready = started_at.elapsed().saturating_sub(vm_start);
        tracing::debug!(vm = %vm.name, elapsed_ms = started_at.elapsed().as_millis() as u64, "restored from a memory snapshot");
        Ok(vm)
    }

    /// Kills QEMU and waits until it is gone (its cgroup is removed with it).
    pub(crate) async fn destroy(mut self) {
        let _ = self.started.child.start_kill();
        if tokio::time::timeout(Duration::from_secs(5), self.started.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(vm = %self.name, "a standby QEMU did not exit 5 s after SIGKILL");
        }
    }
}

/// Maps a monitor failure of VM `name`.
fn qmp_error(name: &str) -> impl Fn(super::qmp::QmpError) -> VmError + '_ {
    move |source| VmError::Qmp {
        name: name.to_string(),
        source,
    }
}

/// Runs `work`, or fails with QEMU's exit (and its log's tail) if QEMU exits first.
async fn watch_exit<T>(
    child: &mut super::process::QemuProcess,
    log: &super::LogTail,
    name: &str,
    work: impl std::future::Future<Output = Result<T, VmError>>,
) -> Result<T, VmError> {
    tokio::select! {
        done = work => done,
        status = child.wait() => {
            settle_logs().await;
            Err(VmError::ExitedDuringBoot {
                name: name.to_string(),
                status: exit_text(status),
                log_tail: log.text(),
            })
        }
    }
}
