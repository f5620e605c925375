//! `sbx run --upload/--download`: files copied into the sandbox before the code runs and out of
//! it afterwards, through a session. Every local and guest path is checked before any VM boots.

use std::path::{Path, PathBuf};

use exec_sandbox::{
    Error, ExecOptions, ExecutionResult, RunOptions, Scheduler, SessionOptions, validate,
};

use crate::status::UsageError;

/// One `--upload LOCAL:GUEST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The local file.
    pub local: PathBuf,
    /// Where it goes, relative to `/home/user`.
    pub guest: String,
}

/// One `--download GUEST[:LOCAL]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// The sandbox file, relative to `/home/user`.
    pub guest: String,
    /// Where it goes (default: the file's name in the current directory).
    pub local: PathBuf,
}

/// Parses `LOCAL:GUEST` (split at the first `:`) and checks the guest path's form.
pub fn parse_upload(text: &str) -> Result<Upload, String> {
    let (local, guest) = text
        .split_once(':')
        .filter(|(l, g)| !l.is_empty() && !g.is_empty())
        .ok_or_else(|| format!("`{text}` is not LOCAL:GUEST"))?;
    validate::guest_path(guest, false).map_err(|e| e.to_string())?;
    Ok(Upload {
        local: PathBuf::from(local),
        guest: guest.to_string(),
    })
}

/// Parses `GUEST[:LOCAL]` (split at the first `:`) and checks the guest path's form.
pub fn parse_download(text: &str) -> Result<Download, String> {
    let (guest, local) = match text.split_once(':') {
        Some((guest, local)) if !local.is_empty() => (guest, PathBuf::from(local)),
        Some((_, _)) => return Err(format!("`{text}`: LOCAL after `:` is empty")),
        None => {
            let name = Path::new(text)
                .file_name()
                .ok_or_else(|| format!("`{text}` names no file"))?;
            (text, PathBuf::from(name))
        }
    };
    validate::guest_path(guest, false).map_err(|e| e.to_string())?;
    Ok(Download {
        guest: guest.to_string(),
        local,
    })
}

/// Local checks, before any VM: uploads are readable regular files within the size limit;
/// downloads go to an existing directory and not onto a directory.
pub fn check_local(uploads: &[Upload], downloads: &[Download]) -> Result<(), UsageError> {
    for upload in uploads {
        let meta = std::fs::metadata(&upload.local).map_err(|e| {
            UsageError::new(format!("--upload: cannot read {}", upload.local.display())).cause(e)
        })?;
        if !meta.is_file() {
            return Err(UsageError::new(format!(
                "--upload: {} is not a regular file",
                upload.local.display()
            )));
        }
        validate::file_size(meta.len()).map_err(|e| {
            UsageError::new(format!("--upload: {}", upload.local.display())).cause(e)
        })?;
    }
    for download in downloads {
        if download.local.is_dir() {
            return Err(UsageError::new(format!(
                "--download: {} is a directory; name the file",
                download.local.display()
            )));
        }
        let parent = parent_dir(&download.local);
        if !parent.is_dir() {
            return Err(UsageError::new(format!(
                "--download: directory {} does not exist",
                parent.display()
            )));
        }
    }
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Runs one source (`run` as [`Scheduler::run`] would take it) in a session: uploads, the
/// code, downloads (each written to a temporary file beside its destination and renamed, so a
/// failure leaves no half-written file).
pub async fn run_with_files(
    scheduler: &Scheduler,
    run: RunOptions,
    uploads: &[Upload],
    downloads: &[Download],
) -> Result<ExecutionResult, Error> {
    let RunOptions {
        language,
        code,
        timeout_seconds,
        memory_mb,
        env_vars,
        on_stdout,
        on_stderr,
        network,
        on_ports,
        ..
    } = run;
    let mut options = SessionOptions::new(language);
    options.memory_mb = memory_mb;
    options.env_vars = env_vars;
    options.network = network;
    let mut exec = ExecOptions::new(code);
    exec.timeout_seconds = timeout_seconds;
    exec.on_stdout = on_stdout;
    exec.on_stderr = on_stderr;
    let session = scheduler.session(options).await?;
    // Bound with the session's VM: reported before anything runs in it. The session's exec
    // results list them too.
    if let Some(on_ports) = &on_ports
        && !session.exposed_ports().is_empty()
    {
        on_ports(session.exposed_ports());
    }
    let outcome = async {
        for upload in uploads {
            let file = tokio::fs::File::open(&upload.local)
                .await
                .map_err(|e| local_error("read", &upload.local, e))?;
            let size = file.metadata().await.ok().map(|m| m.len());
            session
                .write_file(&upload.guest, file, size, is_executable(&upload.local))
                .await?;
        }
        let result = session.exec(exec).await?;
        for download in downloads {
            let parent = parent_dir(&download.local);
            let temp = tempfile::NamedTempFile::new_in(&parent)
                .map_err(|e| local_error("create a file in", &parent, e))?;
            let file = tokio::fs::File::from_std(
                temp.reopen()
                    .map_err(|e| local_error("open", temp.path(), e))?,
            );
            let mut writer = tokio::io::BufWriter::new(file);
            session.read_file(&download.guest, &mut writer).await?;
            tokio::io::AsyncWriteExt::flush(&mut writer)
                .await
                .map_err(|e| local_error("write", temp.path(), e))?;
            temp.persist(&download.local)
                .map_err(|e| local_error("write", &download.local, e.error))?;
        }
        Ok(result)
    }
    .await;
    session.close().await;
    outcome
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

/// A local file that could not be read or written, in the library's file error shape (kind
/// Permanent), naming the local path.
fn local_error(op: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::File {
        op,
        path: format!("local {}", path.display()),
        source: exec_sandbox::FileError::Local(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_and_download_forms() {
        assert_eq!(
            parse_upload("a/b.csv:data/b.csv").unwrap(),
            Upload {
                local: "a/b.csv".into(),
                guest: "data/b.csv".into()
            }
        );
        for bad in [
            "nocolon",
            ":x",
            "x:",
            "x:/etc/passwd",
            "x:../y",
            "x:a/../../y",
        ] {
            assert!(parse_upload(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_download("out/r.txt").unwrap(),
            Download {
                guest: "out/r.txt".into(),
                local: "r.txt".into()
            }
        );
        assert_eq!(
            parse_download("r.txt:/tmp/x").unwrap().local,
            PathBuf::from("/tmp/x")
        );
        for bad in ["/etc/passwd", "../x", "x:", "a/../../x"] {
            assert!(parse_download(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_checks_happen_before_any_vm() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("in.txt");
        std::fs::write(&file, "x").unwrap();
        let up = |p: &Path| Upload {
            local: p.to_path_buf(),
            guest: "in.txt".into(),
        };
        let down = |p: &Path| Download {
            guest: "out.txt".into(),
            local: p.to_path_buf(),
        };
        assert!(check_local(&[up(&file)], &[down(&dir.path().join("out.txt"))]).is_ok());
        assert!(check_local(&[up(&dir.path().join("missing"))], &[]).is_err());
        assert!(check_local(&[up(dir.path())], &[]).is_err());
        assert!(check_local(&[], &[down(dir.path())]).is_err());
        assert!(check_local(&[], &[down(&dir.path().join("no/such/dir/x"))]).is_err());
    }
}
