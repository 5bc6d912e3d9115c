//! CHAIR (Rohrbach et al. 2018; POPEN Eq. 7): object mentions in a text answer, checked
//! against the objects of the image.
//!
//! `C_S = |responses with a hallucinated object| / |responses|` and
//! `C_I = |hallucinated mentions| / |all mentions|`. A mention is hallucinated when its class
//! is not among the ground-truth classes of the image (by default every annotated instance,
//! as CHAIR uses all of an image's objects; optionally only the answer's targets).
//! Every mention counts for `C_I`, repeats included.
//!
//! Mentions are found with [`popen_core::lexicon::Lexicon`] (tokenizer, plurals, synonyms,
//! colour adjectives: see that module).

pub use popen_core::lexicon::{tokenize, Lexicon, Mention};
use serde::{Deserialize, Serialize};

/// Which objects count as present for CHAIR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChairTruth {
    /// Every annotated instance of the image (CHAIR's convention).
    #[default]
    Instances,
    /// Only the ground-truth answer's targets.
    Targets,
}

/// CHAIR of one response.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChairSample {
    pub mentions: Vec<Mention>,
    /// The mentions whose class is absent from the truth.
    pub hallucinated: Vec<Mention>,
}

/// Mentions of `answer` checked against the classes of `truth_names`.
pub fn chair_sample(lexicon: &Lexicon, answer: &str, truth_names: &[String]) -> ChairSample {
    let truth = lexicon.classes_of_names(truth_names);
    let mentions = lexicon.mentions(answer);
    let hallucinated = mentions.iter().filter(|m| !truth.contains(&m.class)).cloned().collect();
    ChairSample { mentions, hallucinated }
}

/// Counts behind Eq. 7.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChairTotals {
    pub responses: u64,
    pub responses_with_hallucination: u64,
    pub mentions: u64,
    pub hallucinated_mentions: u64,
}

impl ChairTotals {
    pub fn add(&mut self, s: &ChairSample) {
        self.responses += 1;
        self.responses_with_hallucination += (!s.hallucinated.is_empty()) as u64;
        self.mentions += s.mentions.len() as u64;
        self.hallucinated_mentions += s.hallucinated.len() as u64;
    }

    /// C_S (Eq. 7); 0 without responses.
    pub fn c_s(&self) -> f64 {
        ratio(self.responses_with_hallucination, self.responses)
    }

    /// C_I (Eq. 7); 0 when nothing was mentioned.
    pub fn c_i(&self) -> f64 {
        ratio(self.hallucinated_mentions, self.mentions)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}
