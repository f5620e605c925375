//! The stable classification of every error, a leaf every layer may use.

/// What a caller can do about an error: the stable classification to branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The caller's input was invalid; nothing ran. Fix the input.
    InvalidInput,
    /// Infrastructure failed before the code was dispatched; safe to retry.
    Transient,
    /// The code was dispatched and then contact was lost: it may or may not have run.
    OutcomeUnknown,
    /// Retrying will not help without operator action (missing assets, bad checksum, no QEMU).
    Permanent,
}
