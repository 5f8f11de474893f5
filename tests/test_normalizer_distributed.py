"""MarginNormalizer and KTO's KL estimate across two data-parallel ranks (torch.distributed, gloo, CPU).

Ranks hold different numbers of pairs with different g; both must end with the
same statistics, equal to those of the concatenated batch.
"""

from __future__ import annotations

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
