//! Noise-filling perturbations of collect-ps (SPEC 4.2 and 10.1): Gaussian noise inside one
//! random axis-aligned rectangle per perturbed image, stored as a recipe (seed, rectangle,
//! sigma) from which the image is rebuilt exactly.

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{CoreError, Result};

/// How perturbations are drawn (SPEC 10.1 defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoiseConfig {
    /// Rectangle side lengths, as fractions of the image side, uniform in [min, max].
    pub side_min: f64,
    pub side_max: f64,
    /// Standard deviation of the pixel noise on [0, 1] pixel values.
    pub sigma: f32,
}

impl Default for NoiseConfig {
    fn default() -> Self {
        NoiseConfig { side_min: 0.1, side_max: 0.5, sigma: 0.5 }
    }
}

impl NoiseConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = self.side_min > 0.0 && self.side_min <= self.side_max && self.side_max <= 1.0;
        if !ok {
            return Err(CoreError::Invalid(format!(
                "noise side fractions must satisfy 0 < side_min <= side_max <= 1 (got {} and {})",
                self.side_min, self.side_max
            )));
        }
        if !(self.sigma.is_finite() && self.sigma >= 0.0) {
            return Err(CoreError::Invalid(format!("noise sigma must be finite and >= 0 (got {})", self.sigma)));
        }
        Ok(())
    }
}

/// One perturbation: everything needed to rebuild the perturbed image from the clean one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoiseRecipe {
    /// Seed of the pixel noise (ChaCha8, pixels row-major, channels R, G, B).
    pub seed: u64,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub sigma: f32,
}

/// SplitMix64 finalizer: decorrelates the seeds derived for samples and perturbations.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of perturbation `index` of draw `batch` of a sample: a function of the stage
/// seed and the sample id only, so any shard split or rerun gives the same recipes.
pub fn perturbation_seed(stage_seed: u64, sample_id: &str, batch: u32, index: u32) -> u64 {
    // FNV-1a of the id, then mixed with the counters.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sample_id.as_bytes() {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    mix(mix(mix(stage_seed ^ h) ^ batch as u64) ^ index as u64)
}

impl NoiseRecipe {
    /// Draws a rectangle (sides uniform in the configured fractions, position uniform where
    /// it fits) for an image of `width` x `height`, from `seed`.
    pub fn draw(seed: u64, width: u32, height: u32, cfg: &NoiseConfig) -> Result<NoiseRecipe> {
        cfg.validate()?;
        if width == 0 || height == 0 {
            return Err(CoreError::Invalid(format!("cannot perturb an empty image ({width}x{height})")));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed));
        let side = |rng: &mut ChaCha8Rng, n: u32| -> u32 {
            let f = rng.random_range(cfg.side_min..=cfg.side_max);
            ((f * n as f64).round() as u32).clamp(1, n)
        };
        let w = side(&mut rng, width);
        let h = side(&mut rng, height);
        let x = rng.random_range(0..=width - w);
        let y = rng.random_range(0..=height - h);
        Ok(NoiseRecipe { seed, x, y, width: w, height: h, sigma: cfg.sigma })
    }

    /// The perturbed image: inside the rectangle every channel becomes
    /// `clamp(v / 255 + sigma * n, 0, 1)` (n standard normal, Box-Muller on ChaCha8), back to
    /// 8 bits by rounding; outside it the image is unchanged.
    pub fn apply(&self, image: &RgbImage) -> Result<RgbImage> {
        let (iw, ih) = image.dimensions();
        if self.width == 0 || self.height == 0 || self.x + self.width > iw || self.y + self.height > ih {
            return Err(CoreError::Invalid(format!(
                "noise rectangle x {} y {} {}x{} does not fit the {iw}x{ih} image",
                self.x, self.y, self.width, self.height
            )));
        }
        let mut out = image.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut spare: Option<f32> = None;
        let mut normal = move |rng: &mut ChaCha8Rng| -> f32 {
            if let Some(z) = spare.take() {
                return z;
            }
            // u1 in (0, 1]: ln is finite.
            let u1 = 1.0 - rng.random::<f64>();
            let u2 = rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = std::f64::consts::TAU * u2;
            spare = Some((r * t.sin()) as f32);
            (r * t.cos()) as f32
        };
        for y in self.y..self.y + self.height {
            for x in self.x..self.x + self.width {
                let p = out.get_pixel_mut(x, y);
                for c in 0..3 {
                    let v = p.0[c] as f32 / 255.0 + self.sigma * normal(&mut rng);
                    p.0[c] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                }
            }
        }
        Ok(out)
    }
}
