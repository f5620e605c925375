//! `sbx bench --packages`: what packages cost (Python; numpy and pandas from the host's
//! configured index). The first install of each into an empty layer cache; cold runs with the
//! layer cached (L2) against plain cold runs; runs restored from the package set's memory
//! snapshot against plain restored runs; and the user's `import numpy` in a restored VM, timed
//! by the guest. Numbers only: nothing here passes or fails on speed.

use std::collections::BTreeMap;

use exec_sandbox::{Language, PackageSource, RunOptions, SchedulerConfig};
use serde::Serialize;

use crate::bench::{Percentiles, round1, round2, scheduler, sequential_runs, step};
use crate::cli::BenchArgs;

const NUMPY: &str = "numpy==2.1.3";
const PANDAS: &str = "pandas==2.2.3";

/// What `--packages` measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PackagesReport {
    /// First install of numpy into an empty layer cache (pip's own download cache may be warm).
    pub numpy_install_ms: Option<u64>,
    /// First install of pandas (with numpy and its other dependencies).
    pub pandas_install_ms: Option<u64>,
    /// Plain cold runs (no L1, no pool).
    pub cold_plain_ms: Option<Percentiles>,
    /// Cold runs of the same program with numpy's layer (from the L2 cache) attached.
    pub cold_l2_numpy_ms: Option<Percentiles>,
    /// Plain runs restored from L1.
    pub l1_plain_ms: Option<Percentiles>,
    /// Runs of the same program with numpy, restored from its package set's L1 snapshot.
    pub l1_numpy_ms: Option<Percentiles>,
    /// `import numpy` in a VM restored with numpy, timed in the guest.
    pub import_numpy_restored_ms: Option<Percentiles>,
}

impl PackagesReport {
    /// `packages_cold_l2_vs_plain` (goal ≤ 1.2) and `packages_l1_vs_plain_l1` (goal ≤ 1.5).
    pub fn ratios(&self) -> BTreeMap<String, f64> {
        let mut ratios = BTreeMap::new();
        if let (Some(with), Some(plain)) = (self.cold_l2_numpy_ms, self.cold_plain_ms) {
            ratios.insert(
                "packages_cold_l2_vs_plain".into(),
                round2(with.p50 / plain.p50),
            );
        }
        if let (Some(with), Some(plain)) = (self.l1_numpy_ms, self.l1_plain_ms) {
            ratios.insert(
                "packages_l1_vs_plain_l1".into(),
                round2(with.p50 / plain.p50),
            );
        }
        ratios
    }

    /// The table lines.
    pub fn render(&self) -> String {
        let cell = |p: Option<Percentiles>| {
            p.map_or("-".to_string(), |p| format!("{:.0} / {:.0}", p.p50, p.p95))
        };
        let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v}"));
        format!(
            "\npackages (python)\n  first install ms: numpy {}, pandas {}\n  cold p50/p95 ms: plain {}, numpy from L2 {}\n  L1 p50/p95 ms: plain {}, numpy {}\n  import numpy in a restored VM p50/p95 ms: {}\n",
            ms(self.numpy_install_ms),
            ms(self.pandas_install_ms),
            cell(self.cold_plain_ms),
            cell(self.cold_l2_numpy_ms),
            cell(self.l1_plain_ms),
            cell(self.l1_numpy_ms),
            cell(self.import_numpy_restored_ms),
        )
    }
}

/// Measures the packages section.
pub async fn measure(
    args: &BenchArgs,
    base: &SchedulerConfig,
) -> Result<PackagesReport, exec_sandbox::Error> {
    let runs = args.runs;
    let mut report = PackagesReport::default();
    let python = Language::Python;

    // First installs, into a layer cache of their own.
    let empty = tempfile::Builder::new()
        .prefix("sbx-bench-packages-")
        .tempdir()
        .map_err(|e| {
            exec_sandbox::Error::from(exec_sandbox::ValidationError::Config {
                field: "package_cache_dir",
                reason: e.to_string(),
            })
        })?;
    let mut fresh = base.clone();
    fresh.package_cache_dir = empty.path().to_path_buf();
    let fresh = scheduler(&fresh, 0, false, 1)?;
    for (spec, slot) in [
        (NUMPY, &mut report.numpy_install_ms),
        (PANDAS, &mut report.pandas_install_ms),
    ] {
        step(args, &format!("packages: first install of {spec}"));
        let ready = fresh
            .prefetch_packages(python, &[spec.to_string()], false)
            .await?;
        *slot = ready.install_ms;
    }

    // Cold runs, plain and with numpy's layer cached (in the shared cache: ready it first).
    let cold = scheduler(base, 0, false, 1)?;
    cold.prefetch_packages(python, &[NUMPY.to_string()], false)
        .await?;
    step(args, &format!("packages: {runs} plain cold runs"));
    report.cold_plain_ms = sequential_runs(
        &cold,
        runs,
        || RunOptions::new(python, "print(1)"),
        |_| true,
    )
    .await?
    .wall();
    step(
        args,
        &format!("packages: {runs} cold runs with numpy from L2"),
    );
    report.cold_l2_numpy_ms = sequential_runs(
        &cold,
        runs,
        || RunOptions::new(python, "print(1)").packages([NUMPY]),
        |r| r.packages_source == PackageSource::L2,
    )
    .await?
    .wall();

    // Restored runs, plain and from numpy's package-set snapshot.
    let restored = scheduler(base, 0, true, 1)?;
    restored.prefetch_snapshots().await?;
    restored
        .prefetch_packages(python, &[NUMPY.to_string()], true)
        .await?;
    step(
        args,
        &format!("packages: {runs} plain runs restored from L1"),
    );
    report.l1_plain_ms = sequential_runs(
        &restored,
        runs,
        || RunOptions::new(python, "print(1)"),
        |r| r.l1_cache_hit,
    )
    .await?
    .wall();
    step(
        args,
        &format!("packages: {runs} runs with numpy restored from L1"),
    );
    report.l1_numpy_ms = sequential_runs(
        &restored,
        runs,
        || RunOptions::new(python, "print(1)").packages([NUMPY]),
        |r| r.l1_cache_hit,
    )
    .await?
    .wall();
    step(
        args,
        "packages: import numpy in restored VMs, timed in the guest",
    );
    let mut imports = Vec::with_capacity(runs);
    for _ in 0..runs {
        let r = restored
            .run(
                RunOptions::new(
                    python,
                    "import time\nt = time.perf_counter()\nimport numpy\nprint((time.perf_counter() - t) * 1000)",
                )
                .packages([NUMPY]),
            )
            .await?;
        match r.stdout.trim().parse::<f64>() {
            Ok(ms) if r.l1_cache_hit => imports.push(round1(ms)),
            _ => tracing::warn!(stdout = %r.stdout, stderr = %r.stderr, "import timing dropped"),
        }
    }
    report.import_numpy_restored_ms = Percentiles::of(&imports);
    Ok(report)
}
