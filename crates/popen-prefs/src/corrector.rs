//! Correctors of collect-pt (SPEC 3.2-3.3): `y` -> `y_c`, and error injection into `y_g`.
//!
//! [`OfflineCorrector`] is the deterministic default. It knows the ground truth of the sample
//! ([`Truth`]: each target's class and, where the data has it, colour; the classes of every
//! annotated instance) and finds object mentions with the benchmark's
//! [`Lexicon`](popen_core::lexicon::Lexicon):
//! - **in place** when `y` has one `<seg>` per target: the mention right before the k-th
//!   `<seg>` becomes target k's class name if it names another class, and a colour word
//!   right before that mention becomes target k's colour if it differs; a mention without
//!   `<seg>` must name a class of the object list ([`ObjectList`]);
//! - **rewrite** (`y_c = y_g`, the ground-truth answer) when the structure cannot be fixed in
//!   place: another number of `<seg>`, a `<seg>` with no mention before it, or a mention of
//!   an object outside the object list.
//!
//! The object list follows the paper (SPEC 3.2 and 10.19; Appendix B: "the corrected answer
//! should include only the objects in the object list", "the names of all objects in the
//! ground-truth response"): by default the classes the ground-truth answer mentions (its
//! targets and any other object it names), so an answer that also talks about another object
//! of the image is corrected. [`ObjectList::Image`] (every annotated object of the image, the
//! behaviour before issue 24) is the option.
//!
//! "No error" is `y_c == y`. Error injection (the paper's second prompt: one or two objects,
//! no synonyms) swaps the class or the colour of one or two target mentions of `y_g`,
//! deterministically from a seed.

use std::collections::BTreeSet;
use std::ops::Range;

use popen_core::lexicon::{token_spans, Lexicon};
use popen_core::shard::{Sample, SEG_TOKEN};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{PrefsError, Result};

/// One target of the ground truth.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetTruth {
    /// Lexicon class of the target.
    pub class: String,
    /// Its colour word, when the data records one (the embedded benchmark does).
    pub colour: Option<String>,
}

/// What a corrector may use: the ground-truth answer, its targets in `<seg>` order, and the
/// classes of every annotated object of the image (the paper's "object list").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truth {
    pub answer: String,
    pub targets: Vec<TargetTruth>,
    pub instance_classes: BTreeSet<String>,
}

impl Truth {
    /// From a sample: target classes from `target_names` (through the lexicon; a name the
    /// lexicon does not know is kept as written), colours from the benchmark generator's
    /// `meta.instances[target_instances[k]].colour` when present.
    pub fn from_sample(sample: &Sample, lexicon: &Lexicon) -> Truth {
        let class =
            |name: &str| lexicon.class_of(name).map(str::to_string).unwrap_or_else(|| name.to_ascii_lowercase());
        let meta: serde_json::Value = serde_json::from_str(&sample.meta).unwrap_or(serde_json::Value::Null);
        let colour_of = |inst: i32| -> Option<String> {
            let i = usize::try_from(inst).ok()?;
            meta.get("instances")?.get(i)?.get("colour")?.as_str().map(str::to_ascii_lowercase)
        };
        let targets = sample
            .target_names
            .iter()
            .zip(&sample.target_instances)
            .map(|(n, &inst)| TargetTruth { class: class(n), colour: colour_of(inst) })
            .collect();
        let instance_classes = sample.instance_names.iter().chain(&sample.target_names).map(|n| class(n)).collect();
        Truth { answer: sample.answer.clone(), targets, instance_classes }
    }
}

/// The objects a corrected answer may mention (SPEC 3.2, 10.19).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectList {
    /// The objects of the ground-truth answer: its targets' classes and every other class its
    /// text mentions (the paper's prompt, Appendix B).
    #[default]
    Answer,
    /// Every annotated object of the image (`Truth::instance_classes`); not the paper's.
    Image,
}

impl Truth {
    /// The classes of `list` (SPEC 10.19): [`ObjectList::Answer`] = the targets' classes and
    /// the classes `lexicon` finds in the ground-truth answer; [`ObjectList::Image`] =
    /// `instance_classes`.
    pub fn object_list(&self, list: ObjectList, lexicon: &Lexicon) -> BTreeSet<String> {
        match list {
            ObjectList::Image => self.instance_classes.clone(),
            ObjectList::Answer => self
                .targets
                .iter()
                .map(|t| t.class.clone())
                .chain(lexicon.mention_spans(&self.answer).into_iter().map(|(m, _)| m.class))
                .collect(),
        }
    }
}

/// How `y_c` was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Nothing to fix: `y_c == y`.
    Unchanged,
    /// Words of `y` replaced.
    InPlace,
    /// `y_c` is the ground-truth answer.
    Rewrite,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Correction {
    pub text: String,
    pub method: Method,
    /// Why a rewrite was needed, or what was replaced.
    pub notes: Vec<String>,
}

impl Correction {
    pub fn has_error(&self) -> bool {
        self.method != Method::Unchanged
    }
}

/// A corrector: fixes an answer, and injects errors into a correct one.
pub trait Corrector {
    fn correct(&self, y: &str, truth: &Truth) -> Result<Correction>;
    /// A variant of the ground-truth answer with one or two object errors.
    fn inject_errors(&self, truth: &Truth, seed: u64) -> Result<String>;
    /// What defines its corrections (model, prompts, ...; never a secret): part of the
    /// collect-pt stage's definition, so a changed corrector recomputes the output.
    fn settings(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// The deterministic corrector of the embedded benchmark (module documentation).
pub struct OfflineCorrector {
    lexicon: Lexicon,
    object_list: ObjectList,
}

/// A target mention of an answer: the k-th `<seg>`'s object words and its colour word.
struct Attached {
    class: String,
    noun: Range<usize>,
    colour: Option<(String, Range<usize>)>,
}

impl OfflineCorrector {
    /// With the paper's object list ([`ObjectList::Answer`]).
    pub fn new(lexicon: Lexicon) -> Self {
        OfflineCorrector { lexicon, object_list: ObjectList::default() }
    }

    /// Which objects an answer may mention (`CollectPtConfig::object_list`).
    pub fn with_object_list(mut self, list: ObjectList) -> Self {
        self.object_list = list;
        self
    }

    /// Splits an answer into the mention attached to each `<seg>` and the free mentions.
    fn parse(&self, y: &str) -> std::result::Result<(Vec<Attached>, Vec<String>), String> {
        let segs: Vec<usize> = y.match_indices(SEG_TOKEN).map(|(i, _)| i).collect();
        let mentions = self.lexicon.mention_spans(y);
        let tokens = token_spans(y);
        let mut attached = Vec::with_capacity(segs.len());
        let mut used = vec![false; mentions.len()];
        let mut prev_end = 0usize;
        for (k, &at) in segs.iter().enumerate() {
            let pick = mentions
                .iter()
                .enumerate()
                .rfind(|(_, (_, r))| r.start >= prev_end && r.end <= at)
                .ok_or_else(|| format!("<seg> {k} has no object mention before it"))?;
            let (mi, (m, r)) = pick;
            used[mi] = true;
            // A colour word as the token right before the mention.
            let colour = tokens
                .iter()
                .rev()
                .find(|(_, tr)| tr.end <= r.start)
                .filter(|(t, tr)| self.lexicon.is_colour(t) && tr.start >= prev_end)
                .map(|(t, tr)| (t.clone(), tr.clone()));
            attached.push(Attached { class: m.class.clone(), noun: r.clone(), colour });
            prev_end = at + SEG_TOKEN.len();
        }
        let free = mentions.iter().zip(&used).filter(|(_, u)| !**u).map(|((m, _), _)| m.class.clone()).collect();
        Ok((attached, free))
    }
}

fn apply_edits(y: &str, mut edits: Vec<(Range<usize>, String)>) -> String {
    edits.sort_by_key(|(r, _)| r.start);
    let mut out = String::with_capacity(y.len());
    let mut at = 0;
    for (r, text) in edits {
        out.push_str(&y[at..r.start]);
        out.push_str(&text);
        at = r.end;
    }
    out.push_str(&y[at..]);
    out
}

impl Corrector for OfflineCorrector {
    fn settings(&self) -> serde_json::Value {
        serde_json::json!({"kind": "offline", "lexicon_sha256": self.lexicon.fingerprint(), "object_list": self.object_list})
    }

    fn correct(&self, y: &str, truth: &Truth) -> Result<Correction> {
        let rewrite = |why: String| Correction {
            text: truth.answer.clone(),
            method: if truth.answer == y { Method::Unchanged } else { Method::Rewrite },
            notes: vec![why],
        };
        let (attached, free) = match self.parse(y) {
            Ok(p) => p,
            Err(why) => return Ok(rewrite(why)),
        };
        if attached.len() != truth.targets.len() {
            return Ok(rewrite(format!("{} <seg> for {} targets", attached.len(), truth.targets.len())));
        }
        let allowed = truth.object_list(self.object_list, &self.lexicon);
        if let Some(c) = free.iter().find(|c| !allowed.contains(*c)) {
            let outside = match self.object_list {
                ObjectList::Answer => "the ground-truth answer's objects",
                ObjectList::Image => "the image",
            };
            return Ok(rewrite(format!("mentions '{c}', which is not in {outside}")));
        }
        let mut edits = Vec::new();
        let mut notes = Vec::new();
        for (k, (a, t)) in attached.iter().zip(&truth.targets).enumerate() {
            if a.class != t.class {
                edits.push((a.noun.clone(), t.class.clone()));
                notes.push(format!("target {k}: '{}' -> '{}'", a.class, t.class));
            }
            if let (Some((c, r)), Some(want)) = (&a.colour, &t.colour) {
                if c != want {
                    edits.push((r.clone(), want.clone()));
                    notes.push(format!("target {k}: colour '{c}' -> '{want}'"));
                }
            }
        }
        if edits.is_empty() {
            return Ok(Correction { text: y.to_string(), method: Method::Unchanged, notes });
        }
        Ok(Correction { text: apply_edits(y, edits), method: Method::InPlace, notes })
    }

    fn inject_errors(&self, truth: &Truth, seed: u64) -> Result<String> {
        let y = &truth.answer;
        let (attached, _) = self.parse(y).map_err(|e| PrefsError::Input(format!("ground-truth answer {y:?}: {e}")))?;
        if attached.is_empty() {
            return Err(PrefsError::Input(format!("ground-truth answer {y:?} names no target to alter")));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let classes: Vec<&String> =
            self.lexicon.classes.iter().filter(|c| !truth.instance_classes.contains(*c)).collect();
        let colours = self.lexicon.colour_words();
        let n = if attached.len() > 1 { rng.random_range(1..=2) } else { 1 };
        let mut order: Vec<usize> = (0..attached.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut edits = Vec::new();
        for &k in order.iter().take(n) {
            let a = &attached[k];
            let recolour = a.colour.is_some() && (classes.is_empty() || rng.random_bool(0.5));
            if recolour {
                let (c, r) = a.colour.clone().expect("checked");
                let others: Vec<&String> = colours.iter().filter(|x| **x != c).collect();
                if let Some(new) = others.get(rng.random_range(0..others.len().max(1))) {
                    edits.push((r, (*new).clone()));
                }
            } else if !classes.is_empty() {
                edits.push((a.noun.clone(), classes[rng.random_range(0..classes.len())].clone()));
            }
        }
        if edits.is_empty() {
            return Err(PrefsError::Input(format!("no class or colour to alter in {y:?}")));
        }
        Ok(apply_edits(y, edits))
    }
}
