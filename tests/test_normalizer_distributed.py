"""MarginNormalizer and KTO's KL estimate across two data-parallel ranks (torch.distributed, gloo, CPU).

Ranks hold different numbers of pairs with different g; both must end with the
same statistics, equal to those of the concatenated batch: per call outside an optimiser step,
and once per step, from every micro-batch of both ranks, inside one (`begin_step`/`end_step`).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port

# per step, per rank: unequal sizes on purpose
STEPS = [
    [[0.1, 0.5, -0.3], [2.0, 1.0, 0.0, -1.0, 0.7]],
    [[0.4, 0.4], [1.5, -0.2, 0.9]],
]
FROZEN = [[3.0], [4.0, 5.0]]
# optimiser steps: per step, per rank, its micro-batches (unequal sizes and counts on purpose);
# step 1 holds the same values as STEPS[0]
POOLED = [
    [[[0.1, 0.5], [-0.3]], [[2.0, 1.0, 0.0], [-1.0, 0.7]]],
    [[[0.4, 0.4, 1.1]], [[1.5], [-0.2, 0.9]]],
]
# KTO log-ratios per rank (policy − reference; the reference is 0): r_w, r_l, unequal sizes
KTO_R = [([1.0, 2.0], [0.5, -0.5]), ([4.0, 0.0, -1.0], [2.0, 1.0, 0.0])]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from alphadpo_cli.losses import MarginNormalizer

        results = {}
        for mode in ("ema", "official", "batch"):
            norm = MarginNormalizer(mode)
            rows = []
            for step in STEPS:
                z = norm(torch.tensor(step[rank], dtype=torch.float64))
                rows.append((norm.mu, norm.sigma, z.tolist()))
            with norm.frozen():  # no update, and no collective needed: ranks may call a different number of times
                z = norm(torch.tensor(FROZEN[rank], dtype=torch.float64))
            rows.append((norm.mu, norm.sigma, z.tolist()))
            results[mode] = rows
        for mode in ("ema", "batch"):
            norm = MarginNormalizer(mode)
            rows = []
            for step in POOLED:
                norm.begin_step()
                zs = [norm(torch.tensor(mb, dtype=torch.float64)).tolist() for mb in step[rank]]
                used = norm.end_step()
                rows.append((zs, used, norm.mu, norm.sigma))
            # rank 0 pools nothing (frozen) and still joins the step's all-gather: rank 1's values update both
            norm.begin_step()
            with contextlib.ExitStack() as stack:
                if rank == 0:
                    stack.enter_context(norm.frozen())
                norm(torch.tensor([3.0, 5.0], dtype=torch.float64))
            rows.append(([], norm.end_step(), norm.mu, norm.sigma))
            results[f"pooled-{mode}"] = rows
        from alphadpo_cli.losses import PreferenceLogps, compute_loss

        r_w, r_l = (torch.tensor(x, dtype=torch.float64) for x in KTO_R[rank])
        n = len(r_w)
        ones, zeros = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        out = compute_loss("kto", PreferenceLogps(r_w, r_l, ones, ones, zeros, zeros), {"beta": 0.1})
        results["kto"] = (out.metrics["kl/chosen"], out.metrics["kl/rejected"], out.losses.tolist())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_statistics_of_the_concatenation(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    # expected, by hand, from the concatenated batches
    ema_mu = ema_sd = off_mu = off_sd = 0.0
    for k, step in enumerate(STEPS, start=1):
        allg = step[0] + step[1]
        mean, std = statistics.fmean(allg), statistics.stdev(allg)
        ema_mu, ema_sd = 0.9 * ema_mu + 0.1 * mean, 0.9 * ema_sd + 0.1 * std
        off_mu, off_sd = 0.9 * off_mu + 0.1 * mean, 0.9 * off_sd + 0.1 * std
        expected = {
            "ema": (ema_mu / (1 - 0.9**k), ema_sd / (1 - 0.9**k)),
            "official": (off_mu, off_sd),
            "batch": (mean, std),
        }
        for mode, (mu, sd) in expected.items():
            for rank in range(world):
                got_mu, got_sd, z = res[rank][mode][k - 1]
                assert math.isclose(got_mu, mu, rel_tol=1e-12), (mode, rank, k)
                assert math.isclose(got_sd, sd, rel_tol=1e-12), (mode, rank, k)
                # each rank normalises its own (local) g
                for zi, gi in zip(z, step[rank]):
                    assert math.isclose(zi, (gi - mu) / sd, rel_tol=1e-9, abs_tol=1e-12)
            assert res[0][mode][k - 1][:2] == res[1][mode][k - 1][:2]  # bitwise identical on both ranks

    # frozen: stateful modes keep the statistics of step 2 on both ranks
    for mode in ("ema", "official"):
        for rank in range(world):
            assert res[rank][mode][-1][:2] == res[rank][mode][-2][:2]

    # pooled steps: step 1 z = 0 everywhere; then the statistics of each step's 8 (6) values of both
    # ranks, used by every micro-batch of the next step on both ranks
    for mode in ("ema", "batch"):
        flat = [sum(step[0] + step[1], []) for step in POOLED]
        stats = [(statistics.fmean(f), statistics.stdev(f)) for f in flat]
        mu1, sd1 = stats[0]
        a_mu = 0.9 * 0.1 * mu1 + 0.1 * stats[1][0]
        a_sd = 0.9 * 0.1 * sd1 + 0.1 * stats[1][1]
        after2 = (a_mu / (1 - 0.9**2), a_sd / (1 - 0.9**2)) if mode == "ema" else stats[1]
        for rank in range(world):
            (z1, used1, m1, s1), (z2, used2, m2, s2), (_, used3, m3, s3) = res[rank][f"pooled-{mode}"]
            assert z1 == [[0.0] * len(mb) for mb in POOLED[0][rank]], (mode, rank)
            assert (used1, used2, used3) == (8, 6, 2), (mode, rank)  # rank 1's two values only, at the end
            assert (m1, s1) == pytest.approx((mu1, sd1), rel=1e-12), (mode, rank)
            for got, mb in zip(z2, POOLED[1][rank]):
                assert got == pytest.approx([(g - mu1) / sd1 for g in mb], rel=1e-12), (mode, rank)
            assert (m2, s2) == pytest.approx(after2, rel=1e-12), (mode, rank)
        assert res[0][f"pooled-{mode}"][2][2:] == res[1][f"pooled-{mode}"][2][2:]  # bitwise identical

    # KTO: the KL estimates are the means over both ranks' examples (5 chosen, 5 rejected)
    kl_w = statistics.fmean(KTO_R[0][0] + KTO_R[1][0])
    kl_l = statistics.fmean(KTO_R[0][1] + KTO_R[1][1])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for rank in range(world):
        got_w, got_l, losses = res[rank]["kto"]
        assert math.isclose(got_w, kl_w, rel_tol=1e-12) and math.isclose(got_l, kl_l, rel_tol=1e-12)
        r_w, r_l = KTO_R[rank]
        for i, loss in enumerate(losses):
            want = 0.5 * ((1 - sig(0.1 * (r_w[i] - kl_l))) + (1 - sig(0.1 * (kl_w - r_l[i]))))
            assert math.isclose(loss, want, rel_tol=1e-12)
    # a rank's own mean would differ: the check means something
    assert not math.isclose(statistics.fmean(KTO_R[0][0]), kl_w)
