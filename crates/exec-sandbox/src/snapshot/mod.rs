//! L1 memory snapshots: warm templates saved once per cache key and restored instead of booted.
//!
//! A template is a VM booted with its RAM in a file (`share=on`) and its language's interpreter
//! warm; saving writes only the device state (`x-ignore-shared`), ~60 KB. A clone maps the RAM
//! file copy-on-write (`share=off`), so it loads in milliseconds and clones share pages. The
//! QEMU side of saving and restoring is [`crate::vm::migration`]; here are the cache key
//! ([`key`]), the on-disk cache ([`cache`]), the scheduler's template manager ([`templates`])
//! and the clones started ahead of runs ([`standby`]).
//!
//! Layout under the cache directory, one directory per key:
//!
//! ```text
//! <key>/ram        guest RAM (sparse; 0600, owned by the QEMU user; stamped when published)
//! <key>/vmstate    QEMU's device state stream
//! <key>/meta.json  sizes and the vmstate's sha256; its mtime is the last use (LRU)
//! <key>.lock       held while one process builds the template
//! ```
//!
//! An entry is built in `.tmp-<key>-…`, `meta.json` written last, and published by renaming
//! the directory: readers see a whole entry or none. A corrupt, truncated or unloadable entry
//! is renamed away and deleted, never loaded, and rebuilt later under the same key but as new
//! files (clones still running keep the old inodes). The cache is kept under a size bound by
//! evicting least recently used entries.
//!
//! QEMU 7.2 opens a clone's RAM file read-write even though it maps it privately, through
//! `/proc/self/fd` with its own (unprivileged) user's permissions, so the RAM file belongs to
//! the QEMU user. A compromised clone could therefore write to it: every entry records the RAM
//! file's stamp (inode, size, modification and change times) when it is published, and an
//! entry whose RAM no longer matches is discarded before any restore.

pub(crate) mod cache;
pub(crate) mod key;
pub(crate) mod standby;
pub(crate) mod templates;

pub(crate) use cache::Cache;
pub(crate) use templates::Templates;

/// Version of the on-disk layout, of what goes into a key and of what a template holds (3: the
/// template ran a reseed and the warm pool's primer before its snapshot).
pub(crate) const FORMAT: u32 = 3;
const META: &str = "meta.json";
const RAM: &str = "ram";
const VMSTATE: &str = "vmstate";
