//! Finding the processes left behind by an interpreter, by scanning `/proc`.
//!
//! Killing a process group misses whatever user code moved elsewhere (`setsid`, `setpgid`). In
//! the VM every sandbox process runs as the sandbox uid, so on a timeout the agent also kills
//! every process of that uid except the sessions of the other live interpreters. In dev mode
//! the uid is not ours, so only the interpreter's session is swept.

use std::fs;
use std::path::Path;

/// What the sweep needs to know about one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process id.
    pub pid: i32,
    /// Session id.
    pub sid: i32,
    /// Real uid.
    pub uid: u32,
    /// Already dead, waiting to be reaped: nothing left to kill.
    pub zombie: bool,
}

/// Which processes to kill.
#[derive(Debug, Clone)]
pub struct Sweep<'a> {
    /// Session of the interpreter being torn down.
    pub sid: i32,
    /// Also every process of this uid...
    pub uid: Option<u32>,
    /// ...except those in these sessions (the other live interpreters).
    pub spare_sids: &'a [i32],
    /// Never this pid (the agent itself).
    pub self_pid: i32,
}

impl Sweep<'_> {
    /// Whether `p` is to be killed.
    pub fn selects(&self, p: &ProcInfo) -> bool {
        if p.zombie || p.pid == self.self_pid || p.pid == 1 {
            return false;
        }
        if p.sid == self.sid {
            return true;
        }
        self.uid == Some(p.uid) && !self.spare_sids.contains(&p.sid)
    }
}

/// Parses the state and session id out of `/proc/<pid>/stat` (the command name may contain
/// anything, including spaces and parentheses, so fields are counted after the last `)`).
pub fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    // Fields after the name: state ppid pgrp session ...
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let sid = fields.nth(2)?.parse().ok()?;
    Some((state, sid))
}

/// Parses the real uid out of `/proc/<pid>/status`.
pub fn parse_status_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Every process under `proc_root` whose details could be read (processes vanish while we look).
pub fn list(proc_root: &Path) -> Vec<ProcInfo> {
    let Ok(entries) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let dir = entry.path();
            let (state, sid) = parse_stat(&fs::read_to_string(dir.join("stat")).ok()?)?;
            let uid = parse_status_uid(&fs::read_to_string(dir.join("status")).ok()?)?;
            Some(ProcInfo {
                pid,
                sid,
                uid,
                zombie: state == 'Z',
            })
        })
        .collect()
}

/// Pids selected by `sweep` among the processes under `proc_root`.
pub fn select(proc_root: &Path, sweep: &Sweep<'_>) -> Vec<i32> {
    list(proc_root)
        .into_iter()
        .filter(|p| sweep.selects(p))
        .map(|p| p.pid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_hostile_command_name() {
        let stat = "1234 (evil) 1 2 3 (x) S 1 77 88 0 -1 4194560 100 0 0 0";
        assert_eq!(parse_stat(stat), Some(('S', 88)));
        assert_eq!(parse_stat("9 (z) Z 1 9 9 0"), Some(('Z', 9)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (a) S 1"), None);
    }

    #[test]
    fn status_uid() {
        let status =
            "Name:\tpython3\nState:\tS (sleeping)\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\n";
        assert_eq!(parse_status_uid(status), Some(1000));
        assert_eq!(parse_status_uid("Name:\tx\n"), None);
    }

    #[test]
    fn sweep_policy() {
        let sweep = Sweep {
            sid: 50,
            uid: Some(1000),
            spare_sids: &[60],
            self_pid: 1,
        };
        let p = |pid, sid, uid| ProcInfo {
            pid,
            sid,
            uid,
            zombie: false,
        };
        assert!(sweep.selects(&p(51, 50, 1000)), "same session");
        assert!(sweep.selects(&p(52, 50, 0)), "same session, even as root");
        assert!(sweep.selects(&p(70, 70, 1000)), "escaped with setsid");
        assert!(!sweep.selects(&p(61, 60, 1000)), "another live interpreter");
        assert!(!sweep.selects(&p(80, 80, 0)), "root elsewhere");
        assert!(!sweep.selects(&p(1, 50, 0)), "never init");
        let zombie = ProcInfo {
            zombie: true,
            ..p(53, 50, 1000)
        };
        assert!(!sweep.selects(&zombie), "zombies are only reaped");

        let dev = Sweep { uid: None, ..sweep };
        assert!(
            !dev.selects(&p(70, 70, 1000)),
            "dev mode sweeps only the session"
        );
    }

    #[test]
    fn list_fake_proc_tree() {
        let dir = std::env::temp_dir().join(format!("sbx-procscan-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (pid, sid, uid) in [(10, 10, 1000), (11, 10, 1000), (20, 20, 0)] {
            let d = dir.join(pid.to_string());
            fs::create_dir_all(&d).expect("mkdir");
            fs::write(d.join("stat"), format!("{pid} (p) S 1 {sid} {sid} 0")).expect("stat");
            fs::write(d.join("status"), format!("Name:\tp\nUid:\t{uid}\t{uid}\n")).expect("status");
        }
        fs::create_dir_all(dir.join("self")).expect("mkdir");
        fs::create_dir_all(dir.join("30")).expect("half-gone process");
        let sweep = Sweep {
            sid: 10,
            uid: None,
            spare_sids: &[],
            self_pid: 1,
        };
        let mut got = select(&dir, &sweep);
        got.sort_unstable();
        assert_eq!(got, vec![10, 11]);
        let _ = fs::remove_dir_all(&dir);
    }
}
