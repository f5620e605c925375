//! `sbx cache`: what the local caches hold (L1 memory snapshots, L2 package layers, where L3
//! is), and emptying them.

use exec_sandbox::CacheReport;

use crate::cli::{CacheAction, CacheArgs};
use crate::status;
use crate::{output, term};

/// Runs `sbx cache` and returns the exit status.
pub async fn cache(args: CacheArgs) -> u8 {
    let scheduler = match status::scheduler_from_env(|_| {}) {
        Ok(scheduler) => scheduler,
        Err(e) => {
            output::print_usage_error(&e);
            return e.status();
        }
    };
    match args.action.unwrap_or(CacheAction::Show) {
        CacheAction::Show => {
            let report = scheduler.caches().await;
            if args.json {
                let line = serde_json::to_string(&report).expect("a report serializes");
                term::stdout(format!("{line}\n").as_bytes());
            } else {
                term::stdout(table(&report).as_bytes());
            }
        }
        CacheAction::Prune => {
            let pruned = scheduler.prune_caches().await;
            if args.json {
                let line = serde_json::to_string(&pruned).expect("a report serializes");
                term::stdout(format!("{line}\n").as_bytes());
            } else if !args.log.quiet {
                term::stderr_line(&format!(
                    "removed {} memory snapshot{}, {} package layer{} ({}), {} unused guest image \
                     version{} ({}) and {} unused QEMU build{} ({})",
                    pruned.snapshots,
                    plural(pruned.snapshots),
                    pruned.layers,
                    plural(pruned.layers),
                    human_bytes(pruned.layer_bytes),
                    pruned.image_versions,
                    plural(pruned.image_versions),
                    human_bytes(pruned.image_bytes),
                    pruned.qemu_builds,
                    plural(pruned.qemu_builds),
                    human_bytes(pruned.qemu_bytes)
                ));
            }
        }
    }
    status::SUCCESS
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The human table of a report.
fn table(report: &CacheReport) -> String {
    let mut out = String::new();
    match &report.snapshots {
        Some(l1) => out.push_str(&format!(
            "L1 memory snapshots  {:>4} entries  {:>9}  {}\n",
            l1.entries,
            human_bytes(l1.bytes),
            l1.dir.display()
        )),
        None => out.push_str("L1 memory snapshots  off\n"),
    }
    let l2 = &report.layers;
    out.push_str(&format!(
        "L2 package layers    {:>4} entries  {:>9}  {}\n",
        l2.entries,
        human_bytes(l2.bytes),
        l2.dir.display()
    ));
    for layer in &report.layer_entries {
        out.push_str(&format!(
            "  {} {:>9} {:>4} hits  {} ({} with dependencies)\n",
            &layer.key[..layer.key.len().min(12)],
            human_bytes(layer.bytes),
            layer.hits,
            layer.packages.join(" "),
            layer.closure_len
        ));
    }
    match &report.s3 {
        Some(location) => out.push_str(&format!("L3 S3                {location}\n")),
        None => out.push_str("L3 S3                not configured (EXEC_SANDBOX_S3_BUCKET)\n"),
    }
    for (name, unused) in [
        ("unused guest images", &report.unused_image_versions),
        ("unused QEMU builds ", &report.unused_qemu_builds),
    ] {
        out.push_str(&format!(
            "{name}  {:>4} entries  {:>9}  {} (sbx cache prune)\n",
            unused.entries,
            human_bytes(unused.bytes),
            unused.dir.display()
        ));
    }
    out
}

/// `12.3 MB`.
fn human_bytes(bytes: u64) -> String {
    const MB: f64 = 1024.0 * 1024.0;
    if bytes as f64 >= 1024.0 * MB {
        format!("{:.1} GB", bytes as f64 / 1024.0 / MB)
    } else {
        format!("{:.1} MB", bytes as f64 / MB)
    }
}
