//! A Python session: interpreter state carried from one execution to the next, and files
//! uploaded, transformed in the sandbox, downloaded and listed.
//!
//! ```text
//! cargo run --release --example session
//! ```

#![expect(clippy::print_stdout, reason = "an example prints its results")]

use exec_sandbox::{ExecOptions, Language, Scheduler, SchedulerConfig, SessionOptions};

#[tokio::main]
async fn main() -> Result<(), exec_sandbox::Error> {
    let scheduler = Scheduler::new(SchedulerConfig::from_env()?)?;
    let session = scheduler
        .session(SessionOptions::new(Language::Python))
        .await?;
    for code in ["import math", "x = math.pi * 2", "print(f'{x:.4f}')"] {
        let result = session.exec(ExecOptions::new(code)).await?;
        print!("{}", result.stdout);
        assert_eq!(result.exit_code, 0, "{}", result.stderr);
    }

    let csv = b"name,score\nada,36\ngrace,42\n";
    session
        .write_file("data/scores.csv", &csv[..], Some(csv.len() as u64), false)
        .await?;
    let transform = "import csv\n\
        rows = list(csv.DictReader(open('data/scores.csv')))\n\
        with open('data/report.txt', 'w') as out:\n\
        \x20   for r in rows:\n\
        \x20       out.write(f\"{r['name'].upper()} {int(r['score']) * 2}\\n\")";
    let result = session.exec(ExecOptions::new(transform)).await?;
    assert_eq!(result.exit_code, 0, "{}", result.stderr);
    let mut report = Vec::new();
    session.read_file("data/report.txt", &mut report).await?;
    print!("{}", String::from_utf8_lossy(&report));
    for entry in session.list_files("data").await? {
        let kind = if entry.is_dir { "dir" } else { "file" };
        println!("{kind} {} ({} bytes)", entry.name, entry.size);
    }

    println!("executions: {}", session.exec_count());
    session.close().await;
    scheduler.shutdown().await;
    Ok(())
}
