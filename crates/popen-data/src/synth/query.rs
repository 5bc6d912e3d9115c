//! Instruction templates: from a scene's instances to (instruction, answer, targets).
//!
//! Every template needs some reasoning over attributes, functions, groups, positions, sizes
//! or occlusion; a template that would be ambiguous for the scene (two objects nearly tied
//! for "the biggest", an object half left of the reference, ...) declines and another is
//! tried. Answers name each target as "the <colour> <noun> <seg>", targets ordered left to
//! right.

use super::lexicon::{func, group, is_heldout, CATS, COLOURS, FUNCS, GROUPS, TEMPLATE_KINDS};
use super::scene::Scene;
use super::SynthConfig;
use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// What the templates know about one instance.
#[derive(Clone, Debug)]
pub(crate) struct Inst {
    pub cat: usize,
    pub colour: u8,
    /// Full (unoccluded) shape area and visible area, pixels.
    pub full: u32,
    pub vis: u32,
    /// Visible bounding box x0, y0, x1, y1 (exclusive).
    pub bbox: [u32; 4],
    /// Visible centroid.
    pub cx: f32,
    pub cy: f32,
    /// `covered_by[j]`: pixels of this object's full shape under object j's full shape,
    /// for objects j drawn later (0 otherwise).
    pub covered_by: Vec<u32>,
    pub heldout: bool,
}

pub(crate) fn instances(scene: &Scene) -> Vec<Inst> {
    let n = scene.objs.len();
    let w = scene.w as usize;
    let mut out: Vec<Inst> = scene
        .objs
        .iter()
        .map(|o| Inst {
            cat: o.spec.cat,
            colour: o.spec.colour,
            full: o.area,
            vis: 0,
            bbox: [u32::MAX, u32::MAX, 0, 0],
            cx: 0.0,
            cy: 0.0,
            covered_by: vec![0; n],
            heldout: is_heldout(o.spec.cat, o.spec.colour),
        })
        .collect();
    let mut sx = vec![0f64; n];
    let mut sy = vec![0f64; n];
    let mut here = Vec::with_capacity(n);
    for (i, &z) in scene.zbuf.iter().enumerate() {
        let (x, y) = ((i % w) as u32, (i / w) as u32);
        if z >= 0 {
            let k = z as usize;
            let b = &mut out[k].bbox;
            *b = [b[0].min(x), b[1].min(y), b[2].max(x + 1), b[3].max(y + 1)];
            out[k].vis += 1;
            sx[k] += x as f64 + 0.5;
            sy[k] += y as f64 + 0.5;
        }
        here.clear();
        for (k, o) in scene.objs.iter().enumerate() {
            if o.parts[i] != 0 {
                here.push(k);
            }
        }
        for a in 0..here.len() {
            for b in a + 1..here.len() {
                out[here[a]].covered_by[here[b]] += 1;
            }
        }
    }
    for (k, inst) in out.iter_mut().enumerate() {
        if inst.vis > 0 {
            inst.cx = (sx[k] / inst.vis as f64) as f32;
            inst.cy = (sy[k] / inst.vis as f64) as f32;
        } else {
            inst.bbox = [0, 0, 0, 0];
        }
    }
    out
}

/// A generated instruction and its answer.
#[derive(Clone, Debug)]
pub(crate) struct Query {
    pub kind: &'static str,
    pub variant: String,
    pub instruction: String,
    pub answer: String,
    /// Target instances, in answer order.
    pub targets: Vec<usize>,
    /// Non-target instances the answer or instruction refers to by name.
    pub refs: Vec<usize>,
}

struct Ctx<'a> {
    insts: &'a [Inst],
    cfg: &'a SynthConfig,
    side: f32,
    w: f32,
    h: f32,
}

const NUMBERS: &[&str] = &["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"];

fn num(n: usize) -> String {
    NUMBERS.get(n).map(|s| s.to_string()).unwrap_or_else(|| n.to_string())
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn join(items: &[String], conj: &str) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        n => format!("{} {conj} {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

fn is_are(n: usize) -> &'static str {
    if n == 1 {
        "is"
    } else {
        "are"
    }
}

fn pick<'s>(rng: &mut ChaCha8Rng, xs: &[&'s str]) -> &'s str {
    xs.choose(rng).expect("template list is not empty")
}

/// Fills `{k}` placeholders.
fn fill(t: &str, vars: &[(&str, &str)]) -> String {
    let mut s = t.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

/// Sentence-case: capitalises the first letter.
fn sentence(t: &str, vars: &[(&str, &str)]) -> String {
    cap(&fill(t, vars))
}

fn colour_name(k: u8) -> &'static str {
    COLOURS[k as usize].0
}

impl<'a> Ctx<'a> {
    fn n(&self) -> usize {
        self.insts.len()
    }

    fn count_cat(&self, cat: usize) -> usize {
        self.insts.iter().filter(|i| i.cat == cat).count()
    }

    fn count_combo(&self, cat: usize, colour: u8) -> usize {
        self.insts.iter().filter(|i| i.cat == cat && i.colour == colour).count()
    }

    /// Singular and plural noun of a category: canonical, or a synonym with
    /// probability `synonym_rate`.
    fn noun(&self, rng: &mut ChaCha8Rng, cat: usize) -> (&'static str, &'static str) {
        let c = &CATS[cat];
        if !c.synonyms.is_empty() && rng.random_bool(self.cfg.synonym_rate) {
            *c.synonyms.choose(rng).expect("not empty")
        } else {
            (c.name, c.plural)
        }
    }

    /// "the red ball": the colour is always given when the category occurs more than once.
    fn phrase(&self, rng: &mut ChaCha8Rng, i: usize) -> String {
        let inst = &self.insts[i];
        let (n, _) = self.noun(rng, inst.cat);
        if self.count_cat(inst.cat) > 1 || rng.random_bool(0.8) {
            format!("the {} {n}", colour_name(inst.colour))
        } else {
            format!("the {n}")
        }
    }

    /// Targets sorted left to right, each as "the red ball <seg>", joined with "and".
    fn target_list(&self, rng: &mut ChaCha8Rng, targets: &mut [usize]) -> String {
        targets.sort_by(|&a, &b| {
            self.insts[a].cx.partial_cmp(&self.insts[b].cx).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b))
        });
        let items: Vec<String> = targets.iter().map(|&i| format!("{} {}", self.phrase(rng, i), super::SEG)).collect();
        join(&items, "and")
    }

    /// A unique way to refer to instance i in an instruction, if there is one.
    fn refer(&self, rng: &mut ChaCha8Rng, i: usize, allow_colour: bool) -> Option<String> {
        let inst = &self.insts[i];
        let (n, _) = self.noun(rng, inst.cat);
        if self.count_cat(inst.cat) == 1 {
            if allow_colour && rng.random_bool(0.5) {
                Some(format!("the {} {n}", colour_name(inst.colour)))
            } else {
                Some(format!("the {n}"))
            }
        } else if allow_colour && self.count_combo(inst.cat, inst.colour) == 1 {
            Some(format!("the {} {n}", colour_name(inst.colour)))
        } else {
            None
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        rng: &mut ChaCha8Rng,
        kind: &'static str,
        variant: &str,
        instruction: String,
        answer_tpl: &str,
        mut targets: Vec<usize>,
        refs: Vec<usize>,
        vars: &[(&str, &str)],
    ) -> Option<Query> {
        if targets.is_empty() {
            return None;
        }
        let l = self.target_list(rng, &mut targets);
        let nn = num(targets.len());
        let mut all: Vec<(&str, &str)> = vec![("L", &l), ("N", &nn), ("be", is_are(targets.len()))];
        all.extend_from_slice(vars);
        let answer = sentence(answer_tpl, &all);
        Some(Query { kind, variant: variant.to_string(), instruction, answer, targets, refs })
    }

    fn groups_present(&self) -> Vec<&'static str> {
        GROUPS.iter().map(|g| g.id).filter(|g| self.insts.iter().any(|i| CATS[i.cat].groups.contains(g))).collect()
    }

    fn in_group(&self, i: usize, g: &str) -> bool {
        CATS[self.insts[i].cat].groups.contains(&g)
    }

    /// A scope for superlatives: all objects, a group, a category or a colour; returns
    /// (members, singular noun phrase, variant).
    fn scope(&self, rng: &mut ChaCha8Rng) -> Option<(Vec<usize>, String, String)> {
        let all: Vec<usize> = (0..self.n()).collect();
        let r: f64 = rng.random();
        if r < 0.45 {
            let noun = pick(rng, &["object", "thing"]);
            return Some((all, noun.to_string(), "all".into()));
        }
        if r < 0.65 {
            let gs: Vec<&str> = self.groups_present();
            let g = *gs.choose(rng)?;
            let m: Vec<usize> = all.iter().copied().filter(|&i| self.in_group(i, g)).collect();
            if m.len() >= 2 {
                return Some((m, group(g).singular.to_string(), format!("group:{g}")));
            }
            return None;
        }
        if r < 0.85 {
            let i = rng.random_range(0..self.n());
            let c = self.insts[i].cat;
            let m: Vec<usize> = all.iter().copied().filter(|&j| self.insts[j].cat == c).collect();
            if m.len() >= 2 {
                let (n, _) = self.noun(rng, c);
                return Some((m, n.to_string(), format!("category:{}", CATS[c].name)));
            }
            return None;
        }
        let i = rng.random_range(0..self.n());
        let k = self.insts[i].colour;
        let m: Vec<usize> = all.iter().copied().filter(|&j| self.insts[j].colour == k).collect();
        if m.len() >= 2 {
            return Some((m, format!("{} object", colour_name(k)), format!("colour:{}", colour_name(k))));
        }
        None
    }

    // ------------------------------------------------------------ the templates

    fn colour(&self, rng: &mut ChaCha8Rng) -> Option<Query> {
        let mut cols: Vec<u8> = self.insts.iter().map(|i| i.colour).collect();
        cols.sort();
        cols.dedup();
        let k = prefer_multi(rng, cols, |&k| self.insts.iter().filter(|i| i.colour == k).count())?;
        let c = colour_name(k);
        let targets: Vec<usize> = (0..self.n()).filter(|&j| self.insts[j].colour == k).collect();
        if targets.len() == self.n() {
            return None;
        }
        let q = sentence(
            pick(
                rng,
                &[
                    "Which things are {c}?",
                    "Show me everything that is {c}.",
                    "Segment all the {c} objects.",
                    "Can you find the {c} items in this picture?",
                    "What is {c} in this image?",
                    "Point out every {c} thing.",
                ],
            ),
            &[("c", c)],
        );
        let a = if targets.len() == 1 {
            pick(rng, &["{L} is {c}.", "The only {c} object is {L}.", "I can see one {c} thing: {L}."])
        } else {
            pick(rng, &["{L} are {c}.", "There are {N} {c} objects: {L}.", "I can see {N} {c} things: {L}."])
        };
        self.finish(rng, "colour", c, q, a, targets, vec![], &[("c", c)])
    }

    fn function(&self, rng: &mut ChaCha8Rng) -> Option<Query> {
        let present: Vec<&str> =
            FUNCS.iter().map(|f| f.id).filter(|f| self.insts.iter().any(|i| CATS[i.cat].funcs.contains(f))).collect();
        let f =
            func(prefer_multi(rng, present, |f| self.insts.iter().filter(|i| CATS[i.cat].funcs.contains(f)).count())?);
        let targets: Vec<usize> = (0..self.n()).filter(|&j| CATS[self.insts[j].cat].funcs.contains(&f.id)).collect();
        if targets.len() == self.n() {
            return None;
        }
        let q = pick(rng, f.questions).to_string();
        let a = pick(rng, f.answers);
        self.finish(rng, "function", f.id, q, a, targets, vec![], &[])
    }

    fn group(&self, rng: &mut ChaCha8Rng) -> Option<Query> {
        let g = group(prefer_multi(rng, self.groups_present(), |g| {
            (0..self.n()).filter(|&j| self.in_group(j, g)).count()
        })?);
        let targets: Vec<usize> = (0..self.n()).filter(|&j| self.in_group(j, g.id)).collect();
        if targets.len() == self.n() {
            return None;
        }
        let vars = [("gp", g.plural), ("gs", g.singular), ("gc", g.counted)];
        let q = sentence(
            pick(
                rng,
                &[
                    "Show me all the {gp}.",
                    "Which objects are {gp}?",
                    "Segment every {gs} in the image.",
                    "Find the {gp} in this scene.",
                    "Where are the {gp}?",
                ],
            ),
            &vars,
        );
        let a = if targets.len() == 1 {
            pick(rng, &["{L} is the only {gs} here.", "I see one {gs}: {L}."])
        } else {
            pick(rng, &["{L} are {gp}.", "There are {N} {gc}: {L}.", "I see {N} {gc}: {L}."])
        };
        self.finish(rng, "group", g.id, q, a, targets, vec![], &vars)
    }

    fn category(&self, rng: &mut ChaCha8Rng) -> Option<Query> {
        let i = rng.random_range(0..self.n());
        let cat = self.insts[i].cat;
        let targets: Vec<usize> = (0..self.n()).filter(|&j| self.insts[j].cat == cat).collect();
        let (n, np) = self.noun(rng, cat);
        let vars = [("n", n), ("np", np)];
        let (q, a) = if targets.len() == 1 {
            (
                pick(
                    rng,
                    &[
                        "Where is the {n}?",
                        "Segment the {n}.",
                        "Can you find the {n}?",
                        "Show me the {n}.",
                        "Find the {n} in the picture.",
                    ],
                ),
                pick(rng, &["{L} is here.", "Here is {L}.", "This is {L}."]),
            )
        } else {
            (
                pick(rng, &["Where are the {np}?", "Segment all the {np}.", "Find all the {np}.", "Show me the {np}."]),
                pick(rng, &["There are {N} {np}: {L}.", "Here are the {np}: {L}."]),
            )
        };
        let q = sentence(q, &vars);
        self.finish(rng, "category", CATS[cat].name, q, a, targets, vec![], &vars)
    }

    fn colour_category(&self, rng: &mut ChaCha8Rng) -> Option<Query> {
        let cats: Vec<usize> = (0..CATS.len())
            .filter(|&c| {
                let mut cols: Vec<u8> = self.insts.iter().filter(|i| i.cat == c).map(|i| i.colour).collect();
                cols.sort();
                cols.dedup();
                cols.len() >= 2
            })
            .collect();
        let cat = *cats.choose(rng)?;
        let mine: Vec<usize> = (0..self.n()).filter(|&j| self.insts[j].cat == cat).collect();
        let k = self.insts[*mine.choose(rng)?].colour;
        let targets: Vec<usize> = mine.iter().copied().filter(|&j| self.insts[j].colour == k).collect();
        let others: Vec<usize> = mine.iter().copied().filter(|&j| self.insts[j].colour != k).collect();
        let (n, np) = self.noun(rng, cat);
        let c = colour_name(k);
        let mut okeys: Vec<u8> = others.iter().map(|&j| self.insts[j].colour).collect();
        okeys.sort();
        okeys.dedup();
        let ocols: Vec<&str> = okeys.into_iter().map(colour_name).collect();
        let ocol = join(&ocols.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "and");
        let vars = [("n", n), ("np", np), ("c", c), ("c2", ocol.as_str())];
        let q = if targets.len() == 1 {
            let mut opts = vec![
                "Find the {c} {n}.",
                "Which one is the {c} {n}?",
                "Segment only the {c} {n}.",
                "I want the {c} {n}, please.",
                "Show me the {c} {n}.",
            ];
            if others.len() == 1 {
                opts.push("Segment the {c} {n}, not the {c2} one.");
            }
            pick(rng, &opts)
        } else {
            pick(rng, &["Find the {c} {np}.", "Segment only the {c} {np}.", "Show me the {c} {np}."])
        };
        let q = sentence(q, &vars);
        let a = match (targets.len() == 1, others.len() == 1) {
            (true, true) => {
                pick(rng, &["Here is {L}; the other {n} is {c2}.", "{L} is {c}, while the other {n} is {c2}."])
            }
            (true, false) => {
                pick(rng, &["Here is {L}; the other {np} are {c2}.", "{L} is {c}, while the other {np} are {c2}."])
            }
            (false, true) => pick(rng, &["Here are {L}; the other {n} is {c2}."]),
            (false, false) => pick(rng, &["Here are {L}; the other {np} are {c2}."]),
        };
        self.finish(rng, "colour_category", &format!("{c} {}", CATS[cat].name), q, a, targets, others, &vars)
    }

    fn spatial_relation(&self, rng: &mut ChaCha8Rng) -> Option<Query> {
        let r = rng.random_range(0..self.n());
        let rp = self.refer(rng, r, true)?;
        let rel = *["left", "right", "above", "below"].choose(rng)?;
        let rb = self.insts[r].bbox;
        let tol = 1u32;
        let mut targets = Vec::new();
        for j in 0..self.n() {
            if j == r {
                continue;
            }
            let b = self.insts[j].bbox;
            let (cx, cy) = (self.insts[j].cx, self.insts[j].cy);
            let (strict, loose) = match rel {
                "left" => (b[2] <= rb[0] + tol, cx < rb[0] as f32),
                "right" => (b[0] + tol >= rb[2], cx > rb[2] as f32),
                "above" => (b[3] <= rb[1] + tol, cy < rb[1] as f32),
                _ => (b[1] + tol >= rb[3], cy > rb[3] as f32),
            };
            if strict {
                targets.push(j);
            } else if loose {
                return None; // partly beside the reference: ambiguous
            }
        }
        let vars = [("R", rp.as_str())];
        let (q, a) = match rel {
            "left" => (
                pick(
                    rng,
                    &[
                        "What is to the left of {R}?",
                        "Which objects are left of {R}?",
                        "Segment everything on the left side of {R}.",
                        "Show me what lies to the left of {R}.",
                    ],
                ),
                pick(rng, &["{L} {be} to the left of {R}.", "To the left of {R} {be} {L}."]),
            ),
            "right" => (
                pick(
                    rng,
                    &[
                        "What is to the right of {R}?",
                        "Which objects are right of {R}?",
                        "Segment everything on the right side of {R}.",
                        "Show me what lies to the right of {R}.",
                    ],
                ),
                pick(rng, &["{L} {be} to the right of {R}.", "To the right of {R} {be} {L}."]),
            ),
            "above" => (
                pick(
                    rng,
                    &["What is above {R}?", "Which things are higher up than {R}?", "Segment everything above {R}."],
                ),
                pick(rng, &["{L} {be} above {R}.", "Above {R} {be} {L}."]),
            ),
            _ => (
                pick(
                    rng,
                    &[
                        "What is below {R}?",
                        "Which objects are lower down than {R}?",
                        "Segment everything beneath {R} in the picture.",
                    ],
                ),
                pick(rng, &["{L} {be} below {R}.", "Below {R} {be} {L}."]),
            ),
        };
        let q = sentence(q, &vars);
        self.finish(rng, "spatial_relation", rel, q, a, targets, vec![r], &vars)
    }

    fn spatial_extreme(&self, rng: &mut ChaCha8Rng) -> Option<Query> {
        let (members, sn, scope) = self.scope(rng)?;
        let dir = *["top", "bottom", "left", "right", "centre"].choose(rng)?;
        let (cxm, cym) = (self.w / 2.0, self.h / 2.0);
        let score = |i: usize| -> f32 {
            let b = self.insts[i].bbox;
            match dir {
                "top" => b[1] as f32,
                "bottom" => -(b[3] as f32),
                "left" => b[0] as f32,
                "right" => -(b[2] as f32),
                _ => ((self.insts[i].cx - cxm).powi(2) + (self.insts[i].cy - cym).powi(2)).sqrt(),
            }
        };
        let mut s: Vec<(f32, usize)> = members.iter().map(|&i| (score(i), i)).collect();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        let margin = if dir == "centre" { s[0].0 * 0.25 + 0.05 * self.side } else { (0.04 * self.side).max(2.0) };
        if s.len() < 2 || s[1].0 - s[0].0 < margin {
            return None;
        }
        let vars = [("sn", sn.as_str())];
        let (q, a) = match dir {
            "top" => (
                pick(
                    rng,
                    &[
                        "Which {sn} is closest to the top of the image?",
                        "Segment the {sn} nearest the top edge.",
                        "What is the highest {sn} in the picture?",
                    ],
                ),
                pick(rng, &["{L} is the highest {sn}.", "{L} is closest to the top."]),
            ),
            "bottom" => (
                pick(
                    rng,
                    &["Which {sn} is closest to the bottom of the image?", "Segment the lowest {sn} in the picture."],
                ),
                pick(rng, &["{L} is the lowest {sn}.", "{L} is closest to the bottom."]),
            ),
            "left" => (
                pick(rng, &["Which {sn} is furthest to the left?", "Segment the leftmost {sn}."]),
                pick(rng, &["{L} is the leftmost {sn}.", "{L} is furthest to the left."]),
            ),
            "right" => (
                pick(rng, &["Which {sn} is furthest to the right?", "Segment the rightmost {sn}."]),
                pick(rng, &["{L} is the rightmost {sn}.", "{L} is furthest to the right."]),
            ),
            _ => (
                pick(
                    rng,
                    &[
                        "Which {sn} is closest to the centre of the image?",
                        "Segment the {sn} in the middle of the picture.",
                    ],
                ),
                pick(rng, &["{L} is closest to the centre.", "{L} sits nearest the middle of the picture."]),
            ),
        };
        let q = sentence(q, &vars);
        self.finish(rng, "spatial_extreme", &format!("{dir}/{scope}"), q, a, vec![s[0].1], vec![], &vars)
    }

    fn size(&self, rng: &mut ChaCha8Rng) -> Option<Query> {
        let (members, sn, scope) = self.scope(rng)?;
        let big = rng.random_bool(0.55);
        let mut s: Vec<(u32, usize)> = members.iter().map(|&i| (self.insts[i].full, i)).collect();
        s.sort();
        if big {
            s.reverse();
        }
        let (a0, a1) = (s[0].0 as f32, s[1].0 as f32);
        let ratio = if big { a0 / a1.max(1.0) } else { a1 / a0.max(1.0) };
        if ratio < 1.3 {
            return None;
        }
        let vars = [("sn", sn.as_str())];
        let (q, a) = if big {
            (
                pick(
                    rng,
                    &[
                        "Which is the biggest {sn}?",
                        "Segment the largest {sn} in the picture.",
                        "Find the biggest {sn}.",
                        "Show me the largest {sn}.",
                    ],
                ),
                pick(rng, &["{L} is the biggest {sn}.", "The largest {sn} is {L}."]),
            )
        } else {
            (
                pick(
                    rng,
                    &["Which is the smallest {sn}?", "Segment the tiniest {sn}.", "Find the smallest {sn} here."],
                ),
                pick(rng, &["{L} is the smallest {sn}.", "The smallest {sn} is {L}."]),
            )
        };
        let q = sentence(q, &vars);
        let v = format!("{}/{scope}", if big { "biggest" } else { "smallest" });
        self.finish(rng, "size", &v, q, a, vec![s[0].1], vec![], &vars)
    }

    fn exclusion(&self, rng: &mut ChaCha8Rng) -> Option<Query> {
        match rng.random_range(0..3) {
            0 => {
                // every <group member> that is not <colour>
                let g = group(self.groups_present().choose(rng)?);
                let m: Vec<usize> = (0..self.n()).filter(|&j| self.in_group(j, g.id)).collect();
                let k = self.insts[*m.choose(rng)?].colour;
                let excluded = m.iter().filter(|&&j| self.insts[j].colour == k).count();
                let targets: Vec<usize> = m.iter().copied().filter(|&j| self.insts[j].colour != k).collect();
                if targets.is_empty() {
                    return None;
                }
                let c = colour_name(k);
                let ones = if excluded == 1 { "one" } else { "ones" };
                let vars = [("gp", g.plural), ("gs", g.singular), ("c", c), ("ones", ones)];
                let q = sentence(
                    pick(
                        rng,
                        &[
                            "Show me every {gs} that is not {c}.",
                            "Segment the {gp} except the {c} {ones}.",
                            "Which {gp} are not {c}?",
                        ],
                    ),
                    &vars,
                );
                let a = pick(rng, &["{L} {be} not {c}.", "Leaving out the {c} {ones}, there {be} {L}."]);
                self.finish(rng, "exclusion", &format!("group-not-colour:{}", g.id), q, a, targets, vec![], &vars)
            }
            1 => {
                // all objects except a category
                let cat = self.insts[rng.random_range(0..self.n())].cat;
                let excluded: Vec<usize> = (0..self.n()).filter(|&j| self.insts[j].cat == cat).collect();
                let targets: Vec<usize> = (0..self.n()).filter(|&j| self.insts[j].cat != cat).collect();
                if targets.is_empty() || targets.len() > 5 {
                    return None;
                }
                let (n, np) = self.noun(rng, cat);
                let ex = if excluded.len() == 1 { n } else { np };
                let neg = if targets.len() == 1 { format!("not {} {n}", article(n)) } else { format!("not {np}") };
                let vars = [("ex", ex), ("neg", neg.as_str())];
                let q = sentence(
                    pick(
                        rng,
                        &[
                            "Segment all objects except the {ex}.",
                            "Show me everything but the {ex}.",
                            "Find every object other than the {ex}.",
                        ],
                    ),
                    &vars,
                );
                let a = pick(rng, &["Besides the {ex}, there {be} {L}.", "{L} {be} {neg}."]);
                self.finish(
                    rng,
                    "exclusion",
                    &format!("all-but-category:{}", CATS[cat].name),
                    q,
                    a,
                    targets,
                    excluded,
                    &vars,
                )
            }
            _ => {
                // everything that is not <colour>
                let k = self.insts[rng.random_range(0..self.n())].colour;
                let targets: Vec<usize> = (0..self.n()).filter(|&j| self.insts[j].colour != k).collect();
                if targets.is_empty() || targets.len() > 5 {
                    return None;
                }
                let c = colour_name(k);
                let vars = [("c", c)];
                let q = sentence(
                    pick(
                        rng,
                        &[
                            "Which objects are not {c}?",
                            "Show me everything that isn't {c}.",
                            "Segment all the objects that are not {c}.",
                        ],
                    ),
                    &vars,
                );
                let a = pick(rng, &["{L} {be} not {c}."]);
                self.finish(rng, "exclusion", &format!("not-colour:{c}"), q, a, targets, vec![], &vars)
            }
        }
    }

    fn occlusion(&self, rng: &mut ChaCha8Rng) -> Option<Query> {
        let thr = |i: usize| (0.04 * self.insts[i].full as f32).max(3.0) as u32;
        match rng.random_range(0..3) {
            0 => {
                // what is behind R
                let r = rng.random_range(0..self.n());
                let rp = self.refer(rng, r, true)?;
                let mut targets = Vec::new();
                for j in 0..r {
                    let c = self.insts[j].covered_by[r];
                    if c >= thr(j) {
                        targets.push(j);
                    } else if c > 0 {
                        return None;
                    }
                }
                let vars = [("R", rp.as_str()), ("Rc", &cap(&rp))];
                let q = sentence(
                    pick(
                        rng,
                        &[
                            "What is partly hidden behind {R}?",
                            "Which objects does {R} cover?",
                            "What is {R} blocking from view?",
                            "Segment whatever is partially behind {R}.",
                        ],
                    ),
                    &vars,
                );
                let a = pick(rng, &["{L} {be} partly hidden behind {R}.", "{Rc} covers part of {L}."]);
                self.finish(rng, "occlusion", "behind", q, a, targets, vec![r], &vars)
            }
            1 => {
                // what is in front of R
                let r = rng.random_range(0..self.n());
                let rp = self.refer(rng, r, true)?;
                let mut targets = Vec::new();
                for j in r + 1..self.n() {
                    let c = self.insts[r].covered_by[j];
                    if c >= thr(r) {
                        targets.push(j);
                    } else if c > 0 {
                        return None;
                    }
                }
                let vars = [("R", rp.as_str()), ("Rc", &cap(&rp))];
                let q = sentence(
                    pick(
                        rng,
                        &[
                            "What is lying on top of {R}?",
                            "Which objects partly cover {R}?",
                            "What is in front of {R}?",
                        ],
                    ),
                    &vars,
                );
                let a =
                    pick(rng, &["{L} {be} in front of {R}, covering part of it.", "{Rc} is partly covered by {L}."]);
                self.finish(rng, "occlusion", "in_front", q, a, targets, vec![r], &vars)
            }
            _ => {
                // which objects are partly hidden
                let mut targets = Vec::new();
                for j in 0..self.n() {
                    let hidden = self.insts[j].full - self.insts[j].vis;
                    if hidden as f32 >= (0.08 * self.insts[j].full as f32).max(3.0) {
                        targets.push(j);
                    } else if hidden > 0 {
                        return None;
                    }
                }
                if targets.len() == self.n() {
                    return None;
                }
                let q = pick(
                    rng,
                    &[
                        "Which objects are partly hidden by something else?",
                        "Segment every object that is partially covered.",
                        "What is only partly visible?",
                    ],
                )
                .to_string();
                let a = pick(rng, &["{L} {be} partly covered by other objects.", "Only part of {L} can be seen."]);
                self.finish(rng, "occlusion", "any_hidden", q, a, targets, vec![], &[])
            }
        }
    }

    fn same_colour(&self, rng: &mut ChaCha8Rng) -> Option<Query> {
        let r = rng.random_range(0..self.n());
        let rp = self.refer(rng, r, false)?;
        let k = self.insts[r].colour;
        let targets: Vec<usize> = (0..self.n()).filter(|&j| j != r && self.insts[j].colour == k).collect();
        if targets.len() + 1 >= self.n() {
            return None;
        }
        let c = colour_name(k);
        let vars = [("R", rp.as_str()), ("c", c)];
        let q = sentence(
            pick(
                rng,
                &[
                    "Which objects have the same colour as {R}?",
                    "Find everything that matches the colour of {R}.",
                    "What else is the same colour as {R}?",
                ],
            ),
            &vars,
        );
        let a = pick(rng, &["Like {R}, {L} {be} {c}.", "{L} {be} {c}, just like {R}."]);
        self.finish(rng, "same_colour", c, q, a, targets, vec![r], &vars)
    }

    fn count(&self, rng: &mut ChaCha8Rng) -> Option<Query> {
        if rng.random_bool(0.6) {
            let cats: Vec<usize> = (0..CATS.len()).filter(|&c| self.count_cat(c) >= 2).collect();
            let cat = *cats.choose(rng)?;
            let targets: Vec<usize> = (0..self.n()).filter(|&j| self.insts[j].cat == cat).collect();
            let (_, np) = self.noun(rng, cat);
            let vars = [("np", np)];
            let q = sentence(
                pick(
                    rng,
                    &[
                        "How many {np} are there? Segment them.",
                        "Count the {np} and show me each one.",
                        "How many {np} can you see? Mark each of them.",
                    ],
                ),
                &vars,
            );
            let a = pick(rng, &["There are {N} {np}: {L}.", "I count {N} {np}: {L}."]);
            self.finish(rng, "count", &format!("category:{}", CATS[cat].name), q, a, targets, vec![], &vars)
        } else {
            let gs: Vec<&str> = self
                .groups_present()
                .into_iter()
                .filter(|g| (0..self.n()).filter(|&j| self.in_group(j, g)).count() >= 2)
                .collect();
            let g = group(gs.choose(rng)?);
            let targets: Vec<usize> = (0..self.n()).filter(|&j| self.in_group(j, g.id)).collect();
            let vars = [("gc", g.counted)];
            let q = sentence(
                pick(rng, &["How many {gc} are there? Segment them.", "Count the {gc} and show me each one."]),
                &vars,
            );
            let a = pick(rng, &["There are {N} {gc}: {L}.", "I count {N} {gc}: {L}."]);
            self.finish(rng, "count", &format!("group:{}", g.id), q, a, targets, vec![], &vars)
        }
    }

    fn run(&self, kind: &str, rng: &mut ChaCha8Rng) -> Option<Query> {
        match kind {
            "colour" => self.colour(rng),
            "function" => self.function(rng),
            "group" => self.group(rng),
            "category" => self.category(rng),
            "colour_category" => self.colour_category(rng),
            "spatial_relation" => self.spatial_relation(rng),
            "spatial_extreme" => self.spatial_extreme(rng),
            "size" => self.size(rng),
            "exclusion" => self.exclusion(rng),
            "occlusion" => self.occlusion(rng),
            "same_colour" => self.same_colour(rng),
            "count" => self.count(rng),
            _ => None,
        }
    }
}

/// Picks a candidate, preferring (with probability 0.7) those that select two or more
/// objects: MUSE questions usually have several targets.
fn prefer_multi<T: Copy>(rng: &mut ChaCha8Rng, cands: Vec<T>, count: impl Fn(&T) -> usize) -> Option<T> {
    let multi: Vec<T> = cands.iter().copied().filter(|c| count(c) >= 2).collect();
    if !multi.is_empty() && rng.random_bool(0.7) {
        multi.choose(rng).copied()
    } else {
        cands.choose(rng).copied()
    }
}

/// Draws an instruction for the scene: template kinds are tried in a weighted random
/// order (each a few times) until one fits. With `need_heldout` the query must have a
/// held-out category-colour combination among its targets.
pub(crate) fn make_query(
    cfg: &SynthConfig,
    scene: &Scene,
    insts: &[Inst],
    rng: &mut ChaCha8Rng,
    need_heldout: bool,
) -> Option<Query> {
    let ctx = Ctx { insts, cfg, side: scene.w.min(scene.h) as f32, w: scene.w as f32, h: scene.h as f32 };
    let mut kinds: Vec<(&'static str, f64)> =
        TEMPLATE_KINDS.iter().map(|&k| (k, cfg.template_weight(k))).filter(|(_, w)| *w > 0.0).collect();
    while !kinds.is_empty() {
        let total: f64 = kinds.iter().map(|k| k.1).sum();
        let mut x = rng.random::<f64>() * total;
        let mut idx = kinds.len() - 1;
        for (i, k) in kinds.iter().enumerate() {
            if x < k.1 {
                idx = i;
                break;
            }
            x -= k.1;
        }
        let (kind, _) = kinds.remove(idx);
        for _ in 0..4 {
            if let Some(q) = ctx.run(kind, rng) {
                if need_heldout && !q.targets.iter().any(|&t| insts[t].heldout) {
                    continue;
                }
                return Some(q);
            }
        }
    }
    None
}
