//! End-to-end tests of the `popen` binary: the commands a user types.

use std::path::Path;

mod common;
#[allow(unused_imports)]
use common::{err, ok, popen};

fn synth(out: &Path, seed: &str, shard: &str) {
    let o = out.to_str().unwrap();
    ok(&[
        "synth",
        "--out",
        o,
        "--seed",
        seed,
        "--train-samples",
        "30",
        "--val-samples",
        "8",
        "--test-samples",
        "8",
        "--shard",
        shard,
    ]);
}

#[test]
fn synth_is_deterministic_and_show_renders() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    synth(&a, "7", "0/1");
    synth(&b, "7", "0/1");
    synth(&c, "8", "0/1");
    for split in ["train", "val", "test"] {
        let f = format!("{split}.parquet");
        let (x, y, z) = (
            std::fs::read(a.join(&f)).unwrap(),
            std::fs::read(b.join(&f)).unwrap(),
            std::fs::read(c.join(&f)).unwrap(),
        );
        assert_eq!(x, y, "{split}: same seed, different bytes");
        assert_ne!(x, z, "{split}: different seeds, same bytes");
    }
    assert!(a.join("lexicon.json").is_file() && a.join("manifest.json").is_file());

    let png = dir.path().join("x.png");
    let val = a.join("val.parquet");
    let out = ok(&["show", "--samples", val.to_str().unwrap(), "--index", "2", "--out", png.to_str().unwrap()]);
    assert!(out.contains("->"));
    let img = image::open(&png).unwrap();
    assert!(img.width() >= 96 * 4 && img.height() > 96 * 4, "{}x{}", img.width(), img.height());

    let listing = ok(&["inspect", val.to_str().unwrap(), "--head", "2"]);
    assert!(listing.contains("8 rows of sample/1"), "{listing}");

    let e = err(&["show", "--samples", val.to_str().unwrap(), "--id", "nope", "--out", png.to_str().unwrap()]);
    assert!(e.contains("no sample with id 'nope'"), "{e}");
    let e = err(&[
        "show",
        "--samples",
        dir.path().join("missing.parquet").to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(e.contains("missing.parquet"), "{e}");
}

#[test]
fn sharded_synth_covers_the_unsharded_run() {
    use popen_core::shard::{read_shard, Sample};
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let parts = dir.path().join("parts");
    synth(&whole, "5", "0/1");
    for i in 0..3 {
        synth(&parts, "5", &format!("{i}/3"));
    }
    for split in ["train", "val", "test"] {
        let mut want: Vec<Sample> = read_shard(whole.join(format!("{split}.parquet"))).unwrap();
        let mut got: Vec<Sample> = (0..3)
            .flat_map(|i| read_shard::<Sample>(parts.join(format!("{split}-{i:05}-of-00003.parquet"))).unwrap())
            .collect();
        want.sort_by(|a, b| a.id.cmp(&b.id));
        got.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(got, want, "{split}");
    }
    let e = err(&["synth", "--out", parts.to_str().unwrap(), "--shard", "3/3"]);
    assert!(e.contains("0 <= I < N"), "{e}");
}

#[test]
fn device_check_on_cpu() {
    let out = ok(&["device", "--backend", "ndarray", "--size", "64", "--iters", "2"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["max_abs_err"].as_f64().unwrap() < 1e-3, "{v}");
    assert!(v["gflops"].as_f64().unwrap() > 0.0);
    // An unknown backend is refused naming the choices; cuda in a build without it is
    // refused at run time.
    let e = err(&["device", "--backend", "tpu"]);
    assert!(e.contains("tpu") && e.contains("possible values: flex, ndarray, cuda"), "{e}");
    if !cfg!(feature = "cuda") {
        let e = err(&["device", "--backend", "cuda"]);
        assert!(e.contains("not available"), "{e}");
    }
}

#[test]
fn help_explains_every_command() {
    let h = ok(&["--help"]);
    for cmd in [
        "synth",
        "import-muse",
        "show",
        "inspect",
        "device",
        "model-config",
        "tokenizer-tiny",
        "model-init",
        "model-import",
        "model-export",
        "infer",
        "score",
        "sft",
        "dpo",
        "predict",
        "eval",
    ] {
        assert!(h.contains(cmd), "{h}");
    }
    let h = ok(&["synth", "--help"]);
    assert!(h.contains("--shard") && h.contains("--seed"), "{h}");
    // Enumerated choices are listed; --version names the commit; completion scripts.
    let h = ok(&["predict", "--help"]);
    assert!(h.contains("possible values: flex, ndarray, cuda"), "{h}");
    let h = ok(&["model-import", "--help"]);
    assert!(h.contains("possible values: pixellm, llava, llava-hf, native"), "{h}");
    let e = err(&["predict", "--backend", "gpu", "--model", "m", "--samples", "s", "--out", "o"]);
    assert!(e.contains("gpu") && e.contains("flex"), "{e}");
    // --print-config alone, without the stage's inputs.
    assert!(ok(&["collect-pt", "--print-config"]).contains("max_new_tokens = "));
    assert!(ok(&["collect-ps", "--print-config"]).contains("max_samples = "));
    let v = ok(&["--version"]);
    assert!(v.starts_with("popen ") && v.contains("(git "), "{v}");
    for (shell, mark) in [("bash", "_popen()"), ("zsh", "#compdef popen"), ("fish", "complete -c popen")] {
        let c = ok(&["completions", shell]);
        assert!(c.contains(mark) && c.contains("ensemble-train"), "{shell}: {}", &c[..c.len().min(200)]);
    }
    // One grammar: every stage that reads a model folder says --model, a samples shard
    // --samples; --shard is always I/N. The old spellings are hidden from --help but still
    // work, with one deprecation line each.
    for cmd in ["sft", "dpo", "ensemble-train", "predict", "collect-pt", "collect-ps", "infer", "model-export"] {
        let h = ok(&[cmd, "--help"]);
        assert!(h.contains("--model <MODEL>") && !h.contains("--init"), "{cmd}: {h}");
    }
    for cmd in ["sft", "ensemble-train", "predict", "eval", "collect-pt", "collect-ps", "sam-masks", "show"] {
        let h = ok(&[cmd, "--help"]);
        assert!(h.contains("--samples <SAMPLES>") && !h.contains("--train "), "{cmd}: {h}");
    }
    for cmd in ["synth", "import-muse", "predict", "collect-pt", "collect-ps", "sam-masks"] {
        assert!(ok(&[cmd, "--help"]).contains("--shard <SHARD>"), "{cmd}");
    }
    assert!(!ok(&["show", "--help"]).contains("--shard"));
    let o = common::popen(&["sft", "--init", "m", "--train", "t.parquet", "--max-steps", "7", "--print-config"]);
    let (out, e) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && out.contains("max_steps = 7"), "{out}{e}");
    assert!(e.contains("--init is deprecated") && e.contains("use --model") && e.contains("use --samples"), "{e}");
    let e = err(&["sam-masks", "--model", "vit_x", "--samples", "s.parquet", "--out", "o.parquet"]);
    assert!(e.contains("use --sam-model") && e.contains("vit_x") && e.contains("mobile_sam"), "{e}");
}

#[test]
fn pipeline_config_names_every_synth_knob_with_its_default() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/synth.toml");
    let from_file = ok(&["synth", "--config", cfg.to_str().unwrap(), "--print-config"]);
    let defaults = ok(&["synth", "--print-config"]);
    // One knob differs on purpose: the demo's benchmark asks 3 questions per image (the
    // tiny-sam model's frozen encoder then runs once per image); the default stays 1.
    assert!(from_file.contains("questions_per_image = 3\n") && defaults.contains("questions_per_image = 1\n"));
    assert_eq!(from_file.replace("questions_per_image = 3\n", "questions_per_image = 1\n"), defaults);
    // Every key of the effective config is written out in the file.
    let text = std::fs::read_to_string(&cfg).unwrap();
    for line in defaults.lines().filter(|l| l.contains(" = ")) {
        let key = line.split(" = ").next().unwrap();
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(&format!("{key} "))),
            "{key} missing from {}",
            cfg.display()
        );
    }
}

/// The model path a user walks first: tokenizer from the benchmark, a random tiny model,
/// `infer` (generation, and `--answer` segmentation with an overlay PNG), `score`.
#[test]
fn tiny_model_infer_and_score() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth(&data, "5", "0/1");
    let tok = dir.path().join("tok/tokenizer.json");
    let model = dir.path().join("model");
    ok(&["tokenizer-tiny", "--data", data.to_str().unwrap(), "--out", tok.to_str().unwrap(), "--vocab-size", "400"]);
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/model-tiny.toml");
    ok(&[
        "model-init",
        "--config",
        cfg.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    let img = dir.path().join("img.png");
    image::RgbImage::from_fn(90, 60, |x, y| image::Rgb([(x * 2) as u8, (y * 3) as u8, 90])).save(&img).unwrap();
    let (m, i) = (model.to_str().unwrap(), img.to_str().unwrap());

    let out =
        ok(&["infer", "--model", m, "--image", i, "--instruction", "Find the red ball.", "--max-new-tokens", "5"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["token_logprobs"].as_array().unwrap().len(), 5, "{out}");

    let out_dir = dir.path().join("pred");
    let out = ok(&[
        "infer",
        "--model",
        m,
        "--image",
        i,
        "--instruction",
        "Find the balls.",
        "--answer",
        "the red ball <seg> and the blue ball <seg>.",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let masks = v["masks"].as_array().unwrap();
    assert_eq!(masks.len(), 2, "{out}");
    assert_eq!((masks[0]["height"].as_u64(), masks[0]["width"].as_u64()), (Some(60), Some(90)));
    let png = image::open(out_dir.join("overlay.png")).unwrap();
    assert_eq!((png.width(), png.height()), (90, 60));

    let out =
        ok(&["score", "--model", m, "--image", i, "--instruction", "Find the ball.", "--answer", "the ball <seg>."]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let toks = v["tokens"].as_array().unwrap();
    assert!(toks.len() >= 8 && toks.iter().all(|t| t["logprob"].as_f64().unwrap() < 0.0), "{out}");

    // model-import of our own weights (native layout) gives the same model.
    let again = dir.path().join("again");
    ok(&[
        "model-import",
        "--checkpoint",
        model.join("model.safetensors").to_str().unwrap(),
        "--layout",
        "native",
        "--config",
        cfg.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    let out2 = ok(&[
        "score",
        "--model",
        again.to_str().unwrap(),
        "--image",
        i,
        "--instruction",
        "Find the ball.",
        "--answer",
        "the ball <seg>.",
    ]);
    let v2: serde_json::Value = serde_json::from_str(&out2).unwrap();
    assert_eq!(v2["tokens"], v["tokens"]);
    // model-export --layout pixellm, then model-import of the export: the same scores.
    let exported = dir.path().join("exported");
    let out = ok(&["model-export", "--model", m, "--layout", "pixellm", "--out", exported.to_str().unwrap()]);
    assert!(out.contains("vision_tower/model.safetensors") && out.contains("config.json"), "{out}");
    for f in [
        "config.json",
        "model.safetensors",
        "vision_tower/config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.toml",
    ] {
        assert!(exported.join(f).is_file(), "{f}");
    }
    let back = dir.path().join("back");
    let ex = |f: &str| exported.join(f).to_str().unwrap().to_string();
    ok(&[
        "model-import",
        "--checkpoint",
        &ex(""),
        "--layout",
        "pixellm",
        "--config",
        &ex("model.toml"),
        "--tokenizer",
        &ex("tokenizer.json"),
        "--out",
        back.to_str().unwrap(),
    ]);
    let out3 = ok(&[
        "score",
        "--model",
        back.to_str().unwrap(),
        "--image",
        i,
        "--instruction",
        "Find the ball.",
        "--answer",
        "the ball <seg>.",
    ]);
    let v3: serde_json::Value = serde_json::from_str(&out3).unwrap();
    assert_eq!(v3["tokens"], v["tokens"]);
    let e = err(&["model-export", "--model", m, "--layout", "pixellm", "--out", exported.to_str().unwrap()]);
    assert!(e.contains("not empty"), "{e}");
    let e =
        err(&["model-export", "--model", m, "--layout", "llava-hf", "--out", dir.path().join("hf").to_str().unwrap()]);
    assert!(e.contains("mm_projector_hidden") || e.contains("--image-token-id"), "{e}");
    assert!(!dir.path().join("hf").exists());

    let e = err(&[
        "model-import",
        "--checkpoint",
        tok.to_str().unwrap(),
        "--layout",
        "pixellm",
        "--config",
        cfg.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(e.contains("tokenizer.json") && e.contains("safetensors"), "{e}");

    let e = err(&["infer", "--model", dir.path().to_str().unwrap(), "--image", i, "--instruction", "x"]);
    assert!(e.contains("not a popen model folder"), "{e}");
    let e =
        err(&["infer", "--model", m, "--image", dir.path().join("nope.png").to_str().unwrap(), "--instruction", "x"]);
    assert!(e.contains("nope.png"), "{e}");
}

/// The demo's stages through the binary: sft (resumable), predict, eval; and their errors.
#[test]
fn tiny_sft_predict_eval() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth(&data, "3", "0/1");
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    let tok = d("tok/tokenizer.json");
    ok(&["tokenizer-tiny", "--data", data.to_str().unwrap(), "--out", &tok, "--vocab-size", "400"]);
    let mcfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/model-tiny.toml");
    ok(&["model-init", "--config", mcfg.to_str().unwrap(), "--tokenizer", &tok, "--out", &d("init")]);
    // A small variant of pipelines/sft-tiny.toml.
    let base = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/sft-tiny.toml")).unwrap();
    let mut cfg: toml::Value = toml::from_str(&base).unwrap();
    cfg["batch_size"] = toml::Value::Integer(4);
    cfg["max_steps"] = toml::Value::Integer(3);
    cfg["checkpoint_every"] = toml::Value::Integer(2);
    cfg["log_every"] = toml::Value::Integer(1);
    std::fs::write(d("sft.toml"), toml::to_string(&cfg).unwrap()).unwrap();
    let train = data.join("train.parquet");
    let val = data.join("val.parquet");
    let args = |resume: bool| {
        let mut a = vec![
            "sft".to_string(),
            "--config".into(),
            d("sft.toml"),
            "--model".into(),
            d("init"),
            "--samples".into(),
            train.to_str().unwrap().into(),
            "--out".into(),
            d("sft"),
            "--backend".into(),
            "ndarray".into(),
        ];
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let a: Vec<String> = args(false);
    let out = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["steps"], 3, "{out}");
    for f in [
        "model/model.safetensors",
        "metrics.jsonl",
        "metrics.csv",
        "loss.png",
        "manifest.json",
        "checkpoints/step-000002/state.json",
        "checkpoints/step-000003/optimizer.bin",
    ] {
        assert!(dir.path().join("sft").join(f).is_file(), "missing sft/{f}");
    }
    // Running again without --resume is refused; with it, nothing is left to do.
    let e = err(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("--resume"), "{e}");
    let a: Vec<String> = args(true);
    let out = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("\"resumed_from\": 3"), "{out}");
    // Phase 2 of the demo's SFT (pipelines/sft-tiny-decoder.toml, shortened): only the
    // decoder trains, from the phase-1 model.
    let base =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/sft-tiny-decoder.toml")).unwrap();
    let mut cfg2: toml::Value = toml::from_str(&base).unwrap();
    cfg2["max_steps"] = toml::Value::Integer(2);
    std::fs::write(d("sft2.toml"), toml::to_string(&cfg2).unwrap()).unwrap();
    let out = ok(&[
        "sft",
        "--config",
        &d("sft2.toml"),
        "--model",
        &d("sft/model"),
        "--samples",
        train.to_str().unwrap(),
        "--out",
        &d("sft2"),
        "--backend",
        "ndarray",
    ]);
    let v2: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v2["steps"], 2, "{out}");
    let (t1, t2) = (v["trainable_params"].as_u64().unwrap(), v2["trainable_params"].as_u64().unwrap());
    assert!(t2 > 0 && t2 < t1 / 2, "phase 2 trains the decoder alone: {t2} of phase 1's {t1} parameters");
    // bf16 on a CPU backend is a clear error.
    let e = err(&[
        "sft",
        "--config",
        "pipelines/sft-pixellm-7b.toml",
        "--model",
        &d("init"),
        "--samples",
        train.to_str().unwrap(),
        "--out",
        &d("x"),
    ]);
    assert!(e.contains("bf16") && e.contains("cuda"), "{e}");

    let pred = d("pred/val.parquet");
    let pa = [
        "predict",
        "--model",
        &d("sft/model"),
        "--samples",
        val.to_str().unwrap(),
        "--out",
        &pred,
        "--max-new-tokens",
        "8",
        "--backend",
        "ndarray",
        "--sam-cache",
        &d("sam-cache"),
    ];
    let o = common::popen(&pa);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("\"predictions\": 8"), "{out}");
    // stderr is a pipe here, as in a batch job: no escape codes, progress as plain lines.
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log}");
    assert!(
        log.lines().any(|l| l.contains("predict") && l.contains("/8") && l.contains("eta")),
        "no progress line: {log}"
    );
    let out = ok(&[
        "eval",
        "--samples",
        val.to_str().unwrap(),
        "--predictions",
        &pred,
        "--lexicon",
        data.join("lexicon.json").to_str().unwrap(),
        "--out",
        &d("eval"),
    ]);
    assert!(out.contains("gIoU"), "{out}");
    // inspect reads every shard kind from the file.
    let i = ok(&["inspect", &pred, "--head", "1"]);
    assert!(i.contains("8 rows of prediction/1") && i.contains("masks, scores"), "{i}");
    let i = ok(&["inspect", val.to_str().unwrap(), "--head", "1"]);
    assert!(i.contains("rows of sample/1"), "{i}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("eval/report.json")).unwrap()).unwrap();
    assert!(report["metrics"]["ciou"].as_f64().is_some());
    // A missing model folder names its path, once; so does a missing shard.
    let e = err(&["predict", "--model", &d("nope"), "--samples", val.to_str().unwrap(), "--out", &d("p2.parquet")]);
    assert!(e.contains("nope"), "{e}");
    assert_eq!(e.matches("not a popen model folder").count(), 1, "{e}");
    let e = err(&["eval", "--samples", &d("nope.parquet"), "--predictions", &pred, "--out", &d("e2")]);
    assert!(e.contains("nope.parquet"), "{e}");
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
    // Printed configs show the values as written.
    let c = ok(&["sft", "--config", "pipelines/sft-tiny.toml", "--print-config"]);
    assert!(c.contains("beta1 = 0.9\n") && c.contains("beta2 = 0.95\n"), "{c}");
}

/// Issue 20, items 1, 5 and 6 through the binary (the hand-checked expectations are the
/// issue's): a rerun recomputes when the seed, the phase, the model or the input changes and
/// skips (saying why) when nothing did; an output that is an input is refused; a second
/// process on a held output fails at once; temp files of killed runs are cleared.
#[test]
fn reruns_recompute_what_changed_and_outputs_are_guarded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth(&data, "4", "0/1");
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    let tok = d("tok/tokenizer.json");
    ok(&["tokenizer-tiny", "--data", data.to_str().unwrap(), "--out", &tok, "--vocab-size", "400"]);
    let mcfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/model-tiny.toml");
    let init = |seed: &str| {
        ok(&[
            "model-init",
            "--config",
            mcfg.to_str().unwrap(),
            "--tokenizer",
            &tok,
            "--out",
            &d("init"),
            "--seed",
            seed,
        ])
    };
    init("0");
    let pscfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slurm/collect-ps.toml");
    let train = data.join("train.parquet");
    let out = d("prefs/ps.parquet");
    let model = d("init");
    let run = |extra: &[&str]| {
        let mut a = vec![
            "collect-ps",
            "--config",
            pscfg.to_str().unwrap(),
            "--model",
            &model,
            "--samples",
            train.to_str().unwrap(),
            "--out",
            &out,
            "--max-samples",
            "2",
            "--backend",
            "ndarray",
        ];
        a.extend_from_slice(extra);
        let o = popen(&a);
        let (so, se) =
            (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
        assert!(o.status.success(), "{a:?}:\n{so}{se}");
        let v: serde_json::Value = serde_json::from_str(&so).unwrap();
        (v["up_to_date"].as_bool().unwrap(), se)
    };
    // A temp file of a killed run (pid above Linux's pid_max) is cleared by the next run.
    std::fs::create_dir_all(d("prefs")).unwrap();
    let stale_tmp = dir.path().join("prefs/.ps.parquet.tmp-4194305-1f-0");
    std::fs::write(&stale_tmp, b"partial").unwrap();
    let (fresh, _) = run(&["--phase", "2"]);
    assert!(!fresh);
    assert!(!stale_tmp.exists(), "a dead run's temp file survived");
    let bytes = std::fs::read(&out).unwrap();
    let (fresh, why) = run(&["--phase", "2"]);
    assert!(fresh && why.contains("is complete: same definition"), "{why}");
    // Each change recomputes and says what changed.
    let (fresh, why) = run(&["--phase", "2", "--seed", "7"]);
    assert!(!fresh && why.contains("config config.seed"), "{why}");
    let (fresh, why) = run(&["--phase", "1", "--seed", "7"]);
    assert!(!fresh && why.contains("config.phase"), "{why}");
    init("1");
    let (fresh, why) = run(&["--phase", "1", "--seed", "7"]);
    assert!(!fresh && why.contains("model.safetensors changed"), "{why}");
    let (fresh, _) = run(&["--phase", "1", "--seed", "7"]);
    assert!(fresh);
    // --force recomputes even so.
    let (fresh, _) = run(&["--phase", "1", "--seed", "7", "--force"]);
    assert!(!fresh);
    // Back to the first definition: recomputed, and the same bytes as the first run.
    init("0");
    let (fresh, _) = run(&["--phase", "2"]);
    assert!(!fresh);
    assert_eq!(std::fs::read(&out).unwrap(), bytes, "same definition, same output");

    // An output that is an input is refused, and the input survives.
    let before = std::fs::read(&train).unwrap();
    let e = err(&[
        "collect-ps",
        "--config",
        pscfg.to_str().unwrap(),
        "--model",
        &d("init"),
        "--samples",
        train.to_str().unwrap(),
        "--out",
        train.to_str().unwrap(),
        "--phase",
        "2",
    ]);
    assert!(e.contains("is the input --samples"), "{e}");
    assert_eq!(std::fs::read(&train).unwrap(), before);
    let e = err(&[
        "sft",
        "--config",
        "pipelines/sft-tiny.toml",
        "--model",
        &d("init"),
        "--samples",
        train.to_str().unwrap(),
        "--out",
        &d("init"),
    ]);
    assert!(e.contains("--model"), "{e}");

    // Two processes on one output: the second fails at once naming the first; the first
    // finishes. (The first is held at its start by a lock-file watch: it runs long enough.)
    let mut a = vec![
        "collect-ps",
        "--config",
        pscfg.to_str().unwrap(),
        "--model",
        &model,
        "--samples",
        train.to_str().unwrap(),
        "--out",
        &out,
        "--max-samples",
        "4",
        "--phase",
        "2",
        "--backend",
        "ndarray",
        "--force",
    ];
    let first = std::process::Command::new(env!("CARGO_BIN_EXE_popen"))
        .args(&a)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lock = dir.path().join("prefs/ps.parquet.lock");
    let t0 = std::time::Instant::now();
    while !lock.exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    a.pop();
    let e = err(&a);
    assert!(e.contains(&format!("is being written by process {}", first.id())), "{e}");
    let o = first.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!lock.exists(), "the lock is released when the run ends");
    // Two synth runs into one folder: the second is refused while the first holds it.
    let bench = d("bench");
    let s1 = std::process::Command::new(env!("CARGO_BIN_EXE_popen"))
        .args([
            "synth",
            "--out",
            &bench,
            "--seed",
            "1",
            "--train-samples",
            "300",
            "--val-samples",
            "8",
            "--test-samples",
            "8",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let block = dir.path().join("bench.lock");
    let t0 = std::time::Instant::now();
    while !block.exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let e = err(&[
        "synth",
        "--out",
        &bench,
        "--seed",
        "2",
        "--train-samples",
        "30",
        "--val-samples",
        "8",
        "--test-samples",
        "8",
    ]);
    assert!(e.contains("is being written by process"), "{e}");
    assert!(s1.wait_with_output().unwrap().status.success());
}
