//! The jailer: every QEMU starts unprivileged, in fresh namespaces, with a minimal mount view.
//!
//! [`Jail::plan`] decides on the host, before anything is forked, everything the child will do
//! (who QEMU runs as, which namespaces, the mount operations with their paths as C strings,
//! where each descriptor goes); [`run_child`] then carries it out between `clone` and `exec`,
//! where only raw system calls on that prepared memory are allowed (no allocation, no lock,
//! nothing that could panic). In the child, in this order:
//!
//! 0. every descriptor it does not use closed: a copy of the parent holds all of the
//!    parent's (other VMs' pipes, cache locks) until it closes them;
//! 1. `PR_SET_PDEATHSIG(SIGKILL)`, then a check that the parent is still the spawning process
//!    (read from the host's `/proc/self/stat`: `getppid()` says 0 in a new PID namespace);
//! 2. join the cgroups given (`"0\n"` into each `cgroup.procs`/`tasks` descriptor);
//! 3. unprivileged library only: map the caller to itself in the new user namespace;
//! 4. the mount view: everything private, a small tmpfs as the new root holding read-only
//!    binds of `/usr` (and `/lib*`, `/etc/ld.so.cache` where they are real), `/dev/null`,
//!    `/dev/urandom`, `/dev/kvm` under KVM, a fresh `/proc`; `pivot_root` into it, the old root
//!    detached, the new root read-only; then the host name `sbx`;
//! 5. stdio and the inherited descriptors moved to their numbers, every other one close-on-exec;
//! 6. the capability bounding set emptied, the ambient set cleared;
//! 7. library running as root: `setgroups([])`, `setresgid`, `setresuid` to the QEMU user
//!    (leaving uid 0 clears the permitted and effective sets);
//! 8. `PR_SET_NO_NEW_PRIVS`, transparent huge pages off (`PR_SET_THP_DISABLE`), the
//!    parent-death signal again (a credential change clears it) and
//!    the parent check again; then `execve` with an empty environment.
//!
//! A failure in the child is written to a close-on-exec pipe as (step, index, errno) and the
//! child exits; the host turns it into a [`JailError`] naming the step. Where the kernel does
//! not allow namespaces (a container without `CAP_SYS_ADMIN`, user namespaces switched off),
//! the jail falls back to no namespaces for the rest of the process and says why in every
//! [`IsolationReport`]; it never falls back to running QEMU as root.

use std::ffi::{CStr, CString};
use std::fs;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use crate::sys::CStrings;

/// The user QEMU runs as when the library runs as root and the operator named none.
pub(crate) const DEFAULT_QEMU_USER: &str = "sbx-qemu";

/// The host name inside the jail's UTS namespace.
const HOSTNAME: &[u8] = b"sbx";

/// Size of the jail's root tmpfs: it holds only directories, empty files and symlinks.
const ROOT_TMPFS_OPTIONS: &CStr = c"size=64k,nr_inodes=64,mode=0755";

/// Top-level entries QEMU's binary and libraries may live behind: bound read-only when they are
/// real directories, recreated when they are symbolic links (merged `/usr`).
const ROOT_ENTRIES: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// The namespaces every QEMU gets, by name and `clone` flag.
const NAMESPACES: [(&str, i32); 5] = [
    ("mount", libc::CLONE_NEWNS),
    ("pid", libc::CLONE_NEWPID),
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("net", libc::CLONE_NEWNET),
];

/// What was built around one QEMU process, for the run's result.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct IsolationReport {
    /// QEMU runs as a non-root user, with no capabilities and no-new-privs.
    pub unprivileged: bool,
    /// The namespaces QEMU got fresh: `mount`, `pid`, `ipc`, `uts`, `net`, and `user` when the
    /// library itself runs unprivileged.
    pub namespaces: Vec<&'static str>,
    /// What could not be built, and why.
    pub reason: Option<String>,
}

/// Failure to put QEMU in its jail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JailError {
    /// The QEMU user could not be looked up.
    #[error("cannot look up the QEMU user {user}")]
    Lookup {
        /// The user's name.
        user: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The operator named a QEMU user that does not exist.
    #[error("the QEMU user {user} does not exist")]
    NoSuchUser {
        /// The user's name.
        user: String,
    },
    /// The default QEMU user could not be created.
    #[error("cannot create the QEMU user {user}: {detail}")]
    CreateUser {
        /// The user's name.
        user: String,
        /// What `useradd` said.
        detail: String,
    },
    /// The QEMU user is root (uid or primary gid 0).
    #[error("the QEMU user {user} is root (uid {uid}, gid {gid})")]
    RootUser {
        /// The user's name.
        user: String,
        /// Its uid.
        uid: u32,
        /// Its primary gid.
        gid: u32,
    },
    /// A host-side preparation failed (a file to look at, a pipe, the clone itself).
    #[error("cannot {action}")]
    Host {
        /// What we were doing.
        action: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A step in the child failed, before QEMU started.
    #[error("jail: cannot {step}")]
    Child {
        /// The step, in words.
        step: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl JailError {
    /// What the operator can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            JailError::NoSuchUser { .. }
            | JailError::CreateUser { .. }
            | JailError::RootUser { .. } => Some(format!(
                "set {} to an existing unprivileged user QEMU may run as, or let the library create {DEFAULT_QEMU_USER} (needs `useradd`)",
                crate::env::EnvVars::QEMU_USER
            )),
            _ => None,
        }
    }
}

/// A user and its primary group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    /// The uid.
    pub(crate) uid: u32,
    /// The primary gid.
    pub(crate) gid: u32,
}

/// Who QEMU runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credentials {
    /// The library runs as root: the child switches to this user before `exec`.
    Switch(Identity),
    /// The library runs unprivileged: QEMU runs as the caller (mapped to itself in a user
    /// namespace where namespaces are possible).
    Caller(Identity),
}

impl Credentials {
    /// The user that must be able to open QEMU's files through `/proc/self/fd`.
    pub(crate) fn identity(self) -> Identity {
        match self {
            Credentials::Switch(id) | Credentials::Caller(id) => id,
        }
    }
}

/// The jail of one scheduler's QEMU processes: who they run as, and whether this host allows
/// namespaces (learnt on the first spawn).
#[derive(Debug)]
pub(crate) struct Jail {
    /// The QEMU user's name (root library only).
    user: String,
    /// Whether the operator named it (then a missing user is an error, not created).
    named: bool,
    /// Resolved on first use.
    credentials: Mutex<Option<Credentials>>,
    /// Why namespaces are not possible here, once a spawn found out.
    no_namespaces: Mutex<Option<String>>,
}

impl Jail {
    /// A jail whose QEMU runs as `user` when the library is root (default
    /// [`DEFAULT_QEMU_USER`], created when missing).
    pub(crate) fn new(user: Option<String>) -> Self {
        Self {
            named: user.is_some(),
            user: user.unwrap_or_else(|| DEFAULT_QEMU_USER.to_owned()),
            credentials: Mutex::new(None),
            no_namespaces: Mutex::new(None),
        }
    }

    /// Who QEMU runs as; looks the QEMU user up (and creates the default one) on first use.
    /// Blocking.
    pub(crate) fn credentials(&self) -> Result<Credentials, JailError> {
        let mut cached = self
            .credentials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(credentials) = *cached {
            return Ok(credentials);
        }
        let euid = rustix::process::geteuid();
        let credentials = if euid.is_root() {
            Credentials::Switch(self.resolve_user()?)
        } else {
            Credentials::Caller(Identity {
                uid: euid.as_raw(),
                gid: rustix::process::getegid().as_raw(),
            })
        };
        *cached = Some(credentials);
        Ok(credentials)
    }

    fn resolve_user(&self) -> Result<Identity, JailError> {
        let lookup = |user: &str| {
            nix::unistd::User::from_name(user).map_err(|e| JailError::Lookup {
                user: user.to_owned(),
                source: e.into(),
            })
        };
        let found = match lookup(&self.user)? {
            Some(found) => found,
            None if self.named => {
                return Err(JailError::NoSuchUser {
                    user: self.user.clone(),
                });
            }
            None => {
                create_system_user(&self.user)?;
                lookup(&self.user)?.ok_or_else(|| JailError::CreateUser {
                    user: self.user.clone(),
                    detail: "useradd succeeded but the user is not there".into(),
                })?
            }
        };
        let identity = Identity {
            uid: found.uid.as_raw(),
            gid: found.gid.as_raw(),
        };
        if identity.uid == 0 || identity.gid == 0 {
            return Err(JailError::RootUser {
                user: self.user.clone(),
                uid: identity.uid,
                gid: identity.gid,
            });
        }
        Ok(identity)
    }

    /// Why namespaces are not used, if a spawn found them impossible here.
    pub(crate) fn namespaces_unavailable(&self) -> Option<String> {
        self.no_namespaces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Remembers that namespaces are not possible here (logged once).
    pub(crate) fn give_up_namespaces(&self, reason: String) {
        let mut slot = self
            .no_namespaces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            tracing::warn!(%reason, "QEMU runs without namespaces on this host");
            *slot = Some(reason);
        }
    }
}

/// Creates a system user (and its group) with no home and no login shell.
fn create_system_user(user: &str) -> Result<(), JailError> {
    let useradd = ["/usr/sbin/useradd", "/sbin/useradd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("useradd");
    let output = std::process::Command::new(useradd)
        .args([
            "--system",
            "--no-create-home",
            "--user-group",
            "--shell",
            "/usr/sbin/nologin",
            user,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| JailError::CreateUser {
            user: user.to_owned(),
            detail: format!("cannot run {useradd}: {e}"),
        })?;
    // Exit 9: another process created it meanwhile.
    if output.status.success() || output.status.code() == Some(9) {
        tracing::info!(user, "created the QEMU user");
        return Ok(());
    }
    Err(JailError::CreateUser {
        user: user.to_owned(),
        detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// What a path on the host is, for the mount plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    /// A directory, with the mount flags the kernel will not let a bind of it drop.
    Dir(Locked),
    /// A regular file.
    File(Locked),
    /// A character device and its device number.
    CharDevice(Locked, u64),
    /// A symbolic link and its target.
    Symlink(PathBuf),
}

/// Flags of the mount a path is on that a read-only bind of it must keep (a user namespace may
/// not clear them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Locked {
    pub(crate) nodev: bool,
    pub(crate) noexec: bool,
}

/// Looks at `path` on the host (without following a final symbolic link).
pub(crate) fn probe(path: &Path) -> Option<Entry> {
    let meta = fs::symlink_metadata(path).ok()?;
    let kind = meta.file_type();
    if kind.is_symlink() {
        return fs::read_link(path).ok().map(Entry::Symlink);
    }
    let flags = rustix::fs::statvfs(path).ok()?.f_flag;
    let locked = Locked {
        nodev: flags.contains(rustix::fs::StatVfsMountFlags::NODEV),
        noexec: flags.contains(rustix::fs::StatVfsMountFlags::NOEXEC),
    };
    if kind.is_dir() {
        Some(Entry::Dir(locked))
    } else if kind.is_file() {
        Some(Entry::File(locked))
    } else if kind.is_char_device() {
        Some(Entry::CharDevice(locked, meta.rdev()))
    } else {
        None
    }
}

/// One mount-view operation in the child. Paths are absolute on the host until the pivot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// Every mount private: nothing done here reaches the host.
    Private,
    /// The new root: a small tmpfs on `target`.
    Tmpfs { target: CString, flags: MountFlags },
    /// An empty directory.
    Dir { path: CString },
    /// An empty file, to bind a file or device onto.
    File { path: CString },
    /// A symbolic link.
    Symlink { link: CString, target: CString },
    /// `source` bound on `target`, then remounted (`MS_REMOUNT`) with `flags`.
    Bind {
        source: CString,
        target: CString,
        flags: MountFlags,
    },
    /// A character device node owned by QEMU's user (root library: `/dev/kvm` may be 0600).
    Device {
        path: CString,
        dev: u64,
        owner: Identity,
    },
    /// A fresh `/proc` for the new PID namespace (only QEMU's own process in it).
    Proc { target: CString },
    /// `pivot_root` into `root`, the old root detached.
    Pivot { root: CString },
    /// The new root remounted (`MS_REMOUNT`) read-only with `flags`.
    ReadOnlyRoot { flags: MountFlags },
}

impl Op {
    /// The operation in words, for errors and tests.
    pub(crate) fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Op::Private => "make every mount private".into(),
            Op::Tmpfs { target, .. } => format!("mount the jail's root tmpfs on {}", s(target)),
            Op::Dir { path } => format!("create directory {}", s(path)),
            Op::File { path } => format!("create file {}", s(path)),
            Op::Symlink { link, target } => format!("link {} to {}", s(link), s(target)),
            Op::Bind { source, target, .. } => {
                format!("bind {} read-only on {}", s(source), s(target))
            }
            Op::Device { path, .. } => format!("create device {}", s(path)),
            Op::Proc { target } => format!("mount proc on {}", s(target)),
            Op::Pivot { root } => format!("pivot_root into {}", s(root)),
            Op::ReadOnlyRoot { .. } => "remount the jail's root read-only".into(),
        }
    }
}

/// What the mount view is built from.
#[derive(Debug, Clone)]
pub(crate) struct ViewRequest<'a> {
    /// An empty directory of the host to mount the new root on.
    pub(crate) root: &'a Path,
    /// The QEMU binary (absolute, resolved).
    pub(crate) qemu: &'a Path,
    /// Give QEMU `/dev/kvm`.
    pub(crate) kvm: bool,
    /// Who QEMU runs as.
    pub(crate) credentials: Credentials,
}

/// The mount operations that build QEMU's view: only what QEMU itself opens by path. Pure:
/// `probe` answers what each host path is.
pub(crate) fn mount_plan(
    request: &ViewRequest<'_>,
    probe: impl Fn(&Path) -> Option<Entry>,
) -> Result<Vec<Op>, JailError> {
    let root = request.root;
    let inside = |path: &Path| cstring(&root.join(path.strip_prefix("/").unwrap_or(path)));
    let mut ops = vec![
        Op::Private,
        Op::Tmpfs {
            target: cstring(root)?,
            // A device node of our own needs a tmpfs without `nodev`.
            flags: MountFlags::NOSUID
                | if matches!(request.credentials, Credentials::Switch(_)) && request.kvm {
                    MountFlags::empty()
                } else {
                    MountFlags::NODEV
                },
        },
    ];
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut mkdir_all = |ops: &mut Vec<Op>, path: &Path| -> Result<(), JailError> {
        for ancestor in path.ancestors().collect::<Vec<_>>().into_iter().rev() {
            if ancestor == Path::new("/") || dirs.iter().any(|d| d == ancestor) {
                continue;
            }
            ops.push(Op::Dir {
                path: inside(ancestor)?,
            });
            dirs.push(ancestor.to_path_buf());
        }
        Ok(())
    };
    let bind = |ops: &mut Vec<Op>, path: &Path, locked: Locked, device: bool| {
        let mut flags = MountFlags::BIND | MountFlags::RDONLY;
        flags |= MountFlags::NOSUID;
        if !device || locked.nodev {
            flags |= MountFlags::NODEV;
        }
        if device || locked.noexec {
            flags |= MountFlags::NOEXEC;
        }
        ops.push(Op::Bind {
            source: cstring(path)?,
            target: inside(path)?,
            flags,
        });
        Ok::<(), JailError>(())
    };
    let usr = Path::new("/usr");
    match probe(usr) {
        Some(Entry::Dir(locked)) => {
            mkdir_all(&mut ops, usr)?;
            bind(&mut ops, usr, locked, false)?;
        }
        _ => return Err(missing(usr)),
    }
    for name in ROOT_ENTRIES {
        let path = Path::new("/").join(name);
        match probe(&path) {
            Some(Entry::Dir(locked)) => {
                mkdir_all(&mut ops, &path)?;
                bind(&mut ops, &path, locked, false)?;
            }
            Some(Entry::Symlink(target)) => ops.push(Op::Symlink {
                link: inside(&path)?,
                target: cstring(&target)?,
            }),
            _ => {}
        }
    }
    let ld_cache = Path::new("/etc/ld.so.cache");
    if let Some(Entry::File(locked)) = probe(ld_cache) {
        mkdir_all(&mut ops, Path::new("/etc"))?;
        ops.push(Op::File {
            path: inside(ld_cache)?,
        });
        bind(&mut ops, ld_cache, locked, false)?;
    }
    // A QEMU installed elsewhere than the bound directories: its installation prefix too.
    let covered = |p: &Path| {
        p.starts_with(usr)
            || ROOT_ENTRIES
                .iter()
                .any(|e| p.starts_with(Path::new("/").join(e)))
    };
    if !covered(request.qemu) {
        let dir = request.qemu.parent().unwrap_or(Path::new("/"));
        let prefix = match dir.file_name() {
            Some(name) if name == "bin" && dir.parent() != Some(Path::new("/")) => {
                dir.parent().unwrap_or(dir)
            }
            _ => dir,
        };
        if prefix == Path::new("/") {
            return Err(missing(request.qemu));
        }
        match probe(prefix) {
            Some(Entry::Dir(locked)) => {
                mkdir_all(&mut ops, prefix)?;
                bind(&mut ops, prefix, locked, false)?;
            }
            _ => return Err(missing(prefix)),
        }
    }
    mkdir_all(&mut ops, Path::new("/dev"))?;
    let mut devices = vec!["/dev/null", "/dev/urandom"];
    if request.kvm {
        devices.push("/dev/kvm");
    }
    for device in devices {
        let path = Path::new(device);
        let Some(Entry::CharDevice(locked, dev)) = probe(path) else {
            return Err(missing(path));
        };
        match request.credentials {
            // Root may make the node itself, owned by QEMU's user (the host's /dev/kvm is
            // often 0660 root:kvm or even 0600).
            Credentials::Switch(owner) if device == "/dev/kvm" => ops.push(Op::Device {
                path: inside(path)?,
                dev,
                owner,
            }),
            _ => {
                ops.push(Op::File {
                    path: inside(path)?,
                });
                bind(&mut ops, path, locked, true)?;
            }
        }
    }
    let proc = Path::new("/proc");
    mkdir_all(&mut ops, proc)?;
    ops.push(Op::Proc {
        target: inside(proc)?,
    });
    ops.push(Op::Pivot {
        root: cstring(root)?,
    });
    let mut flags = MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID;
    if !ops.iter().any(|op| matches!(op, Op::Device { .. })) {
        flags |= MountFlags::NODEV;
    }
    ops.push(Op::ReadOnlyRoot { flags });
    Ok(ops)
}

fn missing(path: &Path) -> JailError {
    JailError::Host {
        action: format!("give QEMU {}", path.display()),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    }
}

fn cstring(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Host {
        action: format!("use the path {}", path.display()),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

/// Where each descriptor goes in the child: `(source, target)` pairs with stdio first.
/// Targets must be distinct; sources are copied above every target before any is placed.
/// Returns the lowest number above every target (where the child's own descriptors go).
pub(crate) fn fd_floor(moves: &[(RawFd, RawFd)]) -> RawFd {
    moves
        .iter()
        .map(|&(_, target)| target)
        .max()
        .unwrap_or(2)
        .max(2)
        + 1
}

/// The steps of the child, as reported through the pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Step {
    ParentDeathSignal = 1,
    ParentGone = 2,
    Cgroup = 3,
    UserMap = 4,
    Mount = 5,
    Hostname = 6,
    Fds = 7,
    Capabilities = 8,
    Credentials = 9,
    NoNewPrivs = 10,
    Exec = 11,
}

impl Step {
    fn from_raw(raw: u32) -> Option<Step> {
        use Step::*;
        [
            ParentDeathSignal,
            ParentGone,
            Cgroup,
            UserMap,
            Mount,
            Hostname,
            Fds,
            Capabilities,
            Credentials,
            NoNewPrivs,
            Exec,
        ]
        .into_iter()
        .find(|s| *s as u32 == raw)
    }

    /// Whether a failure at this step means this host allows no namespaces (then the jail
    /// goes on without them).
    pub(crate) fn is_namespace_setup(self) -> bool {
        matches!(self, Step::UserMap | Step::Mount | Step::Hostname)
    }
}

/// Everything the child needs, prepared on the host: the child only reads it.
pub(crate) struct ChildPlan<'a> {
    /// `clone` flags of the namespaces (0 without).
    pub(crate) namespaces: i32,
    /// The host pid of the spawning process.
    pub(crate) parent: u32,
    /// `cgroup.procs`/`tasks` descriptors to join.
    pub(crate) cgroups: Vec<BorrowedFd<'a>>,
    /// Lines for `/proc/self/{uid_map,gid_map}` in a new user namespace.
    pub(crate) user_map: Option<(Vec<u8>, Vec<u8>)>,
    /// The mount view (empty without a mount namespace).
    pub(crate) ops: Vec<Op>,
    /// `(source, target)` descriptor moves, stdio included.
    pub(crate) moves: Vec<(RawFd, RawFd)>,
    /// Every descriptor the child uses (ascending): the others are closed first.
    pub(crate) keep: Vec<RawFd>,
    /// Above every target.
    pub(crate) floor: RawFd,
    /// The user to switch to (root library).
    pub(crate) switch_to: Option<Identity>,
    /// Highest capability number of this kernel.
    pub(crate) last_cap: u32,
    /// The child's end of the report pipe (close-on-exec, at or above `floor`).
    pub(crate) report: OwnedFd,
    /// The program, its argument vector and environment.
    pub(crate) program: CString,
    pub(crate) argv: CStrings,
    pub(crate) envp: CStrings,
}

/// The record a failed child writes: step, index (the mount operation), errno.
pub(crate) const REPORT_BYTES: usize = 12;

/// Decodes a child's failure record into an error naming the step.
pub(crate) fn child_error(
    record: &[u8; REPORT_BYTES],
    ops: &[Op],
    program: &CStr,
) -> (Option<Step>, JailError) {
    let word = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&record[i * 4..i * 4 + 4]);
        u32::from_le_bytes(b)
    };
    let step = Step::from_raw(word(0));
    let index = word(1) as usize;
    let errno = word(2) as i32;
    let text = match step {
        Some(Step::ParentDeathSignal) => "set the parent-death signal".to_owned(),
        Some(Step::ParentGone) => "start: the host process is exiting".to_owned(),
        Some(Step::Cgroup) => format!("join cgroup #{index}"),
        Some(Step::UserMap) => "map the caller in the user namespace".to_owned(),
        Some(Step::Mount) => ops
            .get(index)
            .map_or_else(|| "build the mount view".to_owned(), Op::describe),
        Some(Step::Hostname) => "set the host name".to_owned(),
        Some(Step::Fds) => "place the inherited descriptors".to_owned(),
        Some(Step::Capabilities) => "drop capabilities".to_owned(),
        Some(Step::Credentials) => "switch to the QEMU user".to_owned(),
        Some(Step::NoNewPrivs) => "set no-new-privs".to_owned(),
        Some(Step::Exec) => format!("execute {}", program.to_string_lossy()),
        None => "start".to_owned(),
    };
    (
        step,
        JailError::Child {
            step: text,
            source: std::io::Error::from_raw_os_error(errno),
        },
    )
}

/// A failed step in the child.
struct Failure {
    step: Step,
    index: u32,
    errno: i32,
}

/// An error number, from either kind of error the child's calls return.
trait Errno {
    fn errno(&self) -> i32;
}

impl Errno for rustix::io::Errno {
    fn errno(&self) -> i32 {
        self.raw_os_error()
    }
}

impl Errno for std::io::Error {
    fn errno(&self) -> i32 {
        self.raw_os_error().unwrap_or(libc::EINVAL)
    }
}

trait At<T> {
    fn at(self, step: Step) -> Result<T, Failure>;
    fn at_index(self, step: Step, index: usize) -> Result<T, Failure>;
}

impl<T, E: Errno> At<T> for Result<T, E> {
    fn at(self, step: Step) -> Result<T, Failure> {
        self.at_index(step, 0)
    }
    fn at_index(self, step: Step, index: usize) -> Result<T, Failure> {
        self.map_err(|e| Failure {
            step,
            index: index as u32,
            errno: e.errno(),
        })
    }
}

/// The child's whole life between `clone` and `exec`. Returns only on failure, after writing
/// the record to the report pipe; the caller then exits.
///
/// Only raw system calls on memory prepared before the clone: no allocation, no lock, no
/// panic (the process is a copy of a multithreaded one).
pub(crate) fn run_child(plan: &ChildPlan<'_>) -> i32 {
    let Err(failure) = jail_and_exec(plan);
    let mut record = [0u8; REPORT_BYTES];
    record[..4].copy_from_slice(&(failure.step as u32).to_le_bytes());
    record[4..8].copy_from_slice(&failure.index.to_le_bytes());
    record[8..].copy_from_slice(&failure.errno.to_le_bytes());
    let _ = rustix::io::write(&plan.report, &record);
    127
}

fn jail_and_exec(plan: &ChildPlan<'_>) -> Result<std::convert::Infallible, Failure> {
    use rustix::process::Signal;
    // First, before anything that takes time: this copy holds all the parent's descriptors.
    crate::sys::close_all_but(&plan.keep).at(Step::Fds)?;
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
        .at(Step::ParentDeathSignal)?;
    // Our own stat file as the host sees it, kept open: after the pivot the only /proc is the
    // new PID namespace's, where the parent has no pid.
    let stat = rustix::fs::open(
        c"/proc/self/stat",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .at(Step::ParentGone)?;
    let stat = rustix::io::fcntl_dupfd_cloexec(&stat, plan.floor).at(Step::ParentGone)?;
    check_parent(&stat, plan.parent)?;
    for (i, cgroup) in plan.cgroups.iter().enumerate() {
        rustix::io::write(cgroup, b"0\n").at_index(Step::Cgroup, i)?;
    }
    if let Some((uid_map, gid_map)) = &plan.user_map {
        write_proc(c"/proc/self/setgroups", b"deny")?;
        write_proc(c"/proc/self/uid_map", uid_map)?;
        write_proc(c"/proc/self/gid_map", gid_map)?;
    }
    for (i, op) in plan.ops.iter().enumerate() {
        apply(op).at_index(Step::Mount, i)?;
    }
    if plan.namespaces & libc::CLONE_NEWUTS != 0 {
        rustix::system::sethostname(HOSTNAME).at(Step::Hostname)?;
    }
    crate::sys::place_fds(&plan.moves, plan.floor).at(Step::Fds)?;
    for cap in 0..=plan.last_cap.min(63) {
        let cap = rustix::thread::CapabilitySet::from_bits_retain(1 << cap);
        match rustix::thread::remove_capability_from_bounding_set(cap) {
            // Numbers this kernel does not know.
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(e).at(Step::Capabilities),
        }
    }
    rustix::thread::clear_ambient_capability_set().at(Step::Capabilities)?;
    if let Some(to) = plan.switch_to {
        let gid = rustix::process::Gid::from_raw_unchecked(to.gid);
        let uid = rustix::process::Uid::from_raw_unchecked(to.uid);
        // Raw per-thread calls: the child has one thread (libc's setxid broadcast would
        // look for the parent's other threads).
        rustix::thread::set_thread_groups(&[]).at(Step::Credentials)?;
        rustix::thread::set_thread_res_gid(gid, gid, gid).at(Step::Credentials)?;
        rustix::thread::set_thread_res_uid(uid, uid, uid).at(Step::Credentials)?;
    }
    rustix::thread::set_no_new_privs(true).at(Step::NoNewPrivs)?;
    // No transparent huge pages for QEMU (kept across `execve`): its translation cache and
    // guest RAM would otherwise be backed 2 MiB at a time, an idle clone's few MiB of translated
    // code costing 14 MiB of host memory (`docs/measurements.md`). Best effort: a kernel
    // without the flag only costs memory.
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    // A credential change cleared the parent-death signal: set it again, and make sure the
    // parent did not die before it was set.
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
        .at(Step::ParentDeathSignal)?;
    check_parent(&stat, plan.parent)?;
    let error = crate::sys::exec(&plan.program, &plan.argv, &plan.envp);
    Err(Failure {
        step: Step::Exec,
        index: 0,
        errno: error.raw_os_error().unwrap_or(libc::EINVAL),
    })
}

/// Fails unless the parent (field 4 of our host-side stat) is still `parent`.
fn check_parent(stat: &OwnedFd, parent: u32) -> Result<(), Failure> {
    let mut buf = [0u8; 1024];
    let n = rustix::io::pread(stat, &mut buf, 0).at(Step::ParentGone)?;
    let text = buf.get(..n).unwrap_or(&[]);
    // "pid (comm) S ppid ...": the command may contain anything, so from the last ')'.
    let after = text
        .iter()
        .rposition(|b| *b == b')')
        .and_then(|i| text.get(i + 4..))
        .unwrap_or(&[]);
    let mut ppid: u32 = 0;
    for &b in after.iter().take_while(|b| b.is_ascii_digit()) {
        ppid = ppid.wrapping_mul(10).wrapping_add(u32::from(b - b'0'));
    }
    if ppid != parent {
        return Err(Failure {
            step: Step::ParentGone,
            index: 0,
            errno: libc::ESRCH,
        });
    }
    Ok(())
}

fn write_proc(path: &CStr, bytes: &[u8]) -> Result<(), Failure> {
    let fd = rustix::fs::open(path, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())
        .at(Step::UserMap)?;
    rustix::io::write(&fd, bytes).at(Step::UserMap)?;
    Ok(())
}

fn apply(op: &Op) -> rustix::io::Result<()> {
    use rustix::mount;
    match op {
        Op::Private => mount::mount_change(
            c"/",
            MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
        ),
        Op::Tmpfs { target, flags } => mount::mount(
            c"tmpfs",
            target.as_c_str(),
            c"tmpfs",
            *flags,
            ROOT_TMPFS_OPTIONS,
        ),
        Op::Dir { path } => rustix::fs::mkdir(path.as_c_str(), Mode::from_raw_mode(0o755)),
        Op::File { path } => rustix::fs::open(
            path.as_c_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map(drop),
        Op::Symlink { link, target } => rustix::fs::symlink(target.as_c_str(), link.as_c_str()),
        Op::Bind {
            source,
            target,
            flags,
        } => {
            mount::mount_bind(source.as_c_str(), target.as_c_str())?;
            mount::mount_remount(target.as_c_str(), *flags, c"")
        }
        Op::Device { path, dev, owner } => {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                path.as_c_str(),
                rustix::fs::FileType::CharacterDevice,
                Mode::from_raw_mode(0o600),
                *dev,
            )?;
            rustix::fs::chownat(
                rustix::fs::CWD,
                path.as_c_str(),
                Some(rustix::process::Uid::from_raw_unchecked(owner.uid)),
                Some(rustix::process::Gid::from_raw_unchecked(owner.gid)),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
        }
        Op::Proc { target } => {
            let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
            // Only process directories where the kernel has `subset=pid` (5.8).
            match mount::mount(c"proc", target.as_c_str(), c"proc", flags, c"subset=pid") {
                Err(rustix::io::Errno::INVAL) => {
                    mount::mount(c"proc", target.as_c_str(), c"proc", flags, None)
                }
                other => other,
            }
        }
        Op::Pivot { root } => {
            rustix::process::chdir(root.as_c_str())?;
            rustix::process::pivot_root(c".", c".")?;
            mount::unmount(c".", UnmountFlags::DETACH)?;
            rustix::process::chdir(c"/")
        }
        Op::ReadOnlyRoot { flags } => mount::mount_remount(c"/", *flags, c""),
    }
}

/// The highest capability number this kernel knows.
pub(crate) fn last_capability() -> u32 {
    fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// The namespaces of a spawn, and the report that goes with them.
pub(crate) fn namespaces_for(
    credentials: Credentials,
    unavailable: Option<&str>,
) -> (i32, Vec<&'static str>) {
    if unavailable.is_some() {
        return (0, Vec::new());
    }
    let mut flags = 0;
    let mut names = Vec::new();
    if matches!(credentials, Credentials::Caller(_)) {
        flags |= libc::CLONE_NEWUSER;
        names.push("user");
    }
    for (name, flag) in NAMESPACES {
        flags |= flag;
        names.push(name);
    }
    (flags, names)
}

/// The report of a spawn with `credentials` and `namespaces`.
pub(crate) fn report(
    credentials: Credentials,
    namespaces: Vec<&'static str>,
    reason: Option<String>,
) -> IsolationReport {
    IsolationReport {
        unprivileged: credentials.identity().uid != 0,
        namespaces,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const QEMU_USER: Identity = Identity { uid: 990, gid: 990 };

    /// A merged-/usr host like Debian 12's.
    fn debian() -> HashMap<PathBuf, Entry> {
        let dir = Entry::Dir(Locked::default());
        let dev = |n| Entry::CharDevice(Locked::default(), n);
        [
            ("/usr", dir.clone()),
            ("/bin", Entry::Symlink("usr/bin".into())),
            ("/sbin", Entry::Symlink("usr/sbin".into())),
            ("/lib", Entry::Symlink("usr/lib".into())),
            ("/lib64", Entry::Symlink("usr/lib64".into())),
            ("/etc/ld.so.cache", Entry::File(Locked::default())),
            ("/dev/null", dev(0x103)),
            ("/dev/urandom", dev(0x109)),
            ("/dev/kvm", dev(0xae8)),
            ("/opt/qemu", dir.clone()),
            ("/home", dir.clone()),
            ("/tmp", dir),
        ]
        .into_iter()
        .map(|(p, e)| (PathBuf::from(p), e))
        .collect()
    }

    fn plan(
        host: &HashMap<PathBuf, Entry>,
        qemu: &str,
        kvm: bool,
        credentials: Credentials,
    ) -> Vec<Op> {
        mount_plan(
            &ViewRequest {
                root: Path::new("/tmp/sbx-vm-1/root"),
                qemu: Path::new(qemu),
                kvm,
                credentials,
            },
            |p| host.get(p).cloned(),
        )
        .unwrap()
    }

    fn described(ops: &[Op]) -> Vec<String> {
        ops.iter().map(Op::describe).collect()
    }

    #[test]
    fn the_view_holds_only_what_qemu_opens() {
        let ops = plan(
            &debian(),
            "/usr/bin/qemu-system-x86_64",
            false,
            Credentials::Switch(QEMU_USER),
        );
        let text = described(&ops);
        let r = "/tmp/sbx-vm-1/root";
        assert_eq!(text[0], "make every mount private");
        assert_eq!(text[1], format!("mount the jail's root tmpfs on {r}"));
        for wanted in [
            format!("bind /usr read-only on {r}/usr"),
            format!("link {r}/lib to usr/lib"),
            format!("link {r}/lib64 to usr/lib64"),
            format!("link {r}/bin to usr/bin"),
            format!("bind /etc/ld.so.cache read-only on {r}/etc/ld.so.cache"),
            format!("bind /dev/null read-only on {r}/dev/null"),
            format!("bind /dev/urandom read-only on {r}/dev/urandom"),
            format!("mount proc on {r}/proc"),
        ] {
            assert!(text.contains(&wanted), "{wanted} missing from {text:#?}");
        }
        assert_eq!(text[text.len() - 2], format!("pivot_root into {r}"));
        assert_eq!(text[text.len() - 1], "remount the jail's root read-only");
        let proc = text
            .iter()
            .position(|t| t.starts_with("mount proc"))
            .unwrap();
        assert!(proc < text.len() - 2, "proc is mounted before the pivot");
        // Nothing of the host's home, temp, cache or devices beyond these.
        for absent in ["/home", "/tmp ", "/root", ".cache", "/dev/kvm", "/opt"] {
            assert!(
                !text
                    .iter()
                    .skip(2)
                    .any(|t| t.contains(&format!(" {absent}"))
                        || t.starts_with(&format!("bind {absent}"))),
                "{absent} in {text:#?}"
            );
        }
        let binds: Vec<&Op> = ops
            .iter()
            .filter(|op| matches!(op, Op::Bind { .. }))
            .collect();
        assert_eq!(binds.len(), 4, "{text:#?}");
    }

    #[test]
    fn binds_are_read_only_nosuid_and_only_devices_keep_dev() {
        let ops = plan(
            &debian(),
            "/usr/bin/qemu-system-x86_64",
            true,
            Credentials::Caller(QEMU_USER),
        );
        for op in &ops {
            if let Op::Bind { source, flags, .. } = op {
                assert!(flags.contains(MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID));
                let device = source.to_bytes().starts_with(b"/dev/");
                assert_eq!(flags.contains(MountFlags::NODEV), !device, "{source:?}");
                assert_eq!(flags.contains(MountFlags::NOEXEC), device, "{source:?}");
            }
        }
        let Some(Op::ReadOnlyRoot { flags }) = ops.last() else {
            panic!("the root is made read-only last");
        };
        assert!(flags.contains(MountFlags::RDONLY | MountFlags::NODEV));
    }

    #[test]
    fn kvm_is_a_node_of_the_qemu_user_for_root_and_a_bind_otherwise() {
        let r = "/tmp/sbx-vm-1/root";
        let as_root = plan(
            &debian(),
            "/usr/bin/qemu-system-x86_64",
            true,
            Credentials::Switch(QEMU_USER),
        );
        let node = as_root
            .iter()
            .find(|op| matches!(op, Op::Device { .. }))
            .expect("a device node");
        assert_eq!(
            node,
            &Op::Device {
                path: CString::new(format!("{r}/dev/kvm")).unwrap(),
                dev: 0xae8,
                owner: QEMU_USER,
            }
        );
        let Some(Op::Tmpfs { flags, .. }) = as_root.get(1) else {
            panic!("tmpfs second");
        };
        assert!(!flags.contains(MountFlags::NODEV), "the node must work");
        let unprivileged = plan(
            &debian(),
            "/usr/bin/qemu-system-x86_64",
            true,
            Credentials::Caller(QEMU_USER),
        );
        assert!(
            described(&unprivileged).contains(&format!("bind /dev/kvm read-only on {r}/dev/kvm"))
        );
        assert!(
            !unprivileged
                .iter()
                .any(|op| matches!(op, Op::Device { .. }))
        );
    }

    #[test]
    fn real_library_directories_and_a_qemu_elsewhere_are_bound() {
        let mut host = debian();
        host.insert(
            "/lib64".into(),
            Entry::Dir(Locked {
                nodev: true,
                noexec: false,
            }),
        );
        let ops = plan(
            &host,
            "/opt/qemu/bin/qemu-system-x86_64",
            false,
            Credentials::Switch(QEMU_USER),
        );
        let text = described(&ops);
        let r = "/tmp/sbx-vm-1/root";
        assert!(
            text.contains(&format!("bind /lib64 read-only on {r}/lib64")),
            "{text:#?}"
        );
        assert!(
            text.contains(&format!("create directory {r}/opt")),
            "{text:#?}"
        );
        assert!(
            text.contains(&format!("bind /opt/qemu read-only on {r}/opt/qemu")),
            "{text:#?}"
        );
        // A QEMU straight under / would bring the whole root: refused.
        let err = mount_plan(
            &ViewRequest {
                root: Path::new(r),
                qemu: Path::new("/qemu"),
                kvm: false,
                credentials: Credentials::Switch(QEMU_USER),
            },
            |p| host.get(p).cloned(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("give QEMU /qemu"), "{err}");
    }

    #[test]
    fn each_directory_is_created_once_before_use() {
        let ops = plan(
            &debian(),
            "/usr/bin/qemu-system-x86_64",
            true,
            Credentials::Caller(QEMU_USER),
        );
        let dirs: Vec<&CString> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Dir { path } => Some(path),
                _ => None,
            })
            .collect();
        let mut unique = dirs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), dirs.len(), "{dirs:?}");
        let position = |wanted: &str| {
            ops.iter()
                .position(|op| op.describe() == wanted)
                .unwrap_or_else(|| panic!("{wanted}"))
        };
        let r = "/tmp/sbx-vm-1/root";
        assert!(
            position(&format!("create directory {r}/dev"))
                < position(&format!("create file {r}/dev/null"))
        );
        assert!(
            position(&format!("create file {r}/dev/null"))
                < position(&format!("bind /dev/null read-only on {r}/dev/null"))
        );
    }

    #[test]
    fn a_named_user_must_exist_and_the_caller_runs_qemu_when_unprivileged() {
        let jail = Jail::new(Some("sbx-no-such-user-for-tests".into()));
        match jail.credentials() {
            // As root: a named user is looked up, never created, never replaced by root.
            Err(JailError::NoSuchUser { user }) => {
                assert!(rustix::process::geteuid().is_root());
                assert_eq!(user, "sbx-no-such-user-for-tests");
                assert!(jail.credentials().is_err(), "and not cached as a success");
            }
            // Unprivileged: QEMU runs as the caller, whatever user was named.
            Ok(Credentials::Caller(id)) => {
                assert_eq!(id.uid, rustix::process::geteuid().as_raw());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_qemu_user_setting_refuses_root_and_non_names() {
        let base = crate::SchedulerConfig::from_env().unwrap();
        for (user, wanted) in [
            ("root", "QEMU never runs as root"),
            ("-o", "is not a user name"),
            ("a b", "is not a user name"),
            ("", "is not a user name"),
        ] {
            let config = crate::SchedulerConfig {
                qemu_user: Some(user.into()),
                ..base.clone()
            };
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(wanted), "{user:?}: {err}");
        }
        let config = crate::SchedulerConfig {
            qemu_user: Some("qemu_runner-1".into()),
            ..base
        };
        config.validate().unwrap();
    }

    #[test]
    fn namespaces_and_report_follow_the_credentials() {
        let (flags, names) = namespaces_for(Credentials::Switch(QEMU_USER), None);
        assert_eq!(names, ["mount", "pid", "ipc", "uts", "net"]);
        assert_eq!(
            flags & libc::CLONE_NEWUSER,
            0,
            "root needs no user namespace"
        );
        let (flags, names) = namespaces_for(Credentials::Caller(QEMU_USER), None);
        assert_eq!(names, ["user", "mount", "pid", "ipc", "uts", "net"]);
        assert_ne!(flags & libc::CLONE_NEWUSER, 0);
        assert_eq!(
            namespaces_for(Credentials::Caller(QEMU_USER), Some("no")),
            (0, Vec::new())
        );
        let report = report(
            Credentials::Switch(QEMU_USER),
            Vec::new(),
            Some("why".into()),
        );
        assert!(report.unprivileged);
        assert_eq!(report.reason.as_deref(), Some("why"));
    }

    #[test]
    fn a_child_failure_names_its_step() {
        let ops = plan(
            &debian(),
            "/usr/bin/qemu-system-x86_64",
            false,
            Credentials::Switch(QEMU_USER),
        );
        let mut record = [0u8; REPORT_BYTES];
        record[..4].copy_from_slice(&(Step::Mount as u32).to_le_bytes());
        record[4..8].copy_from_slice(&1u32.to_le_bytes());
        record[8..].copy_from_slice(&libc::EPERM.to_le_bytes());
        let (step, error) = child_error(&record, &ops, c"/usr/bin/qemu");
        assert_eq!(step, Some(Step::Mount));
        assert!(step.unwrap().is_namespace_setup());
        assert_eq!(
            crate::vm::error_chain(&error),
            format!(
                "jail: cannot mount the jail's root tmpfs on /tmp/sbx-vm-1/root: {}",
                std::io::Error::from_raw_os_error(libc::EPERM)
            )
        );
        record[..4].copy_from_slice(&(Step::Exec as u32).to_le_bytes());
        record[8..].copy_from_slice(&libc::ENOENT.to_le_bytes());
        let (step, error) = child_error(&record, &ops, c"/usr/bin/qemu");
        assert!(!step.unwrap().is_namespace_setup());
        assert!(
            error.to_string().contains("execute /usr/bin/qemu"),
            "{error}"
        );
    }

    #[test]
    fn descriptors_go_above_every_target() {
        assert_eq!(fd_floor(&[(20, 0), (21, 1), (22, 2)]), 3);
        assert_eq!(fd_floor(&[(3, 0), (4, 11), (30, 7)]), 12);
        assert_eq!(fd_floor(&[]), 3);
    }
}
