//! MUSE importer on a MUSE-shaped file built from the labelme COCO example (real VOC photos,
//! 12 instance polygons; `make assets` fetches them), plus every kind of bad record.
//!
//! Reference: tests/fixtures/labelme_pycocotools.json, written by
//! tools/reference/labelme_areas.py with pycocotools (frPyObjects + merge, as PixelLM's MUSE
//! loader does): our masks must have exactly those areas and RLE strings. (labelme's own
//! `area` field comes from PIL rasterization and differs by a few percent.)

use popen_core::shard::{read_shard, Sample};
use popen_core::shardspec::ShardSpec;
use popen_data::muse::{import, MuseImportConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn labelme() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/assets/labelme");
    assert!(dir.join("annotations.json").is_file(), "{} is missing: run `make assets` first", dir.display());
    dir
}

fn coco() -> Value {
    serde_json::from_str(&std::fs::read_to_string(labelme().join("annotations.json")).unwrap()).unwrap()
}

/// One MUSE record per photo: one question per category and one for all objects.
fn muse_records(coco: &Value) -> Vec<Value> {
    let cats: std::collections::HashMap<i64, String> = coco["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_i64().unwrap(), c["name"].as_str().unwrap().to_string()))
        .collect();
    let mut out = Vec::new();
    for img in coco["images"].as_array().unwrap() {
        let anns: Vec<Value> = coco["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["image_id"] == img["id"])
            .map(|a| {
                json!({"id": a["id"], "category_id": a["category_id"],
                       "category_name": cats[&a["category_id"].as_i64().unwrap()],
                       "bbox": a["bbox"], "segmentation": a["segmentation"], "area": a["area"]})
            })
            .collect();
        let mut cat_ids: Vec<i64> = anns.iter().map(|a| a["category_id"].as_i64().unwrap()).collect();
        cat_ids.sort();
        cat_ids.dedup();
        let (mut qs, mut ans, mut texts) = (vec![], vec![], vec![]);
        for c in cat_ids {
            let group: Vec<Value> = anns.iter().filter(|a| a["category_id"] == c).cloned().collect();
            qs.push(json!(format!("Where is every {} here?", cats[&c])));
            texts.push(json!(group
                .iter()
                .map(|_| format!("the {} {{seg}}", cats[&c]))
                .collect::<Vec<_>>()
                .join(" and ")));
            ans.push(Value::Array(group));
        }
        qs.push(json!("Segment everything."));
        texts.push(json!(anns
            .iter()
            .map(|a| format!("a {} {{seg}}", a["category_name"].as_str().unwrap()))
            .collect::<Vec<_>>()
            .join(", ")));
        ans.push(Value::Array(anns.clone()));
        out.push(json!({"file_name": img["file_name"], "height": img["height"], "width": img["width"],
                        "ann_list": anns, "questions": qs, "answers": ans, "text_answers": texts}));
    }
    out
}

fn run(records: &[Value], images: &Path, dir: &Path) -> (popen_core::manifest::Manifest, Vec<Sample>) {
    let json_path = dir.join("muse_val.json");
    std::fs::write(&json_path, serde_json::to_string(records).unwrap()).unwrap();
    let cfg = MuseImportConfig { json: json_path, images: images.to_path_buf(), split: "val".into() };
    let out = dir.join("out");
    let r = import(&cfg, &out, ShardSpec::ALL).unwrap();
    assert_eq!(r.shard_path, out.join("val.parquet"));
    assert_eq!(r.manifest_path, out.join("val.manifest.json"));
    let samples = read_shard::<Sample>(&r.shard_path).unwrap();
    (r.manifest, samples)
}

#[test]
fn imports_labelme_photos_with_pycocotools_areas() {
    let coco = coco();
    let records = muse_records(&coco);
    let dir = tempfile::tempdir().unwrap();
    let (m, samples) = run(&records, &labelme(), dir.path());
    let questions: usize = records.iter().map(|r| r["questions"].as_array().unwrap().len()).sum();
    assert_eq!(samples.len(), questions);
    assert!(m.skipped.is_empty(), "{:?}", m.skipped);
    assert_eq!(m.counts["samples"], questions as u64);
    let anns = coco["annotations"].as_array().unwrap();
    assert_eq!(anns.len(), 12);
    let fixture: Value = serde_json::from_str(include_str!("fixtures/labelme_pycocotools.json")).unwrap();
    let mut checked = 0;
    for (s, (r, q)) in samples
        .iter()
        .zip(records.iter().flat_map(|r| (0..r["questions"].as_array().unwrap().len()).map(move |q| (r, q))))
    {
        assert_eq!(s.width, r["width"].as_u64().unwrap() as u32);
        assert_eq!(s.seg_count(), s.target_names.len());
        assert!(!s.answer.contains("{seg}"));
        s.decode_image().unwrap();
        for (k, a) in r["answers"][q].as_array().unwrap().iter().enumerate() {
            let want = &fixture["annotations"][a["id"].to_string()];
            assert_eq!(s.target_masks[k].area(), want["area"].as_u64().unwrap(), "{} target {k}", s.id);
            assert_eq!(s.target_masks[k].to_coco_string(), want["counts"].as_str().unwrap(), "{} target {k}", s.id);
            let inst = s.target_instances[k];
            assert!(inst >= 0, "answer instance matched to ann_list by id");
            assert_eq!(s.instance_masks[inst as usize], s.target_masks[k]);
            checked += 1;
        }
    }
    assert!(checked >= 24);
}

#[test]
fn bad_records_are_skipped_with_reasons() {
    let coco = coco();
    let good = muse_records(&coco);
    let dir = tempfile::tempdir().unwrap();
    // An image folder with the real photos plus a corrupt one.
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("JPEGImages")).unwrap();
    for f in std::fs::read_dir(labelme().join("JPEGImages")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), images.join("JPEGImages").join(f.file_name())).unwrap();
    }
    std::fs::write(images.join("broken.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();

    let mut records = good.clone();
    let base = good[0].clone();
    let mut float_size = base.clone();
    float_size["height"] = json!(base["height"].as_f64().unwrap());
    float_size["width"] = json!(base["width"].as_f64().unwrap());
    records.push(float_size);
    let mut missing_height = base.clone();
    missing_height.as_object_mut().unwrap().remove("height");
    records.push(missing_height);
    let mut seg_mismatch = base.clone();
    seg_mismatch["text_answers"][0] = json!("only words, no placeholder");
    records.push(seg_mismatch);
    let mut no_image = base.clone();
    no_image["file_name"] = json!("JPEGImages/does_not_exist.jpg");
    records.push(no_image);
    let mut corrupt = base.clone();
    corrupt["file_name"] = json!("broken.jpg");
    records.push(corrupt);
    let mut wrong_size = base.clone();
    wrong_size["height"] = json!(100);
    records.push(wrong_size);
    let mut bad_rle = base.clone();
    bad_rle["answers"][0][0]["segmentation"] = json!({"size": [2, 2], "counts": [1, 1]});
    records.push(bad_rle);
    let mut short_counts = base.clone();
    let (h, w) = (base["height"].as_u64().unwrap(), base["width"].as_u64().unwrap());
    short_counts["ann_list"][0]["segmentation"] = json!({"size": [h, w], "counts": [5, 7]});
    records.push(short_counts);

    let (m, samples) = run(&records, &images, dir.path());
    let good_q: usize = good.iter().map(|r| r["questions"].as_array().unwrap().len()).sum();
    // seg_mismatch and bad_rle lose one question each; the others lose the whole record.
    let base_q = base["questions"].as_array().unwrap().len();
    assert_eq!(samples.len(), good_q + base_q + 2 * (base_q - 1));
    let reasons: Vec<String> = m.skipped.iter().map(|s| format!("{}: {}", s.record, s.reason)).collect();
    let has = |needle: &str| reasons.iter().any(|r| r.contains(needle));
    assert!(has("field 'height' is missing"), "{reasons:#?}");
    assert!(has("text_answers[0] has 0 {seg} but answers[0] has"), "{reasons:#?}");
    assert!(has("image not found"), "{reasons:#?}");
    assert!(has("corrupt"), "{reasons:#?}");
    assert!(has("but the record says"), "{reasons:#?}");
    assert!(has("answers[0][0].segmentation: RLE size 2x2 differs"), "{reasons:#?}");
    assert!(has("ann_list[0].segmentation") && has("sum to 12"), "{reasons:#?}");
    assert_eq!(m.skipped.len(), 7, "{reasons:#?}");
}

#[test]
fn unreadable_json_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("muse_bad.json");
    std::fs::write(&p, "[{\"height\": 3,,}]").unwrap();
    let cfg = MuseImportConfig { json: p.clone(), images: dir.path().into(), split: "val".into() };
    let e = import(&cfg, &dir.path().join("out"), ShardSpec::ALL).unwrap_err().to_string();
    assert!(e.contains("muse_bad.json") && e.contains("line 1"), "{e}");
    std::fs::write(&p, "{\"not\": \"a list\"}").unwrap();
    let e = import(&cfg, &dir.path().join("out"), ShardSpec::ALL).unwrap_err().to_string();
    assert!(e.contains("expected a JSON list"), "{e}");
    let cfg = MuseImportConfig { split: "../x".into(), ..cfg };
    let e = import(&cfg, &dir.path().join("out"), ShardSpec::ALL).unwrap_err().to_string();
    assert!(e.contains("split name"), "{e}");
}

/// A `file_name` that is absolute or climbs out with `..` (and a `coco_url` whose last part is
/// `..`) is skipped with the reason in the manifest, like any other bad record, instead of
/// reading an image outside `--images` (`images.join("/abs")` is "/abs"). A plain relative
/// name beside them still imports. Self-contained: a generated 8x6 PNG, no assets needed.
#[test]
fn file_names_outside_the_images_folder_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    let png = image::RgbImage::from_pixel(8, 6, image::Rgb([10, 200, 30]));
    png.save(images.join("sub/in.png")).unwrap();
    // The same photo outside the images folder: the old importer read it.
    let outside = dir.path().join("outside.png");
    png.save(&outside).unwrap();
    let record = |file: Value| {
        let seg = json!([[0.0, 0.0, 4.0, 0.0, 4.0, 3.0, 0.0, 3.0]]);
        let ann = json!({"id": 1, "category_name": "box", "segmentation": seg});
        let mut r = json!({"height": 6, "width": 8, "ann_list": [ann.clone()], "questions": ["Where is the box?"],
                           "answers": [[ann]], "text_answers": ["the box {seg}"]});
        if file.is_string() {
            r["file_name"] = file;
        } else {
            r["coco_url"] = file["coco_url"].clone();
        }
        r
    };
    let records = vec![
        record(json!("sub/in.png")),
        record(json!(outside.to_str().unwrap())),
        record(json!("sub/../../outside.png")),
        record(json!("../outside.png")),
        record(json!({"coco_url": "http://images.example/.."})),
    ];
    let (m, samples) = run(&records, &images, dir.path());
    assert_eq!(samples.len(), 1, "only sub/in.png imports");
    assert!(samples[0].id.starts_with("in-0-"), "{}", samples[0].id);
    let reasons: Vec<String> = m.skipped.iter().map(|s| format!("{}: {}", s.record, s.reason)).collect();
    assert_eq!(reasons.len(), 4, "{reasons:#?}");
    assert!(reasons.iter().all(|r| r.contains("not a relative path inside the images folder")), "{reasons:#?}");
    assert!(reasons[0].contains(outside.to_str().unwrap()), "{reasons:#?}");
}
