"""A small CUDA workload for compute-sanitizer: every op and kernel (norms, the shift, the
format conversions, the filter GEMMs, the fallback probe, the select kernel, the vote),
several tile and k shapes, streaming, drop_nearest, every dtype and every filter mode.
Exits non-zero if CUDA and CPU disagree."""

import torch

import pdepth


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    for m, n, d, k in [(3, 40, 5, 7), (130, 1500, 33, 30), (17, 2100, 8, 300)]:
        q = torch.randint(-3, 4, (m, d)).float()
        s = torch.randint(-3, 4, (n, d)).float()
        lab = torch.randint(0, 5, (n,))
        si = torch.randint(-1, n, (m,))
        for policy in pdepth.SELF_MATCH_POLICIES:
            a = pdepth.knn_vote(q, s, lab, k, self_index=si, self_match=policy)
            b = pdepth.knn_vote(
                q.to(dev), s.to(dev), lab.to(dev), k, self_index=si.to(dev), self_match=policy
            )
            assert torch.equal(a.index, b.index.cpu()) and torch.equal(a.pred, b.pred.cpu())
        for dtype in (torch.float64, torch.float16, torch.bfloat16):
            a = pdepth.knn(q.to(dtype), s.to(dtype), k)
            b = pdepth.knn(q.to(dev, dtype), s.to(dev, dtype), k)
            assert torch.equal(a.index, b.index.cpu())
        run = pdepth.empty_topk(m, k, device=dev)
        for o in range(0, n, 97):
            run = pdepth.knn(q.to(dev), s[o : o + 97].to(dev), k, prev=run, offset=o)
        assert torch.equal(run.index.cpu(), pdepth.knn(q, s, k).index)
        assert torch.equal(pdepth.vote(a.index.to(dev) % 5, 5).cpu(), pdepth.vote(a.index % 5, 5))
    filter_modes(dev)
    torch.cuda.synchronize()
    print("sanitize case: ok")


def filter_modes(dev: str) -> None:
    """Every filter mode equals fp32: shifted rows (the centring kernels), D across a
    reduction block (8192), a forced fallback (the probe kernel), knn_vote."""
    g = torch.Generator().manual_seed(1)
    cases = [(40, 900, 70, 9, 3.0), (6, 300, 8200, 4, 0.0), (33, 2100, 16, 40, 0.0)]
    for m, n, d, k, shift in cases:
        q = (torch.randn(m, d, generator=g) + shift).to(dev)
        s = (torch.randn(n, d, generator=g) + shift).to(dev)
        lab = torch.randint(0, 4, (n,), generator=g).to(dev)
        ref = pdepth.knn_vote(q, s, lab, k, 4, filter="fp32")
        for budget in (-1.0, 0.0):  # the default rule, then every probed tile falls back
            pdepth._C._knn_test_hooks("", budget)
            for f in ("tf32", "bf16", "bf16x3"):
                out = pdepth.knn_vote(q, s, lab, k, 4, filter=f)
                assert torch.equal(out.index, ref.index) and torch.equal(out.pred, ref.pred), f
        pdepth._C._knn_test_hooks("", -1.0)


if __name__ == "__main__":
    main()
