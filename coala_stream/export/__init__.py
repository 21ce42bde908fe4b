"""Export: solve's results as models that load back, and loading them.

- `lowrank`: `LowRankLinear` and the swap into a model;
- `staging`: outputs built aside and published by one rename;
- `writers`: the factorized, dense and peft writers (`WRITERS`);
- `remote_code`: the modeling file that lets plain transformers load a factorized output;
- `load`: `load_output` (alias `load_model`) and `load_tokenizer`.
"""

from .load import detect_format, load_model, load_output, load_tokenizer
from .lowrank import LowRankLinear, swap_in_low_rank
from .staging import check_out_dir, staging_dir
from .writers import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT_VERSION, REPORT_FILE, SECTION,
                      WRITERS, DenseWriter, FactorizedWriter, PeftWriter, Writer, adapter_config)
from ..weights import INDEX_FILE, SINGLE_FILE

__all__ = ["detect_format", "load_model", "load_output", "load_tokenizer", "LowRankLinear",
           "swap_in_low_rank", "check_out_dir", "staging_dir", "ADAPTER_CONFIG",
           "ADAPTER_WEIGHTS", "FORMAT_VERSION", "REPORT_FILE", "SECTION", "WRITERS",
           "DenseWriter", "FactorizedWriter", "PeftWriter", "Writer", "adapter_config",
           "INDEX_FILE", "SINGLE_FILE"]
