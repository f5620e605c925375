//! Integration tests of the library. Tests in `vm_*` modules boot real microVMs (under TCG on
//! hosts without usable KVM); they build or verify the guest images on first use.

mod assets;
mod attack_cpu;
mod attack_devices;
mod attack_env;
mod attack_exhaustion;
mod attack_fs_writes;
mod attack_gateway;
mod attack_privileges;
mod attack_procfs;
mod attack_random;
mod attack_signals;
mod attack_syscalls;
mod cache_trust;
mod support;
mod vm_admission;
mod vm_cgroup;
mod vm_exec;
mod vm_files;
mod vm_jail;
mod vm_limits;
mod vm_memory;
mod vm_network;
mod vm_package_index;
mod vm_package_registry;
mod vm_packages;
mod vm_pool;
mod vm_session;
mod vm_snapshot;
