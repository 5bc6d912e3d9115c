//! Tests of the `tiny` model's tokenizer (`Tokenizer::train_tiny`, trained on the embedded
//! benchmark's text from `popen_data::synth`) and of PixelLM's tokens, prompt and seg-group
//! handling (`add_pixellm_tokens`, `pixellm_prompt`, `encode_with_image`, `expand_seg`,
//! `collapse_seg`, `seg_groups`).
//!
//! References: the prompt string is PixelLM's `llava_v1` conversation as `chat.py` renders it
//! (MaverickRen/PixelLM `utils/conversation.py::conv_llava_v1`, `chat.py::main`); the
//! `<image>` split is LLaVA's `tokenizer_image_token`; the token order is PixelLM's
//! `train_ds.py::main` (seg tokens, then `<im_start>`, `<im_end>`). See
//! docs/checkpoint-keys.md, section 4.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use popen_core::shard::SEG_TOKEN;
use popen_data::synth::{generate_sample, lexicon, SynthConfig};
use popen_model::tokenizer::{
    answer_text, collapse_seg, expand_seg, seg_group_positions, seg_group_text, seg_groups, seg_token_names, Piece,
    PixelLmTokens, SegGroupIssue, Tokenizer, TokenizerError, BYTE_ALPHABET, LLAVA_V1_SYSTEM, TINY_SPECIALS,
};

/// Vocabulary budget (this corpus reaches it; `train_tiny` stops earlier when the texts run
/// out of pairs to merge, and never exceeds it).
const VOCAB: usize = 1024;
/// PixelLM's recipe: 3 seg tokens x 2 feature scales.
const SEG_N: usize = 6;

/// Instructions and answers of a small generated benchmark (train and test splits), in
/// generation order.
fn samples() -> &'static Vec<(String, String)> {
    static S: OnceLock<Vec<(String, String)>> = OnceLock::new();
    S.get_or_init(|| {
        let cfg = SynthConfig::default();
        let mut out = Vec::new();
        for (split, n) in [("train", 120), ("test", 40)] {
            for i in 0..n {
                let s = generate_sample(&cfg, split, i).unwrap();
                out.push((s.instruction, s.answer));
            }
        }
        out
    })
}

/// Every word form of the benchmark's lexicon (names, plurals, synonyms, colours, group and
/// function words, generic nouns, template kinds) plus the words of the generated texts.
fn benchmark_words() -> BTreeSet<String> {
    let lex = lexicon();
    let mut words = BTreeSet::new();
    let mut add = |text: &str| {
        for w in text.split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '-')).filter(|w| !w.is_empty()) {
            words.insert(w.to_string());
        }
    };
    for c in &lex.categories {
        add(&c.name);
        add(&c.plural);
        c.synonyms.iter().chain(&c.synonym_plurals).for_each(|s| add(s));
    }
    lex.colours.iter().for_each(|c| add(&c.name));
    for g in &lex.groups {
        add(&g.plural);
        add(&g.singular);
        add(&g.counted);
    }
    lex.functions.iter().flat_map(|f| f.questions.iter()).for_each(|q| add(q));
    lex.mention_forms.keys().for_each(|k| add(k));
    lex.generic_nouns.iter().for_each(|g| add(g));
    for (q, a) in samples() {
        add(q);
        add(&a.replace(SEG_TOKEN, " "));
    }
    words
}

/// The training texts: the generated instructions and answers (markers removed: the seg
/// tokens are added tokens, not BPE material) and the lexicon's words.
fn corpus() -> Vec<String> {
    let mut texts: Vec<String> = Vec::new();
    for (q, a) in samples() {
        texts.push(q.clone());
        texts.push(a.replace(&format!(" {SEG_TOKEN}"), "").replace(SEG_TOKEN, ""));
    }
    // Each word alone (a text start has no leading space: the word's bare form) and all
    // words in one line (the space-prefixed form every word takes inside a sentence).
    let words: Vec<String> = benchmark_words().into_iter().collect();
    texts.push(words.join(" "));
    texts.extend(words);
    texts
}

fn train(texts: &[String]) -> Tokenizer {
    Tokenizer::train_tiny(texts.iter().map(String::as_str), VOCAB, TINY_SPECIALS).unwrap()
}

fn tiny() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| train(&corpus()))
}

fn tiny_pixellm() -> &'static (Tokenizer, PixelLmTokens) {
    static T: OnceLock<(Tokenizer, PixelLmTokens)> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = train(&corpus());
        let toks = t.add_pixellm_tokens(SEG_N).unwrap();
        (t, toks)
    })
}

fn saved_json(t: &Tokenizer, dir: &std::path::Path, name: &str) -> Vec<u8> {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    let p = sub.join("tokenizer.json");
    t.save(&p).unwrap();
    std::fs::read(&p).unwrap()
}

#[test]
fn training_is_deterministic() {
    let texts = corpus();
    let dir = tempfile::tempdir().unwrap();
    let a = saved_json(tiny(), dir.path(), "a");
    let b = saved_json(&train(&texts), dir.path(), "b");
    assert_eq!(a, b, "same texts, different tokenizer.json");
    // Word counts do not depend on the order of the texts.
    let mut rev = texts.clone();
    rev.reverse();
    let c = saved_json(&train(&rev), dir.path(), "c");
    assert_eq!(a, c, "reordered texts, different tokenizer.json");
    let n = tiny().vocab_size();
    assert!(n <= VOCAB && n > TINY_SPECIALS.len() + BYTE_ALPHABET + 300, "{n}");
    // A budget below what the text supports is met exactly.
    let small = Tokenizer::train_tiny(texts.iter().map(String::as_str), 400, TINY_SPECIALS).unwrap();
    assert_eq!(small.vocab_size(), 400);
}

#[test]
fn specials_come_first_and_are_single_ids() {
    let t = tiny();
    for (i, s) in TINY_SPECIALS.iter().enumerate() {
        assert_eq!(t.token_to_id(s), Some(i as u32), "{s}");
        assert_eq!(t.encode(s, false).unwrap(), vec![i as u32], "{s}");
        assert_eq!(t.decode(&[i as u32], true).unwrap(), "", "{s} is special");
    }
    assert_eq!(t.bos_id(), Some(1));
    assert_eq!(t.eos_id(), Some(2));
    assert_eq!(t.pad_id(), Some(0));
    // Specials inside text are never split, whatever surrounds them.
    let ids = t.encode("red</s>cup<s><unk>", false).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i < 3).count(), 3, "{ids:?}");
    assert!(ids.contains(&2) && ids.contains(&1) && ids.contains(&0));
    assert_eq!(t.decode(&ids, false).unwrap(), "red</s>cup<s><unk>");
    // LLaMA-style: encode(.., true) prepends BOS.
    assert_eq!(t.encode("cup", true).unwrap()[0], 1);
}

#[test]
fn every_benchmark_word_is_a_few_tokens() {
    let t = tiny();
    let words = benchmark_words();
    assert!(words.len() > 100, "{} words", words.len());
    let (mut total, mut worst) = (0usize, (0usize, String::new()));
    for w in &words {
        for text in [w.clone(), format!(" {w}")] {
            let ids = t.encode(&text, false).unwrap();
            assert_eq!(t.decode(&ids, false).unwrap(), text);
            if ids.len() > worst.0 {
                worst = (ids.len(), text.clone());
            }
        }
        total += t.encode(&format!(" {w}"), false).unwrap().len();
    }
    let mean = total as f64 / words.len() as f64;
    eprintln!(
        "{} words, vocab {}: mean {mean:.3} tokens per word, worst {:?} ({})",
        words.len(),
        t.vocab_size(),
        worst.1,
        worst.0
    );
    // A byte fallback would give ~6 tokens for an average word; a learnt vocabulary ~1.
    assert!(worst.0 <= 3, "worst word {:?}: {} tokens", worst.1, worst.0);
    assert!(mean <= 1.5, "mean {mean:.2} tokens per word");
    // Whole generated texts are short too.
    for (q, _) in samples().iter().take(20) {
        let n = t.encode(q, false).unwrap().len();
        let words = q.split_whitespace().count();
        assert!(n <= 2 * words, "{q:?}: {n} tokens for {words} words");
    }
}

#[test]
fn unseen_text_never_maps_to_unknown() {
    let t = tiny();
    for text in ["zyzzyva quokka", "café — naïve 😀", "\t\n  12345 !?", "ÆØÅ 漢字"] {
        let ids = t.encode(text, false).unwrap();
        assert!(!ids.contains(&0), "{text:?} produced <unk>: {ids:?}");
        assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
        assert_eq!(t.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn save_and_reload_keeps_ids() {
    let (t, toks) = tiny_pixellm();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer.json");
    t.save(&p).unwrap();
    assert!(dir.path().join("tokenizer_config.json").is_file());
    let mut back = Tokenizer::from_file(&p).unwrap();
    assert_eq!(back.vocab_size(), t.vocab_size());
    assert_eq!((back.bos_id(), back.eos_id(), back.pad_id()), (Some(1), Some(2), Some(0)));
    for (q, a) in samples() {
        let conv = t.pixellm_conversation(q, &expand_seg(a, SEG_N).unwrap());
        assert_eq!(back.encode(&conv, true).unwrap(), t.encode(&conv, true).unwrap());
    }
    // The PixelLM tokens survive the round trip: adding them again changes nothing.
    let before = back.vocab_size();
    let again = back.add_pixellm_tokens(SEG_N).unwrap();
    assert_eq!(&again, toks);
    assert_eq!(back.vocab_size(), before);
    // And the saved bytes are stable.
    let p2 = dir.path().join("again/tokenizer.json");
    std::fs::create_dir_all(p2.parent().unwrap()).unwrap();
    back.save(&p2).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&p2).unwrap());
}

#[test]
fn pixellm_tokens_follow_pixellm_order_and_are_idempotent() {
    let (t, toks) = tiny_pixellm();
    let base = tiny().vocab_size();
    let v = base as u32;
    // train_ds.py: [SEG0]..[SEG5] first, then <im_start>, <im_end>.
    assert_eq!(toks.seg, (v..v + 6).collect::<Vec<_>>());
    assert_eq!((toks.im_start, toks.im_end), (v + 6, v + 7));
    assert_eq!(t.vocab_size(), base + SEG_N + 2);
    assert_eq!((toks.eos, toks.pad, toks.bos), (2, 0, Some(1)));
    assert_eq!(toks.image_patch, None);
    assert_eq!(toks.seg_sep, t.encode(" ", false).unwrap());
    assert_eq!(toks.seg_sep.len(), 1);
    for (name, &id) in seg_token_names(SEG_N).unwrap().iter().zip(&toks.seg) {
        assert_eq!(t.encode(name, false).unwrap(), vec![id], "{name}");
    }
    // Never split, even glued to words or each other.
    let ids = t.encode("cup[SEG0][SEG1]<im_end>x", false).unwrap();
    assert!(ids.windows(3).any(|w| w == [v, v + 1, v + 7]), "{ids:?}");
    // Seg tokens are normal added tokens (kept by skip_special), <im_*> are special.
    let ids = t.encode("<im_start>a [SEG0] [SEG1]<im_end>", false).unwrap();
    assert_eq!(t.decode(&ids, true).unwrap(), "a [SEG0] [SEG1]");
    assert_eq!(t.decode(&ids, false).unwrap(), "<im_start>a [SEG0] [SEG1]<im_end>");

    let mut t2 = train(&corpus());
    let a = t2.add_pixellm_tokens(SEG_N).unwrap();
    let b = t2.add_pixellm_tokens(SEG_N).unwrap();
    assert_eq!(a, b);
    assert_eq!(t2.vocab_size(), base + SEG_N + 2);
    // Single-token mode uses "[SEG]" (PixelLM's seg_token_num * scales == 1).
    let mut t3 = train(&corpus());
    let one = t3.add_pixellm_tokens(1).unwrap();
    assert_eq!(one.seg.len(), 1);
    assert_eq!(t3.token_to_id("[SEG]"), Some(one.seg[0]));
    let e = t3.add_pixellm_tokens(0).unwrap_err();
    assert!(matches!(e, TokenizerError::Invalid { .. }), "{e}");
}

#[test]
fn add_pixellm_tokens_needs_an_eos() {
    let mut t = Tokenizer::train_tiny(["a red cup"].into_iter(), BYTE_ALPHABET + 4, &["<unk>"]).unwrap();
    let e = t.add_pixellm_tokens(SEG_N).unwrap_err();
    assert!(e.to_string().contains("no EOS"), "{e}");
}

#[test]
fn train_tiny_rejects_bad_arguments() {
    let texts = ["a red cup"];
    for (size, specials, want) in [
        (100, TINY_SPECIALS, "smaller than"),
        (VOCAB, &["<s>", "<s>"][..], "twice"),
        (VOCAB, &[""][..], "empty special"),
    ] {
        let e = Tokenizer::train_tiny(texts.into_iter(), size, specials).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    let e = Tokenizer::train_tiny(std::iter::empty(), VOCAB, TINY_SPECIALS).unwrap_err();
    assert!(e.to_string().contains("no training text"), "{e}");
}

#[test]
fn prompt_matches_pixellm_chat_template() {
    let (t, toks) = tiny_pixellm();
    let instruction = "Which objects could hold water? Please respond with segmentation mask.";
    let want = "A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions. \
USER: <im_start><image><im_end>\nWhich objects could hold water? Please respond with \
segmentation mask. ASSISTANT:";
    assert_eq!(t.pixellm_prompt(instruction), want);
    assert!(want.starts_with(LLAVA_V1_SYSTEM));
    assert_eq!(t.pixellm_conversation(instruction, "the red cup [SEG0]"), format!("{want} the red cup [SEG0]</s>"));

    // tokenizer_image_token: BOS + chunk 0, the image, chunk 1 without BOS.
    let pieces = t.encode_with_image(want).unwrap();
    assert_eq!(pieces.len(), 3, "{pieces:?}");
    let (Piece::Tokens(a), Piece::Image, Piece::Tokens(b)) = (&pieces[0], &pieces[1], &pieces[2]) else {
        panic!("{pieces:?}")
    };
    assert_eq!(a[0], 1);
    assert_eq!(*a.last().unwrap(), toks.im_start);
    assert_eq!(b[0], toks.im_end);
    assert!(!b.contains(&1));
    let (head, tail) = want.split_once("<image>").unwrap();
    assert_eq!(&a[1..], t.encode(head, false).unwrap().as_slice());
    assert_eq!(b, &t.encode(tail, false).unwrap());
    // Placement cases: leading image keeps a lone BOS; trailing and repeated images.
    assert_eq!(
        t.encode_with_image("<image>x").unwrap(),
        vec![Piece::Tokens(vec![1]), Piece::Image, Piece::Tokens(t.encode("x", false).unwrap())]
    );
    assert_eq!(
        t.encode_with_image("x<image><image>").unwrap(),
        vec![Piece::Tokens(t.encode("x", true).unwrap()), Piece::Image, Piece::Image]
    );
    assert_eq!(t.encode_with_image("no image").unwrap(), vec![Piece::Tokens(t.encode("no image", true).unwrap())]);
}

/// User text is literal (`Tokenizer::pixellm_prompt_pieces`): an instruction holding the text
/// of added tokens (`<im_start>`, `[SEG0]`, `<image>`, `</s>`, ...) gets ordinary ids for it,
/// none of them an added token's id, that decode back to the same text, and no second image;
/// the template keeps its `<im_start>`, image and `<im_end>`. An instruction without such text
/// gets exactly the ids of the old `encode_with_image(&pixellm_prompt(..))`, so every
/// fixture and trained model reads the benchmark as before. (The old path turned the user's
/// `[SEG0]` into the codebook token and `<image>` into a second image.)
#[test]
fn instruction_text_of_control_tokens_stays_text() {
    let (t, toks) = tiny_pixellm();
    let added: BTreeSet<u32> = t.inner().get_added_tokens_decoder().keys().copied().collect();
    assert!(added.contains(&toks.im_start) && added.contains(&toks.seg[0]) && added.contains(&toks.eos));
    let old = |q: &str| t.encode_with_image(&t.pixellm_prompt(q)).unwrap();

    for q in [
        "Where is <im_start> the red cup [SEG0]?",
        "<im_start><image><im_end> [SEG5]</s><s><unk> segment it",
        "[SEG0] [SEG1] [SEG2] [SEG3] [SEG4] [SEG5]",
    ] {
        let pieces = t.pixellm_prompt_pieces(q).unwrap();
        let [Piece::Tokens(a), Piece::Image, Piece::Tokens(b)] = pieces.as_slice() else { panic!("{q}: {pieces:?}") };
        // The template: BOS .. <im_start>, the image, <im_end>.
        assert_eq!((a[0], *a.last().unwrap(), b[0]), (1, toks.im_start, toks.im_end), "{q}");
        let user = &b[1..];
        assert!(user.iter().all(|id| !added.contains(id)), "{q}: {user:?}");
        assert_eq!(t.decode(user, false).unwrap(), format!("\n{q} ASSISTANT:"));
        assert_eq!(t.encode_literal(q).unwrap().iter().filter(|id| added.contains(id)).count(), 0);
        assert_ne!(pieces, old(q), "{q}: the old path parsed the control tokens");
    }

    // Without added-token text: bit-identical to the old path, for every benchmark
    // instruction and some edge cases (partial token text, whitespace, non-ASCII, empty).
    let mut n = 0;
    for q in samples().iter().map(|(q, _)| q.as_str()).chain([
        "",
        "  two  spaces \n\t",
        "<im_ start> [SEG] [SEG 0] SEG0] <im_end",
        "déjà vu: 漢字 and emoji 🙂",
    ]) {
        assert_eq!(t.pixellm_prompt_pieces(q).unwrap(), old(q), "{q:?}");
        assert_eq!(t.encode_literal(q).unwrap(), t.encode(q, false).unwrap(), "{q:?}");
        n += 1;
    }
    assert!(n > 150);
}

#[test]
fn expand_and_collapse_round_trip() {
    let group = "[SEG0] [SEG1] [SEG2] [SEG3] [SEG4] [SEG5]";
    assert_eq!(seg_group_text(SEG_N).unwrap(), group);
    assert_eq!(
        expand_seg("the red cup <seg> and the key <seg>.", SEG_N).unwrap(),
        format!("the red cup {group} and the key {group}.")
    );
    assert_eq!(expand_seg("a cup <seg>", 1).unwrap(), "a cup [SEG]");
    let (t, _) = tiny_pixellm();
    let mut checked = 0;
    for (_, a) in samples() {
        for n in [1, 2, SEG_N] {
            let e = expand_seg(a, n).unwrap();
            assert!(!e.contains(SEG_TOKEN));
            assert_eq!(e.matches("[SEG").count(), n * a.matches(SEG_TOKEN).count(), "{e}");
            assert_eq!(&collapse_seg(&e, n).unwrap(), a);
        }
        // Through the tokenizer: encode, decode, collapse gives the answer back.
        let e = expand_seg(a, SEG_N).unwrap();
        let ids = t.encode(&e, false).unwrap();
        assert_eq!(&collapse_seg(&t.decode(&ids, false).unwrap(), SEG_N).unwrap(), a);
        checked += 1;
    }
    assert!(checked >= 100);
    // Partial or reordered groups stay visible instead of becoming <seg>.
    let broken = "cup [SEG0] [SEG1] [SEG2] and key [SEG1] [SEG0] [SEG2] [SEG3] [SEG4] [SEG5]";
    assert_eq!(collapse_seg(broken, SEG_N).unwrap(), broken);
    // ... and answer_text drops them (no mask goes with them), keeping complete groups.
    assert_eq!(answer_text(broken, SEG_N), "cup and key", "no complete group in order");
    assert_eq!(
        answer_text(" pink peach [SEG2] and the cup [SEG0] [SEG1] [SEG2] [SEG3] [SEG4] [SEG5] . ", SEG_N),
        "pink peach and the cup <seg>."
    );
    assert_eq!(answer_text("cup [SEG0]", 1), "cup [SEG0]", "n = 1 names only [SEG]");
    assert_eq!(answer_text("cup [SEG] [SEG]", 1), "cup <seg> <seg>");
    assert_eq!(answer_text("a <seg> [SEG3] b", SEG_N), "a <seg> b");
    // Ambiguous inputs and n = 0 are errors, not guesses.
    assert!(expand_seg("cup [SEG3] <seg>", SEG_N).is_err());
    assert!(collapse_seg("cup <seg>", SEG_N).is_err());
    assert!(expand_seg("cup <seg>", 0).is_err());
    assert!(collapse_seg("cup", 0).is_err());
}

#[test]
fn seg_group_positions_on_good_sequences() {
    let (t, toks) = tiny_pixellm();
    for (q, a) in samples().iter().take(40) {
        let conv = t.pixellm_conversation(q, &expand_seg(a, SEG_N).unwrap());
        let ids = t.encode(&conv, true).unwrap();
        let groups = seg_group_positions(&ids, toks).unwrap();
        assert_eq!(groups.len(), a.matches(SEG_TOKEN).count(), "{conv}");
        for g in &groups {
            let got: Vec<u32> = g.iter().map(|&p| ids[p]).collect();
            assert_eq!(got, toks.seg);
            // Members are separated by the " " token.
            for w in g.windows(2) {
                assert_eq!(w[1] - w[0], 2);
                assert_eq!(ids[w[0] + 1], toks.seg_sep[0]);
            }
        }
    }
    // Glued members (no separator) are a valid group too.
    let ids = t.encode("cup [SEG0][SEG1][SEG2][SEG3][SEG4][SEG5].", false).unwrap();
    let g = seg_group_positions(&ids, toks).unwrap();
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>(), vec![1; 5]);
    // No seg tokens: no groups.
    assert!(seg_group_positions(&t.encode("a cup", false).unwrap(), toks).unwrap().is_empty());
}

#[test]
fn seg_group_positions_reports_malformed_groups() {
    let (t, toks) = tiny_pixellm();
    let enc = |s: &str| t.encode(s, false).unwrap();
    let pos_of = |ids: &[u32], id: u32, nth: usize| {
        ids.iter().enumerate().filter(|(_, &x)| x == id).nth(nth).map(|(i, _)| i).unwrap()
    };
    let good = "[SEG0] [SEG1] [SEG2] [SEG3] [SEG4] [SEG5]";

    // Truncated at the end of the sequence.
    let ids = enc(&format!("cup {good} and key [SEG0] [SEG1] [SEG2]"));
    let scan = seg_groups(&ids, toks);
    assert_eq!(scan.groups.len(), 1);
    assert_eq!(scan.issues, vec![SegGroupIssue::Incomplete { start: pos_of(&ids, toks.seg[0], 1), found: 3 }]);
    let e = seg_group_positions(&ids, toks).unwrap_err();
    assert!(matches!(e, TokenizerError::SegGroups(_)), "{e}");
    assert!(e.to_string().contains("incomplete group"), "{e}");

    // A member missing in the middle: the group breaks at the out-of-order member, which
    // is then a stray.
    let ids = enc("cup [SEG0] [SEG1] [SEG3] [SEG4] [SEG5] and key");
    let scan = seg_groups(&ids, toks);
    assert!(scan.groups.is_empty());
    assert_eq!(
        scan.issues,
        vec![
            SegGroupIssue::Incomplete { start: pos_of(&ids, toks.seg[0], 0), found: 2 },
            SegGroupIssue::Stray { position: pos_of(&ids, toks.seg[3], 0), member: 3 },
            SegGroupIssue::Stray { position: pos_of(&ids, toks.seg[4], 0), member: 4 },
            SegGroupIssue::Stray { position: pos_of(&ids, toks.seg[5], 0), member: 5 },
        ]
    );

    // Two members swapped.
    let ids = enc("cup [SEG0] [SEG2] [SEG1] [SEG3] [SEG4] [SEG5]");
    let scan = seg_groups(&ids, toks);
    assert!(scan.groups.is_empty());
    // The group breaks at [SEG2]; every later member is then a stray.
    assert_eq!(scan.issues.len(), 6, "{:?}", scan.issues);
    assert_eq!(scan.issues[0], SegGroupIssue::Incomplete { start: pos_of(&ids, toks.seg[0], 0), found: 1 });

    // A word between members splits the group (PixelLM would silently take it).
    let ids = enc("cup [SEG0] [SEG1] [SEG2] and [SEG3] [SEG4] [SEG5]");
    let scan = seg_groups(&ids, toks);
    assert!(scan.groups.is_empty());
    assert_eq!(scan.issues.len(), 4);

    // A new group starting before the previous one finished: the second one still counts.
    let ids = enc(&format!("cup [SEG0] [SEG1] {good}"));
    let scan = seg_groups(&ids, toks);
    assert_eq!(scan.groups.len(), 1);
    assert_eq!(scan.groups[0][0], pos_of(&ids, toks.seg[0], 1));
    assert_eq!(scan.issues, vec![SegGroupIssue::Incomplete { start: pos_of(&ids, toks.seg[0], 0), found: 2 }]);

    // Two separators between members are not PixelLM's form.
    let ids = enc("cup [SEG0]  [SEG1] [SEG2] [SEG3] [SEG4] [SEG5]");
    assert!(seg_group_positions(&ids, toks).is_err());
}
