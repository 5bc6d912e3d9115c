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
