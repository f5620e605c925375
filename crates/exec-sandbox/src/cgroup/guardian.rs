//! The guardian: a small process that removes this process's cgroup directories and its VMs'
//! temporary directories when this process dies without dropping its [`super::Parent`]
//! (`kill -9`, a crash), so nothing is left behind even before another scheduler starts and
//! sweeps the cgroups (`super::sweep`, the second line of defence).
//!
//! It is `sh` reading a pipe whose only write end this process holds (close-on-exec, so no
//! child inherits it): end of file means this process is gone. It then removes the directories,
//! deepest first, retrying for a few seconds while the dead process's QEMUs (killed by their
//! parent-death signal) leave them. It runs in a process group of its own, so a terminal's
//! Ctrl-C that ends `sbx` does not end it too, with stdio on `/dev/null`. When the parent is
//! dropped normally the library removes the directories itself and kills the guardian first:
//! it never acts on directories a newer scheduler of this process has taken over.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};

/// What the guardian runs: `$1` is the prefix of the process's VM temporary directories, the
/// rest are its cgroup directories.
const SCRIPT: &str = r#"
while read -r _; do :; done
for temp in "$1"*; do
    [ -d "$temp" ] && rm -rf --one-file-system -- "$temp"
done
shift
tries=0
while [ "$tries" -lt 40 ]; do
    left=0
    for dir in "$@"; do
        [ -d "$dir" ] || continue
        find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null
        [ -d "$dir" ] && left=1
    done
    [ "$left" = 0 ] && exit 0
    tries=$((tries + 1))
    sleep 0.25
done
exit 1
"#;

/// A running guardian of some directories.
pub(crate) struct Guardian {
    child: Child,
    /// The write end of its pipe, never written: closed when this process dies.
    #[cfg_attr(not(test), expect(dead_code, reason = "held, never read"))]
    alive: Option<ChildStdin>,
}

impl Guardian {
    /// Starts a guardian of the cgroup directories `dirs` and of the temporary directories
    /// whose path starts with `temp_prefix`.
    pub(crate) fn spawn(dirs: Vec<PathBuf>, temp_prefix: PathBuf) -> io::Result<Guardian> {
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("sbx-cgroup-guardian")
            .arg(temp_prefix)
            .args(dirs)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .process_group(0)
            .spawn()?;
        let alive = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("the guardian's pipe was not made"))?;
        Ok(Guardian {
            child,
            alive: Some(alive),
        })
    }

    /// Closes the pipe as this process's death would, and waits for the guardian to finish.
    #[cfg(test)]
    fn orphan(mut self) -> io::Result<std::process::ExitStatus> {
        self.alive = None;
        self.child.wait()
    }
}

impl Drop for Guardian {
    /// A normal drop: the library removes the directories itself; the guardian must not act.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_its_directories_when_the_pipe_closes_and_not_when_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("exec-sandbox").join("4242");
        std::fs::create_dir_all(dir.join("sbx-4242-1")).unwrap();
        std::fs::create_dir_all(dir.join("sbx-4242-2")).unwrap();
        let temp = tmp.path().join("sbx-vm-4242-");
        let vm_temp = tmp.path().join("sbx-vm-4242-aBc");
        std::fs::create_dir_all(vm_temp.join("root")).unwrap();
        std::fs::write(vm_temp.join("control.sock"), b"").unwrap();
        let other = tmp.path().join("sbx-vm-42420-xyz");
        std::fs::create_dir(&other).unwrap();

        // Dropped normally: killed, the directories stay (the library removes them itself).
        drop(Guardian::spawn(vec![dir.clone()], temp.clone()).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(dir.join("sbx-4242-1").exists() && vm_temp.exists());

        // The pipe closes as when this process dies: the directories go, deepest first.
        let status = Guardian::spawn(vec![dir.clone()], temp)
            .unwrap()
            .orphan()
            .unwrap();
        assert!(status.success(), "{status}");
        assert!(!dir.exists(), "{} left", dir.display());
        assert!(!vm_temp.exists(), "{} left", vm_temp.display());
        assert!(
            tmp.path().join("exec-sandbox").exists() && other.exists(),
            "only its own directories"
        );
    }
}
