"""tests/mergekit_configs/: each config runs directly and after ``convert`` (same bytes), on four layouts,
and matches mergekit's formulas, computed here independently of the engine (in float64)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from mergeengine.api import run_recipe
from mergeengine.kernels.rng import tensor_generator
from mergeengine.recipe.mergekit import convert_file
from tests.conftest import read_folder

CONFIGS = sorted((Path(__file__).parent / "mergekit_configs").glob("*.yml"))
LAYOUTS = ["llama", "mistral", "qwen2", "gemma"]
LAYERS = 4
LORA_R, LORA_ALPHA = 2, 4.0


def _read(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _write_like(base: Path, dest: Path, tensors: dict[str, torch.Tensor]) -> None:
    dest.mkdir(parents=True)
    shutil.copy(base / "config.json", dest / "config.json")
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module", params=LAYOUTS)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model of the layout, three fine-tunes of it and a LoRA adapter of ft_a (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, head_dim=8)
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(request.param, **kw))
    model.save_pretrained(root / "base", safe_serialization=True)
    base = _read(root / "base")
    g = torch.Generator().manual_seed(1)
    for name in ("ft_a", "ft_b", "ft_c"):
        _write_like(root / "base", root / name, {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    lora = {}
    for k, v in base.items():
        if k.endswith(("q_proj.weight", "v_proj.weight")):
            module = k.removesuffix(".weight")
            lora[f"base_model.model.{module}.lora_A.weight"] = 0.1 * torch.randn(LORA_R, v.shape[1], generator=g)
            lora[f"base_model.model.{module}.lora_B.weight"] = 0.1 * torch.randn(v.shape[0], LORA_R, generator=g)
    (root / "lora_a").mkdir()
    save_file(lora, str(root / "lora_a" / "adapter_model.safetensors"))
    (root / "lora_a" / "adapter_config.json").write_text(json.dumps({"r": LORA_R, "lora_alpha": LORA_ALPHA}))
    for name, extra, added in (("base", [], []), ("ft_a", ["tok_a1", "tok_a2"], ["<tool>"]), ("ft_b", ["tok_b"], []),
                               ("ft_c", [], [])):
        _write_tokenizer(root / name, extra, added)
    return root


SPECIAL, WORDS = ["<unk>", "<s>", "</s>"], [f"w{i}" for i in range(80)]


def _write_tokenizer(folder: Path, extra: list[str], added: list[str]) -> None:
    """A WordLevel tokenizer (the `tokenizers` library): 83 shared tokens, then the model's own."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + WORDS + extra)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False) for t in added])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


@functools.cache
def _vocab(folder: Path) -> tuple[dict[str, int], list[str]]:
    """A model's token -> id as transformers loads its tokenizer (mergekit's view), and its added tokens in id order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return tok.get_vocab(), [a.content for _, a in sorted(tok.added_tokens_decoder.items())]


def _referenced(cfg: dict[str, Any]) -> list[str]:
    """The config's models, base first (the union's base), then in the order the config names them."""
    named = [m["model"] for m in cfg.get("models") or []]
    named += [s["model"] for sl in cfg.get("slices") or [] for s in sl["sources"]]
    return list(dict.fromkeys(([cfg["base_model"]] if cfg.get("base_model") else []) + named))


def vocabulary(root: Path, cfg: dict[str, Any]) -> tuple[list[str], int]:
    """mergekit's output tokens in id order, and the row count: the union (the base's tokens, then each
    model's new tokens, then added tokens), the base's, or one model's own; then the tokens of ``tokens``."""
    block = cfg.get("tokenizer") or {}
    source = cfg.get("tokenizer_source") or block.get("source", "union")
    names = _referenced(cfg)
    own = names[0] if source in ("union", "base") else source  # a model's own tokenizer, merged or not
    vocabs = {n: _vocab(root / n) for n in dict.fromkeys([*names, own])}
    order = sorted(vocabs[own][0], key=vocabs[own][0].get)
    if source == "union":
        added = {t for n in names[1:] for t in vocabs[n][1]}
        for n in names[1:]:
            order += [t for t in sorted(vocabs[n][0], key=vocabs[n][0].get) if t not in order and t not in added]
        for n in names[1:]:
            order += [t for t in vocabs[n][1] if t not in order]
    order += [t for t in block.get("tokens") or {} if t not in order]
    multiple = block.get("pad_to_multiple_of") or 1
    return order, -(-len(order) // multiple) * multiple


def _default_row(root: Path, t: str, cfg: dict[str, Any], fill: list[str], base: str | None,
                 old: dict[str, torch.Tensor]) -> torch.Tensor:
    """mergekit's row for a token a model lacks: the ``tokens`` source, else the only holder among the models
    merged (``fill``), the base's (where the base is merged), the holders' mean, or zero."""
    vocabs = {n: _vocab(root / n)[0] for n in old}
    source = (((cfg.get("tokenizer") or {}).get("tokens") or {}).get(t) or {}).get("source")
    if isinstance(source, dict) and source["kind"] == "model_token":
        m = source["model"]
        return old[m][source["token_id"] if "token_id" in source else vocabs[m][source["token"]]]
    if source is not None:
        return torch.zeros(next(iter(old.values())).shape[1], dtype=torch.float64) if source == {"kind": "zero"} \
            else old[source][vocabs[source][t]]
    holders = [n for n in fill if t in vocabs[n]]
    if not holders:
        return torch.zeros(next(iter(old.values())).shape[1], dtype=torch.float64)
    if len(holders) == 1 or base in holders:
        donor = holders[0] if len(holders) == 1 else base
        return old[donor][vocabs[donor][t]]
    return torch.stack([old[n][vocabs[n][t]] for n in holders]).mean(0)


def aligned(root: Path, cfg: dict[str, Any], model: str, fill: list[str], base: str | None) -> dict[str, torch.Tensor]:
    """A model's tensors with its embedding and lm_head rows laid out for the output vocabulary (mergekit's
    PermutedVocabulary over the models ``fill`` merged into the tensor)."""
    order, size = vocabulary(root, cfg)
    tensors = _load(root, model)
    forced = {t for t, v in ((cfg.get("tokenizer") or {}).get("tokens") or {}).items() if v.get("force")}
    vocab = _vocab(root / model)[0]
    for key in [k for k in tensors if "embed_tokens" in k or "lm_head" in k]:
        old = {n: _load(root, n)[key] for n in dict.fromkeys([*fill, model, *_token_models(cfg)])}
        new = torch.zeros(size, old[model].shape[1], dtype=torch.float64)
        for i, t in enumerate(order):
            new[i] = old[model][vocab[t]] if t in vocab and t not in forced else _default_row(root, t, cfg, fill, base, old)
        new[len(order):] = new[:len(order)].mean(0)
        tensors[key] = new
    return tensors


def _token_models(cfg: dict[str, Any]) -> list[str]:
    out = []
    for v in ((cfg.get("tokenizer") or {}).get("tokens") or {}).values():
        src = v.get("source")
        out += [src["model"]] if isinstance(src, dict) and "model" in src else [src] if isinstance(src, str) else []
    return out


def _source_loader(root: Path, cfg: dict[str, Any], k: int) -> Any:
    """How slice ``k`` loads a model: aligned to the vocabulary (first and last slice) or as it is."""
    if not (cfg.get("tokenizer") or cfg.get("tokenizer_source")) or k not in (0, len(cfg["slices"]) - 1):
        return lambda model: _load(root, model)
    sources = [s["model"] for s in cfg["slices"][k]["sources"]]
    base = cfg["slices"][k].get("base_model") or cfg.get("base_model")
    base = base if base in sources else None
    fill = list(dict.fromkeys(([base] if base else []) + sources))
    return lambda model: aligned(root, cfg, model, fill, base)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---- mergekit's rules, restated from its documentation and code (float64) ----------------------

def _t(name: str) -> float:
    parts = name.split(".")
    if "layers" not in parts:
        return 0.0
    return int(parts[parts.index("layers") + 1]) / (LAYERS - 1)


def _evaluate(setting: Any, name: str) -> Any:
    """mergekit's evaluate_setting: scalar, gradient, or first matching {filter, value}."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(isinstance(e, (int, float)) for e in setting):
        scaled = _t(name) * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (scaled - i0)) * setting[i0] + (scaled - i0) * setting[i1]
    for cond in setting:
        if cond.get("filter") in (None, "*") or cond["filter"] in name:
            return _evaluate(cond["value"], name)
    return None


def _param(cfg: dict[str, Any], model: dict[str, Any] | None, key: str, name: str, default: Any = None) -> Any:
    for source in ((model or {}).get("parameters") or {}, cfg.get("parameters") or {}):
        if key in source:
            value = _evaluate(source[key], name)
            if value is not None:
                return value
    return default


def _load(root: Path, ref: str) -> dict[str, torch.Tensor]:
    model, _, adapter = ref.partition("+")
    tensors = {k: v.double() for k, v in _read(root / model).items()}
    if adapter:
        with safe_open(str(root / adapter / "adapter_model.safetensors"), framework="pt") as f:
            for k in list(tensors):
                a = f"base_model.model.{k.removesuffix('.weight')}.lora_A.weight"
                if a in f.keys():
                    b = a.replace("lora_A", "lora_B")
                    tensors[k] = tensors[k] + f.get_tensor(b).double() @ f.get_tensor(a).double() * (LORA_ALPHA / LORA_R)
    return tensors


def _topk_mask(d: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(d.numel(), dtype=torch.bool)
    mask[torch.argsort(d.float().abs().reshape(-1), descending=True)[:k]] = True
    return mask.reshape(d.shape)


def _sparsify(method: str, d: torch.Tensor, density: float, gamma: float, gen: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return d
    assert not method.startswith("della"), "DELLA's draws are checked at density 1 only"
    n = d.numel()
    if method == "ties":
        return d * _topk_mask(d, int(density * n))
    if method.startswith("breadcrumbs"):  # mergekit 0.1.5: drop the top int(gamma n), keep the next int(density n)
        keep, top = int(density * n), int(gamma * n)
        bottom = max(0, n - keep - top)
        order = torch.argsort(d.float().abs().reshape(-1))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[bottom:bottom + keep]] = True
        return d * mask.reshape(d.shape)
    kept = (torch.rand(n, generator=gen) < density).reshape(d.shape)  # DARE, rescaled to the same L1 norm
    masked = d * kept
    before, after = d.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def _slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp: the angle between the normalised tensors, linear when nearly colinear."""
    n0, n1 = v0.norm(), v1.norm()
    dot = float(((v0 / n0 if n0 > 1e-8 else v0) * (v1 / n1 if n1 > 1e-8 else v1)).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def _renamed(name: str, layer: int) -> str:
    parts = name.split(".")
    parts[parts.index("layers") + 1] = str(layer)
    return ".".join(parts)


def stacked_result(root: Path, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """mergekit's slices: each slice's layers (merged across its sources, ``t`` over the slice) in order;
    embeddings from the first slice, the other non-layer tensors from the last."""
    out: dict[str, torch.Tensor] = {}
    first_last: list[dict[str, torch.Tensor]] = []
    position = 0
    for k, sl in enumerate(cfg["slices"]):
        start, end = sl["sources"][0]["layer_range"]
        load = _source_loader(root, cfg, k)
        if len(sl["sources"]) == 1:
            merged = load(sl["sources"][0]["model"])
        else:  # the slice's layers as a sub-model of end - start layers, merged as mergekit merges a slice
            sub = {**cfg, "parameters": {**(cfg.get("parameters") or {}), **(sl.get("parameters") or {})},
                   "slices": [{"sources": [{"model": s["model"], "layer_range": [0, LAYERS]} for s in sl["sources"]]}]}
            merged = _merge_window(root, sub, start, end, load)
        first_last.append(merged)
        for name, t in merged.items():
            layer = _layer_of(name)
            if layer is not None and (len(sl["sources"]) > 1 or start <= layer < end):
                index = layer if len(sl["sources"]) > 1 else layer - start
                out[_renamed(name, position + index)] = t
        position += end - start
    for name, t in first_last[0].items():
        if _layer_of(name) is None and "embed" in name:
            out[name] = t
    for name, t in first_last[-1].items():
        if _layer_of(name) is None and "embed" not in name:
            out[name] = t
    return out


def _merge_window(root: Path, cfg: dict[str, Any], start: int, end: int, load: Any) -> dict[str, torch.Tensor]:
    """mergekit's merge of layers [start, end) of every source, renumbered from 0, t over end - start layers."""
    global LAYERS
    saved, LAYERS = LAYERS, end - start
    try:
        models = cfg["slices"][0]["sources"]
        window = {}
        for name in load(cfg["base_model"]):
            layer = _layer_of(name)
            if layer is None or start <= layer < end:
                window[name if layer is None else _renamed(name, layer - start)] = name
        tensors = {m["model"]: load(m["model"]) for m in models}
        base = tensors[cfg["base_model"]]
        other = next(m["model"] for m in models if m["model"] != cfg["base_model"])
        return {new: _slerp(_param(cfg, None, "t", new), base[old], tensors[other][old]) for new, old in window.items()}
    finally:
        LAYERS = saved


def mergekit_result(root: Path, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The merge mergekit's formulas give, tensor by tensor."""
    if "slices" in cfg and (len(cfg["slices"]) > 1 or len(cfg["slices"][0]["sources"]) == 1):
        return stacked_result(root, cfg)
    if "slices" in cfg:  # one slice over every layer: mergekit's models form
        cfg = {**cfg, "models": [{"model": s["model"], "parameters": s.get("parameters")}
                                 for s in cfg.pop("slices")[0]["sources"]]}
    method, models = cfg["merge_method"], cfg["models"]
    if method in ("multislerp", "karcher"):  # the base (if any) is not the origin of models' tensors here
        return OTHER_METHODS[method](root, cfg, None, [(m, _load(root, m["model"])) for m in models])
    if method == "slerp":
        base, other = _load(root, cfg["base_model"]), _load(root, models[1]["model"])
        return {name: _slerp(_param(cfg, None, "t", name), base[name], other[name]) for name in base}
    tensors = {m["model"]: _load(root, m["model"]) for m in models}
    if method == "linear":
        out = {}
        for name in tensors[models[0]["model"]]:
            ws = [_param(cfg, m, "weight", name) for m in models]
            out[name] = sum(w * tensors[m["model"]][name] for w, m in zip(ws, models)) / sum(ws)
        return out
    base = _load(root, cfg["base_model"])
    members = [m for m in models if m["model"] != cfg["base_model"]]
    if "tokenizer" in cfg or "tokenizer_source" in cfg:
        fill = _referenced(cfg)
        base = aligned(root, cfg, cfg["base_model"], fill, cfg["base_model"])
        tensors = {m["model"]: aligned(root, cfg, m["model"], fill, cfg["base_model"]) for m in members}
    if method in OTHER_METHODS:
        return OTHER_METHODS[method](root, cfg, base, [(m, tensors[m["model"]]) for m in members])
    defaults = {"ties": (True, False), "dare_ties": (False, True), "breadcrumbs": (False, False),
                "breadcrumbs_ties": (False, False), "task_arithmetic": (False, False), "dare_linear": (False, True),
                "della": (True, True), "della_linear": (False, True)}[method]
    normalize = (cfg.get("parameters") or {}).get("normalize", defaults[0])
    return {name: _gta(method, cfg, base[name], [(m, tensors[m["model"]][name]) for m in members], name, normalize,
                       members) for name in base}


def _gta(method: str, cfg: dict[str, Any], base: torch.Tensor, inputs: list[tuple[dict, torch.Tensor]], name: str,
         normalize: bool, members: list[dict]) -> torch.Tensor:
    deltas, weights = [], []
    for i, (m, x) in enumerate(inputs):
        d = (x.float() - base.float()).double()  # the float32 delta both engines select from
        if method != "task_arithmetic":
            gen = tensor_generator(0, f"merge/{i}", name) if method.startswith("dare") else None
            d = _sparsify(method, d, _param(cfg, m, "density", name, 1.0), _param(cfg, m, "gamma", name, 0.01), gen)
        deltas.append(d)
        weights.append(_param(cfg, m, "weight", name))
    weighted = torch.stack([w * d for w, d in zip(weights, deltas)])
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * base.dim()))
    if method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
        mask = (weighted.sign() == majority).double()
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), w.sum(0).expand_as(base).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base.double() + _param(cfg, None, "lambda", name, 1.0) * mixed


# ---- mergekit's other methods (float64, from mergekit 0.1.5's formulas) ---------------------

Inputs = list[tuple[dict[str, Any], dict[str, torch.Tensor]]]


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, -1) if x.dim() == 1 else x


def _sce(_root: Path, cfg: dict[str, Any], base: dict[str, torch.Tensor], inputs: Inputs) -> dict[str, torch.Tensor]:
    """Keep the top select_topk entries by variance across the task vectors (int(nonzero * k) of them), erase
    minority signs (of the plain sum, + at 0), weight each vector by its mean square."""
    out = {}
    for name, b in base.items():
        tv = torch.stack([(x[name].float() - b.float()).double() for _, x in inputs])
        k = _param(cfg, None, "select_topk", name, 1.0)
        if k < 1:
            var = tv.var(0, unbiased=False)
            mask = torch.zeros(var.numel(), dtype=torch.float64)
            mask[torch.topk(var.reshape(-1), int(torch.count_nonzero(var) * k)).indices] = 1
            tv = tv * mask.reshape(var.shape)
        erase = (tv.sign() == torch.where(tv.sum(0) >= 0, 1.0, -1.0)).double()
        w = (tv ** 2).mean(dim=list(range(1, tv.dim())))
        w = (w / w.sum()).reshape(-1, *([1] * b.dim()))
        out[name] = b + (tv * w * erase).sum(0) / (w * erase).sum(0).clamp(min=1e-6)
    return out


def _nuslerp(_root: Path, cfg: dict[str, Any], base: dict[str, torch.Tensor], inputs: Inputs) -> dict[str, torch.Tensor]:
    """SLERP of the two task vectors at t = w_2 / (w_1 + w_2), per row of the last dimension (flatten: false)."""
    assert (cfg.get("parameters") or {}).get("nuslerp_flatten") is False
    out = {}
    for name, b in base.items():
        w = [_param(cfg, m, "weight", name) for m, _ in inputs]
        t = w[1] / sum(w)
        v0, v1 = (_rows(x[name] - b) for _, x in inputs)
        cos = ((v0 / v0.norm(dim=-1, keepdim=True)) * (v1 / v1.norm(dim=-1, keepdim=True))).sum(-1, keepdim=True)
        theta = torch.acos(cos.clamp(-1, 1))
        res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
        out[name] = b + res.reshape(b.shape)
    return out


def _multislerp(_root: Path, cfg: dict[str, Any], _base: None, inputs: Inputs) -> dict[str, torch.Tensor]:
    """The weighted mean of the unit vectors, mapped back to the sphere from its tangent space, times the mean norm."""
    out, eps = {}, 1e-8
    for name in inputs[0][1]:
        w = torch.tensor([_param(cfg, m, "weight", name) for m, _ in inputs], dtype=torch.float64)
        w = w / w.sum()
        flat = torch.stack([x[name].reshape(-1) for _, x in inputs])
        norms = flat.norm(dim=-1, keepdim=True)
        unit = flat / (norms + eps)
        mean = (unit * w[:, None]).sum(0)
        mean = mean / mean.norm()
        tangent = ((unit - (unit * mean).sum(-1, keepdim=True) * mean) * w[:, None]).sum(0)
        size = tangent.norm() + eps
        res = mean * torch.cos(size) + tangent * torch.sin(size) / size
        out[name] = (res * (norms[:, 0] * w).sum()).reshape(inputs[0][1][name].shape)
    return out


def _karcher_one(xs: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    norms = [float(x.norm()) for x in xs]
    units = [x / n for x, n in zip(xs, norms) if n > tol]
    a = 1 / len(units)
    u = sum(a * x for x in units)
    u = u / u.norm()
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        for x in units:
            dot = torch.clamp((u * x).sum(), -1, 1)
            theta = torch.arccos(dot)
            if float(theta) >= tol:
                step += a * (theta / torch.sin(theta)) * (x - dot * u)
        size = step.norm()
        if float(size) < tol:
            break
        u = torch.cos(size) * u + torch.sin(size) * step / size
        u = u / u.norm()
    return sum(norms) / len(xs) * u


def _karcher(_root: Path, cfg: dict[str, Any], _base: None, inputs: Inputs) -> dict[str, torch.Tensor]:
    """The Karcher mean (equal weights) of the models and the base, which mergekit adds as one more model."""
    everything = [x for _, x in inputs] + [_load(_root, cfg["base_model"])]
    max_iter, tol = int(_param(cfg, None, "max_iter", "", 10)), _param(cfg, None, "tol", "", 1e-5)
    return {name: _karcher_one([x[name] for x in everything], max_iter, tol) for name in everything[0]}


def _model_stock(_root: Path, cfg: dict[str, Any], base: dict[str, torch.Tensor], inputs: Inputs) -> dict[str, torch.Tensor]:
    """base + t (mean - base), t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the offsets (per row).
    A negative mean cosine is kept (mergekit extrapolates; the converted recipe says negative_cos: extrapolate)."""
    assert (cfg.get("parameters") or {}).get("filter_wise") is True
    out = {}
    for name, b in base.items():
        w0, ws = _rows(b), [_rows(x[name]) for _, x in inputs]
        offsets = [w - w0 for w in ws]
        cos = torch.stack([(offsets[i] * offsets[j]).sum(-1) / (offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)).clamp(min=1e-6)
                           for i in range(len(ws)) for j in range(i + 1, len(ws))]).mean(0).unsqueeze(-1)
        t = len(ws) * cos / (1 + (len(ws) - 1) * cos)
        out[name] = (t * sum(ws) / len(ws) + (1 - t) * w0).reshape(b.shape)
    return out


def _nearswap(_root: Path, cfg: dict[str, Any], base: dict[str, torch.Tensor], inputs: Inputs) -> dict[str, torch.Tensor]:
    """Per entry: the model's value weighted by t / |base - model| (clamped to [0, 1])."""
    (_, model), = inputs
    out = {}
    for name, b in base.items():
        w = (_param(cfg, None, "t", name) / (b - model[name]).abs().clamp(min=1e-6)).clamp(0, 1)
        out[name] = w * model[name] + (1 - w) * b
    return out


def _arcee_fusion(_root: Path, cfg: dict[str, Any], base: dict[str, torch.Tensor], inputs: Inputs) -> dict[str, torch.Tensor]:
    """The model's changes whose importance |delta| * KL(softmax(model) + eps || softmax(base) + eps) (per row)
    reaches median + 1.5 IQR (quantile q: the sorted scores' entry int(q (n - 1))); the KL in float32, as mergekit
    (the converted recipe says kl_dtype: float32)."""
    (_, model), = inputs
    out = {}
    for name, b in base.items():
        x = model[name]
        p, q = (torch.softmax(_rows(v).float(), -1) + 1e-8 for v in (x, b))
        kl = (p * torch.log(p / q)).sum(-1, keepdim=True).double()
        scores = ((_rows(x) - _rows(b)).abs() * kl).reshape(b.shape)
        ranked = scores.reshape(-1).sort().values
        median, q1, q3 = (ranked[int(f * (ranked.numel() - 1))] for f in (0.5, 0.25, 0.75))
        out[name] = b + (x - b) * (scores >= median + 1.5 * (q3 - q1))
    return out


OTHER_METHODS = {"sce": _sce, "nuslerp": _nuslerp, "multislerp": _multislerp, "karcher": _karcher,
                 "model_stock": _model_stock, "nearswap": _nearswap, "arcee_fusion": _arcee_fusion}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_direct_and_converted_match_mergekit(family: Path, config: Path, tmp_path: Path) -> None:
    cfg_path = family / config.name
    shutil.copy(config, cfg_path)
    out = tmp_path / "out"
    run_recipe(cfg_path, out=out)
    direct = _hashes(out)
    recipe = convert_file(cfg_path, family / f"{config.stem}.recipe.yaml")
    assert recipe.startswith("# Converted from a mergekit config") and ("op: merge" in recipe or "op: slices" in recipe)
    run_recipe(family / f"{config.stem}.recipe.yaml", out=out, overwrite=True)
    assert _hashes(out) == direct  # the same bytes, every file
    got = read_folder(out)
    want = mergekit_result(family, yaml.safe_load(config.read_text()))
    assert set(got) == set(want)
    for name, t in want.items():
        torch.testing.assert_close(got[name].double(), t, rtol=1e-5, atol=2e-6, msg=f"{config.stem}: {name}")


def test_merged_output_loads_in_transformers(family: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg_path = family / "ties_density_gradient.yml"
    shutil.copy(CONFIGS[[c.name for c in CONFIGS].index(cfg_path.name)], cfg_path)
    run_recipe(cfg_path, out=tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 96) and math.isfinite(float(logits.abs().sum()))


def test_stacked_output_config_and_transformers_load(family: Path, tmp_path: Path) -> None:
    """A passthrough stack of 3 + 3 layers: num_hidden_layers 6, and transformers runs it."""
    from transformers import AutoModelForCausalLM

    cfg_path = family / "passthrough_stack.yml"
    shutil.copy(Path(__file__).parent / "mergekit_configs" / "passthrough_stack.yml", cfg_path)
    run_recipe(cfg_path, out=tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    for key, value in config.items():  # per-layer lists (e.g. layer_types) follow the stack
        assert not (isinstance(value, list) and len(value) == LAYERS), key
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 6
    with torch.no_grad():
        assert math.isfinite(float(model(torch.tensor([[1, 2, 3]])).logits.abs().sum()))


def test_union_stack_loads_in_transformers_and_round_trips(family: Path, tmp_path: Path) -> None:
    """A frankenmerge over a union vocabulary: config, rows and tokenizer agree, every added token round-trips."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg_path = family / "slices_union_slerp.yml"
    shutil.copy(Path(__file__).parent / "mergekit_configs" / cfg_path.name, cfg_path)
    run_recipe(cfg_path, out=tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    vocab = tok.get_vocab()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    rows = read_folder(tmp_path / "out")["model.embed_tokens.weight"].shape[0]
    assert config["vocab_size"] == len(vocab) == rows and config["num_hidden_layers"] == LAYERS  # 87 (88: qwen2 adds a token)
    for t in ("tok_a1", "tok_a2", "tok_b", "<tool>"):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert ids == [vocab[t]] and tok.decode(ids) == t
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        logits = model(torch.tensor([[vocab["<tool>"], vocab["tok_b"]]])).logits
    assert logits.shape == (1, 2, rows) and math.isfinite(float(logits.abs().sum()))
