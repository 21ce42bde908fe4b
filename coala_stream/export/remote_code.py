"""Make a ``factorized`` output load in vanilla transformers (``trust_remote_code=True``).

A factorized checkpoint holds ``<m>.B.weight`` / ``<m>.A.weight`` (/ ``<m>.A.bias``)
where the base architecture expects ``<m>.weight``. Left with the base
``model_type``, ``AutoModelForCausalLM.from_pretrained(DIR)`` would accept it,
initialise every factorized layer at random and generate garbage. So
`remote_code` rewrites config.json:

- ``model_type`` becomes `MODEL_TYPE`, which transformers does not know: without
  ``trust_remote_code`` loading stops with a ValueError asking for it (an
  interactive terminal is first asked "run the custom code? [y/N]").
- ``auto_map`` points AutoConfig, AutoModel and AutoModelForCausalLM at
  `MODULE_FILE`, written beside config.json. It needs only torch and
  transformers (not coala-stream): a config class, a base-model class
  (`BASE_CLASS`, subclassing the base architecture's, e.g. LlamaModel) whose
  ``__init__`` swaps each module of ``coala_stream.ranks`` for a LowRankLinear
  with the parameter names coala-stream writes, and the causal-LM class built on
  it, so the checkpoint loads with no missing or unexpected keys. Only the
  linears change: attention stays the base architecture's own modules, which
  call ``ALL_ATTENTION_FUNCTIONS`` with the kwargs passed down, and the classes
  keep the base's ``_supports_attention_backend``. That is what the
  Transformers backend of vLLM / SGLang asks of remote code (``AutoModel`` to
  the base model); serving there is untested here (no GPU). Tensor
  parallelism is switched off (``base_model_tp_plan = None``): the base plan
  would shard a factor pair as if it were the one matrix it replaced.
- ``architectures`` becomes ``["CoalaStreamForCausalLM"]`` (what transformers
  itself writes on ``save_pretrained`` of the loaded model); the base
  ``model_type`` and architecture move into our section (``base_model_type``,
  ``base_architecture``), where `base_config` finds them again.

Both steps are pure: the caller writes the files.
"""

from __future__ import annotations

import copy

SECTION = "coala_stream"  # the config.json key of our metadata (as export.SECTION)
MODULE_FILE = "modeling_coala_stream.py"
MODEL_TYPE = "coala_stream_lowrank"
CONFIG_CLASS = "CoalaStreamConfig"
MODEL_CLASS = "CoalaStreamForCausalLM"
BASE_CLASS = "CoalaStreamModel"

# The written module. {config_class} / {base_class} / {model_class} are the base
# architecture's class names, imported from transformers by name: one file per output, so
# the class hierarchy is fixed when transformers imports it (it copies the file into its
# module cache under a hash of its text, so outputs never clash).
_MODULE_TEMPLATE = '''\
"""Low-rank {model_class} written by coala-stream {tool_version}.

Every module listed in config.coala_stream["ranks"] is a LowRankLinear
y = A(B(x)): B (in -> rank, no bias), A (rank -> out, the original bias).
{base_class_new} is the base model (a {base_class} holding the low-rank layers;
what AutoModel loads), {model_class_new} the causal LM built on it.
Attention is the base architecture's own. Load with
AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).
Needs only torch and transformers.
"""

from torch import nn
from transformers import {config_class} as _BaseConfig
from transformers import {base_class} as _BaseBackbone
from transformers import {model_class} as _BaseModel


class LowRankLinear(nn.Module):
    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.A = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.A(self.B(x))

    def extra_repr(self):
        return (f"in_features={{self.in_features}}, out_features={{self.out_features}}, "
                f"rank={{self.rank}}")


def _swap_in_low_rank(root, ranks):
    for name, rank in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{{name}} is not an nn.Linear of {{type(root).__name__}}")
        w = old.weight
        setattr(parent, child, LowRankLinear(old.in_features, old.out_features, int(rank),
                                             old.bias is not None, w.device, w.dtype))


def _ranks(config, inside):
    """The ranks of the modules inside the base model (names relative to it), or the rest."""
    prefix = _BaseModel.base_model_prefix + "."
    ranks = config.{section}["ranks"]
    if inside:
        return {{n[len(prefix):]: r for n, r in ranks.items() if n.startswith(prefix)}}
    return {{n: r for n, r in ranks.items() if not n.startswith(prefix)}}


class {config_class_new}(_BaseConfig):
    model_type = "{model_type}"
    base_model_tp_plan = None  # the base plan would shard a factor pair as one matrix


class {base_class_new}(_BaseBackbone):
    config_class = {config_class_new}
    _supports_attention_backend = {attention_backend}

    def __init__(self, config):
        super().__init__(config)
        _swap_in_low_rank(self, _ranks(config, inside=True))


class {model_class_new}(_BaseModel):
    config_class = {config_class_new}
    _supports_attention_backend = {attention_backend}

    def __init__(self, config):
        super().__init__(config)
        prefix = self.base_model_prefix
        if not isinstance(getattr(self, prefix, None), _BaseBackbone):
            raise ValueError(f"{{type(self).__name__}}.{{prefix}} is not a {{_BaseBackbone.__name__}}")
        setattr(self, prefix, {base_class_new}(config))
        _swap_in_low_rank(self, _ranks(config, inside=False))
        self.post_init()  # gather plans and tied keys again from the new base model
'''


def _class_names(base_type: str, architecture: str | None) -> tuple[str, str, str]:
    """(config class, base-model class, causal-LM class) names of ``base_type`` in this
    transformers."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_MAPPING_NAMES)

    config_class = CONFIG_MAPPING_NAMES.get(base_type)
    base_class = MODEL_MAPPING_NAMES.get(base_type)
    model_class = architecture or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(base_type)
    if not config_class or not model_class or not hasattr(transformers, model_class):
        raise ValueError(f"model_type {base_type!r} / architecture {model_class!r} is not a causal LM "
                         f"of transformers {transformers.__version__}; cannot write remote code for it")
    if not isinstance(base_class, str) or not hasattr(transformers, base_class):
        raise ValueError(f"model_type {base_type!r} has no base-model class in transformers "
                         f"{transformers.__version__}; cannot write remote code for it")
    return config_class, base_class, model_class


def remote_code(config: dict) -> tuple[dict, dict[str, str]]:
    """(new config.json dict, {filename: text}) for a factorized output's config.json dict.

    ``config``: the source model's config plus our section (``format: "factorized"``,
    ``ranks``). Also accepts a config already rewritten (returns an equivalent one).
    """
    import transformers

    section = dict(config.get(SECTION) or {})
    if section.get("format") != "factorized" or "ranks" not in section:
        raise ValueError(f"config has no {SECTION!r} section of format 'factorized' with ranks")
    if config.get("model_type") == MODEL_TYPE:  # rewritten already: start from the base form
        config = base_config_dict(config)
    base_type = config.get("model_type")
    archs = config.get("architectures") or [None]
    config_class, base_class, model_class = _class_names(base_type, archs[0])

    new = copy.deepcopy(config)
    new["model_type"] = MODEL_TYPE
    new["architectures"] = [MODEL_CLASS]
    module = MODULE_FILE[:-3]
    new["auto_map"] = {"AutoConfig": f"{module}.{CONFIG_CLASS}", "AutoModel": f"{module}.{BASE_CLASS}",
                       "AutoModelForCausalLM": f"{module}.{MODEL_CLASS}"}
    new[SECTION] = {**section, "base_model_type": base_type, "base_architecture": model_class}
    # the base's own flag: only its attention code decides whether kwargs reach the backend
    backend = bool(getattr(getattr(transformers, base_class), "_supports_attention_backend", False))
    text = _MODULE_TEMPLATE.format(
        config_class=config_class, base_class=base_class, model_class=model_class,
        config_class_new=CONFIG_CLASS, base_class_new=BASE_CLASS, model_class_new=MODEL_CLASS,
        model_type=MODEL_TYPE, section=SECTION, attention_backend=backend,
        tool_version=section.get("tool_version", "?"))
    return new, {MODULE_FILE: text}


def base_config_dict(config: dict) -> dict:
    """The config dict of the base architecture: undoes `remote_code` (a copy; an old-style
    dict, whose model_type is already the base type, comes back unchanged)."""
    config = copy.deepcopy(config)
    if config.get("model_type") != MODEL_TYPE:
        return config
    section = config.get(SECTION) or {}
    if "base_model_type" not in section:
        raise ValueError(f"config of model_type {MODEL_TYPE!r} lacks {SECTION}.base_model_type")
    config["model_type"] = section["base_model_type"]
    config.pop("auto_map", None)
    if section.get("base_architecture"):
        config["architectures"] = [section["base_architecture"]]
    return config


def base_config(config: dict):
    """The transformers config (e.g. a ``LlamaConfig``) of the base architecture of a
    factorized output's config.json dict, new form or old. No remote code, no network:
    the class comes from transformers' own table, filled like ``AutoConfig.from_pretrained``
    does (``from_dict``). The ``coala_stream`` section stays as an attribute."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = base_config_dict(config)
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model_type {model_type!r} is not known to this transformers; "
                         f"upgrade transformers")
    return CONFIG_MAPPING[model_type].from_dict(config)
