//! What each configured source becomes before it starts: its `SourceSpec` (what to open,
//! its name, credentials) and `GraphParams`, and the key that says when a reload must
//! restart it.

use crate::config::{Config, SourceConfig};
use crate::ingest::graph::GraphParams;
use crate::source::{self, Credentials, SourceKind, SourceSpec};
use crate::tasks::TaskSpec;

use super::RunError;

pub(super) struct Prepared {
    pub(super) spec: SourceSpec,
    pub(super) params: GraphParams,
    pub(super) source: SourceConfig,
}

/// What a source's graph is built from: when a reload changes it, the source restarts.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct GraphKey {
    /// What to open, with RTSP credentials and transport.
    kind: SourceKind,
    pub(super) fps: f64,
    max_side: u32,
    keyframe_only: bool,
    sync: bool,
    chunk_seconds: f64,
    template: Option<String>,
    decoder_threads: u32,
}

impl Prepared {
    pub(super) fn key(&self) -> GraphKey {
        let p = &self.params;
        GraphKey {
            kind: self.spec.kind.clone(),
            fps: p.fps,
            max_side: p.max_side,
            keyframe_only: p.keyframe_only,
            sync: p.sync,
            chunk_seconds: p.chunk_seconds,
            template: p.custom_template.clone(),
            decoder_threads: p.decoder_threads,
        }
    }

    pub(super) fn task_spec(&self) -> TaskSpec {
        TaskSpec {
            task: self.source.task,
            questions: self.source.questions.clone(),
            prompt: self.source.prompt.clone(),
            window_frames: self.source.window_frames,
        }
    }
}

pub(super) fn prepare(cfg: &Config) -> Result<Vec<Prepared>, RunError> {
    let mut out = Vec::new();
    for sc in &cfg.sources {
        out.push(prepare_one(cfg, sc)?);
    }
    let mut specs: Vec<SourceSpec> = out.iter().map(|p| p.spec.clone()).collect();
    source::dedupe_names(&mut specs);
    for (p, s) in out.iter_mut().zip(specs) {
        p.spec.name = s.name;
    }
    Ok(out)
}

pub(super) fn prepare_one(cfg: &Config, sc: &SourceConfig) -> Result<Prepared, RunError> {
    {
        let mut spec = match &sc.path {
            // A recording named by the caller (`percept analyze`), never re-parsed as a URI.
            Some(path) => SourceSpec {
                name: sc.name.clone().unwrap_or_else(|| "recording".into()),
                kind: SourceKind::File(path.clone()),
                display: path.display().to_string(),
            },
            None => source::parse(&sc.uri).map_err(|e| RunError::Config(e.to_string()))?,
        };
        if let Some(n) = &sc.name {
            spec.name = n.clone();
        }
        if let SourceKind::Rtsp {
            credentials,
            transport,
            ..
        } = &mut spec.kind
        {
            if let Some(t) = sc.transport {
                *transport = t;
            }
            let password = match (&sc.password, &sc.password_env) {
                (Some(p), _) => Some(p.clone()),
                (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
                    RunError::Config(format!(
                        "source '{}': environment variable {var} is not set",
                        spec.name
                    ))
                })?),
                _ => None,
            };
            if sc.user.is_some() || password.is_some() {
                let c = credentials.get_or_insert_with(Credentials::default);
                if let Some(u) = &sc.user {
                    c.user = u.clone();
                }
                if let Some(p) = password {
                    c.password = p;
                }
            }
        }
        let custom_template = match &sc.template {
            Some(p) => Some(
                crate::ingest::template::read(p).map_err(|e| RunError::Config(e.to_string()))?,
            ),
            None => None,
        };
        let params = GraphParams {
            fps: sc.fps.unwrap_or(cfg.run.fps),
            max_side: cfg.video.max_side,
            keyframe_only: cfg.video.keyframe_only,
            sync: spec.kind.is_live() || cfg.run.realtime,
            chunk_seconds: cfg.audio.chunk_seconds,
            custom_template,
            rtsp_latency_ms: 200,
            decoder_threads: cfg.video.decoder_threads,
        };
        Ok(Prepared {
            spec,
            params,
            source: sc.clone(),
        })
    }
}
