//! `popen`: the command-line front end. Each subcommand parses its arguments and calls a
//! library stage; see `popen <command> --help`.

mod backend;
mod cli_compat;
mod cluster_cmd;
mod eval_cmd;
mod model_cmd;
mod prefs_cmd;
mod report_cmd;
mod sam_cmd;
mod train_cmd;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use popen_core::shard::{Sample, ShardReader};
use popen_core::shardspec::ShardSpec;
use std::path::PathBuf;

/// `popen --version`: the package version and the git commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("POPEN_GIT_COMMIT"), ")");

#[derive(Parser)]
#[command(
    name = "popen",
    version = VERSION,
    about = "POPEN: preference-based optimization and ensemble for LVLM reasoning segmentation",
    long_about = "POPEN: preference-based optimization and ensemble for LVLM reasoning segmentation.\n\n\
Stages exchange Parquet shards on disk; each writes its shards plus a manifest.json.\n\
Logging goes to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate the embedded synthetic reasoning-segmentation benchmark (train/val/test shards,
    /// lexicon.json, manifest.json). Same seed, same bytes.
    Synth(SynthArgs),
    /// Import a MUSE JSON file (PixelLM's format) into sample shards; bad records are
    /// skipped and listed in the manifest.
    ImportMuse(ImportMuseArgs),
    /// Print a model preset as TOML (tiny, pixellm-7b, pixellm-13b): the files under
    /// pipelines/model-*.toml.
    ModelConfig(model_cmd::ModelConfigArgs),
    /// Learn the tiny model's byte-level BPE tokenizer from the benchmark's train texts and
    /// add PixelLM's tokens (<im_start>, <im_end>, [SEG0]..).
    TokenizerTiny(model_cmd::TokenizerTinyArgs),
    /// Create a model folder with random weights from a config and a tokenizer.
    ModelInit(model_cmd::ModelInitArgs),
    /// Convert a released checkpoint (PixelLM, LLaVA, HF LLaVA; safetensors, sharded or
    /// not) into a model folder. Missing, unexpected or mis-shaped tensors are errors.
    ModelImport(model_cmd::ModelImportArgs),
    /// Supervised finetuning (PixelLM's recipe: text CE + mask BCE + DICE) of a model folder
    /// on a samples shard; resumable, checkpoints written atomically.
    Sft(train_cmd::SftArgs),
    /// Text preference data P_t: the model's answer y, a corrector's y_c (offline: from the
    /// ground truth), RLHF-V token diffs and the reference model's per-token log-probs.
    CollectPt(prefs_cmd::CollectPtArgs),
    /// Segmentation preference data P_s (Algorithm 1): noise-filled copies of each image,
    /// teacher-forced masks ranked by Eq. 1 / boundary IoU, curriculum selection (--phase 1|2).
    CollectPs(prefs_cmd::CollectPsArgs),
    /// Class-agnostic object proposals with SAM's automatic mask generator (MobileSAM by
    /// default; SAM ViT-B/L/H checkpoints too), one `proposal/1` record per image: for
    /// collect-ps --proposals and the localization-error metric. Sharded and resumable.
    SamMasks(sam_cmd::SamMasksArgs),
    /// Preference optimization (POPEN stage 2): text DPO on P_t (Eqs. 2-3), the segmentation
    /// preference loss on P_s (Eq. 4, curriculum phase 1 then 2) and the mask loss; resumable.
    #[command(long_about = train_cmd::DPO_LONG_ABOUT)]
    Dpo(train_cmd::DpoArgs),
    /// Ensemble training (POPEN stage 3): p_hat and the seg-feedback projection train on
    /// L_ti + L_si over K sampled answers and the refined answer/masks (after the tiny
    /// preset's supervised warm-up, `adapt_steps`); resumable.
    #[command(long_about = train_cmd::ENSEMBLE_LONG_ABOUT)]
    EnsembleTrain(train_cmd::EnsembleTrainArgs),
    /// Greedy answers and masks for every sample of a shard, written as a predictions shard
    /// (`--ensemble K`: POPEN's ensemble, the refined answers and masks).
    Predict(train_cmd::PredictArgs),
    /// Score a predictions shard against its samples shard: gIoU, cIoU, CHAIR, boundary IoU,
    /// localization error; JSON + Markdown report and overlays of the best and worst samples.
    Eval(eval_cmd::EvalArgs),
    /// One self-contained HTML page of one or more run folders (seeds): the results table
    /// (mean ± std), training curves, best/worst overlays, gIoU per template and provenance.
    Report(report_cmd::ReportArgs),
    /// Answer an instruction about an image: text with one mask per object (JSON), and an
    /// overlay PNG with --out.
    Infer(model_cmd::InferArgs),
    /// Per-token log-probabilities of a given answer (teacher forcing), as JSON.
    Score(model_cmd::ScoreArgs),
    /// Write a model folder back in PixelLM's or transformers' LLaVA layout (config.json,
    /// safetensors with their names, tokenizer files), for use outside popen.
    #[command(long_about = model_cmd::MODEL_EXPORT_LONG_ABOUT)]
    ModelExport(model_cmd::ModelExportArgs),
    /// Render one sample (image, masks as a coloured overlay, instruction and answer) to PNG.
    Show(ShowArgs),
    /// Print a shard's kind, row count and a few records.
    Inspect(InspectArgs),
    /// Check that every task of a job array wrote its shard and manifest and merge them into
    /// the stage output (records in input order: the single-process file) and its manifest.
    Merge(cluster_cmd::MergeArgs),
    /// Run the pipeline on a Slurm cluster (pipelines/cluster.toml, pipelines/slurm/).
    #[command(subcommand)]
    Cluster(cluster_cmd::ClusterCommand),
    /// Check a compute backend: a matmul against a CPU reference, and its throughput.
    Device(DeviceArgs),
    /// Time a LLaMA's prefill and greedy decoding with the KV cache (ms per token; the
    /// workload of tools/reference/bench_decode.py, compared by `make bench-cpu`).
    BenchDecode(model_cmd::BenchDecodeArgs),
    /// Print a shell completion script (bash: `popen completions bash >
    /// ~/.local/share/bash-completion/completions/popen`; zsh: `_popen` in a folder of
    /// $fpath; fish: ~/.config/fish/completions/popen.fish).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Output folder (shards, lexicon.json, manifest.json).
    #[arg(long, default_value = "data/synth")]
    out: PathBuf,
    /// Benchmark config (TOML); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Number of training samples.
    #[arg(long, value_name = "N")]
    train_samples: Option<usize>,
    /// Number of validation samples.
    #[arg(long, value_name = "N")]
    val_samples: Option<usize>,
    /// Number of test samples (category-colour combinations held out from train/val).
    #[arg(long, value_name = "N")]
    test_samples: Option<usize>,
    /// Image side in pixels (square images).
    #[arg(long)]
    size: Option<u32>,
    /// This task's part of the work, I/N with 0 <= I < N (cluster job arrays).
    #[arg(long, default_value = "0/1")]
    shard: ShardSpec,
    /// Print the effective config as TOML and exit (a starting point for --config).
    #[arg(long)]
    print_config: bool,
}

#[derive(clap::Args)]
struct ImportMuseArgs {
    /// MUSE JSON file (e.g. muse_val.json).
    #[arg(long)]
    json: PathBuf,
    /// Folder with the images (file_name, or the basename of coco_url, optionally under
    /// train2017/, val2017/ or train2014/).
    #[arg(long)]
    images: PathBuf,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Split name stored in each sample (default: from the file name, e.g. muse_val -> val).
    #[arg(long)]
    split: Option<String>,
    /// This task's part of the records, I/N.
    #[arg(long, default_value = "0/1")]
    shard: ShardSpec,
}

#[derive(clap::Args)]
struct ShowArgs {
    /// Samples shard (.parquet).
    #[arg(long)]
    samples: PathBuf,
    /// Sample id; default: the first sample (or --index).
    #[arg(long)]
    id: Option<String>,
    /// Row index, when no --id is given.
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// Output PNG.
    #[arg(long)]
    out: PathBuf,
    /// Upscaling factor of the image.
    #[arg(long, default_value_t = 4)]
    scale: u32,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// A shard of any kind (.parquet): samples, predictions, text or segmentation
    /// preferences, SAM proposals; its kind is read from the file.
    shard: PathBuf,
    /// How many records to print.
    #[arg(long, default_value_t = 3)]
    head: usize,
}

#[derive(clap::Args)]
struct DeviceArgs {
    /// Backend: flex (CPU), ndarray (CPU), or cuda in builds with the `cuda` feature.
    #[arg(long, default_value = "flex", value_parser = crate::backend::BACKENDS)]
    backend: String,
    /// Matrix side for the throughput measurement.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Matmuls to time.
    #[arg(long, default_value_t = 5)]
    iters: usize,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(popen_core::progress::interactive())
        .init();
    let (args, deprecated) = cli_compat::rewrite(std::env::args_os().collect());
    for note in deprecated {
        eprintln!("warning: {note}");
    }
    let cli = Cli::parse_from(args);
    if let Err(e) = run(cli) {
        eprintln!("error: {}", error_text(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, each cause once: a cause whose text the message already holds
/// (errors that format their source into their own message) is not repeated.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !text.contains(&m) {
            text.push_str(": ");
            text.push_str(&m);
        }
        cause = c.source();
    }
    text
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Synth(a) => synth(a),
        Command::ImportMuse(a) => import_muse(a),
        Command::Show(a) => show(a),
        Command::Inspect(a) => inspect(a),
        Command::ModelConfig(a) => model_cmd::model_config(a),
        Command::TokenizerTiny(a) => model_cmd::tokenizer_tiny(a),
        Command::ModelInit(a) => model_cmd::model_init(a),
        Command::ModelImport(a) => model_cmd::model_import(a),
        Command::ModelExport(a) => model_cmd::model_export(a),
        Command::Infer(a) => model_cmd::infer(a),
        Command::Score(a) => model_cmd::score(a),
        Command::BenchDecode(a) => model_cmd::bench_decode(a),
        Command::Sft(a) => train_cmd::sft(a),
        Command::Dpo(a) => train_cmd::dpo(a),
        Command::EnsembleTrain(a) => train_cmd::ensemble_train(a),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "popen", &mut std::io::stdout());
            Ok(())
        }
        Command::Predict(a) => train_cmd::predict(a),
        Command::Eval(a) => eval_cmd::eval(a),
        Command::Report(a) => report_cmd::report(a),
        Command::CollectPs(a) => prefs_cmd::collect_ps(a),
        Command::SamMasks(a) => sam_cmd::sam_masks(a),
        Command::CollectPt(a) => prefs_cmd::collect_pt(a),
        Command::Merge(a) => cluster_cmd::merge(a),
        Command::Cluster(c) => cluster_cmd::cluster(c),
        Command::Device(a) => {
            let r = backend::check(&a.backend, a.size, a.iters)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
    }
}

fn synth(a: SynthArgs) -> Result<()> {
    let mut cfg: popen_data::synth::SynthConfig = prefs_cmd::read_toml(a.config.as_deref())?;
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.train_samples {
        cfg.train = v;
    }
    if let Some(v) = a.val_samples {
        cfg.val = v;
    }
    if let Some(v) = a.test_samples {
        cfg.test = v;
    }
    if let Some(v) = a.size {
        cfg.width = v;
        cfg.height = v;
    }
    if a.print_config {
        print!("{}", popen_core::config_text::config_toml(&cfg)?);
        return Ok(());
    }
    // The whole benchmark locks the folder; a task of a job array locks its own part.
    let claim = if a.shard.is_all() {
        a.out.clone()
    } else {
        PathBuf::from(format!("{}{}", a.out.display(), a.shard.suffix()))
    };
    let _lock = popen_core::guard::claim_output(&claim, &[])?;
    let m = popen_data::synth::generate(&cfg, &a.out, a.shard)?;
    println!("{}", serde_json::to_string_pretty(&m.counts)?);
    Ok(())
}

fn import_muse(a: ImportMuseArgs) -> Result<()> {
    let split = a.split.unwrap_or_else(|| {
        let stem = a.json.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        stem.strip_prefix("muse_").unwrap_or(&stem).to_string()
    });
    let claim = if a.shard.is_all() {
        a.out.clone()
    } else {
        PathBuf::from(format!("{}{}", a.out.display(), a.shard.suffix()))
    };
    let _lock = popen_core::guard::claim_output(&claim, &[("--json", &a.json), ("--images", &a.images)])?;
    let cfg = popen_data::muse::MuseImportConfig { json: a.json, images: a.images, split };
    let r = popen_data::muse::import(&cfg, &a.out, a.shard)?;
    println!(
        "{} samples -> {}, {} skipped (reasons in {})",
        r.manifest.counts.get("samples").copied().unwrap_or(0),
        r.shard_path.display(),
        r.manifest.skipped.len(),
        r.manifest_path.display()
    );
    Ok(())
}

fn show(a: ShowArgs) -> Result<()> {
    let mut found = None;
    let mut row = 0usize;
    'outer: for batch in ShardReader::<Sample>::open(&a.samples)? {
        for s in batch? {
            let hit = match &a.id {
                Some(id) => &s.id == id,
                None => row == a.index,
            };
            if hit {
                found = Some(s);
                break 'outer;
            }
            row += 1;
        }
    }
    let Some(sample) = found else {
        match &a.id {
            Some(id) => bail!("{}: no sample with id '{id}'", a.samples.display()),
            None => bail!("{}: has {row} rows, no row {}", a.samples.display(), a.index),
        }
    };
    popen_core::guard::refuse_overlap(&a.out, &[("--samples", &a.samples)])?;
    let img = popen_data::render::overlay(&sample, a.scale)?;
    let png = popen_core::imageio::encode_png(&img)?;
    popen_core::shard::atomic_write(&a.out, &png)?;
    println!("{} -> {}", sample.id, a.out.display());
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    use popen_core::shard::{read_kind, Prediction, ProposalSet, Record, SegPref, TextPref};
    fn show<T: Record>(a: &InspectArgs, line: impl Fn(&T) -> String) -> Result<()> {
        let reader = ShardReader::<T>::open(&a.shard)?;
        println!("{}: {} rows of {}", a.shard.display(), reader.num_rows(), T::KIND);
        let mut shown = 0;
        for batch in reader {
            for r in batch? {
                if shown == a.head {
                    return Ok(());
                }
                println!("- {}", line(&r));
                shown += 1;
            }
        }
        Ok(())
    }
    let kind = read_kind(&a.shard)?.unwrap_or_else(|| Sample::KIND.to_string());
    match kind.as_str() {
        k if k == Sample::KIND => show(&a, |s: &Sample| {
            format!(
                "{} [{}] {}x{} | {} | {} | targets {:?} | {} instances",
                s.id,
                s.split,
                s.width,
                s.height,
                s.instruction,
                s.answer,
                s.target_names,
                s.instance_names.len()
            )
        }),
        k if k == Prediction::KIND => show(&a, |p: &Prediction| {
            format!(
                "{} [{}] {}x{} | {} | {} masks, scores {:?}",
                p.id,
                p.split,
                p.width,
                p.height,
                p.answer,
                p.masks.len(),
                p.mask_scores
            )
        }),
        k if k == TextPref::KIND => show(&a, |t: &TextPref| {
            format!("{} [{}] {}x{} | {} | y: {} | y_c: {}", t.id, t.split, t.width, t.height, t.instruction, t.y, t.y_c)
        }),
        k if k == SegPref::KIND => show(&a, |t: &SegPref| {
            format!(
                "{} [{}] {}x{} | {} | {} | phase {} draw {} | {} noisy images",
                t.id,
                t.split,
                t.width,
                t.height,
                t.instruction,
                t.answer,
                t.phase,
                t.draw,
                t.noise_seed.len()
            )
        }),
        k if k == ProposalSet::KIND => show(&a, |p: &ProposalSet| {
            format!("{} {}x{} | {} masks, scores {:?}", p.id, p.width, p.height, p.masks.len(), p.scores)
        }),
        other => bail!("{}: holds '{other}' records, which inspect does not know", a.shard.display()),
    }
}
