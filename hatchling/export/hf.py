"""Export a checkpoint as a Hugging Face transformers directory (``export.hf``; needs the ``hf`` extra).

    out/config.json               HatchlingConfig, with auto_map to the modeling file
    out/generation_config.json    stop tokens: <|end|> and <|endoftext|>
    out/model.safetensors         the project's state dict, unchanged (the head is the embedding)
    out/modeling_hatchling.py     config + model in one file that imports torch and transformers only
    out/tokenizer.json, tokenizer_config.json   our byte-level BPE, its special tokens and the chat template
                                  (transformers' tokenizer reads a special token's string in a text as the
                                  token, as its chat template needs; ours reads it as text: literal_specials)

``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` and ``AutoTokenizer.from_pretrained(out)``
load it offline. The modeling file is linked at export time, not kept by hand: :func:`modeling_source` takes the
template :mod:`hatchling.export.hf_modeling` and puts in place of its ``hatchling`` imports the source of every
top-level definition of ``hatchling.model`` they reach (transitively, in dependency order, comments included).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path

from hatchling.data.tokenizer import END_OF_TURN, EOT, PAD, ROLE_TOKENS, SPECIAL_TOKENS
from hatchling.errors import ConfigError
from hatchling.io import new_file_mode
from hatchling.model.config import RESEARCH_SWITCHES, ModelConfig

TEMPLATE = "hatchling.export.hf_modeling"
LINKED_PACKAGE = "hatchling.model"
MODELING = "modeling_hatchling"
EXPORTED_ARCHS = ("hybrid", "gpt")
#: packages the exported file may import at module level (transformers' remote-code check requires them)
REQUIRED_PACKAGES = ("torch", "transformers")
#: the chat template of hatchling.data.chat, in Jinja: role token, content, end of turn
CHAT_TEMPLATE = ("{% for m in messages %}{{ " + repr(ROLE_TOKENS) + "[m['role']] + m['content'] + '"
                 + END_OF_TURN + "' }}{% endfor %}{% if add_generation_prompt %}"
                 + ROLE_TOKENS["assistant"] + "{% endif %}")


def check_exportable(cfg: ModelConfig) -> None:
    """One ConfigError naming what the HF export cannot carry: another arch, or a research switch."""
    on = [k for k in RESEARCH_SWITCHES if k != "checkpoint_attention" and getattr(cfg, k)]
    if cfg.arch not in EXPORTED_ARCHS or on:
        raise ConfigError(f"export.hf: the Hugging Face export takes arch {' or '.join(EXPORTED_ARCHS)} with the "
                          f"research switches off; this checkpoint has arch {cfg.arch!r}"
                          + (f" and {', '.join(on)} on" if on else ""))


# -- linking the modeling file ------------------------------------------------------------------------------------

def _source(module: str) -> tuple[str, ast.Module]:
    text = Path(importlib.util.find_spec(module).origin).read_text()
    return text, ast.parse(text)


def _bound_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [t.id for t in targets if isinstance(t, ast.Name)]
    return []


def _used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _segment(lines: list[str], node: ast.stmt) -> tuple[str, int]:
    """(source text, its first line number) of a definition with its decorators and the comment lines right above."""
    start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
    while start and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return "".join(lines[start:node.end_lineno]), start + 1


def _optional_imports_guarded(text: str, first: int, node: ast.stmt) -> str:
    """Imports of other packages inside functions (fla's kernels on the GPU path) go into a try block:
    transformers' remote-code check then treats them as optional, as they are."""
    lines = text.splitlines(keepends=True)
    nested = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)) and n is not node]
    for n in sorted(nested, key=lambda n: -n.lineno):
        package = (n.module if isinstance(n, ast.ImportFrom) else n.names[0].name).split(".")[0]
        if package in REQUIRED_PACKAGES:
            continue
        lo, hi, pad = n.lineno - first, n.end_lineno - first + 1, " " * n.col_offset
        lines[lo:hi] = [f"{pad}try:\n", *("    " + line for line in lines[lo:hi]),
                        f"{pad}except ImportError as error:\n",
                        f"{pad}    raise ImportError('this path needs the {package} package') from error\n"]
    return "".join(lines)


def _binding(alias: ast.alias, node: ast.stmt) -> str:
    return alias.asname or (alias.name if isinstance(node, ast.ImportFrom) else alias.name.split(".")[0])


class _Linker:
    """Collects the hatchling.model definitions a template uses; `provided` names the template defines itself."""

    def __init__(self, provided: set[str]):
        self.provided = provided
        self.modules: dict[str, tuple[list[str], dict[str, ast.stmt], dict[str, ast.stmt]]] = {}
        self.done: set[tuple[str, str]] = set()
        self.owner: dict[str, str] = {}           # linked name -> its module
        self.parts: list[tuple[str, str]] = []    # (module, source text), dependencies first
        self.imports: set[str] = set()

    def load(self, module: str):
        if module not in self.modules:
            text, tree = _source(module)
            defs, imported = {}, {}
            for node in tree.body:
                for name in _bound_names(node):
                    defs[name] = node
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for alias in node.names:
                        imported[_binding(alias, node)] = node
            self.modules[module] = (text.splitlines(keepends=True), defs, imported)
        return self.modules[module]

    def resolve(self, module: str, name: str) -> None:
        """Make `name`, as `module` sees it, defined in the linked file."""
        _, defs, imported = self.load(module)
        if name in self.provided and module != TEMPLATE:
            return
        if name in defs:
            self.link(module, name)
        elif name in imported:
            node = imported[name]
            alias = next(a for a in node.names if _binding(a, node) == name)
            if isinstance(node, ast.ImportFrom) and node.module.startswith("hatchling"):
                if not node.module.startswith(LINKED_PACKAGE) or alias.asname:
                    raise ValueError(f"{module} imports {name} from {node.module}: the exported modeling file can "
                                     f"link only plain imports from {LINKED_PACKAGE}")
                self.resolve(node.module, alias.name)
            elif isinstance(node, ast.ImportFrom):
                self.imports.add(ast.unparse(ast.ImportFrom(node.module, [alias], 0)))
            else:
                self.imports.add(ast.unparse(ast.Import([alias])))

    def link(self, module: str, name: str) -> None:
        if (module, name) in self.done:
            return
        if self.owner.get(name, module) != module:
            raise ValueError(f"{name} is defined in both {self.owner[name]} and {module}: one file can't hold both")
        lines, defs, _ = self.load(module)
        node = defs[name]
        for bound in _bound_names(node):
            self.done.add((module, bound))
            self.owner[bound] = module
        for used in sorted(_used_names(node) - set(_bound_names(node))):
            self.resolve(module, used)
        self.parts.append((module, _optional_imports_guarded(*_segment(lines, node), node)))


def modeling_source() -> str:
    """The self-contained modeling file: the template with the hatchling.model definitions it uses linked in."""
    text, tree = _source(TEMPLATE)
    lines = text.splitlines(keepends=True)
    own = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))
           and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    provided = {name for node in own for name in _bound_names(node)}
    linker = _Linker(provided)
    _, _, imported = linker.load(TEMPLATE)
    for node in own:
        for used in sorted(_used_names(node) & set(imported)):
            linker.resolve(TEMPLATE, used)
    sources = sorted({m for m, _ in linker.parts})
    header = (f'"""Hatchling for transformers: configuration and model in one file (torch and transformers only).\n\n'
              f"Generated by hatchling.export.hf from {TEMPLATE} and the project's "
              f"{', '.join(sources)}: the same layer code, so the same logits. Do not edit; export again.\n"
              f'"""\n\nfrom __future__ import annotations\n\n')
    body = [part if i and linker.parts[i - 1][0] == module else f"# ---- from {module} ----\n{part}"
            for i, (module, part) in enumerate(linker.parts)]
    body += [_segment(lines, n)[0] for n in own]
    third_party = lambda line: line.split()[1].split(".")[0] not in sys.stdlib_module_names     # noqa: E731
    imports = sorted(linker.imports, key=lambda line: (third_party(line), line))
    return header + "\n".join(imports) + "\n\n\n" + "\n\n".join(body)


# -- writing the directory ------------------------------------------------------------------------------------------

def export_hf(model, tokenizer_file: Path, out: Path) -> None:
    """Write `model` (a HatchlingLM of arch hybrid or gpt) and its tokenizer as a transformers directory."""
    from tokenizers import Tokenizer, processors
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from hatchling.export.hf_modeling import LAYER_TYPES, HatchlingConfig

    cfg = model.config
    check_exportable(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{MODELING}.py").write_text(modeling_source())
    tok = Tokenizer.from_file(str(tokenizer_file))
    eot, end = tok.token_to_id(EOT), tok.token_to_id(END_OF_TURN)
    # add_special_tokens=True starts a text with <|endoftext|>, the document boundary every training text follows
    tok.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B",
                                                       special_tokens=[(EOT, eot)])
    fields = cfg.model_dump(exclude={"size", *RESEARCH_SWITCHES})
    config = HatchlingConfig(**{k: v for k, v in fields.items() if k in HatchlingConfig.__dataclass_fields__},
                             layer_types=[LAYER_TYPES[kind] for kind in cfg.layer_kinds()],
                             bos_token_id=eot, eos_token_id=[end, eot],
                             pad_token_id=tok.token_to_id(PAD))
    config.auto_map = {"AutoConfig": f"{MODELING}.HatchlingConfig",
                       "AutoModelForCausalLM": f"{MODELING}.HatchlingForCausalLM"}
    config.architectures = ["HatchlingForCausalLM"]
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=eot, eos_token_id=[end, eot], pad_token_id=config.pad_token_id).save_pretrained(out)
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", new_file_mode())
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=PAD,
                                   additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOT, PAD)],
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
