"""params.yaml: one validated config for every stage.

``load_params(path, overrides)`` reads the YAML, applies ``a.b=value`` overrides (the syntax of
``dvc exp run -S``; values are parsed as YAML) and validates the result against :class:`Params`.
Anything wrong - an unknown key, a wrong type, a value out of range - raises one
:class:`ConfigError` naming the dotted key, the value and what was expected, before any work.
"""

from __future__ import annotations

import importlib.util
import ipaddress
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hatchling.data.benchmarks import SCHEMAS
from hatchling.errors import ConfigError
from hatchling.eval.probe_grid import ProbeBenchConfig
from hatchling.model.config import ModelConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Device = Literal["auto", "cpu", "cuda"]
RUN_KEYS = ("seed", "device", "progress")   # run-level settings a stage's section may override


def reads_paths(*keywords: str) -> dict:
    """``json_schema_extra`` of a field whose value names files or directories a stage reads: a path, a
    list of them or a {name: path} mapping (values in `keywords`, or with a scheme such as ``package:``,
    are not paths). Every stage that reads the field's section gets them as DVC deps (hatchling/stages.py)."""
    return {"reads_paths": list(keywords)}


class RunParams(Section):
    """Settings of the whole run. A stage's section that has the same key overrides it; one that
    leaves it unset (None) takes this value."""

    seed: int = Field(0, description="seed of every stage that draws random numbers")
    device: Device = Field("auto", description="auto: cuda when available, else cpu")
    progress: bool = Field(True, description="progress bars for long work")


# Keyword (case-insensitive) found in a page's license statements -> the license label recorded.
OPEN_LICENSES = {
    "Python Software Foundation License": "PSF-2.0", "PSF-2.0": "PSF-2.0",
    "creativecommons.org/licenses/by/": "CC-BY", "creativecommons.org/licenses/by-sa/": "CC-BY-SA",
    "creativecommons.org/publicdomain/zero/": "CC0-1.0", "CC BY-SA": "CC-BY-SA", "CC0": "CC0-1.0",
    "public domain": "public-domain", "MIT License": "MIT", "Apache License": "Apache-2.0", "BSD License": "BSD",
}
RESTRICTIVE_LICENSES = ["all rights reserved", "creativecommons.org/licenses/by-nc",
                        "creativecommons.org/licenses/by-nd", "NonCommercial", "NoDerivatives", "CC BY-NC",
                        "CC BY-ND", "proprietary"]


class LicenseParams(Section):
    """Which pages may be kept, by what they say about their license (rel=license links, license
    meta tags, sentences about licenses or copyright). Keywords match case-insensitively."""

    allow: dict[str, str] = Field(default_factory=lambda: dict(OPEN_LICENSES),
                                  description="keyword -> license label recorded")
    deny: list[str] = Field(default_factory=lambda: list(RESTRICTIVE_LICENSES),
                            description="a page stating any of these is dropped")
    unknown: Literal["drop", "keep"] = Field("drop", description="pages that state no known license")


class CrawlParams(Section):
    """The crawl: seeds (or the local documentation mirror when there are none) and politeness."""

    seeds: list[str] = Field(default_factory=list, description="start URLs; empty = crawl the local mirror")
    allowed_domains: list[str] = Field(default_factory=list, description="hosts beyond the seeds' own")
    allow_private: list[str] = Field(default_factory=list, description="non-public networks the crawl may reach "
                                     "beyond the seeds' own addresses, e.g. 10.0.0.0/8 (none by default)")
    mirror: str = Field("auto", description="auto | python3-doc | pydoc | a directory, served on 127.0.0.1",
                        json_schema_extra=reads_paths("auto", "python3-doc", "pydoc"))
    mirror_start: str = "library/index.html"
    pydoc_modules: list[str] = Field(default_factory=list, description="pages of the pydoc mirror")
    user_agent: str = Field(min_length=8)
    obey_robots: bool = True
    download_delay: float = Field(1.0, ge=0, description="seconds between requests to a host (minimum)")
    autothrottle: bool = True
    max_depth: int = Field(3, ge=0)
    max_pages: int = Field(200, ge=1)
    max_seconds: float = Field(600, gt=0)
    max_page_kb: int = Field(2048, ge=1)
    timeout_s: float = Field(20, gt=0)
    retries: int = Field(2, ge=0)
    retry_backoff_s: float = Field(1.0, ge=0)
    max_redirects: int = Field(5, ge=0)
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1)
    min_lang_prob: float = Field(0.8, ge=0, le=1)
    min_chars: int = Field(200, ge=0)
    max_chars: int = Field(500_000, ge=1)
    license: LicenseParams = Field(default_factory=LicenseParams)
    docs_per_shard: int = Field(32, ge=1)
    progress: bool | None = None

    @model_validator(mode="after")
    def _check_chars(self):
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars}): every page "
                             "would be dropped")
        return self

    @field_validator("seeds")
    @classmethod
    def _http_urls(cls, seeds):
        for i, url in enumerate(seeds):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"seeds[{i}] = {url!r} is not an http(s) URL with a host")
        return seeds

    @field_validator("allow_private")
    @classmethod
    def _networks(cls, networks):
        for i, net in enumerate(networks):
            try:
                ipaddress.ip_network(net)
            except ValueError as error:
                raise ValueError(f"allow_private[{i}] = {net!r} is not an IP network such as 10.0.0.0/8 "
                                 f"or 127.0.0.2 ({error})") from None
        return networks

    @model_validator(mode="after")
    def _pydoc_mirror_has_pages(self):
        if not self.seeds and self.mirror in ("auto", "pydoc") and not self.pydoc_modules:
            raise ValueError("mirror: auto/pydoc needs pydoc_modules (the pages of the fallback mirror)")
        return self


class ContaminationParams(Section):
    """The check of training text against every benchmark (the tasks and dedup stages)."""

    ngram: int = Field(13, ge=1, le=64, description="word n-gram length of the eval-item index")
    threshold: float = Field(0.6, gt=0, le=1, description="share of a long field's n-grams found in a page")
    action: Literal["report", "drop", "redact"] = "drop"


class ScaleParams(Section):
    """Where per-shard work runs (hatchling/data/shard_map.py)."""

    runner: Literal["local", "dask", "ray"] = Field(
        "local", description="local processes, or a Prefect task runner on a Dask / Ray cluster")
    address: str | None = Field(None, description="a running cluster (tcp://host:8786, ray://host:10001); "
                                                  "None: start a local one")


class DedupParams(Section):
    num_perm: int = Field(128, ge=16, le=1024)
    threshold: float = Field(0.8, gt=0, lt=1, description="MinHash Jaccard for near duplicates")
    shingle: int = Field(5, ge=1, le=1024, description="word n-gram shingles")
    workers: int = Field(0, ge=0, description="processes for signatures; 0 = all cores")
    scale: ScaleParams = Field(default_factory=ScaleParams)


class TokenizeParams(Section):
    vocab_size: int = Field(4096, ge=300, le=1 << 20)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    min_frequency: int = Field(2, ge=1)
    seed: int | None = None
    workers: int = Field(0, ge=0, description="cluster workers when scale.runner starts a local cluster; 0 = cores")
    scale: ScaleParams = Field(default_factory=ScaleParams,
                               description="local: one process (the tokenizer threads itself); else encode "
                                           "document batches on a cluster")


class SparsityParams(Section):
    """Mixed-sparsity training (hatchling/train/sparsity.py): targets of 0 switch it off."""

    mlp: float = Field(0.0, ge=0, lt=1, description="target share of zero weights in the MLP matrices")
    mixer: float = Field(0.0, ge=0, lt=1, description="... in the KDA / attention projections")
    every: int = Field(25, ge=1, description="steps between prune-and-regrow updates")
    regrow: float = Field(0.1, ge=0, lt=1, description="share of kept weights re-chosen by gradient per update")
    start_step: int = Field(0, ge=0)
    end_fraction: float = Field(0.75, gt=0, le=1, description="target reached at this share of max_steps")


class TrainParams(Section):
    """The trainer's knobs (hatchling/train/loop.py), shared by pretrain and sft: params.yaml's
    `train` section holds the common values and each stage's section only what differs."""

    seed: int | None = None
    optimizer: Literal["adamw", "muon", "adapm"] = Field(
        "adamw", description="adapm: AdamW with per-output-channel momentum (hatchling/train/adapm.py)")
    adapm_beta_range: tuple[float, float] = Field((0.5, 0.98), description="AdaPM: bounds of each channel's beta1")
    adapm_rate: float = Field(0.05, ge=0, description="AdaPM: beta1 change per unit of gradient agreement")
    sparsity: SparsityParams = Field(default_factory=SparsityParams)
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: replicate the model (DDP) or shard it (FSDP2); one process: unused")
    lr: float = Field(3e-3, gt=0, le=1)
    muon_lr: float = Field(0.02, gt=0, le=1, description="lr of the Muon matrices (muon only)")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(20, ge=0)
    max_steps: int = Field(300, ge=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(128, ge=2)
    seq_len_curriculum: list[tuple[int, int]] = Field(
        default_factory=list, description="[[step, seq_len], ...]: from that step on, train at that length")
    grad_clip: float = Field(1.0, ge=0)
    isolate_documents: bool = Field(
        False, description="keep the documents packed in a window apart (attention masked, KDA state reset at "
                           "each end-of-text); off: they run together, as in nanoGPT")
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    early_stopping_patience: int = Field(0, ge=0, description="evals without val improvement; 0 = off")
    device: Device | None = None
    compile: bool = Field(False, description="torch.compile the training forward (inductor); the first step of "
                                             "each new sequence length pays the compile")
    progress: bool | None = None

    @model_validator(mode="after")
    def _check_fsdp(self):
        if self.parallel == "fsdp" and (self.optimizer != "adamw" or self.sparsity.mlp or self.sparsity.mixer):
            raise ValueError("parallel 'fsdp' supports optimizer 'adamw' without sparsity (Muon, AdaPM and the "
                             "sparsity masks work on whole matrices)")
        return self

    @model_validator(mode="after")
    def _check_betas(self):
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        low, high = self.adapm_beta_range
        if self.optimizer == "adapm" and not 0 <= low <= self.betas[0] <= high < 1:
            raise ValueError(f"optimizer 'adapm' needs 0 <= adapm_beta_range[0] <= betas[0] <= adapm_beta_range[1] "
                             f"< 1, got betas {list(self.betas)} and adapm_beta_range {[low, high]}")
        return self

    @model_validator(mode="after")
    def _check_curriculum(self):
        steps = [s for s, _ in self.seq_len_curriculum]
        if steps != sorted(steps) or any(length < 2 for _, length in self.seq_len_curriculum):
            raise ValueError("seq_len_curriculum must be [[step, seq_len>=2], ...] with increasing steps, got "
                             f"{[list(pair) for pair in self.seq_len_curriculum]}")
        return self


class TasksParams(Section):
    """The project's verifiable tasks (arithmetic, small Python functions), a ladder of tiers each split
    train / held-out, and docs QA chats."""

    seed: int | None = None
    math_per_tier: int = Field(1000, ge=10, description="arithmetic problems per tier (hatchling/tasks/math.py TIERS)")
    code_per_template: int = Field(40, ge=1, le=98, description="functions per template of each code tier")
    heldout_fraction: float = Field(0.12, gt=0, lt=1)
    docs_qa: int = Field(200, ge=0, description="question/answer chats derived from crawled documents (at most)")


class SFTParams(TrainParams):
    """Chat SFT: the trainer's knobs, plus the conversation files."""

    isolate_documents: bool = Field(True, description="no conversation sees the one packed before it")

    data: list[str] = Field(default_factory=lambda: ["data/tasks/sft_train.jsonl"], min_length=1,
                            json_schema_extra=reads_paths())
    val_data: list[str] = Field(default_factory=lambda: ["data/tasks/sft_heldout.jsonl"], min_length=1,
                                json_schema_extra=reads_paths())


class RLVRParams(Section):
    """PPO-lite RL with verifiable rewards from the SFT checkpoint (see hatchling/train/rl.py)."""

    seed: int | None = None
    tasks: list[Literal["math", "code"]] = Field(default_factory=lambda: ["math"], min_length=1)
    max_steps: int = Field(20, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    k: int = Field(8, ge=2, description="completions sampled per prompt (the advantage group)")
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(1.0, gt=0)
    lr: float = Field(1e-4, gt=0, le=1)
    ppo_epochs: int = Field(2, ge=1, description="updates per batch of samples")
    epsilon_clip: float = Field(0.2, gt=0, lt=1)
    rho_max: float = Field(2.0, ge=1, description="truncation of the behavior/trainer importance ratio")
    kl_coef: float = Field(0.05, ge=0, description="initial KL coefficient")
    kl_target: float = Field(0.1, gt=0)
    kl_horizon: int = Field(10, ge=1, description="steps over which the KL coefficient adapts")
    format_reward: float = Field(0.1, ge=0, description="bonus for a well-formed answer")
    use_curiosity_bonus: bool = Field(False, description="add the predictive head's curiosity to the reward "
                                                         "(needs model.use_predictive_coding)")
    curiosity_coef: float = Field(0.1, ge=0, description="weight of the curiosity bonus")
    grad_clip: float = Field(1.0, ge=0)
    tier: int | Literal["auto"] = Field("auto", description="the ladder's tier RL trains on; auto: the one whose "
                                                             "sampled groups hold both right and wrong answers most")
    tier_probe_items: int = Field(32, ge=1, description="training items per tier, k completions each, sampled to "
                                                        "choose it")
    eval_items: int = Field(0, ge=0, description="held-out items of the tier scored before and after, greedily and "
                                                 "by k samples (0 = all)")
    sandbox_timeout_s: float = Field(5.0, gt=0)
    checkpoint_every: int = Field(10, ge=1, description="steps between the resume checkpoints in checkpoints/rlvr-run")
    device: Device | None = Field(None, description="where the policy, its reference and the sampling run")
    progress: bool | None = None


class ExportParams(Section):
    """The export measures on the CPU whatever `run.device` says (it has no device key): its latencies
    are those of the CPU inference the INT8 and bf16 files are for."""

    source: Literal["pretrain", "sft", "rlvr"] = Field("rlvr", description="the stage whose checkpoint is exported")
    prompts: int = Field(8, ge=1, description="held-out prompts for greedy agreement")
    prompt_len: int = Field(64, ge=1)
    new_tokens: int = Field(32, ge=1)
    eval_batches: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=2)
    latency_repeats: int = Field(3, ge=1)
    hf: bool = Field(False, description="also write export/hf: a transformers directory (AutoModelForCausalLM with "
                                        "trust_remote_code; arch hybrid or gpt; needs the hf extra)")


class EvalParams(Section):
    """The eval stage: which checkpoints, how many items, the probe bench and the optional probes."""

    checkpoints: list[Literal["pretrain", "sft", "rlvr"]] = Field(
        default_factory=lambda: ["pretrain", "sft", "rlvr"], min_length=1)
    limit: int | dict[str, int] = Field(0, description="items per benchmark (the first N; 0 = all): one number "
                                                      "for every benchmark, or {benchmark: N, default: N}")
    batch_size: int = Field(16, ge=1)
    max_len: int = Field(512, ge=16, description="tokens of context + continuation scored at most")
    text_seq_len: int = Field(128, ge=2, description="window of each checkpoint's bits per byte on the whole "
                                                     "validation split, documents run together in it (at "
                                                     "pretrain.seq_len, with pretrain.isolate_documents false, the "
                                                     "pretrained model's equals reports/pretrain.json's full_val_bpb)")
    gsm8k_fewshot: int = Field(0, ge=0)
    gsm8k_fewshot_path: str = Field("data/benchmarks/gsm8k_train.jsonl.gz",
                                    description="GSM8K train file the few-shot examples come from",
                                    json_schema_extra=reads_paths())
    gsm8k_max_new_tokens: int = Field(128, ge=1)
    humaneval_max_new_tokens: int = Field(128, ge=1)
    humaneval_samples: int = Field(0, ge=0, description="n samples per problem for pass@k; 0 = greedy only")
    humaneval_k: list[int] = Field(default_factory=lambda: [1])
    temperature: float = Field(0.8, gt=0)
    sandbox_timeout_s: float = Field(5.0, gt=0)
    probe_bench: ProbeBenchConfig | None = Field(
        default_factory=ProbeBenchConfig, description="fresh small models of each arch trained on synthetic recall "
                                                      "tasks, accuracy by length (hatchling/eval/probe_bench.py); "
                                                      "null = off")
    needle_lengths: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [128, 512], min_length=1)
    needle_items: int = Field(0, ge=0, description="needle-in-a-haystack items per length (0 = off: it means "
                                                   "something for models trained on long contexts, xs and up)")
    memorize_steps: int = Field(0, ge=0, description="test-time memorization: SGD steps on each multiple-choice "
                                                     "item's context before scoring it (rows *_ttm); 0 = off")
    memorize_lr: float = Field(1e-3, gt=0)
    memorize_reset: bool = Field(True, description="restore the checkpoint before every item (else drift on)")
    forgetting_segments: int = Field(0, ge=0, description="continual-learning eval: train on this many segments "
                                                          "of the training text in turn; 0 = off")
    forgetting_steps: int = Field(20, ge=1, description="training steps per segment")
    forgetting_lr: float = Field(1e-3, gt=0)
    seed: int | None = None
    device: Device | None = Field(None, description="where each checkpoint is scored, generates and is probed")
    progress: bool | None = None

    @field_validator("limit")
    @classmethod
    def _limits(cls, limit):
        for name, n in (limit.items() if isinstance(limit, dict) else [("limit", limit)]):
            if n < 0:
                raise ValueError(f"{name} = {n}: a limit is a number of items, 0 = all")
        return limit

    def limit_for(self, benchmark: str) -> int:
        """Items of `benchmark` to evaluate (the first N; 0 = all)."""
        if isinstance(self.limit, int):
            return self.limit
        return self.limit.get(benchmark, self.limit.get("default", 0))

    @model_validator(mode="after")
    def _check(self):
        if self.humaneval_samples and any(k > self.humaneval_samples or k < 1 for k in self.humaneval_k):
            raise ValueError(f"humaneval_k {self.humaneval_k} must lie in 1..humaneval_samples "
                             f"({self.humaneval_samples})")
        if self.forgetting_segments == 1:
            raise ValueError("forgetting_segments must be 0 (off) or at least 2")
        if self.gsm8k_fewshot and not self.gsm8k_fewshot_path:
            raise ValueError("gsm8k_fewshot needs gsm8k_fewshot_path (a GSM8K train file)")
        return self


TRAINING_STAGES = ("pretrain", "sft")    # their sections are params.yaml's `train` with their own keys over it


class Params(Section):
    run: RunParams = Field(default_factory=RunParams)
    crawl: CrawlParams
    dedup: DedupParams = Field(default_factory=DedupParams)
    contamination: ContaminationParams = Field(default_factory=ContaminationParams)
    benchmarks: dict[str, str] = Field(default_factory=dict, description="eval set name -> local file",
                                       json_schema_extra=reads_paths())
    tokenize: TokenizeParams = Field(default_factory=TokenizeParams)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainParams = Field(default_factory=TrainParams)
    pretrain: TrainParams = Field(default_factory=TrainParams)
    tasks: TasksParams = Field(default_factory=TasksParams)
    sft: SFTParams = Field(default_factory=SFTParams)
    rlvr: RLVRParams = Field(default_factory=RLVRParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    export: ExportParams = Field(default_factory=ExportParams)

    @model_validator(mode="before")
    @classmethod
    def _shared_training(cls, data):
        if isinstance(data, dict) and isinstance(data.get("train", {}), dict):
            shared = data.get("train") or {}
            data = {**data, **{name: _merged(shared, data.get(name) or {}) for name in TRAINING_STAGES
                               if isinstance(data.get(name) or {}, dict)}}
        return data

    @model_validator(mode="after")
    def _run_level_settings(self):
        """Fill every section's unset seed / device / progress from `run`."""
        for name in type(self).model_fields:
            section = getattr(self, name)
            for key in RUN_KEYS if isinstance(section, Section) else ():
                if key in type(section).model_fields and getattr(section, key) is None:
                    setattr(section, key, getattr(self.run, key))
        return self

    @model_validator(mode="after")
    def _fla_installed(self):
        if self.model.kda_backend == "fla" and importlib.util.find_spec("fla") is None:
            raise ValueError("model.kda_backend 'fla' needs fla-core, the gpu extra (pip install -e '.[gpu]'); "
                             "auto uses it where it can")
        return self

    @model_validator(mode="after")
    def _known_benchmarks(self):
        unknown = sorted(set(self.benchmarks) - set(SCHEMAS))
        if unknown:
            raise ValueError(f"benchmarks: unknown name(s) {unknown}; known: {sorted(SCHEMAS)}")
        if isinstance(self.eval.limit, dict):
            stray = sorted(set(self.eval.limit) - set(self.benchmarks) - {"default"})
            if stray:
                raise ValueError(f"eval.limit names {stray}, which are not in benchmarks ({sorted(self.benchmarks)})")
        return self

    def section(self, name: str):
        value = getattr(self, name)
        return dict(value) if isinstance(value, dict) else value.model_dump(mode="json")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        if not isinstance(node.get(key, {}), dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[:i + 1])} is not a section")
        node = node.setdefault(key, {})
    node[keys[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (PyYAML keeps the last one and
    drops the first without a word: a second `pretrain:` section pasted at the end would silently
    replace the whole first one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":          # `<<: *anchor` may come more than once
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """`text` read as YAML, safely, refusing a key given twice in one mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", parsed value); the value is read as YAML (so 3e-4, true, [1, 2])."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. pretrain.lr=3e-4")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse {raw!r} as a value ({e.problem})") from None
    return key.strip(), value


def _key(error: dict, tree: dict) -> str:
    """The dotted key of the value an error is about: pydantic's location less the tags it adds for the
    member of a union it tried (``eval.limit.dict[str,int].arc_easy`` is ``eval.limit.arc_easy``)."""
    node, parts, loc = tree, [], error["loc"]
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) \
                and 0 <= part < len(node):
            parts.append(str(part))
            node = node[part]
        elif i == len(loc) - 1 and error["type"] == "missing":
            parts.append(str(part))
    return ".".join(parts) or "(top level)"


def _describe(error: dict, key: str, source: str, overridden: Iterable[str]) -> str:
    if any(key == o or key.startswith(f"{o}.") or o.startswith(f"{key}.") for o in overridden):
        source = "--set"                    # the value came from the command line, not the file
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        return f"{source}: {key} = {value!r}: unknown key"
    if error["type"] == "missing":
        return f"{source}: {key}: required key is missing"
    why = error["msg"].removeprefix("Value error, ")
    if "." not in key and isinstance(value, dict):      # a rule across a section's keys: the message names them
        return f"{source}: {key}: {why}"
    shown = repr(value)
    return f"{source}: {key} = {shown if len(shown) <= 200 else shown[:200] + '...'}: {why}"


def validate_params(tree: dict, source: str = "params", overridden: Iterable[str] = ()) -> Params:
    """`tree` as Params, or one ConfigError naming each bad key, where it came from (`source`, or --set for
    the `overridden` keys) and what is wrong."""
    overridden = tuple(overridden)
    try:
        return Params.model_validate(tree)
    except ValidationError as e:
        # the deepest key first: of a union's errors, the one about the value itself
        keyed = sorted(((_key(x, tree), x) for x in e.errors(include_url=False)), key=lambda kx: -kx[0].count("."))
        message, *more = (_describe(x, key, source, overridden) for key, x in keyed)
        if more:
            message += f" (and {len(more)} more: " + "; ".join(more) + ")"
        raise ConfigError(message) from None


def read_params_tree(path: str | Path, _seen: frozenset = frozenset()) -> dict:
    """The mapping of a params file. A file with ``extends: OTHER`` (a path relative to it) is
    OTHER's mapping with its own keys merged over it, key by key at every depth (lists replace), so
    a profile such as params-gpu.yaml holds only what it changes and follows params.yaml otherwise."""
    path = Path(path)
    try:
        tree = load_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such params file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the params file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = tree.pop("extends", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must name a params file, got {base!r}")
    here, base_path = path.resolve(), path.parent / base
    if base_path.resolve() in _seen | {here}:
        raise ConfigError(f"{path}: extends {base!r} makes a cycle")
    return _merged(read_params_tree(base_path, _seen | {here}), tree)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def load_params(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Params:
    tree = read_params_tree(path)
    overridden = []
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        overridden.append(key)
    return validate_params(tree, source=str(path), overridden=overridden)
