//! The whole command line, in one place: every subcommand, flag, default and value check.

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use exec_sandbox::{ExposePort, Language, NetworkOptions, limits, validate};

/// Run untrusted Python, JavaScript/TypeScript and shell code in disposable QEMU microVMs.
#[derive(Debug, Parser)]
#[command(name = "sbx", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run code in a fresh microVM, one per source.
    #[command(after_long_help = RUN_AFTER_HELP)]
    Run(Box<RunArgs>),
    /// Build or verify every guest asset and exec-sandbox's QEMU and decide the accelerator, so
    /// later runs start at once.
    Prefetch(PrefetchArgs),
    /// Show what the local caches hold (memory snapshots, package layers, unused guest images and
    /// QEMU builds), or empty them.
    Cache(CacheArgs),
    /// Measure run latency per language (cold, L1-restored, warm pool) against the language's
    /// own interpreter on the host (`python3 -c pass`, `node -e 0`, `bash -c :`), throughput, and
    /// idle VM memory. Prints numbers; never fails on speed.
    Bench(BenchArgs),
    /// Serve the sandbox to AI agents as a Model Context Protocol server: on stdin/stdout, or
    /// over streamable HTTP with --listen.
    #[command(after_long_help = MCP_AFTER_HELP)]
    Mcp(McpArgs),
}

const MCP_AFTER_HELP: &str = "\
Tools: run_code, session_start, session_exec, session_close, write_file, read_file,
list_files. Sessions belong to the server and are closed when it stops.

An MCP host starts it as a subprocess, e.g. in its JSON configuration:
  {\"mcpServers\": {\"sbx\": {\"command\": \"sbx\", \"args\": [\"mcp\"]}}}";

const RUN_AFTER_HELP: &str = "\
Sources:
  -             read the code from stdin (at most once)
  FILE          an existing file; the language comes from its extension
                (.py python; .js .mjs .ts javascript; .sh raw) unless -l is given
  CODE          anything else is the code itself

An argument that ends in one of those extensions but names no file is an error, not code.
Several sources run concurrently; each one's output is printed as one block, in order.

Network:
  By default the sandbox has no network device at all. --network lets the code connect out
  through a gateway in this process that enforces the policy; --allow-domain narrows that to
  the listed domains and their subdomains (and implies --network). --expose forwards a port
  on 127.0.0.1 into the sandbox, with or without --network; each one is printed on stderr as
  soon as it is bound (`sbx: port 8000/tcp -> http://127.0.0.1:41234`, not with -q) and
  listed in --json as `exposed_ports`. Code in the sandbox may listen on any port, 80 too.

Exit status:
  the program's own (with several sources, the first non-zero one in order)
  124 the timeout fired, 125 sandbox failure, 2 usage error, 130 interrupted (Ctrl-C)
  An exit code outside 0-255 is reduced to its low 8 bits like a shell does, and a
  non-zero code whose low 8 bits are zero becomes 1.";

/// Flags of `sbx run`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("input").required(true).multiple(true).args(["sources", "code"]))]
pub struct RunArgs {
    /// Code, a file, or `-` for stdin (see below).
    #[arg(value_name = "SOURCE")]
    pub sources: Vec<String>,

    /// Code to run, even if it looks like a file name (repeatable; each one is a source).
    #[arg(
        short = 'c',
        long = "code",
        value_name = "CODE",
        allow_hyphen_values = true
    )]
    pub code: Vec<String>,

    /// Language of every source: python, javascript or raw (also py, js, ts, typescript, sh,
    /// bash, shell). Default: from the file extension, else python.
    #[arg(short, long, value_name = "LANG", value_parser = parse_language)]
    pub language: Option<Language>,

    /// Execution timeout in seconds, 1-300 [default: 30, or EXEC_SANDBOX_DEFAULT_TIMEOUT_SECONDS].
    #[arg(short, long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<u64>,

    /// Guest memory in MB, at least 128 [default: 256, or EXEC_SANDBOX_DEFAULT_MEMORY_MB].
    #[arg(short, long, value_name = "MB", value_parser = parse_memory)]
    pub memory: Option<u32>,

    /// Copy a local file into the sandbox before the code runs; GUEST is relative to
    /// /home/user (repeatable; needs exactly one source).
    #[arg(long = "upload", value_name = "LOCAL:GUEST", value_parser = crate::transfer::parse_upload)]
    pub uploads: Vec<crate::transfer::Upload>,

    /// Copy a sandbox file out after the code ran; LOCAL defaults to the file's name in the
    /// current directory (repeatable; needs exactly one source).
    #[arg(long = "download", value_name = "GUEST[:LOCAL]", value_parser = crate::transfer::parse_download)]
    pub downloads: Vec<crate::transfer::Download>,

    /// Let the code open outbound connections, through the host's gateway and its policy.
    /// Without this (or --allow-domain) the sandbox has no network at all.
    #[arg(long)]
    pub network: bool,

    /// Allow outbound connections only to DOMAIN and its subdomains (repeatable, at most
    /// 100); implies --network.
    #[arg(long = "allow-domain", value_name = "DOMAIN", value_parser = parse_domain)]
    pub allow_domains: Vec<String>,

    /// Forward 127.0.0.1:EXTERNAL on the host to port INTERNAL in the sandbox (repeatable, at
    /// most 10). EXTERNAL is 1024-65535, or any free port when omitted or 0; PROTOCOL is tcp
    /// (default) or udp. Needs no --network.
    #[arg(
        long = "expose",
        value_name = "INTERNAL[:EXTERNAL][/PROTOCOL]",
        value_parser = parse_expose
    )]
    pub expose: Vec<ExposePort>,

    /// A package for the code to import: `name==version` (python) or `name@version`
    /// (javascript), or a range (`pandas>=2,<3`, `lodash@^4`) resolved on the host
    /// (repeatable, at most 50). Installed on the host without running package code and
    /// attached read-only: the sandbox needs no network for it.
    #[arg(short = 'p', long = "package", value_name = "SPEC")]
    pub packages: Vec<String>,

    /// Allow packages outside each ecosystem's 10,000 most-downloaded (the syntax rules still
    /// apply).
    #[arg(long)]
    pub no_validation: bool,

    /// Environment variable for the program (repeatable; the last of a name wins).
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,

    /// Print one JSON object per source (JSON Lines) on stdout instead of the program's output.
    #[arg(long)]
    pub json: bool,

    /// How much goes to stderr.
    #[command(flatten)]
    pub log: LogArgs,

    /// Most sources running at once.
    #[arg(
        short = 'j',
        long,
        value_name = "N",
        default_value_t = limits::DEFAULT_MAX_CONCURRENT_VMS,
        value_parser = parse_concurrency,
    )]
    pub concurrency: usize,

    /// Sources and `-c` codes, in the order they appeared on the command line.
    #[arg(skip)]
    pub inputs: Vec<Input>,
}

/// Flags of `sbx prefetch`.
#[derive(Debug, Args)]
pub struct PrefetchArgs {
    /// How much goes to stderr.
    #[command(flatten)]
    pub log: LogArgs,

    /// Also save a memory snapshot (warm template) per language, so that the first runs
    /// restore instead of booting; with -p, of a VM with those packages.
    #[arg(long)]
    pub snapshots: bool,

    /// Ready the layer of these packages too (repeatable; needs -l), so the first run with the
    /// same set starts as fast as a plain one.
    #[arg(
        short = 'p',
        long = "package",
        value_name = "SPEC",
        requires = "language"
    )]
    pub packages: Vec<String>,

    /// The language of the -p packages: python or javascript.
    #[arg(short, long, value_name = "LANG", value_parser = parse_language)]
    pub language: Option<Language>,

    /// Allow packages outside each ecosystem's 10,000 most-downloaded.
    #[arg(long)]
    pub no_validation: bool,
}

/// Flags of `sbx cache`.
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// What to do (default: show).
    #[command(subcommand)]
    pub action: Option<CacheAction>,

    /// Print one JSON object on stdout instead of a table.
    #[arg(long, global = true)]
    pub json: bool,

    /// How much goes to stderr.
    #[command(flatten)]
    pub log: LogArgs,
}

/// What `sbx cache` does.
#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Each cache level: entries and bytes (the default).
    Show,
    /// Empty the local memory snapshot and package layer caches, and remove guest image versions
    /// and QEMU builds other than the ones in use (QEMU's as root only). A long-running process
    /// of another exec-sandbox version fails its next VM start until restarted.
    Prune,
}

/// Flags of `sbx mcp`.
#[derive(Debug, Args)]
pub struct McpArgs {
    /// Serve streamable HTTP at http://ADDR/mcp instead of stdio (a loopback address only:
    /// the server has no authentication).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub listen: Option<std::net::SocketAddr>,

    /// Sessions open at once, over all clients.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_max_sessions)]
    pub max_sessions: usize,

    /// Seconds without any call after which a session closes itself (10-3600).
    #[arg(long, value_name = "SECONDS", default_value_t = limits::DEFAULT_SESSION_IDLE_TIMEOUT_SECONDS, value_parser = parse_idle_timeout)]
    pub session_idle_timeout: u64,

    /// How much goes to stderr.
    #[command(flatten)]
    pub log: LogArgs,
}

fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    let address: std::net::SocketAddr = s
        .parse()
        .map_err(|_| format!("`{s}` is not IP:PORT (e.g. 127.0.0.1:8765)"))?;
    if !address.ip().is_loopback() {
        return Err(format!(
            "`{s}` is not a loopback address: the MCP server has no authentication, so it listens on 127.0.0.1 or ::1 only"
        ));
    }
    Ok(address)
}

fn parse_max_sessions(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=limits::MAX_CONCURRENT_VMS).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{s}` is not a number of sessions between 1 and {}",
            limits::MAX_CONCURRENT_VMS
        )),
    }
}

fn parse_idle_timeout(s: &str) -> Result<u64, String> {
    let seconds: u64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number of seconds"))?;
    validate::idle_timeout(seconds).map_err(|e| e.to_string())?;
    Ok(seconds)
}

/// The stderr verbosity flags every subcommand shares.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Nothing on stderr but errors: no progress, no headers, no summary.
    #[arg(short, long, conflicts_with = "debug")]
    pub quiet: bool,

    /// Debug logs on stderr, and for `run` the VM console (boot log).
    #[arg(long)]
    pub debug: bool,
}

/// Flags of `sbx bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Runs per measurement (p50/p95 are taken over them).
    #[arg(short = 'n', long, value_name = "N", default_value_t = 10, value_parser = parse_runs)]
    pub runs: usize,

    /// Only these languages (repeatable; default: all three).
    #[arg(short, long, value_name = "LANG", value_parser = parse_language)]
    pub language: Vec<Language>,

    /// Print the report as one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Also measure packages (Python: numpy and pandas from the host's configured index): the
    /// first install, cold and L1 runs with a cached layer against plain ones, and `import
    /// numpy` in a restored VM.
    #[arg(long)]
    pub packages: bool,

    /// How much goes to stderr.
    #[command(flatten)]
    pub log: LogArgs,
}

fn parse_runs(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=1000).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{text}` is not a number of runs between 1 and 1000"
        )),
    }
}

/// One thing to run, as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A positional SOURCE: `-`, a file, or code.
    Source(String),
    /// A `-c CODE`: always code.
    Code(String),
}

impl Cli {
    /// Parses `args` (including the program name), keeping the command-line order of sources.
    ///
    /// Errors are clap's, with its exit status: 2 for usage errors, 0 for `--help`/`--version`.
    pub fn parse_from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command().try_get_matches_from(args)?;
        let mut cli = Self::from_arg_matches(&matches)?;
        if let (Command::Run(run), Some(("run", sub))) = (&mut cli.command, matches.subcommand()) {
            run.inputs = ordered_inputs(sub);
        }
        Ok(cli)
    }
}

/// Merges positional sources and `-c` codes back into the order they were typed.
fn ordered_inputs(matches: &clap::ArgMatches) -> Vec<Input> {
    fn indexed(
        matches: &clap::ArgMatches,
        id: &str,
        make: fn(String) -> Input,
    ) -> Vec<(usize, Input)> {
        match (matches.indices_of(id), matches.get_many::<String>(id)) {
            (Some(indices), Some(values)) => indices.zip(values.cloned().map(make)).collect(),
            _ => Vec::new(),
        }
    }
    let mut all = indexed(matches, "sources", Input::Source);
    all.extend(indexed(matches, "code", Input::Code));
    all.sort_by_key(|(index, _)| *index);
    all.into_iter().map(|(_, input)| input).collect()
}

fn parse_language(s: &str) -> Result<Language, String> {
    s.parse()
}

fn parse_timeout(s: &str) -> Result<u64, String> {
    let seconds: u64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number of seconds"))?;
    validate::timeout(seconds).map_err(|e| e.to_string())?;
    Ok(seconds)
}

fn parse_memory(s: &str) -> Result<u32, String> {
    let mb: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number of MB"))?;
    validate::memory(mb).map_err(|e| e.to_string())?;
    Ok(mb)
}

fn parse_concurrency(s: &str) -> Result<usize, String> {
    let range = limits::MIN_CONCURRENT_VMS..=limits::MAX_CONCURRENT_VMS;
    match s.parse::<usize>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(format!(
            "must be a number from {} to {}",
            range.start(),
            range.end()
        )),
    }
}

/// `KEY=VALUE`, split at the first `=`; the pair is checked against the library's rules here so
/// the error names the flag.
fn parse_env(s: &str) -> Result<(String, String), String> {
    let Some((name, value)) = s.split_once('=') else {
        return Err(format!("`{s}` is not KEY=VALUE"));
    };
    let pair = (name.to_string(), value.to_string());
    validate::env_vars(std::slice::from_ref(&pair)).map_err(|e| e.to_string())?;
    Ok(pair)
}

impl RunArgs {
    /// The network part of every run: `--allow-domain` implies `--network`.
    pub fn network_options(&self) -> NetworkOptions {
        let mut options = NetworkOptions::default();
        if self.network || !self.allow_domains.is_empty() {
            options = options.allow_network();
        }
        if !self.allow_domains.is_empty() {
            options = options.allowed_domains(self.allow_domains.iter().cloned());
        }
        self.expose
            .iter()
            .fold(options, |options, port| options.expose(*port))
    }
}

/// One `--allow-domain`, checked by the library's rules so the error names the flag.
fn parse_domain(s: &str) -> Result<String, String> {
    let one = NetworkOptions::default()
        .allow_network()
        .allowed_domains([s]);
    validate::network(&one).map_err(network_reason)?;
    Ok(s.to_string())
}

/// One `--expose`: its syntax, then the library's rules for a single port (host port range).
fn parse_expose(s: &str) -> Result<ExposePort, String> {
    let port: ExposePort = s
        .parse()
        .map_err(|e: exec_sandbox::ExposeParseError| e.to_string())?;
    let one = NetworkOptions::default().expose(port);
    validate::network(&one).map_err(network_reason)?;
    Ok(port)
}

/// What is wrong with a network value, without the library's field name (clap names the flag).
pub fn network_reason(error: validate::ValidationError) -> String {
    match error {
        validate::ValidationError::Network { reason, .. } => reason,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::parse_from_args(std::iter::once("sbx").chain(args.iter().copied()))
    }

    fn run(args: &[&str]) -> RunArgs {
        match parse(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
        {
            Command::Run(run) => *run,
            other => panic!("{other:?}"),
        }
    }

    fn usage_error(args: &[&str]) -> String {
        let e = parse(args).expect_err("should be a usage error");
        assert_eq!(e.exit_code(), 2, "{e}");
        e.to_string()
    }

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults() {
        let r = run(&["run", "print(1)"]);
        assert_eq!(r.inputs, vec![Input::Source("print(1)".into())]);
        assert_eq!(r.language, None);
        assert_eq!(r.timeout, None);
        assert_eq!(r.memory, None);
        assert!(r.env.is_empty());
        assert!(!r.json && !r.log.quiet && !r.log.debug);
        assert_eq!(r.concurrency, 10);
    }

    #[test]
    fn every_run_flag() {
        let r = run(&[
            "run", "-l", "js", "-t", "5", "-m", "512", "-e", "A=1", "--env", "B=x=y", "--json",
            "-q", "-j", "3", "a.ts",
        ]);
        assert_eq!(r.language, Some(Language::Javascript));
        assert_eq!(r.timeout, Some(5));
        assert_eq!(r.memory, Some(512));
        assert_eq!(
            r.env,
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert!(r.json && r.log.quiet);
        assert_eq!(r.concurrency, 3);
        let r = run(&[
            "run",
            "--language",
            "raw",
            "--timeout",
            "300",
            "--memory",
            "128",
            "--debug",
            "--concurrency",
            "100",
            "x",
        ]);
        assert_eq!(r.language, Some(Language::Raw));
        assert_eq!(
            (r.timeout, r.memory, r.concurrency),
            (Some(300), Some(128), 100)
        );
        assert!(r.log.debug);
    }

    #[test]
    fn language_aliases() {
        for (alias, language) in [
            ("python", Language::Python),
            ("py", Language::Python),
            ("javascript", Language::Javascript),
            ("js", Language::Javascript),
            ("ts", Language::Javascript),
            ("typescript", Language::Javascript),
            ("raw", Language::Raw),
            ("sh", Language::Raw),
            ("bash", Language::Raw),
            ("shell", Language::Raw),
            ("PY", Language::Python),
        ] {
            assert_eq!(
                run(&["run", "-l", alias, "x"]).language,
                Some(language),
                "{alias}"
            );
        }
        assert!(usage_error(&["run", "-l", "ruby", "x"]).contains("ruby"));
    }

    #[test]
    fn sources_and_codes_keep_their_order() {
        let r = run(&["run", "a.py", "-c", "print(2)", "-", "--code", "-1", "x"]);
        assert_eq!(
            r.inputs,
            vec![
                Input::Source("a.py".into()),
                Input::Code("print(2)".into()),
                Input::Source("-".into()),
                Input::Code("-1".into()),
                Input::Source("x".into()),
            ]
        );
        assert_eq!(run(&["run", "-c", "a", "-c", "b"]).inputs.len(), 2);
    }

    #[test]
    fn env_must_be_key_value_and_allowed() {
        assert!(usage_error(&["run", "-e", "BAD", "x"]).contains("KEY=VALUE"));
        assert!(usage_error(&["run", "-e", "=v", "x"]).contains("name is empty"));
        assert!(usage_error(&["run", "-e", "LD_PRELOAD=x", "x"]).contains("LD_PRELOAD"));
        assert!(usage_error(&["run", "-e", "A=a\nb", "x"]).contains("U+000A"));
        assert_eq!(
            run(&["run", "-e", "EMPTY=", "x"]).env,
            vec![("EMPTY".into(), String::new())]
        );
    }

    #[test]
    fn numbers_are_range_checked() {
        assert!(usage_error(&["run", "-t", "0", "x"]).contains("1-300"));
        assert!(usage_error(&["run", "-t", "301", "x"]).contains("1-300"));
        assert!(usage_error(&["run", "-t", "soon", "x"]).contains("soon"));
        assert!(usage_error(&["run", "-m", "64", "x"]).contains("memory_mb"));
        assert!(usage_error(&["run", "-j", "0", "x"]).contains("1 to 100"));
        assert!(usage_error(&["run", "-j", "101", "x"]).contains("1 to 100"));
    }

    #[test]
    fn conflicts_and_missing_input() {
        assert!(usage_error(&["run"]).contains("SOURCE"));
        usage_error(&["run", "-q", "--debug", "x"]);
        usage_error(&["prefetch", "-q", "--debug"]);
        usage_error(&["run", "--frobnicate", "x"]);
        usage_error(&[]);
    }

    #[test]
    fn network_flags() {
        let r = run(&["run", "x"]);
        assert_eq!(r.network_options(), NetworkOptions::default());
        assert!(!r.network_options().needs_nic());

        let r = run(&["run", "--network", "x"]);
        assert!(r.network_options().allow_network);
        assert_eq!(r.network_options().allowed_domains, None);

        let r = run(&[
            "run",
            "--allow-domain",
            "example.org",
            "--allow-domain",
            "Files.Example.NET.",
            "x",
        ]);
        let net = r.network_options();
        assert!(net.allow_network, "--allow-domain implies --network");
        assert_eq!(
            net.allowed_domains,
            Some(vec!["example.org".into(), "Files.Example.NET.".into()])
        );

        let r = run(&[
            "run",
            "--expose",
            "8000",
            "--expose",
            "53:5353/udp",
            "--expose",
            "80:0/tcp",
            "x",
        ]);
        let net = r.network_options();
        assert!(
            !net.allow_network,
            "--expose alone gives no outbound access"
        );
        assert!(net.needs_nic());
        assert_eq!(
            net.expose_ports,
            vec![
                ExposePort::tcp(8000),
                ExposePort::udp(53).on_host_port(5353),
                ExposePort::tcp(80),
            ]
        );
    }

    #[test]
    fn bad_network_values_name_the_flag() {
        for (args, says) in [
            (&["--expose", "80/sctp"][..], "tcp or udp"),
            (&["--expose", "abc"], "abc"),
            (&["--expose", "70000"], "70000"),
            (&["--expose", "0"], "internal port 0"),
            (&["--expose", "80:80"], "1024"),
            (&["--allow-domain", "bad_domain!"], "bad_domain!"),
            (&["--allow-domain", "10.0.0.1"], "10.0.0.1"),
            (&["--allow-domain", ""], "empty"),
        ] {
            let mut all = vec!["run"];
            all.extend_from_slice(args);
            all.push("x");
            let message = usage_error(&all);
            assert!(message.contains(args[0]), "{args:?}: {message}");
            assert!(message.contains(says), "{args:?}: {message}");
        }
    }

    #[test]
    fn prefetch_and_version() {
        match parse(&["prefetch", "-q"]).unwrap().command {
            Command::Prefetch(p) => assert!(p.log.quiet && !p.log.debug && !p.snapshots),
            other => panic!("{other:?}"),
        }
        let e = parse(&["--version"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DisplayVersion);
        assert_eq!(e.exit_code(), 0);
    }
}
