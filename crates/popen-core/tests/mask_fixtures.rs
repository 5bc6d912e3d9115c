//! Checks popen-core's mask maths against reference outputs.
//!
//! The fixtures in `tests/fixtures/masks/` are written by
//! `tools/reference/make_mask_fixtures.py` (fixed seed) from:
//! - `rle.json`: pycocotools 2.0.11 (`encode`, `area`, `toBbox`, `iou`, `merge`,
//!   `frPyObjects` of uncompressed RLEs) for the RLE strings, areas, boxes, IoUs and merges;
//!   numpy for the run counts and the raw intersection/union pixel counts;
//! - `polygons.json`: pycocotools `frPyObjects` (+ `merge`, as COCO `annToRLE`) for polygons
//!   and `frPyObjects(np.array([bbox]))` for boxes; the error cases are the lists on which
//!   pycocotools raises (its exception text is recorded);
//! - `boundary.json`: boundary-iou-api `mask_to_boundary` / `boundary_iou` (transcribed in
//!   the script; OpenCV `copyMakeBorder` + `erode`).
//!
//! Masks are stored as packed bits of the row-major array, independent of any RLE.
//! Everything is compared exactly, except floating-point ratios, which must agree to 1e-12
//! (they are computed by the same division, so in practice they are equal).

use popen_core::mask::{
    boundary_dilation, boundary_intersection_union, boundary_iou, intersection_union, iou, mask_to_boundary,
    rle_from_bbox, rle_from_coco_polygons, rle_from_points, rle_from_polygon, Mask, Rle,
};
use serde_json::Value;

const RLE_JSON: &str = include_str!("fixtures/masks/rle.json");
const POLYGONS_JSON: &str = include_str!("fixtures/masks/polygons.json");
const BOUNDARY_JSON: &str = include_str!("fixtures/masks/boundary.json");

fn load(text: &str) -> Value {
    serde_json::from_str(text).expect("fixture JSON parses")
}

fn b64(s: &str) -> Vec<u8> {
    fn val(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("bad base64 character {c}"),
        }
    }
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c) << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// A mask from base64 of `np.packbits` (MSB first) of the row-major array.
fn unpack(h: u32, w: u32, bits: &str) -> Mask {
    let packed = b64(bits);
    let n = h as usize * w as usize;
    let data = (0..n).map(|i| (packed[i / 8] >> (7 - i % 8)) & 1).collect();
    Mask::from_row_major(h, w, data).unwrap()
}

fn u32v(v: &Value) -> u32 {
    v.as_u64().unwrap() as u32
}
fn hw(v: &Value) -> (u32, u32) {
    (u32v(&v["h"]), u32v(&v["w"]))
}
fn str_of(v: &Value) -> &str {
    v.as_str().unwrap()
}
fn counts(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(u32v).collect()
}
fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}
/// Floats stored as Python `repr` strings, parsed with Rust's correctly rounded parser.
fn repr_f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| str_of(x).parse::<f64>().unwrap()).collect()
}
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12
}

/// Reference: pycocotools encode/area/toBbox; numpy run counts.
#[test]
fn rle_of_masks_matches_pycocotools() {
    let fx = load(RLE_JSON);
    let masks = fx["masks"].as_array().unwrap();
    assert!(masks.len() > 30);
    for m in masks {
        let name = str_of(&m["name"]);
        let (h, w) = hw(m);
        let mask = unpack(h, w, str_of(&m["bits"]));
        let rle = Rle::encode(&mask);
        assert_eq!(rle.counts, counts(&m["counts"]), "{name}: counts");
        assert_eq!(rle.to_coco_string(), str_of(&m["rle"]), "{name}: string");
        let parsed = Rle::from_coco_string(h, w, str_of(&m["rle"])).unwrap();
        assert_eq!(parsed, rle, "{name}: parsed string");
        assert_eq!(parsed.decode().unwrap(), mask, "{name}: decode");
        let area = m["area"].as_u64().unwrap();
        assert_eq!(rle.area(), area, "{name}: rle area");
        assert_eq!(mask.area(), area, "{name}: mask area");
        assert_eq!(rle.to_bbox().unwrap().to_vec(), f64s(&m["bbox"]), "{name}: bbox");
    }
}

/// Reference: pycocotools `iou(rles, rles, [0]*n)` and `merge(..., intersect=False/True)`;
/// numpy `(a & b).sum()`, `(a | b).sum()` for the raw counts.
#[test]
fn iou_and_merge_match_pycocotools() {
    let fx = load(RLE_JSON);
    let masks: Vec<Mask> = fx["masks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let (h, w) = hw(m);
            unpack(h, w, str_of(&m["bits"]))
        })
        .collect();
    let groups = fx["groups"].as_array().unwrap();
    assert!(groups.len() >= 4);
    let mut both_empty_pairs = 0;
    for g in groups {
        let members: Vec<usize> =
            g["members"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let rles: Vec<Rle> = members.iter().map(|&i| Rle::encode(&masks[i])).collect();
        let matrix = Rle::iou_matrix(&rles, &rles).unwrap();
        let n = members.len();
        for (a, &ia) in members.iter().enumerate() {
            let ref_iou = f64s(&g["iou"][a]);
            for (b, &ib) in members.iter().enumerate() {
                let inter = g["inter"][a][b].as_u64().unwrap();
                let union = g["union"][a][b].as_u64().unwrap();
                assert_eq!(intersection_union(&masks[ia], &masks[ib]).unwrap(), (inter, union));
                assert_eq!(rles[a].intersection_union(&rles[b]).unwrap(), (inter, union));
                let ours = rles[a].iou(&rles[b]).unwrap();
                assert_eq!(ours, matrix[a * n + b]);
                assert_eq!(ours, iou(&masks[ia], &masks[ib]).unwrap());
                if union == 0 {
                    // Our convention: two empty masks match perfectly; pycocotools says 0.
                    assert_eq!(ref_iou[b], 0.0);
                    assert_eq!(ours, 1.0);
                    both_empty_pairs += 1;
                } else {
                    assert!(close(ours, ref_iou[b]), "iou {ia} vs {ib}: {ours} vs {}", ref_iou[b]);
                }
            }
        }
        for mg in g["merges"].as_array().unwrap() {
            let sub: Vec<Rle> = mg["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| Rle::encode(&masks[v.as_u64().unwrap() as usize]))
                .collect();
            assert_eq!(Rle::merge(&sub).unwrap().to_coco_string(), str_of(&mg["union"]));
            assert_eq!(Rle::merge_intersect(&sub).unwrap().to_coco_string(), str_of(&mg["intersection"]));
        }
    }
    assert!(both_empty_pairs > 0, "the fixtures should exercise the empty-pair convention");
}

/// Reference: pycocotools on hand-made RLEs with zero-length runs (`frPyObjects` of
/// uncompressed counts, then `decode`, `area`, `toBbox`, `merge`, `iou`).
#[test]
fn non_canonical_rles_match_pycocotools() {
    let fx = load(RLE_JSON);
    for o in fx["odd_rles"].as_array().unwrap() {
        let (h, w) = hw(o);
        let c = counts(&o["counts"]);
        let rle = Rle::new(h, w, c.clone()).unwrap();
        let s = str_of(&o["rle"]);
        assert_eq!(rle.to_coco_string(), s, "{c:?}");
        assert_eq!(Rle::from_coco_string(h, w, s).unwrap().counts, c);
        assert_eq!(rle.decode().unwrap(), unpack(h, w, str_of(&o["decoded_bits"])), "{c:?}");
        assert_eq!(rle.area(), o["area"].as_u64().unwrap());
        let bbox = f64s(&o["bbox"]);
        let ours = rle.to_bbox().unwrap().to_vec();
        if bbox[2] > u32::MAX as f64 / 2.0 {
            // pycocotools wraps around when every foreground run is empty; we return the
            // box of an empty mask (documented on Rle::to_bbox).
            assert_eq!(rle.area(), 0);
            assert_eq!(ours, vec![0.0; 4], "{c:?}");
        } else {
            assert_eq!(ours, bbox, "{c:?}");
        }
        let half = Rle::encode(&unpack(h, w, str_of(&o["half_bits"])));
        let full = Rle::encode(&Mask::from_fn(h, w, |_, _| true));
        assert_eq!(
            Rle::merge(&[rle.clone(), half.clone()]).unwrap().to_coco_string(),
            str_of(&o["merge_with_half"]),
            "{c:?}"
        );
        assert_eq!(
            Rle::merge_intersect(&[rle.clone(), half.clone()]).unwrap().to_coco_string(),
            str_of(&o["intersect_with_half"]),
            "{c:?}"
        );
        assert_eq!(Rle::merge(&[rle.clone(), full]).unwrap().to_coco_string(), str_of(&o["merge_with_full"]));
        assert!(close(rle.iou(&half).unwrap(), o["iou_with_half"].as_f64().unwrap()), "{c:?}");
    }
}

/// Reference: pycocotools `merge(frPyObjects(polygons, h, w))` and the per-polygon
/// `frPyObjects` strings.
#[test]
fn polygons_match_pycocotools() {
    let fx = load(POLYGONS_JSON);
    let cases = fx["polygons"].as_array().unwrap();
    assert!(cases.len() > 50);
    for c in cases {
        let name = str_of(&c["name"]);
        let (h, w) = hw(c);
        let polys: Vec<Vec<f64>> = c["polygons"].as_array().unwrap().iter().map(repr_f64s).collect();
        let merged = rle_from_coco_polygons(&polys, h, w).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(merged.to_coco_string(), str_of(&c["merged"]), "{name}: merged");
        assert_eq!(merged.area(), c["area"].as_u64().unwrap(), "{name}: area");
        for (i, (p, expect)) in polys.iter().zip(c["per_polygon"].as_array().unwrap()).enumerate() {
            // frPoly reads len // 2 points.
            let pts: Vec<[f64; 2]> = p.chunks_exact(2).map(|q| [q[0], q[1]]).collect();
            let r = rle_from_points(&pts, h, w).unwrap();
            assert_eq!(r.to_coco_string(), str_of(expect), "{name}: polygon {i}");
            if p.len() % 2 == 0 {
                assert_eq!(rle_from_polygon(p, h, w).unwrap(), r);
            } else {
                assert!(rle_from_polygon(p, h, w).is_err(), "{name}: odd length is an error there");
            }
        }
    }
}

/// Reference: the lists on which pycocotools `frPyObjects` raises.
#[test]
fn polygon_lists_pycocotools_rejects_are_errors() {
    let fx = load(POLYGONS_JSON);
    for c in fx["errors"].as_array().unwrap() {
        let (h, w) = hw(c);
        let polys: Vec<Vec<f64>> = c["polygons"].as_array().unwrap().iter().map(repr_f64s).collect();
        let res = rle_from_coco_polygons(&polys, h, w);
        assert!(res.is_err(), "{}: pycocotools raised {}", str_of(&c["name"]), str_of(&c["pycocotools_error"]));
    }
}

/// Reference: pycocotools `frPyObjects(np.array([bbox]), h, w)` (`rleFrBbox`).
#[test]
fn boxes_match_pycocotools() {
    let fx = load(POLYGONS_JSON);
    for c in fx["bboxes"].as_array().unwrap() {
        let (h, w) = hw(c);
        let b = repr_f64s(&c["bbox"]);
        let r = rle_from_bbox([b[0], b[1], b[2], b[3]], h, w).unwrap();
        assert_eq!(r.to_coco_string(), str_of(&c["rle"]), "bbox {b:?} on {h}x{w}");
    }
}

fn fixture_masks() -> Vec<Mask> {
    load(RLE_JSON)["masks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let (h, w) = hw(m);
            unpack(h, w, str_of(&m["bits"]))
        })
        .collect()
}

/// Reference: boundary-iou-api `mask_to_boundary` (cv2.copyMakeBorder + cv2.erode).
#[test]
fn boundaries_match_boundary_iou_api() {
    let masks = fixture_masks();
    let fx = load(BOUNDARY_JSON);
    let cases = fx["boundaries"].as_array().unwrap();
    assert!(cases.len() > 100);
    for c in cases {
        let m = &masks[c["mask"].as_u64().unwrap() as usize];
        let ratio = c["ratio"].as_f64().unwrap();
        let name = str_of(&c["name"]);
        assert_eq!(
            boundary_dilation(m.height(), m.width(), ratio),
            u32v(&c["dilation"]),
            "{name} ratio {ratio}: dilation"
        );
        let b = mask_to_boundary(m, ratio);
        assert_eq!(b, unpack(m.height(), m.width(), str_of(&c["bits"])), "{name} ratio {ratio}");
        assert_eq!(b.area(), c["area"].as_u64().unwrap());
    }
}

/// Reference: boundary-iou-api `boundary_iou` (NaN, stored as null, when both boundaries
/// are empty; we return 1.0 there).
#[test]
fn boundary_iou_matches_boundary_iou_api() {
    let masks = fixture_masks();
    let fx = load(BOUNDARY_JSON);
    let mut nan_cases = 0;
    for c in fx["boundary_iou"].as_array().unwrap() {
        let (a, b) = (&masks[c["a"].as_u64().unwrap() as usize], &masks[c["b"].as_u64().unwrap() as usize]);
        let ratio = c["ratio"].as_f64().unwrap();
        let ours = boundary_iou(a, b, ratio).unwrap();
        match c["value"].as_f64() {
            Some(v) => assert!(close(ours, v), "{} vs {}: {ours} vs {v}", c["a"], c["b"]),
            None => {
                assert_eq!(boundary_intersection_union(a, b, ratio).unwrap(), (0, 0));
                assert_eq!(ours, 1.0);
                nan_cases += 1;
            }
        }
    }
    assert!(nan_cases > 0, "the fixtures should exercise the empty-boundary convention");
}

/// Every error path of the public API reports the cause.
#[test]
fn error_paths() {
    let a = Mask::zeros(3, 4);
    let b = Mask::zeros(4, 3);
    for e in [
        intersection_union(&a, &b).unwrap_err(),
        iou(&a, &b).unwrap_err(),
        boundary_iou(&a, &b, 0.02).unwrap_err(),
        boundary_intersection_union(&a, &b, 0.02).unwrap_err(),
        Rle::encode(&a).iou(&Rle::encode(&b)).unwrap_err(),
        Rle::encode(&a).intersection_union(&Rle::encode(&b)).unwrap_err(),
        Rle::merge(&[Rle::encode(&a), Rle::encode(&b)]).unwrap_err(),
        Rle::merge_intersect(&[Rle::encode(&a), Rle::encode(&b)]).unwrap_err(),
        Rle::iou_matrix(&[Rle::encode(&a)], &[Rle::encode(&b)]).unwrap_err(),
    ] {
        let msg = e.to_string();
        assert!(msg.contains("3x4") && msg.contains("4x3"), "{msg}");
    }

    // Counts that do not cover the image.
    let short = Rle { height: 3, width: 4, counts: vec![5, 2] };
    let good = Rle::encode(&a);
    for e in [
        short.decode().unwrap_err(),
        short.validate().unwrap_err(),
        short.to_bbox().unwrap_err(),
        short.iou(&good).unwrap_err(),
        good.intersection_union(&short).unwrap_err(),
        Rle::merge(&[good.clone(), short.clone()]).unwrap_err(),
        Rle::iou_matrix(std::slice::from_ref(&short), std::slice::from_ref(&good)).unwrap_err(),
        Rle::new(3, 4, vec![5, 2]).unwrap_err(),
        Rle::from_coco_string(3, 4, "52").unwrap_err(),
    ] {
        let msg = e.to_string();
        assert!(msg.contains("sum to 7") && msg.contains("12 pixels"), "{msg}");
    }

    // Bad strings.
    for (s, want) in [
        ("0 1", "invalid character ' ' at 1"),
        ("0\u{7f}", "invalid character"),
        ("0ü", "invalid character 'ü' at 1"),
        ("0o", "ends inside a value"),
        ("O", "out of range"),
    ] {
        let msg = Rle::from_coco_string(3, 4, s).unwrap_err().to_string();
        assert!(msg.contains(want), "{s:?}: {msg}");
    }

    // Bad mask buffers and polygons.
    assert!(Mask::from_row_major(2, 2, vec![1; 5]).unwrap_err().to_string().contains("5 bytes"));
    assert!(rle_from_polygon(&[0.0, 0.0, 1.0], 4, 4).unwrap_err().to_string().contains("3 values"));
    assert!(rle_from_polygon(&[0.0, 0.0, f64::NAN, 1.0, 2.0, 2.0], 4, 4).is_err());
    assert!(rle_from_bbox([0.0, 0.0, f64::INFINITY, 1.0], 4, 4).is_err());
    assert!(rle_from_coco_polygons(&[], 4, 4).is_err());
    assert!(Rle::merge(&[]).is_err());
}
