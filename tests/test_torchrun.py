"""Evaluation under torchrun: each rank evaluates its own share of a split, and every rank reports the whole
split's figures, each image counted once."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from kd.measure.evaluate import accuracy

WORLD, SIZES = 3, (11, 2)  # 11 images: shares of 3, 4 and 4; 2 images: the first rank has none


class Seen(Dataset):
    """Random images and labels of 10 classes (the same for a given size), noting which were read."""

    def __init__(self, n):
        generator = torch.Generator().manual_seed(n)
        self.x, self.y = torch.randn(n, 12, generator=generator), torch.randint(0, 10, (n,), generator=generator)
        self.read = []

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.read.append(i)
        return self.x[i], self.y[i]


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(12, 10)


def _evaluate_as_rank(rank, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}/group", rank=rank, world_size=WORLD)
    out = {}
    for n in SIZES:
        data = Seen(n)
        out[n] = {"read": data.read, **accuracy(model(), DataLoader(data, batch_size=2), torch.device("cpu"))}
    dist.destroy_process_group()
    (store / f"rank{rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
def test_each_rank_evaluates_its_own_share_and_every_rank_reports_the_whole_split(tmp_path):
    mp.spawn(_evaluate_as_rank, args=(tmp_path,), nprocs=WORLD)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for n in SIZES:
        shares = [rank[str(n)].pop("read") for rank in ranks]
        assert sum(shares, []) == list(range(n)), shares  # contiguous, in rank order, each image once: no padding
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        whole = accuracy(model(), DataLoader(Seen(n), batch_size=2), torch.device("cpu"))
        for rank in ranks:
            assert (rank[str(n)]["top1"], rank[str(n)]["top5"]) == (whole["top1"], whole["top5"])  # same counts
            assert rank[str(n)]["loss"] == pytest.approx(whole["loss"], rel=1e-6)  # batched float32 sums differ
        assert ranks[0][str(n)] == ranks[1][str(n)] == ranks[2][str(n)]  # the same figures, to the bit
