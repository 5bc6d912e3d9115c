//! collect-ps end to end on a random tiny model and benchmark samples: records that the
//! shard reader accepts, recipes that rebuild, determinism, `--shard` splits equal to the
//! whole run, and phase-1 skips counted with their reason.
use std::path::PathBuf;

use burn::backend::NdArray;
use popen_core::manifest::manifest_beside;
use popen_core::manifest::Manifest;
use popen_core::shard::{read_shard, write_shard, Sample, SegPref};
use popen_core::shardspec::ShardSpec;
use popen_data::synth::{generate_sample, SynthConfig};
use popen_model::bundle;
use popen_model::pixellm::PixelLmConfig;
use popen_model::tokenizer::{Tokenizer, TINY_SPECIALS};
use popen_prefs::collect_ps::{run, AnnotationProposer, CollectPsConfig};
use popen_prefs::noise::NoiseRecipe;
use popen_prefs::select::Phase;

type B = NdArray<f32>;

pub(crate) fn world(dir: &std::path::Path) -> (PathBuf, PathBuf, Vec<Sample>) {
    let cfg = SynthConfig::default();
    let samples: Vec<Sample> = (0..4).map(|i| generate_sample(&cfg, "train", i).unwrap()).collect();
    let shard = dir.join("train.parquet");
    write_shard(&shard, samples.clone()).unwrap();
    let texts: Vec<String> = samples.iter().flat_map(|s| [s.instruction.clone(), s.answer.clone()]).collect();
    let mut tok = Tokenizer::train_tiny(texts.iter().map(String::as_str), 400, TINY_SPECIALS).unwrap();
    let mut mcfg = PixelLmConfig::tiny(512);
    mcfg.llm.num_hidden_layers = 1;
    mcfg.vision.num_hidden_layers = 2;
    mcfg.vision_select_layers = vec![-1, -2];
    tok.add_pixellm_tokens(mcfg.seg_group_len()).unwrap();
    let model = mcfg.init::<B>(&Default::default()).unwrap();
    let mdir = dir.join("model");
    bundle::save(&mdir, &model, &tok).unwrap();
    (mdir, shard, samples)
}

#[test]
fn collect_ps_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (model, shard, samples) = world(dir.path());
    let mut cfg = CollectPsConfig { phase: Phase::Two, perturbations: 6, batch_size: 4, ..Default::default() };
    cfg.select.phase2_top = 5;
    let all = ShardSpec::new(0, 1).unwrap();
    let out = dir.path().join("ps2.parquet");
    let r = run::<B>(&model, &shard, &out, &cfg, &AnnotationProposer, all, false, &Default::default()).unwrap();
    assert_eq!((r.records, r.skipped, r.forwards), (4, 0, 24));
    let recs = read_shard::<SegPref>(&out).unwrap();
    for (rec, s) in recs.iter().zip(&samples) {
        assert_eq!((&rec.id, rec.phase, rec.draw), (&s.id, 2, 0));
        assert_eq!(rec.target_masks, s.target_masks);
        assert!(rec.f_dim > 0);
        // Phase 2 keeps images ordered by boundary score, best first.
        assert!(rec.b[0] >= rec.b[1] && rec.b[1] >= rec.b[2], "{:?}", rec.b);
        // The recipes rebuild images of the sample's size.
        let img = s.decode_image().unwrap();
        for k in 0..3 {
            let rect = &rec.noise_rect[4 * k..4 * k + 4];
            let recipe = NoiseRecipe {
                seed: rec.noise_seed[k],
                x: rect[0],
                y: rect[1],
                width: rect[2],
                height: rect[3],
                sigma: rec.noise_sigma[k],
            };
            assert_eq!(recipe.apply(&img).unwrap().dimensions(), img.dimensions());
        }
    }
    let m = Manifest::read(manifest_beside(&out)).unwrap();
    assert!(m.outputs_intact());
    // Deterministic, and the two halves of --shard 2 give the same records.
    let again = dir.path().join("again.parquet");
    run::<B>(&model, &shard, &again, &cfg, &AnnotationProposer, all, false, &Default::default()).unwrap();
    assert_eq!(read_shard::<SegPref>(&again).unwrap(), recs);
    let mut halves = Vec::new();
    for i in 0..2 {
        let p = dir.path().join(format!("half{i}.parquet"));
        run::<B>(
            &model,
            &shard,
            &p,
            &cfg,
            &AnnotationProposer,
            ShardSpec::new(i, 2).unwrap(),
            false,
            &Default::default(),
        )
        .unwrap();
        halves.extend(read_shard::<SegPref>(&p).unwrap());
    }
    halves.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(halves, recs);
    // max_samples 2 of 4 keeps positions 0 and 2 (floor(k * 4 / 2)), the same records as the
    // whole run; split by --shard 1/2 it takes the second of those two.
    let lcfg = CollectPsConfig { max_samples: 2, ..cfg.clone() };
    let lim = dir.path().join("limited.parquet");
    let rl = run::<B>(
        &model,
        &shard,
        &lim,
        &lcfg,
        &AnnotationProposer,
        ShardSpec::new(0, 1).unwrap(),
        false,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(rl.records, 2);
    assert_eq!(read_shard::<SegPref>(&lim).unwrap(), vec![recs[0].clone(), recs[2].clone()]);
    let lim1 = dir.path().join("limited1.parquet");
    run::<B>(
        &model,
        &shard,
        &lim1,
        &lcfg,
        &AnnotationProposer,
        ShardSpec::new(1, 2).unwrap(),
        false,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(read_shard::<SegPref>(&lim1).unwrap(), vec![recs[2].clone()]);
    // Proposals from a shard (here: the instance masks, one sample left out) give the same
    // records as the annotation proposer; the sample without proposals is skipped.
    let props: Vec<popen_core::shard::ProposalSet> = samples
        .iter()
        .skip(1)
        .map(|s| popen_core::shard::ProposalSet {
            id: s.id.clone(),
            width: s.width,
            height: s.height,
            masks: s.instance_masks.clone(),
            scores: vec![1.0; s.instance_masks.len()],
            meta: "{}".into(),
        })
        .collect();
    let pshard = dir.path().join("proposals.parquet");
    write_shard(&pshard, props).unwrap();
    let proposer = popen_prefs::collect_ps::ShardProposer::open(&[&pshard]).unwrap();
    let outp = dir.path().join("ps-shardprop.parquet");
    let rp =
        run::<B>(&model, &shard, &outp, &cfg, &proposer, ShardSpec::new(0, 2).unwrap(), false, &Default::default())
            .unwrap();
    assert_eq!((rp.records, rp.skipped), (1, 1));
    let got = read_shard::<SegPref>(&outp).unwrap();
    assert_eq!(got[0], recs[2]);
    let text = std::fs::read_to_string(manifest_beside(&outp)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["config"]["proposer"], "shard", "{text}");
    assert!(text.contains("no proposals for sample"), "{text}");
    // A run killed on its third sample (parts of 2 records) leaves one committed part; the
    // rerun resumes it, computes only the last two samples, and writes the same file as the
    // uninterrupted run.
    struct Killer(std::cell::Cell<usize>);
    impl popen_prefs::collect_ps::MaskProposer for Killer {
        fn name(&self) -> &str {
            "annotations"
        }
        fn proposals(&self, s: &Sample) -> popen_prefs::Result<Vec<popen_core::mask::Mask>> {
            self.0.set(self.0.get() + 1);
            if self.0.get() == 3 {
                panic!("killed");
            }
            AnnotationProposer.proposals(s)
        }
    }
    let kcfg = CollectPsConfig { part_records: 2, ..cfg.clone() };
    let outk = dir.path().join("killed.parquet");
    let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let k = Killer(std::cell::Cell::new(0));
        run::<B>(&model, &shard, &outk, &kcfg, &k, ShardSpec::new(0, 1).unwrap(), false, &Default::default())
    }));
    assert!(killed.is_err());
    assert!(!outk.exists());
    assert!(popen_core::shard::parts_dir(&outk).join("part-00000.parquet").exists());
    let rk = run::<B>(
        &model,
        &shard,
        &outk,
        &kcfg,
        &AnnotationProposer,
        ShardSpec::new(0, 1).unwrap(),
        false,
        &Default::default(),
    )
    .unwrap();
    assert_eq!((rk.records, rk.forwards), (2, 12), "only the samples after the committed part are computed");
    assert_eq!(read_shard::<SegPref>(&outk).unwrap(), recs);
    assert!(!popen_core::shard::parts_dir(&outk).exists());
    let mk = Manifest::read(manifest_beside(&outk)).unwrap();
    assert_eq!(mk.counts.get("resumed"), Some(&2));
    // Issue 20 item 7: the resumed run's manifest counts every record of the output (the 2
    // resumed ones too), not only the 2 this run computed.
    assert_eq!(mk.counts.get("records"), Some(&(recs.len() as u64)), "{:?}", mk.counts);
    // Phase 1 with an impossible threshold: every sample is skipped after the cap, with the
    // reason in the manifest.
    let mut p1 = CollectPsConfig { phase: Phase::One, perturbations: 5, batch_size: 5, ..Default::default() };
    p1.select.phase1_max_above = 2.0;
    p1.select.max_regenerations = 1;
    let out1 = dir.path().join("ps1.parquet");
    let r1 = run::<B>(
        &model,
        &shard,
        &out1,
        &p1,
        &AnnotationProposer,
        ShardSpec::new(0, 2).unwrap(),
        false,
        &Default::default(),
    )
    .unwrap();
    assert_eq!((r1.records, r1.skipped, r1.forwards), (0, 2, 20));
    let text = std::fs::read_to_string(manifest_beside(&out1)).unwrap();
    assert!(text.contains("no batch had min s < 0 and max s > 2 in 2 draws"), "{text}");
}

/// collect-pt on the random tiny model: its answers are wrong or malformed, so every record
/// comes from the model or the injection branch; ids, diff positions and reference log-probs
/// line up, and the diff equals `changed_positions` of the stored ids.
#[test]
fn collect_pt_end_to_end() {
    use popen_core::shard::TextPref;
    use popen_prefs::collect_pt::{self, CollectPtConfig};
    use popen_prefs::corrector::OfflineCorrector;
    use popen_prefs::diff::changed_positions;
    let dir = tempfile::tempdir().unwrap();
    let (model, shard, samples) = world(dir.path());
    let lex = popen_core::lexicon::Lexicon::from_benchmark_json(
        &serde_json::to_string(&popen_data::synth::lexicon()).unwrap(),
    )
    .unwrap();
    let corrector = OfflineCorrector::new(lex.clone());
    let cfg = CollectPtConfig { max_new_tokens: 24, resample: 2, ..Default::default() };
    let out = dir.path().join("pt.parquet");
    let all = ShardSpec::new(0, 1).unwrap();
    let r =
        collect_pt::run::<B>(&model, &shard, &out, &cfg, &corrector, "offline", &lex, all, false, &Default::default())
            .unwrap();
    assert_eq!(r.records + r.skipped, samples.len());
    assert_eq!(r.records, samples.len(), "{r:?}");
    assert_eq!(r.model + r.resampled + r.injected, r.records);
    let recs = read_shard::<TextPref>(&out).unwrap();
    for (rec, s) in recs.iter().zip(&samples) {
        assert_eq!(rec.id, s.id);
        assert_ne!(rec.y, rec.y_c);
        let (a, b): (Vec<u32>, Vec<u32>) =
            (rec.y_ids.iter().map(|&x| x as u32).collect(), rec.y_c_ids.iter().map(|&x| x as u32).collect());
        let (ly, lyc) = changed_positions(&a, &b, 3);
        assert_eq!(rec.l_y, ly.iter().map(|&x| x as i32).collect::<Vec<_>>());
        assert_eq!(rec.l_yc, lyc.iter().map(|&x| x as i32).collect::<Vec<_>>());
        if rec.branch == "injected" {
            assert_eq!(rec.y_c, s.answer);
        }
    }
    let again = dir.path().join("pt2.parquet");
    collect_pt::run::<B>(&model, &shard, &again, &cfg, &corrector, "offline", &lex, all, false, &Default::default())
        .unwrap();
    assert_eq!(read_shard::<TextPref>(&again).unwrap(), recs, "deterministic");
    // Concurrent corrections (a slow corrector that counts requests in flight) give the same
    // records as one at a time, and never more than `concurrency` requests at once.
    struct Slow {
        inner: OfflineCorrector,
        now: std::sync::atomic::AtomicUsize,
        max: std::sync::atomic::AtomicUsize,
    }
    impl popen_prefs::corrector::Corrector for Slow {
        fn correct(
            &self,
            y: &str,
            t: &popen_prefs::corrector::Truth,
        ) -> popen_prefs::Result<popen_prefs::corrector::Correction> {
            use std::sync::atomic::Ordering::SeqCst;
            let n = self.now.fetch_add(1, SeqCst) + 1;
            self.max.fetch_max(n, SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(40));
            self.now.fetch_sub(1, SeqCst);
            self.inner.correct(y, t)
        }
        fn inject_errors(&self, t: &popen_prefs::corrector::Truth, seed: u64) -> popen_prefs::Result<String> {
            self.inner.inject_errors(t, seed)
        }
    }
    for conc in [1, 3] {
        let slow = Slow { inner: OfflineCorrector::new(lex.clone()), now: 0.into(), max: 0.into() };
        let c = CollectPtConfig { concurrency: conc, ..cfg.clone() };
        let o = dir.path().join(format!("pt-c{conc}.parquet"));
        collect_pt::run::<B>(
            &model,
            &shard,
            &o,
            &c,
            &slow,
            "offline",
            &lex,
            ShardSpec::new(0, 1).unwrap(),
            false,
            &Default::default(),
        )
        .unwrap();
        assert_eq!(read_shard::<TextPref>(&o).unwrap(), recs, "concurrency {conc}");
        let max = slow.max.load(std::sync::atomic::Ordering::SeqCst);
        assert!(max >= 1 && max <= conc, "concurrency {conc}: {max} requests in flight");
    }
}
