//! Configs: read from TOML ([`load`], the one way every command reads its config file) with
//! `--set KEY=VALUE` overrides ([`with_sets`]) and printed back (`--print-config`) as they were written.

use std::path::Path;

/// A config of type `T`: the TOML file `path`, or `T`'s defaults without one. Errors name
/// the file (unknown fields are errors where `T` denies them); [`with_sets`] applies
/// `--set KEY=VALUE` overrides on top.
pub fn load<T: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, String> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            toml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
        }
        None => Ok(T::default()),
    }
}

/// `cfg` with each `KEY=VALUE` of `sets` applied ([`apply_set`]) through its TOML value.
pub fn with_sets<T: serde::Serialize + serde::de::DeserializeOwned>(cfg: T, sets: &[String]) -> Result<T, String> {
    if sets.is_empty() {
        return Ok(cfg);
    }
    let mut v = toml::Value::try_from(&cfg).map_err(|e| e.to_string())?;
    for s in sets {
        apply_set(&mut v, s)?;
    }
    let what = sets.iter().map(|s| format!("--set {s}")).collect::<Vec<_>>().join(" ");
    v.try_into().map_err(|e| format!("{what}: {e}"))
}

/// One `KEY=VALUE` override of [`with_sets`] on a config's TOML value: KEY is a dotted path
/// (`ensemble.k`, `adapt_steps`), VALUE a TOML value (`3`, `false`, `[1.0, 2.0]`, `"text"`;
/// a bare word is a string). Unknown keys are errors, as in the file.
pub fn apply_set(root: &mut toml::Value, set: &str) -> Result<(), String> {
    let Some((key, raw)) = set.split_once('=') else {
        return Err(format!("--set {set}: expected KEY=VALUE"));
    };
    let key = key.trim();
    let raw = raw.trim();
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if key.is_empty() || parts.iter().any(|p| p.is_empty()) {
        return Err(format!("--set {set}: empty key"));
    }
    let mut cur = root;
    for (i, p) in parts.iter().enumerate() {
        let table =
            cur.as_table_mut().ok_or_else(|| format!("--set {set}: '{}' is not a table", parts[..i].join(".")))?;
        if i + 1 == parts.len() {
            if !table.contains_key(*p) {
                let known: Vec<&String> = table.keys().collect();
                return Err(format!("--set {set}: unknown key '{key}' (keys here: {known:?})"));
            }
            table.insert(p.to_string(), value);
            return Ok(());
        }
        cur = table.get_mut(*p).ok_or_else(|| format!("--set {set}: unknown key '{}'", parts[..=i].join(".")))?;
    }
    unreachable!("the loop returns at the last part")
}

/// `v` as TOML with every float that is exactly an `f32` written the way that `f32` reads
/// (`beta1 = 0.9`, not `0.8999999761581421`): configs print the values as written.
pub fn config_toml<T: serde::Serialize>(v: &T) -> Result<String, toml::ser::Error> {
    fn shorten(v: &mut toml::Value) {
        match v {
            toml::Value::Float(f) => {
                let s = *f as f32;
                if s as f64 == *f && f.is_finite() {
                    if let Ok(short) = s.to_string().parse::<f64>() {
                        *f = short;
                    }
                }
            }
            toml::Value::Array(a) => a.iter_mut().for_each(shorten),
            toml::Value::Table(t) => t.iter_mut().for_each(|(_, x)| shorten(x)),
            _ => {}
        }
    }
    let mut value = toml::Value::try_from(v)?;
    shorten(&mut value);
    toml::to_string_pretty(&value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_floats_print_as_written() {
        #[derive(serde::Serialize)]
        struct C {
            beta1: f32,
            eps: f32,
            lr: f64,
            half: f64,
            inner: Inner,
        }
        #[derive(serde::Serialize)]
        struct Inner {
            w: Vec<f32>,
        }
        let c = C { beta1: 0.9, eps: 1e-8, lr: 2e-3, half: 0.5, inner: Inner { w: vec![0.95, 2.0] } };
        let t = config_toml(&c).unwrap();
        assert!(t.contains("beta1 = 0.9\n"), "{t}");
        assert!(t.contains("eps = 1e-8") || t.contains("eps = 0.00000001"), "{t}");
        assert!(t.contains("lr = 0.002\n") && t.contains("half = 0.5\n"), "{t}");
        assert!(t.contains("0.95") && !t.contains("0.9499"), "{t}");
        // The printed text reads back to the same f32 values.
        #[derive(serde::Deserialize)]
        struct Back {
            beta1: f32,
            eps: f32,
        }
        let b: Back = toml::from_str(&t).unwrap();
        assert_eq!((b.beta1, b.eps), (0.9, 1e-8));
    }
}
