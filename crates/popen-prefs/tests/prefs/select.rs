//! Eq. 1, the boundary score and Algorithm 1's selection rules on hand-built cases (values
//! computed by hand in the comments).
use popen_core::mask::Mask;
use popen_prefs::select::{
    select_phase1, select_phase2, select_with_regeneration, Outcome, Phase, Scored, SelectConfig, Targets,
};

fn rect(y0: u32, y1: u32, x0: u32, x1: u32) -> Mask {
    Mask::from_fn(10, 10, |y, x| y >= y0 && y < y1 && x >= x0 && x < x1)
}

fn union(a: &Mask, b: &Mask) -> Mask {
    Mask::from_fn(10, 10, |y, x| a.get(y, x) || b.get(y, x))
}

#[test]
fn eq1_hand_computed() {
    let cfg = SelectConfig::default();
    let target = rect(0, 5, 0, 5); // 25 px
    let other = rect(5, 10, 5, 10); // 25 px, disjoint
                                    // SAM returns the target itself and the other object: the target is excluded from the max.
    let gt = [target.clone()];
    let props = [target.clone(), other.clone()];
    let t = Targets::new(&gt, &props, &cfg).unwrap();
    let on = t.score(std::slice::from_ref(&target)).unwrap();
    assert_eq!(on.s, 1.0); // 1 - max(IoU with other = 0)
    assert_eq!(on.b, 1.0);
    let off = t.score(std::slice::from_ref(&other)).unwrap();
    assert_eq!(off.s, -1.0); // 0 - 1
    let both = t.score(&[union(&target, &other)]).unwrap();
    assert_eq!(both.s, 0.0); // 25/50 - 25/50
                             // A proposal covering 2/5 of the target (IoU 0.4 < 0.5) is "another object".
    let part = rect(0, 2, 0, 5);
    let props2 = [other.clone(), part];
    let t2 = Targets::new(&gt, &props2, &cfg).unwrap();
    assert!((t2.score(std::slice::from_ref(&target)).unwrap().s - 0.6).abs() < 1e-12); // 1 - 10/25
                                                                                       // No proposals: the max term is 0.
    let t3 = Targets::new(&gt, &[], &cfg).unwrap();
    assert_eq!(t3.score(std::slice::from_ref(&other)).unwrap().s, 0.0);
    // Two targets: the mean of the terms.
    let gt2 = [target.clone(), other.clone()];
    let t4 = Targets::new(&gt2, &props, &cfg).unwrap();
    let sc = t4.score(&[target.clone(), target.clone()]).unwrap();
    // target 0: 1 - 0 = 1; target 1 (other): IoU(target, other) = 0, minus max over
    // proposals that are not `other` = {target}: IoU 1 -> -1. Mean 0.
    assert_eq!(sc.s_terms, vec![1.0, -1.0]);
    assert_eq!(sc.s, 0.0);
    assert_eq!(sc.b_terms[0], 1.0);
    assert_eq!(sc.b_terms[1], 0.0);
    // Wrong counts and sizes are errors.
    assert!(t4.score(std::slice::from_ref(&target)).is_err());
    assert!(t.score(&[Mask::zeros(5, 5)]).is_err());
    assert!(Targets::new(&[], &props, &cfg).is_err());
}

fn sc(s_terms: &[f64], b_terms: &[f64]) -> Scored {
    let m = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Scored { s: m(s_terms), s_terms: s_terms.to_vec(), b: m(b_terms), b_terms: b_terms.to_vec() }
}

#[test]
fn phase1_rules_hand_computed() {
    let cfg = SelectConfig::default();
    // s = [0.5, 0.9, -0.2, 0.1, 0.3]; best first: 1, 0, 4, 3, 2 -> kept (1, 4, 2).
    let batch = vec![
        sc(&[0.5, 0.5], &[0.5, 0.5]),
        sc(&[0.8, 1.0], &[0.5, 0.5]),
        sc(&[-0.3, -0.1], &[0.5, 0.5]),
        sc(&[0.1, 0.1], &[0.5, 0.5]),
        sc(&[0.9, -0.3], &[0.5, 0.5]),
    ];
    let sel = select_phase1(&batch, &cfg).unwrap().unwrap();
    assert_eq!(sel.kept, [1, 4, 2]);
    // Target 0 on kept: [0.8, 0.9, -0.3] -> [1, 0, 2]; target 1: [1.0, -0.3, -0.1] -> [0, 2, 1].
    assert_eq!(sel.rankings, vec![[1, 0, 2], [0, 2, 1]]);
    // max must exceed 0.8 and min be below 0 strictly.
    let edge = vec![sc(&[0.8], &[0.]), sc(&[-0.5], &[0.]), sc(&[0.2], &[0.])];
    assert_eq!(select_phase1(&edge, &cfg).unwrap(), None);
    let edge2 = vec![sc(&[0.9], &[0.]), sc(&[0.0], &[0.]), sc(&[0.2], &[0.])];
    assert_eq!(select_phase1(&edge2, &cfg).unwrap(), None);
    assert!(select_phase1(&batch[..2], &cfg).is_err(), "fewer than 3 images");
}

#[test]
fn phase2_rules_hand_computed() {
    let cfg = SelectConfig::default();
    // s: 5 (0.95), 0 (0.9), 1 (0.8), 2 (0.7), 3 (0.6) are the top 5; 4 and 6 are out even
    // though 6 has the best boundary. b among the top 5: 1 (0.9), 5 (0.6), 2 (0.5), 3 (0.4),
    // 0 (0.2) -> kept (1, 2, 0).
    let s = [0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.1];
    let b = [0.2, 0.9, 0.5, 0.4, 0.3, 0.6, 1.0];
    let batch: Vec<Scored> = s.iter().zip(&b).map(|(s, b)| sc(&[*s], &[*b])).collect();
    let sel = select_phase2(&batch, &cfg).unwrap();
    assert_eq!(sel.kept, [1, 2, 0]);
    assert_eq!(sel.rankings, vec![[0, 1, 2]]);
}

#[test]
fn regeneration_is_capped_and_counted() {
    let cfg = SelectConfig::default();
    let bad = || vec![sc(&[0.5], &[0.]), sc(&[0.4], &[0.]), sc(&[0.3], &[0.])];
    let good = || vec![sc(&[0.9], &[0.]), sc(&[0.4], &[0.]), sc(&[-0.3], &[0.])];
    let mut calls = 0;
    let out = select_with_regeneration(Phase::One, &cfg, |_| {
        calls += 1;
        Ok(bad())
    })
    .unwrap();
    assert_eq!(calls, 6, "the first batch and at most 5 regenerations");
    match out {
        Outcome::Skipped { batches, reason } => {
            assert_eq!(batches, 6);
            assert!(reason.contains("max 0.500"), "{reason}");
        }
        o => panic!("{o:?}"),
    }
    let out = select_with_regeneration(Phase::One, &cfg, |b| Ok(if b < 2 { bad() } else { good() })).unwrap();
    match out {
        Outcome::Selected { batch, selection, .. } => {
            assert_eq!(batch, 2);
            assert_eq!(selection.kept, [0, 1, 2]);
        }
        o => panic!("{o:?}"),
    }
    // Phase 2 takes the first batch as it is.
    let mut calls = 0;
    let out = select_with_regeneration(Phase::Two, &cfg, |_| {
        calls += 1;
        Ok(bad())
    })
    .unwrap();
    assert_eq!(calls, 1);
    assert!(matches!(out, Outcome::Selected { batch: 0, .. }));
}

/// `phase2_top` below 3 (0 in particular) is refused with the field named, by the collect-ps
/// config and by phase 2 itself; before, it was silently raised to 3 and 0 was accepted.
#[test]
fn phase2_top_below_three_is_refused() {
    let batch = vec![sc(&[0.9], &[0.1]), sc(&[0.4], &[0.5]), sc(&[-0.3], &[0.9])];
    for top in [0, 1, 2] {
        let cfg = SelectConfig { phase2_top: top, ..SelectConfig::default() };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("phase2_top") && e.contains(&format!("got {top}")), "{e}");
        let e = select_phase2(&batch, &cfg).unwrap_err().to_string();
        assert!(e.contains("phase2_top"), "{e}");
        let mut ps = popen_prefs::collect_ps::CollectPsConfig::default();
        ps.select.phase2_top = top;
        let e = ps.validate().unwrap_err().to_string();
        assert!(e.contains("phase2_top"), "{e}");
    }
    // 3 (every image of a 3-image batch) and the default 5 are fine.
    for top in [3, 5] {
        let cfg = SelectConfig { phase2_top: top, ..SelectConfig::default() };
        cfg.validate().unwrap();
        assert_eq!(select_phase2(&batch, &cfg).unwrap().kept.len(), 3);
    }
}
