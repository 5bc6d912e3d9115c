//! `--shard I/N`: which records a task of a cluster job array takes.

use crate::error::{CoreError, Result};
use std::fmt;
use std::str::FromStr;

/// Task `index` of `count` (0-based). Task i takes the records whose position modulo N is i,
/// so every task gets a similar mix; the union over all tasks is every record exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ShardSpec {
    pub index: u32,
    pub count: u32,
}

impl ShardSpec {
    pub const ALL: ShardSpec = ShardSpec { index: 0, count: 1 };

    pub fn new(index: u32, count: u32) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(CoreError::Invalid(format!(
                "shard {index}/{count}: need 0 <= I < N (I is 0-based, e.g. --shard 0/4 .. 3/4)"
            )));
        }
        Ok(ShardSpec { index, count })
    }

    pub fn takes(&self, position: usize) -> bool {
        position % self.count as usize == self.index as usize
    }

    pub fn is_all(&self) -> bool {
        self.count == 1
    }

    /// A Slurm job array's task (`sbatch --array=A-B`): I = `SLURM_ARRAY_TASK_ID` minus
    /// `SLURM_ARRAY_TASK_MIN`, N = `SLURM_ARRAY_TASK_COUNT`; `None` outside a job array.
    /// `var` reads an environment variable (`|k| std::env::var(k).ok()`).
    pub fn from_slurm(var: impl Fn(&str) -> Option<String>) -> Result<Option<ShardSpec>> {
        let Some(id) = var("SLURM_ARRAY_TASK_ID") else { return Ok(None) };
        let num = |k: &str, v: Option<String>| -> Result<u32> {
            let v = v.ok_or_else(|| CoreError::Invalid(format!("SLURM_ARRAY_TASK_ID is set but {k} is not")))?;
            v.trim().parse().map_err(|_| CoreError::Invalid(format!("{k}={v:?} is not a number")))
        };
        let id = num("SLURM_ARRAY_TASK_ID", Some(id))?;
        let min = match var("SLURM_ARRAY_TASK_MIN") {
            Some(v) => num("SLURM_ARRAY_TASK_MIN", Some(v))?,
            None => 0,
        };
        let count = num("SLURM_ARRAY_TASK_COUNT", var("SLURM_ARRAY_TASK_COUNT"))?;
        let index = id.checked_sub(min).ok_or_else(|| {
            CoreError::Invalid(format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"))
        })?;
        ShardSpec::new(index, count).map(Some)
    }

    /// The shard a stage runs: an explicit `--shard I/N` wins; the whole input (`0/1`, the
    /// flag's default) defers to a Slurm job array's task when the environment names one.
    /// (A contiguous `--array=A-B` is assumed; with a step, pass `--shard` explicitly.)
    pub fn or_slurm(self) -> Result<ShardSpec> {
        if !self.is_all() {
            return Ok(self);
        }
        Ok(ShardSpec::from_slurm(|k| std::env::var(k).ok())?.unwrap_or(self))
    }

    /// File-name suffix, e.g. `-00002-of-00004`.
    pub fn suffix(&self) -> String {
        format!("-{:05}-of-{:05}", self.index, self.count)
    }

    /// This task's output file for a stage output `out` (`x.parquet`): `out` itself for the
    /// whole input, else `x-0000I-of-0000N.parquet`.
    pub fn output_path(&self, out: &std::path::Path) -> std::path::PathBuf {
        if self.is_all() {
            out.to_path_buf()
        } else {
            std::path::PathBuf::from(format!("{}{}.parquet", out.with_extension("").display(), self.suffix()))
        }
    }
}

impl Default for ShardSpec {
    fn default() -> Self {
        Self::ALL
    }
}

impl fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl TryFrom<String> for ShardSpec {
    type Error = CoreError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<ShardSpec> for String {
    fn from(s: ShardSpec) -> String {
        s.to_string()
    }
}

impl FromStr for ShardSpec {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        let (i, n) =
            s.split_once('/').ok_or_else(|| CoreError::Invalid(format!("shard '{s}': expected I/N, e.g. 0/4")))?;
        let parse = |v: &str| {
            v.trim().parse::<u32>().map_err(|_| CoreError::Invalid(format!("shard '{s}': '{v}' is not a number")))
        };
        ShardSpec::new(parse(i)?, parse(n)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_partition() {
        let s: ShardSpec = "1/3".parse().unwrap();
        let taken: Vec<usize> = (0..8).filter(|&p| s.takes(p)).collect();
        assert_eq!(taken, vec![1, 4, 7]);
        assert_eq!(s.suffix(), "-00001-of-00003");
        assert!("3/3".parse::<ShardSpec>().is_err());
        assert!("x/3".parse::<ShardSpec>().is_err());
        assert!("0/0".parse::<ShardSpec>().is_err());
        // Configs carry it as "I/N", validated like the flag.
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"1/3\"");
        assert_eq!(serde_json::from_str::<ShardSpec>("\"2/3\"").unwrap(), ShardSpec::new(2, 3).unwrap());
        assert!(serde_json::from_str::<ShardSpec>("\"0/0\"").is_err());
        // Every record exactly once over all tasks.
        for p in 0..20 {
            assert_eq!((0..3).filter(|&i| ShardSpec::new(i, 3).unwrap().takes(p)).count(), 1);
        }
    }
}
