//! The synthetic benchmark: determinism, sharding, record validity, content coverage,
//! the held-out split, lexicon coverage, and overlay rendering.

use popen_core::mask::{Mask, Rle};
use popen_core::shard::{read_shard, Sample, SEG_TOKEN};
use popen_core::shardspec::ShardSpec;
use popen_data::render::{overlay, overlay_masks};
use popen_data::synth::{generate, lexicon, SynthConfig, TEMPLATE_KINDS};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::OnceLock;

fn small(seed: u64, train: usize, val: usize, test: usize) -> SynthConfig {
    SynthConfig { seed, train, val, test, ..Default::default() }
}

fn read_all(dir: &Path, suffix: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for split in ["train", "val", "test"] {
        out.extend(read_shard::<Sample>(dir.join(format!("{split}{suffix}.parquet"))).unwrap());
    }
    out
}

fn meta(s: &Sample) -> serde_json::Value {
    serde_json::from_str(&s.meta).unwrap()
}

/// One shared set of a few hundred samples for the content checks.
fn corpus() -> &'static Vec<Sample> {
    static C: OnceLock<Vec<Sample>> = OnceLock::new();
    C.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let m = generate(&small(7, 220, 30, 70), dir.path(), ShardSpec::ALL).unwrap();
        assert_eq!(m.counts["train"], 220);
        assert_eq!(m.counts["val"], 30);
        assert_eq!(m.counts["test"], 70);
        assert!(dir.path().join("manifest.json").exists());
        assert!(dir.path().join("lexicon.json").exists());
        read_all(dir.path(), "")
    })
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    generate(&small(3, 20, 6, 6), a.path(), ShardSpec::ALL).unwrap();
    generate(&small(3, 20, 6, 6), b.path(), ShardSpec::ALL).unwrap();
    generate(&small(4, 20, 6, 6), c.path(), ShardSpec::ALL).unwrap();
    for f in ["train.parquet", "val.parquet", "test.parquet", "lexicon.json"] {
        let x = std::fs::read(a.path().join(f)).unwrap();
        let y = std::fs::read(b.path().join(f)).unwrap();
        assert!(x == y, "{f} differs between two runs with the same seed");
    }
    for f in ["train.parquet", "val.parquet", "test.parquet"] {
        let x = std::fs::read(a.path().join(f)).unwrap();
        let z = std::fs::read(c.path().join(f)).unwrap();
        assert!(x != z, "{f} is the same for seeds 3 and 4");
    }
}

#[test]
fn shards_union_to_the_unsharded_run() {
    let cfg = small(11, 17, 5, 7);
    let all_dir = tempfile::tempdir().unwrap();
    generate(&cfg, all_dir.path(), ShardSpec::ALL).unwrap();
    let all = read_all(all_dir.path(), "");
    let dir = tempfile::tempdir().unwrap();
    let mut union: BTreeMap<String, Sample> = BTreeMap::new();
    for i in 0..3 {
        let spec = ShardSpec::new(i, 3).unwrap();
        let m = generate(&cfg, dir.path(), spec).unwrap();
        assert_eq!(m.shard.as_deref(), Some(format!("{i}/3").as_str()));
        assert!(dir.path().join(format!("manifest{}.json", spec.suffix())).exists());
        for s in read_all(dir.path(), &spec.suffix()) {
            let idx = meta(&s)["index"].as_u64().unwrap() as usize;
            assert!(spec.takes(idx), "{} in shard {spec}", s.id);
            assert!(union.insert(s.id.clone(), s).is_none(), "duplicate row");
        }
    }
    assert_eq!(union.len(), all.len());
    // a task whose indices miss a split still writes a (readable, empty) shard
    let spec = ShardSpec::new(3, 4).unwrap();
    let m = generate(&small(1, 2, 1, 1), dir.path(), spec).unwrap();
    assert_eq!(m.counts["train"], 0);
    assert!(read_all(dir.path(), &spec.suffix()).is_empty());
    for s in &all {
        assert_eq!(union.get(&s.id), Some(s), "{} differs in the sharded run", s.id);
    }
}

#[test]
fn every_record_validates_and_is_consistent() {
    for s in corpus() {
        s.validate().unwrap_or_else(|(f, m)| panic!("{}: {f}: {m}", s.id));
        assert!(!s.target_names.is_empty(), "{} has no target", s.id);
        let img = s.decode_image().unwrap();
        assert_eq!((img.width(), img.height()), (96, 96));
        for (i, &t) in s.target_instances.iter().enumerate() {
            assert!(t >= 0);
            assert_eq!(s.target_masks[i], s.instance_masks[t as usize]);
            assert_eq!(s.target_names[i], s.instance_names[t as usize]);
        }
        // visible masks are disjoint and non-empty
        let masks: Vec<Mask> = s.instance_masks.iter().map(|r| r.decode().unwrap()).collect();
        let mut seen = vec![0u8; 96 * 96];
        for m in &masks {
            assert!(m.area() > 0, "{}: empty instance mask", s.id);
            for (p, &v) in m.data().iter().enumerate() {
                seen[p] += v;
                assert!(seen[p] <= 1, "{}: instance masks overlap", s.id);
            }
        }
        // distinct targets
        let set: BTreeSet<i32> = s.target_instances.iter().copied().collect();
        assert_eq!(set.len(), s.target_instances.len(), "{}: repeated target", s.id);
        let m = meta(s);
        assert_eq!(m["instances"].as_array().unwrap().len(), s.instance_names.len());
    }
}

#[test]
fn content_covers_categories_templates_and_counts() {
    let mut cats = BTreeSet::new();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut occluded = 0;
    let mut multi_target = 0;
    for s in corpus() {
        let n = s.instance_names.len();
        assert!((2..=6).contains(&n), "{}: {n} objects", s.id);
        cats.extend(s.instance_names.iter().cloned());
        *kinds.entry(meta(s)["template"].as_str().unwrap().to_string()).or_default() += 1;
        if meta(s)["instances"].as_array().unwrap().iter().any(|i| i["visible_fraction"].as_f64().unwrap() < 0.97) {
            occluded += 1;
        }
        if s.target_names.len() > 1 {
            multi_target += 1;
        }
    }
    assert!(cats.len() >= 12, "only {} categories: {cats:?}", cats.len());
    assert!(kinds.len() >= 8, "only {} template kinds: {kinds:?}", kinds.len());
    for k in kinds.keys() {
        assert!(TEMPLATE_KINDS.contains(&k.as_str()));
    }
    let n = corpus().len();
    assert!(occluded * 5 >= n, "too little occlusion: {occluded}/{n}");
    assert!(multi_target * 10 >= n, "too few multi-target samples: {multi_target}/{n}");
}

#[test]
fn heldout_combos_only_in_test_and_in_every_test_sample() {
    let lex = lexicon();
    let held: BTreeSet<(String, String)> =
        lex.heldout_combos.iter().map(|c| (c.category.clone(), c.colour.clone())).collect();
    assert!(!held.is_empty());
    let mut seen_in_test = BTreeSet::new();
    for s in corpus() {
        let m = meta(s);
        let insts = m["instances"].as_array().unwrap();
        let combo = |i: &serde_json::Value| {
            (i["category"].as_str().unwrap().to_string(), i["colour"].as_str().unwrap().to_string())
        };
        if s.split == "test" {
            let hit = s.target_instances.iter().any(|&t| held.contains(&combo(&insts[t as usize])));
            assert!(hit, "{}: no held-out combination among the targets", s.id);
            assert_eq!(m["heldout"], true);
            for i in insts {
                if held.contains(&combo(i)) {
                    seen_in_test.insert(combo(i));
                }
            }
        } else {
            for i in insts {
                assert!(!held.contains(&combo(i)), "{}: held-out {:?} in {}", s.id, combo(i), s.split);
            }
        }
    }
    assert!(seen_in_test.len() >= 5, "test covers few held-out combinations: {seen_in_test:?}");
}

#[test]
fn lexicon_covers_every_name_in_answers() {
    let lex = lexicon();
    for s in corpus() {
        // the noun right before each <seg> is a mention form of that target's category
        let pieces: Vec<&str> = s.answer.split(SEG_TOKEN).collect();
        for (i, piece) in pieces[..pieces.len() - 1].iter().enumerate() {
            let words: Vec<&str> = piece.split_whitespace().collect();
            let mut found = None;
            for n in (1..=3.min(words.len())).rev() {
                let form = words[words.len() - n..].join(" ").to_lowercase();
                if let Some(c) = lex.canonical(&form) {
                    found = Some(c.to_string());
                    break;
                }
            }
            assert_eq!(
                found.as_deref(),
                Some(s.target_names[i].as_str()),
                "{}: '{}' before <seg> {i} does not name {}",
                s.id,
                piece,
                s.target_names[i]
            );
        }
        // CHAIR on the ground truth: every mention is of an object in the image
        let present: BTreeSet<&str> = s.instance_names.iter().map(|n| n.as_str()).collect();
        for (cat, form) in lex.find_mentions(&s.answer) {
            assert!(present.contains(cat.as_str()), "{}: answer mentions '{form}' ({cat}) not in the image", s.id);
        }
        for (cat, form) in lex.find_mentions(&s.instruction) {
            assert!(present.contains(cat.as_str()), "{}: instruction mentions absent '{form}'", s.id);
        }
    }
}

#[test]
fn overlay_has_the_expected_size_and_rejects_bad_masks() {
    let s = &corpus()[0];
    let img = overlay(s, 3).unwrap();
    // plain and overlaid image side by side, 4 px apart, text below
    assert_eq!(img.width(), 2 * 96 * 3 + 4);
    assert!(img.height() > 96 * 3 + 20);
    let img1 = overlay(s, 1).unwrap();
    assert_eq!(img1.width(), 320);
    assert_eq!(img1.get_pixel(0, 0), &image::Rgb([255, 255, 255]));

    let mut bad = s.clone();
    bad.target_masks[0] = Rle::encode(&Mask::zeros(10, 10));
    let e = overlay(&bad, 2).unwrap_err().to_string();
    assert!(e.contains(&s.id) && e.contains("target mask 0"), "{e}");

    let mut bad = s.clone();
    bad.image = b"not an image".to_vec();
    let e = overlay(&bad, 2).unwrap_err().to_string();
    assert!(e.contains(&s.id), "{e}");

    let mut bad = s.clone();
    bad.instance_masks[0] = Rle { height: 96, width: 96, counts: vec![5, 3] };
    assert!(overlay(&bad, 2).is_err());

    let rgb = s.decode_image().unwrap();
    assert!(overlay_masks(&rgb, &[(Mask::zeros(95, 96), [1, 2, 3])], 2).is_err());
}

/// Generates a set through the public API and renders overlays from its shards, for
/// looking at: `POPEN_SYNTH_OUT=/tmp/synth POPEN_OVERLAY_DIR=/tmp cargo test -p popen-data
/// --release --test synth dump_overlays -- --ignored --nocapture`. Writes
/// `overlay_{0,1,2}.png` (train rows 0 and 1, test row 0) and `synth_sheet.png` (24 plain
/// train images).
#[test]
#[ignore]
fn dump_overlays() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let out = std::path::PathBuf::from(env("POPEN_SYNTH_OUT", "/tmp/synth"));
    let dir = env("POPEN_OVERLAY_DIR", "/tmp");
    let seed: u64 = env("POPEN_OVERLAY_SEED", "1").parse().unwrap();
    let train: usize = env("POPEN_SYNTH_TRAIN", "2000").parse().unwrap();
    let cfg = small(seed, train, train / 10, train / 10);
    let t = std::time::Instant::now();
    let m = generate(&cfg, &out, ShardSpec::ALL).unwrap();
    let dt = t.elapsed().as_secs_f64();
    let n = m.counts["train"] + m.counts["val"] + m.counts["test"];
    println!("generated {n} samples in {dt:.2}s ({:.0} samples/s, all cores) into {}", n as f64 / dt, out.display());
    println!("counts {:?}", m.counts);
    let train_rows = read_shard::<Sample>(out.join("train.parquet")).unwrap();
    let test_rows = read_shard::<Sample>(out.join("test.parquet")).unwrap();
    for (k, s) in [&train_rows[0], &train_rows[1], &test_rows[0]].into_iter().enumerate() {
        overlay(s, 4).unwrap().save(format!("{dir}/overlay_{k}.png")).unwrap();
        println!("overlay_{k}: {} | {} | {}", s.id, s.instruction, s.answer);
    }
    let (cols, rows, sc) = (6u32, 4u32, 3u32);
    let mut sheet = image::RgbImage::new(cols * 96 * sc, rows * 96 * sc);
    for (k, s) in train_rows.iter().skip(100).take((cols * rows) as usize).enumerate() {
        let k = k as u32;
        let img = s.decode_image().unwrap();
        let big = image::imageops::resize(&img, 96 * sc, 96 * sc, image::imageops::FilterType::Nearest);
        image::imageops::replace(&mut sheet, &big, ((k % cols) * 96 * sc) as i64, ((k / cols) * 96 * sc) as i64);
    }
    sheet.save(format!("{dir}/synth_sheet.png")).unwrap();
}

/// Prints examples and statistics: `POPEN_SYNTH_N=500 cargo test -p popen-data --test synth
/// print_stats -- --ignored --nocapture`.
#[test]
#[ignore]
fn print_stats() {
    let n: usize = std::env::var("POPEN_SYNTH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let cfg = small(5, n, 0, n / 5);
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut variants: BTreeMap<String, usize> = BTreeMap::new();
    let mut ntargets: BTreeMap<usize, usize> = BTreeMap::new();
    let mut nobj: BTreeMap<usize, usize> = BTreeMap::new();
    let mut cats: BTreeMap<String, usize> = BTreeMap::new();
    let t = std::time::Instant::now();
    let mut all = Vec::new();
    for (split, count) in [("train", n), ("test", n / 5)] {
        for i in 0..count {
            all.push(popen_data::synth::generate_sample(&cfg, split, i).unwrap());
        }
    }
    let dt = t.elapsed().as_secs_f64();
    for (k, s) in all.iter().enumerate() {
        let m = meta(s);
        *kinds.entry(m["template"].as_str().unwrap().into()).or_default() += 1;
        let v = m["variant"].as_str().unwrap();
        *variants
            .entry(format!("{}:{}", m["template"].as_str().unwrap(), v.split(['/', ':']).next().unwrap()))
            .or_default() += 1;
        *ntargets.entry(s.target_names.len()).or_default() += 1;
        *nobj.entry(s.instance_names.len()).or_default() += 1;
        for c in &s.instance_names {
            *cats.entry(c.clone()).or_default() += 1;
        }
        if k < 40 || (s.split == "test" && k < n + 10) {
            println!("[{}] {} | {} | {}", m["template"].as_str().unwrap(), s.id, s.instruction, s.answer);
        }
    }
    println!("{} samples in {dt:.2}s ({:.0}/s, one thread)", all.len(), all.len() as f64 / dt);
    println!("kinds {kinds:?}\nvariants {variants:?}\ntargets {ntargets:?}\nobjects {nobj:?}\ncategories {cats:?}");
}

/// `questions_per_image = 3`: samples 3k..3k+2 show scene k (identical image bytes and
/// instances) and ask different questions about it; question 0 of scene k is what sample k
/// of a one-question run would be, so the image set is the one-question run's.
#[test]
fn questions_per_image_share_the_scene() {
    let one = SynthConfig::default();
    let three = SynthConfig { questions_per_image: 3, ..SynthConfig::default() };
    let mut distinct = 0;
    for k in 0..8 {
        let base = popen_data::synth::generate_sample(&one, "train", k).unwrap();
        let qs: Vec<Sample> =
            (0..3).map(|j| popen_data::synth::generate_sample(&three, "train", 3 * k + j).unwrap()).collect();
        for q in &qs {
            assert_eq!(q.image, base.image, "scene {k}");
            assert_eq!(q.instance_masks, base.instance_masks);
            assert_eq!(meta(q)["image_index"], serde_json::json!(k));
            q.validate().unwrap();
        }
        assert_eq!(qs[0].instruction, base.instruction);
        assert_eq!(qs[0].answer, base.answer);
        distinct +=
            usize::from(qs[1].instruction != qs[0].instruction) + usize::from(qs[2].instruction != qs[0].instruction);
    }
    assert!(distinct >= 12, "later questions mostly differ from question 0: {distinct}/16");
    assert!(SynthConfig { questions_per_image: 0, ..SynthConfig::default() }.validate().is_err());
}
