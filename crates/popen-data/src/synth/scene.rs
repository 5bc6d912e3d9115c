//! Scenes: object sampling (with distractors), placement with controlled occlusion, and
//! rendering (textured background, clutter, shadows, shaded and textured objects).

use super::lexicon::{is_heldout, Cat, CATS, COLOURS};
use super::shapes::{self, ShapeParams};
use super::SynthConfig;
use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// One object's drawing parameters.
#[derive(Clone, Debug)]
pub(crate) struct ObjSpec {
    pub cat: usize,
    pub colour: u8,
    pub cx: f32,
    pub cy: f32,
    /// Radius in pixels (the shape spans about [-s, s]).
    pub s: f32,
    pub rot: f32,
    pub flip: bool,
    pub ax: f32,
    pub ay: f32,
    /// Radial outline perturbation for angular frequencies 2, 3, 4, 5: (amplitude,
    /// cos phase, sin phase).
    pub radial_cs: [(f32, f32, f32); 4],
    /// Domain warp: amplitude u, amplitude v, frequency, phase u, phase v.
    pub warp: [f32; 5],
    pub params: ShapeParams,
}

/// A placed object: its full (unoccluded) part map over the image.
pub(crate) struct Placed {
    pub spec: ObjSpec,
    /// `w*h` part codes (0 outside), see `shapes.rs`.
    pub parts: Vec<u8>,
    /// Full-shape bounding box, x0, y0, x1, y1 (exclusive).
    pub bbox: [u32; 4],
    pub area: u32,
}

/// A finished scene. Objects are in drawing order (index = z-order, later on top).
pub(crate) struct Scene {
    pub w: u32,
    pub h: u32,
    pub objs: Vec<Placed>,
    /// Topmost object per pixel, -1 for background.
    pub zbuf: Vec<i16>,
    pub image: image::RgbImage,
    pub background: &'static str,
    pub clutter: usize,
}

// ------------------------------------------------------------------ random helpers

pub(crate) fn gauss(rng: &mut ChaCha8Rng) -> f32 {
    // Box-Muller; deterministic given the stream.
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Cheap approximately normal variate (Irwin-Hall of four uniforms, unit variance).
fn approx_gauss(rng: &mut ChaCha8Rng) -> f32 {
    let s: f32 = (0..4).map(|_| rng.random::<f32>()).sum();
    (s - 2.0) * 1.732_050_8
}

fn uniform(rng: &mut ChaCha8Rng, a: f32, b: f32) -> f32 {
    a + (b - a) * rng.random::<f32>()
}

/// Smooth value noise in [-1, 1] on a lattice with the given cell size (pixels).
struct ValueNoise {
    gw: usize,
    gh: usize,
    cell: f32,
    vals: Vec<f32>,
}

impl ValueNoise {
    fn new(rng: &mut ChaCha8Rng, w: u32, h: u32, cell: f32) -> Self {
        let gw = (w as f32 / cell).ceil() as usize + 2;
        let gh = (h as f32 / cell).ceil() as usize + 2;
        let vals = (0..gw * gh).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        ValueNoise { gw, gh, cell, vals }
    }

    fn at(&self, x: f32, y: f32) -> f32 {
        let fx = (x / self.cell).max(0.0);
        let fy = (y / self.cell).max(0.0);
        let (ix, iy) = ((fx as usize).min(self.gw - 2), (fy as usize).min(self.gh - 2));
        let (tx, ty) = ((fx - ix as f32).min(1.0), (fy - iy as f32).min(1.0));
        let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
        let v = |i: usize, j: usize| self.vals[j * self.gw + i];
        let a = v(ix, iy) + (v(ix + 1, iy) - v(ix, iy)) * sx;
        let b = v(ix, iy + 1) + (v(ix + 1, iy + 1) - v(ix, iy + 1)) * sx;
        a + (b - a) * sy
    }
}

fn hsl(h: f32, s: f32, l: f32) -> [f32; 3] {
    let c = (1.0 - (2.0 * l - 1.0).abs()) * s;
    let hp = h.rem_euclid(1.0) * 6.0;
    let x = c * (1.0 - (hp % 2.0 - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = l - c / 2.0;
    [r + m, g + m, b + m]
}

fn mix3(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t]
}

// ------------------------------------------------------------------ sampling

/// Colours a category may take in this split: train/val never use held-out combinations.
pub(crate) fn allowed_colours(cat: usize, test: bool) -> Vec<u8> {
    CATS[cat].colours.iter().copied().filter(|&k| test || !is_heldout(cat, k)).collect()
}

/// Picks the (category, colour) of the next object, placing distractors for the objects
/// already chosen: the same category in another colour, a look-alike category, or another
/// category in the same colour.
fn pick_kind(cfg: &SynthConfig, rng: &mut ChaCha8Rng, chosen: &[(usize, u8)], test: bool) -> (usize, u8) {
    let r: f64 = rng.random();
    if let Some(&(pc, pk)) = chosen.choose(rng) {
        let p1 = cfg.same_category_rate;
        let p2 = p1 + cfg.lookalike_rate;
        let p3 = p2 + cfg.same_colour_rate;
        if r < p1 {
            let cols: Vec<u8> = allowed_colours(pc, test).into_iter().filter(|&k| k != pk).collect();
            if let Some(&k) = cols.choose(rng) {
                return (pc, k);
            }
        } else if r < p2 {
            let looks: Vec<usize> = CATS[pc].lookalikes.iter().filter_map(|n| super::lexicon::cat_index(n)).collect();
            if let Some(&c) = looks.choose(rng) {
                let cols = allowed_colours(c, test);
                // prefer the look-alike in the same colour: harder
                if cols.contains(&pk) && rng.random_bool(0.5) {
                    return (c, pk);
                }
                if let Some(&k) = cols.choose(rng) {
                    return (c, k);
                }
            }
        } else if r < p3 {
            let cands: Vec<usize> =
                (0..CATS.len()).filter(|&c| c != pc && allowed_colours(c, test).contains(&pk)).collect();
            if let Some(&c) = cands.choose(rng) {
                return (c, pk);
            }
        }
    }
    let c = rng.random_range(0..CATS.len());
    let cols = allowed_colours(c, test);
    (c, *cols.choose(rng).expect("every category keeps a training colour"))
}

fn sample_spec(cfg: &SynthConfig, rng: &mut ChaCha8Rng, cat: usize, colour: u8) -> ObjSpec {
    let c: &Cat = &CATS[cat];
    let side = cfg.width.min(cfg.height) as f32;
    let s = uniform(rng, cfg.size_min as f32, cfg.size_max as f32) * side * c.size;
    let rot = uniform(rng, -c.max_rot, c.max_rot);
    let asp = uniform(rng, -(cfg.aspect_jitter as f32), cfg.aspect_jitter as f32);
    let (ax, ay) = ((1.0 + asp).sqrt(), 1.0 / (1.0 + asp).sqrt());
    let j = cfg.outline_jitter as f32 * c.wobble;
    let mut radial_cs = [(0.0, 0.0, 0.0); 4];
    for (i, r) in radial_cs.iter_mut().enumerate() {
        let k = (i + 2) as f32;
        let a = uniform(rng, -j, j) * 2.0 / k;
        let phase = uniform(rng, 0.0, std::f32::consts::TAU);
        *r = (a, phase.cos(), phase.sin());
    }
    let warp = [
        uniform(rng, -j, j) * 0.5,
        uniform(rng, -j, j) * 0.5,
        uniform(rng, 2.0, 4.5),
        uniform(rng, 0.0, std::f32::consts::TAU),
        uniform(rng, 0.0, std::f32::consts::TAU),
    ];
    let dark_body = matches!(COLOURS[colour as usize].0, "red" | "blue" | "green" | "purple" | "brown");
    ObjSpec {
        cat,
        colour,
        cx: 0.0,
        cy: 0.0,
        s,
        rot,
        flip: rng.random_bool(0.5),
        ax,
        ay,
        radial_cs,
        warp,
        params: ShapeParams { face: rng.random_range(1..=6), light_detail: dark_body },
    }
}

/// Local shape coordinates of pixel centre (x, y) for an object.
#[inline]
fn local(sp: &ObjSpec, cos: f32, sin: f32, x: u32, y: u32) -> (f32, f32) {
    let dx = x as f32 + 0.5 - sp.cx;
    let dy = y as f32 + 0.5 - sp.cy;
    let ux = dx * cos + dy * sin;
    let uy = -dx * sin + dy * cos;
    let mut u = ux / (sp.s * sp.ax);
    let mut v = uy / (sp.s * sp.ay);
    if sp.flip {
        u = -u;
    }
    // f = 1 + sum_k a_k cos(k theta + phi_k), with cos/sin(k theta) as powers of
    // (cos theta, sin theta): no trigonometry per pixel
    let r = (u * u + v * v).sqrt();
    let (c1, s1) = if r > 1e-6 { (u / r, v / r) } else { (1.0, 0.0) };
    let (mut ck, mut sk) = (c1 * c1 - s1 * s1, 2.0 * c1 * s1);
    let mut f = 1.0;
    for &(a, cp, sp_) in sp.radial_cs.iter() {
        f += a * (ck * cp - sk * sp_);
        let nc = ck * c1 - sk * s1;
        sk = sk * c1 + ck * s1;
        ck = nc;
    }
    u /= f;
    v /= f;
    let u2 = u + sp.warp[0] * (sp.warp[2] * v + sp.warp[3]).sin();
    let v2 = v + sp.warp[1] * (sp.warp[2] * u + sp.warp[4]).sin();
    (u2, v2)
}

fn rasterize(sp: &ObjSpec, w: u32, h: u32) -> Placed {
    let amp: f32 = sp.radial_cs.iter().map(|r| r.0.abs()).sum::<f32>() + sp.warp[0].abs().max(sp.warp[1].abs());
    let ext = 1.25 * sp.s * sp.ax.max(sp.ay) * (1.0 + 2.0 * amp);
    let x0 = (sp.cx - ext).floor().max(0.0) as u32;
    let y0 = (sp.cy - ext).floor().max(0.0) as u32;
    let x1 = ((sp.cx + ext).ceil().max(0.0) as u32).min(w);
    let y1 = ((sp.cy + ext).ceil().max(0.0) as u32).min(h);
    let (sin, cos) = sp.rot.sin_cos();
    let shape = CATS[sp.cat].shape;
    let mut parts = vec![0u8; (w * h) as usize];
    let mut area = 0;
    let mut bb = [w, h, 0, 0];
    for y in y0..y1 {
        for x in x0..x1 {
            let (u, v) = local(sp, cos, sin, x, y);
            let p = shapes::part(shape, u, v, &sp.params);
            if p != shapes::OUT {
                parts[(y * w + x) as usize] = p;
                area += 1;
                bb = [bb[0].min(x), bb[1].min(y), bb[2].max(x + 1), bb[3].max(y + 1)];
            }
        }
    }
    if area == 0 {
        bb = [0, 0, 0, 0];
    }
    Placed { spec: sp.clone(), parts, bbox: bb, area }
}

/// Samples and places the objects of one scene. `forced` is drawn first (the held-out
/// object of a test sample). Returns `None` when fewer than `min_objects` fit.
pub(crate) fn sample_scene(
    cfg: &SynthConfig,
    rng: &mut ChaCha8Rng,
    test: bool,
    forced: Option<(usize, u8)>,
) -> Option<Scene> {
    let (w, h) = (cfg.width, cfg.height);
    let npx = (w * h) as usize;
    let n = rng.random_range(cfg.min_objects..=cfg.max_objects);
    let min_area = (cfg.min_visible_area * npx as f64).ceil() as u32;
    let mut objs: Vec<Placed> = Vec::new();
    let mut zbuf = vec![-1i16; npx];
    let mut vis: Vec<u32> = Vec::new();
    let mut chosen: Vec<(usize, u8)> = Vec::new();
    let mut attempts = 0;
    // the forced object goes to a random depth, not always to the bottom
    let mut forced = forced;
    let slot = rng.random_range(0..n);
    while objs.len() < n && attempts < n * 3 {
        attempts += 1;
        let use_forced = forced.is_some() && objs.len() >= slot;
        // every (category, colour) at most once per scene, so "the red ball" is unique
        let (cat, colour) = match forced {
            Some(f) if use_forced => f,
            _ => {
                let mut k = pick_kind(cfg, rng, &chosen, test);
                for _ in 0..8 {
                    if !chosen.contains(&k) && forced.is_none_or(|f| f != k) {
                        break;
                    }
                    k = pick_kind(cfg, rng, &chosen, test);
                }
                if chosen.contains(&k) || forced == Some(k) {
                    continue;
                }
                k
            }
        };
        let mut sp = sample_spec(cfg, rng, cat, colour);
        let tries = 16;
        for t in 0..tries {
            let reach = sp.s * sp.ax.max(sp.ay);
            let m = 0.8 * reach;
            let overlap_mode = !objs.is_empty() && rng.random_bool(cfg.occlusion);
            if overlap_mode {
                let j = rng.random_range(0..objs.len());
                let o = &objs[j].spec;
                let ang = uniform(rng, 0.0, std::f32::consts::TAU);
                let d = uniform(rng, 0.45, 0.9) * (o.s + sp.s);
                sp.cx = o.cx + d * ang.cos();
                sp.cy = o.cy + d * ang.sin();
            } else {
                sp.cx = uniform(rng, m, w as f32 - m);
                sp.cy = uniform(rng, m, h as f32 - m);
            }
            sp.cx = sp.cx.clamp(m.min(w as f32 / 2.0), (w as f32 - m).max(w as f32 / 2.0));
            sp.cy = sp.cy.clamp(m.min(h as f32 / 2.0), (h as f32 - m).max(h as f32 / 2.0));
            let p = rasterize(&sp, w, h);
            if p.area < min_area.max(8) {
                continue;
            }
            let mut dec = vec![0u32; objs.len()];
            let [bx0, by0, bx1, by1] = p.bbox;
            for y in by0..by1 {
                for x in bx0..bx1 {
                    let i = (y * w + x) as usize;
                    if p.parts[i] != 0 && zbuf[i] >= 0 {
                        dec[zbuf[i] as usize] += 1;
                    }
                }
            }
            let total: u32 = dec.iter().sum();
            // Free placements prefer no contact for the first tries.
            if !overlap_mode && total > 0 && t < tries / 2 {
                continue;
            }
            let ok = objs.iter().enumerate().all(|(j, o)| {
                let left = vis[j] - dec[j];
                dec[j] == 0 || (left as f64 >= cfg.min_visible_fraction * o.area as f64 && left >= min_area)
            });
            if !ok {
                continue;
            }
            for (j, d) in dec.iter().enumerate() {
                vis[j] -= d;
            }
            let k = objs.len() as i16;
            for (i, &v) in p.parts.iter().enumerate() {
                if v != 0 {
                    zbuf[i] = k;
                }
            }
            vis.push(p.area);
            if use_forced {
                forced = None;
            }
            chosen.push((cat, colour));
            objs.push(p);
            break;
        }
    }
    if objs.len() < cfg.min_objects {
        return None;
    }
    let mut scene = Scene { w, h, objs, zbuf, image: image::RgbImage::new(w, h), background: "", clutter: 0 };
    render(cfg, rng, &mut scene);
    Some(scene)
}

// ------------------------------------------------------------------ rendering

const BACKGROUNDS: &[&str] = &["noise", "gradient", "stripes", "checks", "wood"];

fn render(cfg: &SynthConfig, rng: &mut ChaCha8Rng, scene: &mut Scene) {
    let (w, h) = (scene.w, scene.h);
    let side = w.min(h) as f32;
    let npx = (w * h) as usize;
    let mut buf = vec![[0f32; 3]; npx];
    let contrast = cfg.background_contrast as f32;

    // background: two close muted colours combined by a pattern
    let hue = rng.random::<f32>();
    let sat = uniform(rng, 0.04, 0.22);
    let lig = uniform(rng, 0.3, 0.66);
    let base = hsl(hue, sat, lig);
    let dl = uniform(rng, 0.08, 0.22) * contrast / 0.15 * if lig > 0.5 { -1.0 } else { 1.0 };
    let other = hsl(
        hue + uniform(rng, -0.1, 0.1),
        (sat + uniform(rng, -0.05, 0.1)).clamp(0.0, 0.4),
        (lig + dl).clamp(0.1, 0.9),
    );
    let kind = rng.random_range(0..BACKGROUNDS.len());
    scene.background = BACKGROUNDS[kind];
    let ang = uniform(rng, 0.0, std::f32::consts::PI);
    let (dx, dy) = (ang.cos(), ang.sin());
    let period = uniform(rng, 0.08, 0.25) * side;
    let cell = uniform(rng, 0.1, 0.25) * side;
    let coarse = ValueNoise::new(rng, w, h, cell);
    let cell = uniform(rng, 0.03, 0.06) * side;
    let fine = ValueNoise::new(rng, w, h, cell);
    let hard = rng.random_bool(0.5);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
            let proj = fx * dx + fy * dy;
            let t = match kind {
                0 => coarse.at(fx, fy) * 0.5 + 0.5,
                1 => ((proj / (side * 1.4)) + 0.5 + 0.15 * coarse.at(fx, fy)).clamp(0.0, 1.0),
                2 => {
                    let s = (proj / period * std::f32::consts::TAU).sin();
                    if hard {
                        (s > 0.0) as u8 as f32
                    } else {
                        s * 0.5 + 0.5
                    }
                }
                3 => {
                    let c = period * 0.7;
                    let (a, b) = ((fx / c).floor() as i64, (fy / c).floor() as i64);
                    ((a + b).rem_euclid(2)) as f32 * 0.7 + 0.15
                }
                _ => {
                    let q = (proj + 0.35 * period * coarse.at(fx, fy) * 3.0) / period;
                    let fr = q - q.floor();
                    (1.0 - (fr * 2.0 - 1.0).abs()).powf(2.0)
                }
            };
            let mut c = mix3(base, other, t);
            let g = 1.0 + 0.5 * contrast * fine.at(fx, fy);
            c = [c[0] * g, c[1] * g, c[2] * g];
            buf[(y * w + x) as usize] = c;
        }
    }

    // clutter: muted irregular blobs that are not objects
    let nclutter = if cfg.clutter > 0 { rng.random_range(0..=cfg.clutter) } else { 0 };
    scene.clutter = nclutter;
    for _ in 0..nclutter {
        let r = uniform(rng, 0.04, 0.12) * side;
        let (cx, cy) = (uniform(rng, 0.0, w as f32), uniform(rng, 0.0, h as f32));
        let col =
            hsl(rng.random::<f32>(), uniform(rng, 0.05, 0.35), (lig + uniform(rng, -0.18, 0.18)).clamp(0.15, 0.85));
        let alpha = uniform(rng, 0.35, 0.8);
        let (a2, p2, a3, p3) =
            (uniform(rng, -0.3, 0.3), uniform(rng, 0.0, 6.3), uniform(rng, -0.2, 0.2), uniform(rng, 0.0, 6.3));
        let ex = uniform(rng, 0.6, 1.6);
        let x0 = (cx - 2.0 * r).max(0.0) as u32;
        let x1 = ((cx + 2.0 * r).max(0.0) as u32).min(w);
        let y0 = (cy - 2.0 * r).max(0.0) as u32;
        let y1 = ((cy + 2.0 * r).max(0.0) as u32).min(h);
        for y in y0..y1 {
            for x in x0..x1 {
                let (ux, uy) = ((x as f32 + 0.5 - cx) / (r * ex), (y as f32 + 0.5 - cy) / (r / ex));
                let th = uy.atan2(ux);
                let rr = (ux * ux + uy * uy).sqrt();
                if rr <= 1.0 + a2 * (2.0 * th + p2).cos() + a3 * (3.0 * th + p3).cos() {
                    let i = (y * w + x) as usize;
                    buf[i] = mix3(buf[i], col, alpha);
                }
            }
        }
    }

    // light direction (towards the light), from above-ish
    let la = uniform(rng, -2.6, -0.5);
    let (lx, ly) = (la.cos(), la.sin());
    let grain = ValueNoise::new(rng, w, h, 1.6);

    for k in 0..scene.objs.len() {
        let sp = scene.objs[k].spec.clone();
        let cat = &CATS[sp.cat];
        // shadow cast away from the light onto whatever is below
        let off = (0.16 * sp.s).max(1.0);
        let (ox, oy) = ((-lx * off).round() as i64, (-ly * off).round() as i64);
        let shadow = cfg.shadow as f32;
        let parts = &scene.objs[k].parts;
        let [bx0, by0, bx1, by1] = scene.objs[k].bbox;
        if shadow > 0.0 {
            for y in by0..by1 {
                for x in bx0..bx1 {
                    if parts[(y * w + x) as usize] == 0 {
                        continue;
                    }
                    let (sx, sy) = (x as i64 + ox, y as i64 + oy);
                    if sx < 0 || sy < 0 || sx >= w as i64 || sy >= h as i64 {
                        continue;
                    }
                    let i = (sy as u32 * w + sx as u32) as usize;
                    if parts[i] == 0 {
                        let c = buf[i];
                        buf[i] = [c[0] * (1.0 - shadow), c[1] * (1.0 - shadow), c[2] * (1.0 - shadow)];
                    }
                }
            }
        }
        // per-object colour
        let cj = cfg.colour_jitter as f32;
        let lum = 1.0 + cj * gauss(rng);
        let base = COLOURS[sp.colour as usize].1;
        let mut body = [0f32; 3];
        for (c, b) in body.iter_mut().zip(base) {
            *c = (b * lum * (1.0 + 0.5 * cj * gauss(rng))).clamp(0.02, 1.0);
        }
        let sl = 1.0 + 0.5 * cj * gauss(rng);
        let second = [cat.secondary[0] * sl, cat.secondary[1] * sl, cat.secondary[2] * sl];
        let cell = uniform(rng, 0.25, 0.5) * sp.s.max(2.0);
        let tex = ValueNoise::new(rng, w, h, cell);
        let texture = cfg.texture as f32;
        let dist = chamfer(parts, w, scene.objs[k].bbox);
        // thin objects (handles, stems) get no dark rim: it would change their colour
        let dmax = dist.iter().copied().fold(0.0f32, f32::max);
        let rim = cfg.edge_darkening as f32 * ((dmax - 1.5) / 3.0).clamp(0.0, 1.0);
        let bw = (bx1 - bx0) as usize;
        for y in by0..by1 {
            for x in bx0..bx1 {
                let i = (y * w + x) as usize;
                let p = parts[i];
                if p == 0 {
                    continue;
                }
                let col = match p {
                    shapes::SECOND => second,
                    shapes::DARK => [body[0] * 0.68, body[1] * 0.68, body[2] * 0.68],
                    shapes::LIGHT => [
                        (body[0] * 1.15 + 0.1).min(1.0),
                        (body[1] * 1.15 + 0.1).min(1.0),
                        (body[2] * 1.15 + 0.1).min(1.0),
                    ],
                    shapes::BLACK => [0.07, 0.07, 0.09],
                    shapes::WHITE => [0.95, 0.95, 0.92],
                    _ => body,
                };
                let (ux, uy) = ((x as f32 + 0.5 - sp.cx) / sp.s, (y as f32 + 0.5 - sp.cy) / sp.s);
                let mut l = 1.0 + cfg.shading as f32 * 0.5 * (ux * lx + uy * ly);
                let d = dist[(y - by0) as usize * bw + (x - bx0) as usize];
                l *= 1.0 - rim * (-(d - 1.0) / 1.2).exp();
                l *= 1.0 + texture * (0.7 * tex.at(x as f32, y as f32) + 0.5 * grain.at(x as f32, y as f32));
                let l = l.clamp(0.3, 1.6);
                buf[i] = [col[0] * l, col[1] * l, col[2] * l];
            }
        }
    }

    // sensor noise (a luminance part and a smaller per-channel part) and quantization
    let sigma = cfg.noise as f32;
    for (i, px) in scene.image.pixels_mut().enumerate() {
        let c = buf[i];
        let n = if sigma > 0.0 { sigma * approx_gauss(rng) } else { 0.0 };
        for (v, &cc) in px.0.iter_mut().zip(c.iter()) {
            let e = if sigma > 0.0 { 0.35 * sigma * (rng.random::<f32>() * 2.0 - 1.0) } else { 0.0 };
            *v = ((cc + n + e).clamp(0.0, 1.0) * 255.0 + 0.5) as u8;
        }
    }
}

/// Distance (pixels, 3-4 chamfer / 3) from each pixel of the bbox to the nearest pixel
/// outside the object; 0 outside.
fn chamfer(parts: &[u8], w: u32, bbox: [u32; 4]) -> Vec<f32> {
    let [x0, y0, x1, y1] = bbox;
    let (bw, bh) = ((x1 - x0) as usize, (y1 - y0) as usize);
    const INF: u32 = 1 << 20;
    let mut d = vec![0u32; bw * bh];
    for y in 0..bh {
        for x in 0..bw {
            if parts[(y + y0 as usize) * w as usize + x + x0 as usize] != 0 {
                d[y * bw + x] = INF;
            }
        }
    }
    // pixels beyond the bbox count as outside (distance 0 there)
    let get = |d: &Vec<u32>, x: i64, y: i64| -> u32 {
        if x < 0 || y < 0 || x >= bw as i64 || y >= bh as i64 {
            0
        } else {
            d[y as usize * bw + x as usize]
        }
    };
    for y in 0..bh as i64 {
        for x in 0..bw as i64 {
            let i = y as usize * bw + x as usize;
            if d[i] == 0 {
                continue;
            }
            let v = d[i]
                .min(get(&d, x - 1, y) + 3)
                .min(get(&d, x, y - 1) + 3)
                .min(get(&d, x - 1, y - 1) + 4)
                .min(get(&d, x + 1, y - 1) + 4);
            d[i] = v;
        }
    }
    for y in (0..bh as i64).rev() {
        for x in (0..bw as i64).rev() {
            let i = y as usize * bw + x as usize;
            if d[i] == 0 {
                continue;
            }
            let v = d[i]
                .min(get(&d, x + 1, y) + 3)
                .min(get(&d, x, y + 1) + 3)
                .min(get(&d, x + 1, y + 1) + 4)
                .min(get(&d, x - 1, y + 1) + 4);
            d[i] = v;
        }
    }
    d.into_iter().map(|v| v as f32 / 3.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Every category in up to three colours, for looking at:
    /// `cargo test -p popen-data gallery -- --ignored` writes /tmp/synth_gallery.png.
    #[test]
    #[ignore]
    fn gallery() {
        let cfg = SynthConfig { clutter: 0, ..Default::default() };
        let tile = 48u32;
        let cols = 9u32;
        let n = CATS.len() as u32 * 3;
        let rows = n.div_ceil(cols);
        let mut sheet = image::RgbImage::from_pixel(cols * tile, rows * tile, image::Rgb([128, 128, 128]));
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut k = 0u32;
        for (ci, c) in CATS.iter().enumerate() {
            for &col in c.colours.iter().take(3) {
                let mut sp = sample_spec(&cfg, &mut rng, ci, col);
                sp.s = 0.3 * tile as f32 * c.size;
                sp.cx = tile as f32 / 2.0;
                sp.cy = tile as f32 / 2.0;
                let p = rasterize(&sp, tile, tile);
                let mut zbuf = vec![-1i16; (tile * tile) as usize];
                for (i, &v) in p.parts.iter().enumerate() {
                    if v != 0 {
                        zbuf[i] = 0;
                    }
                }
                let mut scene = Scene {
                    w: tile,
                    h: tile,
                    objs: vec![p],
                    zbuf,
                    image: image::RgbImage::new(tile, tile),
                    background: "",
                    clutter: 0,
                };
                let cfg2 = SynthConfig { width: tile, height: tile, ..cfg.clone() };
                render(&cfg2, &mut rng, &mut scene);
                image::imageops::replace(
                    &mut sheet,
                    &scene.image,
                    ((k % cols) * tile) as i64,
                    ((k / cols) * tile) as i64,
                );
                k += 1;
            }
        }
        let big = image::imageops::resize(
            &sheet,
            sheet.width() * 3,
            sheet.height() * 3,
            image::imageops::FilterType::Nearest,
        );
        big.save("/tmp/synth_gallery.png").unwrap();
    }
}
