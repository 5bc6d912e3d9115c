//! Configs printed back (`--print-config`) as they were written.

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
