//! Optional LLM-judge score (POPEN Table 1 "Score", Appendix B "ChatGPT Prompt for Response
//! Evaluation"): a chat model rates each response from 1 to 10 for accuracy (hallucination)
//! and detailedness. Off unless configured; never needed by any other metric.
//!
//! The prompt is the paper's, verbatim ([`PAPER_PROMPT`]). The paper asks for "a score"
//! after naming two criteria; to read both numbers reliably we append
//! [`FORMAT_INSTRUCTION`] (our addition). The image goes along as a `data:` URL for vision
//! models; for text-only judges ([`JudgeConfig::send_image`] false) the list of annotated
//! objects of the image stands in for it (also our addition).

use crate::error::{EvalError, Result};
use base64::Engine;
use popen_core::chat::{ChatClient, ChatConfig, ImageUrl, Message, Part};
use popen_core::shard::{Sample, SEG_TOKEN};
use serde::{Deserialize, Serialize};

/// Appendix B of the POPEN paper, "ChatGPT Prompt for Response Evaluation".
pub const PAPER_PROMPT: &str = "I will give you an image, a question and a text response. You are required to score the performance of the text response given the image and question. You should pay extra attention to the hallucination, which refers to the part of responses that are inconsistent with the image content, such as claiming the existence of something not present in the image or describing incorrectly in terms of the counts, positions, or colors of objects in the image. Please rate the responses of the assistants on a scale of 1 to 10, where a higher score indicates better performance, according to the following criteria: (1) Accuracy: whether the response is accurate with respect to the image content and reasoning logic. Responses with fewer hallucinations should be given higher scores. (2) Detailedness: whether the response is rich and complete in necessary details. Please output a score for such a evaluation. Following the score, please provide an explanation of your evaluation.";

/// Our addition, so that both scores can be parsed.
pub const FORMAT_INSTRUCTION: &str =
    "Begin your answer with exactly these two lines, each with one integer from 1 to 10:\nAccuracy: <score>\nDetailedness: <score>\nThen give the explanation.";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JudgeConfig {
    pub chat: ChatConfig,
    /// Send the image (vision models); otherwise the annotated object names stand in.
    pub send_image: bool,
}

/// One judged response.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JudgeScore {
    pub accuracy: f64,
    pub detail: f64,
    pub explanation: String,
}

/// A configured judge.
#[derive(Clone, Debug)]
pub struct Judge {
    client: ChatClient,
    send_image: bool,
}

/// The response as the judge sees it: `<seg>` tokens removed, spaces tidied.
pub fn visible_text(answer: &str) -> String {
    let s = answer.replace(SEG_TOKEN, " ");
    let s: Vec<&str> = s.split_whitespace().collect();
    s.join(" ").replace(" .", ".").replace(" ,", ",")
}

/// The score that follows `label` (case-insensitive): the label, more letters, spaces or
/// Markdown emphasis ("Detailedness", "accuracy score", "**Accuracy**"), at most one of
/// ':', '-', '=', then a number from 1 to 10: "Accuracy: 7", "**Accuracy**: 7/10",
/// "accuracy score - 8". A label followed by anything else ("Accuracy (1-10)") is skipped.
fn score_after(reply: &str, label: &str) -> Option<f64> {
    let low = reply.to_ascii_lowercase();
    let mut from = 0;
    while let Some(pos) = low[from..].find(label) {
        let start = from + pos + label.len();
        from = start;
        let mut rest =
            low[start..].trim_start_matches(|c: char| c.is_ascii_alphabetic() || c == ' ' || c == '*' || c == '_');
        if let Some(r) = rest.strip_prefix([':', '-', '=']) {
            rest = r.trim_start_matches([' ', '*', '_']);
        }
        let num: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        if let Ok(v) = num.trim_end_matches('.').parse::<f64>() {
            if (1.0..=10.0).contains(&v) {
                return Some(v);
            }
        }
    }
    None
}

/// Reads (accuracy, detailedness) from a judge reply; None unless both are there.
pub fn parse_scores(reply: &str) -> Option<(f64, f64)> {
    Some((score_after(reply, "accuracy")?, score_after(reply, "detail")?))
}

impl Judge {
    pub fn new(cfg: JudgeConfig) -> Result<Judge> {
        let client = ChatClient::new(cfg.chat).map_err(|e| EvalError::Invalid(format!("LLM judge: {e}")))?;
        Ok(Judge { client, send_image: cfg.send_image })
    }

    pub fn endpoint(&self) -> &str {
        self.client.endpoint()
    }

    /// The chat messages for one response to `sample`'s instruction.
    pub fn messages(&self, sample: &Sample, answer: &str) -> Vec<Message> {
        let text = format!(
            "{PAPER_PROMPT}\n\n{FORMAT_INSTRUCTION}\n\nQuestion: {}\n\nText response: {}",
            sample.instruction,
            visible_text(answer)
        );
        if self.send_image {
            let mime =
                popen_core::imageio::sniff_format(&sample.image).map(|f| f.to_mime_type()).unwrap_or("image/png");
            let url = format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(&sample.image));
            vec![Message::user_parts(vec![Part::ImageUrl { image_url: ImageUrl { url } }, Part::Text { text }])]
        } else {
            let objects =
                if sample.instance_names.is_empty() { "none".to_string() } else { sample.instance_names.join(", ") };
            vec![Message::user(format!(
                "{text}\n\n(The image is not attached. Its annotated objects are: {objects}. Image size {}x{} pixels.)",
                sample.width, sample.height
            ))]
        }
    }

    /// Scores one response; errors name the endpoint and the sample.
    pub fn score(&self, sample: &Sample, answer: &str) -> Result<JudgeScore> {
        let reply = self
            .client
            .complete(&self.messages(sample, answer))
            .map_err(|e| EvalError::sample(&sample.id, format!("LLM judge: {e}")))?;
        let (accuracy, detail) = parse_scores(&reply.content).ok_or_else(|| {
            EvalError::sample(
                &sample.id,
                format!(
                    "LLM judge {}: no 'Accuracy: N' and 'Detailedness: N' (1-10) in the reply: {}",
                    self.endpoint(),
                    popen_core::chat::excerpt(&reply.content)
                ),
            )
        })?;
        Ok(JudgeScore { accuracy, detail, explanation: reply.content })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scores_in_common_shapes() {
        assert_eq!(parse_scores("Accuracy: 7\nDetailedness: 5\nThe response..."), Some((7.0, 5.0)));
        assert_eq!(parse_scores("**Accuracy**: 8/10\n**Detailedness**: 6/10"), Some((8.0, 6.0)));
        assert_eq!(parse_scores("accuracy score - 9.5, detail score 10"), Some((9.5, 10.0)));
        // a number out of range is skipped for a later mention
        assert_eq!(parse_scores("Accuracy (1-10)\nAccuracy: 4\nDetail: 3"), Some((4.0, 3.0)));
        assert_eq!(parse_scores("Accuracy: 7"), None);
        assert_eq!(parse_scores("Accuracy: 0\nDetailedness: 11"), None);
        assert_eq!(parse_scores("I like it."), None);
    }

    #[test]
    fn visible_text_drops_seg_tokens() {
        assert_eq!(visible_text("the red ball <seg> and the cup <seg> ."), "the red ball and the cup.");
    }
}
