//! `popen eval`: thin front end of the popen-eval crate (owned by the evaluator work).

use anyhow::Result;

#[derive(clap::Args)]
pub struct EvalArgs {}

pub fn eval(_a: EvalArgs) -> Result<()> {
    anyhow::bail!("popen eval: not built yet")
}
