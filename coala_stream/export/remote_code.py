"""Make a ``factorized`` output load in vanilla transformers (``trust_remote_code=True``).

A factorized checkpoint holds ``<m>.B.weight`` / ``<m>.A.weight`` (/ ``<m>.A.bias``)
where the base architecture expects ``<m>.weight``. Left with the base
``model_type``, ``AutoModelForCausalLM.from_pretrained(DIR)`` would accept it,
initialise every factorized layer at random and generate garbage. So
`remote_code` rewrites config.json:

- ``model_type`` becomes `MODEL_TYPE`, which transformers does not know: without
  ``trust_remote_code`` loading stops with a ValueError asking for it (an
  interactive terminal is first asked "run the custom code? [y/N]").
- ``auto_map`` points AutoConfig / AutoModelForCausalLM at `MODULE_FILE`, written
  beside config.json. It needs only torch and transformers (not coala-stream):
  a config class and a model class subclassing the base architecture's, whose
  ``__init__`` swaps each module of ``coala_stream.ranks`` for a LowRankLinear
  with the parameter names coala-stream writes, so the checkpoint loads with
  no missing or unexpected keys.
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

# The written module. {config_class} / {model_class} are the base architecture's
# class names, imported from transformers by name: one file per output, so the
# class hierarchy is fixed when transformers imports it (it copies the file into
# its module cache under a hash of its text, so outputs never clash).
_MODULE_TEMPLATE = '''\
"""Low-rank {model_class} written by coala-stream {tool_version}.

Every module listed in config.coala_stream["ranks"] is a LowRankLinear
y = A(B(x)): B (in -> rank, no bias), A (rank -> out, the original bias).
Load with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).
Needs only torch and transformers.
"""

from torch import nn
from transformers import {config_class} as _BaseConfig
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


class {config_class_new}(_BaseConfig):
    model_type = "{model_type}"


class {model_class_new}(_BaseModel):
    config_class = {config_class_new}

    def __init__(self, config):
        super().__init__(config)
        for name, rank in config.{section}["ranks"].items():
            parent_name, _, child = name.rpartition(".")
            parent = self.get_submodule(parent_name) if parent_name else self
            old = getattr(parent, child)
            if not isinstance(old, nn.Linear):
                raise ValueError(f"{{name}} is not an nn.Linear of {{type(self).__name__}}")
            w = old.weight
            setattr(parent, child, LowRankLinear(old.in_features, old.out_features, int(rank),
                                                 old.bias is not None, w.device, w.dtype))
'''


def _class_names(base_type: str, architecture: str | None) -> tuple[str, str]:
    """(config class, causal-LM class) names of ``base_type`` in this transformers."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_class = CONFIG_MAPPING_NAMES.get(base_type)
    model_class = architecture or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(base_type)
    if not config_class or not model_class or not hasattr(transformers, model_class):
        raise ValueError(f"model_type {base_type!r} / architecture {model_class!r} is not a causal LM "
                         f"of transformers {transformers.__version__}; cannot write remote code for it")
    return config_class, model_class


def remote_code(config: dict) -> tuple[dict, dict[str, str]]:
    """(new config.json dict, {filename: text}) for a factorized output's config.json dict.

    ``config``: the source model's config plus our section (``format: "factorized"``,
    ``ranks``). Also accepts a config already rewritten (returns an equivalent one).
    """
    section = dict(config.get(SECTION) or {})
    if section.get("format") != "factorized" or "ranks" not in section:
        raise ValueError(f"config has no {SECTION!r} section of format 'factorized' with ranks")
    if config.get("model_type") == MODEL_TYPE:  # rewritten already: start from the base form
        config = base_config_dict(config)
    base_type = config.get("model_type")
    archs = config.get("architectures") or [None]
    config_class, model_class = _class_names(base_type, archs[0])

    new = copy.deepcopy(config)
    new["model_type"] = MODEL_TYPE
    new["architectures"] = [MODEL_CLASS]
    new["auto_map"] = {"AutoConfig": f"{MODULE_FILE[:-3]}.{CONFIG_CLASS}",
                       "AutoModelForCausalLM": f"{MODULE_FILE[:-3]}.{MODEL_CLASS}"}
    new[SECTION] = {**section, "base_model_type": base_type, "base_architecture": model_class}
    text = _MODULE_TEMPLATE.format(
        config_class=config_class, model_class=model_class, config_class_new=CONFIG_CLASS,
        model_class_new=MODEL_CLASS, model_type=MODEL_TYPE, section=SECTION,
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
