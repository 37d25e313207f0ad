import pytest
import torch

from bagcert.aggregation import get_aggregation
from bagcert.evaluation import vote_statistics


def _votes():
    # 2 images, 3 classes, 2x2 locations; label 0 then 2
    v = torch.zeros(2, 3, 2, 2, dtype=torch.int32)
    # image 0: (0,0) label only; (0,1) label + class 1; (1,0) class 1 only; (1,1) abstains
    v[0, 0, 0, 0] = 1
    v[0, 0, 0, 1] = 1
    v[0, 1, 0, 1] = 1
    v[0, 1, 1, 0] = 1
    # image 1 (label 2): every location votes for the label only
    v[1, 2] = 1
    return v, torch.tensor([0, 2])


def test_fractions_by_hand():
    v, y = _votes()
    r = vote_statistics(v, y)
    assert r["images"] == 2 and r["locations_per_image"] == 4
    assert r["abstain"] == pytest.approx(1 / 8)
    assert r["label_only"] == pytest.approx(5 / 8)
    assert r["label_and_other"] == pytest.approx(1 / 8)
    assert r["wrong_only"] == pytest.approx(1 / 8)
    # label votes 2 and 4 of 4 locations; margins 2 - 2 = 0 and 4 - 0 = 4
    assert r["label_votes"] == pytest.approx((2 + 4) / 2 / 4)
    assert r["margin"] == pytest.approx((0 + 4) / 2 / 4)


def test_fractions_sum_to_one_on_random_votes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 10, 5, 6, generator=g)
    y = torch.randint(0, 10, (7,), generator=g)
    r = vote_statistics(get_aggregation("votes").local_scores(logits), y)
    assert r["abstain"] + r["label_only"] + r["label_and_other"] + r["wrong_only"] == pytest.approx(1.0)
    counts = (logits > 0).sum(dim=(2, 3))
    assert r["label_votes"] == pytest.approx(counts[torch.arange(7), y].double().mean().item() / 30)


@pytest.mark.parametrize(
    "votes, labels, match",
    [
        (torch.zeros(2, 3, 4, dtype=torch.int32), torch.tensor([0, 1]), "B, C, h, w"),
        (torch.zeros(2, 3, 2, 2, dtype=torch.int32), torch.tensor([0]), r"labels must be \[B\]"),
        (torch.zeros(2, 3, 2, 2), torch.tensor([0, 1]), "0/1 integers"),
        (torch.full((2, 3, 2, 2), 2, dtype=torch.int32), torch.tensor([0, 1]), "0/1 integers"),
        (torch.zeros(2, 3, 2, 2, dtype=torch.int32), torch.tensor([0, 3]), r"labels must lie in \[0, 3\)"),
    ],
)
def test_bad_input_is_an_error(votes, labels, match):
    with pytest.raises(ValueError, match=match):
        vote_statistics(votes, labels)
