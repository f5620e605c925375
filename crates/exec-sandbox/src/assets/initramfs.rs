//! The initramfs: a cpio `newc` archive holding the guest agent as `/init`.
//!
//! Written here rather than by a tool so it needs nothing installed and is byte-for-byte
//! deterministic (owner root, mtime 0, inode numbers in entry order): the same agent always gives
//! the same archive and the same SHA-256.

/// Bumped whenever the archive layout changes, so the initramfs inputs key changes with it.
pub(crate) const FORMAT_VERSION: u32 = 1;

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// One archive member.
struct Member<'a> {
    name: &'a str,
    mode: u32,
    /// (major, minor) of a device node.
    rdev: (u32, u32),
    data: &'a [u8],
}

/// The archive for `agent`: the directories the agent mounts on, a console for the kernel to
/// open before the agent runs (the kernel has no devtmpfs mounted yet), and `/init`.
pub(crate) fn archive(agent: &[u8]) -> Vec<u8> {
    let dir = |name| Member {
        name,
        mode: S_IFDIR | 0o755,
        rdev: (0, 0),
        data: &[],
    };
    let members = [
        dir("dev"),
        Member {
            name: "dev/console",
            mode: S_IFCHR | 0o600,
            rdev: (5, 1),
            data: &[],
        },
        Member {
            name: "init",
            mode: S_IFREG | 0o755,
            rdev: (0, 0),
            data: agent,
        },
        dir("newroot"),
        dir("proc"),
        dir("sys"),
    ];
    let mut out = Vec::with_capacity(agent.len() + 1024);
    for (index, member) in members.iter().enumerate() {
        let nlink = if member.mode & S_IFDIR != 0 { 2 } else { 1 };
        write_member(&mut out, index as u32 + 1, member, nlink);
    }
    write_member(
        &mut out,
        0,
        &Member {
            name: TRAILER,
            mode: 0,
            rdev: (0, 0),
            data: &[],
        },
        1,
    );
    out
}

fn write_member(out: &mut Vec<u8>, ino: u32, member: &Member<'_>, nlink: u32) {
    let fields = [
        ino,
        member.mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        u32::try_from(member.data.len()).expect("the agent is far below 4 GiB"),
        0, // devmajor
        0, // devminor
        member.rdev.0,
        member.rdev.1,
        member.name.len() as u32 + 1, // with the NUL
        0,                            // check (unused by newc)
    ];
    out.extend_from_slice(MAGIC);
    for field in fields {
        out.extend_from_slice(format!("{field:08X}").as_bytes());
    }
    out.extend_from_slice(member.name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(member.data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A parsed archive member: (name, mode, rdev, data).
    pub(crate) type Parsed = (String, u32, (u32, u32), Vec<u8>);

    /// A strict newc reader for the tests: rejects anything the kernel would not accept.
    pub(crate) fn parse(mut bytes: &[u8]) -> Result<Vec<Parsed>, String> {
        let total = bytes.len();
        let mut members = Vec::new();
        loop {
            let offset = total - bytes.len();
            if bytes.len() < 110 || &bytes[..6] != MAGIC {
                return Err(format!("no newc header at offset {offset}"));
            }
            let field = |i: usize| {
                let text = std::str::from_utf8(&bytes[6 + i * 8..14 + i * 8])
                    .map_err(|e| e.to_string())?;
                u32::from_str_radix(text, 16).map_err(|e| e.to_string())
            };
            let (mode, mtime, size, rmaj, rmin, namesize) = (
                field(1)?,
                field(5)?,
                field(6)? as usize,
                field(9)?,
                field(10)?,
                field(11)? as usize,
            );
            if mtime != 0 || field(2)? != 0 || field(3)? != 0 {
                return Err(format!("member at {offset} is not root-owned with mtime 0"));
            }
            let name_end = 110 + namesize;
            let data_start = name_end.next_multiple_of(4);
            let data_end = data_start + size;
            if data_end > bytes.len() || bytes[name_end - 1] != 0 {
                return Err(format!("member at {offset} is truncated"));
            }
            let name =
                String::from_utf8(bytes[110..name_end - 1].to_vec()).map_err(|e| e.to_string())?;
            if name == TRAILER {
                if bytes.len() != data_end.next_multiple_of(4) {
                    return Err("bytes after the trailer".into());
                }
                return Ok(members);
            }
            members.push((
                name,
                mode,
                (rmaj, rmin),
                bytes[data_start..data_end].to_vec(),
            ));
            bytes = &bytes[data_end.next_multiple_of(4)..];
        }
    }

    #[test]
    fn archive_holds_the_agent_and_the_nodes_the_boot_needs() {
        let agent = b"\x7fELF fake agent of odd length";
        let members = parse(&archive(agent)).unwrap();
        let names: Vec<&str> = members.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(
            names,
            ["dev", "dev/console", "init", "newroot", "proc", "sys"]
        );
        let get = |name: &str| members.iter().find(|m| m.0 == name).unwrap();
        assert_eq!(get("init").1, 0o100_755);
        assert_eq!(get("init").3, agent);
        assert_eq!(get("dev/console").1, 0o020_600);
        assert_eq!(get("dev/console").2, (5, 1));
        for dir in ["dev", "newroot", "proc", "sys"] {
            assert_eq!(get(dir).1, 0o040_755, "{dir}");
        }
    }

    #[test]
    fn archive_is_deterministic_and_aligned() {
        for len in 0..8 {
            let agent = vec![0xAB; 1000 + len];
            let a = archive(&agent);
            assert_eq!(a, archive(&agent));
            assert_eq!(a.len() % 4, 0);
            assert_eq!(parse(&a).unwrap()[2].3, agent);
        }
    }

    #[test]
    fn cpio_tool_lists_the_archive_when_installed() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let Ok(mut child) = Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            return; // cpio is not installed; the parser above covers the format.
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&archive(b"agent"))
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8(output.stdout).unwrap(),
            "dev\ndev/console\ninit\nnewroot\nproc\nsys\n"
        );
    }
}
