//! The sam-masks stage on benchmark samples with the real MobileSAM (small point grid to
//! stay fast): one proposal record per readable image with boxes and scores in meta, a
//! corrupt image skipped with its reason, `--shard` halves equal to the whole run.

use popen_core::manifest::{manifest_beside, Manifest};
use popen_core::shard::{read_shard, write_shard, ProposalSet, Sample};
use popen_core::shardspec::ShardSpec;
use popen_data::synth::{generate_sample, SynthConfig};
use popen_sam::stage::{run, ImageSource, SamMasksConfig};

use crate::tiny_vit::{mobile_sam_path, Cpu};

#[test]
fn sam_masks_stage_on_benchmark_samples() {
    let dir = tempfile::tempdir().unwrap();
    let synth = SynthConfig::default();
    let mut samples: Vec<Sample> = (0..3).map(|i| generate_sample(&synth, "val", i).unwrap()).collect();
    samples[1].image = b"\xff\xd8 not a jpeg".to_vec();
    let shard = dir.path().join("val.parquet");
    write_shard(&shard, samples.clone()).unwrap();
    let mut cfg = SamMasksConfig { checkpoint: mobile_sam_path(), chunk: 1, ..Default::default() };
    cfg.amg.points_per_side = Some(2);
    let dev = Default::default();
    let out = dir.path().join("sam.parquet");
    let r = run::<Cpu>(&cfg, &ImageSource::Samples(shard.clone()), &out, &ShardSpec::ALL, &dev).unwrap();
    assert_eq!((r.images, r.skipped), (3, 1));
    let recs = read_shard::<ProposalSet>(&out).unwrap();
    assert_eq!(recs.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), [&samples[0].id, &samples[2].id]);
    for (p, s) in recs.iter().zip([&samples[0], &samples[2]]) {
        assert_eq!((p.width, p.height), (s.width, s.height));
        assert_eq!(p.masks.len(), p.scores.len());
        assert!(p.scores.iter().all(|&v| v > 0.88), "predicted IoU filter: {:?}", p.scores);
        let meta: serde_json::Value = serde_json::from_str(&p.meta).unwrap();
        assert_eq!(meta["model"], "mobile_sam");
        assert_eq!(meta["bbox_xywh"].as_array().unwrap().len(), p.masks.len());
    }
    let m = Manifest::read(manifest_beside(&out)).unwrap();
    assert!(m.outputs_intact());
    assert_eq!(m.skipped.len(), 1);
    assert_eq!(m.skipped[0].record, samples[1].id);
    // The two halves of --shard 2 hold the same records as the whole run.
    let mut halves = Vec::new();
    for i in 0..2 {
        let spec = ShardSpec::new(i, 2).unwrap();
        let o = spec.output_path(&dir.path().join("half.parquet"));
        run::<Cpu>(&cfg, &ImageSource::Samples(shard.clone()), &o, &spec, &dev).unwrap();
        halves.extend(read_shard::<ProposalSet>(&o).unwrap());
    }
    halves.sort_by(|a, b| a.id.cmp(&b.id));
    let mut whole = recs.clone();
    whole.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(halves, whole);
    // A missing checkpoint is a clear error.
    let bad = SamMasksConfig { checkpoint: dir.path().join("nope.pt"), ..cfg.clone() };
    let e = run::<Cpu>(&bad, &ImageSource::Samples(shard), &dir.path().join("x.parquet"), &ShardSpec::ALL, &dev)
        .unwrap_err();
    assert!(e.to_string().contains("nope.pt"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Issue 20 item 4: one bad record must not kill a job; memory bounded by the budget.

use image::RgbImage;
use popen_core::imageio::{uniform_png, ImageLimits};
use popen_sam::amg::{generate, AmgConfig, MaskRows, PromptModel};

/// `s` turned into a record of `image` (`w x h`) without targets (so the record is valid
/// whatever the size).
fn with_image(mut s: Sample, image: Vec<u8>, w: u32, h: u32) -> Sample {
    s.image = image;
    (s.width, s.height) = (w, h);
    s.answer = "Nothing to segment.".into();
    s.target_names.clear();
    s.target_masks.clear();
    s.target_instances.clear();
    s.instance_names.clear();
    s.instance_masks.clear();
    s
}

/// Generated bad records between two good ones: a 100000x1 strip (old code: panic in
/// `interp_matrix`, `n_in - 1` underflow at popen-model sam.rs:1179, again on the resumed
/// run), a 10000x10000 uniform PNG (~100 KB; old code decoded 300 MB and upsampled every
/// point batch to 100 MP: 64 x 3 x 4 B x 1e8 = 77 GB) and a 41x2 image (aspect 20.5). Each
/// is skipped with its reason in the manifest; the job and its rerun finish. With the limits
/// off, the strip reaches SAM's resize, which now refuses it (a side of 0 pixels) instead
/// of panicking, and it is skipped too.
#[test]
fn sam_masks_skips_bad_records_and_reruns() {
    let dir = tempfile::tempdir().unwrap();
    let synth = SynthConfig::default();
    let good: Vec<Sample> = (0..2).map(|i| generate_sample(&synth, "val", i).unwrap()).collect();
    let bad = [
        with_image(good[0].clone(), uniform_png(100_000, 1, 200).unwrap(), 100_000, 1),
        with_image(good[0].clone(), uniform_png(10_000, 10_000, 90).unwrap(), 10_000, 10_000),
        with_image(good[0].clone(), uniform_png(41, 2, 90).unwrap(), 41, 2),
    ];
    let mut samples = vec![good[0].clone()];
    for (i, b) in bad.iter().enumerate() {
        let mut b = b.clone();
        b.id = format!("bad-{i}");
        samples.push(b);
    }
    samples.push(good[1].clone());
    let shard = dir.path().join("val.parquet");
    write_shard(&shard, samples.clone()).unwrap();
    let mut cfg = SamMasksConfig { checkpoint: mobile_sam_path(), chunk: 1, ..Default::default() };
    cfg.amg.points_per_side = Some(1);
    let dev = Default::default();
    let out = dir.path().join("sam.parquet");
    for attempt in 0..2 {
        if attempt == 1 {
            // The second attempt recomputes (as `--force` does: no manifest), so it meets the
            // bad records again; a plain rerun of the complete output does nothing (below).
            std::fs::remove_file(manifest_beside(&out)).unwrap();
        }
        let r = run::<Cpu>(&cfg, &ImageSource::Samples(shard.clone()), &out, &ShardSpec::ALL, &dev).unwrap();
        assert!(!r.up_to_date);
        assert_eq!((r.images, r.skipped), (5, 3), "attempt {attempt}");
        let ids: Vec<String> = read_shard::<ProposalSet>(&out).unwrap().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, [good[0].id.clone(), good[1].id.clone()]);
        let m = Manifest::read(manifest_beside(&out)).unwrap();
        let reasons: Vec<(&str, &str)> = m.skipped.iter().map(|s| (s.record.as_str(), s.reason.as_str())).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(
            reasons[0].0 == "bad-0" && reasons[0].1.contains("image 100000x1: aspect 100000 > max_aspect 20"),
            "{reasons:?}"
        );
        assert!(
            reasons[1].0 == "bad-1" && reasons[1].1.contains("100000000 pixels > max_pixels 67108864"),
            "{reasons:?}"
        );
        assert!(reasons[2].0 == "bad-2" && reasons[2].1.contains("aspect 20.5 > max_aspect 20"), "{reasons:?}");
    }
    let r = run::<Cpu>(&cfg, &ImageSource::Samples(shard.clone()), &out, &ShardSpec::ALL, &dev).unwrap();
    assert!(r.up_to_date, "same definition: complete");
    // Limits off: the strip gets to SAM's preprocessing, an error there, not a panic.
    let strip_only = dir.path().join("strip.parquet");
    write_shard(&strip_only, vec![samples[1].clone()]).unwrap();
    let loose = SamMasksConfig { limits: ImageLimits::NONE, ..cfg.clone() };
    let out2 = dir.path().join("sam-strip.parquet");
    let r = run::<Cpu>(&loose, &ImageSource::Samples(strip_only), &out2, &ShardSpec::ALL, &dev).unwrap();
    assert_eq!((r.images, r.skipped), (1, 1));
    let m = Manifest::read(manifest_beside(&out2)).unwrap();
    assert!(m.skipped[0].reason.contains("a side of 0 pixels"), "{:?}", m.skipped);
    // Existing configs (no [limits], no mask_memory_mb) still parse, with the defaults.
    let c: SamMasksConfig = serde_json::from_str(r#"{"model": "mobile_sam", "amg": {"points_per_side": 16}}"#).unwrap();
    assert_eq!((c.limits, c.amg.mask_memory_mb), (ImageLimits::default(), 256));
    let c: SamMasksConfig = serde_json::from_str(r#"{"limits": {"max_aspect": 8.0}}"#).unwrap();
    assert_eq!(c.limits.max_aspect, 8.0);
}

/// The banded upsampling (groups of masks, or row bands of one mask, under a budget of
/// logits) gives the logits of the whole-batch upsampling (the reference: `predict_points`,
/// SAM's `postprocess_masks` over the whole batch), piece sizes within the budget.
#[test]
fn banded_upsampling_equals_the_whole_batch() {
    let mut p = crate::tiny_vit::predictor();
    let s = generate_sample(&SynthConfig::default(), "val", 3).unwrap();
    let img = popen_core::imageio::decode_rgb(&s.image, None).unwrap();
    let (w, h) = (img.width() as usize, img.height() as usize);
    PromptModel::set_image(&mut p, &img).unwrap();
    let points = [[20.0, 30.0], [60.0, 50.0], [w as f64 - 3.0, 2.0]];
    let whole = p.predict_points(&points).unwrap();
    let k = whole.masks_per_point;
    let hw = h * w;
    for budget in [1, w * 5 + 3, 256 * w, 256 * w * 2 + 1, 1 << 30] {
        let mut got = vec![f32::NAN; whole.logits.len()];
        let mut largest = 0;
        let mut sink = |piece: MaskRows<'_>| {
            largest = largest.max(piece.logits.len());
            assert_eq!((piece.point, piece.iou), (piece.mask / k, whole.iou[piece.mask]));
            let at = piece.mask * hw + piece.rows.start * w;
            got[at..at + piece.logits.len()].copy_from_slice(piece.logits);
            Ok(())
        };
        let head = p.predict_points_banded(&points, budget, &|_| true, &mut sink).unwrap();
        assert_eq!((head.height, head.width, &head.iou), (h, w, &whole.iou));
        assert!(largest <= budget.max(w), "budget {budget}: a piece of {largest} values");
        let scale = whole.logits.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
        for (i, (a, b)) in got.iter().zip(&whole.logits).enumerate() {
            assert!((a - b).abs() <= 1e-5 * scale, "budget {budget}: logit {i}: {a} vs {b}");
            assert_eq!(*a > 0.0, *b > 0.0, "budget {budget}: logit {i} flips the mask");
        }
    }
    // Only the wanted masks are upsampled.
    let mut seen = Vec::new();
    let wanted = |iou: f32| iou > whole.iou[1];
    p.predict_points_banded(&points, 1 << 20, &wanted, &mut |piece| {
        seen.push(piece.mask);
        Ok(())
    })
    .unwrap();
    let expect: Vec<usize> = (0..whole.iou.len()).filter(|&i| wanted(whole.iou[i])).collect();
    assert_eq!(seen, expect);
}

/// The generator's masks do not depend on `mask_memory_mb`: 1 MiB makes every 640x480 mask
/// (1.2 MB of logits) go in two row bands, 256 MiB upsamples the batch in one group.
#[test]
fn generate_is_independent_of_the_mask_memory_budget() {
    let mut p = crate::tiny_vit::predictor();
    let s = generate_sample(&SynthConfig::default(), "val", 4).unwrap();
    let small = popen_core::imageio::decode_rgb(&s.image, None).unwrap();
    let img: RgbImage = image::imageops::resize(&small, 640, 480, image::imageops::FilterType::Triangle);
    let cfg = AmgConfig {
        points_per_side: Some(2),
        pred_iou_thresh: 0.0,
        stability_score_thresh: 0.0,
        ..AmgConfig::default()
    };
    let a = generate(&mut p, &img, &cfg, &mut |_, _| {}).unwrap();
    let b = generate(&mut p, &img, &AmgConfig { mask_memory_mb: 1, ..cfg.clone() }, &mut |_, _| {}).unwrap();
    assert!(!a.is_empty());
    assert_eq!(a, b);
}
