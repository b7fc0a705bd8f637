use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use percept::config::Config;
use percept::run::{self, Overrides};

/// Offline, real-time media analysis: cameras, meetings and recordings in, timestamped events out.
#[derive(Parser)]
#[command(name = "percept", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Analyse one or more sources and write events as JSON Lines.
    Run(RunArgs),
    /// Analyse recordings (files or folders) as fast as the model allows: a transcript
    /// (VTT, SRT), events and a summary per recording; resumes where it was interrupted.
    Analyze(AnalyzeArgs),
    /// Queue recordings (files or folders) on a Redis Streams work queue for
    /// `percept analyze --queue` workers.
    Enqueue(EnqueueArgs),
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Inspect or run a Gemma 4 checkpoint.
    #[command(subcommand)]
    Model(percept::model_cli::ModelCmd),
    /// Benchmarks that need no download.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Synthetic sources for demos and tests.
    #[command(hide = true)]
    Testsrc {
        #[command(subcommand)]
        command: TestsrcCommand,
    },
}

#[derive(Args)]
struct RunArgs {
    /// A source: [NAME=]URI (path, file://, rtsp://, http(s)://, v4l2://, pulse://, alsa://, test:).
    /// Repeat for several sources; replaces the config file's sources.
    #[arg(long = "source", value_name = "URI")]
    sources: Vec<String>,
    /// TOML configuration (see config/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Frames per second sampled for analysis.
    #[arg(long)]
    fps: Option<f64>,
    /// Write events to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    events: Option<String>,
    /// Address for /metrics and /healthz (default 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Play files at their real speed instead of as fast as possible.
    #[arg(long)]
    realtime: bool,
    /// Do not serve HTTP.
    #[arg(long)]
    no_http: bool,
    /// The Gemma 4 model: a hub id (google/gemma-4-E2B-it) or a local folder.
    #[arg(long, value_name = "MODEL")]
    model: Option<String>,
    /// Signal analysis only: never load the model.
    #[arg(long)]
    no_model: bool,
    /// Task for the --source sources: none, watch, describe, caption, listen-and-look,
    /// transcribe, summarize.
    #[arg(long, value_enum)]
    task: Option<percept::config::TaskKind>,
    /// A `watch` question (repeat for several).
    #[arg(long = "question", value_name = "TEXT")]
    questions: Vec<String>,
    /// Run only the sources that rendezvous hashing of their names gives shard K of N
    /// (K from 0); K may be `hostname`: the host name's trailing number (pod percept-3 -> 3).
    #[arg(long, value_name = "K/N")]
    shard: Option<percept::fleet::shard::Shard>,
}

#[derive(Args)]
struct AnalyzeArgs {
    /// Recordings, or folders searched recursively for them.
    #[arg(
        required_unless_present = "queue",
        conflicts_with = "queue",
        value_name = "PATH"
    )]
    paths: Vec<PathBuf>,
    /// Work on the jobs of a queue instead: redis://HOST:PORT/NAME (see `percept enqueue`).
    #[arg(long, value_name = "URL")]
    queue: Option<String>,
    /// Take over a job whose worker has been silent this long.
    #[arg(long, value_name = "SECONDS", requires = "queue")]
    claim_after: Option<f64>,
    /// Exit 0 once no job is left or pending.
    #[arg(long, requires = "queue")]
    until_empty: bool,
    /// Output folder: one sub-folder per recording.
    #[arg(long, short, default_value = "percept-out")]
    out: PathBuf,
    /// TOML configuration (see config/field-recordings.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The Gemma 4 model: a hub id or a local folder.
    #[arg(long, value_name = "MODEL")]
    model: Option<String>,
}

#[derive(Args)]
struct EnqueueArgs {
    /// The queue: redis://[:PASSWORD@]HOST:PORT/NAME.
    #[arg(long, value_name = "URL")]
    queue: String,
    /// Recordings, or folders searched recursively for them.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Gemma 4 decoder at real shapes with random weights.
    Model(percept::bench::model::BenchArgs),
    /// The live pipeline with a random-weight model at the real shape, for 1, 2, 4 sources.
    Pipeline(percept::bench::pipeline::PipelineBenchArgs),
    /// percept against llama.cpp's llama-bench on one random-weight GGUF at a real shape.
    VsLlamacpp(percept::bench::vs_llamacpp::VsLlamacppArgs),
    /// `percept analyze` of a 5-minute 1 fps clip with its audio, random weights at the real
    /// shape (default the 12B at q4k): wall time, peak RSS, frames and audio analysed.
    Clip(percept::bench::clip::ClipBenchArgs),
    /// Cost of q8_0/q4k against f32: top-1 agreement and KL per modality (text, image,
    /// audio), on checkpoints and on random weights at the real 12B widths.
    Quant(percept::bench::quant_study::QuantArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Parse and validate files; print every problem.
    Check { files: Vec<PathBuf> },
}

#[derive(Subcommand)]
enum TestsrcCommand {
    /// Serve a synthetic H.264 + AAC camera over RTSP on 127.0.0.1.
    Rtsp {
        #[arg(long, default_value_t = 8554)]
        port: u16,
        #[arg(long, default_value = "/test")]
        path: String,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        password: Option<String>,
        #[arg(long, default_value_t = 640)]
        width: u32,
        #[arg(long, default_value_t = 360)]
        height: u32,
        #[arg(long, default_value_t = 30)]
        fps: u32,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PERCEPT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => cmd_run(args),
        Command::Analyze(args) => cmd_analyze(args),
        Command::Enqueue(args) => percept::fleet::cli::enqueue(&args.queue, &args.paths),
        Command::Config {
            command: ConfigCommand::Check { files },
        } => cmd_config_check(&files),
        Command::Model(m) => report(percept::model_cli::run(m, None)),
        Command::Bench(BenchCmd::Model(b)) => report(percept::bench::model::run(&b)),
        Command::Bench(BenchCmd::Pipeline(b)) => report(percept::bench::pipeline::run(&b)),
        Command::Bench(BenchCmd::VsLlamacpp(b)) => report(percept::bench::vs_llamacpp::run(&b)),
        Command::Bench(BenchCmd::Clip(b)) => report(percept::bench::clip::run(&b)),
        Command::Bench(BenchCmd::Quant(b)) => report(percept::bench::quant_study::run(&b)),
        Command::Testsrc { command } => match command {
            TestsrcCommand::Rtsp {
                port,
                path,
                user,
                password,
                width,
                height,
                fps,
            } => {
                let creds = user.map(|u| (u, password.unwrap_or_default()));
                match percept::testsrc::serve_rtsp(port, &path, creds, (width, height, fps)) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("percept: {e}");
                        ExitCode::from(2)
                    }
                }
            }
        },
    }
}

/// One line for an error chain, exit code 2.
fn report<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("percept: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The config file, or the defaults; a bad file is reported (every problem) and gives None.
fn load_config(path: Option<&std::path::Path>) -> Option<Config> {
    match path {
        Some(p) => match Config::load(p) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("percept: {e}");
                None
            }
        },
        None => Some(Config::default()),
    }
}

/// A flag set by SIGINT/SIGTERM; a second signal while draining exits at once.
fn stop_on_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone());
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    stop
}

fn cmd_run(args: RunArgs) -> ExitCode {
    let Some(cfg) = load_config(args.config.as_deref()) else {
        return ExitCode::from(2);
    };
    let overrides = Overrides {
        sources: args.sources,
        fps: args.fps,
        events: args.events,
        listen: args.listen,
        realtime: args.realtime,
        no_http: args.no_http,
        model: args.model,
        no_model: args.no_model,
        task: args.task,
        questions: args.questions,
        config_path: args.config.clone(),
        shard: args.shard,
    };
    if let Some(s) = args.shard {
        percept::fleet::shard::set_current(s);
    }
    let all = cfg.sources.len().max(overrides.sources.len());
    let cfg = run::merge(cfg, &overrides);
    if let Some(s) = args.shard {
        percept::fleet::cli::announce_shard(s, cfg.sources.len(), all, cfg.http.enabled);
    }
    let stop = stop_on_signals();
    let reload = Arc::new(AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone());
    match run::run(&cfg, &overrides, stop, reload) {
        Ok(report) => {
            for f in &report.failures {
                eprintln!("percept: {f}");
            }
            ExitCode::from(report.exit_code())
        }
        Err(e) => {
            eprintln!("percept: {e}");
            ExitCode::from(2)
        }
    }
}

fn cmd_analyze(args: AnalyzeArgs) -> ExitCode {
    let Some(mut cfg) = load_config(args.config.as_deref()) else {
        return ExitCode::from(2);
    };
    if let Some(m) = args.model {
        cfg.model.id = m;
    }
    let stop = stop_on_signals();
    if let Some(q) = args.queue {
        let opts = (q, args.out, args.claim_after, args.until_empty);
        return percept::fleet::cli::work(cfg, opts, stop);
    }
    match percept::analyze::analyze(cfg, &args.paths, &args.out, stop) {
        Ok(done) => {
            let mut failed = Vec::new();
            for a in &done {
                if let Some(why) = &a.failed {
                    failed.push(format!("{}: {why}", a.recording.display()));
                    continue;
                }
                let how = a.outcome();
                eprintln!(
                    "percept: {} -> {} ({how})",
                    a.recording.display(),
                    a.out_dir.display()
                );
            }
            // Failures last, one line each, so they are what the user reads.
            for f in &failed {
                eprintln!("percept: analyze: FAILED {f}");
            }
            if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "percept: analyze: {} of {} recordings failed",
                    failed.len(),
                    done.len()
                );
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("percept: analyze: {e}");
            ExitCode::from(2)
        }
    }
}

fn cmd_config_check(files: &[PathBuf]) -> ExitCode {
    if files.is_empty() {
        eprintln!("percept: config check needs at least one FILE");
        return ExitCode::from(2);
    }
    let mut bad = false;
    for f in files {
        match Config::load(f) {
            Ok(_) => println!("{}: ok", f.display()),
            Err(e) => {
                bad = true;
                println!("{e}");
            }
        }
    }
    if bad {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
