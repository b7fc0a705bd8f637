#![cfg(feature = "hub")]
#![allow(clippy::unwrap_used)]
//! Hub downloads against a local server that answers like the Hugging Face hub (the API
//! `huggingface_hub` uses: `/api/models/{id}/revision/{rev}`, `HEAD`/`GET
//! /{id}/resolve/{rev}/{file}` with etag / `X-Linked-Etag` / `X-Repo-Commit` headers and a
//! redirect to a CDN for weights), serving a tiny checkpoint. No test reaches the internet.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gemma4::generate::{Request, Sampling};
use gemma4::hub::Hub;
use gemma4::multimodal::SoftTokens;
use gemma4::testing::{temp_model_dir, write_tiny_checkpoint, TinySpec};
use gemma4::text::LoadOptions;
use gemma4::Gemma4;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const REPO: &str = "acme/tiny-gemma";

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

struct FakeHub {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// Serves the files of `dir` as repository `REPO` at commit `SHA`. `.safetensors` files are
/// LFS files (302 to `/cdn/...`, which needs no token). The first GET of `cut` is cut off halfway. With `token`,
/// every request without `Authorization: Bearer <token>` gets 403.
fn serve(dir: PathBuf, cut: Option<&'static str>, token: Option<&'static str>) -> FakeHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let cut_done = Arc::new(Mutex::new(false));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (dir, log, cut_done) = (dir.clone(), log.clone(), cut_done.clone());
            std::thread::spawn(move || handle(stream, &dir, &log, cut, token, &cut_done));
        }
    });
    FakeHub { base, seen }
}

fn etag_of(bytes: &[u8]) -> String {
    // Any stable content hash will do for the fake hub.
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}{:08x}", bytes.len())
}

fn handle(
    mut stream: TcpStream,
    dir: &Path,
    log: &Mutex<Vec<Seen>>,
    cut: Option<&str>,
    token: Option<&str>,
    cut_done: &Mutex<bool>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let seen = Seen {
        method: method.clone(),
        path: path.clone(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
    };
    log.lock().unwrap().push(seen.clone());
    let mut respond = |status: &str, extra: &[(String, String)], body: &[u8], send: usize| {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let _ = stream.write_all(head.as_bytes());
        if method != "HEAD" {
            let _ = stream.write_all(&body[..send.min(body.len())]);
        }
        let _ = stream.flush();
    };
    // CDN URLs are pre-signed, as the hub's are: the client drops the token on the redirect.
    if let (Some(t), false) = (token, path.starts_with("/cdn/")) {
        if seen.auth.as_deref() != Some(&format!("Bearer {t}")) {
            respond(
                "403 Forbidden",
                &[],
                b"Access to model is restricted.",
                usize::MAX,
            );
            return;
        }
    }
    let api = format!("/api/models/{REPO}/revision/main");
    if path == api {
        let siblings: Vec<serde_json::Value> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| serde_json::json!({"rfilename": e.file_name().to_string_lossy()}))
            .collect();
        let body = serde_json::json!({"id": REPO, "sha": SHA, "siblings": siblings}).to_string();
        respond("200 OK", &[], body.as_bytes(), usize::MAX);
        return;
    }
    let resolve = format!("/{REPO}/resolve/{SHA}/");
    let (file, cdn) = if let Some(f) = path.strip_prefix(&resolve) {
        (f.to_string(), false)
    } else if let Some(f) = path.strip_prefix("/cdn/") {
        (f.to_string(), true)
    } else {
        respond("404 Not Found", &[], b"", usize::MAX);
        return;
    };
    let Ok(bytes) = std::fs::read(dir.join(&file)) else {
        respond(
            "404 Not Found",
            &[("X-Error-Code".into(), "EntryNotFound".into())],
            b"",
            0,
        );
        return;
    };
    let etag = format!("\"{}\"", etag_of(&bytes));
    let lfs = file.ends_with(".safetensors");
    if lfs && !cdn {
        // The hub's answer for an LFS file: a redirect carrying the blob's identity.
        let extra = [
            ("X-Repo-Commit".to_string(), SHA.to_string()),
            ("X-Linked-Etag".to_string(), etag),
            ("X-Linked-Size".to_string(), bytes.len().to_string()),
            ("ETag".to_string(), "\"pointer-etag\"".to_string()),
            ("Location".to_string(), format!("/cdn/{file}")),
        ];
        respond("302 Found", &extra, b"", 0);
        return;
    }
    let mut extra = vec![
        ("X-Repo-Commit".to_string(), SHA.to_string()),
        ("ETag".to_string(), etag),
        ("Accept-Ranges".to_string(), "bytes".to_string()),
    ];
    if let Some(start) = seen
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|s| s.parse::<usize>().ok())
    {
        extra.push((
            "Content-Range".into(),
            format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len()),
        ));
        respond("206 Partial Content", &extra, &bytes[start..], usize::MAX);
        return;
    }
    let mut send = usize::MAX;
    if method == "GET" && cut == Some(file.as_str()) {
        let mut done = cut_done.lock().unwrap();
        if !*done {
            *done = true;
            send = bytes.len() / 2;
        }
    }
    respond("200 OK", &extra, &bytes, send);
}

fn fixture(tag: &str) -> PathBuf {
    let spec = TinySpec {
        sharded: true,
        ..TinySpec::default()
    };
    write_tiny_checkpoint(&temp_model_dir(tag), &spec).unwrap()
}

fn greedy(dir: &Path) -> Vec<u32> {
    let g = Gemma4::load_dir(dir, &LoadOptions::default()).unwrap();
    let req = Request {
        input_ids: (0..6).map(|i| 282 + i * 5).collect(),
        soft: SoftTokens::default(),
        max_new_tokens: 6,
        sampling: Sampling::default(),
    };
    g.generate(&[req], 6, &mut |_, _| {}).unwrap()[0]
        .output_ids
        .clone()
}

#[test]
fn download_fills_the_hf_cache_and_resumes_an_interrupted_shard() {
    let src = fixture("hub-src");
    let shard = "model-00001-of-00002.safetensors";
    let hub = serve(src.clone(), Some(shard), None);
    let cache = temp_model_dir("hub-cache");
    let mut client = Hub::new(&hub.base, None, cache.clone());
    client.progress = false;
    let files = client.download(REPO).unwrap();

    let root = cache.join("models--acme--tiny-gemma");
    assert_eq!(files.dir, root.join("snapshots").join(SHA));
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        SHA
    );
    for name in [
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "chat_template.jinja",
        "model.safetensors.index.json",
        shard,
        "model-00002-of-00002.safetensors",
    ] {
        let link = files.dir.join(name);
        let target = std::fs::read_link(&link).unwrap();
        assert!(target.starts_with("../../blobs"), "{name}: {target:?}");
        assert_eq!(
            std::fs::read(&link).unwrap(),
            std::fs::read(src.join(name)).unwrap(),
            "{name}"
        );
    }
    let blobs: Vec<String> = std::fs::read_dir(root.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        blobs.iter().all(|b| !b.ends_with(".incomplete")),
        "{blobs:?}"
    );

    // The cut-off shard was fetched twice: whole, then the rest with a Range request.
    let seen = hub.seen.lock().unwrap().clone();
    let gets: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.method == "GET" && s.path == format!("/cdn/{shard}"))
        .collect();
    let half = std::fs::metadata(src.join(shard)).unwrap().len() / 2;
    assert_eq!(gets.len(), 2, "{seen:?}");
    assert_eq!(gets[0].range, None);
    assert_eq!(
        gets[1].range.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );

    // The downloaded folder is a working checkpoint: the same tokens as the source.
    assert_eq!(greedy(&files.dir), greedy(&src));

    // A second run finds everything in the cache and fetches no file again.
    let before = hub.seen.lock().unwrap().len();
    client.download(REPO).unwrap();
    let again: Vec<Seen> = hub.seen.lock().unwrap()[before..].to_vec();
    assert!(
        again.iter().all(|s| s.path.starts_with("/api/")),
        "{again:?}"
    );
    std::fs::remove_dir_all(&cache).ok();
    std::fs::remove_dir_all(&src).ok();
}

#[test]
fn a_partial_blob_from_an_earlier_run_is_resumed() {
    let src = fixture("hub-partial");
    let shard = "model-00002-of-00002.safetensors";
    let hub = serve(src.clone(), None, None);
    let cache = temp_model_dir("hub-partial-cache");
    let bytes = std::fs::read(src.join(shard)).unwrap();
    let blobs = cache.join("models--acme--tiny-gemma/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let have = bytes.len() / 3;
    std::fs::write(
        blobs.join(format!("{}.incomplete", etag_of(&bytes))),
        &bytes[..have],
    )
    .unwrap();
    let mut client = Hub::new(&hub.base, None, cache.clone());
    client.progress = false;
    let files = client.download(REPO).unwrap();
    assert_eq!(std::fs::read(files.dir.join(shard)).unwrap(), bytes);
    let seen = hub.seen.lock().unwrap().clone();
    let get = seen
        .iter()
        .find(|s| s.method == "GET" && s.path == format!("/cdn/{shard}"))
        .unwrap();
    assert_eq!(
        get.range.as_deref(),
        Some(format!("bytes={have}-").as_str())
    );
    std::fs::remove_dir_all(&cache).ok();
    std::fs::remove_dir_all(&src).ok();
}

#[test]
fn a_gated_repository_says_to_accept_the_license_and_honours_the_token() {
    let src = fixture("hub-gated");
    let hub = serve(src.clone(), None, Some("hf_secret_token"));
    let cache = temp_model_dir("hub-gated-cache");
    let mut anonymous = Hub::new(&hub.base, None, cache.clone());
    anonymous.progress = false;
    let e = anonymous.download(REPO).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(
        e.contains("403") && e.contains("accept") && e.contains("HF_TOKEN"),
        "{e}"
    );
    let mut wrong = Hub::new(&hub.base, Some("hf_wrong".into()), cache.clone());
    wrong.progress = false;
    let e = wrong.download(REPO).unwrap_err().to_string();
    assert!(e.contains("refused") && !e.contains("hf_wrong"), "{e}");
    let mut client = Hub::new(&hub.base, Some("hf_secret_token".into()), cache.clone());
    client.progress = false;
    let files = client.download(REPO).unwrap();
    assert!(files.dir.join("config.json").is_file());
    let seen = hub.seen.lock().unwrap().clone();
    assert!(seen
        .iter()
        .any(|s| s.auth.as_deref() == Some("Bearer hf_secret_token")));
    // The token never leaves for another host's URL.
    assert!(seen
        .iter()
        .filter(|s| s.path.starts_with("/cdn/"))
        .all(|s| s.auth.is_none()));
    std::fs::remove_dir_all(&cache).ok();
    std::fs::remove_dir_all(&src).ok();
}

#[test]
fn model_ids_resolve_through_hf_endpoint_and_offline_says_so() {
    // The environment is process-wide: every env-driven check lives in this one test.
    let src = fixture("hub-env");
    let hub = serve(src.clone(), None, None);
    let cache = temp_model_dir("hub-env-cache");
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::remove_var("HF_TOKEN");
    std::env::set_var("HF_HOME", cache.join("no-token-here"));
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let e = gemma4::loader::ModelFiles::resolve(REPO)
        .unwrap_err()
        .to_string();
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
    std::env::remove_var("HF_HUB_OFFLINE");
    // Nothing listens here: unreachable is a plain "not found", as offline.
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let e = gemma4::loader::ModelFiles::resolve(REPO)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot be reached"), "{e}");
    std::env::set_var("HF_ENDPOINT", &hub.base);
    let files = gemma4::loader::ModelFiles::resolve(REPO).unwrap();
    assert!(files.dir.starts_with(&cache));
    // And from the cache alone afterwards.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let again = gemma4::loader::ModelFiles::resolve(REPO).unwrap();
    assert_eq!(again.dir, files.dir);
    std::env::remove_var("HF_HUB_OFFLINE");
    std::fs::remove_dir_all(&cache).ok();
    std::fs::remove_dir_all(&src).ok();
}
