//! Making a restored clone unique: the host restores many VMs from one memory snapshot, and
//! each clone starts with the template's kernel CRNG state, clock and interpreter PRNG state.
//! On [`Request::Reseed`](sbx_protocol::Request::Reseed) the agent mixes the host's entropy
//! into the kernel pool and forces a CRNG reseed, sets the real-time clock, and has each
//! running interpreter reseed its generator.

use std::io::{self, Write};

use sbx_protocol::{Language, MAX_RESEED_ENTROPY};

use crate::config::Mode;
use crate::sys;

/// The kernel part of a reseed failed.
#[derive(Debug, thiserror::Error)]
pub enum ReseedError {
    /// Writing the entropy or the reseed ioctl failed.
    #[error("cannot reseed the kernel CRNG")]
    Crng(#[source] io::Error),
    /// Setting `CLOCK_REALTIME` failed.
    #[error("cannot set the clock")]
    Clock(#[source] io::Error),
}

/// Mixes `entropy` into the kernel's input pool, reseeds the CRNG from it and sets the clock.
///
/// Writing to `/dev/urandom` mixes without crediting; `RNDRESEEDCRNG` then makes the CRNG (and
/// every per-CPU generator) derive new keys, so `getrandom` differs between clones at once. In
/// dev mode only the (harmless) write happens: the ioctl and the clock belong to the host.
pub fn kernel(mode: Mode, entropy: &[u8], unix_time_ns: u64) -> Result<(), ReseedError> {
    let entropy = &entropy[..entropy.len().min(MAX_RESEED_ENTROPY)];
    let mut urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(ReseedError::Crng)?;
    urandom.write_all(entropy).map_err(ReseedError::Crng)?;
    if mode == Mode::Init {
        sys::reseed_crng(&urandom).map_err(ReseedError::Crng)?;
        set_realtime(unix_time_ns).map_err(ReseedError::Clock)?;
    }
    Ok(())
}

/// Sets `CLOCK_REALTIME` to `unix_time_ns` (needs `CAP_SYS_TIME`).
fn set_realtime(unix_time_ns: u64) -> io::Result<()> {
    const NANOS_PER_SEC: u64 = 1_000_000_000;
    let ts = rustix::time::Timespec {
        tv_sec: i64::try_from(unix_time_ns / NANOS_PER_SEC)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        // Below 10^9: always fits.
        tv_nsec: (unix_time_ns % NANOS_PER_SEC) as i64,
    };
    Ok(rustix::time::clock_settime(
        rustix::time::ClockId::Realtime,
        ts,
    )?)
}

/// Code run in `language`'s interpreter to reseed its generator from the (fresh) kernel CRNG,
/// or `None` when the language has nothing to reseed.
///
/// - Python: `random.seed()` without argument draws from `os.urandom`; so does
///   `numpy.random.seed()`, for NumPy's legacy global generator, which is seeded when
///   `numpy.random` is first imported (pandas imports it): a template that imported it (a
///   warm-up of a package layer's modules) would otherwise hand every clone the same
///   `np.random.rand()` sequence. Each only if already imported: a later import seeds itself
///   from the fresh CRNG anyway.
/// - bash: assigning `RANDOM` seeds it; `SRANDOM` (bash >= 5.1) comes from `getrandom`.
/// - Bun: JavaScriptCore seeds `Math.random` once per global object and offers no way to
///   reseed it, so clones of a warm template would share its sequence. The driver
///   (`drivers/bun.mjs`) replaces it at start with xoshiro128** seeded from `/dev/urandom`,
///   53 bits per double like the native one (like it, not a cryptographic generator), and
///   leaves a function under a global symbol that refills its state from the (fresh) kernel
///   CRNG. Not from `crypto.getRandomValues`: Bun's is a generator in the process, seeded on
///   first use, so a template that had used it would give every clone the same values. The function is defined in the template, so a
///   restore only calls it: defining the generator there cost every clone ~50 ms of first
///   translation under emulation.
pub fn interpreter_code(language: Language) -> Option<&'static str> {
    match language {
        Language::Python => Some(
            "[m.seed() for m in map(__import__('sys').modules.get, ('random', 'numpy.random')) if m is not None]",
        ),
        Language::Raw => Some("RANDOM=$SRANDOM"),
        Language::Javascript => Some(JS_RESEED),
    }
}

/// Refills the state of the `Math.random` the driver installed (see above).
const JS_RESEED: &str = r#"globalThis[Symbol.for("exec-sandbox.reseed")]()"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_mode_only_mixes_entropy() {
        // As a normal user the ioctl and clock_settime would fail: dev mode must not try.
        kernel(Mode::Stdio, &[1; 2 * MAX_RESEED_ENTROPY], 0).expect("write to /dev/urandom");
    }

    #[test]
    fn the_python_driver_compiled_the_reseed_at_start() {
        // Otherwise a clone's reseed compiles it, translating under emulation parts of the
        // compiler no user code needs (`drivers/python.py`, `reseed_compiled`).
        let code = interpreter_code(Language::Python).expect("python reseeds");
        let line = format!("    reseed = \"{code}\"\n");
        assert!(crate::driver::PYTHON.contains(&line), "{line}");
    }

    #[test]
    fn every_language_reseeds() {
        for language in Language::ALL {
            assert!(interpreter_code(language).is_some(), "{language}");
        }
    }
}
