"""MarginNormalizer across two data-parallel ranks (torch.distributed, gloo, CPU).

Ranks hold different numbers of pairs with different g; both must end with the
same statistics, equal to those of the concatenated batch.
"""

from __future__ import annotations

import math
import os
import socket
import statistics

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# per step, per rank: unequal sizes on purpose
STEPS = [
    [[0.1, 0.5, -0.3], [2.0, 1.0, 0.0, -1.0, 0.7]],
    [[0.4, 0.4], [1.5, -0.2, 0.9]],
]
FROZEN = [[3.0], [4.0, 5.0]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_statistics_of_the_concatenation(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
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
