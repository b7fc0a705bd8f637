//! `percept bench vs-llamacpp`: percept against llama.cpp's `llama-bench` on the same
//! machine and the same file.
//!
//! One GGUF with random weights at a real shape is written in llama.cpp's `gemma4` layout
//! ([`super::random_gguf`]); llama-bench and percept both load it. Measured for each side,
//! every one in a child process (percept's side is this binary again, `--child`), so that
//! peak RSS comes from the kernel's accounting of that process (`wait4` rusage) and a crash
//! or an OOM kill is seen as what it is:
//! - prefill tokens/s at each `--prompts` size (llama-bench `-p`);
//! - decode tokens/s from an empty context and after `--depth` tokens (llama-bench `-n` with
//!   `-d 0,DEPTH`), and as a fraction of the read bandwidth measured in the same run
//!   ([`super::bandwidth`]): the bytes one decode step must read over the bytes per second
//!   all threads can read;
//! - peak RSS and start-to-ready: a process that loads the file and evaluates one token,
//!   timed from spawn to exit (`llama-bench -p 1 -n 0 -r 1 --no-warmup`, and percept's
//!   child with `--ready-only`).
//!
//! Both sides get the same threads (`-t`; `RAYON_NUM_THREADS` for percept), the runs are
//! interleaved (llama.cpp first on even repetitions, percept first on odd ones) and the best
//! of `--reps` counts (highest tokens/s, shortest start; the highest peak RSS). A side that
//! fails (exit status, signal, unparsable output) is a failed row with its cause and the
//! command exits non-zero.
//!
//! - the vision row (E2B/E4B shapes, [`super::vs_mtmd`]): one frame (`--frame`, 1280x720)
//!   at each `--vision` image budget, encoded by llama.cpp's `llama-mtmd-cli` and by percept's
//!   vision tower on one projector GGUF written in the converter's `gemma4v` layout
//!   ([`super::random_mmproj`]); ms per frame and both soft-token counts.
//!
//! llama-bench comes from `--llama-bench`, else `PERCEPT_LLAMA_BENCH`, else the cache
//! (`$XDG_CACHE_HOME/percept/llama.cpp/build/bin/llama-bench`), where `--llama-src DIR` (a
//! llama.cpp source tree such as `vendor/llama.cpp` of the `llama-cpp-python` sdist) builds
//! it with cmake when it is missing.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Args;

use super::random_gguf::FileQuant;
use super::random_mmproj::MmprojType;
use super::vs_mtmd::VisionRun;

#[derive(Debug, Args)]
pub struct VsLlamacppArgs {
    /// Shapes: e2b, e4b, 12b, or a path to a `config.json` (comma separated).
    #[arg(long, default_value = "e2b", value_delimiter = ',')]
    pub arch: Vec<String>,
    /// File quantizations: q4k (llama-quantize's Q4_K_M mix), q8_0 (comma separated).
    #[arg(long, value_enum, default_value = "q4k", value_delimiter = ',')]
    pub quant: Vec<FileQuant>,
    /// The llama-bench binary (else PERCEPT_LLAMA_BENCH, else the cache).
    #[arg(long, value_name = "PATH")]
    pub llama_bench: Option<PathBuf>,
    /// A llama.cpp source tree to build llama-bench from (cmake) when none is found.
    #[arg(long, value_name = "DIR")]
    pub llama_src: Option<PathBuf>,
    /// Threads for both sides (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Interleaved repetitions; the best counts.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Prompt sizes for prefill (comma separated; empty skips prefill).
    #[arg(long, default_value = "128,512,2048", value_delimiter = ',')]
    pub prompts: Vec<usize>,
    /// Decode steps timed per decode row.
    #[arg(long, default_value_t = 32)]
    pub gen: usize,
    /// Context depth of the second decode row (0: only the short-context row).
    #[arg(long, default_value_t = 4096)]
    pub depth: usize,
    /// Buffer of the read-bandwidth probe, MiB (far larger than the caches).
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mib: usize,
    /// Folder for the GGUF file (default: `<cache>/bench`).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Keep the GGUF file (and reuse one already there) instead of writing it afresh and
    /// deleting it at the end.
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object per (arch, quant) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Image soft-token budgets of the vision row (70, 140, 280, 560, 1120; comma
    /// separated): one frame encoded by llama.cpp's llama-mtmd-cli and percept's vision tower
    /// on the same projector file (E2B/E4B shapes).
    #[arg(long, default_value = "70", value_delimiter = ',')]
    pub vision: Vec<usize>,
    /// Skip the vision row.
    #[arg(long)]
    pub no_vision: bool,
    /// The frame of the vision row (PNG, JPEG); default: a synthetic one of --frame size.
    #[arg(long, value_name = "PATH")]
    pub vision_image: Option<PathBuf>,
    /// Size of the synthetic frame, WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x720")]
    pub frame: String,
    /// Matrix storage of the projector file (f16: the published mmproj files).
    #[arg(long, value_enum, default_value = "f16")]
    pub mmproj_type: MmprojType,
    /// The llama-mtmd-cli binary (else PERCEPT_LLAMA_MTMD_CLI, else beside llama-bench, else
    /// the cache).
    #[arg(long, value_name = "PATH")]
    pub llama_mtmd_cli: Option<PathBuf>,
    /// Internal: percept's side in this process, on this GGUF.
    #[arg(long, hide = true, value_name = "GGUF")]
    pub child: Option<PathBuf>,
    /// Internal: percept's vision side in this process, on this projector (with
    /// --vision-image).
    #[arg(long, hide = true, value_name = "MMPROJ")]
    pub vision_child: Option<PathBuf>,
    /// Internal, with --child: load, evaluate one token, exit.
    #[arg(long, hide = true)]
    pub ready_only: bool,
}

/// What one child process did: wall time from spawn to exit, the kernel's peak RSS of it,
/// its output, and why it failed, if it did.
#[derive(Debug, Clone)]
pub struct ChildRun {
    pub wall_s: f64,
    pub max_rss_kib: u64,
    pub stdout: String,
    pub stderr: String,
    pub failure: Option<String>,
}

/// Runs `cmd` to its end, with stdout and stderr captured; peak RSS and the exit cause come
/// from `wait4`.
pub fn run_child(cmd: &mut Command) -> ChildRun {
    let what = format!("{:?}", cmd.get_program());
    let t = Instant::now();
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return ChildRun {
                wall_s: 0.0,
                max_rss_kib: 0,
                stdout: String::new(),
                stderr: String::new(),
                failure: Some(format!("could not start {what}: {e}")),
            }
        }
    };
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let (status, rss) = wait_rusage(child.id());
    let wall_s = t.elapsed().as_secs_f64();
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let failure = match status {
        Exit::Code(0) => None,
        Exit::Code(c) => Some(format!(
            "exited with status {c}: {}",
            last_line(&stderr).unwrap_or("(no message)")
        )),
        Exit::Signal(s) => Some(signal_cause(s, rss)),
        Exit::WaitFailed(e) => Some(format!("waiting for {what} failed: {e}")),
    };
    ChildRun {
        wall_s,
        max_rss_kib: rss,
        stdout,
        stderr,
        failure,
    }
}

pub fn last_line(s: &str) -> Option<&str> {
    s.lines().rev().map(str::trim).find(|l| !l.is_empty())
}

/// The cause of a death by signal, in words.
pub fn signal_cause(sig: i32, max_rss_kib: u64) -> String {
    let gib = max_rss_kib as f64 / (1u64 << 20) as f64;
    match sig {
        9 => format!(
            "killed by SIGKILL at {gib:.1} GiB peak RSS (the kernel's OOM killer sends SIGKILL when memory runs out)"
        ),
        6 => format!("aborted (SIGABRT) at {gib:.1} GiB peak RSS"),
        11 => format!("crashed (SIGSEGV) at {gib:.1} GiB peak RSS"),
        s => format!("killed by signal {s} at {gib:.1} GiB peak RSS"),
    }
}

enum Exit {
    Code(i32),
    Signal(i32),
    WaitFailed(String),
}

/// `wait4` on a child: how it ended and its peak RSS in KiB (`ru_maxrss`).
fn wait_rusage(pid: u32) -> (Exit, u64) {
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    #[allow(unsafe_code)]
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our own child, not yet reaped (std's `Child` never waited on
        // it); `status` and `ru` are valid, exclusively borrowed out-parameters.
        #[allow(unsafe_code)]
        let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut ru) };
        if r == pid as libc::pid_t {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return (Exit::WaitFailed(e.to_string()), 0);
        }
    }
    let rss = ru.ru_maxrss.max(0) as u64;
    let exit = if libc::WIFEXITED(status) {
        Exit::Code(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Exit::Signal(libc::WTERMSIG(status))
    } else {
        Exit::Code(-1)
    };
    (exit, rss)
}

/// One llama-bench result row (`-o json`).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaRow {
    pub n_prompt: usize,
    pub n_gen: usize,
    pub n_depth: usize,
    pub avg_ts: f64,
}

/// Parses llama-bench's `-o json` output (an array of test objects).
pub fn parse_llama_bench_json(s: &str) -> anyhow::Result<Vec<LlamaRow>> {
    // llama-bench prints the array to stdout; anything before it (none seen) is skipped.
    let start = s
        .find('[')
        .ok_or_else(|| anyhow::anyhow!("llama-bench printed no JSON array"))?;
    let v: serde_json::Value = serde_json::from_str(s[start..].trim())
        .map_err(|e| anyhow::anyhow!("llama-bench JSON: {e}"))?;
    let arr = v
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("llama-bench JSON is not an array"))?;
    arr.iter()
        .map(|o| {
            let u = |k: &str| {
                o[k].as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| anyhow::anyhow!("llama-bench JSON row without {k}"))
            };
            Ok(LlamaRow {
                n_prompt: u("n_prompt")?,
                n_gen: u("n_gen")?,
                n_depth: o["n_depth"].as_u64().unwrap_or(0) as usize,
                avg_ts: o["avg_ts"]
                    .as_f64()
                    .ok_or_else(|| anyhow::anyhow!("llama-bench JSON row without avg_ts"))?,
            })
        })
        .collect()
}

/// The best figures of one side over the repetitions.
#[derive(Debug, Clone, Default)]
pub struct Side {
    /// Prefill tokens/s by prompt size.
    pub prefill: BTreeMap<usize, f64>,
    /// Decode tokens/s by context depth.
    pub decode: BTreeMap<usize, f64>,
    pub ready_s: Option<f64>,
    pub peak_rss_kib: u64,
    /// Vision tower encode of one frame, ms, by image budget.
    pub vision_ms: BTreeMap<usize, f64>,
    /// Soft tokens of that frame, by image budget.
    pub vision_tokens: BTreeMap<usize, usize>,
    /// Why a run of this side failed (the first failure).
    pub failure: Option<String>,
}

impl Side {
    pub fn fail(&mut self, what: &str, cause: String) {
        if self.failure.is_none() {
            self.failure = Some(format!("{what}: {cause}"));
        }
    }

    fn rss(&mut self, r: &ChildRun) {
        self.peak_rss_kib = self.peak_rss_kib.max(r.max_rss_kib);
    }

    fn best_prefill(&mut self, n: usize, ts: f64) {
        let e = self.prefill.entry(n).or_insert(0.0);
        *e = e.max(ts);
    }

    fn best_decode(&mut self, d: usize, ts: f64) {
        let e = self.decode.entry(d).or_insert(0.0);
        *e = e.max(ts);
    }

    pub fn best_vision(&mut self, budget: usize, ms: f64, soft_tokens: usize) {
        let e = self.vision_ms.entry(budget).or_insert(f64::INFINITY);
        *e = e.min(ms);
        self.vision_tokens.insert(budget, soft_tokens);
    }

    fn ready(&mut self, s: f64) {
        self.ready_s = Some(self.ready_s.map_or(s, |r| r.min(s)));
    }
}

/// CPU model and the flags that decide the kernels (`/proc/cpuinfo`).
pub fn cpu_line() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    let flags: Vec<&str> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let has = |f: &str| if flags.contains(&f) { "yes" } else { "no" };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!(
        "{model}, {cores} cores; avx512f {}, avx512_vnni {}, amx {}",
        has("avx512f"),
        has("avx512_vnni"),
        if flags.contains(&"amx_tile") && flags.contains(&"amx_int8") {
            "yes"
        } else {
            "no"
        }
    )
}

/// Finds llama-bench, or builds it into the cache from `--llama-src`.
pub fn find_llama_bench(a: &VsLlamacppArgs) -> anyhow::Result<PathBuf> {
    let check = |p: PathBuf, from: &str| -> anyhow::Result<PathBuf> {
        if p.is_file() {
            Ok(p)
        } else {
            anyhow::bail!("{from} {}: no such file", p.display())
        }
    };
    if let Some(p) = &a.llama_bench {
        return check(p.clone(), "--llama-bench");
    }
    if let Some(p) = std::env::var_os("PERCEPT_LLAMA_BENCH").filter(|p| !p.is_empty()) {
        return check(PathBuf::from(p), "PERCEPT_LLAMA_BENCH");
    }
    let root = crate::model::gguf_model::cache_root().join("llama.cpp");
    let build = root.join("build");
    let bin = build.join("bin").join("llama-bench");
    if bin.is_file() {
        return Ok(bin);
    }
    let Some(src) = &a.llama_src else {
        anyhow::bail!(
            "llama-bench not found: give --llama-bench PATH, set PERCEPT_LLAMA_BENCH, or pass --llama-src DIR (a llama.cpp source tree, e.g. vendor/llama.cpp of the llama-cpp-python sdist) to build it into {}",
            root.display()
        );
    };
    cmake_build(src, &build, "llama-bench")?;
    check(bin, "built llama-bench")
}

/// Configures `build` from the llama.cpp tree `src` (once) and builds `target` there.
pub fn cmake_build(src: &Path, build: &Path, target: &str) -> anyhow::Result<()> {
    if !src.join("CMakeLists.txt").is_file() {
        anyhow::bail!(
            "--llama-src {}: not a llama.cpp source tree (no CMakeLists.txt)",
            src.display()
        );
    }
    eprintln!(
        "building {target} from {} into {} (cmake, a few minutes)",
        src.display(),
        build.display()
    );
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .to_string();
    let steps: [Vec<std::ffi::OsString>; 2] = [
        vec![
            "-S".into(),
            src.into(),
            "-B".into(),
            build.into(),
            "-DCMAKE_BUILD_TYPE=Release".into(),
            "-DBUILD_SHARED_LIBS=OFF".into(),
            "-DLLAMA_CURL=OFF".into(),
            "-DLLAMA_BUILD_TESTS=OFF".into(),
        ],
        vec![
            "--build".into(),
            build.into(),
            "--target".into(),
            target.into(),
            "-j".into(),
            jobs.into(),
        ],
    ];
    for args in steps {
        let st = Command::new("cmake")
            .args(&args)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .map_err(|e| {
                anyhow::anyhow!("cmake could not start ({e}); install cmake and a C++ compiler")
            })?;
        if !st.success() {
            anyhow::bail!(
                "building {target} from {} failed (cmake {st})",
                src.display()
            );
        }
    }
    Ok(())
}

/// Everything measured for one (arch, quant).
#[derive(Debug, Clone)]
pub struct Comparison {
    pub arch: String,
    pub quant: FileQuant,
    pub file: PathBuf,
    pub file_bytes: u64,
    /// Weight bytes one decode step reads (all but the per-layer token table).
    pub decode_bytes: u64,
    pub threads: usize,
    pub reps: usize,
    /// Best read bandwidth over the repetitions, bytes/s.
    pub read_bw: f64,
    /// 1-minute load average before and after (other work on the machine skews both sides).
    pub load: (f64, f64),
    pub llama: Side,
    pub percept: Side,
    /// `WIDTHxHEIGHT` of the vision row's frame and the projector's storage, when the row ran.
    pub vision: Option<(String, MmprojType)>,
}

impl Comparison {
    pub fn failed(&self) -> bool {
        self.llama.failure.is_some() || self.percept.failure.is_some()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let side = |s: &Side| {
            serde_json::json!({
                "prefill_tok_s": s.prefill.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
                "decode_tok_s": s.decode.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
                "decode_fraction_of_read_bound": s.decode.iter()
                    .map(|(k, v)| (k.to_string(), v * self.decode_bytes as f64 / self.read_bw))
                    .collect::<BTreeMap<_, _>>(),
                "ready_s": s.ready_s,
                "peak_rss_gib": s.peak_rss_kib as f64 / (1u64 << 20) as f64,
                "vision_encode_ms": super::vs_mtmd::keyed(&s.vision_ms),
                "vision_soft_tokens": super::vs_mtmd::keyed(&s.vision_tokens),
                "failure": s.failure,
            })
        };
        serde_json::json!({
            "arch": self.arch, "quant": self.quant.as_str(), "file": self.file,
            "file_gib": self.file_bytes as f64 / (1u64 << 30) as f64,
            "decode_bytes_per_token_gib": self.decode_bytes as f64 / (1u64 << 30) as f64,
            "threads": self.threads, "reps": self.reps,
            "read_bandwidth_gb_s": self.read_bw / 1e9,
            "load_average": [self.load.0, self.load.1],
            "cpu": cpu_line(),
            "vision_frame": self.vision.as_ref().map(|v| v.0.clone()),
            "vision_mmproj_type": self.vision.as_ref().map(|v| v.1.as_str()),
            "llama_cpp": side(&self.llama), "percept": side(&self.percept),
        })
    }

    /// The table.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let gib = |b: f64| b / (1u64 << 30) as f64;
        let _ = writeln!(
            s,
            "{} {} ({:.2} GiB, {}), {} threads, best of {} interleaved runs; read bandwidth {:.1} GB/s",
            self.arch,
            self.quant.as_str(),
            gib(self.file_bytes as f64),
            self.file.display(),
            self.threads,
            self.reps,
            self.read_bw / 1e9
        );
        let _ = writeln!(
            s,
            "CPU: {}; load average {:.1} before, {:.1} after",
            cpu_line(),
            self.load.0,
            self.load.1
        );
        let _ = writeln!(
            s,
            "{:<26} {:>22} {:>22} {:>10}",
            "", "llama.cpp", "percept", "percept/llama.cpp"
        );
        let bound = |ts: f64| 100.0 * ts * self.decode_bytes as f64 / self.read_bw;
        let mut row =
            |name: String, l: Option<f64>, p: Option<f64>, fmt: &dyn Fn(f64) -> String| {
                let cell = |v: Option<f64>| v.map(fmt).unwrap_or_else(|| "-".into());
                let ratio = match (l, p) {
                    (Some(l), Some(p)) if l > 0.0 => format!("{:.2}", p / l),
                    _ => "-".into(),
                };
                let _ = writeln!(
                    s,
                    "{name:<26} {:>22} {:>22} {:>10}",
                    cell(l),
                    cell(p),
                    ratio
                );
            };
        let mut sizes: Vec<usize> = self.llama.prefill.keys().copied().collect();
        sizes.extend(self.percept.prefill.keys());
        sizes.sort_unstable();
        sizes.dedup();
        for n in sizes {
            row(
                format!("prefill {n}, tok/s"),
                self.llama.prefill.get(&n).copied(),
                self.percept.prefill.get(&n).copied(),
                &|v| format!("{v:.2}"),
            );
        }
        let mut depths: Vec<usize> = self.llama.decode.keys().copied().collect();
        depths.extend(self.percept.decode.keys());
        depths.sort_unstable();
        depths.dedup();
        for d in depths {
            row(
                format!("decode @{d}, tok/s"),
                self.llama.decode.get(&d).copied(),
                self.percept.decode.get(&d).copied(),
                &|v| format!("{v:.2} ({:.0}% bound)", bound(v)),
            );
        }
        let rss =
            |x: &Side| (x.peak_rss_kib > 0).then(|| x.peak_rss_kib as f64 / (1u64 << 20) as f64);
        row(
            "peak RSS, GiB".into(),
            rss(&self.llama),
            rss(&self.percept),
            &|v| format!("{v:.2}"),
        );
        row(
            "start to ready, s".into(),
            self.llama.ready_s,
            self.percept.ready_s,
            &|v| format!("{v:.2}"),
        );
        let frame = self.vision.as_ref().map_or("", |v| v.0.as_str());
        let mut budgets: Vec<usize> = self.llama.vision_ms.keys().copied().collect();
        budgets.extend(self.percept.vision_ms.keys());
        budgets.sort_unstable();
        budgets.dedup();
        for b in budgets {
            row(
                format!("vision {frame} @{b}, ms"),
                self.llama.vision_ms.get(&b).copied(),
                self.percept.vision_ms.get(&b).copied(),
                &|v| format!("{v:.0}"),
            );
            row(
                format!("vision soft tokens @{b}"),
                self.llama.vision_tokens.get(&b).map(|&n| n as f64),
                self.percept.vision_tokens.get(&b).map(|&n| n as f64),
                &|v| format!("{v:.0}"),
            );
        }
        for (who, side) in [("llama.cpp", &self.llama), ("percept", &self.percept)] {
            if let Some(f) = &side.failure {
                let _ = writeln!(s, "FAILED {who}: {f}");
            }
        }
        let _ = writeln!(
            s,
            "(decode bound: {:.2} GiB read per token at {:.1} GB/s; ratios above 1 favour percept for tok/s, below 1 for RSS, start and vision ms)",
            gib(self.decode_bytes as f64),
            self.read_bw / 1e9
        );
        if let Some((frame, ty)) = &self.vision {
            let _ = writeln!(
                s,
                "(vision: one {frame} frame per image budget on one {} projector; llama.cpp: llama-mtmd-cli's own encode time after its warmup, percept: VisionTower::encode after one untimed encode; same soft tokens)",
                ty.as_str()
            );
        }
        s
    }
}

/// Entry point of `percept bench vs-llamacpp`.
pub fn run(a: &VsLlamacppArgs) -> anyhow::Result<()> {
    if let Some(mmproj) = &a.vision_child {
        let frame = a
            .vision_image
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--vision-child needs --vision-image"))?;
        let v = super::vs_mtmd::percept_side(mmproj, frame, &a.vision)?;
        println!("{v}");
        return Ok(());
    }
    if let Some(gguf) = &a.child {
        let v = percept_side(gguf, a)?;
        println!("{v}");
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    run_with(a, &exe)
}

/// The comparison, with `percept_exe` as percept's side (tests pass the built binary).
pub fn run_with(a: &VsLlamacppArgs, percept_exe: &Path) -> anyhow::Result<()> {
    if a.reps == 0 {
        anyhow::bail!("--reps 0: at least one repetition");
    }
    if a.gen == 0 {
        anyhow::bail!("--gen 0: at least one decode step");
    }
    let llama = find_llama_bench(a)?;
    let vision_archs: Vec<&String> = if a.no_vision || a.vision.is_empty() {
        Vec::new()
    } else {
        a.arch
            .iter()
            .filter(|arch| {
                crate::bench::model::real_config(arch).is_ok_and(|c| {
                    c.arch == crate::model::config::Arch::Gemma4 && c.vision_config.is_some()
                })
            })
            .collect()
    };
    let mtmd = if vision_archs.is_empty() {
        None
    } else {
        if let Some(b) = a
            .vision
            .iter()
            .find(|b| !super::vs_mtmd::SUPPORTED_SOFT_TOKENS.contains(b))
        {
            anyhow::bail!(
                "--vision {b}: image budgets are {:?}",
                super::vs_mtmd::SUPPORTED_SOFT_TOKENS
            );
        }
        let env = std::env::var_os("PERCEPT_LLAMA_MTMD_CLI");
        Some(super::vs_mtmd::find_mtmd_cli(
            &super::vs_mtmd::MtmdSearch {
                flag: a.llama_mtmd_cli.as_deref(),
                env,
                beside: llama.parent(),
                cache_build: crate::model::gguf_model::cache_root()
                    .join("llama.cpp")
                    .join("build"),
                src: a.llama_src.as_deref(),
            },
        )?)
    };
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| crate::model::gguf_model::cache_root().join("bench"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    let mut failed = Vec::new();
    for arch in &a.arch {
        let full = crate::bench::model::real_config(arch)?;
        let cfg = full.text_config.clone();
        let tag = Path::new(arch)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("shape");
        // The projector does not depend on the decoder's quantization: its row goes with the
        // first --quant only.
        let mut vision = match (&mtmd, &full.vision_config) {
            (Some(cli), Some(vc)) if vision_archs.contains(&arch) => {
                Some(prepare_vision(a, &dir, tag, cli, vc, cfg.hidden_size)?)
            }
            _ => None,
        };
        for &quant in &a.quant {
            let file = dir.join(format!("percept-vs-llamacpp-{tag}-{}.gguf", quant.as_str()));
            let reuse = a.keep && file.is_file();
            if !reuse {
                let t = Instant::now();
                let n = super::random_gguf::write(&file, &cfg, quant, 0x5eed)?;
                eprintln!(
                    "wrote {} ({:.2} GiB) in {:.1} s",
                    file.display(),
                    n as f64 / (1u64 << 30) as f64,
                    t.elapsed().as_secs_f64()
                );
            }
            let v = vision.take();
            let c = compare(
                a,
                arch,
                quant,
                &cfg,
                &file,
                &llama,
                percept_exe,
                threads,
                v.as_ref(),
            );
            if !a.keep {
                let _ = std::fs::remove_file(&file);
                if let Some(v) = &v {
                    let _ = std::fs::remove_file(&v.mmproj);
                    if a.vision_image.is_none() {
                        let _ = std::fs::remove_file(&v.frame);
                    }
                }
            }
            let c = c?;
            if a.json {
                println!("{}", c.to_json());
            } else {
                println!("{}", c.render());
            }
            if c.failed() {
                failed.push(format!("{tag}/{}", quant.as_str()));
            }
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "bench vs-llamacpp: {} failed (see FAILED above)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// Writes (or, with `--keep`, reuses) the projector and the frame of the vision row.
fn prepare_vision(
    a: &VsLlamacppArgs,
    dir: &Path,
    tag: &str,
    mtmd_cli: &Path,
    vc: &crate::model::config::VisionConfig,
    text_hidden: usize,
) -> anyhow::Result<VisionRun> {
    // Not named `mmproj*`: percept's loader takes such a file beside a model GGUF as its
    // projector, and the text rows load the decoder alone.
    let mmproj = dir.join(format!(
        "percept-vs-llamacpp-{tag}-projector-{}.gguf",
        a.mmproj_type.as_str()
    ));
    if !(a.keep && mmproj.is_file()) {
        let t = Instant::now();
        let n = super::random_mmproj::write(&mmproj, vc, text_hidden, a.mmproj_type, 0x5eed)?;
        eprintln!(
            "wrote {} ({:.2} GiB) in {:.1} s",
            mmproj.display(),
            n as f64 / (1u64 << 30) as f64,
            t.elapsed().as_secs_f64()
        );
    }
    let (frame, frame_label) = match &a.vision_image {
        Some(p) => {
            let img = crate::model::preprocess::image::load_rgb(p)
                .map_err(|e| anyhow::anyhow!("--vision-image {}: {e}", p.display()))?;
            (p.clone(), format!("{}x{}", img.width, img.height))
        }
        None => {
            let (w, h) = super::vs_mtmd::parse_frame(&a.frame)?;
            let p = dir.join(format!("percept-vs-llamacpp-frame-{w}x{h}.png"));
            super::vs_mtmd::write_frame(&p, w, h)?;
            (p, format!("{w}x{h}"))
        }
    };
    Ok(VisionRun {
        mtmd_cli: mtmd_cli.to_path_buf(),
        mmproj,
        frame,
        frame_label,
        budgets: a.vision.clone(),
    })
}

#[allow(clippy::too_many_arguments)]
fn compare(
    a: &VsLlamacppArgs,
    arch: &str,
    quant: FileQuant,
    cfg: &crate::model::config::TextConfig,
    file: &Path,
    llama: &Path,
    percept_exe: &Path,
    threads: usize,
    vision: Option<&VisionRun>,
) -> anyhow::Result<Comparison> {
    let file_bytes = std::fs::metadata(file)?.len();
    let decode_bytes = super::random_gguf::decode_bytes(cfg, quant)?;
    let mut c = Comparison {
        arch: arch.to_string(),
        quant,
        file: file.to_path_buf(),
        file_bytes,
        decode_bytes,
        threads,
        reps: a.reps,
        read_bw: 0.0,
        load: (load_average(), 0.0),
        llama: Side::default(),
        percept: Side::default(),
        vision: vision.map(|v| (v.frame_label.clone(), a.mmproj_type)),
    };
    let t = threads.to_string();
    let list = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let llama_cmd = |extra: &[&str]| {
        let mut cmd = Command::new(llama);
        cmd.arg("-m")
            .arg(file)
            .args(["-t", &t, "-r", "1", "-o", "json"])
            .args(extra);
        cmd
    };
    let percept_cmd = |ready: bool| {
        let mut cmd = Command::new(percept_exe);
        cmd.args(["bench", "vs-llamacpp", "--child"])
            .arg(file)
            .args(["-t", &t, "--gen", &a.gen.to_string()])
            .args(["--depth", &a.depth.to_string()])
            .arg(format!("--prompts={}", list(&a.prompts)))
            .env("RAYON_NUM_THREADS", &t);
        if ready {
            cmd.arg("--ready-only");
        }
        cmd
    };
    let depths: Vec<usize> = if a.depth > 0 {
        vec![0, a.depth]
    } else {
        vec![0]
    };
    for rep in 0..a.reps {
        c.read_bw = c.read_bw.max(super::bandwidth::measure_read_bandwidth(
            threads,
            a.bandwidth_mib.max(1) << 20,
        ));
        let sides: [bool; 2] = if rep % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_llama in sides {
            if is_llama {
                eprintln!(
                    "rep {}/{}: llama.cpp {arch} {}",
                    rep + 1,
                    a.reps,
                    quant.as_str()
                );
                llama_round(&mut c.llama, &llama_cmd, &a.prompts, a.gen, &depths);
            } else {
                eprintln!(
                    "rep {}/{}: percept {arch} {}",
                    rep + 1,
                    a.reps,
                    quant.as_str()
                );
                percept_round(&mut c.percept, &percept_cmd);
            }
        }
        if let Some(v) = vision {
            for is_llama in sides {
                if is_llama {
                    eprintln!("rep {}/{}: llama.cpp {arch} vision", rep + 1, a.reps);
                    super::vs_mtmd::llama_round(&mut c.llama, v, file, threads);
                } else {
                    eprintln!("rep {}/{}: percept {arch} vision", rep + 1, a.reps);
                    let mut cmd = Command::new(percept_exe);
                    cmd.args(["bench", "vs-llamacpp", "--vision-child"])
                        .arg(&v.mmproj)
                        .arg("--vision-image")
                        .arg(&v.frame)
                        .arg(format!("--vision={}", list(&v.budgets)))
                        .args(["-t", &t])
                        .env("RAYON_NUM_THREADS", &t);
                    super::vs_mtmd::percept_round(&mut c.percept, &mut cmd);
                }
            }
        }
        if c.failed() {
            // A side that crashed or was killed once will again: stop repeating it.
            break;
        }
    }
    c.load.1 = load_average();
    for (b, l, p) in super::vs_mtmd::token_mismatches(&c.llama, &c.percept) {
        c.percept.fail(
            &format!("vision soft tokens @{b}"),
            format!("percept's tower gave {p}, llama.cpp's {l} for the same frame"),
        );
    }
    Ok(c)
}

/// The 1-minute load average (`/proc/loadavg`), 0 where there is none.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
}

/// One repetition of llama.cpp: start-to-ready, prefill sizes, decode depths.
fn llama_round(
    side: &mut Side,
    cmd: &dyn Fn(&[&str]) -> Command,
    prompts: &[usize],
    gen: usize,
    depths: &[usize],
) {
    let ready = run_child(&mut cmd(&["-p", "1", "-n", "0", "--no-warmup"]));
    side.rss(&ready);
    match &ready.failure {
        Some(f) => return side.fail("llama-bench (load + 1 token)", f.clone()),
        None => side.ready(ready.wall_s),
    }
    let csv = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut runs: Vec<(String, Vec<String>)> = Vec::new();
    if !prompts.is_empty() {
        runs.push((
            "llama-bench (prefill)".into(),
            vec!["-p".into(), csv(prompts), "-n".into(), "0".into()],
        ));
    }
    runs.push((
        "llama-bench (decode)".into(),
        vec![
            "-p".into(),
            "0".into(),
            "-n".into(),
            gen.to_string(),
            "-d".into(),
            csv(depths),
        ],
    ));
    for (what, args) in runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = run_child(&mut cmd(&args));
        side.rss(&r);
        if let Some(f) = r.failure {
            return side.fail(&what, f);
        }
        match parse_llama_bench_json(&r.stdout) {
            Ok(rows) => {
                for row in rows {
                    if row.n_gen > 0 {
                        side.best_decode(row.n_depth, row.avg_ts);
                    } else if row.n_prompt > 0 {
                        side.best_prefill(row.n_prompt, row.avg_ts);
                    }
                }
            }
            Err(e) => return side.fail(&what, e.to_string()),
        }
    }
}

/// One repetition of percept: start-to-ready, then prefill and decode in one child.
fn percept_round(side: &mut Side, cmd: &dyn Fn(bool) -> Command) {
    let ready = run_child(&mut cmd(true));
    side.rss(&ready);
    if let Some(f) = ready.failure {
        return side.fail("percept (load + 1 token)", f);
    }
    side.ready(ready.wall_s);
    let r = run_child(&mut cmd(false));
    side.rss(&r);
    if let Some(f) = r.failure {
        return side.fail("percept (prefill, decode)", f);
    }
    let v: serde_json::Value = match last_line(&r.stdout).map(serde_json::from_str) {
        Some(Ok(v)) => v,
        _ => {
            return side.fail(
                "percept (prefill, decode)",
                format!(
                    "no JSON result line in its output ({:?})",
                    last_line(&r.stdout)
                ),
            )
        }
    };
    for (k, ts) in v["prefill_tok_s"].as_object().into_iter().flatten() {
        if let (Ok(n), Some(ts)) = (k.parse(), ts.as_f64()) {
            side.best_prefill(n, ts);
        }
    }
    for (k, ts) in v["decode_tok_s"].as_object().into_iter().flatten() {
        if let (Ok(d), Some(ts)) = (k.parse(), ts.as_f64()) {
            side.best_decode(d, ts);
        }
    }
}

/// percept's side, in this process: load the GGUF as a user's `--model file.gguf` is
/// loaded, evaluate one token (ready), then time prefill at each prompt size and decode at
/// each depth, each on a fresh cache. One JSON line.
fn percept_side(gguf: &Path, a: &VsLlamacppArgs) -> anyhow::Result<serde_json::Value> {
    use crate::model::generate::argmax;
    use crate::model::loader::ModelFiles;
    use crate::model::text::{LoadOptions, LogitRows, Segment, TextModel};
    let t0 = Instant::now();
    let spec = gguf
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("{}: path is not UTF-8", gguf.display()))?;
    let longest = a.prompts.iter().copied().max().unwrap_or(0).max(a.depth);
    let opts = LoadOptions {
        max_context: longest + a.gen + 16,
        ..LoadOptions::default()
    };
    let g = crate::model::Gemma4::load_files(ModelFiles::resolve_with(spec, None)?, &opts)?;
    let m: &TextModel = &g.text;
    let step = |cache: &mut crate::model::text::SeqCache, ids: &[u32]| -> anyhow::Result<u32> {
        let e = m.embed_tokens(ids)?;
        let tp = m.ple_token_inputs(ids)?;
        let p = m.ple_inputs(&e, tp.as_ref())?;
        let mut segs = [Segment {
            cache,
            len: ids.len(),
            logits: LogitRows::Last,
            block_ids: None,
        }];
        let l = m.forward(&e, p.as_ref(), &mut segs)?;
        Ok(argmax(&l[0].squeeze(0)?.to_vec1::<f32>()?))
    };
    // Prompts go in chunks of `[model] prefill_chunk` rows, as `percept run` prefills them
    // (llama-bench likewise evaluates ubatches of 512): one 4096-row step would hold
    // activations for all of them at once and measure a peak RSS percept never reaches.
    let chunk = crate::config::ModelConfig::default().prefill_chunk.max(1);
    let prefill = |cache: &mut crate::model::text::SeqCache, ids: &[u32]| -> anyhow::Result<u32> {
        let mut tok = 0;
        for c in ids.chunks(chunk) {
            tok = step(cache, c)?;
        }
        Ok(tok)
    };
    step(&mut m.new_cache(), &[2])?;
    let ready_s = t0.elapsed().as_secs_f64();
    if a.ready_only {
        return Ok(serde_json::json!({"ready_s": ready_s}));
    }
    let vocab = g.config.text_config.vocab_size as u64;
    let mut rng = crate::model::rng::SplitMix64(7);
    let mut ids = |n: usize| -> Vec<u32> {
        // Ordinary ids past the special tokens, as llama-bench's random prompts.
        (0..n)
            .map(|_| (300 + rng.next_u64() % (vocab - 300).max(1)) as u32)
            .collect()
    };
    let mut prefill_ts = serde_json::Map::new();
    for &n in &a.prompts {
        let p = ids(n);
        let mut cache = m.new_cache();
        let t = Instant::now();
        prefill(&mut cache, &p)?;
        prefill_ts.insert(n.to_string(), (n as f64 / t.elapsed().as_secs_f64()).into());
    }
    let mut decode = serde_json::Map::new();
    let depths: Vec<usize> = if a.depth > 0 {
        vec![0, a.depth]
    } else {
        vec![0]
    };
    for d in depths {
        let mut cache = m.new_cache();
        let mut tok = if d > 0 {
            prefill(&mut cache, &ids(d))?
        } else {
            2
        };
        // One untimed step (llama-bench warms up with one decode too).
        tok = step(&mut cache, &[tok])?;
        let t = Instant::now();
        for _ in 0..a.gen {
            tok = step(&mut cache, &[tok])?;
        }
        decode.insert(
            d.to_string(),
            (a.gen as f64 / t.elapsed().as_secs_f64()).into(),
        );
    }
    Ok(serde_json::json!({
        "ready_s": ready_s,
        "prefill_tok_s": prefill_ts,
        "decode_tok_s": decode,
        "decode_bytes_per_token": m.decode_bytes_per_token(),
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Output of llama-bench `-o json` (abridged to the fields read, plus some that are not).
    const SAMPLE: &str = r#"[
  {
    "build_commit": "unknown", "cpu_info": "AMD EPYC", "model_type": "gemma4 E2B Q4_K - Medium",
    "n_threads": 2, "n_prompt": 512, "n_gen": 0, "n_depth": 0,
    "avg_ns": 1000, "stddev_ns": 0, "avg_ts": 61.5, "stddev_ts": 0.0, "samples_ts": [61.5]
  },
  {
    "n_threads": 2, "n_prompt": 0, "n_gen": 32, "n_depth": 4096,
    "avg_ts": 9.25, "stddev_ts": 0.1, "samples_ts": [9.25]
  }
]
"#;

    #[test]
    fn llama_bench_json_parses() {
        let rows = parse_llama_bench_json(SAMPLE).unwrap();
        assert_eq!(
            rows,
            vec![
                LlamaRow {
                    n_prompt: 512,
                    n_gen: 0,
                    n_depth: 0,
                    avg_ts: 61.5
                },
                LlamaRow {
                    n_prompt: 0,
                    n_gen: 32,
                    n_depth: 4096,
                    avg_ts: 9.25
                }
            ]
        );
        assert!(parse_llama_bench_json("error: failed to load model").is_err());
        assert!(parse_llama_bench_json("[{\"n_prompt\": 1}]").is_err());
    }

    #[test]
    fn a_child_killed_by_a_signal_is_a_failure_with_its_cause() {
        let r = run_child(Command::new("sh").args(["-c", "echo partial; kill -9 $$"]));
        let f = r.failure.unwrap();
        assert!(f.contains("SIGKILL") && f.contains("OOM"), "{f}");
        assert_eq!(r.stdout.trim(), "partial");
        let r = run_child(Command::new("sh").args(["-c", "echo 'no model here' >&2; exit 3"]));
        assert_eq!(r.failure.unwrap(), "exited with status 3: no model here");
        let r = run_child(Command::new("sh").args(["-c", "exit 0"]));
        assert!(r.failure.is_none());
        assert!(r.max_rss_kib > 0);
    }
}
