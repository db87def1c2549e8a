"""`hatchling` command line: run a stage, list stages, keep dvc.yaml in step with the registry.

    hatchling run STAGE [--params params.yaml] [--set a.b=value ...]
    hatchling run pretrain --overfit-one-batch
    hatchling stages
    hatchling dvc-yaml [--check] [--params params.yaml]
    hatchling generate --checkpoint DIR --prompt TEXT [--max-new-tokens N --temperature T --top-k K --top-p P --seed S]
                       [--device auto|cpu|cuda] [--runtime auto|onnx|torch]
    hatchling chat --checkpoint DIR [same sampling and device options]
    hatchling gridworld [--size 4 --iterations 150 --out logs/gridworld.csv]
    hatchling bench probes [--archs hybrid gpt bdh hope --probes mqar palindrome stack --lengths 32 64 128 256 512
                            --steps N --batch-size B --threads N --device cpu --out reports/bench_probes.json
                            --plot PNG]
    hatchling promote RUN_ID [--alias champion]
    hatchling doctor [--params params.yaml]

An expected failure (bad params, a missing or malformed input, a stage without a usable result)
prints one line naming what was wrong and exits 2; a broken environment (a package that fails to
import, or whose API is not the one the code was written against, here or in a stage's own worker
process, whose traceback then comes with the message) exits 3, so that orchestrators know a rerun
cannot help; any other exception is a bug or a fault of the environment and prints its traceback
(exit 1).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path
from typing import get_args

from hatchling.config import Device, load_params
from hatchling.errors import (
    BrokenEnvironment,
    ConfigError,
    HatchlingError,
    MissingInputError,
    StageError,
    environment_fault,
)
from hatchling.eval.probe_grid import ARCHS, PROBES
from hatchling.io import atomic_write_text
from hatchling.stages import STAGES, dvc_params, dvc_yaml_text, get_stage, headline, run_stage, upstream

BROKEN_ENVIRONMENT = 3    # the exit status of a broken environment


def _run(args) -> int:
    params = load_params(args.params, args.set)           # bad params fail here, before any work
    if args.overfit_one_batch:
        if args.stage != "pretrain":
            raise StageError("--overfit-one-batch applies to the pretrain stage only")
        return _overfit(params, args.overfit_steps)
    metrics = run_stage(args.stage, params, Path("."))
    if int(os.environ.get("RANK", "0")) == 0:           # under torchrun the other ranks write no report
        print(summary_line(get_stage(args.stage), metrics))
    return 0


def summary_line(stage, metrics: dict, shown: int = 8) -> str:
    """What `hatchling run` prints when a stage is done: its first `shown` headline numbers and where all
    its metrics are (the eval's are ~1,000 lines of JSON: `dvc repro` printed them whole)."""
    numbers = headline(stage, metrics)
    text = ", ".join(f"{k}={v:.4g}" for k, v in list(numbers.items())[:shown])
    more = f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return f"{stage.name}: {text or 'done'}{more}; every metric in {stage.metrics}"


def _overfit(params, steps: int) -> int:
    """The smoke check: the loss on one frozen batch must fall below a bound."""
    from hatchling.data.packed import load_split
    from hatchling.model.lm import sample_batch
    from hatchling.stages import context
    from hatchling.train.loop import overfit_one_batch
    from hatchling.train.pretrain import fresh_model

    ctx = context("pretrain", params, Path("."))
    data = load_split(ctx.inputs.tokenized, "train")
    model, _ = fresh_model(ctx)
    batch = sample_batch(data, min(params.pretrain.batch_size, 4), min(params.pretrain.seq_len, 64), 0, "cpu")
    losses = overfit_one_batch(model, batch, steps, lr=3e-3)
    bound = 0.5
    print(f"overfit one batch: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps (bound {bound})")
    return 0 if losses[-1] < bound else 1


def _named(paths: dict[str, str]) -> str:
    return ", ".join(f"{name}={path}" for name, path in paths.items()) or "-"


def _stages(args) -> int:
    for s in STAGES:
        print(f"{s.name} (after: {', '.join(upstream(s)) or '-'}): {s.description}")
        print(f"  params   {', '.join(dvc_params(s))}")
        print(f"  inputs   {_named(s.inputs)}")
        print(f"  outputs  {_named(s.written)}, metrics={s.metrics}")
    return 0


def _dvc_yaml(args) -> int:
    text = dvc_yaml_text(load_params(args.params))
    path = Path(args.path)
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is out of date with hatchling/stages.py or the paths {args.params} names: run "
                  f"`hatchling dvc-yaml`", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(path, text)
    print(f"wrote {path}")
    return 0


def _inference(args) -> int:
    from hatchling.inference import chat_cli, generate_cli

    if args.command == "chat":
        return chat_cli(args)
    onnx_unusable = _onnx_unusable(args)
    if onnx_unusable is None:
        return _generate_onnx(args)
    print(f"decoding with PyTorch: {onnx_unusable}", file=sys.stderr)
    return generate_cli(args)


def _onnx_unusable(args) -> str | None:
    """Why `generate` cannot decode with onnxruntime (None: it can): the checkpoint has no ONNX graph,
    onnxruntime is not installed, or --runtime, --compile or --device ask for PyTorch. --runtime onnx makes each an
    error."""
    from hatchling.checkpoint import read_sidecar
    from hatchling.export.onnx_runtime import onnxruntime_installed
    from hatchling.model.device import resolve_device

    if args.compile:
        if args.runtime == "onnx":
            raise ConfigError("--compile compiles PyTorch's decoding step; --runtime onnx decodes on onnxruntime")
        return "--compile"
    if args.runtime == "torch":
        return "--runtime torch"
    device = resolve_device(args.device)
    if "onnx" not in read_sidecar(args.checkpoint):
        why = "the checkpoint has no ONNX graph (an int8 export written with the onnx extra has one)"
    elif not onnxruntime_installed():
        why = "onnxruntime is not installed (pip install 'baby-hatchling[onnx]' for the int8 fast path)"
    elif device.type != "cpu":
        why = f"--device is {device.type} (the ONNX graph runs on onnxruntime's CPU kernels)"
    else:
        return None
    if args.runtime == "onnx":
        raise ConfigError(f"--runtime onnx: {why}")
    return why


def _generate_onnx(args) -> int:
    """`generate` on the checkpoint's ONNX graph: what hatchling.inference.generate_cli does with the model."""
    import onnxruntime
    import torch

    from hatchling.export.onnx_runtime import load_decoder
    from hatchling.inference import print_continuation

    decoder, tokenizer, meta = load_decoder(args.checkpoint)
    print(f"decoding with onnxruntime {onnxruntime.__version__} ({meta['onnx']['quantization']}): "
          f"{decoder.path}", file=sys.stderr)
    return print_continuation(args, decoder, tokenizer, torch.device("cpu"))


def _gridworld(args) -> int:
    from hatchling.research.gridworld import GridWorld, greedy_episode, train

    world = GridWorld(args.size)
    model, rows = train(world, args.iterations, curiosity_coef=args.curiosity_coef, seed=args.seed,
                        csv_path=Path(args.out))
    reached, steps = greedy_episode(model, world)
    print(f"{args.out}: {len(rows)} iterations; last reached_fraction {rows[-1]['reached_fraction']}, "
          f"curiosity_bonus {rows[-1]['curiosity_bonus']}; greedy policy "
          + (f"reaches the goal in {steps} steps (shortest: {2 * (args.size - 1)})" if reached else "fails"))
    return 0 if reached else 1


def _bench_probes(args) -> int:
    import torch
    from pydantic import ValidationError

    from hatchling.eval.probe_bench import markdown, plot, run_bench
    from hatchling.eval.probe_grid import ProbeBenchConfig
    from hatchling.io import atomic_write_json
    from hatchling.model.device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    given = {k: getattr(args, k) for k in ("archs", "probes", "lengths", "steps", "batch_size", "seed")}
    try:
        cfg = ProbeBenchConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        raise ConfigError("bench probes: " + "; ".join(
            f"--{str(x['loc'][0]).replace('_', '-')}{''.join(f'[{i}]' for i in x['loc'][1:])}: {x['msg']}"
            for x in e.errors(include_url=False))) from None
    result = run_bench(cfg, progress=True, device=resolve_device(args.device))
    print("\n".join(markdown(result)))
    print(f"{result['total_seconds']} s on {torch.get_num_threads()} threads")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _promote(args) -> int:
    from hatchling.registry import REGISTERED_MODEL, promote
    from hatchling.tracking import client, sqlite_file, tracking_uri

    store = sqlite_file(tracking_uri(Path(".")))
    if store is not None and not store.exists():            # promoting makes no store where there was none
        raise MissingInputError(f"no MLflow store at {store}: run `hatchling promote` in the project whose "
                                "pipeline registered the model")
    version = promote(client(Path(".")), args.run_id, args.alias)
    print(f"{REGISTERED_MODEL} version {version} is now @{args.alias}")
    return 0


def _doctor(args) -> int:
    from hatchling.doctor import doctor

    rows = doctor(Path("."), args.params)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


def entry() -> int:
    """The `hatchling` command and `python -m hatchling` (how DVC and the Prefect flow run a stage): a process
    of its own, which keeps the memory it frees before it runs :func:`main` (keep_freed_memory: a training
    step then reuses its temporaries' pages). main itself, which tests call in their own process, leaves
    the process's malloc as it is."""
    from hatchling.malloc import keep_freed_memory

    keep_freed_memory()
    return main()


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse type: a finite `kind` within [low, high] ((low, high] with `low_open`), else argparse's
    own one-line error naming the option."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") \
                from None
        below = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or below or (high is not None and value > high):
            bounds = f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise argparse.ArgumentTypeError(f"{text} is not in {bounds}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hatchling", description="Baby-Hatchling: tiny hybrid LM pipeline")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one pipeline stage")
    run.add_argument("stage", choices=[s.name for s in STAGES])
    run.add_argument("--params", default="params.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a param, e.g. --set pretrain.lr=3e-4 (repeatable)")
    run.add_argument("--overfit-one-batch", action="store_true", help="smoke check: fit one frozen batch")
    run.add_argument("--overfit-steps", type=number(int, low=1), default=150)
    run.set_defaults(func=_run)
    sub.add_parser("stages", help="list the stages").set_defaults(func=_stages)
    dvc = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage registry")
    dvc.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is not current")
    dvc.add_argument("--path", default="dvc.yaml")
    dvc.add_argument("--params", default="params.yaml", help="the files its path-valued keys name become deps")
    dvc.set_defaults(func=_dvc_yaml)
    for name, help_text in (("generate", "stream a continuation of --prompt"), ("chat", "multi-turn chat")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--checkpoint", required=True, help="a checkpoint directory (training or export)")
        if name == "generate":
            cmd.add_argument("--prompt", required=True)
            cmd.add_argument("--runtime", choices=["auto", "onnx", "torch"], default="auto",
                             help="auto: an INT8 export's ONNX graph on onnxruntime when both are there (else PyTorch)")
            cmd.add_argument("--compile", action="store_true",
                             help="compile PyTorch's decoding step on the CPU (torch.compile, a C++ compiler: seconds "
                                  "first; then the toddler 1.3-1.6x faster a token, for long generations; xs slower)")
        else:
            cmd.add_argument("--system", default="", help="an optional system message")
        cmd.add_argument("--max-new-tokens", type=number(int, low=0), default=128)
        cmd.add_argument("--temperature", type=number(float, low=0), default=0.8, help="0 = greedy")
        cmd.add_argument("--top-k", type=number(int, low=0), default=50, help="0 = off")
        cmd.add_argument("--top-p", type=number(float, low=0, high=1, low_open=True), default=0.95, help="1 = off")
        cmd.add_argument("--seed", type=int, default=None)
        cmd.add_argument("--compute", choices=["fp32", "int8"], default="fp32",
                         help="int8: keep an INT8 export's Linear weights int8 in memory")
        cmd.add_argument("--device", choices=get_args(Device), default="auto",
                         help="where the model runs (auto: cuda when available; bf16 autocast on cuda)")
        cmd.set_defaults(func=_inference)
    grid = sub.add_parser("gridworld", help="train the LM as a policy in the curiosity gridworld (Stage-D)")
    grid.add_argument("--size", type=number(int, low=2), default=4)
    grid.add_argument("--iterations", type=number(int, low=1), default=150)
    grid.add_argument("--curiosity-coef", type=number(float), default=0.1)
    grid.add_argument("--seed", type=int, default=0)
    grid.add_argument("--out", default="logs/gridworld.csv", help="the summary CSV")
    grid.set_defaults(func=_gridworld)
    bench = sub.add_parser("bench", help="benchmarks run from the library").add_subparsers(dest="bench", required=True)
    probes = bench.add_parser("probes", help="train a fresh model per arch x probe x length (Zoology-style); "
                                             "held-out accuracy")
    probes.add_argument("--archs", nargs="+", default=list(ARCHS))
    probes.add_argument("--probes", nargs="+", default=list(PROBES))
    probes.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    probes.add_argument("--steps", type=int, default=None, help="AdamW steps per model (default: the library's)")
    probes.add_argument("--batch-size", type=int, default=None)
    probes.add_argument("--seed", type=int, default=None)
    probes.add_argument("--threads", type=number(int, low=1), default=None,
                        help="torch threads (default: torch's choice)")
    probes.add_argument("--device", choices=get_args(Device), default="cpu",
                        help="where the models train (seeded results: cpu)")
    probes.add_argument("--out", default="reports/bench_probes.json", help="the result as JSON")
    probes.add_argument("--plot", default=None, help="also plot accuracy vs length to this PNG")
    probes.set_defaults(func=_bench_probes)
    promote = sub.add_parser("promote", help="point a registered-model alias at the version a run logged")
    promote.add_argument("run_id", help="the MLflow run id of the stage that registered it (rlvr)")
    promote.add_argument("--alias", default="champion")
    promote.set_defaults(func=_promote)
    doc = sub.add_parser("doctor", help="check every component the stages use (exit 1 if one is broken)")
    doc.add_argument("--params", default="params.yaml")
    doc.set_defaults(func=_doctor)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except BrokenEnvironment as e:        # its message carries the failing process's own traceback
        print(f"error: {e}", file=sys.stderr)
        return BROKEN_ENVIRONMENT
    except HatchlingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:               # Ctrl-C: every output is written whole or not at all, so one line
        print(f"error: interrupted: {args.command} stopped; what it had not finished writing was not written",
              file=sys.stderr)
        return 130
    except Exception as e:
        traceback.print_exc()
        if environment_fault(e):
            print(f"error: {type(e).__name__}: {e} (a broken environment: the installed packages do not fit "
                  "together; the traceback above shows where)", file=sys.stderr)
            return BROKEN_ENVIRONMENT
        print(f"error: unexpected {type(e).__name__} (a bug or a fault of the environment; "
              "the traceback above shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
