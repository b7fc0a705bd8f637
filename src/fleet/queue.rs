//! Recordings through a shared work queue on Redis Streams.
//!
//! `percept enqueue --queue redis://HOST:PORT/NAME PATH...` adds one job per recording to the
//! stream `NAME`; `percept analyze --queue URL --out DIR` is a worker: it reads jobs through
//! the consumer group `percept`, runs the same per-recording analysis as `percept analyze
//! PATH` into `DIR/<name>/` (shared storage), and acknowledges a job (`XACK`) only once that
//! folder's checkpoint says `done`. Delivery is at least once; the checkpoint makes it
//! exactly-once in effect: a job delivered again resumes from where the last worker committed,
//! or finds it done and only acknowledges it.
//!
//! - A worker refreshes its claim on the job it runs every third of `--claim-after` from a
//!   thread of its own (an `XCLAIM ... JUSTID` that resets the entry's idle time, only while
//!   it is still the owner), so however slow the model, a live worker's job is never taken;
//!   one that went silent (SIGKILL, a lost node) has its job taken with `XAUTOCLAIM` by
//!   another after `--claim-after` seconds. A worker that finds its job taken stops it at once
//!   and leaves the folder to the new owner.
//! - On SIGTERM a worker stops its recording at the last checkpoint and hands the job back at
//!   once (its idle time set past any `--claim-after`), so a rolling update loses nothing.
//! - A job that fails is queued again with its failure count; its third failure (a worker
//!   that went silent on it counts as one) moves it to the dead-letter stream `NAME:dead`
//!   with the error, for a person to look at.
//! - Output folder names are fixed when a job is queued: the same names `percept analyze`
//!   gives the same PATH arguments, made unique across every batch ever queued on `NAME`
//!   (the hash `NAME:names`), so two batches never write into one folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;

use crate::analyze::{self, AnalyzeError};
use crate::config::Config;
use crate::control::ModelStatus;
use crate::run::SharedModel;

/// The consumer group every worker reads through.
pub const GROUP: &str = "percept";
/// Failures (errors, or workers that went silent) after which a job is dead-lettered.
pub const MAX_ATTEMPTS: u32 = 3;
/// `--claim-after` default, seconds.
pub const DEFAULT_CLAIM_AFTER: f64 = 60.0;
/// How long one blocking read waits for a new job before looking for stale ones again.
const BLOCK: Duration = Duration::from_millis(500);
/// Connect and per-command timeout (a blocking read adds [`BLOCK`]).
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("--queue {url}: {message}")]
    Url { url: String, message: String },
    #[error("queue {queue}: {message}")]
    Redis { queue: String, message: String },
    #[error("{0}")]
    Analyze(#[from] AnalyzeError),
    #[error("{0}")]
    Config(String),
}

/// `redis://[USER:PASSWORD@]HOST[:PORT]/NAME`: a Redis server and the stream name.
#[derive(Clone)]
pub struct QueueUrl {
    /// What the client connects to (may hold a password: never shown).
    connect: String,
    /// The stream of jobs.
    pub name: String,
    /// `redis://HOST:PORT/NAME`, without credentials: for logs and errors.
    pub display: String,
}

impl std::fmt::Debug for QueueUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

impl QueueUrl {
    pub fn parse(s: &str) -> Result<QueueUrl, QueueError> {
        let u = url::Url::parse(s).map_err(|e| QueueError::Url {
            url: redact(s),
            message: format!("not a URL ({e}); expected redis://HOST:PORT/NAME"),
        })?;
        let bad = |message: &str| QueueError::Url {
            url: redact(s),
            message: message.to_string(),
        };
        match u.scheme() {
            "redis" => {}
            "rediss" => return Err(bad("TLS (rediss://) is not built in; reach Redis over a local TLS tunnel with redis://")),
            _ => return Err(bad("the scheme must be redis:// (redis://HOST:PORT/NAME)")),
        }
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host (redis://HOST:PORT/NAME)"))?;
        let name = u.path().trim_start_matches('/');
        if name.is_empty() {
            return Err(bad(
                "no queue name: give it as the path, redis://HOST:PORT/NAME",
            ));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
            || name.len() > 200
        {
            return Err(bad(
                "the queue name may hold only letters, digits, '-', '_', '.' and ':'",
            ));
        }
        if u.query().is_some() || u.fragment().is_some() {
            return Err(bad("no query or fragment is read; remove it"));
        }
        let port = u.port().unwrap_or(6379);
        let mut connect = u.clone();
        connect.set_path("/0");
        Ok(QueueUrl {
            connect: connect.to_string(),
            name: name.to_string(),
            display: format!("redis://{host}:{port}/{name}"),
        })
    }

    fn dead(&self) -> String {
        format!("{}:dead", self.name)
    }

    fn names(&self) -> String {
        format!("{}:names", self.name)
    }

    fn redis_err(&self, what: &str, e: redis::RedisError) -> QueueError {
        QueueError::Redis {
            queue: self.display.clone(),
            message: format!("{what}: {e}"),
        }
    }

    fn connect(&self) -> Result<redis::Connection, QueueError> {
        let client = redis::Client::open(self.connect.as_str())
            .map_err(|e| self.redis_err("bad connection settings", e))?;
        let con = client
            .get_connection_with_timeout(IO_TIMEOUT)
            .map_err(|e| self.redis_err("cannot connect", e))?;
        con.set_read_timeout(Some(IO_TIMEOUT + BLOCK))
            .and_then(|()| con.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| self.redis_err("cannot set timeouts", e))?;
        Ok(con)
    }

    /// Creates the stream and its consumer group unless they exist. The group starts at the
    /// stream's beginning so jobs queued before the first worker are read.
    fn ensure_group(&self, con: &mut redis::Connection) -> Result<(), QueueError> {
        let r: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.name)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query(con);
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(self.redis_err("cannot create the consumer group", e)),
        }
    }
}

/// A URL with any password replaced, for messages about a URL that did not parse.
fn redact(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => match (s.find("://"), s.rfind('@')) {
            (Some(a), Some(b)) if b > a => format!("{}***{}", &s[..a + 3], &s[b..]),
            _ => s.to_string(),
        },
    }
}

/// One queued recording.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The stream entry id.
    pub id: String,
    pub path: PathBuf,
    /// The output folder's name under `--out`.
    pub name: String,
    /// Failures so far (earlier entries of the same job).
    pub failures: u32,
    pub last_error: Option<String>,
}

impl Job {
    fn from_fields(id: String, f: &HashMap<String, String>) -> Option<Job> {
        Some(Job {
            id,
            path: PathBuf::from(f.get("path")?),
            name: f.get("name")?.clone(),
            failures: f.get("failures").and_then(|v| v.parse().ok()).unwrap_or(0),
            last_error: f.get("error").cloned(),
        })
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

fn array(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// `[[id, [field, value, ...]], ...]` as stream entries (a deleted entry has no fields).
fn entries(v: &Value) -> Vec<(String, HashMap<String, String>)> {
    let mut out = Vec::new();
    for e in array(v) {
        let parts = array(e);
        let Some(id) = parts.first().and_then(text) else {
            continue;
        };
        let mut fields = HashMap::new();
        if let Some(kv) = parts.get(1) {
            for pair in array(kv).chunks(2) {
                if let (Some(k), Some(v)) =
                    (pair.first().and_then(text), pair.get(1).and_then(text))
                {
                    fields.insert(k, v);
                }
            }
        }
        out.push((id, fields));
    }
    out
}

/// `percept enqueue`: one job per recording under `paths`; returns the jobs queued.
pub fn enqueue(url: &QueueUrl, paths: &[PathBuf]) -> Result<Vec<Job>, QueueError> {
    let (recordings, unreadable) = analyze::collect(paths)?;
    for (p, why) in &unreadable {
        tracing::error!(path = %p.display(), error = %why, "Not queued: cannot be read.");
    }
    let mut con = url.connect()?;
    url.ensure_group(&mut con)?;
    let names = analyze::output_names(&recordings);
    let mut jobs = Vec::new();
    for (rec, base) in recordings.iter().zip(names) {
        // Absolute, so workers started anywhere find it on the shared storage.
        let path = std::path::absolute(rec).unwrap_or_else(|_| rec.clone());
        let name = unique_name(url, &mut con, &base, &path)?;
        let id: String = redis::cmd("XADD")
            .arg(&url.name)
            .arg("*")
            .arg("path")
            .arg(path.display().to_string())
            .arg("name")
            .arg(&name)
            .arg("failures")
            .arg(0)
            .query(&mut con)
            .map_err(|e| url.redis_err("cannot add a job", e))?;
        jobs.push(Job {
            id,
            path,
            name,
            failures: 0,
            last_error: None,
        });
    }
    Ok(jobs)
}

/// `base`, or `base-2`, `base-3`...: the first name no other recording holds on this queue.
/// The same recording queued again keeps its name (and so its folder, which says it is done).
fn unique_name(
    url: &QueueUrl,
    con: &mut redis::Connection,
    base: &str,
    path: &Path,
) -> Result<String, QueueError> {
    let p = path.display().to_string();
    for k in 1.. {
        let name = if k == 1 {
            base.to_string()
        } else {
            format!("{base}-{k}")
        };
        let set: bool = redis::cmd("HSETNX")
            .arg(url.names())
            .arg(&name)
            .arg(&p)
            .query(con)
            .map_err(|e| url.redis_err("cannot reserve an output name", e))?;
        if set {
            return Ok(name);
        }
        let holder: Option<String> = redis::cmd("HGET")
            .arg(url.names())
            .arg(&name)
            .query(con)
            .map_err(|e| url.redis_err("cannot read an output name", e))?;
        if holder.as_deref() == Some(p.as_str()) {
            return Ok(name);
        }
    }
    unreachable!("the loop over names returns")
}

/// `percept analyze --queue`.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub url: QueueUrl,
    pub out: PathBuf,
    /// A job whose worker has not refreshed its claim for this long is taken over.
    pub claim_after: Duration,
    /// Exit once no job is left or pending.
    pub until_empty: bool,
    /// This worker's consumer name in the group (`HOST-PID` by default).
    pub consumer: String,
}

impl WorkerOptions {
    pub fn new(url: QueueUrl, out: PathBuf) -> WorkerOptions {
        let host = crate::fleet::shard::hostname().unwrap_or_else(|_| "percept".into());
        WorkerOptions {
            url,
            out,
            claim_after: Duration::from_secs_f64(DEFAULT_CLAIM_AFTER),
            until_empty: false,
            consumer: format!("{host}-{}", std::process::id()),
        }
    }
}

/// What a worker did, for its exit report.
#[derive(Debug, Default)]
pub struct WorkReport {
    pub done: usize,
    pub failed: usize,
    pub dead: usize,
}

/// Refreshes the claim on a job while its worker holds it (a live worker's job is never
/// idle for long), only while that worker is still its owner.
const REFRESH: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
";

/// Hands a job back (a stopping worker): a fresh entry with the same failure count, so any
/// worker takes it at once and the stop is not counted as a silent worker.
const HAND_BACK: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XADD', KEYS[1], '*', 'path', ARGV[4], 'name', ARGV[5], 'failures', ARGV[6], 'error', ARGV[7])
return 1
";

/// Acknowledges a job only while this worker still owns it.
const ACK: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
";

/// Runs jobs until stopped (or, with `until_empty`, until none is left or pending).
pub fn work(
    cfg: Config,
    opts: &WorkerOptions,
    stop: Arc<AtomicBool>,
) -> Result<WorkReport, QueueError> {
    let url = &opts.url;
    let mut con = url.connect()?;
    url.ensure_group(&mut con)?;
    analyze::prepare(&cfg, &[])?;
    let (model, engine) =
        SharedModel::start(&cfg.model).map_err(|e| QueueError::Config(e.to_string()))?;
    loop {
        match model.live.model() {
            ModelStatus::Ready { .. } => break,
            ModelStatus::Unavailable { id, message } => {
                model.dispatch.close();
                return Err(AnalyzeError::Model(format!("'{id}': {message}")).into());
            }
            _ if stop.load(Ordering::Relaxed) => {
                return Ok(WorkReport::default());
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    tracing::info!(queue = %url.display, consumer = %opts.consumer, claim_after = opts.claim_after.as_secs_f64(), "Waiting for jobs.");
    let mut report = WorkReport::default();
    let result = jobs_loop(&cfg, opts, &mut con, &model, &stop, &mut report);
    model.dispatch.close();
    let _ = engine.join();
    result.map(|()| report)
}

fn jobs_loop(
    cfg: &Config,
    opts: &WorkerOptions,
    con: &mut redis::Connection,
    model: &SharedModel,
    stop: &Arc<AtomicBool>,
    report: &mut WorkReport,
) -> Result<(), QueueError> {
    let url = &opts.url;
    let mut failing_since: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let job = match next_job(opts, con).and_then(|j| match j {
            // Nothing new and nothing pending: the queue is drained.
            None if opts.until_empty => pending(url, con).map(|n| (n > 0).then_some(None)),
            j => Ok(Some(j)),
        }) {
            Ok(Some(Some(j))) => j,
            Ok(Some(None)) => continue,
            Ok(None) => {
                tracing::info!(queue = %url.display, "No job left or pending.");
                return Ok(());
            }
            Err(e) => {
                // Redis restarting or unreachable for a moment: keep trying.
                let since = *failing_since.get_or_insert_with(Instant::now);
                tracing::warn!(error = %e, for_seconds = since.elapsed().as_secs(), "Queue unreachable; retrying.");
                std::thread::sleep(Duration::from_secs(1));
                if let Ok(c) = url.connect() {
                    *con = c;
                }
                continue;
            }
        };
        failing_since = None;
        run_job(cfg, opts, con, model, stop, job, report)?;
    }
    Ok(())
}

/// Pending entries: delivered to some worker and not acknowledged.
fn pending(url: &QueueUrl, con: &mut redis::Connection) -> Result<u64, QueueError> {
    let v: Value = redis::cmd("XPENDING")
        .arg(&url.name)
        .arg(GROUP)
        .query(con)
        .map_err(|e| url.redis_err("XPENDING", e))?;
    Ok(array(&v)
        .first()
        .and_then(text)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

/// A stale job to take over, else a new one (waiting up to [`BLOCK`]).
fn next_job(opts: &WorkerOptions, con: &mut redis::Connection) -> Result<Option<Job>, QueueError> {
    let url = &opts.url;
    let mut cursor = "0-0".to_string();
    loop {
        let v: Value = redis::cmd("XAUTOCLAIM")
            .arg(&url.name)
            .arg(GROUP)
            .arg(&opts.consumer)
            .arg(opts.claim_after.as_millis() as u64)
            .arg(&cursor)
            .arg("COUNT")
            .arg(1)
            .query(con)
            .map_err(|e| url.redis_err("XAUTOCLAIM", e))?;
        let parts = array(&v);
        for (id, fields) in entries(parts.get(1).unwrap_or(&Value::Nil)) {
            let Some(mut job) = Job::from_fields(id.clone(), &fields) else {
                tracing::warn!(id = %id, "Dropping a malformed job.");
                let _: redis::RedisResult<Value> = redis::cmd("XACK")
                    .arg(&url.name)
                    .arg(GROUP)
                    .arg(&id)
                    .query(con);
                continue;
            };
            let delivered = deliveries(url, con, &id)?;
            // Each earlier delivery of this entry ended with its worker going silent.
            let silent = delivered.saturating_sub(1) as u32;
            tracing::warn!(id = %id, recording = %job.path.display(), deliveries = delivered, "Taking over a job whose worker went silent.");
            if job.failures + silent >= MAX_ATTEMPTS {
                job.failures += silent;
                job.last_error = Some(format!(
                    "its worker went silent {silent} times while analysing it (killed, out of memory, node lost?)"
                ));
                dead_letter(url, con, &job)?;
                continue;
            }
            return Ok(Some(job));
        }
        cursor = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
        if cursor == "0-0" {
            break;
        }
    }
    let v: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(&opts.consumer)
        .arg("COUNT")
        .arg(1)
        .arg("BLOCK")
        .arg(BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(&url.name)
        .arg(">")
        .query(con)
        .map_err(|e| url.redis_err("XREADGROUP", e))?;
    // [[stream, [[id, fields]...]]], or nil on timeout.
    for stream in array(&v) {
        let s = array(stream);
        for (id, fields) in entries(s.get(1).unwrap_or(&Value::Nil)) {
            match Job::from_fields(id.clone(), &fields) {
                Some(j) => return Ok(Some(j)),
                None => {
                    tracing::warn!(id = %id, "Dropping a malformed job.");
                    let _: redis::RedisResult<Value> = redis::cmd("XACK")
                        .arg(&url.name)
                        .arg(GROUP)
                        .arg(&id)
                        .query(con);
                }
            }
        }
    }
    Ok(None)
}

/// How many times the entry `id` has been delivered.
fn deliveries(url: &QueueUrl, con: &mut redis::Connection, id: &str) -> Result<u64, QueueError> {
    let v: Value = redis::cmd("XPENDING")
        .arg(&url.name)
        .arg(GROUP)
        .arg(id)
        .arg(id)
        .arg(1)
        .query(con)
        .map_err(|e| url.redis_err("XPENDING", e))?;
    Ok(array(&v)
        .first()
        .map(array)
        .and_then(|e| e.get(3))
        .and_then(text)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1))
}

/// Moves a job to `NAME:dead` with its error, and acknowledges it, in one transaction.
fn dead_letter(url: &QueueUrl, con: &mut redis::Connection, job: &Job) -> Result<(), QueueError> {
    let error = job.last_error.clone().unwrap_or_default();
    tracing::error!(recording = %job.path.display(), attempts = job.failures, error = %error, dead_letter = %url.dead(), "Giving up on a job.");
    redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg(url.dead())
        .arg("*")
        .arg("path")
        .arg(job.path.display().to_string())
        .arg("name")
        .arg(&job.name)
        .arg("failures")
        .arg(job.failures)
        .arg("error")
        .arg(&error)
        .arg("job")
        .arg(&job.id)
        .ignore()
        .cmd("XACK")
        .arg(&url.name)
        .arg(GROUP)
        .arg(&job.id)
        .ignore()
        .exec(con)
        .map_err(|e| url.redis_err("cannot dead-letter a job", e))
}

/// Queues a failed job again (a new entry carrying its failure count), acknowledging the old.
fn requeue(url: &QueueUrl, con: &mut redis::Connection, job: &Job) -> Result<(), QueueError> {
    redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg(&url.name)
        .arg("*")
        .arg("path")
        .arg(job.path.display().to_string())
        .arg("name")
        .arg(&job.name)
        .arg("failures")
        .arg(job.failures)
        .arg("error")
        .arg(job.last_error.clone().unwrap_or_default())
        .ignore()
        .cmd("XACK")
        .arg(&url.name)
        .arg(GROUP)
        .arg(&job.id)
        .ignore()
        .exec(con)
        .map_err(|e| url.redis_err("cannot queue a failed job again", e))
}

/// What the claim thread saw.
#[derive(Default)]
struct Claim {
    /// Set to stop the recording: the worker is stopping or lost the job.
    stop: Arc<AtomicBool>,
    lost: AtomicBool,
    done: AtomicBool,
}

fn run_job(
    cfg: &Config,
    opts: &WorkerOptions,
    con: &mut redis::Connection,
    model: &SharedModel,
    stop: &Arc<AtomicBool>,
    mut job: Job,
    report: &mut WorkReport,
) -> Result<(), QueueError> {
    let url = &opts.url;
    tracing::info!(id = %job.id, recording = %job.path.display(), out = %opts.out.join(&job.name).display(), "Job started.");
    let claim = Arc::new(Claim::default());
    let keeper = {
        let claim = claim.clone();
        let stop = stop.clone();
        let opts = opts.clone();
        let id = job.id.clone();
        std::thread::Builder::new()
            .name("percept-claim".into())
            .spawn(move || keep_claim(&opts, &id, &claim, &stop))
            .map_err(|e| QueueError::Config(format!("cannot start the claim thread: {e}")))?
    };
    let result = analyze::analyze_one(
        cfg,
        &job.path,
        &analyze::recording_identity(&job.path),
        &job.name,
        &opts.out,
        model,
        claim.stop.clone(),
    );
    claim.done.store(true, Ordering::Relaxed);
    let _ = keeper.join();
    if claim.lost.load(Ordering::Relaxed) {
        tracing::warn!(id = %job.id, recording = %job.path.display(), "Another worker took this job over; leaving it to them.");
        return Ok(());
    }
    if claim.stop.load(Ordering::Relaxed) {
        // Stopping: the checkpoint stays; hand the job back now rather than after
        // --claim-after.
        let _: redis::RedisResult<i64> = redis::Script::new(HAND_BACK)
            .key(&url.name)
            .arg(GROUP)
            .arg(&opts.consumer)
            .arg(&job.id)
            .arg(job.path.display().to_string())
            .arg(&job.name)
            .arg(job.failures)
            .arg(job.last_error.clone().unwrap_or_default())
            .invoke(con);
        tracing::info!(id = %job.id, recording = %job.path.display(), "Stopped; the job goes back to the queue at its checkpoint.");
        return Ok(());
    }
    match result {
        Ok(a) => {
            let acked: i64 = redis::Script::new(ACK)
                .key(&url.name)
                .arg(GROUP)
                .arg(&opts.consumer)
                .arg(&job.id)
                .invoke(con)
                .map_err(|e| url.redis_err("XACK", e))?;
            if acked == 0 {
                tracing::warn!(id = %job.id, "The job was taken over before its acknowledgement; its folder is complete.");
            }
            report.done += 1;
            let how = a.outcome();
            eprintln!(
                "percept: {} -> {} ({how}; job {} by {})",
                a.recording.display(),
                a.out_dir.display(),
                job.id,
                opts.consumer
            );
        }
        Err(e) => {
            report.failed += 1;
            job.failures += 1;
            job.last_error = Some(e.to_string());
            eprintln!(
                "percept: {}: {e} (failure {} of {MAX_ATTEMPTS})",
                job.path.display(),
                job.failures
            );
            if job.failures >= MAX_ATTEMPTS {
                report.dead += 1;
                dead_letter(url, con, &job)?;
            } else {
                requeue(url, con, &job)?;
            }
        }
    }
    Ok(())
}

/// The claim thread: passes a stop request on to the recording, and refreshes the claim
/// every third of `claim_after` on a connection of its own.
fn keep_claim(opts: &WorkerOptions, id: &str, claim: &Claim, stop: &AtomicBool) {
    let every = (opts.claim_after / 3).max(Duration::from_millis(100));
    let mut con = None;
    let mut last = Instant::now();
    while !claim.done.load(Ordering::Relaxed) {
        if stop.load(Ordering::Relaxed) {
            claim.stop.store(true, Ordering::Relaxed);
        }
        if last.elapsed() >= every {
            last = Instant::now();
            if con.is_none() {
                con = opts.url.connect().ok();
            }
            if let Some(c) = con.as_mut() {
                let r: redis::RedisResult<i64> = redis::Script::new(REFRESH)
                    .key(&opts.url.name)
                    .arg(GROUP)
                    .arg(&opts.consumer)
                    .arg(id)
                    .invoke(c);
                match r {
                    Ok(0) => {
                        claim.lost.store(true, Ordering::Relaxed);
                        claim.stop.store(true, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Unreachable for a moment: the job is ours until claim_after passes.
                        tracing::warn!(error = %e, "Cannot refresh the claim on the job.");
                        con = None;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_urls_parse_and_never_show_a_password() {
        let u = QueueUrl::parse("redis://127.0.0.1:7000/recordings").unwrap();
        assert_eq!(u.name, "recordings");
        assert_eq!(u.display, "redis://127.0.0.1:7000/recordings");
        assert_eq!(u.dead(), "recordings:dead");
        let u = QueueUrl::parse("redis://:s3cret@cache/archive-2026").unwrap();
        assert_eq!(u.display, "redis://cache:6379/archive-2026");
        assert!(!format!("{u:?}").contains("s3cret"));
        for (bad, why) in [
            ("redis://host:1/", "no queue name"),
            ("redis://host:1", "no queue name"),
            ("http://host/q", "scheme"),
            ("rediss://host/q", "TLS"),
            ("redis://host/a/b", "may hold only"),
            ("not a url", "not a URL"),
        ] {
            let e = QueueUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = QueueUrl::parse("redis://u:s3cret@host/")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn stream_entries_parse() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let v = Value::Array(vec![
            Value::Array(vec![
                b("1-0"),
                Value::Array(vec![
                    b("path"),
                    b("/r/a.wav"),
                    b("name"),
                    b("a"),
                    b("failures"),
                    b("2"),
                ]),
            ]),
            Value::Array(vec![b("2-0"), Value::Nil]),
        ]);
        let e = entries(&v);
        assert_eq!(e.len(), 2);
        let j = Job::from_fields(e[0].0.clone(), &e[0].1).unwrap();
        assert_eq!(j.path, PathBuf::from("/r/a.wav"));
        assert_eq!((j.name.as_str(), j.failures), ("a", 2));
        assert!(Job::from_fields(e[1].0.clone(), &e[1].1).is_none());
    }
}
