"""A small CUDA workload for compute-sanitizer: every op, several tile and k shapes,
streaming, drop_nearest, every dtype. Exits non-zero if CUDA and CPU disagree."""

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
    torch.cuda.synchronize()
    print("sanitize case: ok")


if __name__ == "__main__":
    main()
