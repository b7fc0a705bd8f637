//! Every shipped config parses; `percept config check` lists all problems at once.

use crate::common::*;
use std::process::Command;

#[test]
fn every_file_in_config_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let cfg = percept::config::Config::parse(&text)
                .unwrap_or_else(|p| panic!("{}: {p:?}", path.display()));
            assert_eq!(cfg.validate(), Vec::<String>::new(), "{}", path.display());
            n += 1;
        }
    }
    assert!(n >= 4, "default + three examples");
}

#[test]
fn config_check_reports_every_problem() {
    let d = tmpdir("cfgcheck");
    let bad = d.join("bad.toml");
    std::fs::write(
        &bad,
        "[run]\nfps = -1\n[video]\nsize = 3\n[[source]]\nuri = \"ftp://x\"\n[[source]]\nuri = \"a.mp4\"\ncolour = 1\n",
    )
    .unwrap();
    let out = Command::new(percept_bin())
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[video]") && text.contains("size"), "{text}");
    assert!(
        text.contains("[[source]] #2") && text.contains("colour"),
        "{text}"
    );
    assert!(text.contains("[run] fps must be in (0, 120]"), "{text}");
    assert!(text.contains("unsupported scheme 'ftp'"), "{text}");
    let good = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    let out = Command::new(percept_bin())
        .args(["config", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
