//! `watch` answers: the model is asked for JSON and its reply is validated against the
//! schema before anything becomes an alert. Model output is untrusted text: it is parsed,
//! never executed, and only whitelisted fields travel on.

use serde::Deserialize;

/// One validated answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub question: String,
    pub yes: bool,
    pub confidence: f64,
    pub evidence: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reply {
    answers: Vec<RawAnswer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnswer {
    question: String,
    answer: String,
    confidence: f64,
    #[serde(default)]
    evidence: String,
}

/// The prompt's `{questions}` filled with a numbered list.
pub fn render_prompt(template: &str, questions: &[String]) -> String {
    let list: Vec<String> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| format!("{}. {q}", i + 1))
        .collect();
    template.replace("{questions}", &list.join("\n"))
}

/// What to tell the model when its first reply failed validation.
pub fn retry_prompt(template: &str, questions: &[String], problem: &str) -> String {
    format!(
        "{}\nYour previous reply was rejected ({problem}). Reply with the JSON object only.",
        render_prompt(template, questions)
    )
}

/// Validates a reply: one JSON object (optionally in a ```json fence) with one answer per
/// question, in any order, `answer` yes/no, `confidence` in [0, 1].
pub fn parse_reply(text: &str, questions: &[String]) -> Result<Vec<Answer>, String> {
    let body = extract_object(text).ok_or("no JSON object in the reply")?;
    let reply: Reply = serde_json::from_str(body).map_err(|e| format!("not the schema: {e}"))?;
    let mut out = Vec::with_capacity(questions.len());
    for q in questions {
        let norm = |s: &str| s.trim().trim_end_matches('?').to_lowercase();
        let a = reply
            .answers
            .iter()
            .find(|a| norm(&a.question) == norm(q))
            .ok_or_else(|| format!("no answer for question '{q}'"))?;
        let yes = match a.answer.trim().to_lowercase().as_str() {
            "yes" | "true" => true,
            "no" | "false" => false,
            other => return Err(format!("answer must be yes or no, got '{other}'")),
        };
        if !(0.0..=1.0).contains(&a.confidence) {
            return Err(format!(
                "confidence must be in [0, 1], got {}",
                a.confidence
            ));
        }
        out.push(Answer {
            question: q.clone(),
            yes,
            confidence: a.confidence,
            evidence: a.evidence.trim().to_string(),
        });
    }
    Ok(out)
}

fn extract_object(text: &str) -> Option<&str> {
    let start = text.find('{')?;
    let end = text.rfind('}')?;
    (end > start).then(|| &text[start..=end])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn qs() -> Vec<String> {
        vec!["Is someone at the door?".into(), "Is there a car?".into()]
    }

    #[test]
    fn valid_reply_in_a_fence() {
        let text = "```json\n{\"answers\": [{\"question\": \"Is there a car\", \"answer\": \"no\", \"confidence\": 0.9, \"evidence\": \"empty drive\"}, {\"question\": \"Is someone at the door?\", \"answer\": \"Yes\", \"confidence\": 0.8, \"evidence\": \"a person <b>waves</b>\"}]}\n```";
        let a = parse_reply(text, &qs()).unwrap();
        assert!(a[0].yes && !a[1].yes);
        assert_eq!(a[0].evidence, "a person <b>waves</b>");
        assert_eq!(a[0].question, "Is someone at the door?");
    }

    #[test]
    fn invalid_replies_say_why() {
        let e = parse_reply("I think yes", &qs()).unwrap_err();
        assert!(e.contains("no JSON"), "{e}");
        let e = parse_reply(
            r#"{"answers":[{"question":"Is someone at the door?","answer":"maybe","confidence":0.5}]}"#,
            &qs(),
        )
        .unwrap_err();
        assert!(e.contains("yes or no"), "{e}");
        let e = parse_reply(
            r#"{"answers":[{"question":"Is someone at the door?","answer":"yes","confidence":3}]}"#,
            &qs(),
        )
        .unwrap_err();
        assert!(e.contains("confidence"), "{e}");
        let e = parse_reply(r#"{"answers":[], "extra": 1}"#, &qs()).unwrap_err();
        assert!(e.contains("schema"), "{e}");
        let p = render_prompt("Q:\n{questions}", &qs());
        assert_eq!(p, "Q:\n1. Is someone at the door?\n2. Is there a car?");
    }
}
