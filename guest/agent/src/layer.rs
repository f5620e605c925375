//! The package layer ([`sbx_protocol::layer`]): a read-only EROFS disk of packages installed on
//! the host, which the interpreters must find.
//!
//! When the kernel command line says `sbx.packages=1`, the agent finds the disk by its serial
//! (`/sys/block/vd*/serial`, never by device name), mounts it read-only with `nosuid,nodev` at
//! `/opt/sbx/packages` (exec stays allowed: wheels hold `.so` extensions), and deletes its
//! device node. The mount point lives on a small tmpfs put over the image's empty `/opt` and
//! made read-only once the directories exist, so the images need no change. Then:
//!
//! - Python: the layer's `python/` is bind-mounted, read-only, over the image's empty
//!   site-packages directory `/usr/local/lib/python3.N/dist-packages` (`N` from the
//!   interpreter's own name), so *every* `python3`, the driver and any process the user's code
//!   starts, whatever its environment, finds the packages after the standard library and
//!   processes their `.pth` files, exactly as after a `pip install`. Console scripts
//!   (`python/bin`) go at the end of `PATH`, after the image's own directories.
//! - JavaScript: `NODE_PATH` names the layer's `node/node_modules`. Bun consults it after the
//!   `node_modules` directories above the importing file, for static and dynamic imports,
//!   `require` and `Bun.resolveSync`, so packages resolve from the driver, from files anywhere
//!   (`/tmp` included) and from `bun file.js` run by the user's code.
//!
//! A layer that is announced but missing or unusable is reported in the hello
//! ([`LayerStatus::Failed`]) and the host refuses the VM.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rustix::mount::MountFlags;
use sbx_protocol::layer::{
    DISK_SERIAL, LayerStatus, MOUNT_POINT, NODE_MODULES_DIR, PYTHON_BIN_DIR, PYTHON_DIR,
};

use crate::init::{chain, mkdir, mount};

/// The layer could not be mounted or wired to the interpreters.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// No block device carries the layer's serial.
    #[error("no disk with serial {DISK_SERIAL} in {}", dir.display())]
    NoDisk {
        /// Where the disks were looked for.
        dir: PathBuf,
    },
    /// A mount or a directory failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was attempted.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The layer holds Python packages and the image has no site directory for them.
    #[error("no site-packages directory for {} (expected {})", python.display(), expected.display())]
    NoPythonSite {
        /// The interpreter.
        python: PathBuf,
        /// The directory that should exist.
        expected: PathBuf,
    },
}

fn io_step(action: &'static str, path: &Path, result: io::Result<()>) -> Result<(), LayerError> {
    result.map_err(|source| LayerError::Io {
        action,
        path: path.to_path_buf(),
        source,
    })
}

/// What the interpreters need to find a mounted layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layer {
    /// Console scripts of the Python packages, appended to `PATH`.
    pub python_bin: Option<PathBuf>,
    /// The JavaScript packages, `NODE_PATH`.
    pub node_modules: Option<PathBuf>,
}

impl Layer {
    /// The layer whose root is `root` (mounted, or a plain directory in dev mode).
    pub fn inspect(root: &Path) -> Layer {
        let dir = |relative: &str| Some(root.join(relative)).filter(|p| p.is_dir());
        Layer {
            python_bin: dir(PYTHON_BIN_DIR),
            node_modules: dir(NODE_MODULES_DIR),
        }
    }

    /// `PATH` for interpreters: `base`, then the layer's console scripts (which never shadow
    /// the image's own programs).
    pub fn path(&self, base: &str) -> OsString {
        let mut path = OsString::from(base);
        if let Some(bin) = &self.python_bin {
            path.push(":");
            path.push(bin);
        }
        path
    }

    /// Variables the interpreters get beyond the base environment.
    pub fn env(&self) -> Vec<(OsString, OsString)> {
        self.node_modules
            .iter()
            .map(|dir| ("NODE_PATH".into(), dir.clone().into_os_string()))
            .collect()
    }
}

/// The layer as the agent knows it after booting.
#[derive(Debug, Clone, Default)]
pub enum LayerState {
    /// None was announced.
    #[default]
    Absent,
    /// Mounted and wired.
    Mounted(Layer),
    /// Announced and unusable: why.
    Failed(String),
}

impl LayerState {
    /// What the hello says.
    pub fn status(&self) -> LayerStatus {
        match self {
            LayerState::Absent => LayerStatus::Absent,
            LayerState::Mounted(_) => LayerStatus::Mounted,
            LayerState::Failed(reason) => LayerStatus::Failed(reason.clone()),
        }
    }

    /// The mounted layer, if any.
    pub fn layer(&self) -> Option<&Layer> {
        match self {
            LayerState::Mounted(layer) => Some(layer),
            _ => None,
        }
    }
}

/// The virtio disks under `sys_block` (`/sys/block`), by role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Disks {
    /// The root filesystem: the first `vd*` disk that is not the layer (`vda`).
    pub root: Option<String>,
    /// The package layer: the disk whose serial is [`DISK_SERIAL`].
    pub layer: Option<String>,
}

impl Disks {
    /// Looks at the `vd*` entries of `sys_block`. Disks are ordered as the kernel names them
    /// (`vda` < `vdz` < `vdaa`); a disk without a readable serial is never the layer.
    pub fn find(sys_block: &Path) -> Disks {
        let mut names: Vec<String> = fs::read_dir(sys_block)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| name.starts_with("vd"))
            .collect();
        names.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
        let mut disks = Disks::default();
        for name in names {
            let serial = fs::read_to_string(sys_block.join(&name).join("serial"));
            if serial.is_ok_and(|s| s.trim() == DISK_SERIAL) {
                disks.layer.get_or_insert(name);
            } else {
                disks.root.get_or_insert(name);
            }
        }
        disks
    }
}

/// The site-packages directory under `local_lib` (`/usr/local/lib`) for the interpreter
/// `python`, whose real name says its version (`/usr/bin/python3` → `python3.11`).
pub fn python_site(python: &Path, local_lib: &Path) -> Result<PathBuf, LayerError> {
    let real = fs::canonicalize(python).unwrap_or_else(|_| python.to_path_buf());
    let name = real
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| {
            n.strip_prefix("python3.")
                .is_some_and(|minor| !minor.is_empty() && minor.bytes().all(|b| b.is_ascii_digit()))
        })
        .unwrap_or("python3");
    let site = local_lib.join(name).join("dist-packages");
    if name != "python3" && site.is_dir() {
        Ok(site)
    } else {
        Err(LayerError::NoPythonSite {
            python: python.to_path_buf(),
            expected: site,
        })
    }
}

/// Size of the tmpfs holding the mount point: directories only.
const OPT_TMPFS_OPTIONS: &str = "mode=0755,size=64k,nr_inodes=16";

/// Mounts the layer disk `disks.layer` (VM mode, after switching root) and wires it to the
/// interpreters; the device node is deleted whatever happens.
pub fn mount_layer(disks: &Disks, python: &Path) -> LayerState {
    let result = match &disks.layer {
        None => Err(LayerError::NoDisk {
            dir: PathBuf::from("/sys/block"),
        }),
        Some(name) => {
            let device = Path::new("/dev").join(name);
            let result = mount_device(&device, python);
            // Mounted or not, the sandbox has no business with the device node.
            let _ = fs::remove_file(&device);
            result
        }
    };
    match result {
        Ok(layer) => LayerState::Mounted(layer),
        Err(e) => LayerState::Failed(chain(&e)),
    }
}

fn mount_device(device: &Path, python: &Path) -> Result<Layer, LayerError> {
    const RO_NOSUID_NODEV: MountFlags = MountFlags::RDONLY
        .union(MountFlags::NOSUID)
        .union(MountFlags::NODEV);
    let opt = Path::new("/opt");
    let mount_point = Path::new(MOUNT_POINT);
    io_step(
        "mount a tmpfs on",
        opt,
        mount(
            "tmpfs",
            opt,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            Some(OPT_TMPFS_OPTIONS),
        ),
    )?;
    let mut dir = PathBuf::from("/");
    for part in mount_point.components().skip(1) {
        dir.push(part);
        io_step("create", &dir, mkdir(&dir, 0o755))?;
    }
    // Nothing else goes there: read-only even for root (the mounts below keep their own flags).
    io_step(
        "make read-only",
        opt,
        rustix::mount::mount_remount(
            opt,
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            OPT_TMPFS_OPTIONS,
        )
        .map_err(io::Error::from),
    )?;
    io_step(
        "mount the layer on",
        mount_point,
        mount(
            &device.to_string_lossy(),
            mount_point,
            "erofs",
            RO_NOSUID_NODEV,
            None,
        ),
    )?;
    let packages = mount_point.join(PYTHON_DIR);
    if packages.is_dir() {
        let site = python_site(python, Path::new("/usr/local/lib"))?;
        io_step(
            "bind the Python packages on",
            &site,
            rustix::mount::mount_bind(&packages, &site).map_err(io::Error::from),
        )?;
        // A bind mount takes its flags from a remount.
        io_step(
            "make read-only",
            &site,
            rustix::mount::mount_remount(&site, MountFlags::BIND | RO_NOSUID_NODEV, "")
                .map_err(io::Error::from),
        )?;
    }
    Ok(Layer::inspect(mount_point))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sbx-layer-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn disk(sys_block: &Path, name: &str, serial: Option<&str>) {
        fs::create_dir_all(sys_block.join(name)).unwrap();
        if let Some(serial) = serial {
            fs::write(sys_block.join(name).join("serial"), format!("{serial}\n")).unwrap();
        }
    }

    #[test]
    fn disks_are_found_by_serial_whatever_their_names() {
        let dir = temp("disks");
        assert_eq!(Disks::find(&dir.join("missing")), Disks::default());
        disk(&dir, "vda", Some(""));
        disk(&dir, "loop0", Some(DISK_SERIAL));
        assert_eq!(
            Disks::find(&dir),
            Disks {
                root: Some("vda".into()),
                layer: None
            }
        );
        disk(&dir, "vdb", Some(DISK_SERIAL));
        assert_eq!(
            Disks::find(&dir),
            Disks {
                root: Some("vda".into()),
                layer: Some("vdb".into())
            }
        );
        // Enumerated the other way round, the roles follow the serial.
        let swapped = temp("swapped");
        disk(&swapped, "vdb", None);
        disk(&swapped, "vda", Some(DISK_SERIAL));
        disk(&swapped, "vdaa", None);
        assert_eq!(
            Disks::find(&swapped),
            Disks {
                root: Some("vdb".into()),
                layer: Some("vda".into())
            }
        );
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&swapped);
    }

    #[test]
    fn python_site_follows_the_interpreters_version() {
        let dir = temp("site");
        let bin = dir.join("bin");
        let lib = dir.join("lib");
        fs::create_dir_all(&bin).unwrap();
        fs::write(bin.join("python3.11"), "").unwrap();
        std::os::unix::fs::symlink("python3.11", bin.join("python3")).unwrap();
        let err = python_site(&bin.join("python3"), &lib).unwrap_err();
        let expected = lib.join("python3.11/dist-packages");
        assert!(
            err.to_string()
                .ends_with(&format!("(expected {})", expected.display())),
            "{err}"
        );
        fs::create_dir_all(lib.join("python3.11/dist-packages")).unwrap();
        fs::create_dir_all(lib.join("python3.12/dist-packages")).unwrap();
        assert_eq!(
            python_site(&bin.join("python3"), &lib).unwrap(),
            lib.join("python3.11/dist-packages")
        );
        fs::write(bin.join("python"), "").unwrap();
        assert!(
            python_site(&bin.join("python"), &lib).is_err(),
            "no version"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn interpreters_get_the_layers_scripts_last_and_its_node_modules() {
        let dir = temp("inspect");
        assert_eq!(Layer::inspect(&dir), Layer::default());
        let empty = Layer::default();
        assert_eq!(empty.path("/usr/bin:/bin"), "/usr/bin:/bin");
        assert!(empty.env().is_empty());
        fs::create_dir_all(dir.join(PYTHON_BIN_DIR)).unwrap();
        fs::create_dir_all(dir.join(NODE_MODULES_DIR)).unwrap();
        let layer = Layer::inspect(&dir);
        assert_eq!(
            layer.path("/usr/bin:/bin"),
            OsString::from(format!(
                "/usr/bin:/bin:{}",
                dir.join("python/bin").display()
            ))
        );
        assert_eq!(
            layer.env(),
            [(
                OsString::from("NODE_PATH"),
                dir.join("node/node_modules").into_os_string()
            )]
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
