//! Randomness across L1 clones: runs restored from one memory snapshot share the interpreter's
//! memory at the moment it was saved, PRNG states and kernel entropy pool included. Each clone
//! must still draw its own values, in all three languages, from every source a program would
//! use.

use std::collections::HashMap;

use exec_sandbox::{Language, RunOptions, Scheduler, SchedulerConfig};

use crate::support::{chain, outcome};

const PYTHON: &str = r#"
import os, random, secrets, uuid
print("os.urandom:", os.urandom(16).hex())
print("random.random:", random.random())
print("secrets.token_hex:", secrets.token_hex(16))
print("uuid4:", uuid.uuid4())
print("tempfile:", __import__("tempfile").mktemp())
"#;

const JAVASCRIPT: &str = r#"
const hex = (a: Uint8Array) => Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
console.log("crypto.getRandomValues:", hex(crypto.getRandomValues(new Uint8Array(16))));
console.log("Math.random:", Math.random());
console.log("crypto.randomUUID:", crypto.randomUUID());
"#;

const RAW: &str = r#"
echo "/dev/urandom: $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "RANDOM: $RANDOM-$RANDOM-$RANDOM"
echo "SRANDOM: $SRANDOM"
echo "mktemp: $(mktemp -u)"
"#;

/// Restored runs of each language.
const CLONES: usize = 3;

/// A scheduler with L1 on and its own snapshot cache (kept until the returned dir is dropped).
fn l1_scheduler() -> (Scheduler, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("sbx-l1-random-")
        .tempdir()
        .unwrap();
    let scheduler = Scheduler::new(SchedulerConfig {
        l1_snapshots: true,
        snapshot_cache_dir: dir.path().to_path_buf(),
        warm_pool_size: 0,
        ..SchedulerConfig::from_env().unwrap()
    })
    .unwrap();
    (scheduler, dir)
}

#[tokio::test]
async fn every_l1_clone_draws_its_own_random_values() {
    let (scheduler, _dir) = l1_scheduler();
    let run = |language, code: &str| {
        let scheduler = scheduler.clone();
        let options = RunOptions::new(language, code);
        async move {
            scheduler
                .run(options)
                .await
                .unwrap_or_else(|e| panic!("run failed: {}", chain(&e)))
        }
    };
    for (language, code, sources) in [
        (
            Language::Python,
            PYTHON,
            &[
                "os.urandom",
                "random.random",
                "secrets.token_hex",
                "uuid4",
                "tempfile",
            ][..],
        ),
        (
            Language::Javascript,
            JAVASCRIPT,
            &["crypto.getRandomValues", "Math.random", "crypto.randomUUID"][..],
        ),
        (
            Language::Raw,
            RAW,
            &["/dev/urandom", "RANDOM", "SRANDOM", "mktemp"][..],
        ),
    ] {
        // A cold boot saves the template the next runs are restored from.
        let cold = run(language, code).await;
        assert_eq!(cold.exit_code, 0, "{cold:?}");
        assert!(!cold.l1_cache_hit, "a fresh cache boots: {cold:?}");
        scheduler.wait_for_snapshots().await;

        let mut seen: HashMap<&str, Vec<String>> = HashMap::new();
        for _ in 0..CLONES {
            let r = run(language, code).await;
            assert_eq!(r.exit_code, 0, "{r:?}");
            assert!(r.l1_cache_hit, "{language:?}: not restored: {r:?}");
            for source in sources {
                let value = outcome(&r, source).to_string();
                assert!(value.len() >= 5, "{language:?} {source}: {value:?}");
                seen.entry(source).or_default().push(value);
            }
        }
        for (source, values) in seen {
            let mut distinct = values.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(
                distinct.len(),
                CLONES,
                "{language:?} {source}: clones repeat values: {values:?}"
            );
        }
    }
}

/// What a process drew once at its start is drawn once for every clone: the str hash key
/// (SipHash, so every clone's dicts are open to the same hash-flooding inputs) and the address
/// space layout (ASLR). Both are inherent to restoring a warm interpreter; kept as a record of
/// the gap, to run with `--ignored`.
#[tokio::test]
#[ignore = "known gap: L1 clones share the interpreter's hash key and memory layout"]
async fn l1_clones_share_the_hash_key_and_the_memory_layout() {
    let (scheduler, _dir) = l1_scheduler();
    let code = r#"
print("hash:", hash("x"))
print("heap:", [l.split()[0] for l in open("/proc/self/maps") if "[heap]" in l][0])
print("object:", hex(id(object())))
"#;
    let run = || async {
        scheduler
            .run(RunOptions::new(Language::Python, code))
            .await
            .unwrap_or_else(|e| panic!("run failed: {}", chain(&e)))
    };
    assert!(!run().await.l1_cache_hit);
    scheduler.wait_for_snapshots().await;
    let (a, b) = (run().await, run().await);
    assert!(a.l1_cache_hit && b.l1_cache_hit, "{a:?}\n{b:?}");
    for source in ["hash", "heap", "object"] {
        assert_ne!(
            outcome(&a, source),
            outcome(&b, source),
            "{source} is the same in two clones"
        );
    }
}
