//! `sbx mcp` driven by a real MCP client (the official Rust SDK's, over the server's stdin and
//! stdout as an MCP host does it): initialize, list the tools, run code, a session round trip
//! with files, and invalid arguments answered with tool errors while the server carries on.
//! Plus the streamable HTTP transport on loopback, and its refusal of other addresses.

use std::time::Duration;

use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::TokioChildProcess;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

type Client = RunningService<RoleClient, ()>;

fn server_command(extra: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(assert_cmd::cargo::cargo_bin("sbx"));
    cmd.arg("mcp")
        .args(extra)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    cmd
}

/// A client connected to a new `sbx mcp` subprocess, and that process's pid.
async fn connect(extra: &[&str]) -> (Client, u32) {
    let transport = TokioChildProcess::new(server_command(extra)).expect("spawn sbx mcp");
    let pid = transport.id().expect("the server's pid");
    (().serve(transport).await.expect("MCP initialize"), pid)
}

async fn call(client: &Client, tool: &'static str, arguments: Value) -> CallToolResult {
    let Value::Object(arguments) = arguments else {
        panic!("arguments must be an object")
    };
    client
        .call_tool(CallToolRequestParams::new(tool).with_arguments(arguments))
        .await
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
}

/// The structured content of a successful call.
fn ok(result: CallToolResult) -> Value {
    assert_eq!(result.is_error, Some(false), "{result:?}");
    result.structured_content.expect("structured content")
}

/// The error message of a tool error.
fn refused(result: CallToolResult) -> String {
    assert_eq!(result.is_error, Some(true), "{result:?}");
    let content = result.structured_content.expect("structured content");
    content["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {content}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_runs_code_and_holds_a_session_through_stdio() {
    let (client, _) = connect(&[]).await;
    let info = client.peer_info().expect("server info");
    assert_eq!(
        info.server_info.as_ref().map(|i| i.name.as_str()),
        Some("sbx")
    );

    let tools = client.list_all_tools().await.expect("tools/list");
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "list_files",
            "read_file",
            "run_code",
            "session_close",
            "session_exec",
            "session_start",
            "write_file"
        ]
    );
    let run_code = tools.iter().find(|t| t.name == "run_code").unwrap();
    let required = run_code
        .input_schema
        .get("required")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        required,
        json!(["language", "code"]),
        "{:?}",
        run_code.input_schema
    );

    let result = ok(call(
        &client,
        "run_code",
        json!({"language": "python", "code": "print(6 * 7)"}),
    )
    .await);
    assert_eq!(result["stdout"], "42\n", "{result}");
    assert_eq!(result["exit_code"], 0);
    assert!(result["timing"]["total_ms"].as_u64().is_some(), "{result}");
    assert!(result["network_refusals"].is_array(), "{result}");

    // A session keeps state and files between calls.
    let started = ok(call(&client, "session_start", json!({"language": "python"})).await);
    let id = started["session_id"]
        .as_str()
        .expect("session_id")
        .to_string();
    ok(call(
        &client,
        "session_exec",
        json!({"session_id": id, "code": "x = 6"}),
    )
    .await);
    let r = ok(call(
        &client,
        "session_exec",
        json!({"session_id": id, "code": "print(x * 7)"}),
    )
    .await);
    assert_eq!(r["stdout"], "42\n", "{r}");
    let w = ok(call(
        &client,
        "write_file",
        json!({"session_id": id, "path": "data/in.txt", "content": "hello"}),
    )
    .await);
    assert_eq!(w["bytes"], 5);
    let b = ok(call(
        &client,
        "write_file",
        json!({"session_id": id, "path": "data/bin", "content_base64": "AP8="}),
    )
    .await);
    assert_eq!(b["bytes"], 2);
    let listed = ok(call(
        &client,
        "list_files",
        json!({"session_id": id, "path": "data"}),
    )
    .await);
    // Sizes are what the files occupy (whole blocks), as the library reports them.
    let mut entries: Vec<(String, bool)> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["is_dir"].as_bool().unwrap(),
            )
        })
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [("bin".to_string(), false), ("in.txt".to_string(), false)]
    );
    let text = ok(call(
        &client,
        "read_file",
        json!({"session_id": id, "path": "data/in.txt"}),
    )
    .await);
    assert_eq!(text["content"], "hello");
    let binary = ok(call(
        &client,
        "read_file",
        json!({"session_id": id, "path": "data/bin"}),
    )
    .await);
    assert_eq!(binary["content_base64"], "AP8=");
    let r = ok(call(
        &client,
        "session_exec",
        json!({"session_id": id, "code": "print(open('data/in.txt').read())"}),
    )
    .await);
    assert_eq!(r["stdout"], "hello\n");
    let closed = ok(call(&client, "session_close", json!({"session_id": id})).await);
    assert_eq!(closed["exec_count"], 3);
    let gone = refused(
        call(
            &client,
            "session_exec",
            json!({"session_id": id, "code": "1"}),
        )
        .await,
    );
    assert!(gone.starts_with("session_id: no open session"), "{gone}");

    // Invalid arguments are tool errors naming the field; the server carries on.
    let language = refused(
        call(
            &client,
            "run_code",
            json!({"language": "cobol", "code": "1"}),
        )
        .await,
    );
    assert!(language.starts_with("language:"), "{language}");
    let timeout = refused(
        call(
            &client,
            "run_code",
            json!({"language": "raw", "code": "true", "timeout_seconds": 9999}),
        )
        .await,
    );
    assert!(timeout.contains("timeout"), "{timeout}");
    let env = refused(
        call(
            &client,
            "run_code",
            json!({"language": "raw", "code": "true", "env_vars": {"LD_PRELOAD": "x"}}),
        )
        .await,
    );
    assert!(env.contains("LD_PRELOAD"), "{env}");
    let both = refused(
        call(
            &client,
            "write_file",
            json!({"session_id": "x", "path": "a", "content": "1", "content_base64": "MQ=="}),
        )
        .await,
    );
    assert!(
        both.contains("exactly one of content and content_base64"),
        "{both}"
    );
    // A call that does not match the schema is a tool error too (the SDK's), not a crash.
    let missing = call(&client, "run_code", json!({"language": "python"})).await;
    assert_eq!(missing.is_error, Some(true), "{missing:?}");
    assert!(
        format!("{:?}", missing.content).contains("missing field `code`"),
        "{missing:?}"
    );
    let again = ok(call(
        &client,
        "run_code",
        json!({"language": "raw", "code": "echo still here"}),
    )
    .await);
    assert_eq!(again["stdout"], "still here\n");
    client.cancel().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_limited_per_server_and_die_with_it() {
    let (client, server) = connect(&["--max-sessions", "1"]).await;
    let first = ok(call(&client, "session_start", json!({"language": "raw"})).await);
    let full = refused(call(&client, "session_start", json!({"language": "raw"})).await);
    assert!(full.contains("already holds 1 sessions"), "{full}");
    let id = first["session_id"].as_str().unwrap().to_string();
    let r = ok(call(
        &client,
        "session_exec",
        json!({"session_id": id, "code": "echo alive"}),
    )
    .await);
    assert_eq!(r["stdout"], "alive\n");
    assert!(
        !exec_sandbox::testing::qemus_of_process(server).is_empty(),
        "the session's QEMU"
    );
    // The client hanging up ends the server, and the server's end destroys the session's VM.
    client.cancel().await.expect("shutdown");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&format!("/proc/{server}")).exists()
        || !exec_sandbox::testing::qemus_of_process(server).is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "sbx mcp {server} or its QEMU outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamable_http_serves_on_loopback_only() {
    // Another address is a usage error before anything starts.
    let output = server_command(&["--listen", "0.0.0.0:8765"])
        .output()
        .await
        .expect("sbx mcp");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");

    let mut server = server_command(&["--listen", "127.0.0.1:0"]);
    server.stderr(std::process::Stdio::piped());
    let mut child = server.spawn().expect("sbx mcp --listen");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.split("MCP server on ").nth(1) {
                return url.trim().to_string();
            }
        }
        panic!("sbx mcp --listen ended without its address");
    })
    .await
    .expect("the server's address within 60 s");
    let authority = url
        .strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix("/mcp"))
        .unwrap_or_else(|| panic!("{url}"));
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-03-26", "capabilities": {},
                   "clientInfo": {"name": "raw-http-test", "version": "1"}}
    })
    .to_string();
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    // An SSE response stays open: read until the result is in.
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            response.push_str(&String::from_utf8_lossy(&buf[..n]));
            if response.contains("\"serverInfo\"") {
                break;
            }
        }
    })
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"name\":\"sbx\""), "{response}");
    child.kill().await.ok();
}
