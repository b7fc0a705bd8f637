//! Alert snapshot files: `<snapshot_dir>/<source>/<UTC wall time>_t<media seconds>.jpg`.
//!
//! Media time starts again at zero on every run (and on every reconnect of some sources),
//! so it cannot name a file alone: the wall-clock time comes first (names sort by when
//! the alert happened), the media time after it (to find the moment in the events), and a
//! file is only ever created new, never replaced: a clash (two alerts in one millisecond)
//! gets a `-2`, `-3`... suffix.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes `jpeg` to a new file in `dir` and returns its path; never overwrites a file.
pub fn write_new(dir: &Path, media_t: f64, jpeg: &[u8]) -> std::io::Result<PathBuf> {
    let stem = format!(
        "{}_t{:010.3}",
        utc_stamp(SystemTime::now()),
        media_t.max(0.0)
    );
    for k in 1..1000u32 {
        let name = if k == 1 {
            format!("{stem}.jpg")
        } else {
            format!("{stem}-{k}.jpg")
        };
        let path = dir.join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(jpeg)?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("{stem}: 999 snapshots with this name already"),
    ))
}

/// `YYYYMMDDTHHMMSS.mmmZ` (UTC; file-name safe, sorts by time).
pub fn utc_stamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{day:02}T{:02}{:02}{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day): Howard Hinnant's
/// `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_are_utc_calendar_times() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_millis(s * 1000 + ms);
        assert_eq!(utc_stamp(at(0, 0)), "19700101T000000.000Z");
        // 2000-02-29 (a leap day) 12:34:56.789
        assert_eq!(utc_stamp(at(951_827_696, 789)), "20000229T123456.789Z");
        // 2026-12-03 07:57:25
        assert_eq!(utc_stamp(at(1_796_284_645, 5)), "20261203T075725.005Z");
    }

    #[test]
    fn the_same_media_time_never_overwrites() {
        let d = std::env::temp_dir().join(format!("percept-snapshot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let a = write_new(&d, 1.5, b"first").unwrap();
        let b = write_new(&d, 1.5, b"second").unwrap();
        assert_ne!(a, b);
        assert_eq!(std::fs::read(&a).unwrap(), b"first");
        assert_eq!(std::fs::read(&b).unwrap(), b"second");
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.ends_with("_t000001.500.jpg"), "{name}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
