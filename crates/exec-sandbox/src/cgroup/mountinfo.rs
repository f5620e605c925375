//! Parsers of `/proc/self/mountinfo` (where each cgroup hierarchy is mounted) and
//! `/proc/self/cgroup` (where this process sits in each). Pure: text in, data out.

use std::path::{Path, PathBuf};

/// A cgroup filesystem mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupMount {
    /// `cgroup2` (the unified hierarchy) rather than a v1 `cgroup` hierarchy.
    pub v2: bool,
    /// Where it is mounted.
    pub point: PathBuf,
    /// The cgroup of the hierarchy shown at `point` (`/` unless a sub-tree is bind-mounted or
    /// the mount was made in another cgroup namespace).
    pub root: String,
    /// Mounted read-only (the mount or its superblock).
    pub read_only: bool,
    /// The v1 controllers of the hierarchy (`cpu`, `memory`, ...; `name=...` entries dropped);
    /// empty for v2.
    pub controllers: Vec<String>,
}

/// The cgroup mounts listed in mountinfo `text`, in order. Malformed lines are skipped.
///
/// A line is `ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`,
/// with spaces, tabs, newlines and backslashes in paths escaped as `\ooo`.
pub(crate) fn cgroup_mounts(text: &str) -> Vec<CgroupMount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<CgroupMount> {
    let (before, after) = line.split_once(" - ")?;
    let fields: Vec<&str> = before.split(' ').collect();
    let (root, point, options) = (fields.get(3)?, fields.get(4)?, fields.get(5)?);
    let mut after = after.split(' ');
    let fstype = after.next()?;
    let _source = after.next()?;
    let super_options = after.next().unwrap_or("");
    let v2 = match fstype {
        "cgroup2" => true,
        "cgroup" => false,
        _ => return None,
    };
    let read_only = |options: &str| options.split(',').any(|o| o == "ro");
    let controllers = if v2 {
        Vec::new()
    } else {
        super_options
            .split(',')
            .filter(|o| KNOWN_V1_CONTROLLERS.contains(o))
            .map(str::to_owned)
            .collect()
    };
    Some(CgroupMount {
        v2,
        point: PathBuf::from(unescape(point)),
        root: unescape(root),
        read_only: read_only(options) || read_only(super_options),
        controllers,
    })
}

/// v1 controller names as they appear in super options (other options are mount flags,
/// `name=...` hierarchies and `clone_children`-like settings).
const KNOWN_V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "pids",
    "blkio",
    "devices",
    "freezer",
    "hugetlb",
    "net_cls",
    "net_prio",
    "perf_event",
    "rdma",
    "misc",
];

/// Undoes mountinfo's `\ooo` octal escapes (` ` is `\040`, `\` is `\134`).
fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = bytes.get(i + 1..i + 4)
            && octal.iter().all(|b| (b'0'..=b'7').contains(b))
            && let Ok(value) = u8::from_str_radix(std::str::from_utf8(octal).unwrap_or(""), 8)
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of `/proc/self/cgroup`: `ID:CONTROLLERS:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Membership {
    /// The v1 controllers of the hierarchy (`name=` entries included); empty for v2 (`0::`).
    pub controllers: Vec<String>,
    /// This process's cgroup in that hierarchy.
    pub path: String,
}

/// The lines of `/proc/self/cgroup` `text`.
pub(crate) fn memberships(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some(Membership {
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path: path.to_owned(),
            })
        })
        .collect()
}

/// The directory of this process's cgroup in the hierarchy mounted by `mount`, given the
/// memberships; `None` when the mount does not show it (a bind mount of another sub-tree).
pub(crate) fn own_dir(mount: &CgroupMount, memberships: &[Membership]) -> Option<PathBuf> {
    let membership = memberships.iter().find(|m| {
        if mount.v2 {
            m.controllers.is_empty()
        } else {
            mount.controllers.iter().any(|c| m.controllers.contains(c))
        }
    })?;
    let relative = if mount.root == "/" {
        membership.path.as_str()
    } else {
        let rest = membership.path.strip_prefix(mount.root.as_str())?;
        // `/a/bc` is not under `/a/b`.
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest
    };
    let relative = relative.trim_start_matches('/');
    if relative.split('/').any(|c| c == "..") {
        return None;
    }
    Some(if relative.is_empty() {
        mount.point.clone()
    } else {
        mount.point.join(relative)
    })
}

/// Whether `dir` is the mount point itself (the root of what the mount shows).
pub(crate) fn is_mount_root(mount: &CgroupMount, dir: &Path) -> bool {
    dir == mount.point
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// This project's build machines: v1 controllers each on its own mount, a `name=systemd`
    /// hierarchy, and cgroup2 at `unified` with no controllers.
    pub(crate) const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_v1_and_v2_mounts_and_their_controllers() {
        let mounts = cgroup_mounts(HYBRID);
        assert_eq!(mounts.len(), 6, "{mounts:?}");
        assert_eq!(mounts[0].controllers, ["cpu"]);
        assert_eq!(mounts[2].point, Path::new("/sys/fs/cgroup/memory"));
        // `name=systemd` is a hierarchy without controllers.
        assert!(mounts[4].controllers.is_empty() && !mounts[4].v2);
        assert!(mounts[5].v2 && mounts[5].controllers.is_empty());
        assert!(mounts.iter().all(|m| !m.read_only && m.root == "/"));
    }

    #[test]
    fn handles_optional_fields_escapes_and_read_only_mounts() {
        let text = "\
25 1 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 master:1 - cgroup2 cgroup2 rw,nsdelegate
26 1 0:23 /a\\040b /mnt/cg\\040v1\\134x ro,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
27 1 0:24 / /mnt/ro rw - cgroup cgroup ro,pids
28 1 8:1 / / rw - ext4 /dev/sda1 rw
garbage line
29 1 0:25 / /odd rw -
";
        let mounts = cgroup_mounts(text);
        assert_eq!(mounts.len(), 3, "{mounts:?}");
        assert!(mounts[0].v2 && !mounts[0].read_only);
        assert_eq!(mounts[1].point, Path::new("/mnt/cg v1\\x"));
        assert_eq!(mounts[1].root, "/a b");
        assert!(mounts[1].read_only);
        assert_eq!(mounts[1].controllers, ["cpu", "cpuacct"]);
        assert!(mounts[2].read_only, "read-only superblock");
        // A backslash not followed by three octal digits stays.
        assert_eq!(unescape("a\\9b\\04"), "a\\9b\\04");
    }

    #[test]
    fn resolves_our_directory_in_each_hierarchy() {
        let mounts = cgroup_mounts(HYBRID);
        let ours = memberships(
            "9:name=systemd:/\n4:memory:/process_api/47d5\n1:cpu:/\n8:pids:/\n2:cpuacct:/\n0::/\n",
        );
        assert_eq!(ours[1].controllers, ["memory"]);
        let dir = |i: usize| own_dir(&mounts[i], &ours);
        assert_eq!(dir(0).unwrap(), Path::new("/sys/fs/cgroup/cpu"));
        assert_eq!(
            dir(2).unwrap(),
            Path::new("/sys/fs/cgroup/memory/process_api/47d5")
        );
        assert_eq!(dir(5).unwrap(), Path::new("/sys/fs/cgroup/unified"));
        assert!(is_mount_root(&mounts[0], &dir(0).unwrap()));
    }

    #[test]
    fn a_bind_mounted_subtree_shows_only_what_is_under_it() {
        let mount = CgroupMount {
            v2: true,
            point: "/sys/fs/cgroup".into(),
            root: "/kubepods/pod1".into(),
            read_only: false,
            controllers: Vec::new(),
        };
        let at = |path: &str| {
            own_dir(
                &mount,
                &[Membership {
                    controllers: Vec::new(),
                    path: path.into(),
                }],
            )
        };
        assert_eq!(at("/kubepods/pod1").unwrap(), Path::new("/sys/fs/cgroup"));
        assert_eq!(
            at("/kubepods/pod1/c1").unwrap(),
            Path::new("/sys/fs/cgroup/c1")
        );
        assert_eq!(at("/kubepods/pod10"), None);
        assert_eq!(at("/other"), None);
        assert_eq!(at("/kubepods/pod1/../x"), None);
    }
}
