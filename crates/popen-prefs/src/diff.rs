//! Token diffs for the text preference `P_t` (SPEC 3.4), as RLHF-V computes them.
//!
//! RLHF-V diffs the rejected and the chosen token ids with Python's
//! `difflib.SequenceMatcher(None, a, b)`, keeps the matching blocks of at least 3 tokens,
//! and takes the gaps between consecutive kept blocks; a gap counts only when it is
//! non-empty on *both* sides (a replacement: pure insertions and deletions are not
//! weighted). `L_y` / `L_yc` are the positions covered by those gaps in `y` / `y_c`.
//!
//! [`SequenceMatcher`] ports difflib's algorithm exactly (including its "autojunk" heuristic
//! for sequences of 200 or more elements, on by default in Python), so the positions equal
//! Python's on the same ids; `tools/reference/difflib_fixture.py` wrote the fixture the tests
//! compare with.

use std::collections::HashMap;
use std::hash::Hash;

/// A matching block: `a[a..a + size] == b[b..b + size]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Block {
    pub a: usize,
    pub b: usize,
    pub size: usize,
}

/// Python's `difflib.SequenceMatcher(None, a, b, autojunk)` without a junk function.
pub struct SequenceMatcher<'s, T: Eq + Hash> {
    a: &'s [T],
    b: &'s [T],
    /// Positions of each element of `b`, popular elements removed (difflib's `b2j`).
    b2j: HashMap<&'s T, Vec<usize>>,
}

impl<'s, T: Eq + Hash> SequenceMatcher<'s, T> {
    /// difflib's default: `autojunk = true`.
    pub fn new(a: &'s [T], b: &'s [T]) -> Self {
        Self::with_autojunk(a, b, true)
    }

    pub fn with_autojunk(a: &'s [T], b: &'s [T], autojunk: bool) -> Self {
        let mut b2j: HashMap<&T, Vec<usize>> = HashMap::new();
        for (i, x) in b.iter().enumerate() {
            b2j.entry(x).or_default().push(i);
        }
        // difflib's `__chain_b`: with autojunk and len(b) >= 200, an element occurring more
        // than len(b) // 100 + 1 times is "popular" and cannot start a match.
        if autojunk && b.len() >= 200 {
            let ntest = b.len() / 100 + 1;
            b2j.retain(|_, idx| idx.len() <= ntest);
        }
        SequenceMatcher { a, b, b2j }
    }

    /// difflib's `find_longest_match(alo, ahi, blo, bhi)`: the longest matching block in
    /// the ranges, earliest in `a` then in `b` among equals, extended over equal neighbours
    /// (popular elements included, as difflib does: they are not junk).
    #[allow(clippy::needless_range_loop)] // difflib's loop, transcribed index for index
    pub fn find_longest_match(&self, alo: usize, ahi: usize, blo: usize, bhi: usize) -> Block {
        let (a, b) = (self.a, self.b);
        let (mut besti, mut bestj, mut bestsize) = (alo, blo, 0usize);
        let mut j2len: HashMap<usize, usize> = HashMap::new();
        for i in alo..ahi {
            let mut new: HashMap<usize, usize> = HashMap::new();
            if let Some(js) = self.b2j.get(&a[i]) {
                for &j in js {
                    if j < blo {
                        continue;
                    }
                    if j >= bhi {
                        break;
                    }
                    let k = j.checked_sub(1).and_then(|p| j2len.get(&p)).copied().unwrap_or(0) + 1;
                    new.insert(j, k);
                    if k > bestsize {
                        besti = i + 1 - k;
                        bestj = j + 1 - k;
                        bestsize = k;
                    }
                }
            }
            j2len = new;
        }
        while besti > alo && bestj > blo && a[besti - 1] == b[bestj - 1] {
            besti -= 1;
            bestj -= 1;
            bestsize += 1;
        }
        while besti + bestsize < ahi && bestj + bestsize < bhi && a[besti + bestsize] == b[bestj + bestsize] {
            bestsize += 1;
        }
        Block { a: besti, b: bestj, size: bestsize }
    }

    /// difflib's `get_matching_blocks()`: sorted, adjacent blocks merged, ending with the
    /// sentinel `(len(a), len(b), 0)`.
    pub fn matching_blocks(&self) -> Vec<Block> {
        let (la, lb) = (self.a.len(), self.b.len());
        let mut queue = vec![(0, la, 0, lb)];
        let mut blocks = Vec::new();
        while let Some((alo, ahi, blo, bhi)) = queue.pop() {
            let m = self.find_longest_match(alo, ahi, blo, bhi);
            if m.size > 0 {
                blocks.push(m);
                if alo < m.a && blo < m.b {
                    queue.push((alo, m.a, blo, m.b));
                }
                if m.a + m.size < ahi && m.b + m.size < bhi {
                    queue.push((m.a + m.size, ahi, m.b + m.size, bhi));
                }
            }
        }
        blocks.sort();
        let mut out = Vec::with_capacity(blocks.len() + 1);
        let mut cur = Block { a: 0, b: 0, size: 0 };
        for m in blocks {
            if cur.a + cur.size == m.a && cur.b + cur.size == m.b {
                cur.size += m.size;
            } else {
                if cur.size > 0 {
                    out.push(cur);
                }
                cur = m;
            }
        }
        if cur.size > 0 {
            out.push(cur);
        }
        out.push(Block { a: la, b: lb, size: 0 });
        out
    }
}

/// RLHF-V's default minimum size of a matching block that anchors the diff.
pub const MIN_MATCH: usize = 3;

/// Changed positions of a rejected/chosen pair (`L_y`, `L_yc`), RLHF-V's `get_diff_ids(y,
/// y_c, min_match_size)`: positions in `y` and in `y_c` of the replaced spans between the
/// matching blocks of at least `min_match` tokens. Sorted, without duplicates.
pub fn changed_positions<T: Eq + Hash>(y: &[T], y_c: &[T], min_match: usize) -> (Vec<usize>, Vec<usize>) {
    let blocks = SequenceMatcher::new(y, y_c).matching_blocks();
    let last = blocks.len() - 1;
    // Kept blocks: long enough ones plus the sentinel.
    let kept: Vec<Block> =
        blocks.iter().enumerate().filter(|(i, m)| *i == last || m.size >= min_match).map(|(_, m)| *m).collect();
    let (mut ly, mut lyc) = (Vec::new(), Vec::new());
    let (mut a0, mut b0) = (0usize, 0usize);
    for m in &kept {
        // The gap before this block, on both sides.
        if m.a > a0 && m.b > b0 {
            ly.extend(a0..m.a);
            lyc.extend(b0..m.b);
        }
        a0 = m.a + m.size;
        b0 = m.b + m.size;
    }
    ly.sort_unstable();
    ly.dedup();
    lyc.sort_unstable();
    lyc.dedup();
    (ly, lyc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_docs_example() {
        // difflib docs: SequenceMatcher(None, "abxcd", "abcd").get_matching_blocks()
        // == [Match(a=0, b=0, size=2), Match(a=3, b=2, size=2), Match(a=5, b=4, size=0)]
        let (a, b): (Vec<char>, Vec<char>) = ("abxcd".chars().collect(), "abcd".chars().collect());
        let m = SequenceMatcher::new(&a, &b).matching_blocks();
        assert_eq!(
            m,
            vec![Block { a: 0, b: 0, size: 2 }, Block { a: 3, b: 2, size: 2 }, Block { a: 5, b: 4, size: 0 }]
        );
        // find_longest_match(" abcd", "abcd abcd") == Match(a=0, b=4, size=5)
        let (a, b): (Vec<char>, Vec<char>) = (" abcd".chars().collect(), "abcd abcd".chars().collect());
        assert_eq!(SequenceMatcher::new(&a, &b).find_longest_match(0, 5, 0, 9), Block { a: 0, b: 4, size: 5 });
    }

    #[test]
    fn replaced_word_hand_computed() {
        // y   = the red cup is on the table .
        // y_c = the blue cup is on the table .
        let y = [1, 2, 3, 4, 5, 6, 7, 8];
        let yc = [1, 9, 3, 4, 5, 6, 7, 8];
        // blocks: (0,0,1) too short, (2,2,6) kept; gap before it: a 0..2, b 0..2.
        assert_eq!(changed_positions(&y, &yc, 3), (vec![0, 1], vec![0, 1]));
        // Pure insertion: not weighted.
        let yc2 = [1, 2, 3, 4, 10, 11, 5, 6, 7, 8];
        assert_eq!(changed_positions(&y, &yc2, 3), (vec![], vec![]));
        // Identical: nothing.
        assert_eq!(changed_positions(&y, &y, 3), (vec![], vec![]));
    }
}
