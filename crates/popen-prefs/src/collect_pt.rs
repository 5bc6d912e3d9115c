//! `popen collect-pt`: the text preference data `P_t` (SPEC section 3).
//!
//! Per sample: the model's greedy answer `y`; the corrector's `y_c`. If `y` has no error
//! (the corrector changes nothing), `resample` answers are sampled and the first with an
//! error is used; if none has one, the corrector injects errors into the ground-truth answer
//! (`y`) and `y_c = y_g`. An answer whose seg groups are malformed cannot be teacher-forced
//! and is passed over like an error-free one. Both answers are tokenized as the model reads
//! them, diffed as RLHF-V does ([`crate::diff::changed_positions`]), and teacher-forced
//! once to store the reference model's per-token log-probs, so the DPO stage needs no
//! second model. One `text-pref/1` record per sample; skipped samples are listed in the
//! manifest with the reason.
//!
//! Every skip of collect-pt is a failure (a corrector request, the model, the sample's
//! data): error-free answers go to the injection branch, not to a skip. The run fails when
//! more than `max_skipped_fraction` of the samples are skipped, when no sample made a
//! record and every skip has one service cause, or early, after `fail_fast_after`
//! consecutive samples failed with the same corrector error class (a bad key, a server that
//! refuses connections, a spent quota): the error names the count and the most common
//! reason once, and neither the output nor its manifest is written (see
//! [`crate::SkipLedger`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use popen_core::lexicon::Lexicon;
use popen_core::shard::{for_each_taken_of, Sample, TextPref};
use popen_core::shardspec::ShardSpec;
use popen_model::bundle;
use popen_model::infer::{Prediction, Predictor};
use popen_model::sampling::SamplingConfig;
use serde::{Deserialize, Serialize};

use crate::corrector::{Corrector, Truth};
use crate::diff::changed_positions;
use crate::noise::perturbation_seed;
use crate::{PrefsError, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectPtConfig {
    pub seed: u64,
    /// Longest generated answer.
    pub max_new_tokens: usize,
    /// Answers sampled when the greedy one has no error (paper: 3).
    pub resample: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// RLHF-V's minimum matching block of the token diff.
    pub min_match: usize,
    /// Records per committed part of a resumable run (a killed job loses at most this many).
    #[serde(default = "crate::default_part_records")]
    pub part_records: usize,
    /// Corrector requests in flight at once: the greedy answers of this many samples are
    /// generated, then corrected concurrently (an HTTP corrector spends its time waiting).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Only this many samples of the input, spread evenly over it, before `--shard`
    /// splits them (0 = all; the CPU demo's budget).
    #[serde(default)]
    pub max_samples: usize,
    /// The objects a corrected answer may mention (SPEC 3.2, 10.19), for the offline
    /// corrector: `answer` (the ground-truth answer's objects, the paper's) or `image` (every
    /// annotated object). The OpenAI corrector's prompt lists the answer's targets.
    #[serde(default)]
    pub object_list: crate::corrector::ObjectList,
    /// The run fails when more than this fraction of its samples (records + skips, resumed
    /// records included) is skipped; every collect-pt skip is a failure (module doc).
    /// 0 = any skip fails the run, 1 = never (except when nothing but one service error
    /// happened). Default 0.5.
    #[serde(default = "crate::default_max_skipped_fraction")]
    pub max_skipped_fraction: f64,
    /// Stop the run once this many consecutive samples (input order) failed with the same
    /// corrector error class (`HTTP 401`, `HTTP 429` after the retries, `transport`, ...),
    /// at the end of the window of `concurrency` samples that reached it, instead of
    /// grinding through every sample. 0 = never. Default 8 (with the default concurrency:
    /// the first window all failing).
    #[serde(default = "default_fail_fast_after")]
    pub fail_fast_after: usize,
}

fn default_concurrency() -> usize {
    8
}

fn default_fail_fast_after() -> usize {
    8
}

impl Default for CollectPtConfig {
    fn default() -> Self {
        CollectPtConfig {
            seed: 0,
            max_new_tokens: 96,
            resample: 3,
            temperature: 1.0,
            top_p: 0.9,
            min_match: 3,
            part_records: crate::default_part_records(),
            concurrency: default_concurrency(),
            max_samples: 0,
            object_list: Default::default(),
            max_skipped_fraction: crate::default_max_skipped_fraction(),
            fail_fast_after: default_fail_fast_after(),
        }
    }
}

impl CollectPtConfig {
    pub fn validate(&self) -> Result<()> {
        if self.part_records == 0 {
            return Err(PrefsError::Input("part_records must be >= 1".into()));
        }
        let s = SamplingConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: 0,
        };
        s.validate().map_err(|e| PrefsError::Input(e.to_string()))?;
        if self.temperature <= 0.0 {
            return Err(PrefsError::Input("temperature must be > 0 (resampling needs sampling)".into()));
        }
        if self.min_match == 0 {
            return Err(PrefsError::Input("min_match must be >= 1".into()));
        }
        if self.concurrency == 0 {
            return Err(PrefsError::Input("concurrency must be >= 1".into()));
        }
        crate::validate_fraction("max_skipped_fraction", self.max_skipped_fraction)
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CollectPtReport {
    pub output: PathBuf,
    /// The output was already complete for this definition: nothing was computed.
    pub up_to_date: bool,
    pub records: usize,
    pub skipped: usize,
    /// Records per branch of SPEC 3.3.
    pub model: usize,
    pub resampled: usize,
    pub injected: usize,
    pub seconds: f64,
}

fn usable(p: &Prediction) -> bool {
    p.seg_issues.is_empty() && !p.answer.contains("[SEG")
}

/// Runs collect-pt on the samples `shard` takes and writes `out` plus its manifest.
#[allow(clippy::too_many_arguments)]
pub fn run<B: Backend>(
    model_dir: &Path,
    samples: &Path,
    out: &Path,
    cfg: &CollectPtConfig,
    corrector: &(dyn Corrector + Sync),
    corrector_name: &str,
    lexicon: &Lexicon,
    shard: ShardSpec,
    progress: bool,
    device: &B::Device,
) -> Result<CollectPtReport> {
    cfg.validate()?;
    let t0 = Instant::now();
    let config = serde_json::json!({
        "config": cfg,
        "corrector": corrector_name,
        "corrector_settings": corrector.settings(),
        "lexicon": lexicon.kind,
        "lexicon_sha256": lexicon.fingerprint(),
    });
    let def = crate::stage_definition("collect-pt", &config, model_dir, samples, &[], &shard)?;
    let Some((bundle::Bundle { model, mut tokenizer, .. }, mut writer, mut manifest)) =
        crate::open_stage::<B, TextPref>(&def, model_dir, out, cfg.part_records, |r| r.id.clone(), device)?
    else {
        return Ok(CollectPtReport { output: out.to_path_buf(), up_to_date: true, ..Default::default() });
    };
    let predictor = Predictor::new(&model, &mut tokenizer).map_err(|e| PrefsError::Input(format!("model: {e}")))?;
    let mut report = CollectPtReport { output: out.to_path_buf(), ..Default::default() };
    let done = writer.done_ids().clone();
    let mut ledger = crate::SkipLedger::new("collect-pt", cfg.max_skipped_fraction, cfg.fail_fast_after);
    let mut window: Vec<Sample> = Vec::new();
    let mut position = std::collections::HashMap::new();
    let mut flush = |window: &mut Vec<Sample>| -> Result<()> {
        for (s, res) in window.iter().zip(collect_window(&predictor, window, cfg, corrector, lexicon)) {
            match res {
                Ok(r) => {
                    match r.branch.as_str() {
                        "model" => report.model += 1,
                        "resampled" => report.resampled += 1,
                        _ => report.injected += 1,
                    }
                    writer.write(r)?;
                    report.records += 1;
                    ledger.ok();
                }
                Err(e) => {
                    // Grouped by the service class, else by the reason's lead ("model",
                    // "corrector reply has no ..."): reasons carry sample-specific text.
                    let reason = e.to_string();
                    let group = e
                        .service_class()
                        .map(str::to_string)
                        .unwrap_or_else(|| reason.split(": ").next().unwrap_or("").to_string());
                    ledger.skip(&mut manifest, &s.id, reason, &group, e.service_class(), true);
                    report.skipped += 1;
                }
            }
        }
        window.clear();
        if let Some(e) = ledger.fail_fast() {
            writer.commit()?;
            return Err(e);
        }
        Ok(())
    };
    for_each_taken_of(samples, &shard, cfg.max_samples, progress.then_some("collect-pt"), |s: Sample| -> Result<()> {
        position.insert(s.id.clone(), position.len());
        if !done.contains(&s.id) {
            window.push(s);
        }
        if window.len() >= cfg.concurrency {
            flush(&mut window)?;
        }
        Ok(())
    })?;
    flush(&mut window)?;
    if let Err(e) = ledger.check_end(report.records + writer.resumed()) {
        writer.commit()?;
        return Err(e);
    }
    crate::close_stage(
        writer,
        manifest,
        out,
        |r: &TextPref| Some(format!("branch_{}", r.branch)),
        &[("skipped", report.skipped)],
        t0,
        &position,
        |r| &r.id,
    )?;
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// The greedy answer of one sample and the corrector's verdict on it.
type Greedy = (image::RgbImage, Truth, Prediction, Option<Result<crate::corrector::Correction>>);

/// collect-pt on a window of samples: greedy answers one by one (the model), then the
/// corrections of all usable ones concurrently (`cfg.concurrency` threads: an HTTP corrector
/// waits on the network), then each sample's remaining branches. Same records as one sample
/// at a time.
fn collect_window<B: Backend>(
    predictor: &Predictor<'_, B>,
    window: &[Sample],
    cfg: &CollectPtConfig,
    corrector: &(dyn Corrector + Sync),
    lexicon: &Lexicon,
) -> Vec<Result<TextPref>> {
    let model_err = |e: popen_model::pixellm::PixelLmError| PrefsError::Input(format!("model: {e}"));
    let greedy = SamplingConfig { max_new_tokens: cfg.max_new_tokens, ..Default::default() };
    let mut firsts: Vec<Result<Greedy>> = window
        .iter()
        .map(|s| {
            let image = s.decode_image()?;
            let first = predictor.predict(&[(&image, s.instruction.as_str())], &greedy).map_err(model_err)?.remove(0);
            Ok((image, Truth::from_sample(s, lexicon), first, None))
        })
        .collect();
    let jobs: Vec<usize> = (0..firsts.len()).filter(|&i| matches!(&firsts[i], Ok((_, _, p, _)) if usable(p))).collect();
    let corrections = parallel_map(&jobs, cfg.concurrency, |&i| match &firsts[i] {
        Ok((_, truth, p, _)) => corrector.correct(&p.answer, truth),
        Err(_) => unreachable!("only successful greedy answers are corrected"),
    });
    for (&i, c) in jobs.iter().zip(corrections) {
        if let Ok(g) = &mut firsts[i] {
            g.3 = Some(c);
        }
    }
    window.iter().zip(firsts).map(|(s, g)| g.and_then(|g| collect_one(predictor, s, g, cfg, corrector))).collect()
}

/// `f` over `items` on up to `threads` scoped threads; results in input order.
fn parallel_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if threads <= 1 || items.len() <= 1 {
        return items.iter().map(&f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<R>>> = items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.min(items.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                *slots[i].lock().expect("no panics while holding the slot") = Some(r);
            });
        }
    });
    slots.into_iter().map(|m| m.into_inner().expect("slot lock").expect("every item ran")).collect()
}

fn collect_one<B: Backend>(
    predictor: &Predictor<'_, B>,
    s: &Sample,
    (image, truth, first, first_correction): Greedy,
    cfg: &CollectPtConfig,
    corrector: &dyn Corrector,
) -> Result<TextPref> {
    let model_err = |e: popen_model::pixellm::PixelLmError| PrefsError::Input(format!("model: {e}"));
    let instr = s.instruction.as_str();
    let mut notes = Vec::new();
    let mut pair: Option<(String, String, &'static str, Vec<String>)> = None;
    if usable(&first) {
        let c = match first_correction {
            Some(c) => c?,
            None => corrector.correct(&first.answer, &truth)?,
        };
        if c.has_error() {
            pair = Some((first.answer.clone(), c.text, "model", c.notes));
        }
    } else {
        notes.push(format!("greedy answer has malformed seg groups: {:?}", first.seg_issues));
    }
    if pair.is_none() && cfg.resample > 0 {
        let sampling = SamplingConfig {
            max_new_tokens: cfg.max_new_tokens,
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            seed: perturbation_seed(cfg.seed, &s.id, 0, 0),
        };
        let items: Vec<(&image::RgbImage, &str)> = (0..cfg.resample).map(|_| (&image, instr)).collect();
        for p in predictor.predict(&items, &sampling).map_err(model_err)? {
            if !usable(&p) {
                continue;
            }
            let c = corrector.correct(&p.answer, &truth)?;
            if c.has_error() {
                pair = Some((p.answer.clone(), c.text, "resampled", c.notes));
                break;
            }
        }
    }
    let (y, y_c, branch, cnotes) = match pair {
        Some(p) => p,
        None => {
            let bad = corrector.inject_errors(&truth, perturbation_seed(cfg.seed, &s.id, 1, 0))?;
            (bad, truth.answer.clone(), "injected", vec![])
        }
    };
    let group = predictor.model.config().seg_group_len();
    let y_ids = predictor.answer_ids(&y, group).map_err(model_err)?;
    let y_c_ids = predictor.answer_ids(&y_c, group).map_err(model_err)?;
    let (l_y, l_yc) = changed_positions(&y_ids, &y_c_ids, cfg.min_match);
    let forced =
        predictor.teacher_force(&[(&image, instr, y.as_str()), (&image, instr, y_c.as_str())]).map_err(model_err)?;
    let (lp_y, lp_yc) = (forced[0].logprobs.clone(), forced[1].logprobs.clone());
    if lp_y.len() != y_ids.len() || lp_yc.len() != y_c_ids.len() {
        return Err(PrefsError::Input(
            "teacher forcing returned log-probs of another length than the answer ids".into(),
        ));
    }
    let to_i32 = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
    let to_i32u = |v: &[usize]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
    notes.extend(cnotes);
    let rec = TextPref {
        id: s.id.clone(),
        split: s.split.clone(),
        image: s.image.clone(),
        width: s.width,
        height: s.height,
        instruction: s.instruction.clone(),
        y,
        y_c,
        y_ids: to_i32(&y_ids),
        y_c_ids: to_i32(&y_c_ids),
        l_y: to_i32u(&l_y),
        l_yc: to_i32u(&l_yc),
        ref_logp_y: lp_y,
        ref_logp_yc: lp_yc,
        branch: branch.to_string(),
        meta: serde_json::json!({"notes": notes}).to_string(),
    };
    rec.validate().map_err(|(f, m)| PrefsError::Input(format!("record field '{f}': {m}")))?;
    Ok(rec)
}
