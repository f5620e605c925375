//! Gateway throughput and per-connection latency, against a loopback fixture.
//!
//! `cargo run --release --example network_throughput [-- MB [SAMPLES]]`
//!
//! Starts an HTTP server on 127.0.0.1 in this process (named `fixture.test` for the VM through
//! the operator's static DNS entries, with host-internal destinations allowed), then in one VM
//! under the allowlist `fixture.test`:
//! - downloads MB megabytes (default 64) three times with curl, through the gateway;
//! - fetches a 2-byte page SAMPLES times (default 20), each on a new connection, and reports
//!   curl's time from connecting to the first byte (TCP handshake with the gateway, the name
//!   check, the gateway's own host connection, the answer) and, apart, its DNS lookup time.
//!
//! The same two measurements from the host straight to the fixture, in the same run, are the
//! baseline. Prints numbers; never fails on speed.

#![allow(clippy::print_stdout)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use exec_sandbox::{Language, RunOptions, Scheduler, SchedulerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mb: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let samples: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let big = std::sync::Arc::new(vec![0x5a_u8; mb << 20]);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let big = big.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 2048];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body: &[u8] = if head.starts_with(b"GET /big") {
                    &big
                } else {
                    b"ok"
                };
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(header.as_bytes()).await;
                let _ = stream.write_all(body).await;
            });
        }
    });

    // Baseline: the host itself, same fixture, same requests.
    let mut host_ttfb = Vec::new();
    for _ in 0..samples {
        let started = Instant::now();
        fetch(port, "/small", true).await?;
        host_ttfb.push(started.elapsed());
    }
    let started = Instant::now();
    let bytes = fetch(port, "/big", false).await?;
    let host_mbps = bytes as f64 / 1e6 / started.elapsed().as_secs_f64();

    let mut config = SchedulerConfig::from_env()?;
    config.network_allow_internal = true;
    config.network_hosts = vec![("fixture.test".into(), Ipv4Addr::LOCALHOST)];
    let scheduler = Scheduler::new(config)?;
    let code = format!(
        "url=http://fixture.test:{port}\n\
         curl -s -o /dev/null $url/small\n\
         for i in 1 2 3; do curl -s -o /dev/null -w 'big %{{size_download}} %{{time_total}}\\n' $url/big; done\n\
         for i in $(seq {samples}); do curl -s -o /dev/null -w 'small %{{time_namelookup}} %{{time_starttransfer}}\\n' $url/small; done\n"
    );
    let result = scheduler
        .run(
            RunOptions::new(Language::Raw, code)
                .allow_network()
                .allowed_domains(["fixture.test"])
                .memory_mb(512)
                .timeout_seconds(300),
        )
        .await?;
    let mut guest_mbps = Vec::new();
    let mut guest_ttfb = Vec::new();
    let mut guest_dns = Vec::new();
    for line in result.stdout.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["big", size, secs] => {
                let (size, secs): (f64, f64) = (size.parse()?, secs.parse()?);
                guest_mbps.push(size / 1e6 / secs);
            }
            ["small", dns, first_byte] => {
                let (dns, first_byte): (f64, f64) = (dns.parse()?, first_byte.parse()?);
                guest_dns.push(Duration::from_secs_f64(dns));
                guest_ttfb.push(Duration::from_secs_f64(first_byte - dns));
            }
            _ => {}
        }
    }
    if guest_mbps.is_empty() || guest_ttfb.is_empty() {
        return Err(format!("the guest measured nothing: {result:?}").into());
    }
    guest_mbps.sort_by(f64::total_cmp);
    host_ttfb.sort();
    guest_ttfb.sort();
    guest_dns.sort();
    println!(
        "accelerator: {} ({})",
        result.accelerator.accelerator, result.accelerator.reason
    );
    println!(
        "download {mb} MB: guest via gateway median {:.1} MB/s (runs: {}), host direct {:.1} MB/s, ratio {:.3}",
        guest_mbps[guest_mbps.len() / 2],
        guest_mbps
            .iter()
            .map(|m| format!("{m:.1}"))
            .collect::<Vec<_>>()
            .join(", "),
        host_mbps,
        guest_mbps[guest_mbps.len() / 2] / host_mbps
    );
    let (g50, g95) = (pct(&guest_ttfb, 50), pct(&guest_ttfb, 95));
    let (h50, h95) = (pct(&host_ttfb, 50), pct(&host_ttfb, 95));
    println!(
        "new connection to first byte ({samples} samples): guest via gateway p50 {:.1} ms p95 {:.1} ms; host direct p50 {:.2} ms p95 {:.2} ms; added p50 {:.1} ms",
        ms(g50),
        ms(g95),
        ms(h50),
        ms(h95),
        ms(g50) - ms(h50)
    );
    println!(
        "DNS answer from the gateway in the guest: p50 {:.1} ms p95 {:.1} ms",
        ms(pct(&guest_dns, 50)),
        ms(pct(&guest_dns, 95))
    );
    Ok(())
}

/// GETs `path` from the fixture on a new connection; returns the bytes read: the first chunk
/// only when `first_byte_only`, else everything until the server closes.
async fn fetch(port: u16, path: &str, first_byte_only: bool) -> std::io::Result<usize> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: fixture.test\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = stream.read(&mut buf).await?;
        total += n;
        if n == 0 || first_byte_only {
            return Ok(total);
        }
    }
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
