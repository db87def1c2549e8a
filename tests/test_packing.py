"""Packed documents don't leak: with doc_starts, each document in a batch gets exactly the logits it
gets alone (hatchling/model/segments.py), and the trainer passes SFT's conversation boundaries."""

from __future__ import annotations

import pytest
import torch

from hatchling.config import SFTParams, TrainParams
from hatchling.errors import InputError
from hatchling.model import build_model
from hatchling.model.config import for_arch
from hatchling.model.segments import Segments, document_starts
from hatchling.train.loop import Trainer

VOCAB, EOT = 50, 0
SMALL = dict(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=2, head_dim=16, n_kv_heads=1, mlp_hidden=64,
             attn_every=2, chunk_size=8)
ROWS = [[7, 13, 4], [20, 4]]           # segment lengths per row: none a multiple of the chunk (8)


def test_segments_from_document_starts():
    ids = torch.tensor([[5, EOT, 6, 7, EOT, EOT], [8, 9, EOT, 3, 4, 5]])
    starts = document_starts(ids, EOT)
    assert starts.tolist() == [[False, False, True, False, False, True], [False, False, False, True, False, False]]
    seg = Segments.from_starts(starts)
    assert seg.ids.tolist() == [[0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1, 1]]
    assert seg.positions.tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2]]
    mask = seg.attention_mask()[1, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False]
    kept = seg.gather(torch.tensor([[0, 2, 3, 5], [1, 2, 4, 5]]))
    assert kept.ids.tolist() == [[0, 1, 1, 2], [0, 0, 1, 1]]


def packed_batch():
    torch.manual_seed(0)
    docs = [[torch.randint(1, VOCAB, (n,)) for n in row] for row in ROWS]
    ids = torch.stack([torch.cat(row) for row in docs])
    starts = torch.zeros_like(ids, dtype=torch.bool)
    for r, row in enumerate(ROWS):
        starts[r, torch.tensor(row).cumsum(0)[:-1]] = True
    return docs, ids, starts


CASES = {
    "hybrid-chunked": dict(kda_backend="chunked"),
    "hybrid-recurrent": dict(kda_backend="recurrent"),
    "gpt": dict(arch="gpt"),
    "token-drop": dict(kda_backend="chunked", token_drop=0.5),
    "predictive": dict(kda_backend="chunked", use_predictive_coding=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_packed_document_gets_its_logits_alone(case):
    torch.manual_seed(1)
    model = build_model({**for_arch(CASES[case].get("arch", "hybrid"), SMALL), **CASES[case]}).eval()
    if case == "token-drop":            # route about half the tokens around the middle block
        router = model.blocks[2].router
        torch.nn.init.normal_(router.score.weight, std=1.0)
        torch.nn.init.zeros_(router.score.bias)
    docs, ids, starts = packed_batch()
    with torch.no_grad():
        packed = model(ids, doc_starts=starts)
        together = model(ids)
        if case == "token-drop":
            assert 0.2 < model.pass_stats()["tokens_kept"] < 0.8
        for r, row in enumerate(docs):
            lo = 0
            for doc in row:
                alone = model(doc[None])[0]
                torch.testing.assert_close(packed[r, lo:lo + len(doc)], alone, atol=2e-5, rtol=1e-4)
                lo += len(doc)
    assert (packed - together).abs().amax() > 1e-3        # without the boundaries the documents mix


def test_gradients_stay_inside_each_document():
    torch.manual_seed(2)
    model = build_model({**SMALL, "kda_backend": "chunked"})
    _, ids, starts = packed_batch()
    emb = model.embed(ids).detach().requires_grad_()
    model.embed.register_forward_hook(lambda *_: emb)       # differentiate with respect to each input position
    model(ids, doc_starts=starts)[0, 7 + 13 - 1].sum().backward()     # the last token of row 0's second document
    touched = emb.grad.abs().sum(-1)[0] > 0
    assert touched.nonzero().squeeze(1).tolist() == list(range(7, 20))


@pytest.mark.parametrize("cfg", [{"spike": True}, {"arch": "bdh", "bdh": {"neurons": 16}},
                                 {"arch": "hope", "hope": {"hidden": 8, "chunk": 4}}], ids=str)
def test_models_that_cannot_keep_documents_apart_say_so(cfg):
    model = build_model({**for_arch(cfg.get("arch", "hybrid"), SMALL), **cfg})
    _, ids, starts = packed_batch()
    reason = model.packing_unsupported()
    assert reason and "packed documents" in reason
    with pytest.raises(ValueError, match="packed documents"):
        model(ids, doc_starts=starts)
    with pytest.raises(InputError, match="isolate_documents is on but .*packed documents"):
        Trainer(model, SFTParams(device="cpu"), ids.flatten().numpy(), ids.flatten().numpy(), run_dir="r",
                out_dir="o", sidecar={}, val_tokens_per_byte=1.0, eot_id=EOT)


def test_decoding_with_a_cache_is_unchanged_and_takes_no_boundaries():
    torch.manual_seed(3)
    model = build_model({**SMALL, "kda_backend": "chunked"}).eval()
    _, ids, starts = packed_batch()
    prompt = ids[:, :9]
    with torch.no_grad():
        full = model.generate(prompt, 6)
        cache = model.new_cache()
        stepwise = model(prompt, cache)[:, -1]
        assert torch.equal(stepwise, model(prompt)[:, -1])
        assert torch.equal(full[:, :9], prompt) and full.shape == (2, 15)
        with pytest.raises(ValueError, match="not for decoding with a cache"):
            model(ids, model.new_cache(), doc_starts=starts)


def test_sft_batches_carry_the_conversation_boundaries(tmp_path):
    """SFT isolates conversations by default (pretraining does not): every training and validation pass
    gets doc_starts at the token after each end-of-text of its window."""
    assert SFTParams().isolate_documents and not TrainParams().isolate_documents
    torch.manual_seed(4)
    model = build_model({**SMALL, "kda_backend": "chunked"})
    seen = []
    forward = model.forward

    def spy(input_ids, cache=None, doc_starts=None):
        seen.append((input_ids, doc_starts))
        return forward(input_ids, cache, doc_starts)

    model.forward = spy
    stream = torch.cat([torch.cat([torch.randint(1, VOCAB, (n,)), torch.tensor([EOT])]) for n in (5, 9, 3) * 20])
    params = SFTParams(seed=0, device="cpu", batch_size=2, seq_len=16, max_steps=1, eval_batches=1, eval_every=1,
                       progress=False)
    trainer = Trainer(model, params, stream.numpy(), stream.numpy(), run_dir=tmp_path / "run",
                      out_dir=tmp_path / "out", sidecar={}, val_tokens_per_byte=1.0, eot_id=EOT)
    trainer.train_step()
    trainer.evaluate()
    assert len(seen) == 2
    for input_ids, doc_starts in seen:
        assert doc_starts is not None and torch.equal(doc_starts, document_starts(input_ids, EOT))
        assert bool(doc_starts.any())
