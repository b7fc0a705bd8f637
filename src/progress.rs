//! A progress bar per file source on a terminal (quiet when stderr is piped): media seconds
//! analysed out of the file's duration, with an ETA.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::SourceConfig;
use crate::ingest::SourceInput;
use crate::source::{self, SourceKind};

pub struct Progress {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Starts only when stderr is a terminal and some sources are files.
    pub fn start(feeds: &[Arc<SourceInput>], sources: &[SourceConfig]) -> Option<Progress> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let files: Vec<Arc<SourceInput>> = feeds
            .iter()
            .zip(sources)
            .filter(|(_, s)| {
                matches!(
                    source::parse(&s.uri).map(|p| p.kind),
                    Ok(SourceKind::File(_))
                )
            })
            .map(|(f, _)| f.clone())
            .collect();
        if files.is_empty() {
            return None;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bars: Vec<(Arc<SourceInput>, ProgressBar)> = files
            .into_iter()
            .map(|f| {
                let b = multi.add(ProgressBar::new(1));
                b.set_style(style.clone());
                b.set_prefix(f.name.clone());
                (f, b)
            })
            .collect();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                for (feed, bar) in &bars {
                    let pos = feed.last_media_end().unwrap_or(0.0);
                    if let Some(total) = feed.duration() {
                        bar.set_length((total * 1000.0) as u64);
                        bar.set_message(format!("{pos:.0}/{total:.0} s"));
                    } else {
                        bar.set_message(format!("{pos:.0} s"));
                    }
                    bar.set_position((pos * 1000.0) as u64);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            for (_, bar) in &bars {
                bar.finish_and_clear();
            }
        });
        Some(Progress {
            done,
            thread: Some(thread),
        })
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
