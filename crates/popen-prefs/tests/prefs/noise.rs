//! Noise-filling recipes (SPEC 10.1): deterministic by seed, rectangles within the configured
//! fractions, pixels changed only inside, noise of the configured sigma.
use image::{Rgb, RgbImage};
use popen_prefs::noise::{perturbation_seed, NoiseConfig, NoiseRecipe};

#[test]
fn recipes_are_deterministic_and_within_bounds() {
    let cfg = NoiseConfig::default();
    let (w, h) = (120u32, 80u32);
    let mut seen = std::collections::HashSet::new();
    for i in 0..200 {
        let seed = perturbation_seed(7, "synth-train-000001", i / 30, i % 30);
        seen.insert(seed);
        let r = NoiseRecipe::draw(seed, w, h, &cfg).unwrap();
        assert_eq!(r, NoiseRecipe::draw(seed, w, h, &cfg).unwrap());
        assert!(r.width >= 12 && r.width <= 60, "{r:?}");
        assert!(r.height >= 8 && r.height <= 40, "{r:?}");
        assert!(r.x + r.width <= w && r.y + r.height <= h, "{r:?}");
    }
    assert_eq!(seen.len(), 200, "seeds of different perturbations differ");
    assert_ne!(perturbation_seed(7, "a", 0, 0), perturbation_seed(7, "b", 0, 0));
    assert_ne!(perturbation_seed(7, "a", 0, 0), perturbation_seed(8, "a", 0, 0));
}

#[test]
fn apply_changes_only_the_rectangle_with_the_right_sigma() {
    let img = RgbImage::from_pixel(64, 48, Rgb([128, 128, 128]));
    let r = NoiseRecipe { seed: 3, x: 10, y: 5, width: 40, height: 30, sigma: 0.1 };
    let out = r.apply(&img).unwrap();
    assert_eq!(out, r.apply(&img).unwrap(), "rebuilt exactly from the recipe");
    let mut vals = Vec::new();
    for (x, y, p) in out.enumerate_pixels() {
        let inside = (10..50).contains(&x) && (5..35).contains(&y);
        if inside {
            vals.extend(p.0.iter().map(|&v| v as f64 / 255.0 - 128.0 / 255.0));
        } else {
            assert_eq!(p.0, [128, 128, 128], "pixel {x},{y} outside the rectangle changed");
        }
    }
    let n = vals.len() as f64;
    let mean = vals.iter().sum::<f64>() / n;
    let sd = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    // 3600 draws, no clamping at sigma 0.1 around 0.5: mean ~ 0, sd ~ 0.1 (8-bit rounding adds ~0.001).
    assert!(mean.abs() < 0.01, "mean {mean}");
    assert!((sd - 0.1).abs() < 0.006, "sd {sd}");
    // Clamping: sigma 0.5 on a white image never leaves [0, 255] and lowers the mean.
    let white = RgbImage::from_pixel(20, 20, Rgb([255, 255, 255]));
    let r2 = NoiseRecipe { seed: 1, x: 0, y: 0, width: 20, height: 20, sigma: 0.5 };
    let o2 = r2.apply(&white).unwrap();
    assert!(o2.pixels().any(|p| p.0[0] < 200));
    // A rectangle outside the image is an error, not a panic.
    let bad = NoiseRecipe { seed: 1, x: 60, y: 0, width: 10, height: 5, sigma: 0.5 };
    assert!(bad.apply(&img).is_err());
    assert!(NoiseConfig { side_min: 0.6, side_max: 0.5, sigma: 0.5 }.validate().is_err());
}
