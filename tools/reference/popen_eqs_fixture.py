"""Reference values for POPEN's preference and ensemble equations
(crates/popen-train/tests/fixtures/popen_eqs.json), written for popen-train's
`dpo_loss` and `ensemble_loss` modules.

An independent transcription of /work/shared/SPEC.md sections 5, 6 and 10 in PyTorch
(float64 on float32-representable random inputs; gradients by torch autograd):

- Eq. 3: RLHF-V's dense weighted sequence log-likelihood, lambda = 5, with both
  normalizations: "length" = the paper's (1/|y|)(sum_{i not in L} log p + lambda sum_{i in L} log p)
  and "weighted_count" = RLHF-V's `compute_weighted_logp(use_average=True)`:
  the same weighted sum over (|y| - |L|) + lambda |L|.
- Eq. 2: the text DPO loss, beta_t = 0.5, with TRL's DPOTrainer metrics (rewards/chosen =
  beta (pi - ref) on chosen, rewards/rejected, rewards/accuracies = mean(chosen > rejected),
  rewards/margins, logps/chosen, logps/rejected = policy sequence log-likelihoods).
  Gradients w.r.t. the policy's per-token log-probs.
- Eq. 4: the segmentation preference loss, beta_s = 10, cos (torch.nn.functional.cosine_similarity)
  over the concatenation of all scales (SPEC 10.14), the indicator
  1(score of M_ref^{n,w} >= score of M_theta^{n,m}) on given scores (SPEC 10.10), mean over
  the N targets of a sample, then over the batch. Gradient w.r.t. f_theta.
- SPEC 6 / 10.7 / 10.12 / 10.15: token scores tau_k^i = p_k^i + mean p over the sentence
  holding token i, min-max normalized over all tokens of the K responses to [-1, 1];
  sentence scores eta = mean token probability of the sentence holding a <seg> group,
  min-max normalized over all groups of the K responses; gamma = sigmoid(score) - 0.5.
  All values equal -> 0. Sentences: a token that contains '.', '!', '?' or a newline closes
  the sentence; the next token that holds anything other than those characters and
  whitespace opens the next one (so ".", "\\n\\n" stay with the sentence they end).
  A group belongs to the sentence of its first token.
- Appendix B: L_ti = -(1/K) sum_k log sigmoid(10 p(y~) (cos(h~, h_g) - cos(h_k, h_g))),
  p(y~) = exp(mean log p) (SPEC 10.8), gradient only through p(y~) (the sentence features
  are constants); L_si = -(1/(K N)) sum_k sum_n log sigmoid(10 (softIoU(M~^n, M_g^n) - IoU(M_k^n, M_g^n))),
  softIoU(P, G) = sum(P G) / max(sum(P) + sum(G) - sum(P G), 1e-6) on P = sigmoid(logits)
  (SPEC 10.9), hard IoU of the fixed 0/1 masks M_k with IoU = 1 when both masks are empty
  (the project's convention); mean over the batch. Gradient w.r.t. the refined logits.

Run with torch 2.9.1:

    /tmp/refenv/bin/python tools/reference/popen_eqs_fixture.py
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parents[2] / "crates/popen-train/tests/fixtures/popen_eqs.json"
D = torch.float64


def f32(t):
    """Round to float32 (what the Rust side reads) and compute in float64."""
    return t.float().to(D)


def L(t):
    return t.detach().tolist()


# ---------------------------------------------------------------- Eq. 3 and Eq. 2


def weighted_logp(logprobs, lens, changed, lam, norm):
    """Eq. 3 for a padded [b, max] batch; `changed` = L_y per row (positions < len)."""
    out = []
    for r in range(logprobs.shape[0]):
        n = lens[r]
        w = torch.ones(n, dtype=D)
        for i in set(changed[r]):
            w[i] = lam
        s = (logprobs[r, :n] * w).sum()
        if norm == "length":
            out.append(s / n)
        elif norm == "weighted_count":
            out.append(s / w.sum())
        else:
            raise ValueError(norm)
    return torch.stack(out)


def dpo(pc, pr, rc, rr, beta):
    """TRL's sigmoid DPO loss and metrics (DPOTrainer.dpo_loss / get_batch_loss_metrics)."""
    logits = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(D).mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": pc.detach().mean().item(),
        "logps/rejected": pr.detach().mean().item(),
    }
    return losses.mean(), metrics, L(chosen_rewards), L(rejected_rewards)


def random_side(g, b, mx, lens):
    lp = f32(-torch.rand(b, mx, generator=g) * 4.0 - 0.01)
    changed = []
    for r in range(b):
        k = int(torch.randint(0, lens[r] // 2 + 1, (1,), generator=g))
        changed.append(sorted(torch.randperm(lens[r], generator=g)[:k].tolist()))
    return lp, changed


def text_dpo_case(g, norm):
    b, mx = 4, 9
    beta, lam = 0.5, 5.0
    lens_c, lens_r = [9, 5, 7, 3], [6, 9, 4, 8]
    pc_tok, ch_c = random_side(g, b, mx, lens_c)
    pr_tok, ch_r = random_side(g, b, mx, lens_r)
    # The reference differs from the policy by a little noise per token.
    rc_tok = f32(pc_tok + torch.randn(b, mx, generator=g) * 0.3).clamp(max=-1e-3)
    rr_tok = f32(pr_tok + torch.randn(b, mx, generator=g) * 0.3).clamp(max=-1e-3)
    ch_c[2] = []  # a row without changed tokens
    pc_tok.requires_grad_(True)
    pr_tok.requires_grad_(True)
    pc = weighted_logp(pc_tok, lens_c, ch_c, lam, norm)
    pr = weighted_logp(pr_tok, lens_r, ch_r, lam, norm)
    rc = weighted_logp(rc_tok, lens_c, ch_c, lam, norm)
    rr = weighted_logp(rr_tok, lens_r, ch_r, lam, norm)
    loss, metrics, cr, rj = dpo(pc, pr, rc, rr, beta)
    loss.backward()
    return {
        "norm": norm,
        "beta": beta,
        "lambda": lam,
        "chosen": {"logprobs": L(pc_tok), "ref_logprobs": L(rc_tok), "lens": lens_c, "changed": ch_c},
        "rejected": {"logprobs": L(pr_tok), "ref_logprobs": L(rr_tok), "lens": lens_r, "changed": ch_r},
        "policy_chosen": L(pc),
        "policy_rejected": L(pr),
        "ref_chosen": L(rc),
        "ref_rejected": L(rr),
        "loss": loss.item(),
        "metrics": metrics,
        "chosen_rewards": cr,
        "rejected_rewards": rj,
        "grad_chosen_logprobs": L(pc_tok.grad),
        "grad_rejected_logprobs": L(pr_tok.grad),
    }


# ---------------------------------------------------------------- Eq. 4


def seg_dpo_case(g):
    counts = [2, 1, 3]
    t, scales, c = sum(counts), 2, 5
    beta = 10.0
    ft = f32(torch.randn(t, scales, c, generator=g)).requires_grad_(True)
    fw = f32(torch.randn(t, scales, c, generator=g))
    fl = f32(torch.randn(t, scales, c, generator=g))
    # The reference's median embedding near the policy's (the policy starts as the reference).
    fm = f32(ft.detach() + torch.randn(t, scales, c, generator=g) * 0.2)
    ref_best = f32(torch.rand(t, generator=g))
    pol_med = f32(torch.rand(t, generator=g))
    pol_med[1] = ref_best[1]  # a tie: ">=" keeps the term
    pol_med[4] = ref_best[4] + 0.25  # the policy's median beats the reference's best
    ind = (ref_best >= pol_med).to(D)

    def cos(a, b):
        return F.cosine_similarity(a.reshape(t, -1), b.reshape(t, -1), dim=-1)

    r_w = beta * (cos(ft, fw) - cos(fm, fw))
    r_l = beta * (cos(ft, fl) - cos(fm, fl))
    term = F.logsigmoid(r_w - r_l) * ind
    per_sample, k = [], 0
    for n in counts:
        per_sample.append(term[k : k + n].sum() / n)
        k += n
    loss = -torch.stack(per_sample).mean()
    loss.backward()
    return {
        "beta": beta,
        "counts": counts,
        "f_theta_m": L(ft),
        "f_ref_w": L(fw),
        "f_ref_m": L(fm),
        "f_ref_l": L(fl),
        "ref_best_score": L(ref_best),
        "policy_median_score": L(pol_med),
        "indicator": L(ind),
        "r_w": L(r_w),
        "r_l": L(r_l),
        "loss": loss.item(),
        "grad_f_theta_m": L(ft.grad),
    }


# ---------------------------------------------------------------- tau, eta, gamma

TERMINATORS = ".!?\n"


def sentence_ids(pieces):
    ids, cur, closed = [], 0, False
    for i, p in enumerate(pieces):
        content = any(ch not in TERMINATORS and not ch.isspace() for ch in p)
        if closed and content:
            cur += 1
            closed = False
        ids.append(cur)
        if any(ch in TERMINATORS for ch in p):
            closed = True
    return ids


def minmax_signed(values):
    v = torch.tensor(values, dtype=D)
    lo, hi = v.min(), v.max()
    if hi == lo:
        return [0.0] * len(values)
    return L(2 * (v - lo) / (hi - lo) - 1)


def scores_case(g):
    # Three responses (K = 3) as decoded token pieces; [SEG] stands for a <seg> group token.
    responses = [
        ["The", " red", " apple", " [SEG0]", " [SEG1]", " is", " ripe", ".", " Eat", " it", "!"],
        ["A", " banana", " [SEG0]", " [SEG1]", ".", "\n\n", "It", " is", " sweet", "?", " Yes", " [SEG0]", " [SEG1]", "."],
        ["The", " pear", " [SEG0]", " [SEG1]", " looks", " fresh", "."],
    ]
    groups = [[[3, 4]], [[2, 3], [11, 12]], [[2, 3]]]
    probs = [L(f32(torch.rand(len(r), generator=g) * 0.98 + 0.01)) for r in responses]
    sents = [sentence_ids(r) for r in responses]
    raw_tau, raw_eta = [], []
    for p, s in zip(probs, sents):
        pt = torch.tensor(p, dtype=D)
        st = torch.tensor(s)
        means = {k: pt[st == k].mean() for k in set(s)}
        raw_tau.append([(pt[i] + means[s[i]]).item() for i in range(len(p))])
    for p, s, gr in zip(probs, sents, groups):
        pt = torch.tensor(p, dtype=D)
        st = torch.tensor(s)
        raw_eta.append([pt[st == s[grp[0]]].mean().item() for grp in gr])
    flat_tau = minmax_signed([x for r in raw_tau for x in r])
    flat_eta = minmax_signed([x for r in raw_eta for x in r])

    def unflatten(flat, shape_of):
        out, k = [], 0
        for r in shape_of:
            out.append(flat[k : k + len(r)])
            k += len(r)
        return out

    tau = unflatten(flat_tau, raw_tau)
    eta = unflatten(flat_eta, raw_eta)
    gam = lambda rows: [L(torch.sigmoid(torch.tensor(r, dtype=D)) - 0.5) for r in rows]
    return {
        "pieces": responses,
        "probs": probs,
        "groups": groups,
        "sentence_ids": sents,
        "tau_raw": raw_tau,
        "tau": tau,
        "tau_gamma": gam(tau),
        "eta_raw": raw_eta,
        "eta": eta,
        "eta_gamma": gam(eta),
    }


# ---------------------------------------------------------------- L_ti, L_si


def ti_case(g):
    b, mx, k, dim = 3, 6, 3, 8
    scale = 10.0
    lens = [6, 4, 5]
    lp = f32(-torch.rand(b, mx, generator=g) * 1.5 - 0.01).requires_grad_(True)
    h_t = f32(torch.randn(b, dim, generator=g))
    h_g = f32(torch.randn(b, dim, generator=g))
    h_k = f32(torch.randn(b, k, dim, generator=g))
    losses, ps, gains = [], [], []
    for r in range(b):
        p = torch.exp(lp[r, : lens[r]].mean())
        gain = F.cosine_similarity(h_t[r : r + 1], h_g[r : r + 1], dim=-1) - F.cosine_similarity(
            h_k[r], h_g[r : r + 1].expand(k, dim), dim=-1
        )
        losses.append(-F.logsigmoid(scale * p * gain).mean())
        ps.append(p.item())
        gains.append(L(gain))
    loss = torch.stack(losses).mean()
    loss.backward()
    return {
        "scale": scale,
        "logprobs": L(lp),
        "lens": lens,
        "h_tilde": L(h_t),
        "h_g": L(h_g),
        "h_k": L(h_k),
        "gains": gains,
        "p_tilde": ps,
        "loss": loss.item(),
        "grad_logprobs": L(lp.grad),
    }


def soft_iou(p, gt):
    inter = (p * gt).sum((-2, -1))
    return inter / (p.sum((-2, -1)) + gt.sum((-2, -1)) - inter).clamp(min=1e-6)


def hard_iou(m, gt):
    inter = (m * gt).sum((-2, -1))
    union = m.sum((-2, -1)) + gt.sum((-2, -1)) - inter
    return torch.where(union == 0, torch.ones_like(union), inter / union.clamp(min=1))


def si_case(g):
    scale, k, h, w = 10.0, 3, 6, 7
    samples, losses, grads = [], [], []
    leaves = []
    for n in [2, 1]:
        logits = f32(torch.randn(n, h, w, generator=g) * 3).requires_grad_(True)
        gt = (torch.rand(n, h, w, generator=g) > 0.6).to(D)
        cand = (torch.rand(k, n, h, w, generator=g) > 0.5).to(D)
        if n == 1:
            # An empty target with one empty candidate: hard IoU 1 by convention, 0 for the rest.
            gt[0] = 0
            cand[1, 0] = 0
        leaves.append(logits)
        soft = soft_iou(torch.sigmoid(logits), gt)  # [n]
        hard = hard_iou(cand, gt.unsqueeze(0))  # [k, n]
        loss = -F.logsigmoid(scale * (soft.unsqueeze(0) - hard)).mean()
        losses.append(loss)
        samples.append({"logits": L(logits), "gt": L(gt), "candidates": L(cand), "soft_iou": L(soft), "hard_iou": L(hard)})
    total = torch.stack(losses).mean()
    total.backward()
    for s, leaf, l in zip(samples, leaves, losses):
        s["grad_logits"] = L(leaf.grad)
        s["loss"] = l.item()
    return {"scale": scale, "samples": samples, "loss": total.item()}


def main():
    g = torch.Generator().manual_seed(2026)
    out = {
        "torch": torch.__version__,
        "text_dpo": [text_dpo_case(g, "length"), text_dpo_case(g, "weighted_count")],
        "seg_dpo": seg_dpo_case(g),
        "scores": scores_case(g),
        "ti": ti_case(g),
        "si": si_case(g),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
