//! A source's task across runtime changes.

use std::sync::Arc;
use std::time::Instant;

use super::test_support::{source, task};
use super::*;
use crate::event::{Body, CaptionStatus};
use crate::metrics::Metrics;
use crate::queue::ByteBudget;

fn caption_job(class: JobClass, t: f64, end: f64) -> Job {
    Job {
        source: "mic".into(),
        task: TaskKind::Caption,
        class,
        t,
        end,
        frame: None,
        video: Vec::new(),
        audio: Some(Arc::new(vec![0.0; ((end - t) * 16_000.0) as usize])),
        prompt: String::new(),
        instructions: Default::default(),
        soft_tokens: 0,
        max_tokens: 8,
        attempt: 0,
        next_t0: None,
        captured: Instant::now(),
    }
}

fn answer(text: &str) -> Answer {
    Answer {
        text: text.into(),
        model_s: 0.1,
        prompt_tokens: 10,
        output_tokens: 3,
        batch: 1,
    }
}

fn captions(
    events: &crossbeam_channel::Receiver<crate::event::Event>,
) -> Vec<(String, CaptionStatus)> {
    events
        .try_iter()
        .filter_map(|e| match e.body {
            Body::Caption { text, status } => Some((text, status)),
            _ => None,
        })
        .collect()
}

/// Words the caption stabilizer held as a partial become final when the source's task
/// changes; they would otherwise never be final.
#[test]
fn switching_away_from_caption_makes_held_words_final() {
    let metrics = Arc::new(Metrics::new());
    let budget = ByteBudget::new(1 << 20);
    let s = source("mic", true, &metrics, &budget);
    let mut t = task(&s.feed, TaskKind::Caption, true);
    let follow = t.on_answer(
        &caption_job(JobClass::PartialAudio, 0.0, 2.0),
        &answer("the birds are singing"),
    );
    assert!(follow.is_none());
    let before = captions(&s.events);
    assert!(
        before.iter().all(|(_, st)| *st == CaptionStatus::Partial),
        "{before:?}"
    );
    assert!(!before.is_empty());

    let mut spec = t.spec.clone();
    spec.task = TaskKind::Describe;
    t.set_spec(spec);
    let after = captions(&s.events);
    let finals: Vec<&str> = after
        .iter()
        .filter(|(_, st)| *st == CaptionStatus::Final)
        .map(|(text, _)| text.as_str())
        .collect();
    assert_eq!(finals.join(" "), "the birds are singing", "{after:?}");

    // A caption window answered after the switch is final at once.
    t.on_answer(
        &caption_job(JobClass::PartialAudio, 4.0, 6.0),
        &answer("and the river runs"),
    );
    let late = captions(&s.events);
    assert!(
        late.iter()
            .any(|(text, st)| *st == CaptionStatus::Final && text == "and the river runs"),
        "{late:?}"
    );
}

/// A retask that keeps the kind keeps the caption state (only a new kind flushes it).
#[test]
fn new_questions_keep_the_task_state() {
    let metrics = Arc::new(Metrics::new());
    let budget = ByteBudget::new(1 << 20);
    let s = source("mic", true, &metrics, &budget);
    let mut t = task(&s.feed, TaskKind::Caption, true);
    t.on_answer(
        &caption_job(JobClass::PartialAudio, 0.0, 2.0),
        &answer("the birds are singing"),
    );
    let _ = captions(&s.events);
    let mut spec = t.spec.clone();
    spec.prompt = Some("Transcribe.".into());
    t.set_spec(spec);
    assert!(captions(&s.events).is_empty());
}
