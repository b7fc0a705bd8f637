//! The control API (`/v1/sources`, `/v1/reload`) over a running run: every call that
//! changes a source's task is a message to the worker, which owns the task.

use std::sync::atomic::Ordering;

use crate::config::{SourceConfig, TaskKind};
use crate::control::{AddSource, ControlApi, ControlError, SourceInfo, TaskUpdate};
use crate::lock;
use crate::tasks::TaskSpec;
use crate::worker::Control;

use super::prepare::prepare_one;
use super::{Running, Shared};

impl Shared {
    fn apply_task(&self, r: &mut Running, u: TaskUpdate) -> Result<(), ControlError> {
        let Some(old) = &r.task else {
            return Err(ControlError::Invalid(format!(
                "source '{}' runs without the model (task none or model disabled); remove and add it again with a task",
                r.spec.name
            )));
        };
        let mut spec = old.clone();
        if let Some(k) = u.task {
            spec.task = k;
        }
        if let Some(q) = u.questions {
            spec.questions = q;
        }
        if let Some(p) = u.prompt {
            spec.prompt = (!p.is_empty()).then_some(p);
        }
        if spec.task == TaskKind::Watch && spec.questions.is_empty() {
            return Err(ControlError::Invalid(
                "task 'watch' needs at least one question".into(),
            ));
        }
        tracing::info!(source = %r.spec.name, task = spec.task.as_str(), questions = spec.questions.len(), "Task changed.");
        self.send_task(r, spec);
        Ok(())
    }

    /// Tells the worker, which owns the task, and keeps what it was told for `list`.
    pub(super) fn send_task(&self, r: &mut Running, spec: TaskSpec) {
        r.task = Some(spec.clone());
        let _ = self.ctl_tx.send(Control::SetTask {
            name: r.spec.name.clone(),
            spec,
        });
    }

    /// Adds a source from its full config (the control API and reloads). The name check and
    /// the insert happen under one lock: of two requests for one name, the second gets 409.
    pub(super) fn add_config(&self, sc: SourceConfig) -> Result<SourceInfo, ControlError> {
        if self.closing.load(Ordering::Relaxed) {
            return Err(ControlError::ShuttingDown);
        }
        let mut cfg = lock(&self.cfg).clone();
        cfg.sources = vec![sc.clone()];
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(ControlError::Invalid(problems.join("; ")));
        }
        let p = prepare_one(&cfg, &sc).map_err(|e| ControlError::Invalid(e.to_string()))?;
        let name = p.spec.name.clone();
        if let Some(s) = self.overrides.shard {
            s.check(&name).map_err(ControlError::Conflict)?;
        }
        let mut sources = lock(&self.sources);
        if sources.iter().any(|r| r.spec.name == name && !r.removed) {
            return Err(ControlError::Conflict(format!(
                "a source named '{name}' exists"
            )));
        }
        let r = self
            .start(p)
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        let info = self.info(&r);
        sources.push(r);
        Ok(info)
    }
}

impl ControlApi for Shared {
    fn list(&self) -> Vec<SourceInfo> {
        lock(&self.sources)
            .iter()
            .filter(|r| !r.removed)
            .map(|r| self.info(r))
            .collect()
    }

    fn add(&self, req: AddSource) -> Result<SourceInfo, ControlError> {
        let mut sc = SourceConfig::from_uri(&req.uri);
        sc.name = req.name;
        sc.fps = req.fps;
        sc.task = req.task.unwrap_or_default();
        sc.questions = req.questions;
        sc.prompt = req.prompt;
        self.add_config(sc)
    }

    fn remove(&self, name: &str) -> Result<(), ControlError> {
        let mut sources = lock(&self.sources);
        let r = sources
            .iter_mut()
            .find(|r| r.spec.name == name && !r.removed)
            .ok_or_else(|| ControlError::NotFound(name.to_string()))?;
        r.removed = true;
        r.stop.store(true, Ordering::Relaxed);
        self.env.live_board.remove_source(name);
        tracing::info!(source = %name, "Removing source.");
        // The slot goes first, so its skipped jobs reach the worker before the removal
        // (they become `gap` events); the worker then drops the task, and with it the
        // summary frames, transcript and windows it held.
        self.dispatch.remove_source(name);
        let _ = self.ctl_tx.send(Control::Remove(name.to_string()));
        Ok(())
    }

    fn set_task(&self, name: &str, u: TaskUpdate) -> Result<SourceInfo, ControlError> {
        let mut sources = lock(&self.sources);
        let r = sources
            .iter_mut()
            .find(|r| r.spec.name == name && !r.removed)
            .ok_or_else(|| ControlError::NotFound(name.to_string()))?;
        self.apply_task(r, u)?;
        Ok(self.info(r))
    }

    fn reload(&self) -> Result<(), ControlError> {
        self.reload_config()
    }
}
