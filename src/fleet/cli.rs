//! The command-line side of the fleet commands: what `percept enqueue`, `percept analyze
//! --queue` and `percept run --shard` print, and their exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use super::queue::{self, QueueUrl, WorkerOptions};
use super::shard::Shard;
use crate::config::Config;

/// `percept enqueue --queue URL PATH...`: one line per job on stdout (`ID<TAB>PATH<TAB>NAME`,
/// for scripts), a count on stderr.
pub fn enqueue(url: &str, paths: &[PathBuf]) -> ExitCode {
    let url = match QueueUrl::parse(url) {
        Ok(u) => u,
        Err(e) => return fail(&e),
    };
    match queue::enqueue(&url, paths) {
        Ok(jobs) => {
            for j in &jobs {
                println!("{}\t{}\t{}", j.id, j.path.display(), j.name);
            }
            eprintln!(
                "percept: {} recording{} queued on {}",
                jobs.len(),
                if jobs.len() == 1 { "" } else { "s" },
                url.display
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `percept analyze --queue URL --out DIR [--claim-after S] [--until-empty]`.
pub fn work(
    cfg: Config,
    (url, out, claim_after, until_empty): (String, PathBuf, Option<f64>, bool),
    stop: Arc<AtomicBool>,
) -> ExitCode {
    let url = match QueueUrl::parse(&url) {
        Ok(u) => u,
        Err(e) => return fail(&e),
    };
    let claim_after = claim_after.unwrap_or(queue::DEFAULT_CLAIM_AFTER);
    if !(claim_after.is_finite() && (0.5..=86_400.0).contains(&claim_after)) {
        eprintln!("percept: --claim-after {claim_after}: give seconds from 0.5 to 86400");
        return ExitCode::from(2);
    }
    let mut opts = WorkerOptions::new(url, out);
    opts.claim_after = Duration::from_secs_f64(claim_after);
    opts.until_empty = until_empty;
    match queue::work(cfg, &opts, stop) {
        Ok(r) => {
            eprintln!(
                "percept: worker {} on {}: {} done, {} failed ({} dead-lettered to {}:dead)",
                opts.consumer, opts.url.display, r.done, r.failed, r.dead, opts.url.name
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// What a shard runs, said once at start; a shard with none says so.
pub fn announce_shard(shard: Shard, mine: usize, all: usize, http: bool) {
    if mine == 0 {
        if http {
            eprintln!(
                "percept: shard {shard} has no source ({all} configured, all owned by other shards); serving /healthz and /metrics until stopped or given a source"
            );
        } else {
            eprintln!(
                "percept: shard {shard} has no source ({all} configured, all owned by other shards); nothing to run"
            );
        }
    } else {
        tracing::info!(shard = %shard, sources = mine, configured = all, "Shard sources.");
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("percept: {e}");
    ExitCode::from(2)
}
