//! The offline corrector: hand-built cases, and properties on 300 generated benchmark
//! samples (ground-truth answers need no correction; injected errors are found and fixed).
use std::collections::BTreeSet;

use popen_core::lexicon::Lexicon;
use popen_data::synth::{generate_sample, lexicon, SynthConfig};
use popen_prefs::corrector::{Corrector, Method, ObjectList, OfflineCorrector, TargetTruth, Truth};

fn lex() -> Lexicon {
    Lexicon::from_benchmark_json(&serde_json::to_string(&lexicon()).unwrap()).unwrap()
}

fn truth(answer: &str, targets: &[(&str, Option<&str>)], instances: &[&str]) -> Truth {
    Truth {
        answer: answer.into(),
        targets: targets
            .iter()
            .map(|(c, col)| TargetTruth { class: c.to_string(), colour: col.map(str::to_string) })
            .collect(),
        instance_classes: instances.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
    }
}

#[test]
fn hand_built_cases() {
    let c = OfflineCorrector::new(lex());
    let t =
        truth("The yellow banana <seg> is the only food item here.", &[("banana", Some("yellow"))], &["banana", "key"]);
    // Wrong class and colour of the target: fixed in place.
    let r = c.correct("The red apple <seg> is the only food item here.", &t).unwrap();
    assert_eq!(r.method, Method::InPlace);
    assert_eq!(r.text, "The yellow banana <seg> is the only food item here.");
    // Only the colour.
    let r = c.correct("Here is the green banana <seg>.", &t).unwrap();
    assert_eq!((r.method, r.text.as_str()), (Method::InPlace, "Here is the yellow banana <seg>."));
    // Correct: unchanged.
    let r = c.correct("Here is the banana <seg>.", &t).unwrap();
    assert_eq!(r.method, Method::Unchanged);
    assert!(!r.has_error());
    // A free mention of an absent object, or a wrong number of <seg>: rewrite to y_g.
    let r = c.correct("The banana <seg> is next to the hammer.", &t).unwrap();
    assert_eq!((r.method, r.text.as_str()), (Method::Rewrite, t.answer.as_str()));
    let r = c.correct("The banana <seg> and the key <seg>.", &t).unwrap();
    assert_eq!(r.method, Method::Rewrite);
    let r = c.correct("I see it <seg>.", &t).unwrap();
    assert_eq!(r.method, Method::Rewrite);
    assert!(r.notes[0].contains("no object mention"), "{:?}", r.notes);
    // A free mention of an object that is in the image but not in the ground-truth answer:
    // see `object_list_is_the_ground_truth_answers` (this case expected Unchanged before
    // issue 24, which is now the `ObjectList::Image` option).
    // Two targets, the second wrong.
    let t2 = truth(
        "the red ball <seg> and the blue cup <seg>",
        &[("ball", Some("red")), ("cup", Some("blue"))],
        &["ball", "cup"],
    );
    let r = c.correct("the red ball <seg> and the blue box <seg>", &t2).unwrap();
    assert_eq!(r.text, "the red ball <seg> and the blue cup <seg>");
}

#[test]
fn benchmark_answers_are_correct_and_injected_errors_are_fixed() {
    for list in [ObjectList::Answer, ObjectList::Image] {
        benchmark_properties(OfflineCorrector::new(lex()).with_object_list(list));
    }
}

fn benchmark_properties(c: OfflineCorrector) {
    let l = lex();
    let cfg = SynthConfig::default();
    let (mut in_place, mut n) = (0, 0);
    for i in 0..300 {
        let s = generate_sample(&cfg, "train", i).unwrap();
        let t = Truth::from_sample(&s, &l);
        assert_eq!(t.targets.len(), s.target_names.len());
        assert!(t.targets.iter().all(|x| x.colour.is_some()), "the generator records colours: {}", s.meta);
        let r = c.correct(&s.answer, &t).unwrap();
        assert_eq!(r.method, Method::Unchanged, "sample {i}: {:?} -> {r:?}", s.answer);
        let bad = c.inject_errors(&t, i as u64).unwrap();
        assert_ne!(bad, s.answer, "sample {i}");
        assert_eq!(bad, c.inject_errors(&t, i as u64).unwrap(), "deterministic");
        let fixed = c.correct(&bad, &t).unwrap();
        assert!(fixed.has_error(), "sample {i}: {bad:?} not found wrong");
        // The fix is a fixed point, and names the targets' classes.
        assert_eq!(c.correct(&fixed.text, &t).unwrap().method, Method::Unchanged, "sample {i}: {fixed:?}");
        if fixed.method == Method::InPlace {
            in_place += 1;
        }
        n += 1;
    }
    assert!(in_place * 2 > n, "most injected errors are fixed in place ({in_place} of {n})");
}

/// Issue 24 item 4 (SPEC 3.2, 10.19; paper Appendix B: "the corrected answer should include
/// only the objects in the object list", the names of the objects of the ground-truth
/// answer). Hand-built cases: the image holds a banana (the target), a key and a cup; the
/// ground-truth answer names the banana and the cup.
#[test]
fn object_list_is_the_ground_truth_answers() {
    let l = lex();
    let t =
        truth("The yellow banana <seg> is next to the cup.", &[("banana", Some("yellow"))], &["banana", "key", "cup"]);
    let want: BTreeSet<String> = ["banana", "cup"].iter().map(|s| s.to_string()).collect();
    assert_eq!(t.object_list(ObjectList::Answer, &l), want);
    assert_eq!(t.object_list(ObjectList::Image, &l), t.instance_classes);
    let paper = OfflineCorrector::new(l.clone());
    let image = OfflineCorrector::new(l.clone()).with_object_list(ObjectList::Image);
    // The key is in the image but not in the answer: an error by default (rewrite to y_g);
    // the image-wide list (the behaviour before issue 24) accepts it.
    let y = "The banana <seg> is next to the key.";
    let r = paper.correct(y, &t).unwrap();
    assert_eq!((r.method, r.text.as_str()), (Method::Rewrite, t.answer.as_str()), "{r:?}");
    assert!(r.notes[0].contains("'key'") && r.notes[0].contains("ground-truth answer"), "{:?}", r.notes);
    assert_eq!(image.correct(y, &t).unwrap().method, Method::Unchanged);
    // A non-target object that the ground-truth answer itself names is fine under both.
    for c in [&paper, &image] {
        assert_eq!(c.correct("Here is the banana <seg>, near a mug.", &t).unwrap().method, Method::Unchanged);
    }
    // Absent from the image: an error under both.
    for c in [&paper, &image] {
        assert_eq!(c.correct("The banana <seg> is next to the hammer.", &t).unwrap().method, Method::Rewrite);
    }
    // The list is part of the corrector's settings (a changed list recomputes collect-pt).
    assert_ne!(paper.settings(), image.settings());
    // CollectPtConfig: the paper's list unless the TOML says otherwise.
    use popen_prefs::collect_pt::CollectPtConfig;
    assert_eq!(CollectPtConfig::default().object_list, ObjectList::Answer);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tiny: CollectPtConfig =
        toml::from_str(&std::fs::read_to_string(root.join("pipelines/collect-pt-tiny.toml")).unwrap()).unwrap();
    assert_eq!(tiny.object_list, ObjectList::Answer);
    let image_cfg: CollectPtConfig = toml::from_str("seed = 0\nmax_new_tokens = 8\nresample = 1\ntemperature = 1.0\ntop_p = 0.9\nmin_match = 3\nobject_list = \"image\"\n").unwrap();
    assert_eq!(image_cfg.object_list, ObjectList::Image);
}
