//! Sample shards: round trip, atomic writes, and bad files (truncated, foreign, wrong kind,
//! malformed RLE, wrong mask size), each reported with file, row and column.

use popen_core::imageio::encode_png;
use popen_core::mask::{Mask, Rle};
use popen_core::shard::{count_rows, read_shard, write_shard, Record, Sample, ShardWriter};
use std::path::Path;

fn sample(i: usize) -> Sample {
    let (h, w) = (12u32, 16u32);
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 10) as u8, (y * 20) as u8, i as u8]));
    let a = Mask::from_fn(h, w, |y, x| y < 6 && x < 8);
    let b = Mask::from_fn(h, w, |y, x| y >= 4 && x >= 5 + (i as u32 % 3));
    Sample {
        id: format!("s{i}"),
        split: "val".into(),
        image: encode_png(&img).unwrap(),
        width: w,
        height: h,
        instruction: "Which things are red?".into(),
        answer: "The red ball <seg> and the red box <seg> are red.".into(),
        target_names: vec!["ball".into(), "box".into()],
        target_masks: vec![Rle::encode(&a), Rle::encode(&b)],
        target_instances: vec![0, 1],
        instance_names: vec!["ball".into(), "box".into(), "cup".into()],
        instance_masks: vec![Rle::encode(&a), Rle::encode(&b), Rle::encode(&Mask::zeros(h, w))],
        meta: r#"{"k":1}"#.into(),
    }
}

/// Writes records with the plain Parquet writer, bypassing ShardWriter's checks, the way a
/// foreign or buggy tool could.
fn write_unchecked(path: &Path, rows: &[Sample]) {
    let batch = Sample::to_batch(rows).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn roundtrip_many_row_groups() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sub/val.parquet");
    let rows: Vec<Sample> = (0..600).map(sample).collect();
    assert_eq!(write_shard(&p, rows.clone()).unwrap(), 600);
    assert_eq!(count_rows(&p).unwrap(), 600);
    let back = read_shard::<Sample>(&p).unwrap();
    assert_eq!(back, rows);
    assert_eq!(
        back[5].target_masks[1].decode().unwrap(),
        Rle::encode(&Mask::from_fn(12, 16, |y, x| y >= 4 && x >= 7)).decode().unwrap()
    );
    back[0].decode_image().unwrap();
    // Byte-identical output for identical input.
    let q = dir.path().join("again.parquet");
    write_shard(&q, rows).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&q).unwrap());
    // No temp files left behind.
    let leftovers: Vec<_> =
        std::fs::read_dir(dir.path().join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

#[test]
fn unfinished_writer_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.parquet");
    {
        let mut w = ShardWriter::<Sample>::create(&p).unwrap();
        w.write(sample(0)).unwrap();
        // dropped without finish(): a killed or failed job
    }
    assert!(!p.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn writer_refuses_inconsistent_records() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.parquet");
    let mut w = ShardWriter::<Sample>::create(&p).unwrap();
    w.write(sample(0)).unwrap();
    let mut bad = sample(1);
    bad.answer = "Only one <seg> here.".into();
    let e = w.write(bad).unwrap_err().to_string();
    assert!(
        e.contains("x.parquet")
            && e.contains("row 1")
            && e.contains("'answer'")
            && e.contains("1 <seg> tokens but 2 target names"),
        "{e}"
    );
}

#[test]
fn truncated_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.parquet");
    write_shard(&p, (0..10).map(sample)).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = read_shard::<Sample>(&p).unwrap_err().to_string();
    assert!(e.contains("t.parquet") && e.contains("not a readable Parquet file"), "{e}");
    std::fs::write(&p, b"PAR1 garbage").unwrap();
    assert!(read_shard::<Sample>(&p).unwrap_err().to_string().contains("t.parquet"));
    let missing = dir.path().join("missing.parquet");
    assert!(read_shard::<Sample>(&missing).unwrap_err().to_string().contains("missing.parquet"));
}

#[test]
fn corrupt_page_data_names_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.parquet");
    write_shard(&p, (0..10).map(sample)).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    // Scramble the middle of the data pages, keeping the footer intact.
    let n = bytes.len();
    for b in &mut bytes[n / 5..n / 2] {
        *b = b.wrapping_mul(31).wrapping_add(7);
    }
    std::fs::write(&p, &bytes).unwrap();
    let e = read_shard::<Sample>(&p).unwrap_err().to_string();
    assert!(e.contains("c.parquet"), "{e}");
}

#[test]
fn foreign_parquet_names_the_missing_column() {
    use arrow::array::{Int64Array, RecordBatch};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("foreign.parquet");
    let batch = RecordBatch::try_from_iter(vec![("id", Arc::new(Int64Array::from(vec![1, 2])) as _)]).unwrap();
    let f = std::fs::File::create(&p).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let e = read_shard::<Sample>(&p).unwrap_err().to_string();
    assert!(e.contains("foreign.parquet") && e.contains("column 'id'") && e.contains("Int64"), "{e}");
}

#[test]
fn bad_rle_and_wrong_mask_size_name_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.parquet");
    let mut rows: Vec<Sample> = (0..4).map(sample).collect();
    // RLE counts that do not sum to h*w, in row 2.
    rows[2].instance_masks[2] = Rle { height: 12, width: 16, counts: vec![100, 3] };
    write_unchecked(&p, &rows);
    let e = read_shard::<Sample>(&p).unwrap_err().to_string();
    assert!(
        e.contains("bad.parquet, row 2, column 'instance_masks'") && e.contains("mask 2") && e.contains("sum to 103"),
        "{e}"
    );

    // A mask of another size than the image, in row 3.
    let mut rows: Vec<Sample> = (0..4).map(sample).collect();
    rows[3].target_masks[0] = Rle::encode(&Mask::zeros(6, 16));
    write_unchecked(&p, &rows);
    let e = read_shard::<Sample>(&p).unwrap_err().to_string();
    assert!(e.contains("row 3, column 'target_masks'") && e.contains("6x16") && e.contains("s3"), "{e}");
}

#[test]
fn corrupt_image_bytes_name_the_record() {
    let mut s = sample(0);
    s.image = b"\x89PNG\r\n\x1a\n truncated".to_vec();
    let e = s.decode_image().unwrap_err().to_string();
    assert!(e.contains("sample 's0'") && e.contains("corrupt"), "{e}");
    let mut s = sample(1);
    s.width = 17;
    let e = s.decode_image().unwrap_err().to_string();
    assert!(e.contains("record says 17x12"), "{e}");
}

#[test]
fn null_in_a_later_row_group_names_the_file_row() {
    use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nulls.parquet");
    let rows: Vec<Sample> = (0..300).map(sample).collect();
    let batch = Sample::to_batch(&rows).unwrap();
    // What pyarrow writes for a missing value: a nullable column with a null at row 290.
    let instr: ArrayRef =
        Arc::new(StringArray::from((0..300).map(|i| if i == 290 { None } else { Some("q") }).collect::<Vec<_>>()));
    let fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| if f.name() == "instruction" { f.as_ref().clone().with_nullable(true) } else { f.as_ref().clone() })
        .collect();
    let cols: Vec<ArrayRef> = batch
        .schema()
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| if f.name() == "instruction" { instr.clone() } else { batch.column(i).clone() })
        .collect();
    assert_eq!(instr.null_count(), 1);
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
    let f = std::fs::File::create(&p).unwrap();
    let props = parquet::file::properties::WriterProperties::builder().set_max_row_group_row_count(Some(256)).build();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let e = read_shard::<Sample>(&p).unwrap_err().to_string();
    assert!(e.contains("nulls.parquet, row 290, column 'instruction'") && e.contains("null"), "{e}");
}

fn prediction(i: usize) -> popen_core::shard::Prediction {
    let (h, w) = (12u32, 16u32);
    popen_core::shard::Prediction {
        id: format!("s{i}"),
        split: "val".into(),
        width: w,
        height: h,
        answer: "The red ball <seg> and the cup <seg>.".into(),
        masks: vec![Rle::encode(&Mask::from_fn(h, w, |y, _| y < 3)), Rle::encode(&Mask::zeros(h, w))],
        mask_scores: vec![0.9, 0.25],
        token_ids: vec![5, 17, 3 + i as i32],
        token_logprobs: vec![-0.1, -2.5, 0.0],
        meta: r#"{"model":"tiny"}"#.into(),
    }
}

#[test]
fn prediction_roundtrip_and_checks() {
    use popen_core::shard::Prediction;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pred.parquet");
    let rows: Vec<Prediction> = (0..300).map(prediction).collect();
    write_shard(&p, rows.clone()).unwrap();
    assert_eq!(read_shard::<Prediction>(&p).unwrap(), rows);
    // A samples shard is not a predictions shard.
    let s = dir.path().join("samples.parquet");
    write_shard(&s, vec![sample(0)]).unwrap();
    assert!(read_shard::<Prediction>(&s).is_err());
    // Inconsistent records are refused, naming the field.
    let mut bad = prediction(1);
    bad.masks.pop();
    let e = write_shard(dir.path().join("bad.parquet"), vec![bad]).unwrap_err().to_string();
    assert!(e.contains("masks") && e.contains("1 masks for 2"), "{e}");
    let mut bad = prediction(2);
    bad.token_logprobs[0] = f32::NAN;
    let e = write_shard(dir.path().join("bad2.parquet"), vec![bad]).unwrap_err().to_string();
    assert!(e.contains("token_logprobs"), "{e}");
    let mut bad = prediction(3);
    bad.masks[0] = Rle::encode(&Mask::zeros(4, 4));
    let e = write_shard(dir.path().join("bad3.parquet"), vec![bad]).unwrap_err().to_string();
    assert!(e.contains("mask 0 is 4x4"), "{e}");
}

fn text_pref(i: usize) -> popen_core::shard::TextPref {
    popen_core::shard::TextPref {
        id: format!("s{i}"),
        split: "train".into(),
        image: vec![137, 80, 78, 71, i as u8],
        width: 16,
        height: 12,
        instruction: "Segment the cup.".into(),
        y: "The red box <seg>.".into(),
        y_c: "The red cup <seg>.".into(),
        y_ids: vec![4, 9, 11, 30, 2],
        y_c_ids: vec![4, 9, 12, 30, 2],
        l_y: vec![0, 1, 2],
        l_yc: vec![0, 1, 2],
        ref_logp_y: vec![-0.5, -1.0, -3.0, -0.01, 0.0],
        ref_logp_yc: vec![-0.5, -1.0, -0.2, -0.01, 0.0],
        branch: "model".into(),
        meta: r#"{"corrector":"offline"}"#.into(),
    }
}

#[test]
fn text_pref_roundtrip_and_checks() {
    use popen_core::shard::TextPref;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pt.parquet");
    let rows: Vec<TextPref> = (0..300).map(text_pref).collect();
    write_shard(&p, rows.clone()).unwrap();
    assert_eq!(read_shard::<TextPref>(&p).unwrap(), rows);
    let s = dir.path().join("samples.parquet");
    write_shard(&s, vec![sample(0)]).unwrap();
    assert!(read_shard::<TextPref>(&s).is_err(), "a samples shard is not a text-pref shard");
    let cases: Vec<(Box<dyn Fn(&mut TextPref)>, &str)> = vec![
        (Box::new(|r| r.ref_logp_y.pop().map(|_| ()).unwrap_or(())), "ref_logp_y"),
        (Box::new(|r| r.ref_logp_yc[1] = f32::NAN), "ref_logp_yc"),
        (Box::new(|r| r.l_y = vec![2, 1]), "l_y"),
        (Box::new(|r| r.l_yc = vec![7]), "l_yc"),
        (Box::new(|r| r.branch = "other".into()), "branch"),
        (Box::new(|r| r.y_c_ids.clear()), "y_c_ids"),
    ];
    for (k, (edit, field)) in cases.into_iter().enumerate() {
        let mut bad = text_pref(k);
        edit(&mut bad);
        let e = write_shard(dir.path().join(format!("bad{k}.parquet")), vec![bad]).unwrap_err().to_string();
        assert!(e.contains(field), "case {k}: {e}");
    }
}

fn seg_pref(i: usize) -> popen_core::shard::SegPref {
    let (h, w) = (12u32, 16u32);
    let m = |k: u32| Rle::encode(&Mask::from_fn(h, w, move |y, x| y < 3 + k && x > k));
    popen_core::shard::SegPref {
        id: format!("s{i}"),
        split: "train".into(),
        image: vec![137, 80, 78, 71, i as u8],
        width: w,
        height: h,
        instruction: "Segment the cups.".into(),
        answer: "the red cup <seg> and the blue cup <seg>".into(),
        phase: 1 + (i % 2) as u32,
        draw: (i % 3) as u32,
        noise_seed: vec![u64::MAX - i as u64, 7, 8],
        noise_rect: vec![0, 0, 4, 4, 2, 3, 10, 5, 15, 11, 1, 1],
        noise_sigma: vec![0.5; 3],
        target_masks: vec![m(0), m(1)],
        f_dim: 4,
        ref_f: (0..24).map(|v| v as f32 * 0.5 - i as f32).collect(),
        ref_masks: (0..6).map(m).collect(),
        s: vec![0.9, 0.2, -0.3],
        b: vec![0.7, 0.5, 0.1],
        s_terms: vec![0.9, 0.9, 0.3, 0.1, -0.2, -0.4],
        b_terms: vec![0.7, 0.7, 0.5, 0.5, 0.1, 0.1],
        rankings: vec![0, 1, 2, 0, 1, 2],
        meta: "{}".into(),
    }
}

#[test]
fn seg_pref_roundtrip_and_checks() {
    use popen_core::shard::SegPref;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ps.parquet");
    let rows: Vec<SegPref> = (0..300).map(seg_pref).collect();
    write_shard(&p, rows.clone()).unwrap();
    let back = read_shard::<SegPref>(&p).unwrap();
    assert_eq!(back, rows);
    // f(k = 1, n = 1) starts at (1 * 2 + 1) * 4 = 12: values 12..16 times 0.5.
    assert_eq!(back[0].f(1, 1), &[6.0, 6.5, 7.0, 7.5]);
    assert_eq!(back[0].ranking(1), &[0, 1, 2]);
    let cases: Vec<(Box<dyn Fn(&mut SegPref)>, &str)> = vec![
        (
            Box::new(|r| {
                r.ref_f.pop();
            }),
            "ref_f",
        ),
        (Box::new(|r| r.rankings = vec![0, 1, 1, 0, 1, 2]), "rankings"),
        (Box::new(|r| r.noise_rect[2] = 17), "noise_rect"),
        (Box::new(|r| r.phase = 3), "phase"),
        (Box::new(|r| r.s[0] = f32::NAN), "'s'"),
        (Box::new(|r| r.ref_masks[4] = Rle::encode(&Mask::zeros(4, 4))), "ref_masks"),
        (Box::new(|r| r.target_masks.clear()), "target_masks"),
    ];
    for (k, (edit, field)) in cases.into_iter().enumerate() {
        let mut bad = seg_pref(k);
        edit(&mut bad);
        let e = write_shard(dir.path().join(format!("bad{k}.parquet")), vec![bad]).unwrap_err().to_string();
        assert!(e.contains(field), "case {k}: {e}");
    }
}

#[test]
fn proposal_roundtrip_checks_and_lookup() {
    use popen_core::shard::{read_proposals, ProposalSet};
    let dir = tempfile::tempdir().unwrap();
    let set = |id: &str| ProposalSet {
        id: id.into(),
        width: 16,
        height: 12,
        masks: vec![Rle::encode(&Mask::from_fn(12, 16, |y, _| y < 4)), Rle::encode(&Mask::zeros(12, 16))],
        scores: vec![0.95, 0.9],
        meta: r#"{"tool":"test"}"#.into(),
    };
    let a = dir.path().join("a.parquet");
    let b = dir.path().join("b.parquet");
    write_shard(&a, vec![set("s0"), set("s1")]).unwrap();
    write_shard(&b, vec![set("s2")]).unwrap();
    let all = read_proposals(&[&a, &b]).unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all["s1"], set("s1"));
    // The same sample in two files is an error naming the sample and both files.
    let e = read_proposals(&[&a, &a]).unwrap_err().to_string();
    assert!(e.contains("'s0'") && e.contains("a.parquet"), "{e}");
    let mut bad = set("x");
    bad.scores.pop();
    let e = write_shard(dir.path().join("bad.parquet"), vec![bad]).unwrap_err().to_string();
    assert!(e.contains("scores"), "{e}");
    let mut bad = set("y");
    bad.masks[1] = Rle::encode(&Mask::zeros(3, 3));
    assert!(write_shard(dir.path().join("bad2.parquet"), vec![bad]).is_err());
}

/// Issue 20 (items 1 and 6): parts of another definition are discarded, never mixed in nor
/// blocking the rerun; a run that fails before its first part leaves no `<out>.parts`.
#[test]
fn resumable_writer_discards_foreign_parts_and_cleans_up_failures() {
    use popen_core::shard::{parts_dir, ResumableWriter};
    let dir = tempfile::tempdir().unwrap();
    let id = |s: &Sample| s.id.clone();
    let out = dir.path().join("out.parquet");
    // A killed run of cfg-a with one committed part.
    let mut w = ResumableWriter::open(&out, "cfg-a", 2, false, id).unwrap();
    for i in 0..3 {
        w.write(sample(i)).unwrap();
    }
    drop(w);
    assert!(parts_dir(&out).join("part-00000.parquet").exists());
    // cfg-b starts over: none of cfg-a's records count as done.
    let mut w = ResumableWriter::<Sample>::open(&out, "cfg-b", 2, false, id).unwrap();
    assert_eq!(w.resumed(), 0);
    assert!(!w.is_done(&sample(0).id));
    w.write(sample(4)).unwrap();
    assert_eq!(w.finish().unwrap(), 1);
    let ids: Vec<String> = read_shard::<Sample>(&out).unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![sample(4).id]);
    // A run that fails before committing anything (e.g. every request refused) leaves nothing.
    let failed = dir.path().join("failed.parquet");
    let w = ResumableWriter::<Sample>::open(&failed, "cfg-a", 2, false, id).unwrap();
    assert!(parts_dir(&failed).join("fingerprint").exists());
    drop(w);
    assert!(!parts_dir(&failed).exists(), "a failed run without parts must not leave {}", parts_dir(&failed).display());
    // ... and the corrected rerun (another fingerprint) simply starts.
    let w = ResumableWriter::<Sample>::open(&failed, "cfg-fixed", 2, false, id).unwrap();
    assert_eq!(w.finish().unwrap(), 0);
}

#[test]
fn resumable_writer_resumes_after_a_kill_with_the_same_output() {
    use popen_core::shard::{parts_dir, ResumableWriter};
    let dir = tempfile::tempdir().unwrap();
    let id = |s: &Sample| s.id.clone();
    // Reference: one uninterrupted run.
    let full = dir.path().join("full.parquet");
    let mut w = ResumableWriter::open(&full, "cfg-a", 2, false, id).unwrap();
    for i in 0..5 {
        w.write(sample(i)).unwrap();
    }
    assert_eq!(w.finish().unwrap(), 5);
    assert!(!parts_dir(&full).exists(), "parts are removed once the output is complete");

    // A run killed after 3 records: one part of 2 committed, the third record lost.
    let out = dir.path().join("out.parquet");
    let mut w = ResumableWriter::open(&out, "cfg-a", 2, false, id).unwrap();
    for i in 0..3 {
        w.write(sample(i)).unwrap();
    }
    drop(w);
    assert!(!out.exists());
    // The rerun skips the committed records and finishes with the same file.
    let mut w = ResumableWriter::open(&out, "cfg-a", 2, false, id).unwrap();
    assert_eq!(w.resumed(), 2);
    let mut redone = 0;
    for i in 0..5 {
        let s = sample(i);
        if w.is_done(&s.id) {
            continue;
        }
        redone += 1;
        w.write(s).unwrap();
    }
    assert_eq!(redone, 3);
    // Issue 20 item 7: what the manifest counts covers the resumed records too (finish_visit
    // shows every record of the output, not only this run's 3).
    let mut seen = Vec::new();
    assert_eq!(w.finish_visit(|r| seen.push(r.id.clone())).unwrap(), 5);
    assert_eq!(seen, (0..5).map(|i| sample(i).id).collect::<Vec<_>>());
    let a: Vec<String> = read_shard::<Sample>(&full).unwrap().into_iter().map(|s| s.id).collect();
    let b: Vec<String> = read_shard::<Sample>(&out).unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(a, b);
    // `fresh` discards old parts.
    let mut w = ResumableWriter::open(&out, "cfg-b", 2, false, id);
    assert!(w.is_ok(), "no parts left after finish");
    w.as_mut().unwrap().write(sample(0)).unwrap();
    drop(w);
    let w = ResumableWriter::<Sample>::open(&out, "cfg-c", 2, true, id).unwrap();
    assert_eq!(w.resumed(), 0);
}

/// Issue 20: a run that failed after skipping samples 0 and 2 (committed: 1, 3, 4) and the
/// rerun that computes them: `finish_ordered` merges the two runs back into input order
/// (0..5, the uninterrupted run's file); plain `finish` would concatenate 1, 3, 4, 0, 2.
/// A record whose id is not in the input is an error.
#[test]
fn resumable_writer_merges_runs_into_input_order() {
    use popen_core::shard::ResumableWriter;
    let dir = tempfile::tempdir().unwrap();
    let id = |s: &Sample| s.id.clone();
    let pos = |s: &Sample| (0..5).position(|i| sample(i).id == s.id);
    let out = dir.path().join("out.parquet");
    let mut w = ResumableWriter::open(&out, "cfg", 2, false, id).unwrap();
    for i in [1, 3, 4] {
        w.write(sample(i)).unwrap();
    }
    w.commit().unwrap();
    drop(w);
    let mut w = ResumableWriter::open(&out, "cfg", 2, false, id).unwrap();
    assert_eq!(w.resumed(), 3);
    for i in [0, 2] {
        assert!(!w.is_done(&sample(i).id));
        w.write(sample(i)).unwrap();
    }
    assert_eq!(w.finish_ordered(pos).unwrap(), 5);
    let got: Vec<String> = read_shard::<Sample>(&out).unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(got, (0..5).map(|i| sample(i).id).collect::<Vec<_>>());
    // One run: the same as `finish`.
    let one = dir.path().join("one.parquet");
    let mut w = ResumableWriter::open(&one, "cfg", 2, false, id).unwrap();
    for i in 0..5 {
        w.write(sample(i)).unwrap();
    }
    assert_eq!(w.finish_ordered(pos).unwrap(), 5);
    assert_eq!(std::fs::read(&one).unwrap(), std::fs::read(&out).unwrap());
    // An id outside the input.
    let bad = dir.path().join("bad.parquet");
    let mut w = ResumableWriter::open(&bad, "cfg", 2, false, id).unwrap();
    w.write(sample(7)).unwrap();
    w.commit().unwrap();
    drop(w);
    let mut w = ResumableWriter::open(&bad, "cfg", 2, false, id).unwrap();
    w.write(sample(0)).unwrap();
    let e = w.finish_ordered(pos).unwrap_err().to_string();
    assert!(e.contains("not a record of this input"), "{e}");
}

#[test]
fn slurm_job_array_supplies_the_shard() {
    use popen_core::shardspec::ShardSpec;
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    };
    assert_eq!(ShardSpec::from_slurm(env(&[])).unwrap(), None);
    // sbatch --array=0-3: task 2 of 4.
    let s = ShardSpec::from_slurm(env(&[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_COUNT", "4")])).unwrap();
    assert_eq!(s, Some(ShardSpec::new(2, 4).unwrap()));
    // sbatch --array=1-4: ids start at 1.
    let s = ShardSpec::from_slurm(env(&[
        ("SLURM_ARRAY_TASK_ID", "4"),
        ("SLURM_ARRAY_TASK_MIN", "1"),
        ("SLURM_ARRAY_TASK_COUNT", "4"),
    ]))
    .unwrap();
    assert_eq!(s, Some(ShardSpec::new(3, 4).unwrap()));
    let e = ShardSpec::from_slurm(env(&[("SLURM_ARRAY_TASK_ID", "1")])).unwrap_err();
    assert!(e.to_string().contains("SLURM_ARRAY_TASK_COUNT"), "{e}");
    let e = ShardSpec::from_slurm(env(&[("SLURM_ARRAY_TASK_ID", "x"), ("SLURM_ARRAY_TASK_COUNT", "2")])).unwrap_err();
    assert!(e.to_string().contains("not a number"), "{e}");
    assert!(ShardSpec::from_slurm(env(&[("SLURM_ARRAY_TASK_ID", "5"), ("SLURM_ARRAY_TASK_COUNT", "4")])).is_err());
}

/// Writes what task `shard` of a stage writes: the predictions of the positions it takes
/// (skipping `skip`), and a manifest listing the skipped ones.
fn write_task(out: &Path, shard: popen_core::shardspec::ShardSpec, n: usize, skip: &[usize]) -> std::path::PathBuf {
    use popen_core::manifest::{manifest_beside, Manifest};
    let path = shard.output_path(out);
    let mut m = Manifest::new("predict", &serde_json::json!({"k": 1})).unwrap();
    if !shard.is_all() {
        m.shard = Some(shard.to_string());
    }
    let mut rows = Vec::new();
    for p in (0..n).filter(|&p| shard.takes(p)) {
        if skip.contains(&p) {
            m.skip(format!("s{p}"), "no answer");
        } else {
            rows.push(prediction(p));
        }
    }
    let k = write_shard(&path, rows).unwrap();
    m.add_output(&path, Some(k as u64)).unwrap();
    m.count("predictions", k as u64);
    m.write(manifest_beside(&path)).unwrap();
    path
}

#[test]
fn merged_shards_equal_the_single_process_file_byte_for_byte() {
    use popen_core::manifest::{manifest_beside, Manifest};
    use popen_core::shard::merge::{merge_stage, stage_complete};
    use popen_core::shardspec::ShardSpec;
    let dir = tempfile::tempdir().unwrap();
    // 600 records: several row groups; a few skipped (gaps in some shards, shard 3 of 7 gets
    // none at the end).
    let n = 600;
    let skip = [0usize, 5, 6, 7, 299, 599];
    let order: Vec<String> = (0..n).map(|p| format!("s{p}")).collect();
    let single = write_task(&dir.path().join("single/pred.parquet"), ShardSpec::ALL, n, &skip);
    for count in [1u32, 4, 7] {
        let out = dir.path().join(format!("n{count}/pred.parquet"));
        for i in 0..count {
            write_task(&out, ShardSpec::new(i, count).unwrap(), n, &skip);
        }
        if count == 1 {
            // One task of one: its output is the stage output itself; nothing to merge into.
            continue;
        }
        let r = merge_stage(&out, count, &order).unwrap();
        assert_eq!(r.rows, n - skip.len());
        assert_eq!(r.kind, "prediction/1");
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&single).unwrap(), "{count} shards");
        assert!(stage_complete(&out));
        let m = Manifest::read(manifest_beside(&out)).unwrap();
        let s = Manifest::read(manifest_beside(&single)).unwrap();
        assert_eq!((m.counts.clone(), m.skipped.clone(), m.config_hash.clone()), (s.counts, s.skipped, s.config_hash));
        assert_eq!(m.shard, None);
        assert_eq!(m.merged_from.len(), count as usize);
        assert!(m.outputs_intact());
        // Issue 20 item 1: a task shard recomputed after the merge makes the merge stale
        // (`popen merge` and the cluster's resubmit merge again instead of saying complete).
        let first = ShardSpec::new(0, count).unwrap();
        write_task(&out, first, n, &[]);
        assert!(!stage_complete(&out), "{count} shards: a recomputed shard must invalidate the merged file");
        write_task(&out, first, n, &skip);
        assert!(stage_complete(&out));
    }
}

#[test]
fn merge_names_missing_stale_and_foreign_shards() {
    use popen_core::manifest::{manifest_beside, Manifest};
    use popen_core::shard::merge::merge_stage;
    use popen_core::shardspec::ShardSpec;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pred.parquet");
    let n = 20;
    let order: Vec<String> = (0..n).map(|p| format!("s{p}")).collect();
    let paths: Vec<_> = (0..4).map(|i| write_task(&out, ShardSpec::new(i, 4).unwrap(), n, &[])).collect();

    // Missing output (and a missing manifest): each named with its task index and file.
    std::fs::rename(&paths[2], dir.path().join("away.parquet")).unwrap();
    std::fs::remove_file(manifest_beside(&paths[3])).unwrap();
    let e = merge_stage(&out, 4, &order).unwrap_err().to_string();
    assert!(
        e.contains("shard 2/4 (array task 2): output") && e.contains("pred-00002-of-00004.parquet is missing"),
        "{e}"
    );
    assert!(
        e.contains("shard 3/4 (array task 3): manifest") && e.contains("pred-00003-of-00004.manifest.json is missing"),
        "{e}"
    );
    assert!(!out.exists(), "nothing is written when a shard is missing");
    std::fs::rename(dir.path().join("away.parquet"), &paths[2]).unwrap();
    write_task(&out, ShardSpec::new(3, 4).unwrap(), n, &[]);

    // A manifest that describes another file.
    write_shard(&paths[1], vec![prediction(1)]).unwrap();
    let e = merge_stage(&out, 4, &order).unwrap_err().to_string();
    assert!(e.contains("shard 1/4") && e.contains("sha256 differs"), "{e}");
    write_task(&out, ShardSpec::new(1, 4).unwrap(), n, &[]);

    // Tasks of different jobs (another config).
    let mpath = manifest_beside(&paths[2]);
    let mut m = Manifest::read(&mpath).unwrap();
    m.config_hash = "other".into();
    m.write(&mpath).unwrap();
    let e = merge_stage(&out, 4, &order).unwrap_err().to_string();
    assert!(e.contains("shard 2/4") && e.contains("config hash") && !e.contains("shard 1/4"), "{e}");
    write_task(&out, ShardSpec::new(2, 4).unwrap(), n, &[]);

    // Shards of another input order: the record that does not fit is named.
    let mut wrong = order.clone();
    wrong.swap(0, 4);
    let e = merge_stage(&out, 4, &wrong).unwrap_err().to_string();
    assert!(e.contains("pred-00000-of-00004.parquet, row 1, column 'id'") && e.contains("record 's4'"), "{e}");

    // Fixed: merges.
    assert_eq!(merge_stage(&out, 4, &order).unwrap().rows, n);
}

/// Issue 20 item 4: `popen merge --shards 0` panicked (index 0 of no shards, merge.rs:164);
/// now a clear error, as `--shard I/0` already was.
#[test]
fn merge_of_zero_shards_is_an_error_not_a_panic() {
    use popen_core::shard::merge::{check_shards, merge_stage, shard_outputs};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pred.parquet");
    let e = merge_stage(&out, 0, &["s0".to_string()]).unwrap_err().to_string();
    assert!(e.contains("0 shards to merge") && e.contains("pred.parquet"), "{e}");
    assert!(check_shards(&out, 0).is_err() && shard_outputs(&out, 0).is_err());
    assert!(!out.exists());
    // The spec parser refuses the other nonsensical counts.
    for bad in ["0/0", "4/4", "5/4", "-1/4", "1/-4", "1", ""] {
        assert!(bad.parse::<popen_core::shardspec::ShardSpec>().is_err(), "{bad}");
    }
}

#[test]
fn max_samples_spreads_over_the_file_and_shards_split_it() {
    use popen_core::shard::{for_each_taken_of, limited_positions};
    use popen_core::shardspec::ShardSpec;
    // Hand-computed: floor(k * 10 / 4) for k = 0..4.
    assert_eq!(limited_positions(10, 4).unwrap().into_iter().collect::<Vec<_>>(), vec![0, 2, 5, 7]);
    assert!(
        limited_positions(10, 0).is_none() && limited_positions(10, 10).is_none() && limited_positions(3, 7).is_none()
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.parquet");
    write_shard(&p, (0..10).map(sample).collect::<Vec<_>>()).unwrap();
    let ids = |spec: ShardSpec, max: usize| {
        let mut v = Vec::new();
        let n = for_each_taken_of::<Sample, popen_core::error::CoreError>(&p, &spec, max, None, |s| {
            v.push(s.id);
            Ok(())
        })
        .unwrap();
        assert_eq!(n, v.len());
        v
    };
    let want: Vec<String> = [0, 2, 5, 7].iter().map(|&i| sample(i).id).collect();
    assert_eq!(ids(ShardSpec::ALL, 4), want);
    // The two tasks of --shard N=2 split the kept records, together exactly once.
    assert_eq!(ids(ShardSpec::new(0, 2).unwrap(), 4), vec![want[0].clone(), want[2].clone()]);
    assert_eq!(ids(ShardSpec::new(1, 2).unwrap(), 4), vec![want[1].clone(), want[3].clone()]);
    assert_eq!(ids(ShardSpec::ALL, 0).len(), 10);
}
