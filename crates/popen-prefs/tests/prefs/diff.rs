//! The SequenceMatcher port and RLHF-V's changed positions against Python's difflib
//! (fixture: tools/reference/difflib_fixture.py, which also transcribes RLHF-V's
//! `get_diff_ids`), on 160 random pairs: repeats, edits, unrelated pairs, lengths past 200
//! (difflib's autojunk).
use popen_prefs::diff::{changed_positions, SequenceMatcher};
use serde_json::Value;

#[test]
fn matches_python_difflib_and_rlhfv() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/difflib.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 100);
    let mut autojunk = 0;
    for (k, c) in cases.iter().enumerate() {
        let v = |key: &str| -> Vec<usize> { serde_json::from_value(c[key].clone()).unwrap() };
        let (a, b) = (v("a"), v("b"));
        let want: Vec<Vec<usize>> = serde_json::from_value(c["blocks"].clone()).unwrap();
        let got: Vec<Vec<usize>> =
            SequenceMatcher::new(&a, &b).matching_blocks().iter().map(|m| vec![m.a, m.b, m.size]).collect();
        assert_eq!(got, want, "case {k}: matching blocks");
        assert_eq!(changed_positions(&a, &b, 3), (v("ly"), v("lyc")), "case {k}: min 3");
        assert_eq!(changed_positions(&a, &b, 1), (v("ly_min1"), v("lyc_min1")), "case {k}: min 1");
        if b.len() >= 200 {
            autojunk += 1;
        }
    }
    assert!(autojunk >= 10, "the fixture must exercise autojunk ({autojunk} cases)");
}
