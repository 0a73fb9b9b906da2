"""How each mergekit merge method's parameters map onto a mergeengine merge step.

mergekit has *per-model* parameters (``weight``, ``density``, ``gamma``: given under each model,
falling back to the config-wide ``parameters:``) and *global* ones (``lambda``, ``normalize``,
``rescale``, ``int8_mask``). Per-model values become per-input lists (each element a number or
a schedule); a model's filter list that matches nothing falls back to the global value, as in
mergekit, by appending the global value as the last entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mergeengine.recipe.mergekit_schema import MergekitConfig

YPath = tuple[Any, ...]


@dataclass(frozen=True)
class MethodSpec:
    """One mergekit method's translation.

    Attributes:
        ours: the mergeengine method.
        per_model: mergekit per-model parameter -> (our field, mergekit's default or None if required).
        shared: mergekit's config-wide parameters copied to a field of the same meaning.
        normalize: mergekit's default of ``normalize`` (None: the method has no such parameter).
        our_normalize: mergeengine's default of its ``normalize`` field (None: it has none).
        rescale: mergekit's default of ``rescale`` (None: none).
        sign_vote: the method elects a sign weighted by the model weights (mergekit), + on a vote of exactly 0.
        top_k: the method keeps a top-k by magnitude (mergekit counts ``int(density * n)``).
        needs_base: the method needs ``base_model`` (and merges every other model).
        optional_base: ``base_model``, when given, is the origin the models are taken from (left out
            of the merged models, as in mergekit's ``nuslerp`` and ``multislerp``).
        base_merged: ``base_model`` is merged as one more model (mergekit adds it to the inputs of
            ``karcher``, which has no base); the merge step gets no ``base``.
        note: a comment the recipe carries for every merge of the method.
        count: how many models (besides the base) the method merges, where it is fixed.
        fixed: fields set to mergekit's behaviour where mergeengine's default differs (``note`` says why).
    """

    ours: str
    per_model: dict[str, tuple[str, Any]]
    shared: tuple[str, ...] = ("lambda", "int8_mask")
    normalize: bool | None = None
    our_normalize: bool | None = None
    rescale: bool | None = None
    sign_vote: bool = False
    top_k: bool = False
    needs_base: bool = True
    optional_base: bool = False
    base_merged: bool = False
    note: str | None = None
    count: int | None = None
    fixed: dict[str, Any] = field(default_factory=dict)


_W = {"weight": ("weights", None)}
_WD = {**_W, "density": ("density", 1.0)}
_WDG = {**_WD, "gamma": ("gamma", 0.01)}
_WDE = {**_WD, "epsilon": ("epsilon", 0.15)}
_DELLA_NOTE = ("MAGPRUNE draws from mergeengine's seeded generators (mergekit: torch's global one): the result "
               "agrees with mergekit's in distribution, exactly at density 1; ties between equal magnitudes are "
               "ranked by position (mergekit: torch.argsort)")

METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec("linear", _W, shared=(), normalize=True, needs_base=False),
    "task_arithmetic": MethodSpec("task_arithmetic", _W, shared=("lambda",), normalize=False),
    "ties": MethodSpec("ties", _WD, normalize=True, our_normalize=True, sign_vote=True, top_k=True),
    "dare_ties": MethodSpec("dare_ties", _WD, normalize=False, our_normalize=True, rescale=True, sign_vote=True),
    "dare_linear": MethodSpec("dare_linear", _WD, normalize=False, our_normalize=False, rescale=True),
    "breadcrumbs": MethodSpec("breadcrumbs", _WDG, normalize=False, our_normalize=False, top_k=True),
    "breadcrumbs_ties": MethodSpec("breadcrumbs_ties", _WDG, normalize=False, our_normalize=True, sign_vote=True,
                                   top_k=True),
    "slerp": MethodSpec("slerp", {}, shared=("t",)),
    "della": MethodSpec("della", _WDE, normalize=True, our_normalize=True, rescale=True, sign_vote=True,
                        note=_DELLA_NOTE),
    "della_linear": MethodSpec("della_linear", _WDE, normalize=False, our_normalize=False, rescale=True,
                               note=_DELLA_NOTE),
    "sce": MethodSpec("sce", {}, shared=("select_topk", "int8_mask"), fixed={"zero_vote": "positive"},
                      note="zero_vote: positive: mergekit's sign election on the plain sum of the deltas elects + "
                           "where that sum is exactly 0 (mergeengine's default: 0)"),
    "nuslerp": MethodSpec("nuslerp", _W, shared=("nuslerp_flatten", "nuslerp_row_wise"), needs_base=False,
                          optional_base=True, count=2),
    "multislerp": MethodSpec("multislerp", _W, shared=("normalize_weights", "eps"), needs_base=False,
                             optional_base=True),
    "karcher": MethodSpec("karcher", {}, shared=("max_iter", "tol"), needs_base=False, base_merged=True),
    "model_stock": MethodSpec("model_stock", {}, shared=("filter_wise",), fixed={"negative_cos": "extrapolate"},
                              note="negative_cos: extrapolate: mergekit's ratio where the mean cosine is negative "
                                   "(mergeengine's default clamps it to 0, the base)"),
    "nearswap": MethodSpec("nearswap", {}, shared=("t",), count=1),
    "arcee_fusion": MethodSpec("arcee_fusion", {}, shared=(), count=1, fixed={"kl_dtype": "float32"},
                               note="kl_dtype: float32: mergekit's KL divergence precision (mergeengine's default: "
                                    "float64)"),
    "passthrough": MethodSpec("passthrough", {}, shared=(), needs_base=False),
}

class ConvertError(Exception):
    """A mergekit key that cannot be translated: where it is in the config and why (the caller adds line:col)."""

    def __init__(self, where: YPath, message: str) -> None:
        super().__init__(message)
        self.where = where
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by its constructor's arguments (the default would call ``ConvertError(message)``)."""
        return type(self), (self.where, self.message)


def _as_list(value: Any) -> Any:
    """mergekit allows one ``{filter, value}`` mapping where a list of them is meant."""
    return [value] if isinstance(value, dict) else value


def _is_filters(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(e, dict) for e in value)


def layered(own: Any, fallback: Any) -> Any:
    """A model's setting with mergekit's fallback to the global one where its filters match nothing."""
    own, fallback = _as_list(own), _as_list(fallback)
    if own is None:
        return fallback
    if fallback is None or not _is_filters(own) or any("filter" not in e for e in own):
        return own
    return own + (fallback if _is_filters(fallback) else [{"value": fallback}])


def layer_params(own: dict[str, Any] | None, fallback: dict[str, Any] | None) -> dict[str, Any] | None:
    """Parameters of a slice or module over the wider ones, each falling back where its filters match nothing."""
    glob = dict(fallback or {})
    out = {**glob, **{k: layered(v, glob.get(k)) for k, v in (own or {}).items()}}
    return out or None


def _check_keys(spec: MethodSpec, config: MergekitConfig, method: str) -> None:
    allowed_models = set(spec.per_model)
    allowed_global = allowed_models | set(spec.shared)
    if spec.normalize is not None:
        allowed_global |= {"normalize", "rescale"}
    for key in config.parameters or {}:
        if key not in allowed_global:
            raise ConvertError(("parameters", key), f"not a parameter of {method} "
                              f"(known: {', '.join(sorted(allowed_global))})")
    for i, m in enumerate(config.models or []):
        for key in m.parameters or {}:
            if key not in allowed_models:
                raise ConvertError(("models", i, "parameters", key), f"not a per-model parameter of {method} "
                                  f"(known: {', '.join(sorted(allowed_models))})")


def _flag(config: MergekitConfig, key: str, default: bool | None) -> bool | None:
    value = (config.parameters or {}).get(key, default)
    if value is not None and not isinstance(value, bool):
        raise ConvertError(("parameters", key), f"'{key}' must be true or false here (no gradients or filters)")
    return value


def _per_input(spec: MethodSpec, config: MergekitConfig, members: list[int], fields: dict[str, Any],
               origins: dict[YPath, YPath]) -> None:
    models = config.models or []
    glob = config.parameters or {}
    for key, (ours, default) in spec.per_model.items():
        values = []
        for i in members:
            value = layered((models[i].parameters or {}).get(key), glob.get(key))
            if value is None:
                value = default
            if value is None:
                raise ConvertError(("models", i), f"model {i} needs parameter '{key}' (no global default)")
            values.append(value)
        fields[ours] = values[0] if len(set(map(repr, values))) == 1 and ours != "weights" else values
        origins[(ours,)] = ("parameters", key) if key in glob else ("models", members[0], "parameters", key)
        for j, i in enumerate(members):
            if key in (models[i].parameters or {}):
                origins[(ours, j)] = ("models", i, "parameters", key)


def merge_fields(spec: MethodSpec, config: MergekitConfig, base: str | None,
                 inputs: list[str]) -> tuple[dict[str, Any], list[str], dict[YPath, YPath]]:
    """The merge step's fields, the comments explaining them, and each field's mergekit origin.

    Raises:
        ConvertError: an unknown parameter, a missing required one, or a setting without a translation.
    """
    method = config.merge_method
    _check_keys(spec, config, method)
    if spec.needs_base and base is None:
        raise ConvertError(("merge_method",), f"{method} needs 'base_model'")
    # mergekit merges every listed model but the base (which it uses as the reference)
    members = [i for i, sid in enumerate(inputs) if not ((spec.needs_base or spec.optional_base) and sid == base)]
    fields: dict[str, Any] = {"inputs": [inputs[i] for i in members]}
    if spec.count is not None and len(members) != spec.count:
        raise ConvertError(("models",), f"{method} merges exactly {spec.count} model(s) besides the base, "
                           f"got {len(members)}")
    if spec.base_merged:
        if base is not None and base not in fields["inputs"]:
            fields["inputs"].append(base)  # mergekit adds the base model last to the merged models
    elif base is not None:
        fields["base"] = base
    origins: dict[YPath, YPath] = {("inputs",): ("models",), ("base",): ("base_model",)}
    notes: list[str] = [spec.note] if spec.note else []
    _per_input(spec, config, members, fields, origins)
    for key in spec.shared:
        if key in (config.parameters or {}):
            fields[key] = _as_list(config.parameters[key])  # type: ignore[index]
            origins[(key,)] = ("parameters", key)
    fields.update(spec.fixed)
    _normalize(spec, config, fields, notes)
    _rescale(spec, config, fields, notes)
    _selection(spec, fields, notes)
    if spec.base_merged and base is not None:
        notes.append(f"{method} has no base: mergekit merges base_model as one more model, so does this step")
    if fields.get("int8_mask"):
        notes.append("int8_mask only changes mergekit's mask storage, not the result")
    return fields, notes, origins


def _selection(spec: MethodSpec, fields: dict[str, Any], notes: list[str]) -> None:
    """mergekit's sign election and top-k count, written out where mergeengine's defaults differ."""
    if spec.sign_vote:
        fields["vote"], fields["zero_vote"] = "weighted", "positive"
        notes.append("vote: weighted, zero_vote: positive: mergekit's sign election (the sign of the weighted "
                     "sum, + where it is exactly 0; mergeengine's defaults: unweighted, 0)")
    if spec.top_k:
        fields["keep_count"] = "truncate"
        notes.append("keep_count: truncate: mergekit's top-k count int(density * n) (mergeengine's default rounds)")
    if spec.ours.startswith("breadcrumbs"):
        notes.append("where density + gamma > 1 mergekit drops fewer outliers to keep density, and density 1 "
                     "keeps everything; mergeengine drops gamma first in both cases")


def _normalize(spec: MethodSpec, config: MergekitConfig, fields: dict[str, Any], notes: list[str]) -> None:
    normalize = _flag(config, "normalize", spec.normalize)
    if normalize is None:
        return
    if spec.our_normalize is not None:
        if normalize != spec.our_normalize:
            fields["normalize"] = normalize
            source = "the config's" if "normalize" in (config.parameters or {}) else f"mergekit's default for {spec.ours}"
            notes.append(f"normalize: {str(normalize).lower()} is {source} (mergeengine's default: "
                         f"{str(spec.our_normalize).lower()})")
        return
    if normalize == spec.normalize:
        return
    if spec.ours == "linear":
        raise ConvertError(("parameters", "normalize"), "linear with normalize: false (a plain weighted sum) has "
                           "no translation; use task_arithmetic against a base")
    weights = fields.get("weights", [])
    if not all(isinstance(w, (int, float)) for w in weights) or abs(sum(weights)) < 1e-8:
        raise ConvertError(("parameters", "normalize"), "normalize: true needs constant weights with a non-zero "
                           "sum to translate (weights divided by their sum)")
    total = float(sum(weights))
    fields["weights"] = [w / total for w in weights]
    notes.append(f"normalize: true -> weights divided by their sum ({total:g})")


def _rescale(spec: MethodSpec, config: MergekitConfig, fields: dict[str, Any], notes: list[str]) -> None:
    rescale = _flag(config, "rescale", spec.rescale or False)
    if spec.rescale is None:
        if rescale:
            raise ConvertError(("parameters", "rescale"), f"rescale: true has no translation for {spec.ours}")
        return
    fields["rescale"] = "l1" if rescale else "none"
    if spec.ours.startswith(("dare", "della")):
        notes.append(f"rescale: {fields['rescale']} is mergekit's rescale: {str(rescale).lower()} "
                     "(mergeengine's default per_element divides by density)")
