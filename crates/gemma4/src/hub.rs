//! Downloads a model repository from the Hugging Face hub into the standard HF cache, the
//! layout `huggingface_hub` and `hf-hub` use, so either finds the files later:
//!
//! ```text
//! $HF_HUB_CACHE/models--google--gemma-4-E2B-it/
//!   blobs/<etag>                    file contents, named by the hub's etag
//!   blobs/<etag>.incomplete         a download in progress (resumed with a Range request)
//!   snapshots/<commit>/<file>       relative symlinks into blobs/
//!   refs/main                       the commit `main` pointed at
//! ```
//!
//! The hub is spoken to as `huggingface_hub` does: `GET {endpoint}/api/models/{id}/revision/
//! {rev}` names the commit and the files, `HEAD {endpoint}/{id}/resolve/{commit}/{file}`
//! (redirects not followed) gives the etag (`X-Linked-Etag` for LFS files) and size, and a
//! `GET` of the same URL (redirects followed) the bytes. `HF_ENDPOINT`, `HF_TOKEN` (else the
//! token file `huggingface-cli login` writes) and `HF_HUB_CACHE` / `HF_HOME` are honoured.
//! Gated repositories (all of Gemma) answer 401/403 without an accepted license: that is one
//! line saying what to do.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::loader::{hf_hub_cache_dir, LoadError, ModelFiles};

/// Where the hub is unless `HF_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files of a checkpoint besides the weights, fetched when the repository has them.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "special_tokens_map.json",
];

/// How often one file's download is resumed after the connection drops, within one run.
const RESUME_ATTEMPTS: u32 = 5;

/// A hub to download from.
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    cache: PathBuf,
    /// Follows redirects (file bodies live on a CDN).
    agent: ureq::Agent,
    /// Does not: the hub's own answer carries the etag of an LFS file.
    head_agent: ureq::Agent,
    /// Show a progress bar on stderr (it hides itself when stderr is not a terminal).
    pub progress: bool,
}

fn hub_err(repo: &str, message: impl Into<String>) -> LoadError {
    LoadError::Hub {
        repo: repo.into(),
        message: message.into(),
    }
}

fn io_err(path: &Path, source: std::io::Error) -> LoadError {
    LoadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `HF_TOKEN`, else the token file of `huggingface-cli login` (`$HF_HOME/token`, default
/// `~/.cache/huggingface/token`).
fn token_from_env() -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN") {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Some(t);
        }
    }
    let home = std::env::var("HF_HOME")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            std::env::var("HOME")
                .ok()
                .map(|h| PathBuf::from(h).join(".cache/huggingface"))
        })?;
    let t = fs::read_to_string(home.join("token")).ok()?;
    let t = t.trim().to_string();
    (!t.is_empty()).then_some(t)
}

/// An etag header as the blob name: quotes and the weak prefix removed.
fn blob_name(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

impl Hub {
    /// A client configured from the environment (`HF_ENDPOINT`, `HF_TOKEN`, cache folders).
    pub fn from_env() -> Result<Hub, LoadError> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let cache = hf_hub_cache_dir().ok_or_else(|| {
            LoadError::NotFound("no HF cache folder: set HF_HOME or HOME".to_string())
        })?;
        Ok(Hub::new(&endpoint, token_from_env(), cache))
    }

    pub fn new(endpoint: &str, token: Option<String>, cache: PathBuf) -> Hub {
        let agent = |redirects: u32| -> ureq::Agent {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(redirects)
                .timeout_connect(Some(Duration::from_secs(15)))
                .user_agent(concat!("percept/", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        };
        Hub {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            cache,
            agent: agent(10),
            head_agent: agent(0),
            progress: true,
        }
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    /// The one line for a status the download cannot go on from.
    fn status_err(&self, repo: &str, status: u16, what: &str) -> LoadError {
        match status {
            401 | 403 => hub_err(
                repo,
                format!(
                    "the hub refused access ({status}) to {what}: the repository is gated; accept \
                     its license on {}/{repo} and set HF_TOKEN to a token of that account{}",
                    DEFAULT_ENDPOINT,
                    if self.token.is_some() {
                        " (the HF_TOKEN given was refused)"
                    } else {
                        ""
                    }
                ),
            ),
            404 => hub_err(repo, format!("not found on the hub ({what})")),
            s => hub_err(repo, format!("the hub answered HTTP {s} for {what}")),
        }
    }

    fn unreachable(&self, repo: &str, e: &ureq::Error) -> LoadError {
        LoadError::NotFound(format!(
            "{repo} is not in the HF cache ({}) and the hub at {} cannot be reached ({e})",
            self.cache.display(),
            self.endpoint
        ))
    }

    /// Downloads `repo` at `main` (what a checkpoint needs: config, weights, tokenizer,
    /// templates) and returns its snapshot folder.
    pub fn download(&self, repo: &str) -> Result<ModelFiles, LoadError> {
        let revision = "main";
        let url = format!("{}/api/models/{repo}/revision/{revision}", self.endpoint);
        let mut resp = self
            .auth(self.agent.get(&url))
            .call()
            .map_err(|e| self.unreachable(repo, &e))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(self.status_err(repo, status, "the repository"));
        }
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| hub_err(repo, format!("reading the repository info: {e}")))?;
        let info: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| hub_err(repo, format!("parsing the repository info: {e}")))?;
        let commit = info
            .get("sha")
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric()))
            .ok_or_else(|| hub_err(repo, "the repository info has no commit sha"))?
            .to_string();
        let listed: BTreeSet<String> = info
            .get("siblings")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.get("rfilename").and_then(|n| n.as_str()))
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        let root = self
            .cache
            .join(format!("models--{}", repo.replace('/', "--")));
        let snapshot = root.join("snapshots").join(&commit);

        let mut files = vec!["config.json".to_string()];
        if listed.contains("model.safetensors.index.json") {
            files.push("model.safetensors.index.json".into());
        } else {
            files.push("model.safetensors".into());
        }
        files.extend(
            SIDE_FILES
                .iter()
                .filter(|f| listed.contains(**f))
                .map(|f| f.to_string()),
        );
        // The index names the shards: fetch it first.
        let mut all = Vec::new();
        let mut bar = Progress::new(self.progress, repo);
        for f in &files {
            self.fetch(repo, &commit, &root, f, &mut bar)?;
            all.push(f.clone());
        }
        if files.iter().any(|f| f == "model.safetensors.index.json") {
            let index = snapshot.join("model.safetensors.index.json");
            let text = fs::read_to_string(&index).map_err(|e| io_err(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LoadError::Parse {
                    path: index.clone(),
                    message: e.to_string(),
                })?;
            let shards: BTreeSet<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|f| f.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            for s in shards {
                self.fetch(repo, &commit, &root, &s, &mut bar)?;
            }
        }
        bar.finish();
        let refs = root.join("refs");
        fs::create_dir_all(&refs).map_err(|e| io_err(&refs, e))?;
        fs::write(refs.join(revision), &commit).map_err(|e| io_err(&refs, e))?;
        ModelFiles::from_dir(&snapshot)
    }

    /// One file into `blobs/` and its snapshot link, resuming a partial blob.
    fn fetch(
        &self,
        repo: &str,
        commit: &str,
        root: &Path,
        file: &str,
        bar: &mut Progress,
    ) -> Result<(), LoadError> {
        if file
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(hub_err(repo, format!("refusing the file name {file:?}")));
        }
        let link = root.join("snapshots").join(commit).join(file);
        if link.exists() {
            return Ok(());
        }
        let url = format!("{}/{repo}/resolve/{commit}/{file}", self.endpoint);
        let head = self
            .auth(self.head_agent.head(&url))
            .call()
            .map_err(|e| self.unreachable(repo, &e))?;
        let status = head.status().as_u16();
        if !(200..400).contains(&status) {
            return Err(self.status_err(repo, status, file));
        }
        let header = |name: &str| {
            head.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .map(|e| blob_name(&e))
            .filter(|e| !e.is_empty() && !e.contains(['/', '\\']) && !e.starts_with('.'))
            .ok_or_else(|| hub_err(repo, format!("no etag for {file}")))?;
        let size: Option<u64> = header("x-linked-size")
            .or_else(|| header("content-length"))
            .and_then(|s| s.parse().ok());
        let blobs = root.join("blobs");
        fs::create_dir_all(&blobs).map_err(|e| io_err(&blobs, e))?;
        let blob = blobs.join(&etag);
        if !blob.is_file() {
            self.fetch_blob(repo, &url, &blob, file, size, bar)?;
        }
        let parent = link.parent().unwrap_or(root);
        fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
        // snapshots/<commit>/<dirs...>/<file> -> ../../(../ per dir)blobs/<etag>
        let depth = file.matches('/').count() + 2;
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(&etag);
        link_or_copy(&target, &blob, &link)
    }

    fn fetch_blob(
        &self,
        repo: &str,
        url: &str,
        blob: &Path,
        file: &str,
        size: Option<u64>,
        bar: &mut Progress,
    ) -> Result<(), LoadError> {
        let partial = PathBuf::from(format!("{}.incomplete", blob.display()));
        bar.add_file(file, size);
        let mut attempts = 0;
        loop {
            let have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            if size == Some(have) && have > 0 {
                break;
            }
            bar.set_done(file, have);
            let mut req = self.auth(self.agent.get(url));
            if have > 0 {
                req = req.header("Range", format!("bytes={have}-"));
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(e) if attempts < RESUME_ATTEMPTS && have > 0 => {
                    attempts += 1;
                    tracing::warn!(%repo, file, error = %e, "Hub download interrupted; resuming.");
                    std::thread::sleep(Duration::from_millis(200 * u64::from(attempts)));
                    continue;
                }
                Err(e) => return Err(self.unreachable(repo, &e)),
            };
            let status = resp.status().as_u16();
            let append = match status {
                206 => true,
                200 => false,
                // The partial file is already whole, or longer than the blob: start over.
                416 => {
                    fs::remove_file(&partial).map_err(|e| io_err(&partial, e))?;
                    continue;
                }
                s => return Err(self.status_err(repo, s, file)),
            };
            let mut out = if append {
                OpenOptions::new().append(true).open(&partial)
            } else {
                File::create(&partial)
            }
            .map_err(|e| io_err(&partial, e))?;
            let mut done = if append { have } else { 0 };
            let mut reader = resp.into_body().into_reader();
            let mut buf = vec![0u8; 1 << 16];
            let result = loop {
                match reader.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        out.write_all(&buf[..n]).map_err(|e| io_err(&partial, e))?;
                        done += n as u64;
                        bar.set_done(file, done);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            out.flush().map_err(|e| io_err(&partial, e))?;
            drop(out);
            match result {
                Ok(()) if size.is_none_or(|s| s == done) => break,
                Ok(()) | Err(_) if attempts < RESUME_ATTEMPTS => {
                    attempts += 1;
                    tracing::warn!(%repo, file, have = done, "Hub download interrupted; resuming.");
                    std::thread::sleep(Duration::from_millis(200 * u64::from(attempts)));
                }
                _ => {
                    return Err(hub_err(
                        repo,
                        format!(
                            "{file}: the download stopped at {done} of {} bytes; run again to resume it",
                            size.map_or_else(|| "?".to_string(), |s| s.to_string())
                        ),
                    ))
                }
            }
        }
        fs::rename(&partial, blob).map_err(|e| io_err(blob, e))
    }
}

/// A relative symlink as the HF cache has it; a copy where links are not possible.
fn link_or_copy(target: &Path, blob: &Path, link: &Path) -> Result<(), LoadError> {
    #[cfg(unix)]
    {
        if std::os::unix::fs::symlink(target, link).is_ok() {
            return Ok(());
        }
    }
    let _ = target;
    fs::copy(blob, link)
        .map(|_| ())
        .map_err(|e| io_err(link, e))
}

/// One bar over all bytes of the download.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    files: std::collections::BTreeMap<String, (u64, u64)>,
}

impl Progress {
    fn new(show: bool, repo: &str) -> Progress {
        let bar = show.then(|| {
            let b = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                b.set_style(style);
            }
            b.set_message(format!("downloading {repo}"));
            b
        });
        Progress {
            bar,
            files: Default::default(),
        }
    }

    fn add_file(&mut self, file: &str, size: Option<u64>) {
        tracing::info!(file, bytes = size, "Downloading from the hub.");
        self.files.insert(file.to_string(), (0, size.unwrap_or(0)));
        self.redraw();
    }

    fn set_done(&mut self, file: &str, done: u64) {
        if let Some(e) = self.files.get_mut(file) {
            e.0 = done;
        }
        self.redraw();
    }

    fn redraw(&self) {
        if let Some(b) = &self.bar {
            let (done, total) = self
                .files
                .values()
                .fold((0, 0), |(d, t), (fd, ft)| (d + fd, t + ft.max(fd)));
            b.set_length(total);
            b.set_position(done);
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
