//! CHAIR on hand-computed sentences: plurals, synonyms, two-word names, word boundaries,
//! colour words, and Eq. 7's two ratios. The real COCO table (CHAIR's chair_synonyms.txt,
//! fetched by `make assets`) is checked on a few known mappings.

use super::BENCH_LEXICON;
use popen_eval::chair::{chair_sample, tokenize, ChairTotals, Lexicon};
use std::path::Path;

/// Five lines in the real table's shape (leading blanks, repeated words).
const COCO_MINI: &str = "person, girl, boy, man, woman, people, person\n\
hot dog\n\
dog, puppy, pup\n\
traffic light, street light, stop light\n\
teddy bear, teddybear\n\
bear, panda\n\
orange\n\
cat, kitten\n\
dining table, table, desk\n\
knife, pocketknife, knive\n\
motorcycle, scooter,  motor bike, motorbike\n";

fn classes(lex: &Lexicon, text: &str) -> Vec<String> {
    lex.mentions(text).into_iter().map(|m| m.class).collect()
}

#[test]
fn tokenizer_drops_seg_and_punctuation() {
    assert_eq!(
        tokenize("The red ball <seg>, and a teddy-bear's hat!"),
        vec!["the", "red", "ball", "and", "a", "teddy", "bear", "s", "hat"]
    );
}

#[test]
fn benchmark_lexicon_mentions() {
    let lex = Lexicon::from_benchmark_json(BENCH_LEXICON).unwrap();
    assert_eq!(lex.classes.len(), 8);
    assert_eq!(lex.max_words(), 2);
    // synonym two-word form, plural synonym: one mention each
    assert_eq!(classes(&lex, "The red toy ball <seg> and two crates <seg> <seg>."), vec!["ball", "box"]);
    assert_eq!(classes(&lex, "the toy balls"), vec!["ball"]);
    // word boundaries: pineapple is not an apple, a fishbowl is not a fish
    assert_eq!(classes(&lex, "a pineapple, an apple and a fishbowl"), vec!["apple"]);
    // colour words are not objects
    assert_eq!(classes(&lex, "the orange box and the red one"), vec!["box"]);
    // lexicon plurals (irregular ones too), unchanged plurals, synonyms
    assert_eq!(
        classes(&lex, "three leaves, two dice, some fish, a crescent moon and a crescent"),
        vec!["leaf", "dice", "fish", "moon", "moon"]
    );
    assert_eq!(classes(&lex, "Mugs! BALLS."), vec!["cup", "ball"]);
    assert_eq!(lex.class_of("Toy Balls"), Some("ball"));
    assert_eq!(lex.class_of("orange"), None);
}

#[test]
fn benchmark_lexicon_errors_name_the_problem() {
    let e = Lexicon::from_benchmark_json("{}").unwrap_err().to_string();
    assert!(e.contains("not a popen lexicon.json"), "{e}");
    let bad = BENCH_LEXICON.replace(r#""mug": "cup""#, r#""mug": "box""#);
    let e = Lexicon::from_benchmark_json(&bad).unwrap_err().to_string();
    assert!(e.contains("'mug' -> 'box'"), "{e}");
    let bad = BENCH_LEXICON.replace(r#""synonym_plurals": ["mugs"]"#, r#""synonym_plurals": []"#);
    assert!(Lexicon::from_benchmark_json(&bad).unwrap_err().to_string().contains("category 'cup'"));
    let e = Lexicon::load("/nonexistent/lexicon.json").unwrap_err().to_string();
    assert!(e.contains("/nonexistent/lexicon.json"), "{e}");
}

#[test]
fn coco_table_mentions() {
    let lex = Lexicon::from_coco_synonyms(COCO_MINI).unwrap();
    assert_eq!(lex.classes.len(), 11);
    // two-word names win over their last word, in singular and plural
    assert_eq!(classes(&lex, "Two hot dogs and a dog."), vec!["hot dog", "dog"]);
    assert_eq!(
        classes(&lex, "traffic lights near a teddy bear and a panda"),
        vec!["traffic light", "teddy bear", "bear"]
    );
    // colour adjective before a mention vs the fruit
    assert_eq!(classes(&lex, "an orange cat eats an orange"), vec!["cat", "orange"]);
    // irregular and rule plurals; synonyms map to the canonical class
    assert_eq!(
        classes(&lex, "the men and women at the tables with knives"),
        vec!["person", "person", "dining table", "knife"]
    );
    assert_eq!(classes(&lex, "motor bikes, puppies and kittens"), vec!["motorcycle", "dog", "cat"]);
    // no false singulars
    assert_eq!(classes(&lex, "this is a category of catalogs"), Vec::<String>::new());
    assert!(Lexicon::from_coco_synonyms("\n\n").is_err());
}

#[test]
fn chair_counts_every_mention() {
    let lex = Lexicon::from_benchmark_json(BENCH_LEXICON).unwrap();
    let truth = vec!["ball".to_string(), "cup".to_string(), "cup".to_string()];
    // ball and mug are present, the apples are not: 1 of 3 mentions hallucinated
    let a = chair_sample(&lex, "the ball <seg>, the mug <seg> and the apples <seg>", &truth);
    assert_eq!(a.mentions.len(), 3);
    assert_eq!(a.hallucinated.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), vec!["apples"]);
    // repeats count: two hallucinated mentions of one class
    let b = chair_sample(&lex, "a fish <seg>, another fish <seg> and a ball <seg>", &truth);
    assert_eq!((b.mentions.len(), b.hallucinated.len()), (3, 2));
    // no mention at all: a response without hallucination
    let c = chair_sample(&lex, "I see nothing like that.", &truth);
    assert!(c.mentions.is_empty());
    // ground-truth names are read through the lexicon too (plural and synonym forms)
    let d = chair_sample(&lex, "the carton", &["boxes".to_string()]);
    assert!(d.hallucinated.is_empty());
    let mut t = ChairTotals::default();
    for s in [&a, &b, &c, &d] {
        t.add(s);
    }
    assert_eq!((t.responses, t.responses_with_hallucination, t.mentions, t.hallucinated_mentions), (4, 2, 7, 3));
    assert_eq!(t.c_s(), 0.5);
    assert!((t.c_i() - 3.0 / 7.0).abs() < 1e-15);
    assert_eq!(ChairTotals::default().c_i(), 0.0);
}

#[test]
fn real_coco_synonym_table() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/assets/chair/chair_synonyms.txt");
    assert!(p.is_file(), "{} is missing: run `make assets` (it fetches CHAIR's table)", p.display());
    let lex = Lexicon::load(&format!("coco:{}", p.display())).unwrap();
    assert_eq!(lex.classes.len(), 80);
    assert_eq!(lex.max_words(), 3);
    for (form, class) in [
        ("hot dogs", "hot dog"),
        ("people", "person"),
        ("skis", "skis"),
        ("televisions", "tv"),
        ("wine glasses", "wine glass"),
        ("teddy-bears", "teddy bear"),
        ("cell phones", "cell phone"),
        ("iPhone", "cell phone"),
        ("stove top oven", "oven"),
        ("buses", "bus"),
        ("sandwiches", "sandwich"),
        ("benches", "bench"),
    ] {
        assert_eq!(lex.class_of(form), Some(class), "{form}");
    }
    assert_eq!(lex.class_of("pineapple"), None);
    assert_eq!(
        classes(&lex, "A man rides an orange motor bike past a stop sign."),
        vec!["person", "motorcycle", "stop sign"]
    );
}
