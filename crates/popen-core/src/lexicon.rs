//! Object vocabularies and mention finding, shared by CHAIR (popen-eval) and the offline
//! corrector of collect-pt (popen-prefs).
//!
//! Finding mentions, as CHAIR does it (`chair.py`: tokenize, singularize, merge two-word
//! names, map synonyms) with our tokenizer:
//! - lowercase; a token is a maximal run of ASCII letters (so "pineapple" never contains
//!   "apple", "teddy-bear" is "teddy bear", `<seg>` is dropped before);
//! - at each token, the longest lexicon form of up to [`Lexicon::max_words`] tokens wins, so
//!   "hot dog" is one mention of class hot dog, not a dog; a phrase also matches when its
//!   last word is an English plural of the form's last word (irregular table, then
//!   -ies/-ves/-es/-s rules; a candidate counts only if it is a lexicon form), and the
//!   lexicon's own plural forms are forms;
//! - synonyms map to their class;
//! - a colour word that is also a form (COCO's "orange") is an adjective, not a mention,
//!   when the next token starts another mention ("an orange cat" mentions only a cat).
//!   The benchmark lexicon has no such word (its notes: no colour name is a mention form).
//!
//! Two lexicons: the benchmark's `lexicon.json` ([`Lexicon::from_benchmark_json`]) and the
//! COCO synonym table of CHAIR ([`Lexicon::from_coco_synonyms`]).

use crate::error::{CoreError, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

/// Irregular English plurals that CHAIR's singularizer handles (COCO words among them).
const IRREGULAR: &[(&str, &str)] = &[
    ("men", "man"),
    ("women", "woman"),
    ("children", "child"),
    ("people", "person"),
    ("persons", "person"),
    ("mice", "mouse"),
    ("geese", "goose"),
    ("feet", "foot"),
    ("teeth", "tooth"),
    ("oxen", "ox"),
    ("knives", "knife"),
    ("leaves", "leaf"),
    ("loaves", "loaf"),
    ("calves", "calf"),
    ("wolves", "wolf"),
    ("shelves", "shelf"),
];

/// Colour words treated as adjectives before a mention in the COCO lexicon.
const COCO_COLOURS: &[&str] =
    &["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "white", "black", "grey", "gray"];

/// A vocabulary of object classes and the word forms that mention them.
#[derive(Clone, Debug)]
pub struct Lexicon {
    /// "benchmark" or "coco".
    pub kind: String,
    /// Canonical class names in file order.
    pub classes: Vec<String>,
    /// Form (lowercase tokens joined by one space) -> class.
    forms: HashMap<String, String>,
    max_words: usize,
    colours: HashSet<String>,
}

/// One object mention found in a text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mention {
    /// The words as written (lowercased, joined by single spaces).
    pub text: String,
    /// The canonical class.
    pub class: String,
    /// Index of the first token.
    pub token: usize,
}

#[derive(Deserialize)]
struct BenchJson {
    categories: Vec<BenchCategory>,
    #[serde(default)]
    colours: Vec<BenchColour>,
    #[serde(default)]
    mention_forms: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct BenchCategory {
    name: String,
    plural: String,
    #[serde(default)]
    synonyms: Vec<String>,
    #[serde(default)]
    synonym_plurals: Vec<String>,
}

#[derive(Deserialize)]
struct BenchColour {
    name: String,
}

/// Lowercase ASCII-letter tokens of a text, `<seg>` removed.
pub fn tokenize(text: &str) -> Vec<String> {
    token_spans(text).into_iter().map(|(t, _)| t).collect()
}

/// [`tokenize`] with each token's byte range in `text`.
pub fn token_spans(text: &str) -> Vec<(String, std::ops::Range<usize>)> {
    // `<seg>` becomes spaces of the same length, so offsets stay those of `text`.
    let blank = " ".repeat(crate::shard::SEG_TOKEN.len());
    let text = text.replace(crate::shard::SEG_TOKEN, &blank);
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices().chain(std::iter::once((text.len(), ' '))) {
        match (c.is_ascii_alphabetic(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push((text[s..i].to_ascii_lowercase(), s..i));
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// Singular candidates of an English word, most specific first (may be non-words).
fn singular_candidates(word: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some((_, s)) = IRREGULAR.iter().find(|(p, _)| *p == word) {
        out.push(s.to_string());
    }
    if let Some(stem) = word.strip_suffix("ies") {
        out.push(format!("{stem}y"));
    }
    if let Some(stem) = word.strip_suffix("ves") {
        out.push(format!("{stem}f"));
        out.push(format!("{stem}fe"));
    }
    if let Some(stem) = word.strip_suffix("es") {
        out.push(stem.to_string());
    }
    if let Some(stem) = word.strip_suffix('s') {
        if !word.ends_with("ss") {
            out.push(stem.to_string());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

impl Lexicon {
    /// sha256 of the lexicon's content (kind, classes, forms, colours; sorted), for a stage's
    /// definition: the same words give the same hash whatever file they came from.
    pub fn fingerprint(&self) -> String {
        let forms: std::collections::BTreeMap<&String, &String> = self.forms.iter().collect();
        let colours: std::collections::BTreeSet<&String> = self.colours.iter().collect();
        let v = serde_json::json!({"kind": self.kind, "classes": self.classes, "forms": forms, "colours": colours});
        crate::manifest::sha256_hex(crate::manifest::canonical_json(&v).as_bytes())
    }

    fn build(kind: &str, entries: Vec<(String, Vec<String>)>, colours: Vec<String>) -> Result<Lexicon> {
        let mut forms: HashMap<String, String> = HashMap::new();
        let mut classes = Vec::new();
        for (class, words) in entries {
            let class = tokenize(&class).join(" ");
            if class.is_empty() {
                return Err(CoreError::Invalid(format!("{kind} lexicon: a class has no name")));
            }
            if classes.contains(&class) {
                return Err(CoreError::Invalid(format!("{kind} lexicon: class '{class}' is listed twice")));
            }
            for w in std::iter::once(class.clone()).chain(words) {
                let key = tokenize(&w).join(" ");
                if key.is_empty() {
                    continue;
                }
                // CHAIR's table repeats some words; the first class keeps them.
                forms.entry(key).or_insert_with(|| class.clone());
            }
            classes.push(class);
        }
        let max_words = forms.keys().map(|k| k.split(' ').count()).max().unwrap_or(1);
        Ok(Lexicon { kind: kind.into(), classes, forms, max_words, colours: colours.into_iter().collect() })
    }

    /// The benchmark's `lexicon.json` (`popen synth` writes it): categories with `name`,
    /// `plural`, `synonyms` and `synonym_plurals`; `colours[].name` are the colour words;
    /// `mention_forms` (form -> category), when present, must agree with the categories.
    pub fn from_benchmark_json(text: &str) -> Result<Lexicon> {
        let j: BenchJson = serde_json::from_str(text)
            .map_err(|e| CoreError::Invalid(format!("benchmark lexicon: not a popen lexicon.json: {e}")))?;
        let mut entries = Vec::new();
        for c in &j.categories {
            if c.synonyms.len() != c.synonym_plurals.len() {
                return Err(CoreError::Invalid(format!(
                    "benchmark lexicon: category '{}' has {} synonyms but {} synonym_plurals",
                    c.name,
                    c.synonyms.len(),
                    c.synonym_plurals.len()
                )));
            }
            let mut words = vec![c.plural.clone()];
            words.extend(c.synonyms.iter().cloned());
            words.extend(c.synonym_plurals.iter().cloned());
            entries.push((c.name.clone(), words));
        }
        let lex =
            Lexicon::build("benchmark", entries, j.colours.into_iter().map(|c| c.name.to_ascii_lowercase()).collect())?;
        for (form, class) in &j.mention_forms {
            let got = lex.forms.get(&tokenize(form).join(" "));
            if got.map(String::as_str) != Some(class.as_str()) {
                return Err(CoreError::Invalid(format!(
                    "benchmark lexicon: mention_forms says '{form}' -> '{class}', the categories say {got:?}"
                )));
            }
        }
        Ok(lex)
    }

    /// CHAIR's COCO synonym table (`chair_synonyms.txt`): one class per line, canonical word
    /// first, comma-separated synonyms. Plurals come from the English rules.
    pub fn from_coco_synonyms(text: &str) -> Result<Lexicon> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let words: Vec<String> = line.split(',').map(|w| w.trim().to_string()).filter(|w| !w.is_empty()).collect();
            let Some((first, rest)) = words.split_first() else { continue };
            if tokenize(first).is_empty() {
                return Err(CoreError::Invalid(format!("COCO synonym table, line {}: no class name", n + 1)));
            }
            entries.push((first.clone(), rest.to_vec()));
        }
        if entries.is_empty() {
            return Err(CoreError::Invalid("COCO synonym table: no classes".into()));
        }
        Lexicon::build("coco", entries, COCO_COLOURS.iter().map(|s| s.to_string()).collect())
    }

    /// `coco:<path>` loads a COCO synonym table, anything else a benchmark `lexicon.json`.
    pub fn load(spec: &str) -> Result<Lexicon> {
        let (coco, path) = match spec.strip_prefix("coco:") {
            Some(p) => (true, p),
            None => (false, spec),
        };
        let path = Path::new(path);
        let text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
        let r = if coco { Lexicon::from_coco_synonyms(&text) } else { Lexicon::from_benchmark_json(&text) };
        r.map_err(|e| CoreError::Invalid(format!("{}: {e}", path.display())))
    }

    /// The colour words, sorted.
    pub fn colour_words(&self) -> Vec<String> {
        let mut v: Vec<String> = self.colours.iter().cloned().collect();
        v.sort();
        v
    }

    /// Whether `word` (one lowercase token) is a colour word of the lexicon.
    pub fn is_colour(&self, word: &str) -> bool {
        self.colours.contains(word)
    }

    /// Longest form, in words.
    pub fn max_words(&self) -> usize {
        self.max_words
    }

    /// Class of a form given as text ("Traffic Lights" -> "traffic light"), if any.
    pub fn class_of(&self, form: &str) -> Option<&str> {
        let toks = tokenize(form);
        if toks.is_empty() || toks.len() > self.max_words {
            return None;
        }
        self.phrase_class(&toks)
    }

    fn phrase_class(&self, toks: &[String]) -> Option<&str> {
        if let Some(c) = self.forms.get(&toks.join(" ")) {
            return Some(c);
        }
        let (last, head) = toks.split_last()?;
        for s in singular_candidates(last) {
            let mut key = head.join(" ");
            if !key.is_empty() {
                key.push(' ');
            }
            key.push_str(&s);
            if let Some(c) = self.forms.get(&key) {
                return Some(c);
            }
        }
        None
    }

    /// Every object mention of a text, in order (see the module documentation).
    pub fn mentions(&self, text: &str) -> Vec<Mention> {
        self.mention_spans(text).into_iter().map(|(m, _)| m).collect()
    }

    /// [`Lexicon::mentions`] with each mention's byte range in `text`.
    pub fn mention_spans(&self, text: &str) -> Vec<(Mention, std::ops::Range<usize>)> {
        let spans = token_spans(text);
        let toks: Vec<String> = spans.iter().map(|(t, _)| t.clone()).collect();
        let mut found: Vec<(Mention, usize)> = Vec::new();
        let mut k = 0;
        while k < toks.len() {
            let mut hit = None;
            for n in (1..=self.max_words.min(toks.len() - k)).rev() {
                if let Some(c) = self.phrase_class(&toks[k..k + n]) {
                    hit = Some((c.to_string(), n));
                    break;
                }
            }
            match hit {
                Some((class, n)) => {
                    found.push((Mention { text: toks[k..k + n].join(" "), class, token: k }, n));
                    k += n;
                }
                None => k += 1,
            }
        }
        let mut out = Vec::with_capacity(found.len());
        for (idx, (m, n)) in found.iter().enumerate() {
            let adjective = *n == 1
                && self.colours.contains(&m.text)
                && found.get(idx + 1).is_some_and(|(next, _)| next.token == m.token + 1);
            if !adjective {
                out.push((m.clone(), spans[m.token].1.start..spans[m.token + n - 1].1.end));
            }
        }
        out
    }

    /// The classes named by a list of object names (ground-truth instance or target names);
    /// each name is read like a text, so "dining table" and "tables" both give its class.
    pub fn classes_of_names(&self, names: &[String]) -> BTreeSet<String> {
        names.iter().flat_map(|n| self.mentions(n)).map(|m| m.class).collect()
    }
}
