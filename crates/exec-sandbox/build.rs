//! Placeholder: the assets engineer replaces this with the guest agent build.
fn main() {}
