//! What the layers above need of a running VM, behind a seam: the warm pool, acquisition,
//! execution and sessions unit-test against [`FakeVm`](super::fake::FakeVm) (a scripted agent
//! on an in-memory stream, no QEMU), and run against [`Vm`] in production.

use std::future::Future;

use super::{Link, StartPhases, Vm, VmStats};
use crate::network::ExposedPort;
use crate::result::Isolation;

/// A running VM whose agent answers on a control channel.
pub(crate) trait VmHandle: Send + Sync + 'static {
    /// The VM's name (QEMU's `-name`).
    fn name(&self) -> &str;
    /// The control channel, with the name for errors.
    fn link(&self) -> Link<'_>;
    /// Ports forwarded into the VM, as bound.
    fn exposed_ports(&self) -> &[ExposedPort];
    /// What the VM's gateway refused since the last call.
    fn take_network_refusals(&self) -> Vec<String>;
    /// The host walls around the VM.
    fn isolation(&self) -> Isolation;
    /// Kills and reaps the VM, returning what the host measured.
    fn destroy(self) -> impl Future<Output = VmStats> + Send;
    /// Gives a VM started in the background (a pooled one) the CPU weight of a run.
    fn to_foreground(&self);
    /// How long it took to start (a fake VM starts at once).
    fn start_phases(&self) -> StartPhases {
        StartPhases::default()
    }
}

impl VmHandle for Vm {
    fn name(&self) -> &str {
        Vm::name(self)
    }

    fn link(&self) -> Link<'_> {
        Vm::link(self)
    }

    fn exposed_ports(&self) -> &[ExposedPort] {
        Vm::exposed_ports(self)
    }

    fn take_network_refusals(&self) -> Vec<String> {
        Vm::take_network_refusals(self)
    }

    fn isolation(&self) -> Isolation {
        Vm::isolation(self)
    }

    fn destroy(self) -> impl Future<Output = VmStats> + Send {
        Vm::destroy(self)
    }

    fn to_foreground(&self) {
        Vm::to_foreground(self)
    }

    fn start_phases(&self) -> StartPhases {
        Vm::start_phases(self)
    }
}
