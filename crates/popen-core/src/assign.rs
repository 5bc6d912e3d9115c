//! The rectangular linear sum assignment problem (minimum-cost matching of rows to columns).
//!
//! PixelLM matches predicted masks to ground-truth masks with
//! `scipy.optimize.linear_sum_assignment`; this is the same algorithm (shortest augmenting
//! path, Crouse 2016, "On implementing 2D rectangular assignment algorithms", IEEE TAES
//! 52(4), pp. 1685-1686 pseudocode), written with the same visiting order and tie-breaking
//! as SciPy's implementation so that equal-cost alternatives resolve the same way:
//! columns are scanned from the last to the first, a column that ends the path (unassigned)
//! wins a tie, a tall matrix is solved transposed, and the result is sorted by row.
//! popen-eval's tests (`crates/popen-eval/tests/eval/reference.rs`, through its re-export
//! `popen_eval::hungarian`) check it against SciPy 1.17.1 on random and tie-heavy matrices
//! (fixture written by `tools/reference/pixellm_eval.py lsap`). O(r^2 c) for r <= c.
//!
//! It lives in popen-core because two stages use it: the evaluator's mask matching
//! (popen-eval) and the ensemble loss's pairing of `<seg>` groups with ground-truth targets
//! (popen-train, SPEC 10.17), and popen-train must not depend on popen-eval.

use crate::error::{CoreError, Result};

/// Minimum-cost assignment of the rows of a `rows x cols` cost matrix (row-major) to its
/// columns: `min(rows, cols)` pairs `(row, col)`, sorted by row, each row and each column
/// used at most once. Empty matrices give no pairs. NaN or -inf costs are errors; +inf marks
/// a forbidden pair, and a matrix with no complete assignment avoiding them is an error.
pub fn linear_sum_assignment(cost: &[f64], rows: usize, cols: usize) -> Result<Vec<(usize, usize)>> {
    if cost.len() != rows * cols {
        return Err(CoreError::Invalid(format!("assignment: {} costs for a {rows}x{cols} matrix", cost.len())));
    }
    if rows == 0 || cols == 0 {
        return Ok(Vec::new());
    }
    if let Some(i) = cost.iter().position(|c| c.is_nan() || *c == f64::NEG_INFINITY) {
        return Err(CoreError::Invalid(format!("assignment: cost ({}, {}) is {}", i / cols, i % cols, cost[i])));
    }
    // The shortest-path search needs at least as many columns as rows.
    let transpose = cols < rows;
    let (nr, nc, c): (usize, usize, Vec<f64>) = if transpose {
        let mut t = vec![0.0; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = cost[i * cols + j];
            }
        }
        (cols, rows, t)
    } else {
        (rows, cols, cost.to_vec())
    };
    let col4row = solve(&c, nr, nc).ok_or_else(|| {
        CoreError::Invalid(format!("assignment: the {rows}x{cols} cost matrix has no finite assignment"))
    })?;
    let mut pairs: Vec<(usize, usize)> = if transpose {
        // rows of the transposed problem are our columns
        col4row.iter().enumerate().map(|(j, &i)| (i, j)).collect()
    } else {
        col4row.iter().enumerate().map(|(i, &j)| (i, j)).collect()
    };
    pairs.sort_unstable();
    Ok(pairs)
}

/// Solves an `nr x nc` problem with `nr <= nc`; returns the column of each row.
fn solve(cost: &[f64], nr: usize, nc: usize) -> Option<Vec<usize>> {
    const NONE: usize = usize::MAX;
    let mut u = vec![0.0f64; nr];
    let mut v = vec![0.0f64; nc];
    let mut shortest = vec![f64::INFINITY; nc];
    let mut path = vec![NONE; nc];
    let mut col4row = vec![NONE; nr];
    let mut row4col = vec![NONE; nc];
    let mut in_sr = vec![false; nr];
    let mut in_sc = vec![false; nc];
    let mut remaining: Vec<usize> = Vec::with_capacity(nc);

    for cur_row in 0..nr {
        // Dijkstra-like search for the shortest augmenting path from cur_row.
        let mut min_val = 0.0f64;
        let mut i = cur_row;
        remaining.clear();
        // Filled in reverse: a constant cost matrix then yields the identity assignment.
        remaining.extend((0..nc).rev());
        in_sr.iter_mut().for_each(|x| *x = false);
        in_sc.iter_mut().for_each(|x| *x = false);
        shortest.iter_mut().for_each(|x| *x = f64::INFINITY);
        let sink = loop {
            let mut index = NONE;
            let mut lowest = f64::INFINITY;
            in_sr[i] = true;
            for (it, &j) in remaining.iter().enumerate() {
                let r = min_val + cost[i * nc + j] - u[i] - v[j];
                if r < shortest[j] {
                    path[j] = i;
                    shortest[j] = r;
                }
                // Among equal candidates prefer one that ends the path.
                if shortest[j] < lowest || (shortest[j] == lowest && row4col[j] == NONE) {
                    lowest = shortest[j];
                    index = it;
                }
            }
            min_val = lowest;
            if min_val == f64::INFINITY || index == NONE {
                return None;
            }
            let j = remaining[index];
            in_sc[j] = true;
            remaining.swap_remove(index);
            if row4col[j] == NONE {
                break j;
            }
            i = row4col[j];
        };

        // dual update
        u[cur_row] += min_val;
        for r in 0..nr {
            if in_sr[r] && r != cur_row {
                u[r] += min_val - shortest[col4row[r]];
            }
        }
        for j in 0..nc {
            if in_sc[j] {
                v[j] -= min_val - shortest[j];
            }
        }

        // augment along the path
        let mut j = sink;
        loop {
            let r = path[j];
            row4col[j] = r;
            std::mem::swap(&mut col4row[r], &mut j);
            if r == cur_row {
                break;
            }
        }
    }
    Some(col4row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(cost: &[f64], cols: usize, pairs: &[(usize, usize)]) -> f64 {
        pairs.iter().map(|&(i, j)| cost[i * cols + j]).sum()
    }

    /// Brute force over all injective maps of the smaller side (hand-checkable sizes).
    fn brute(cost: &[f64], rows: usize, cols: usize) -> f64 {
        fn rec(cost: &[f64], rows: usize, cols: usize, i: usize, used: &mut Vec<bool>, acc: f64, best: &mut f64) {
            if i == rows {
                *best = best.min(acc);
                return;
            }
            for j in 0..cols {
                if !used[j] {
                    used[j] = true;
                    rec(cost, rows, cols, i + 1, used, acc + cost[i * cols + j], best);
                    used[j] = false;
                }
            }
        }
        let (r, c, m) = if rows <= cols {
            (rows, cols, cost.to_vec())
        } else {
            let mut t = vec![0.0; rows * cols];
            for i in 0..rows {
                for j in 0..cols {
                    t[j * rows + i] = cost[i * cols + j];
                }
            }
            (cols, rows, t)
        };
        let mut best = f64::INFINITY;
        rec(&m, r, c, 0, &mut vec![false; c], 0.0, &mut best);
        best
    }

    #[test]
    fn small_hand_cases() {
        // 3x3 textbook example: optimum 5 via (0,1), (1,0), (2,2)
        let c = [4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 3.0, 2.0, 2.0];
        assert_eq!(linear_sum_assignment(&c, 3, 3).unwrap(), vec![(0, 1), (1, 0), (2, 2)]);
        // wide and tall
        let w = [5.0, 1.0, 9.0, 2.0, 8.0, 0.5];
        assert_eq!(linear_sum_assignment(&w, 2, 3).unwrap(), vec![(0, 1), (1, 2)]);
        let t = [5.0, 2.0, 1.0, 8.0, 9.0, 0.5];
        assert_eq!(linear_sum_assignment(&t, 3, 2).unwrap(), vec![(1, 0), (2, 1)]);
        // constant matrix: identity, as SciPy
        assert_eq!(linear_sum_assignment(&[1.0; 9], 3, 3).unwrap(), vec![(0, 0), (1, 1), (2, 2)]);
        assert!(linear_sum_assignment(&[], 0, 4).unwrap().is_empty());
        assert!(linear_sum_assignment(&[], 3, 0).unwrap().is_empty());
        assert!(linear_sum_assignment(&[1.0, f64::NAN], 1, 2).is_err());
        assert!(linear_sum_assignment(&[1.0], 1, 2).is_err());
        let inf = f64::INFINITY;
        assert!(linear_sum_assignment(&[inf, inf, 1.0, inf], 2, 2).is_err());
        assert_eq!(linear_sum_assignment(&[inf, 1.0, 1.0, inf], 2, 2).unwrap(), vec![(0, 1), (1, 0)]);
    }

    #[test]
    fn optimal_against_brute_force() {
        // deterministic pseudo-random matrices up to 5x6, integer costs (many ties)
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as f64
        };
        for rows in 1..=5 {
            for cols in 1..=6 {
                for _ in 0..20 {
                    let c: Vec<f64> = (0..rows * cols).map(|_| (next() % 5.0).floor()).collect();
                    let p = linear_sum_assignment(&c, rows, cols).unwrap();
                    assert_eq!(p.len(), rows.min(cols));
                    let mut used_r = vec![false; rows];
                    let mut used_c = vec![false; cols];
                    for &(i, j) in &p {
                        assert!(!used_r[i] && !used_c[j]);
                        used_r[i] = true;
                        used_c[j] = true;
                    }
                    assert_eq!(total(&c, cols, &p), brute(&c, rows, cols), "{rows}x{cols} {c:?}");
                }
            }
        }
    }
}
