"""Hugging Face export: the directory loads with transformers' Auto classes offline, in a process that cannot
import hatchling, gives our logits and our greedy generations, and lm-eval's own `hf` model scores it as our
adapter does."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  the hf extra, in the dev lock: missing, this file fails rather than skips

from hatchling.checkpoint import save_model
from hatchling.data.chat import render_chat
from hatchling.data.tokenizer import TOKENIZER, train_tokenizer
from hatchling.errors import ConfigError
from hatchling.export.hf import MODELING, export_hf, modeling_source
from hatchling.model import build_model
from hatchling.model.config import for_arch
from tests.conftest import TINY_PARAMS
from tests.test_eval import _lm_eval_task

TEXTS = ["def loads(s):\n    return json.loads(s)\n" * 40, "The json module encodes and decodes JSON documents. " * 40,
         "Question: Which module reads JSON?\nAnswer: json\n" * 40]


def _export(tmp_path, **model):
    """A seeded random model of the test size (hybrid unless `model` says otherwise) and its HF export."""
    torch.manual_seed(0)
    base = for_arch(model.get("arch", "hybrid"), TINY_PARAMS["model"])      # the test size, for that arch
    lm = build_model({**base, "vocab_size": 320, **model}).eval()
    tokenizer = train_tokenizer(TEXTS, 320)
    tokenizer.save(str(tmp_path / TOKENIZER))
    export_hf(lm, tmp_path / TOKENIZER, tmp_path / "hf")
    return lm, tokenizer, tmp_path / "hf"


def _hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["hybrid", "gpt"])
def test_logits_cache_and_greedy_generation_equal_ours(tmp_path, arch):
    lm, _, out = _export(tmp_path, arch=arch)
    hf = _hf(out)
    assert type(hf).__module__.endswith(MODELING) and hf.config.model_type == "hatchling"
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = lm(ids), hf(ids, use_cache=False).logits
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
        # transformers' cache: a prefill then one token at a time gives the full pass's last logits
        step = hf(ids[:, :40], use_cache=True)
        for t in range(40, 48):
            step = hf(ids[:, t:t + 1], cache=step.cache, use_cache=True)
        torch.testing.assert_close(step.logits[:, -1], ours[:, -1], atol=1e-5, rtol=0)
    kinds = [type(layer).__name__ for layer in step.cache.layers]
    assert kinds == (["DynamicLayer"] * 4 if arch == "gpt" else ["LinearAttentionLayer"] * 3 + ["DynamicLayer"])
    prompt = ids[:1, :20]
    expected = lm.generate(prompt, 24)
    got = hf.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(got, expected)


def test_tokenizer_special_tokens_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    _, tokenizer, out = _export(tmp_path)
    tok = AutoTokenizer.from_pretrained(out)
    text = "The json module encodes JSON."
    assert tok(text, add_special_tokens=False).input_ids == tokenizer.encode(text).ids
    assert tok(text).input_ids == [tok.bos_token_id, *tokenizer.encode(text).ids]   # BOS: <|endoftext|>
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|pad|>")
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Which module reads JSON?"},
            {"role": "assistant", "content": "json"}, {"role": "user", "content": "And writes it?"}]
    rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert rendered == render_chat(tokenizer, chat, add_generation_prompt=True)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.token_to_id("<|end|>"), tokenizer.token_to_id("<|endoftext|>")]


def test_the_directory_needs_neither_hatchling_nor_the_network(tmp_path):
    """In a fresh process where `import hatchling` fails and the hub is off, the Auto classes load and run."""
    lm, tokenizer, out = _export(tmp_path)
    ids = tokenizer.encode("def loads(s):").ids
    with torch.no_grad():
        expected = lm.generate(torch.tensor([ids]), 8)[0].tolist()
    script = f"""
import sys
sys.modules["hatchling"] = None                      # any import of the project fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)   # no question about the config's code
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
ids = tok("def loads(s):", add_special_tokens=False, return_tensors="pt").input_ids
print(model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0].tolist())
"""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HF_HOME": str(tmp_path / "hf_home")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
    tree = ast.parse((out / f"{MODELING}.py").read_text())
    imported = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert "hatchling" not in imported and {"torch", "transformers"} <= imported


def test_the_modeling_file_is_linked_from_the_projects_sources():
    """Every layer and op in the exported file is the project's definition, text for text (not a kept copy)."""
    import inspect

    from hatchling.model import attention, hatchling, kda, kda_layer

    source = modeling_source()
    for obj in (kda.kda, kda.kda_chunked, kda.kda_recurrent, kda.l2norm, kda.kda_gate, kda_layer.KDALayer,
                kda_layer.CausalConv1d, attention.NoPEAttention, attention.RoPEAttention, hatchling.Block,
                hatchling.SwiGLU):
        text = inspect.getsource(obj)
        if obj is kda.kda:      # its optional fla import is wrapped for transformers' import check
            assert "try:\n            from fla.ops.kda import chunk_kda" in source
            continue
        assert text in source, obj.__qualname__
    assert "class HatchlingLM" not in source and "EpisodicMemory" not in source    # only what the export uses
    compile(source, MODELING, "exec")


@pytest.mark.parametrize("model, message", [
    ({"arch": "bdh"}, "arch 'bdh'"),
    ({"spike": True}, "spike on"),
])
def test_other_archs_and_research_switches_are_refused(tmp_path, model, message):
    with pytest.raises(ConfigError, match=message):
        _export(tmp_path, **model)


def test_padded_batches_are_refused(tmp_path):
    _, _, out = _export(tmp_path)
    hf = _hf(out)
    with pytest.raises(ValueError, match="unpadded"):
        hf(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))


ARC = [{"id": f"q{i}", "question": q, "choices": {"text": list(c), "label": ["A", "B", "C"]}, "answerKey": k}
       for i, (q, c, k) in enumerate([
           ("Which module reads JSON?", ("json", "wave", "turtle"), "A"),
           ("What does len return?", ("the length", "a string", "nothing at all"), "A"),
           ("Which keyword defines a function?", ("class", "def", "lambda function"), "B"),
           ("What is the type of 3.0?", ("int", "str", "float"), "C"),
           ("Which module encodes JSON documents?", ("json", "csv", "zipfile"), "A"),
           ("What does json.loads return for '[]'?", ("a dict", "an empty list", "None"), "B")])]


def test_lm_evals_hf_model_scores_the_export_as_our_adapter_scores_the_checkpoint(tmp_path):
    """lm-eval 0.4.13's own `hf` model type on the exported directory and our adapter on the checkpoint: the same
    per-choice log-likelihoods on lm-eval's own ARC-Easy task (items from a local file), hence the same acc and
    acc_norm."""
    import lm_eval
    import lm_eval.models  # noqa: F401  (registers lm-eval's own model types, `hf` among them)
    from lm_eval.tasks import TaskManager

    from hatchling.eval.lm_eval_adapter import HatchlingLMEval

    lm, _, out = _export(tmp_path)
    save_model(lm, tmp_path / "ckpt", {"format": "fp32"}, files={TOKENIZER: tmp_path / TOKENIZER})
    data = tmp_path / "arc.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ARC))
    (tmp_path / "tasks").mkdir()
    task = _lm_eval_task(tmp_path / "tasks", "local_arc", Path(lm_eval.__file__).parent / "tasks/arc/arc_easy.yaml",
                         data, "test")
    tasks = TaskManager(include_path=str(tmp_path / "tasks"))
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={out},trust_remote_code=True,dtype=float32,add_bos_token=True",
        tasks=[task], task_manager=tasks, batch_size=1, device="cpu", bootstrap_iters=0, log_samples=True)
    ours = lm_eval.simple_evaluate(model=HatchlingLMEval(checkpoint=str(tmp_path / "ckpt"), batch_size=4),
                                   tasks=[task], task_manager=tasks, bootstrap_iters=0, log_samples=True)

    def loglikelihoods(result):
        return [resp[0][0] for s in result["samples"][task] for resp in s["resps"]]

    assert len(loglikelihoods(theirs)) == 18
    assert loglikelihoods(theirs) == pytest.approx(loglikelihoods(ours), abs=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert theirs["results"][task][metric] == ours["results"][task][metric]
