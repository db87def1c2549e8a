"""Any lm-evaluation-harness task on a hatchling checkpoint (optional extra: ``pip install -e ".[lmeval]"``).

    lm_eval --model hatchling --model_args checkpoint=checkpoints/pretrain --tasks arc_easy

(after ``import hatchling.eval.lm_eval_adapter`` registers the model, e.g. through
``python -m hatchling.eval.lm_eval_adapter --tasks ... --model_args ...``). Scoring uses the same
primitives as our own eval stage, so the numbers of both agree.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from hatchling.data.tokenizer import EOT, document_ids
from hatchling.eval.scoring import encode_pair, token_loglikelihoods
from hatchling.inference import generate_text
from hatchling.model.device import resolve_device

BATCH_SIZE = 16


def batch_rows(batch_size: int | str) -> int:
    """lm-eval's --batch_size: a number, or "auto" / "auto:N" (lm-eval's search for the largest batch that
    fits), which this adapter takes as its default, BATCH_SIZE rows."""
    if str(batch_size).startswith("auto"):
        return BATCH_SIZE
    try:
        rows = int(batch_size)
    except ValueError:
        rows = 0
    if rows < 1:
        raise ValueError(f"batch_size must be a positive whole number or auto, got {batch_size!r}")
    return rows


@register_model("hatchling")
class HatchlingLMEval(LM):
    def __init__(self, checkpoint: str, batch_size: int | str = BATCH_SIZE, max_length: int = 512,
                 device: str | None = None, **_):
        """`device`: lm_eval's --device (cuda, cuda:1, cpu); none given: cuda when available."""
        from hatchling.checkpoint import load_for_inference

        super().__init__()
        self._device = resolve_device(device or "auto")
        self.model, self.tokenizer, _ = load_for_inference(checkpoint, device=self._device)
        self.batch_size = batch_rows(batch_size)
        self.max_length = int(max_length)
        self.eot = self.tokenizer.token_to_id(EOT)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            ctx, cont = encode_pair(self._encode, *req.args)
            pairs.append(([self.eot, *ctx], cont))
        scored = token_loglikelihoods(self.model, pairs, self.max_length, self.batch_size, not disable_tqdm,
                                      device=self._device)
        return [(s.logprob, s.greedy) for s in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scores: the whole string in disjoint windows of max_length tokens."""
        out = []
        for req in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self._encode(req.args[0]), self.eot, self.max_length - 1, 1)]    # context + window <= max_length
            out.append(sum(s.logprob for s in token_loglikelihoods(self.model, windows, self.max_length,
                                                                   self.batch_size, device=self._device)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []          # and always the end of the document (<|endoftext|>)
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            out.append(generate_text(self.model, document_ids(self.tokenizer, context),
                                     int(kwargs.get("max_gen_toks", 256)), self._decode, until, self.max_length,
                                     temperature, stop_ids=(self.eot,), device=self._device))
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    sys.argv[1:1] = ["--model", "hatchling"]
    cli_evaluate()
