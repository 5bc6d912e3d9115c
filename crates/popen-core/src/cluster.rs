//! Submitting the pipeline to Slurm (`popen cluster submit`): a TOML names the stages (an
//! sbatch script each, the stages it waits for, job-array size or GPUs, resources) and the
//! paths; [`plan`] turns it into sbatch calls chained with `--dependency=afterok`, skipping
//! disabled stages and those whose `done` marker exists, and [`submit`] runs them. Stages
//! with a Parquet `output` are always submitted; their tasks skip themselves when their
//! output is complete for the same definition (see `popen_core::manifest::Definition`).
//!
//! A record-by-record stage (`array = N`) becomes an N-task job array (each task takes its
//! `--shard I/N` from SLURM_ARRAY_TASK_ID/COUNT, `--requeue` so a pre-empted task reruns and
//! resumes) plus a `<name>-merge` job (pipelines/slurm/merge.sbatch: `popen merge`) that
//! checks every shard and writes the stage output and manifest; later stages wait for the
//! merge. A training stage (`gpus = G`) is one job on one node with G GPUs.
//!
//! Every job gets the `[env]` table (a variable set in the submitting environment wins)
//! plus STAGE_NAME, STAGE_OUT (`output`), STAGE_SAMPLES (`samples`), STAGE_TASKS (`array`).

use crate::error::{CoreError, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The cluster TOML (pipelines/cluster.toml documents every field).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    #[serde(default)]
    pub slurm: SlurmDefaults,
    /// Paths and settings exported to every job (POPEN, DATA, OUT, ...); `{NAME}` in the
    /// stage fields below expands to them.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, rename = "stage")]
    pub stages: Vec<StageConfig>,
}

/// Resources every job gets unless its stage overrides them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmDefaults {
    /// The sbatch command.
    pub sbatch: String,
    /// Partition of CPU jobs (none: the cluster's default).
    pub partition: Option<String>,
    /// Partition of GPU jobs (none: `partition`).
    pub gpu_partition: Option<String>,
    pub account: Option<String>,
    /// Wall-clock limit of a job (an array task).
    pub time: String,
    pub cpus_per_task: u32,
    /// Memory per node, e.g. "16G" (none: the cluster's default).
    pub mem: Option<String>,
    /// Job logs: `<log_dir>/<stage>-<jobid>[_<task>].out`, appended across requeues.
    pub log_dir: String,
    /// Time limit of the merge jobs.
    pub merge_time: String,
    /// Further sbatch flags for every job (e.g. "--qos=normal").
    pub extra: Vec<String>,
}

impl Default for SlurmDefaults {
    fn default() -> Self {
        SlurmDefaults {
            sbatch: "sbatch".into(),
            partition: None,
            gpu_partition: None,
            account: None,
            time: "04:00:00".into(),
            cpus_per_task: 4,
            mem: None,
            log_dir: "{OUT}/logs".into(),
            merge_time: "00:30:00".into(),
            extra: Vec::new(),
        }
    }
}

/// One pipeline stage.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    /// The sbatch script (pipelines/slurm/<stage>.sbatch).
    pub script: String,
    /// Stages this one waits for (afterok); a disabled or complete one is not waited for.
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Job-array tasks of a record-by-record stage (merged afterwards); none: one job.
    pub array: Option<u32>,
    /// GPUs of the node for a training stage (one job, one node).
    pub gpus: Option<u32>,
    /// The stage's Parquet output (sharded stages: the merged file). The stage is always
    /// submitted: its tasks skip an output that is complete for the same definition.
    pub output: Option<String>,
    /// Samples shard a sharded stage reads: the record order of the merge.
    pub samples: Option<String>,
    /// A file whose existence marks a stage without Parquet output as complete.
    pub done: Option<String>,
    pub partition: Option<String>,
    pub time: Option<String>,
    pub cpus_per_task: Option<u32>,
    pub mem: Option<String>,
    /// Extra variables for this stage's job(s).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// One sbatch call of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// Stage name (`<stage>-merge` for a merge job).
    pub name: String,
    /// sbatch arguments without the dependency (the script last).
    pub args: Vec<String>,
    /// Environment of the sbatch call (exported to the job).
    pub env: BTreeMap<String, String>,
    /// Jobs of this plan it waits for (afterok).
    pub after: Vec<String>,
}

/// A stage the plan leaves out, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

/// `{NAME}` -> `vars[NAME]`; an unknown name is an error naming the field.
pub fn expand(s: &str, vars: &BTreeMap<String, String>, field: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('}') else {
            return Err(CoreError::Invalid(format!("{field}: unclosed '{{' in '{s}'")));
        };
        let name = &rest[i + 1..i + j];
        let v = vars
            .get(name)
            .ok_or_else(|| CoreError::Invalid(format!("{field}: '{{{name}}}' in '{s}' is not a variable of [env]")))?;
        out.push_str(v);
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl ClusterConfig {
    /// The `[env]` table with the submitting environment's values winning (`getenv`).
    pub fn vars(&self, getenv: impl Fn(&str) -> Option<String>) -> BTreeMap<String, String> {
        self.env.iter().map(|(k, v)| (k.clone(), getenv(k).unwrap_or_else(|| v.clone()))).collect()
    }

    fn validate(&self) -> Result<()> {
        let mut seen = HashMap::new();
        for (i, s) in self.stages.iter().enumerate() {
            if seen.insert(s.name.as_str(), i).is_some() {
                return Err(CoreError::Invalid(format!("stage '{}' is defined twice", s.name)));
            }
            for a in &s.after {
                if !seen.contains_key(a.as_str()) || a == &s.name {
                    return Err(CoreError::Invalid(format!(
                        "stage '{}': after = '{a}' must name a stage listed before it",
                        s.name
                    )));
                }
            }
            if s.array == Some(0) {
                return Err(CoreError::Invalid(format!("stage '{}': array must be >= 1", s.name)));
            }
            if s.array.is_some() && (s.output.is_none() || s.samples.is_none()) {
                return Err(CoreError::Invalid(format!(
                    "stage '{}': a job array needs `output` (merged file) and `samples` (record order)",
                    s.name
                )));
            }
            if s.array.is_some() && s.gpus.is_some_and(|g| g > 1) {
                return Err(CoreError::Invalid(format!(
                    "stage '{}': array tasks take one GPU each (gpus = 1) or none",
                    s.name
                )));
            }
        }
        Ok(())
    }
}

/// The sbatch calls for `cfg` in submission order, and the stages left out. `vars` = the
/// expanded `[env]` ([`ClusterConfig::vars`]); paths are relative to the submit folder.
pub fn plan(cfg: &ClusterConfig, vars: &BTreeMap<String, String>) -> Result<(Vec<Job>, Vec<Skipped>)> {
    cfg.validate()?;
    let d = &cfg.slurm;
    let log_dir = expand(&d.log_dir, vars, "slurm.log_dir")?;
    let mut jobs = Vec::new();
    let mut skipped = Vec::new();
    // The job a later stage waits for, per stage name (None: nothing to wait for).
    let mut waits_for: HashMap<String, Option<String>> = HashMap::new();
    for s in &cfg.stages {
        let field = |f: &str| format!("stage '{}': {f}", s.name);
        let after: Vec<String> = s.after.iter().filter_map(|a| waits_for.get(a).cloned().flatten()).collect();
        if !s.enabled {
            skipped.push(Skipped { name: s.name.clone(), reason: "disabled".into() });
            waits_for.insert(s.name.clone(), None);
            continue;
        }
        let output = s.output.as_deref().map(|o| expand(o, vars, &field("output"))).transpose()?;
        let samples = s.samples.as_deref().map(|o| expand(o, vars, &field("samples"))).transpose()?;
        let done = s.done.as_deref().map(|o| expand(o, vars, &field("done"))).transpose()?;
        // A stage with a Parquet `output` is always submitted: only the stage itself knows its
        // definition (config, the inputs' hashes, the model, the shard), so its tasks decide
        // (an output complete for the same definition is skipped in seconds, saying so) and
        // its merge merges again only when a task shard changed. Judging by the files here
        // would keep a stale output after a changed seed, config or input (issue 20).
        if let Some(done) = &done {
            if Path::new(done).exists() {
                skipped.push(Skipped { name: s.name.clone(), reason: format!("{done} exists") });
                waits_for.insert(s.name.clone(), None);
                continue;
            }
        }
        let mut env = vars.clone();
        for (k, v) in &s.env {
            env.insert(k.clone(), expand(v, vars, &field(&format!("env.{k}")))?);
        }
        env.insert("STAGE_NAME".into(), s.name.clone());
        if let Some(o) = &output {
            env.insert("STAGE_OUT".into(), o.clone());
        }
        if let Some(o) = &samples {
            env.insert("STAGE_SAMPLES".into(), o.clone());
        }
        if let Some(n) = s.array {
            env.insert("STAGE_TASKS".into(), n.to_string());
        }
        let mut common = vec![format!("--job-name=popen-{}", s.name), "--parsable".into(), "--open-mode=append".into()];
        if let Some(a) = &d.account {
            common.push(format!("--account={a}"));
        }
        let mut args = common.clone();
        let gpu = s.gpus.unwrap_or(0) > 0;
        let partition = s
            .partition
            .clone()
            .or_else(|| if gpu { d.gpu_partition.clone() } else { None })
            .or_else(|| d.partition.clone());
        if let Some(p) = &partition {
            args.push(format!("--partition={p}"));
        }
        args.push(format!("--time={}", s.time.as_deref().unwrap_or(&d.time)));
        args.push(format!("--cpus-per-task={}", s.cpus_per_task.unwrap_or(d.cpus_per_task)));
        if let Some(m) = s.mem.as_ref().or(d.mem.as_ref()) {
            args.push(format!("--mem={m}"));
        }
        if let Some(g) = s.gpus.filter(|&g| g > 0) {
            args.push("--nodes=1".into());
            args.push(format!("--gres=gpu:{g}"));
        }
        match s.array {
            Some(n) => {
                args.push(format!("--array=0-{}", n - 1));
                args.push("--requeue".into());
                args.push(format!("--output={log_dir}/{}-%A_%a.out", s.name));
                args.extend(d.extra.iter().cloned());
                args.push(s.script.clone());
                jobs.push(Job { name: s.name.clone(), args, env: env.clone(), after: after.clone() });
                let merge_after = vec![s.name.clone()];
                let merge = format!("{}-merge", s.name);
                let mut margs = common;
                margs[0] = format!("--job-name=popen-{merge}");
                if let Some(p) = &d.partition {
                    margs.push(format!("--partition={p}"));
                }
                margs.push(format!("--time={}", d.merge_time));
                margs.push("--cpus-per-task=1".into());
                margs.push(format!("--output={log_dir}/{merge}-%j.out"));
                margs.extend(d.extra.iter().cloned());
                margs.push(merge_script(&s.script));
                jobs.push(Job { name: merge.clone(), args: margs, env, after: merge_after });
                waits_for.insert(s.name.clone(), Some(merge));
            }
            None => {
                args.push(format!("--output={log_dir}/{}-%j.out", s.name));
                args.extend(d.extra.iter().cloned());
                args.push(s.script.clone());
                jobs.push(Job { name: s.name.clone(), args, env, after });
                waits_for.insert(s.name.clone(), Some(s.name.clone()));
            }
        }
    }
    Ok((jobs, skipped))
}

/// merge.sbatch beside the stage's script.
fn merge_script(script: &str) -> String {
    match Path::new(script).parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => dir.join("merge.sbatch").display().to_string(),
        None => "merge.sbatch".into(),
    }
}

/// The full sbatch argument list of `job` given the ids of the jobs it waits for.
pub fn sbatch_args(job: &Job, ids: &HashMap<String, String>) -> Result<Vec<String>> {
    let mut args = job.args.clone();
    let deps = job
        .after
        .iter()
        .map(|a| {
            ids.get(a)
                .cloned()
                .ok_or_else(|| CoreError::Invalid(format!("job '{}' waits for '{a}', which has no job id", job.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    if !deps.is_empty() {
        // Before the script (the last argument).
        let at = args.len() - 1;
        args.insert(at, format!("--dependency=afterok:{}", deps.join(":")));
    }
    Ok(args)
}

/// Submits the plan in order: `run(job, args)` submits one job and returns its id (the
/// `--parsable` output); returns (job name, id) in submission order.
pub fn submit(jobs: &[Job], mut run: impl FnMut(&Job, &[String]) -> Result<String>) -> Result<Vec<(String, String)>> {
    let mut ids = HashMap::new();
    let mut out = Vec::new();
    for job in jobs {
        let args = sbatch_args(job, &ids)?;
        let id = run(job, &args)?;
        ids.insert(job.name.clone(), id.clone());
        out.push((job.name.clone(), id));
    }
    Ok(out)
}

/// Runs `sbatch` for one job (the `run` of [`submit`]): the job id from `--parsable`
/// (`id` or `id;cluster`), or the command's error output.
pub fn sbatch(sbatch: &str, job: &Job, args: &[String]) -> Result<String> {
    let res = std::process::Command::new(sbatch)
        .args(args)
        .envs(&job.env)
        .output()
        .map_err(|e| CoreError::Invalid(format!("cannot run '{sbatch}' for stage '{}': {e}", job.name)))?;
    let stdout = String::from_utf8_lossy(&res.stdout);
    let id = stdout.trim().split(';').next().unwrap_or("").to_string();
    if !res.status.success() || id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(CoreError::Invalid(format!(
            "sbatch failed for stage '{}' ({}): {}{}",
            job.name,
            res.status,
            stdout.trim(),
            String::from_utf8_lossy(&res.stderr).trim()
        )));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(out: &Path) -> (ClusterConfig, BTreeMap<String, String>) {
        let cfg: ClusterConfig = serde_json::from_value(config_json()).unwrap();
        let vars = cfg.vars(|k| (k == "OUT").then(|| out.display().to_string()));
        (cfg, vars)
    }

    /// The config as pipelines/cluster.toml would spell it (popen-core has no TOML parser).
    fn config_json() -> serde_json::Value {
        serde_json::json!({
            "slurm": {"partition": "cpu", "gpu_partition": "gpu"},
            "env": {"OUT": "OUTDIR"},
            "stage": [
                {"name": "init", "script": "s/init.sbatch", "done": "{OUT}/init.done"},
                {"name": "collect", "script": "s/collect.sbatch", "after": ["init"], "array": 3,
                 "output": "{OUT}/x.parquet", "samples": "{OUT}/train.parquet"},
                {"name": "off", "script": "s/off.sbatch", "enabled": false},
                {"name": "train", "script": "s/train.sbatch", "after": ["collect", "off"], "gpus": 2}
            ]
        })
    }

    #[test]
    fn plan_chains_arrays_merges_and_gpu_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, vars) = parse(dir.path());
        let (jobs, skipped) = plan(&cfg, &vars).unwrap();
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["init", "collect", "collect-merge", "train"]);
        assert_eq!(skipped, vec![Skipped { name: "off".into(), reason: "disabled".into() }]);
        let c = &jobs[1];
        assert!(c.args.contains(&"--array=0-2".to_string()) && c.args.contains(&"--requeue".to_string()));
        assert!(c.args.contains(&"--partition=cpu".to_string()));
        assert_eq!(c.args.last().unwrap(), "s/collect.sbatch");
        assert_eq!(c.env["STAGE_OUT"], format!("{}/x.parquet", dir.path().display()));
        assert_eq!(c.env["STAGE_TASKS"], "3");
        assert_eq!(jobs[2].args.last().unwrap(), "s/merge.sbatch");
        assert_eq!(jobs[2].after, ["collect"]);
        let t = &jobs[3];
        assert!(t.args.contains(&"--gres=gpu:2".to_string()) && t.args.contains(&"--partition=gpu".to_string()));
        // The disabled stage is not waited for; the array's merge is.
        assert_eq!(t.after, ["collect-merge"]);
        let ids = submit(&jobs, |j, args| {
            if j.name == "train" {
                assert_eq!(args[args.len() - 2], "--dependency=afterok:3");
            }
            if j.name == "collect" {
                assert_eq!(args[args.len() - 2], "--dependency=afterok:1");
            }
            Ok((["init", "collect", "collect-merge", "train"].iter().position(|n| *n == j.name).unwrap() + 1)
                .to_string())
        })
        .unwrap();
        assert_eq!(ids.len(), 4);

        // A complete stage is skipped and not waited for.
        std::fs::write(dir.path().join("init.done"), b"").unwrap();
        let (jobs, skipped) = plan(&cfg, &vars).unwrap();
        assert_eq!(jobs[0].name, "collect");
        assert!(jobs[0].after.is_empty());
        assert!(skipped.iter().any(|s| s.name == "init" && s.reason.contains("init.done exists")));
    }

    #[test]
    fn bad_configs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cfg, vars) = parse(dir.path());
        cfg.stages[1].after = vec!["train".into()];
        let e = plan(&cfg, &vars).unwrap_err().to_string();
        assert!(e.contains("stage 'collect': after = 'train' must name a stage listed before it"), "{e}");
        let (mut cfg, vars) = parse(dir.path());
        cfg.stages[1].output = Some("{NOPE}/x.parquet".into());
        let e = plan(&cfg, &vars).unwrap_err().to_string();
        assert!(e.contains("stage 'collect': output") && e.contains("{NOPE}"), "{e}");
        let (mut cfg, vars) = parse(dir.path());
        cfg.stages[1].samples = None;
        assert!(plan(&cfg, &vars).unwrap_err().to_string().contains("needs `output`"));
    }
}
