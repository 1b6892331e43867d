"""Write ``tests/data/v4_tiny_hf_logits.npz``: Hugging Face DeepseekV4ForCausalLM logits (f32, eager) for
the three oracle configs of ``tests/models/v4_oracle.py``, with the weights (official names) and tokens.

Run from the repository root (needs torch and transformers; CI does not, it only reads the file)::

    JAX_PLATFORMS=cpu PYTHONPATH=$PWD:$PWD/tests/models python tests/data/make_v4_hf_fixture.py

Layout: ``meta`` (JSON: torch / transformers / numpy versions, seeds, shapes); per config ``c``:
``c/config`` (JSON of our DeepseekV4Config fields), ``c/tokens`` int32 [B, S], ``c/logits`` f32
[B, S, vocab], and per weight ``c/w/<official name>/q`` (int8 codes, int32 for tid2eid),
``.../step`` and ``.../offset`` (f32 scalars): the weight is ``q * step + offset`` in f32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "models"))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

OUT = os.path.join(HERE, "v4_tiny_hf_logits.npz")
WEIGHT_SEED = 0
TOKEN_SEED = 1
BATCH, SEQ = 2, 140  # > 128: the HCA layers produce a compressed entry


def main() -> None:
    import torch
    import transformers
    import v4_oracle as o

    arrays: dict[str, np.ndarray] = {}
    for name, cfg in o.oracle_configs().items():
        coded = o.random_coded_state_dict(cfg, WEIGHT_SEED)
        sd = o.decode_state_dict(coded)
        tokens = np.random.default_rng(TOKEN_SEED).integers(0, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
        with tempfile.TemporaryDirectory() as d:
            model = o.hf_model(cfg, sd, d)
            with torch.no_grad():
                logits = model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
        arrays[f"{name}/config"] = np.array(json.dumps(dataclasses.asdict(cfg)))
        arrays[f"{name}/tokens"] = tokens
        arrays[f"{name}/logits"] = logits.astype(np.float32)
        for k, (q, step, offset) in coded.items():
            arrays[f"{name}/w/{k}/q"] = q
            arrays[f"{name}/w/{k}/step"] = np.float32(step)
            arrays[f"{name}/w/{k}/offset"] = np.float32(offset)
        print(f"{name}: {len(coded)} tensors, logits {logits.shape}, std {logits.std():.3f}")
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "weight_seed": WEIGHT_SEED,
        "token_seed": TOKEN_SEED,
        "batch": BATCH,
        "seq": SEQ,
        "hf": "DeepseekV4ForCausalLM.from_pretrained(official-named safetensors), float32, eager attention",
    }
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT}: {os.path.getsize(OUT) / 1e6:.2f} MB; {meta}")


if __name__ == "__main__":
    main()
