//! The one door to the terminal: every byte `sbx` writes to stdout or stderr goes through here,
//! so writers never interleave mid-chunk and the live progress line is settled before anything
//! else is printed.
//!
//! On a terminal (stderr a TTY, `TERM` not `dumb`) the latest progress step stays on one live
//! line with a clock of how long it has been the latest; when the next step starts, or anything
//! else is printed, the line is completed (without the clock) and kept. In pipes each step is a
//! plain line and there is no clock.
//! Colour only on a terminal and never when `NO_COLOR` is set.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How often the live line's clock is redrawn.
const TICK: Duration = Duration::from_millis(500);
/// The clock appears only for steps that take longer than this.
const SHOW_AFTER: Duration = Duration::from_secs(1);

struct Term {
    live_lines: bool,
    color: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    live: Option<Live>,
}

struct Live {
    text: String,
    started: Instant,
    shown_secs: u64,
}

static TERM: OnceLock<Term> = OnceLock::new();

fn term() -> &'static Term {
    TERM.get_or_init(|| {
        let stderr_tty =
            std::io::stderr().is_terminal() && std::env::var_os("TERM").is_none_or(|t| t != "dumb");
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let term = Term {
            live_lines: stderr_tty,
            // Unit tests compare plain text whatever terminal runs them.
            color: stderr_tty && !no_color && !cfg!(test),
            state: Mutex::new(State::default()),
        };
        if term.live_lines {
            // The clock of the live line; the thread dies with the process.
            let _ = std::thread::Builder::new()
                .name("sbx-progress".into())
                .spawn(tick);
        }
        term
    })
}

fn lock() -> MutexGuard<'static, State> {
    // A panic while printing leaves nothing half-updated that matters: keep going.
    term().state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kinds of emphasis on stderr.
#[derive(Debug, Clone, Copy)]
pub enum Style {
    /// `==>` of a progress step.
    Step,
    /// `error:`.
    Error,
    /// `warning:`.
    Warning,
    /// `hint:`.
    Hint,
    /// Debug log lines.
    Dim,
}

/// `text` with `style` when colour is on.
pub fn paint(style: Style, text: &str) -> String {
    if !term().color {
        return text.to_string();
    }
    let code = match style {
        Style::Step => "1;34",
        Style::Error => "1;31",
        Style::Warning => "1;33",
        Style::Hint => "1;36",
        Style::Dim => "2",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// `text` safe to print in one of sbx's own lines: every character that could steer a
/// terminal (C0 and C1 controls, DEL, newlines, bidirectional overrides) is shown as a
/// `\u{..}` escape. Text from the guest (error messages, names, refusal reasons) goes through
/// it; only the program's own stdout and stderr reach the terminal as they are.
pub fn inert(text: &str) -> std::borrow::Cow<'_, str> {
    fn steers(c: char) -> bool {
        c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !text.chars().any(steers) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if steers(c) {
            shown.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            shown.push(c);
        }
    }
    std::borrow::Cow::Owned(shown)
}

/// Writes program output (or JSON) to stdout and flushes it. A closed stdout is ignored: the
/// run goes on and its status still counts.
pub fn stdout(bytes: &[u8]) {
    let mut state = lock();
    settle(&mut state);
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes);
    let _ = out.flush();
}

/// Writes to stderr.
pub fn stderr(bytes: &[u8]) {
    let mut state = lock();
    settle(&mut state);
    let _ = std::io::stderr().write_all(bytes);
}

/// Writes one line to stderr.
pub fn stderr_line(line: &str) {
    let mut state = lock();
    settle(&mut state);
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Shows a progress step: the live line on a terminal, a plain line elsewhere.
pub fn step(text: &str) {
    let line = format!("{} {text}", paint(Style::Step, "==>"));
    let mut state = lock();
    settle(&mut state);
    if term().live_lines {
        let _ = write!(std::io::stderr(), "\r\x1b[K{line}");
        state.live = Some(Live {
            text: line,
            started: Instant::now(),
            shown_secs: 0,
        });
    } else {
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

/// Whether stderr is a terminal that shows live progress lines.
pub fn is_live() -> bool {
    term().live_lines
}

/// Completes the live line, if any, so that the next output starts on a fresh line.
pub fn finish() {
    settle(&mut lock());
}

fn settle(state: &mut State) {
    if let Some(live) = state.live.take() {
        // The clock goes: it counted the wait since the step began, which is not necessarily
        // the step's own duration.
        let _ = writeln!(std::io::stderr(), "\r\x1b[K{}", live.text);
    }
}

fn tick() {
    loop {
        std::thread::sleep(TICK);
        let mut state = lock();
        if let Some(live) = state.live.as_mut() {
            let elapsed = live.started.elapsed();
            if elapsed >= SHOW_AFTER && elapsed.as_secs() != live.shown_secs {
                live.shown_secs = elapsed.as_secs();
                let clock = paint(Style::Dim, &format!("({})", duration(elapsed)));
                let _ = write!(std::io::stderr(), "\r\x1b[K{} {clock}", live.text);
                let _ = std::io::stderr().flush();
            }
        }
    }
}

/// `12 s`, `2 min 13 s`.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 {
        format!("{secs} s")
    } else {
        format!("{} min {} s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(Duration::from_millis(12_900)), "12 s");
        assert_eq!(duration(Duration::from_secs(133)), "2 min 13 s");
    }
}
