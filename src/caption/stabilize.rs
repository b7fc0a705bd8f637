//! Model transcripts of overlapping, growing audio windows turned into caption updates that
//! a viewer can trust: `partial` captions show the current hypothesis and may change,
//! `final` captions never change, never repeat and are never contradicted.
//!
//! - Agreement: a word becomes final once two consecutive hypotheses of the same window agree
//!   on it and everything before it (LocalAgreement-2, as in whisper_streaming), or when its
//!   window is final.
//! - Overlap: a window that starts before the end of the final text (after a cut at the
//!   maximum window length) hears words that are already final. They are removed by matching
//!   the finalized tail words against the start of the new transcript (up to two leading words
//!   may be fragments of a word cut at the window edge); when nothing matches, words whose
//!   estimated time lies before the end of the final text are dropped instead.
//! - Cuts: a window cut at the maximum length (see [`AudioWindow::next_t0`]) may end inside a
//!   word, so its words in the second half of the overlap are left for the next window,
//!   which hears them whole.
//! - Word times are not known (the model returns text only): each word's time is interpolated
//!   across its window by character position, so a word that starts 40% into the text is
//!   placed 40% into the window. Good enough for subtitles; silence at the window edges
//!   stretches the estimate.
//! - Final text is emitted as cues of at most [`MAX_CUE_CHARS`] characters (two lines of 42)
//!   and [`MAX_CUE_SECONDS`]; a cue also ends at a sentence end and when its window is final.

use std::collections::VecDeque;

use crate::caption::window::AudioWindow;
use crate::event::CaptionStatus;

/// Longest final cue, in characters: two subtitle lines of 42.
pub const MAX_CUE_CHARS: usize = 84;
/// Longest final cue, in media seconds.
pub const MAX_CUE_SECONDS: f64 = 7.0;
/// Finalized words remembered for the overlap match; a 2 s overlap holds far fewer.
const TAIL_WORDS: usize = 16;
/// Leading words of a window that may be fragments of a word cut at its edge.
const MAX_LEAD_FRAGMENTS: usize = 2;
/// Window start times closer than this are the same window.
const SAME_WINDOW_SECONDS: f64 = 1e-6;

/// One caption for the event stream (and, when `final`, the subtitle files).
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionUpdate {
    /// Media seconds: estimated start of the first word.
    pub t: f64,
    /// Media seconds: estimated end of the last word.
    pub end: f64,
    pub text: String,
    pub status: CaptionStatus,
}

#[derive(Debug, Clone)]
struct Word {
    text: String,
    /// Lowercase letters and digits only, so "Hello," and "hello" agree.
    key: String,
    start: f64,
    end: f64,
}

/// How a transcript's window ends.
#[derive(Debug, Clone, Copy)]
enum End {
    Partial,
    Final,
    /// Cut at the maximum length; words ending after this time are left to the next window.
    Cut(f64),
}

#[derive(Debug, Clone)]
struct WindowState {
    t0: f64,
    /// Final words as they stood when this window began (what its overlap may repeat).
    prior_tail: Vec<Word>,
    prior_end: f64,
    /// Keys of this window's own words made final so far, in order.
    committed: Vec<String>,
    /// The previous hypothesis' words after the committed ones.
    tentative: Vec<Word>,
}

/// Per-source caption state; feed it every transcript of the source's audio windows in the
/// order the windows were cut.
#[derive(Debug, Clone, Default)]
pub struct Stabilizer {
    tail: VecDeque<Word>,
    /// End of the latest final word (media seconds); nothing final is placed before it.
    final_end: f64,
    /// Final words not yet emitted in a cue.
    open: Vec<Word>,
    window: Option<WindowState>,
    last_partial: Option<String>,
}

impl Stabilizer {
    pub fn new() -> Stabilizer {
        Stabilizer::default()
    }

    /// Continues after captions already final (resuming an interrupted analysis): nothing is
    /// made final before `final_end`, and a window that overlaps it has the words of
    /// `last_text` (the latest final caption) removed from its start.
    pub fn resume(final_end: f64, last_text: &str) -> Stabilizer {
        let mut tail: VecDeque<Word> = timed_words(last_text, final_end, final_end).into();
        while tail.len() > TAIL_WORDS {
            tail.pop_front();
        }
        Stabilizer {
            tail,
            final_end,
            ..Stabilizer::default()
        }
    }

    /// The model's transcript `text` of the window `[t0, t1)` (media seconds). Returns the
    /// final cues this makes (in time order), then at most one partial caption with the
    /// current hypothesis (only when it changed).
    pub fn push(&mut self, t0: f64, t1: f64, text: &str, is_final: bool) -> Vec<CaptionUpdate> {
        let end = if is_final { End::Final } else { End::Partial };
        self.push_as(t0, t1, text, end)
    }

    /// A final window cut at the maximum length, whose end the next window (starting at
    /// `next_t0`) hears again: its words in the second half of that overlap are left to the
    /// next window, because a word cut at this window's end comes out as a fragment here.
    /// The open cue stays open, as speech goes on.
    pub fn push_cut(&mut self, t0: f64, t1: f64, text: &str, next_t0: f64) -> Vec<CaptionUpdate> {
        self.push_as(t0, t1, text, End::Cut((next_t0 + t1) / 2.0))
    }

    /// [`push`](Self::push) or [`push_cut`](Self::push_cut) as the window says.
    pub fn push_window(&mut self, window: &AudioWindow, text: &str) -> Vec<CaptionUpdate> {
        match (window.is_final, window.next_t0) {
            (true, Some(next)) => self.push_cut(window.t0, window.end(), text, next),
            (is_final, _) => self.push(window.t0, window.end(), text, is_final),
        }
    }

    fn push_as(&mut self, t0: f64, t1: f64, text: &str, end: End) -> Vec<CaptionUpdate> {
        let words = timed_words(&suppress_repetition(text), t0, t1.max(t0));
        let same = self
            .window
            .as_ref()
            .is_some_and(|w| (w.t0 - t0).abs() < SAME_WINDOW_SECONDS);
        if !same {
            self.window = Some(WindowState {
                t0,
                prior_tail: self.tail.iter().cloned().collect(),
                prior_end: self.final_end,
                committed: Vec::new(),
                tentative: Vec::new(),
            });
        }
        let mut out = Vec::new();
        let Some(mut ws) = self.window.take() else {
            return out;
        };
        let skip = overlap_skip(&words, &ws.prior_tail, ws.prior_end, t0);
        let own = &words[skip..];
        let pos = committed_end_in(own, &ws.committed, self.final_end);
        let tentative = &own[pos..];
        let agreed = match end {
            End::Partial => common_prefix(&ws.tentative, tentative),
            End::Final => tentative.len(),
            End::Cut(hold_from) => tentative.iter().take_while(|w| w.end <= hold_from).count(),
        };
        for w in &tentative[..agreed] {
            ws.committed.push(w.key.clone());
            self.commit(w.clone(), &mut out);
        }
        // A cue the next word cannot join is closed now rather than when that word is
        // final: the viewer gets it a partial period or two sooner.
        if let Some(next) = tentative.get(agreed) {
            if !self.fits(next) {
                self.close_cue(&mut out);
            }
        }
        match end {
            End::Partial => {}
            End::Final => {
                self.close_cue(&mut out);
                self.last_partial = None;
                return out;
            }
            End::Cut(_) => {
                // Until the next window is heard, the held-back words are the hypothesis.
                if let Some(p) = self.partial(&tentative[agreed..]) {
                    out.push(p);
                }
                return out;
            }
        }
        ws.tentative = tentative[agreed..].to_vec();
        if let Some(p) = self.partial(&ws.tentative) {
            out.push(p);
        }
        self.window = Some(ws);
        out
    }

    /// End of input: what is still tentative becomes final (nothing will revise it now).
    pub fn finish(&mut self) -> Vec<CaptionUpdate> {
        let mut out = Vec::new();
        if let Some(ws) = self.window.take() {
            for w in ws.tentative {
                self.commit(w, &mut out);
            }
        }
        self.close_cue(&mut out);
        self.last_partial = None;
        out
    }

    fn commit(&mut self, mut w: Word, out: &mut Vec<CaptionUpdate>) {
        // Interpolated times of a later window can fall before text already final; final
        // captions must stay in order, so they are pushed forward.
        w.start = w.start.max(self.final_end);
        w.end = w.end.max(w.start);
        if !self.fits(&w) {
            self.close_cue(out);
        }
        self.final_end = w.end;
        self.tail.push_back(w.clone());
        if self.tail.len() > TAIL_WORDS {
            self.tail.pop_front();
        }
        let sentence_end = w.text.ends_with(['.', '?', '!', '…', '。', '？', '！']);
        self.open.push(w);
        if sentence_end {
            self.close_cue(out);
        }
    }

    /// Whether `w` can join the open cue within the cue limits.
    fn fits(&self, w: &Word) -> bool {
        let Some(first) = self.open.first() else {
            return true;
        };
        let chars = joined_len(&self.open) + 1 + w.text.chars().count();
        chars <= MAX_CUE_CHARS && w.end.max(self.final_end) - first.start <= MAX_CUE_SECONDS
    }

    fn close_cue(&mut self, out: &mut Vec<CaptionUpdate>) {
        if let (Some(first), Some(last)) = (self.open.first(), self.open.last()) {
            out.push(CaptionUpdate {
                t: first.start,
                end: last.end,
                text: join(&self.open),
                status: CaptionStatus::Final,
            });
            self.open.clear();
        }
    }

    fn partial(&mut self, tentative: &[Word]) -> Option<CaptionUpdate> {
        let shown: Vec<&Word> = self.open.iter().chain(tentative).collect();
        let (first, last) = (shown.first()?, shown.last()?);
        let text = shown
            .iter()
            .map(|w| w.text.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        if self.last_partial.as_deref() == Some(text.as_str()) {
            return None;
        }
        self.last_partial = Some(text.clone());
        // Tentative words may be placed before the final text; they are shown after it.
        let t = if self.open.is_empty() {
            first.start.max(self.final_end)
        } else {
            first.start
        };
        Some(CaptionUpdate {
            t,
            end: last.end.max(self.final_end),
            text,
            status: CaptionStatus::Partial,
        })
    }
}

fn join(words: &[Word]) -> String {
    words
        .iter()
        .map(|w| w.text.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

fn joined_len(words: &[Word]) -> usize {
    words.iter().map(|w| w.text.chars().count()).sum::<usize>() + words.len().saturating_sub(1)
}

fn key(token: &str) -> String {
    let k: String = token
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect();
    if k.is_empty() {
        token.to_string()
    } else {
        k
    }
}

/// Splits `text` into words placed across `[t0, t1)` by character position.
fn timed_words(text: &str, t0: f64, t1: f64) -> Vec<Word> {
    let tokens: Vec<&str> = text.split_whitespace().collect();
    let total: usize = tokens.iter().map(|t| t.chars().count() + 1).sum();
    let span = t1 - t0;
    let mut before = 0usize;
    tokens
        .into_iter()
        .map(|tok| {
            let len = tok.chars().count();
            let start = t0 + span * before as f64 / total as f64;
            let end = t0 + span * (before + len) as f64 / total as f64;
            before += len + 1;
            Word {
                text: tok.to_string(),
                key: key(tok),
                start,
                end,
            }
        })
        .collect()
}

/// How many leading words of a window repeat text that was already final.
fn overlap_skip(words: &[Word], tail: &[Word], prior_end: f64, t0: f64) -> usize {
    if tail.is_empty() || t0 >= prior_end - SAME_WINDOW_SECONDS {
        return 0;
    }
    // The longest suffix of the final tail found at the window start wins: a long match is
    // strong evidence, and a single word only counts right at the start.
    for k in (1..=tail.len().min(words.len())).rev() {
        let suffix = &tail[tail.len() - k..];
        for j in 0..=MAX_LEAD_FRAGMENTS {
            if k == 1 && j > 0 {
                break;
            }
            if j + k > words.len() {
                break;
            }
            if suffix
                .iter()
                .zip(&words[j..j + k])
                .all(|(a, b)| a.key == b.key)
            {
                return j + k;
            }
        }
    }
    words
        .iter()
        .take_while(|w| (w.start + w.end) / 2.0 < prior_end)
        .count()
}

/// Where this window's already-final words end in a new hypothesis of it. The model may
/// revise words it already agreed on; the final ones stay as they were, so the new
/// hypothesis is aligned on the last final words, near where they were.
fn committed_end_in(own: &[Word], committed: &[String], final_end: f64) -> usize {
    let c = committed.len();
    if c == 0 {
        return 0;
    }
    let matches_at = |p: usize| {
        let n = c.min(2);
        p >= n
            && p <= own.len()
            && own[p - n..p]
                .iter()
                .zip(&committed[c - n..])
                .all(|(w, k)| &w.key == k)
    };
    for d in [0isize, -1, 1, -2, 2] {
        let p = c as isize + d;
        if p >= 0 && matches_at(p as usize) {
            return p as usize;
        }
    }
    own.iter()
        .take_while(|w| (w.start + w.end) / 2.0 < final_end)
        .count()
        .max(c.min(own.len()))
}

fn common_prefix(a: &[Word], b: &[Word]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x.key == y.key).count()
}

/// Repetitions within one token that mark a loop, not a word ("aaaaaaaa", "ha" x 8).
const TOKEN_LOOP_REPEATS: usize = 8;
/// Longest repeated phrase looked for, in words.
const MAX_LOOP_WORDS: usize = 8;
/// A phrase said this many times in a row is a loop and is kept once.
const LOOP_REPEATS: usize = 3;

/// Collapses the repetition loops models produce on silence and noise: a word or a phrase
/// of up to 8 words repeated 3 or more times in a row is kept once ("thank you thank you
/// thank you" -> "thank you"; case and punctuation are ignored when comparing), and a single
/// token made of one short unit repeated 8 or more times is cut to the unit. Words are
/// re-joined with single spaces.
pub fn suppress_repetition(text: &str) -> String {
    let mut tokens: Vec<String> = text.split_whitespace().map(collapse_token).collect();
    loop {
        let keys: Vec<String> = tokens.iter().map(|t| key(t)).collect();
        let mut out: Vec<String> = Vec::with_capacity(tokens.len());
        let mut i = 0;
        while i < tokens.len() {
            // The reading that removes the most words wins; on a tie the shorter phrase.
            let mut best: Option<(usize, usize)> = None;
            for n in 1..=MAX_LOOP_WORDS.min(tokens.len() - i) {
                let mut reps = 1;
                while i + (reps + 1) * n <= keys.len()
                    && keys[i + reps * n..i + (reps + 1) * n] == keys[i..i + n]
                {
                    reps += 1;
                }
                if reps >= LOOP_REPEATS && best.is_none_or(|(bn, br)| n * reps > bn * br) {
                    best = Some((n, reps));
                }
            }
            match best {
                Some((n, reps)) => {
                    out.extend_from_slice(&tokens[i..i + n]);
                    i += n * reps;
                }
                None => {
                    out.push(tokens[i].clone());
                    i += 1;
                }
            }
        }
        // Collapsing can reveal an outer loop ("a b a b a b c" three times); stop when stable.
        if out.len() == tokens.len() {
            return out.join(" ");
        }
        tokens = out;
    }
}

fn collapse_token(token: &str) -> String {
    // Trailing punctuation is not part of the loop ("aaaaaaaa." -> "a.").
    let core = token.trim_end_matches(|c: char| !c.is_alphanumeric());
    let suffix = &token[core.len()..];
    let chars: Vec<char> = core.chars().collect();
    for unit in 1..=4 {
        if chars.len() < unit * TOKEN_LOOP_REPEATS {
            break;
        }
        // `i % unit` also accepts a cut last unit ("hahah").
        if chars.iter().enumerate().all(|(i, c)| *c == chars[i % unit]) {
            let mut s: String = chars[..unit].iter().collect();
            s.push_str(suffix);
            return s;
        }
    }
    token.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finals(u: &[CaptionUpdate]) -> Vec<&str> {
        u.iter()
            .filter(|c| c.status == CaptionStatus::Final)
            .map(|c| c.text.as_str())
            .collect()
    }

    fn partials(u: &[CaptionUpdate]) -> Vec<&str> {
        u.iter()
            .filter(|c| c.status == CaptionStatus::Partial)
            .map(|c| c.text.as_str())
            .collect()
    }

    #[test]
    fn repetition_loops_collapse() {
        assert_eq!(
            suppress_repetition("thank you thank you thank you"),
            "thank you"
        );
        assert_eq!(
            suppress_repetition("I said Hello, hello. hello! and left"),
            "I said Hello, and left"
        );
        assert_eq!(suppress_repetition("no no"), "no no");
        assert_eq!(
            suppress_repetition(&"the end of the line ".repeat(10)),
            "the end of the line"
        );
        assert_eq!(
            suppress_repetition(&"a b a b a b c ".repeat(3)),
            "a b c",
            "nested loops"
        );
        assert_eq!(suppress_repetition("aaaaaaaaaaaa."), "a.");
        assert_eq!(suppress_repetition("hahahahahahahahaha"), "ha");
        assert_eq!(suppress_repetition("hahaha"), "hahaha");
        assert_eq!(suppress_repetition("  spaced   out  "), "spaced out");
        assert_eq!(suppress_repetition(""), "");
        let nine = "one two three four five six seven eight nine ";
        assert_eq!(suppress_repetition(&nine.repeat(3)).split(' ').count(), 27);
    }

    #[test]
    fn partials_then_agreement_then_final() {
        let mut s = Stabilizer::new();
        let u = s.push(0.0, 2.0, "hello there", false);
        assert!(finals(&u).is_empty());
        assert_eq!(partials(&u), ["hello there"]);
        let u = s.push(0.0, 4.0, "hello there my friend", false);
        // Two hypotheses agree on "hello there": final words, in the open cue (shown as
        // partial until the cue closes).
        assert!(finals(&u).is_empty());
        assert_eq!(partials(&u), ["hello there my friend"]);
        let u = s.push(0.0, 6.0, "hello there my friend. How are", false);
        assert_eq!(finals(&u), ["hello there my friend."]);
        assert_eq!(partials(&u), ["How are"]);
        let u = s.push(0.0, 6.5, "Hello there, my friend. How are you?", true);
        assert_eq!(finals(&u), ["How are you?"]);
        assert!(partials(&u).is_empty());
    }

    #[test]
    fn final_words_are_not_contradicted() {
        let mut s = Stabilizer::new();
        s.push(0.0, 2.0, "the cat sat", false);
        let u = s.push(0.0, 3.0, "the cat sat on", false);
        assert!(finals(&u).is_empty());
        // The model changes its mind about words already final: they stay.
        let u = s.push(0.0, 4.0, "a cat sat on the mat", true);
        assert_eq!(finals(&u), ["the cat sat on the mat"]);
    }

    #[test]
    fn overlap_is_deduplicated() {
        let mut s = Stabilizer::new();
        let u = s.push(
            26.0,
            30.0,
            "we will meet on monday at the office downtown",
            true,
        );
        assert_eq!(
            finals(&u),
            ["we will meet on monday at the office downtown"]
        );
        // The next window starts 2 s earlier and hears the last words again, the first one
        // cut in half.
        let u = s.push(28.0, 32.0, "e office downtown and then lunch", true);
        assert_eq!(finals(&u), ["and then lunch"]);
    }

    #[test]
    fn overlap_without_a_text_match_falls_back_to_time() {
        let mut s = Stabilizer::new();
        s.push(6.0, 10.0, "alpha beta gamma delta", true);
        // Nothing matches; the first half of this window lies before the final end.
        let u = s.push(5.0, 15.0, "zzz yyy one two", true);
        assert_eq!(finals(&u), ["one two"]);
    }

    #[test]
    fn resume_continues_after_the_final_text() {
        let mut s = Stabilizer::resume(30.0, "see you at the office downtown");
        let u = s.push(28.0, 32.0, "office downtown at noon", true);
        assert_eq!(finals(&u), ["at noon"]);
        assert!(u.iter().all(|c| c.t >= 30.0));
    }

    #[test]
    fn a_fresh_window_after_a_pause_keeps_repeated_words() {
        let mut s = Stabilizer::new();
        s.push(0.0, 1.0, "yes", true);
        let u = s.push(3.0, 4.0, "yes", true);
        assert_eq!(finals(&u), ["yes"]);
    }

    #[test]
    fn long_finals_are_split_into_cues() {
        let mut s = Stabilizer::new();
        let text = "word ".repeat(60);
        let text = text
            .split_whitespace()
            .enumerate()
            .map(|(i, w)| format!("{w}{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let u = s.push(0.0, 30.0, &text, true);
        let f: Vec<_> = u.iter().collect();
        assert!(f.len() >= 5, "{}", f.len());
        let mut prev_end = 0.0;
        let mut all = Vec::new();
        for c in &f {
            assert!(c.text.chars().count() <= MAX_CUE_CHARS, "{}", c.text);
            assert!(c.end - c.t <= MAX_CUE_SECONDS + 1e-9);
            assert!(c.t >= prev_end - 1e-9 && c.end >= c.t);
            prev_end = c.end;
            all.push(c.text.clone());
        }
        assert_eq!(all.join(" "), text, "nothing lost or repeated");
    }

    #[test]
    fn finish_makes_the_tentative_words_final() {
        let mut s = Stabilizer::new();
        s.push(0.0, 2.0, "see you", false);
        let u = s.finish();
        assert_eq!(finals(&u), ["see you"]);
        assert!(s.finish().is_empty());
    }

    #[test]
    fn silence_loops_become_one_caption() {
        let mut s = Stabilizer::new();
        let u = s.push(0.0, 5.0, &"Thank you. ".repeat(20), true);
        assert_eq!(finals(&u), ["Thank you."]);
    }

    /// A long talk cut into overlapping windows with growing partials, transcribed the way a
    /// model hears audio cut at the edges: a word cut at the window start comes out as a
    /// fragment, one cut at the end half-said. The final text is the talk, once, in order,
    /// in cues that never overlap.
    #[test]
    fn streamed_talk_reads_back_exactly() {
        let talk: Vec<String> = (0..200).map(|i| format!("w{i}")).collect();
        // One word every 0.4 s, each 0.3 s long.
        let heard = |a: f64, b: f64| -> String {
            let mut out = Vec::new();
            for (i, w) in talk.iter().enumerate() {
                let (ws, we) = (i as f64 * 0.4, i as f64 * 0.4 + 0.3);
                if ws < a && we > a {
                    out.push("ment".to_string());
                } else if ws >= a && we <= b {
                    out.push(w.clone());
                } else if ws >= a && ws < b {
                    out.push(w[..2].to_string());
                }
            }
            out.join(" ")
        };
        let mut s = Stabilizer::new();
        let mut out = Vec::new();
        let mut t0 = 0.0;
        let total = 80.0;
        while t0 < total {
            let end = (t0 + 30.0f64).min(total);
            let mut t = t0 + 2.0;
            while t < end {
                out.extend(s.push(t0, t, &heard(t0, t), false));
                t += 2.0;
            }
            if end >= total {
                out.extend(s.push(t0, end, &heard(t0, end), true));
                break;
            }
            // Cut 0.15 s into a word: the next window starts 2 s earlier, inside a word too.
            let next = end - 2.0 + 0.15;
            out.extend(s.push_cut(t0, end, &heard(t0, end), next));
            t0 = next;
        }
        out.extend(s.finish());
        let text: Vec<&str> = finals(&out);
        assert_eq!(text.join(" "), talk.join(" "));
        let mut prev_end = 0.0;
        for c in out.iter().filter(|c| c.status == CaptionStatus::Final) {
            assert!(c.t >= prev_end - 1e-9 && c.end >= c.t, "{c:?}");
            assert!(c.text.chars().count() <= MAX_CUE_CHARS);
            prev_end = c.end;
        }
    }
}
