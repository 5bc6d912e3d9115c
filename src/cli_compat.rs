//! The flag spellings from before the one grammar (issue 23): still accepted, each with one
//! deprecation line on stderr, and hidden from `--help`.
//!
//! The grammar: `--model DIR` is the popen model folder a command reads (training stages start
//! from it), `--samples FILE` the samples shard it reads, `--out` what it writes, `--shard I/N`
//! this task's part of the work, `--sam-*` SAM's own settings.

use std::ffi::OsString;

/// (subcommand, old flag, new flag).
const RENAMED: &[(&str, &str, &str)] = &[
    ("sft", "--init", "--model"),
    ("sft", "--train", "--samples"),
    ("dpo", "--init", "--model"),
    ("ensemble-train", "--init", "--model"),
    ("show", "--shard", "--samples"),
    ("synth", "--train", "--train-samples"),
    ("synth", "--val", "--val-samples"),
    ("synth", "--test", "--test-samples"),
    ("model-init", "--sam", "--sam-checkpoint"),
    ("sam-masks", "--model", "--sam-model"),
    ("sam-masks", "--checkpoint", "--sam-checkpoint"),
];

/// The command line with old spellings replaced by the new ones (`--old VALUE` and
/// `--old=VALUE`; nothing after a bare `--`), and one deprecation line per old flag used.
pub fn rewrite(args: Vec<OsString>) -> (Vec<OsString>, Vec<String>) {
    let Some(sub_at) = args.iter().skip(1).position(|a| !a.to_string_lossy().starts_with('-')).map(|i| i + 1) else {
        return (args, Vec::new());
    };
    let sub = args[sub_at].to_string_lossy().into_owned();
    let mut notes = Vec::new();
    let mut out = Vec::with_capacity(args.len());
    let mut options = true;
    for (i, a) in args.into_iter().enumerate() {
        let text = a.to_string_lossy();
        if i <= sub_at || !options {
            out.push(a);
            continue;
        }
        if text == "--" {
            options = false;
            out.push(a);
            continue;
        }
        let renamed = RENAMED.iter().filter(|r| r.0 == sub).find_map(|&(_, old, new)| {
            let rest = text.strip_prefix(old)?;
            (rest.is_empty() || rest.starts_with('=')).then(|| (old, new, format!("{new}{rest}")))
        });
        match renamed {
            Some((old, new, replaced)) => {
                let note = format!("popen {sub}: {old} is deprecated and will be removed; use {new}");
                if !notes.contains(&note) {
                    notes.push(note);
                }
                out.push(OsString::from(replaced));
            }
            None => out.push(a),
        }
    }
    (out, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> (Vec<String>, Vec<String>) {
        let (a, n) = rewrite(args.iter().map(OsString::from).collect());
        (a.into_iter().map(|s| s.into_string().unwrap()).collect(), n)
    }

    #[test]
    fn old_spellings_become_new_ones_with_one_note_each() {
        let (a, n) = run(&["popen", "sft", "--init", "m", "--train=t.parquet", "--init", "m2", "--out", "o"]);
        assert_eq!(a, ["popen", "sft", "--model", "m", "--samples=t.parquet", "--model", "m2", "--out", "o"]);
        assert_eq!(
            n,
            [
                "popen sft: --init is deprecated and will be removed; use --model",
                "popen sft: --train is deprecated and will be removed; use --samples"
            ]
        );
    }

    #[test]
    fn only_the_subcommand_s_own_renames_apply() {
        // predict's --model and --samples are already the grammar; sam-masks' --model is SAM's.
        let (a, n) = run(&["popen", "predict", "--model", "m", "--samples", "s"]);
        assert_eq!(a, ["popen", "predict", "--model", "m", "--samples", "s"]);
        assert!(n.is_empty());
        let (a, _) = run(&["popen", "sam-masks", "--model", "vit_b", "--checkpoint", "c.pt"]);
        assert_eq!(a, ["popen", "sam-masks", "--sam-model", "vit_b", "--sam-checkpoint", "c.pt"]);
        // A longer flag that starts with an old one is not touched; nor is anything after `--`.
        let (a, n) = run(&["popen", "synth", "--train-samples", "3", "--test", "2", "--", "--val"]);
        assert_eq!(a, ["popen", "synth", "--train-samples", "3", "--test-samples", "2", "--", "--val"]);
        assert_eq!(n.len(), 1);
        // No subcommand: nothing to do.
        assert_eq!(run(&["popen", "--version"]).0, ["popen", "--version"]);
    }
}
