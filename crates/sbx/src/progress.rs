//! Progress and logs on stderr: a tracing subscriber that turns the library's events into
//! lines a person reads.
//!
//! `info` events are progress steps (`==> building python image`), `warn` and `error` events
//! are `warning:`/`error:` lines, `debug` and `trace` are timestamped log lines with their
//! target. `RUST_LOG`, when set, replaces the level chosen by `-q`/`--debug`.

use std::fmt::Write as _;
use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::term::{self, Style};

/// How much to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// Warnings and errors only (`-q`).
    Quiet,
    /// Progress steps, warnings and errors.
    Normal,
    /// Everything from exec-sandbox and sbx down to `debug` (`--debug`).
    Debug,
}

impl Verbosity {
    /// From the `-q` and `--debug` flags (clap makes them exclusive).
    pub fn from_flags(flags: &crate::cli::LogArgs) -> Self {
        match (flags.quiet, flags.debug) {
            (true, _) => Verbosity::Quiet,
            (_, true) => Verbosity::Debug,
            _ => Verbosity::Normal,
        }
    }

    /// The filter directives for this level.
    fn directives(self) -> &'static str {
        match self {
            Verbosity::Quiet => "warn",
            Verbosity::Normal => "warn,exec_sandbox=info,sbx=info",
            Verbosity::Debug => "info,exec_sandbox=debug,sbx=debug,sbx_protocol=debug",
        }
    }
}

/// Installs the subscriber for the whole process.
pub fn init(verbosity: Verbosity) {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| (EnvFilter::try_new(&v), v));
    let filter = match from_env {
        Some((Ok(filter), _)) => filter,
        Some((Err(e), value)) => {
            term::stderr_line(&format!(
                "{} ignoring RUST_LOG=`{value}`: {e}",
                term::paint(Style::Warning, "warning:")
            ));
            EnvFilter::new(verbosity.directives())
        }
        None => EnvFilter::new(verbosity.directives()),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(HumanLayer {
            started: Instant::now(),
        })
        .try_init();
}

/// Renders events as lines through [`term`].
struct HumanLayer {
    started: Instant,
}

impl<S: Subscriber> Layer<S> for HumanLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let text = fields.render();
        let level = *event.metadata().level();
        match level {
            Level::INFO => term::step(&text),
            Level::WARN => term::stderr_line(&format!(
                "{} {text}",
                term::paint(Style::Warning, "warning:")
            )),
            Level::ERROR => {
                term::stderr_line(&format!("{} {text}", term::paint(Style::Error, "error:")))
            }
            _ => {
                let line = format!(
                    "[{:>8.3}s] {:<5} {}: {text}",
                    self.started.elapsed().as_secs_f64(),
                    level,
                    event.metadata().target()
                );
                term::stderr_line(&term::paint(Style::Dim, &line));
            }
        }
    }
}

/// An event's message and its other fields, in the order they were recorded.
#[derive(Default)]
struct Fields {
    message: String,
    others: Vec<(&'static str, String)>,
}

impl Fields {
    /// `message (key=value, key=value)`.
    fn render(&self) -> String {
        let mut out = self.message.clone();
        if !self.others.is_empty() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push('(');
            for (i, (name, value)) in self.others.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "{name}={value}");
            }
            out.push(')');
        }
        out
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.others.push((field.name(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.others.push((field.name(), format!("{value:?}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_render_after_the_message() {
        let f = Fields {
            message: "accelerator".into(),
            others: vec![("name", "tcg".into()), ("reason", "KVM guests hang".into())],
        };
        assert_eq!(f.render(), "accelerator (name=tcg, reason=KVM guests hang)");
        let f = Fields {
            message: "building python image".into(),
            others: vec![],
        };
        assert_eq!(f.render(), "building python image");
    }

    #[test]
    fn verbosity_from_flags() {
        let flags = |quiet, debug| crate::cli::LogArgs { quiet, debug };
        assert_eq!(Verbosity::from_flags(&flags(true, false)), Verbosity::Quiet);
        assert_eq!(Verbosity::from_flags(&flags(false, true)), Verbosity::Debug);
        assert_eq!(
            Verbosity::from_flags(&flags(false, false)),
            Verbosity::Normal
        );
        for v in [Verbosity::Quiet, Verbosity::Normal, Verbosity::Debug] {
            assert!(EnvFilter::try_new(v.directives()).is_ok());
        }
    }
}
