"""Learning at eval time: test-time memorization (plain score beside it) and the forgetting eval."""

import numpy as np
import pytest
import torch

from hatchling.eval.continual import Memorizer, forgetting
from hatchling.eval.harness import Evaluator
from hatchling.eval.probes import ProbeItem, probe_accuracy
from hatchling.model import build_model
from hatchling.model.config import for_arch
from hatchling.model.lm import lm_loss
from hatchling.tasks.multiple_choice import MULTIPLE_CHOICE
from tests.test_eval import CPU, CharTokenizer, cfg, records

TINY = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=2, head_dim=16, n_kv_heads=1, mlp_hidden=64,
            chunk_size=8)
ARCHS = {"hybrid": {}, "bdh": {"bdh": {"neurons": 16}}, "hope": {"hope": {"hidden": 16}}}   # arch -> its options


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model({**for_arch(kw.get("arch", "hybrid"), TINY), **kw}).eval()


def weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


ARC = records("arc_easy", [{"question": q, "choices": {"label": ["A", "B", "C"], "text": ["json", "a wave", "turtles"]},
                             "answerKey": "A"} for q in ("Which parses text?", "Pick one",
                                                         "Which module reads JSON files from disk?")])


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_memorizing_zero_steps_gives_the_plain_scores_for_every_arch(arch):
    m = model(arch=arch, **ARCHS[arch])
    ev = Evaluator(m, CharTokenizer(), cfg(max_len=64, batch_size=2), device=CPU)
    task = MULTIPLE_CHOICE["arc_easy"]
    plain = ev.multiple_choice(task, ARC)                        # batched across items
    one_by_one = ev.multiple_choice(task, ARC, Memorizer(m, 0, 0.1, device=CPU), suffix="_ttm")
    assert [r.metric for r in one_by_one] == ["acc_ttm", "acc_norm_ttm"]
    assert [r.value for r in one_by_one] == [r.value for r in plain]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_memorizing_a_context_raises_its_likelihood_and_reset_restores_the_weights(arch):
    m = model(arch=arch, **ARCHS[arch])
    ids = torch.randint(1, 128, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    before, start = float(lm_loss(m, x, y)), weights(m)
    mem = Memorizer(m, steps=5, lr=0.5, device=CPU)
    mem(ids)
    assert float(lm_loss(m, x, y)) < before - 0.05
    mem(ids[:10])                                               # reset: starts again from the checkpoint
    once = weights(m)
    mem.restore()
    assert all(torch.equal(v, start[k]) for k, v in m.state_dict().items())
    mem(ids[:10])
    assert all(torch.equal(v, once[k]) for k, v in m.state_dict().items())
    drift = Memorizer(m, steps=5, lr=0.5, reset=False, device=CPU)   # no reset: the second item builds on the first
    drift(ids)
    drift(ids[:10])
    assert any(not torch.equal(v, once[k]) for k, v in m.state_dict().items())
    drift.restore()


def test_needle_memorized_before_the_question_is_scored_per_item():
    m = model()
    items = [ProbeItem(list(range(5, 30)), [20, 21]), ProbeItem(list(range(40, 60)), [15])]
    plain = probe_accuracy(m, items, batch_size=2, device=CPU)
    zero_steps = Memorizer(m, 0, 0.1, device=CPU)
    assert probe_accuracy(m, items, 2, zero_steps, device=CPU) == plain       # zero steps: the plain score
    start = weights(m)
    probe_accuracy(m, items, 2, Memorizer(m, 3, 0.5, device=CPU), device=CPU)
    assert all(torch.equal(v, start[k]) for k, v in m.state_dict().items())  # restored afterwards


def test_forgetting_matrix_learning_and_restored_weights():
    """Three segments over disjoint token ranges: training on each lowers its loss, training on the
    others raises it again; forgetting is computed from the matrix as documented."""
    rng = np.random.default_rng(0)
    tokens = np.concatenate([rng.integers(lo, lo + 8, 3000) for lo in (1, 40, 80)]).astype(np.uint16)
    m = model()
    start = weights(m)
    f = forgetting(m, tokens, segments=3, steps=25, lr=1e-2, batch_size=4, seq_len=32, device=CPU)
    L = f["loss_after"]
    assert np.array(L).shape == (3, 3) and all(x > 0.5 for x in f["learned"])
    expect = [L[2][j] - min(L[i][j] for i in range(j, 3)) for j in range(2)]
    assert f["forgetting_per_segment"] == pytest.approx(expect) and f["forgetting"] == pytest.approx(np.mean(expect))
    assert f["forgetting_per_segment"][0] > 0.5                 # segment 0 was learned, then forgotten
    assert all(torch.equal(v, start[k]) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="too few"):
        forgetting(m, tokens[:100], segments=3, steps=1, lr=1e-2, batch_size=2, seq_len=32, device=CPU)
