"""tools/stage_qwen.py without the network: parts joined in order straight out of their
wheels and checked by sha256 (a wrong part leaves no file), the target kept out of the
repository, and a GGUF converted to a float32 directory that loads as the same model."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
import torch

from .test_gguf import source  # noqa: F401
from .tools import load_tool

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fake(tmp_path, parts: list[bytes]):
    """Wheels holding ``parts`` laid out as the real ones, and the MODELS entry for them."""
    info = dict(package="fake-part{i}", version="1.0", parts=len(parts),
                member="fake_part{i}/data/part{i:02d}.bin", size=sum(map(len, parts)),
                sha256=hashlib.sha256(b"".join(parts)).hexdigest())
    wheels = []
    for i, data in enumerate(parts, 1):
        w = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(info["member"].format(i=i), data)
            z.writestr(f"fake_part{i}/__init__.py", "")
        wheels.append(w)
    return info, wheels


def test_join_concatenates_in_order_and_checks_the_sha256(tmp_path):
    tool = load_tool("stage_qwen")
    parts = [bytes([i]) * (1000 + i) for i in range(1, 12)]  # 11 parts: two-digit names
    info, wheels = _fake(tmp_path, parts)
    out = tmp_path / "m.gguf"
    tool.join(info, wheels, out)
    assert out.read_bytes() == b"".join(parts)
    swapped = tmp_path / "swapped.gguf"
    with pytest.raises(SystemExit, match="holds no fake_part1/data/part01.bin: a part is wrong"):
        tool.join(info, [wheels[1], wheels[0], *wheels[2:]], swapped)
    assert not swapped.exists() and not swapped.with_suffix(".part").exists()
    bad = dict(info, sha256="0" * 64)
    with pytest.raises(SystemExit, match="expected .* sha256 0000"):
        tool.join(bad, wheels, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.part").exists()


def test_target_inside_the_repository_is_refused():
    tool = load_tool("stage_qwen")
    with pytest.raises(SystemExit, match="inside the repository"):
        tool.main(["0.5b", "--target", str(load_tool.__globals__["TOOLS"] / "models")])


def test_convert_writes_a_float32_directory_of_the_same_model(source, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, ref = source
    tool = load_tool("stage_qwen")
    tool.convert(path, tmp_path / "staged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "staged").eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.arange(3, 30).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    tok = AutoTokenizer.from_pretrained(tmp_path / "staged")
    assert tok("def f(x):\n    return x")["input_ids"]
