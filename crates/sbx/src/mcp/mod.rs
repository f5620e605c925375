//! `sbx mcp`: a Model Context Protocol server (the official Rust SDK, `rmcp`) over stdio, or
//! over streamable HTTP on a loopback address with `--listen`.
//!
//! On stdio, stdout carries the protocol only: progress and logs go to stderr. Sessions belong
//! to the server and die with it (stdin closed, the HTTP listener stopped, or Ctrl-C).

mod sessions;
mod tools;

use std::net::SocketAddr;
use std::sync::Arc;

use rmcp::ServiceExt;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use crate::cli::McpArgs;
use crate::status;
use crate::{output, term};
pub use tools::Tools;

/// Runs `sbx mcp` until its client goes away; returns the exit status.
pub async fn mcp(args: McpArgs) -> u8 {
    let scheduler = match status::scheduler_from_env(|_| {}) {
        Ok(scheduler) => scheduler,
        Err(e) => {
            output::print_usage_error(&e);
            return e.status();
        }
    };
    let tools = Tools::new(
        scheduler.clone(),
        args.max_sessions,
        args.session_idle_timeout,
    );
    let outcome = match args.listen {
        None => serve_stdio(tools.clone()).await,
        Some(address) => serve_http(tools.clone(), address, args.log.quiet).await,
    };
    tools.close_all().await;
    scheduler.shutdown().await;
    match outcome {
        Ok(()) => 0,
        Err(e) => {
            output::print_error(Some("the MCP server stopped"), e.as_ref(), None);
            status::SANDBOX_ERROR
        }
    }
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

async fn serve_stdio(tools: Tools) -> Result<(), Failure> {
    let running = tools.serve(rmcp::transport::stdio()).await?;
    tokio::select! {
        ended = running.waiting() => { ended?; }
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

async fn serve_http(tools: Tools, address: SocketAddr, quiet: bool) -> Result<(), Failure> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let config = StreamableHttpServerConfig::default()
        // Browsers' requests carry an Origin: none is accepted (no page may drive the server).
        .enforce_origin_validation();
    let service = StreamableHttpService::new(
        move || Ok(tools.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    if !quiet {
        term::step(&format!("MCP server on http://{bound}/mcp"));
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
