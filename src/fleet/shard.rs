//! `percept run --shard K/N`: which live sources this process runs.
//!
//! Rendezvous (highest-random-weight) hashing: every shard `i` of `N` gives a source name the
//! weight `weight(name, i)`, and the source belongs to the shard with the highest weight. So
//! every source has exactly one owner, every process computes it alone from the name (no
//! coordinator), and going from `N` to `N + 1` shards moves only the sources whose weight
//! for the new shard beats their old maximum: about `1/(N+1)` of them, all to the new shard.
//!
//! The hash is FNV-1a over the name's UTF-8 bytes, finished with the SplitMix64 mixer and
//! combined with the mixed shard index. It is spelled out here, not taken from std's
//! `RandomState` (seeded per process) or `DefaultHasher` (free to change between Rust
//! releases), because a fleet of mixed versions must agree on every owner; the unit tests pin
//! some assignments so a change to it cannot go unnoticed.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::config::SourceConfig;

/// Shard `index` of `count` (0-based, like StatefulSet pod ordinals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

/// The most shards a set may have; far beyond any site, small enough to keep the weight
/// loop trivial.
pub const MAX_SHARDS: u32 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("'{0}' is not K/N (for example 0/4, or hostname/4 in a StatefulSet)")]
    Syntax(String),
    #[error("shard count {0} is out of range 1..={MAX_SHARDS}")]
    Count(u32),
    #[error("shard {index} does not exist in a set of {count} (shards are numbered 0..{count})")]
    Index { index: u32, count: u32 },
    #[error("host name '{0}' does not end in a number (a StatefulSet pod is NAME-ORDINAL, e.g. percept-3)")]
    Hostname(String),
    #[error("cannot read the host name: {0}")]
    NoHostname(String),
}

impl Shard {
    /// Parses `K/N`, where `K` may be `hostname` (the trailing number of `host()`).
    pub fn parse_with(
        spec: &str,
        host: impl FnOnce() -> Result<String, ShardError>,
    ) -> Result<Shard, ShardError> {
        let (k, n) = spec
            .split_once('/')
            .ok_or_else(|| ShardError::Syntax(spec.to_string()))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| ShardError::Syntax(spec.to_string()))?;
        if count == 0 || count > MAX_SHARDS {
            return Err(ShardError::Count(count));
        }
        let k = k.trim();
        let index = if k.eq_ignore_ascii_case("hostname") {
            hostname_ordinal(&host()?)?
        } else {
            k.parse()
                .map_err(|_| ShardError::Syntax(spec.to_string()))?
        };
        if index >= count {
            return Err(ShardError::Index { index, count });
        }
        Ok(Shard { index, count })
    }

    /// Whether this shard runs the source `name`.
    pub fn owns(&self, name: &str) -> bool {
        owner(name, self.count) == self.index
    }

    /// `Err` with a one-line reason when another shard owns `name` (the control API's 409).
    pub fn check(&self, name: &str) -> Result<(), String> {
        let o = owner(name, self.count);
        if o == self.index {
            Ok(())
        } else {
            Err(format!(
                "source '{name}' belongs to shard {o}/{n}, not to this shard {me}/{n}: add it there",
                n = self.count,
                me = self.index
            ))
        }
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = ShardError;
    fn from_str(s: &str) -> Result<Shard, ShardError> {
        Shard::parse_with(s, hostname)
    }
}

/// The host name: `$HOSTNAME` (what Kubernetes sets to the pod name), else the kernel's.
pub fn hostname() -> Result<String, ShardError> {
    if let Ok(h) = std::env::var("HOSTNAME") {
        if !h.trim().is_empty() {
            return Ok(h.trim().to_string());
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .map_err(|e| ShardError::NoHostname(e.to_string()))
}

/// `percept-3` (or `percept-3.percept.ns.svc`) -> 3.
pub fn hostname_ordinal(host: &str) -> Result<u32, ShardError> {
    let short = host.split('.').next().unwrap_or(host);
    let digits: String = short
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits
        .parse()
        .map_err(|_| ShardError::Hostname(host.to_string()))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME)
    })
}

/// SplitMix64's finaliser: every input bit reaches every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The weight shard `i` gives `name`.
pub fn weight(name: &str, i: u32) -> u64 {
    mix(fnv1a(name.as_bytes()) ^ mix(u64::from(i).wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// The shard (of `count`) that owns `name`: the highest weight, the lower index on a tie.
pub fn owner(name: &str, count: u32) -> u32 {
    let mut best = 0;
    let mut best_w = weight(name, 0);
    for i in 1..count {
        let w = weight(name, i);
        if w > best_w {
            best = i;
            best_w = w;
        }
    }
    best
}

static CURRENT: OnceLock<Shard> = OnceLock::new();

/// Records this process's shard for the labels on metrics and `state` events; set once, by
/// `percept run --shard`, before anything is started.
pub fn set_current(s: Shard) {
    let _ = CURRENT.set(s);
}

pub fn current() -> Option<Shard> {
    CURRENT.get().copied()
}

/// The `shard` field of `state` events: `"K/N"`, or absent when not sharded.
pub fn label() -> Option<String> {
    current().map(|s| s.to_string())
}

/// Constant labels for every metric of a sharded process: `shard="K/N"`.
pub fn metric_labels() -> Option<std::collections::HashMap<String, String>> {
    current().map(|s| [("shard".to_string(), s.to_string())].into())
}

/// The name a configured source will run under (what the control API and metrics show).
pub fn source_name(sc: &SourceConfig) -> Option<String> {
    sc.name
        .clone()
        .or_else(|| crate::source::parse(&sc.uri).ok().map(|s| s.name))
}

/// Keeps the sources this shard owns; returns how many there were in all. A source whose URI
/// does not parse is kept, so every shard reports it.
pub fn retain(sources: &mut Vec<SourceConfig>, shard: Shard) -> usize {
    let all = sources.len();
    sources.retain(|sc| source_name(sc).is_none_or(|n| shard.owns(&n)));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cam-{i:04}")).collect()
    }

    #[test]
    fn parses_specs_and_hostnames() {
        let none = || Err(ShardError::NoHostname("unused".into()));
        assert_eq!(
            Shard::parse_with("2/4", none).unwrap(),
            Shard { index: 2, count: 4 }
        );
        assert_eq!(
            Shard::parse_with("hostname/8", || Ok("percept-3".into())).unwrap(),
            Shard { index: 3, count: 8 }
        );
        assert_eq!(
            Shard::parse_with("hostname/8", || Ok("percept-12.percept.ns.svc".into())).unwrap_err(),
            ShardError::Index {
                index: 12,
                count: 8
            }
        );
        assert_eq!(
            Shard::parse_with("hostname/8", || Ok("gateway".into())).unwrap_err(),
            ShardError::Hostname("gateway".into())
        );
        assert_eq!(
            Shard::parse_with("4/4", none).unwrap_err(),
            ShardError::Index { index: 4, count: 4 }
        );
        assert_eq!(
            Shard::parse_with("0/0", none).unwrap_err(),
            ShardError::Count(0)
        );
        for bad in ["3", "a/4", "1/b", "", "/"] {
            assert!(
                matches!(Shard::parse_with(bad, none), Err(ShardError::Syntax(_))),
                "{bad}"
            );
        }
        assert_eq!(Shard { index: 1, count: 3 }.to_string(), "1/3");
    }

    #[test]
    fn every_source_has_exactly_one_shard() {
        for count in 1..=12 {
            for name in names(500) {
                let owners: Vec<u32> = (0..count)
                    .filter(|&i| Shard { index: i, count }.owns(&name))
                    .collect();
                assert_eq!(owners.len(), 1, "{name} in {count} shards: {owners:?}");
            }
        }
    }

    #[test]
    fn growing_the_set_moves_only_what_the_new_shard_takes() {
        let all = names(4000);
        for n in 1..=16u32 {
            let mut moved = 0;
            for name in &all {
                let (a, b) = (owner(name, n), owner(name, n + 1));
                if a != b {
                    assert_eq!(b, n, "{name} moved from {a} to {b} going {n} -> {}", n + 1);
                    moved += 1;
                }
            }
            // The new shard takes its fair share, 1/(n+1), within sampling noise.
            let fair = all.len() as f64 / f64::from(n + 1);
            assert!(
                (moved as f64 - fair).abs() < 0.2 * fair + 20.0,
                "{moved} moved going {n} -> {}, fair share {fair:.0}",
                n + 1
            );
        }
    }

    #[test]
    fn load_is_even() {
        let all = names(8000);
        let mut per = [0usize; 8];
        for name in &all {
            per[owner(name, 8) as usize] += 1;
        }
        for c in per {
            assert!((850..=1150).contains(&c), "{per:?}");
        }
    }

    /// Pinned owners: a change to the hash would reshuffle every fleet on upgrade, and mixed
    /// versions would run some cameras twice and others never.
    #[test]
    fn assignments_are_stable_across_builds() {
        let got: Vec<u32> = ["door", "yard", "cam-0001", "Lobby 2", "räum"]
            .iter()
            .map(|n| owner(n, 5))
            .collect();
        assert_eq!(got, PINNED);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    const PINNED: [u32; 5] = [1, 3, 1, 3, 1];

    #[test]
    fn retains_what_the_shard_owns_and_keeps_unparseable_uris() {
        let mut all: Vec<SourceConfig> = names(50)
            .iter()
            .map(|n| {
                let mut sc = SourceConfig::from_uri("test:");
                sc.name = Some(n.clone());
                sc
            })
            .collect();
        all.push(SourceConfig::from_uri("nonsense://"));
        let mut kept = 0;
        for i in 0..3 {
            let mut mine = all.clone();
            assert_eq!(retain(&mut mine, Shard { index: i, count: 3 }), 51);
            assert!(mine.iter().any(|s| s.uri == "nonsense://"));
            kept += mine.len() - 1;
        }
        assert_eq!(kept, 50);
    }
}
