//! The offline corrector: hand-built cases, and properties on 300 generated benchmark
//! samples (ground-truth answers need no correction; injected errors are found and fixed).
use std::collections::BTreeSet;

use popen_core::lexicon::Lexicon;
use popen_data::synth::{generate_sample, lexicon, SynthConfig};
use popen_prefs::corrector::{Corrector, Method, OfflineCorrector, TargetTruth, Truth};

fn lex() -> Lexicon {
    Lexicon::from_benchmark_json(&serde_json::to_string(&lexicon()).unwrap()).unwrap()
}

fn truth(answer: &str, targets: &[(&str, Option<&str>)], instances: &[&str]) -> Truth {
    Truth {
        answer: answer.into(),
        targets: targets.iter().map(|(c, col)| TargetTruth { class: c.to_string(), colour: col.map(str::to_string) }).collect(),
        instance_classes: instances.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
    }
}

#[test]
fn hand_built_cases() {
    let c = OfflineCorrector::new(lex());
    let t = truth("The yellow banana <seg> is the only food item here.", &[("banana", Some("yellow"))], &["banana", "key"]);
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
    // A free mention of an object that is in the image is fine.
    let r = c.correct("The banana <seg> is next to the key.", &t).unwrap();
    assert_eq!(r.method, Method::Unchanged);
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
    let c = OfflineCorrector::new(lex());
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
