"""What a model declares (hatchling.model.base.LanguageModel) is all the trainer, the optimizers,
RL and checkpoints use: aux losses, per-pass stats, the training step, curiosity, no-decay
parameters and state files."""

import numpy as np
import pytest
import torch
from torch import nn

from hatchling.config import validate_params
from hatchling.model import ModelConfig, build_model
from hatchling.model.base import LanguageModel
from hatchling.train.loop import Trainer
from hatchling.train.optim import build_optimizers
from hatchling.train.rl import Samples, completion_curiosity
from tests.conftest import TINY_PARAMS

V = 16


class Declaring(LanguageModel):
    """A bigram LM that declares one of everything, and records what it is told."""

    def __init__(self):
        super().__init__()
        self.config = ModelConfig(vocab_size=V)
        self.table = nn.Embedding(V, V)
        self.gain = nn.Parameter(torch.ones(V, V))            # a matrix it exempts from weight decay
        self.bias = nn.Parameter(torch.zeros(V))
        self.steps: list[int] = []
        self.saved_to = self.loaded_from = None

    def forward(self, ids, cache=None):
        self.logits = self.table(ids) * self.gain[ids] + self.bias
        return self.logits

    def aux_losses(self):
        return {"table_norm": self.table.weight.pow(2).mean()}

    def pass_stats(self):
        return {"mean_logit": float(self.logits.detach().mean())}

    def curiosity(self):
        return self.logits.detach()[:, :-1, 0]              # [B, T - 1], as the predictive head's

    def set_train_step(self, step):
        self.steps.append(step)

    def no_weight_decay(self):
        return super().no_weight_decay() | {"gain"}

    def save_state_files(self, directory):
        (directory / "extra.txt").write_text("kept")

    def load_state_files(self, directory):
        self.loaded_from = (directory / "extra.txt").read_text()


def ids(params) -> list[int]:
    return [id(p) for p in params]


def decay_of(optimizer) -> dict[int, float]:
    return {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


def test_a_model_builds_its_optimizer_groups_from_what_it_exempts():
    model = Declaring()
    groups = model.param_groups(0.1)
    assert sorted(ids(p for g in groups for p in g["params"])) == sorted(ids(model.parameters()))   # each once
    assert ids(groups[0]["params"]) == ids([model.table.weight]) and groups[0]["weight_decay"] == 0.1
    assert ids(groups[1]["params"]) == ids([model.gain, model.bias]) and groups[1]["weight_decay"] == 0.0
    assert ids(model.param_groups(0.1, exclude=[model.gain])[1]["params"]) == ids([model.bias])


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "adapm"])
def test_the_hybrid_exempts_norms_biases_and_kda_decay_rates_under_every_optimizer(optimizer):
    torch.manual_seed(0)
    model = build_model({"vocab_size": 50, "d_model": 32, "n_layers": 2, "n_heads": 2, "head_dim": 16,
                         "mlp_hidden": 64, "attn_every": 2})
    exempt = model.no_weight_decay()
    assert {"blocks.0.mixer.A_log", "blocks.0.mixer.dt_bias", "blocks.0.mixer_norm.weight", "norm.weight",
            "blocks.0.mixer.g_proj.1.bias"} <= exempt
    assert not any(n.endswith("proj.weight") for n in exempt) and "embed.weight" not in exempt
    p = validate_params(TINY_PARAMS).pretrain.model_copy(update={"optimizer": optimizer, "weight_decay": 0.1})
    opts = build_optimizers(model, p)
    decay = {k: v for opt in opts for k, v in decay_of(opt).items()}
    assert len(decay) == len(list(model.parameters()))                                  # every parameter once
    for name, param in model.named_parameters():
        assert decay[id(param)] == (0.0 if name in exempt else 0.1), name


def test_the_trainer_uses_what_the_model_declares(tmp_path):
    params = validate_params(TINY_PARAMS).pretrain.model_copy(update={"weight_decay": 0.1, "batch_size": 2,
                                                                       "seq_len": 8, "grad_accum": 1})
    tokens = np.arange(200, dtype=np.uint16) % V
    model = Declaring()
    trainer = Trainer(model, params, tokens, tokens, run_dir=tmp_path / "run", out_dir=tmp_path / "out",
                      sidecar={}, val_tokens_per_byte=0.5)
    assert decay_of(trainer.optimizers[0])[id(model.gain)] == 0.0
    trainer.train_step()
    trainer.train_step()
    assert model.steps == [0, 1]
    assert set(trainer.step_stats) == {"table_norm", "mean_logit"}
    assert trainer.step_stats["table_norm"] == pytest.approx(float(model.table.weight.detach().pow(2).mean()), rel=0.1)
    metrics = trainer.evaluate()
    assert metrics["val_mean_logit"] == model.pass_stats()["mean_logit"]
    assert metrics["val_bpb"] == pytest.approx(metrics["val_loss"] / np.log(2) * 0.5)
    trainer.save_checkpoint()
    assert (tmp_path / "run" / "extra.txt").read_text() == "kept"
    fresh = Declaring()
    assert Trainer(fresh, params, tokens, tokens, run_dir=tmp_path / "run", out_dir=tmp_path / "out2",
                   sidecar={}, val_tokens_per_byte=0.5).try_resume()
    assert fresh.loaded_from == "kept" and torch.equal(fresh.gain, model.gain)


def test_rl_reads_the_models_curiosity_and_plain_models_have_none():
    model = Declaring()
    samples = Samples(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 2, dtype=torch.long),
                      torch.tensor([[True, True], [True, False]]), torch.zeros(2, 2))
    model(torch.cat([samples.prompts, samples.tokens], 1))
    c = model.curiosity()
    torch.testing.assert_close(completion_curiosity(model, samples), torch.stack([c[0, 2:4].mean(), c[1, 2]]))
    plain = build_model({"vocab_size": V, "d_model": 16, "n_layers": 1, "n_heads": 1, "head_dim": 16})
    assert plain.curiosity() is None and plain.aux_losses() == {} and plain.pass_stats() == {}
