"""Decoding with a decode-step ONNX graph (:mod:`hatchling.export.onnx`) on onnxruntime's CPU kernels.

:class:`OnnxDecoder` is driven like a model, through the interface :mod:`hatchling.model.generate` and
:func:`hatchling.model.lm.validation_loss` use: ``new_cache()`` and ``decoder(input_ids, cache)`` -> logits,
so sampling, streaming and the loss are the library's own. A call runs the step graph once per token
(prefill included: see the module notes of hatchling/export/onnx.py), carrying the cache between steps
as onnxruntime values that never leave its memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hatchling.checkpoint import WEIGHTS, load_checkpoint_tokenizer, read_sidecar, verified
from hatchling.errors import MissingInputError
from hatchling.export.onnx import INPUT_IDS, LOGITS, NEW
from hatchling.model.generate import generate, stream


def onnxruntime_installed() -> bool:
    """What decoding a graph needs: onnxruntime (in the ``onnx`` extra, which writing one needs whole)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def load_decoder(directory: str | Path, threads: int | None = None) -> tuple[OnnxDecoder, object, dict]:
    """(decoder, tokenizer, sidecar) of an export directory with an ONNX graph (its sidecar's ``onnx``), the
    directory checked whole as hatchling.checkpoint checks it: every file whose sha256 the sidecar records."""
    directory = Path(directory)
    meta = read_sidecar(directory)
    if "onnx" not in meta:
        raise MissingInputError(f"{directory} has no ONNX graph (an int8 export written with the onnx extra has one)")
    verified(directory, WEIGHTS, meta.get("weights_sha256"))
    graph = verified(directory, meta["onnx"]["file"], meta["onnx"]["sha256"])
    return OnnxDecoder(graph, threads), load_checkpoint_tokenizer(directory, meta), meta


class OnnxDecoder:
    """The decode-step graph at `path` in an onnxruntime CPU session of `threads` (default: torch's)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.state = [(i.name, i.shape) for i in self.session.get_inputs() if i.name != INPUT_IDS]

    def new_cache(self) -> list[dict]:
        """One dict (input name -> OrtValue), filled by the first call: its batch size comes with the ids."""
        return [{}]

    def fresh_state(self, batch: int) -> dict:
        """The empty cache: zeros, with keys and values of length 0 (every symbolic axis but the batch)."""
        from onnxruntime import OrtValue

        return {name: OrtValue.ortvalue_from_numpy(np.zeros(
            [batch if dim == "batch" else dim if isinstance(dim, int) else 0 for dim in shape], np.float32))
            for name, shape in self.state}

    def __call__(self, input_ids: torch.Tensor, cache: list[dict] | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]; `cache` (from new_cache) is read and updated in place."""
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        state = (cache[0] if cache is not None else {}) or self.fresh_state(ids.shape[0])
        binding = self.session.io_binding()
        logits = []
        for t in range(ids.shape[1]):
            binding.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(ids[:, t:t + 1]))
            for name, value in state.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_output(LOGITS)
            for name, _ in self.state:
                binding.bind_output(NEW + name)
            self.session.run_with_iobinding(binding)
            out = binding.get_outputs()
            logits.append(out[0].numpy())
            state = dict(zip((name for name, _ in self.state), out[1:], strict=True))
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
        if cache is not None:
            cache[0] = state
        return torch.from_numpy(np.stack(logits, axis=1))

    def eval(self) -> OnnxDecoder:
        """A graph has no training mode (validation_loss asks a model for eval mode)."""
        return self

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Prompt [B, T] -> prompt + up to max_new_tokens tokens (hatchling.model.generate.generate)."""
        return generate(self, input_ids, max_new_tokens, **sampling)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling):
        """Yield next-token ids [B] as they are sampled (hatchling.model.generate.stream)."""
        return stream(self, input_ids, max_new_tokens, **sampling)
