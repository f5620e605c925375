//! The package layer: a read-only EROFS image of packages installed on the host, attached as
//! the VM's second virtio-blk disk and mounted by the agent, so the interpreters find the
//! packages. Shared by the host (which builds and attaches layers) and the agent (which mounts
//! them).
//!
//! The image's root holds, for a Python layer, [`PYTHON_DIR`] (what `pip install --target
//! python` produces: packages, `*.dist-info`, `*.pth` files, console scripts in
//! [`PYTHON_BIN_DIR`]), and for a JavaScript layer [`NODE_MODULES_DIR`] (what `npm install
//! --prefix node` produces).

use serde::{Deserialize, Serialize};

use crate::Language;

/// Kernel command-line parameter announcing a layer: `sbx.packages=1`.
pub const CMDLINE_PARAM: &str = "sbx.packages";
/// Serial number of the layer's virtio-blk disk: the agent finds the disk by it, never by its
/// device name.
pub const DISK_SERIAL: &str = "sbx-packages";
/// Where the agent mounts the layer (read-only, `nosuid,nodev`).
pub const MOUNT_POINT: &str = "/opt/sbx/packages";
/// Python packages, relative to the layer's root (`pip install --target python`).
pub const PYTHON_DIR: &str = "python";
/// Console scripts of the Python packages, relative to the layer's root. Their `#!` line must
/// name the guest's interpreter (`/usr/bin/python3`), not the host's.
pub const PYTHON_BIN_DIR: &str = "python/bin";
/// npm's prefix, relative to the layer's root (`npm install --prefix node`).
pub const NODE_PREFIX: &str = "node";
/// JavaScript packages, relative to the layer's root.
pub const NODE_MODULES_DIR: &str = "node/node_modules";

/// Most modules one [`Request::Warm`](crate::Request::Warm) may ask to import.
pub const MAX_WARM_MODULES: usize = 256;
/// Longest module name in a [`Request::Warm`](crate::Request::Warm) (npm's limit on names).
pub const MAX_MODULE_NAME_BYTES: usize = 214;

/// What became of the layer the kernel command line announced, as the agent's hello says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerStatus {
    /// The command line announced no layer.
    Absent,
    /// The layer is mounted and the interpreters are pointed at it.
    Mounted,
    /// The command line announced a layer and it could not be used; why (agent text).
    Failed(String),
}

/// Whether `name` may be imported by a warm-up in `language`: for Python a dotted module path
/// of ASCII identifiers (`numpy`, `os.path`); for JavaScript a bare package specifier with an
/// optional scope and subpath (`lodash`, `@scope/pkg`, `lodash/fp`), never a relative or
/// absolute path. Nothing for `raw`.
pub fn is_warm_module(language: Language, name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_MODULE_NAME_BYTES {
        return false;
    }
    match language {
        Language::Python => name.split('.').all(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
                && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
        }),
        Language::Javascript => {
            let rest = name.strip_prefix('@').unwrap_or(name);
            let scoped = rest.len() != name.len();
            let parts: Vec<&str> = rest.split('/').collect();
            let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~".contains(c);
            (!scoped || parts.len() >= 2)
                && parts.iter().all(|part| {
                    !part.is_empty()
                        && !part.starts_with('.')
                        && !part.starts_with('_')
                        && part.chars().all(allowed)
                })
        }
        Language::Raw => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_module_names() {
        for good in ["numpy", "os.path", "_private", "a1.b_2", "PIL"] {
            assert!(is_warm_module(Language::Python, good), "{good}");
        }
        for bad in [
            "", "1abc", "a..b", ".a", "a.", "a-b", "a b", "é", "a;b", "a'",
        ] {
            assert!(!is_warm_module(Language::Python, bad), "{bad}");
        }
        assert!(!is_warm_module(
            Language::Python,
            &"a".repeat(MAX_MODULE_NAME_BYTES + 1)
        ));
    }

    #[test]
    fn javascript_module_names() {
        for good in [
            "lodash",
            "@scope/pkg",
            "lodash/fp",
            "sbx-demo",
            "a.b",
            "Left~pad",
        ] {
            assert!(is_warm_module(Language::Javascript, good), "{good}");
        }
        for bad in [
            "", "@scope", "@/x", "./x", "../x", "/abs", "a/../b", "a//b", "a/", "_x", "a b",
            "a\"b", "node:fs", "@@a/b",
        ] {
            assert!(!is_warm_module(Language::Javascript, bad), "{bad}");
        }
    }

    #[test]
    fn raw_takes_no_modules() {
        assert!(!is_warm_module(Language::Raw, "bash"));
    }
}
