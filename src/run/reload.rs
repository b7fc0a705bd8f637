//! Reloading the config (SIGHUP, `POST /v1/reload`): sources no longer listed go, new ones
//! start, changed graphs restart, the rest are retasked in place.

use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{one_line, Config, SourceConfig};
use crate::control::{ControlApi, ControlError};
use crate::lock;
use crate::source::{self, SourceSpec};
use crate::tasks::TaskSpec;

use super::prepare::{prepare_one, GraphKey};
use super::{merge, Shared};

impl Shared {
    /// SIGHUP / `POST /v1/reload`: re-reads the config file and applies it.
    pub(super) fn reload_config(&self) -> Result<(), ControlError> {
        let Some(path) = &self.overrides.config_path else {
            return Err(ControlError::Invalid(
                "percept was started without --config: nothing to reload".into(),
            ));
        };
        let fresh =
            Config::load(path).map_err(|e| ControlError::Invalid(one_line(&e.to_string())))?;
        let fresh = merge(fresh, &self.overrides);
        tracing::info!(config = %path.display(), "Reloading the config.");
        // Sources added or restarted now are built with the fresh settings.
        *lock(&self.cfg) = fresh.clone();
        // Sources: the file's list wins unless --source flags replaced it.
        if self.overrides.sources.is_empty() {
            let failures = self.reload_sources(&fresh);
            if !failures.is_empty() {
                return Err(ControlError::Invalid(format!(
                    "reloaded except {} source(s): {}",
                    failures.len(),
                    failures.join("; ")
                )));
            }
        }
        Ok(())
    }

    /// Waits (a bounded time) until a removed source's thread has ended, so a source
    /// restarted under the same name does not see the old one's last state land after its
    /// own first.
    fn wait_stopped(&self, name: &str) {
        let t0 = Instant::now();
        loop {
            let done = lock(&self.sources)
                .iter()
                .filter(|r| r.spec.name == name && r.removed)
                .all(|r| r.handle.as_ref().is_none_or(JoinHandle::is_finished));
            if done {
                return;
            }
            if t0.elapsed() > RESTART_WAIT {
                tracing::warn!(source = %name, "The source's old graph is still stopping; starting the new one anyway.");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Applies the sources of a fresh config: sources no longer listed are removed, new ones
    /// added, those whose graph changed (URI, fps, credentials, transport, template, ...)
    /// restarted, the others retasked in place. Names are derived and deduplicated as at
    /// startup. A source that cannot be applied does not stop the others; every failure is
    /// returned.
    fn reload_sources(&self, fresh: &Config) -> Vec<String> {
        let mut failures = Vec::new();
        let mut wanted: Vec<SourceConfig> = Vec::new();
        let mut specs: Vec<SourceSpec> = Vec::new();
        for sc in &fresh.sources {
            match source::parse(&sc.uri) {
                Ok(mut spec) => {
                    if let Some(n) = &sc.name {
                        spec.name = n.clone();
                    }
                    specs.push(spec);
                    wanted.push(sc.clone());
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        source::dedupe_names(&mut specs);
        for (sc, spec) in wanted.iter_mut().zip(&specs) {
            sc.name = Some(spec.name.clone());
        }
        let current: Vec<(String, GraphKey)> = lock(&self.sources)
            .iter()
            .filter(|r| !r.removed)
            .map(|r| (r.spec.name.clone(), r.key.clone()))
            .collect();
        for (name, _) in &current {
            if !wanted
                .iter()
                .any(|sc| sc.name.as_deref() == Some(name.as_str()))
            {
                let _ = self.remove(name);
            }
        }
        for sc in wanted {
            let name = sc.name.clone().unwrap_or_default();
            let mut failed = |e: &dyn std::fmt::Display| {
                let e = one_line(&e.to_string());
                tracing::error!(source = %name, error = %e, "Reload: source not applied.");
                failures.push(if e.contains(&format!("'{name}'")) {
                    e
                } else {
                    format!("source '{name}': {e}")
                });
            };
            let Some((_, key)) = current.iter().find(|(n, _)| *n == name) else {
                if let Err(e) = self.add_config(sc) {
                    failed(&e);
                }
                continue;
            };
            let p = match prepare_one(fresh, &sc) {
                Ok(p) => p,
                Err(e) => {
                    failed(&e);
                    continue;
                }
            };
            if p.key() != *key {
                tracing::info!(source = %name, uri = %p.spec.display, "Source changed; restarting it.");
                self.restarting.fetch_add(1, Ordering::SeqCst);
                let _ = self.remove(&name);
                self.wait_stopped(&name);
                let added = self.add_config(sc);
                self.restarting.fetch_sub(1, Ordering::SeqCst);
                if let Err(e) = added {
                    failed(&e);
                }
            } else if let Err(e) = self.retask(&name, p.task_spec()) {
                failed(&e);
            }
        }
        failures
    }

    /// A reload's task settings for a running source (kept when they did not change).
    fn retask(&self, name: &str, spec: TaskSpec) -> Result<(), ControlError> {
        let mut sources = lock(&self.sources);
        let Some(r) = sources
            .iter_mut()
            .find(|r| r.spec.name == name && !r.removed)
        else {
            return Err(ControlError::NotFound(name.to_string()));
        };
        // Without the model (`[model] enabled = false`) there is no task to change.
        if r.task.as_ref().is_some_and(|old| *old != spec) {
            tracing::info!(source = %name, task = spec.task.as_str(), questions = spec.questions.len(), "Task changed.");
            self.send_task(r, spec);
        }
        Ok(())
    }
}

/// How long a reload waits for a restarted source's old graph to stop.
const RESTART_WAIT: Duration = Duration::from_secs(10);
