//! What each command-line input is (stdin, a file, or code), its language and label, and
//! loading its text.

use std::io::Read;
use std::path::{Path, PathBuf};

use exec_sandbox::{Language, limits};

use crate::cli::Input;
use crate::status::UsageError;

/// Where a source's code comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Standard input (`-`).
    Stdin,
    /// A file on the host.
    File(PathBuf),
    /// Given on the command line.
    Inline(String),
}

/// One source, classified but not yet read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// Where the code comes from.
    pub origin: Origin,
    /// Name shown to the user: `-`, the path as typed, or `code[N]` (N counts inline codes).
    pub label: String,
    /// Interpreter.
    pub language: Language,
}

/// One source, ready to run.
#[derive(Debug, Clone)]
pub struct Source {
    /// Name shown to the user.
    pub label: String,
    /// Interpreter.
    pub language: Language,
    /// Program text.
    pub code: String,
}

/// What is at a path, as far as classification cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// A directory.
    Dir,
    /// Anything readable that is not a directory (file, pipe, `/dev/stdin`, ...).
    Other,
}

/// What the real filesystem has at `path`, or `None` when nothing is there.
pub fn probe_path(path: &Path) -> Option<PathKind> {
    std::fs::metadata(path).ok().map(|m| {
        if m.is_dir() {
            PathKind::Dir
        } else {
            PathKind::Other
        }
    })
}

/// The language a file extension stands for.
pub fn language_of_extension(path: &Path) -> Option<Language> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "py" => Some(Language::Python),
        "js" | "mjs" | "ts" => Some(Language::Javascript),
        "sh" => Some(Language::Raw),
        _ => None,
    }
}

/// A single word ending in a known extension: meant as a file name, never as code.
fn looks_like_file_name(arg: &str) -> bool {
    !arg.is_empty()
        && !arg.chars().any(|c| c.is_whitespace() || c.is_control())
        && Path::new(arg).file_stem().is_some()
        && language_of_extension(Path::new(arg)).is_some()
}

/// Decides what each input is. `probe` tells what is at a path (the filesystem, or a fake in
/// tests); nothing is read here.
pub fn classify(
    inputs: &[Input],
    language: Option<Language>,
    probe: impl Fn(&Path) -> Option<PathKind>,
) -> Result<Vec<Planned>, UsageError> {
    let default_language = language.unwrap_or(Language::Python);
    let mut planned = Vec::with_capacity(inputs.len());
    let mut inline_count = 0;
    let mut stdin_seen = false;
    for input in inputs {
        let arg = match input {
            Input::Code(code) => {
                inline_count += 1;
                planned.push(Planned {
                    origin: Origin::Inline(code.clone()),
                    label: format!("code[{inline_count}]"),
                    language: default_language,
                });
                continue;
            }
            Input::Source(arg) => arg,
        };
        if arg == "-" {
            if stdin_seen {
                return Err(UsageError::new("`-` (stdin) can be given only once"));
            }
            stdin_seen = true;
            planned.push(Planned {
                origin: Origin::Stdin,
                label: "-".into(),
                language: default_language,
            });
            continue;
        }
        let path = Path::new(arg);
        match probe(path) {
            Some(PathKind::Dir) => {
                return Err(UsageError::new(format!("`{arg}` is a directory"))
                    .hint("give a file, or pass code with -c"));
            }
            Some(PathKind::Other) => {
                let Some(language) = language.or_else(|| language_of_extension(path)) else {
                    return Err(UsageError::new(format!(
                        "cannot tell the language of `{arg}` from its extension"
                    ))
                    .hint("pass -l python, -l javascript or -l raw"));
                };
                planned.push(Planned {
                    origin: Origin::File(path.to_path_buf()),
                    label: arg.clone(),
                    language,
                });
            }
            None if looks_like_file_name(arg) => {
                return Err(UsageError::new(format!("no such file: `{arg}`"))
                    .hint("to run it as code, pass it with -c"));
            }
            None => {
                inline_count += 1;
                planned.push(Planned {
                    origin: Origin::Inline(arg.clone()),
                    label: format!("code[{inline_count}]"),
                    language: default_language,
                });
            }
        }
    }
    Ok(planned)
}

/// Reads the code of `planned` (files and stdin), bounded by the library's code size limit.
pub fn load(planned: Planned) -> Result<Source, UsageError> {
    let code = match planned.origin {
        Origin::Inline(code) => code,
        Origin::Stdin => read_text(std::io::stdin().lock(), "stdin")?,
        Origin::File(path) => {
            let file = std::fs::File::open(&path).map_err(|e| {
                UsageError::new(format!("cannot open `{}`", path.display())).cause(e)
            })?;
            read_text(file, &planned.label)?
        }
    };
    Ok(Source {
        label: planned.label,
        language: planned.language,
        code,
    })
}

/// Reads at most one byte past the limit, so a huge file is refused without loading it whole.
fn read_text(reader: impl Read, what: &str) -> Result<String, UsageError> {
    let limit = limits::MAX_CODE_BYTES as u64 + 1;
    let mut bytes = Vec::new();
    reader
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| UsageError::new(format!("cannot read `{what}`")).cause(e))?;
    if bytes.len() as u64 >= limit {
        return Err(UsageError::new(format!(
            "`{what}` is larger than the code limit of {} bytes",
            limits::MAX_CODE_BYTES
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        UsageError::new(format!("`{what}` is not UTF-8 text"))
            .cause(e)
            .hint("a source that names an existing file is read as a file; pass code with -c")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_fs(path: &Path) -> Option<PathKind> {
        match path.to_str()? {
            "dir" => Some(PathKind::Dir),
            "a.py" | "b.ts" | "c.mjs" | "d.sh" | "e.js" | "notes.txt" | "script" => {
                Some(PathKind::Other)
            }
            _ => None,
        }
    }

    fn sources(args: &[&str]) -> Vec<Input> {
        args.iter().map(|a| Input::Source(a.to_string())).collect()
    }

    fn plan(args: &[&str], language: Option<Language>) -> Result<Vec<Planned>, UsageError> {
        classify(&sources(args), language, fake_fs)
    }

    #[test]
    fn files_take_their_language_from_the_extension() {
        let p = plan(&["a.py", "b.ts", "c.mjs", "d.sh", "e.js"], None).unwrap();
        let langs: Vec<_> = p.iter().map(|p| p.language).collect();
        use Language::*;
        assert_eq!(langs, [Python, Javascript, Javascript, Raw, Javascript]);
        assert_eq!(p[0].origin, Origin::File("a.py".into()));
        assert_eq!(p[0].label, "a.py");
    }

    #[test]
    fn the_language_flag_overrides_the_extension() {
        let p = plan(&["a.py", "notes.txt"], Some(Language::Raw)).unwrap();
        assert!(p.iter().all(|p| p.language == Language::Raw));
    }

    #[test]
    fn unknown_extension_needs_a_language() {
        let e = plan(&["notes.txt"], None).unwrap_err();
        assert!(e.to_string().contains("notes.txt"), "{e}");
        assert!(e.hint_text().unwrap().contains("-l"));
        assert!(plan(&["script"], None).is_err());
        assert_eq!(
            plan(&["script"], Some(Language::Raw)).unwrap()[0].origin,
            Origin::File("script".into())
        );
    }

    #[test]
    fn anything_else_is_inline_code_numbered_in_order() {
        let inputs = vec![
            Input::Source("print(1)".into()),
            Input::Source("a.py".into()),
            Input::Code("a.py".into()),
            Input::Source("notes.md".into()),
        ];
        let p = classify(&inputs, None, fake_fs).unwrap();
        let labels: Vec<_> = p.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(labels, ["code[1]", "a.py", "code[2]", "code[3]"]);
        assert_eq!(p[0].origin, Origin::Inline("print(1)".into()));
        assert_eq!(
            p[2].origin,
            Origin::Inline("a.py".into()),
            "-c is always code"
        );
        assert_eq!(p[0].language, Language::Python, "python by default");
        let p = plan(&["echo hi"], Some(Language::Raw)).unwrap();
        assert_eq!(p[0].language, Language::Raw);
    }

    #[test]
    fn a_missing_file_name_is_an_error_but_code_with_an_extension_is_not() {
        let e = plan(&["missing.py"], None).unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
        assert!(plan(&["dir/missing.sh"], None).is_err());
        for code in ["echo hi > out.sh", "print(x.py)", ".py", "a\nb.py"] {
            assert!(plan(&[code], None).is_ok(), "{code:?}");
        }
    }

    #[test]
    fn stdin_at_most_once_and_directories_refused() {
        let p = plan(&["-"], Some(Language::Javascript)).unwrap();
        assert_eq!(p[0].origin, Origin::Stdin);
        assert_eq!(p[0].label, "-");
        assert_eq!(p[0].language, Language::Javascript);
        assert!(
            plan(&["-", "-"], None)
                .unwrap_err()
                .to_string()
                .contains("once")
        );
        assert!(
            plan(&["dir"], None)
                .unwrap_err()
                .to_string()
                .contains("directory")
        );
    }

    #[test]
    fn reading_is_bounded_and_utf8_checked() {
        let ok = "x".repeat(limits::MAX_CODE_BYTES);
        assert_eq!(
            read_text(ok.as_bytes(), "f").unwrap().len(),
            limits::MAX_CODE_BYTES
        );
        let big = "x".repeat(limits::MAX_CODE_BYTES + 1);
        assert!(
            read_text(big.as_bytes(), "f")
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
        assert!(
            read_text(&b"\xff\xfe"[..], "f")
                .unwrap_err()
                .to_string()
                .contains("UTF-8")
        );
    }

    #[test]
    fn loading_a_real_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hello.py");
        std::fs::write(&path, "print('hi')\n").unwrap();
        let arg = path.to_str().unwrap().to_string();
        let planned = classify(&[Input::Source(arg.clone())], None, probe_path).unwrap();
        let source = load(planned.into_iter().next().unwrap()).unwrap();
        assert_eq!(source.code, "print('hi')\n");
        assert_eq!(source.label, arg);
        assert_eq!(source.language, Language::Python);
    }
}
