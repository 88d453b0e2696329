"""Tiny random checkpoints of each family, in the Hugging Face layout, for tests and for
trying `elasticplan shard --checkpoint` without downloading a model:

    python -m runtime.sources.tinyckpt DIR --family bert|distilbert|roberta|llama [--seed N]
                               [--pooling mean|cls|none] [--task-csv FILE]

writes DIR/config.json (the family's own keys), DIR/model.safetensors (every tensor the
family's base model has, numpy random numbers, written with safetensors),
DIR/tokenizer.json (made with `tokenizers`: a WordPiece vocabulary for BERT and
DistilBERT, a character-level BPE with a few merges for RoBERTa, each with its family's
special tokens), and, unless --pooling none, the sentence-transformers modules.json and
1_Pooling/config.json (mean pooling adds a Normalize module; CLS does not).
--task-csv writes a small labelled CSV (columns text, label; three classes) to go with it.
Nothing here is trained: the numbers are random, the shapes and names are real.
--family llama writes a tiny decoder instead (runtime/sources/tiny_llama.py: config.json,
model.safetensors, a byte-level BPE tokenizer.json and tokenizer_config.json with a chat
template; no sentence-transformers modules, --pooling is ignored).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

FAMILIES = ("bert", "distilbert", "roberta")
DECODER_FAMILIES = ("llama",)  # runtime/sources/tiny_llama.py
SHAPE = {"layers": 3, "hidden": 32, "heads": 4, "ffn": 64, "vocab": 128, "positions": 40}
WORDS = ("the", "and", "good", "bad", "slow", "fast", "car", "road", "city", "rain", "sun",
         "love", "hate", "ok", "very", "not")
CLASSES = {"happy": ("good", "love", "sun", "fast"), "sad": ("bad", "hate", "rain", "slow"),
           "meh": ("ok", "car", "road", "city")}


def tiny_config(family: str) -> dict:
    """config.json of a tiny checkpoint of the family, in its own keys."""
    d = SHAPE
    if family == "distilbert":
        return {"model_type": "distilbert", "architectures": ["DistilBertModel"],
                "n_layers": d["layers"], "dim": d["hidden"], "n_heads": d["heads"],
                "hidden_dim": d["ffn"], "vocab_size": d["vocab"],
                "max_position_embeddings": d["positions"], "activation": "gelu",
                "dropout": 0.0, "attention_dropout": 0.0, "sinusoidal_pos_embds": False,
                "pad_token_id": 0}
    return {"model_type": family,
            "architectures": [f"{'Bert' if family == 'bert' else 'Roberta'}Model"],
            "num_hidden_layers": d["layers"], "hidden_size": d["hidden"],
            "num_attention_heads": d["heads"], "intermediate_size": d["ffn"],
            "vocab_size": d["vocab"], "max_position_embeddings": d["positions"],
            "type_vocab_size": 2 if family == "bert" else 1,
            "layer_norm_eps": 1e-12 if family == "bert" else 1e-5,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "pad_token_id": 0 if family == "bert" else 1}


def tiny_tensors(family: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor the family's base model has, in its names and shapes (BERT and
    RoBERTa: encoder.layer.N..., DistilBERT: transformer.layer.N...), random."""
    rng = np.random.default_rng(seed)
    d, f, V = SHAPE["hidden"], SHAPE["ffn"], SHAPE["vocab"]

    def w(*shape, scale=0.2):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    def ln(prefix):
        return {f"{prefix}.weight": 1 + w(d, scale=0.1), f"{prefix}.bias": w(d, scale=0.1)}

    def linear(name, out, inp):
        return {f"{name}.weight": w(out, inp), f"{name}.bias": w(out)}

    t = {"embeddings.word_embeddings.weight": w(V, d),
         "embeddings.position_embeddings.weight": w(SHAPE["positions"], d),
         **ln("embeddings.LayerNorm")}
    if family != "distilbert":
        t["embeddings.token_type_embeddings.weight"] = \
            w(tiny_config(family)["type_vocab_size"], d)
    for l in range(SHAPE["layers"]):
        if family == "distilbert":
            p = f"transformer.layer.{l}."
            for name in ("q_lin", "k_lin", "v_lin", "out_lin"):
                t.update(linear(f"{p}attention.{name}", d, d))
            t.update({**ln(f"{p}sa_layer_norm"), **linear(f"{p}ffn.lin1", f, d),
                      **linear(f"{p}ffn.lin2", d, f), **ln(f"{p}output_layer_norm")})
            continue
        p = f"encoder.layer.{l}."
        for name in ("query", "key", "value"):
            t.update(linear(f"{p}attention.self.{name}", d, d))
        t.update({**linear(f"{p}attention.output.dense", d, d),
                  **ln(f"{p}attention.output.LayerNorm"),
                  **linear(f"{p}intermediate.dense", f, d), **linear(f"{p}output.dense", d, f),
                  **ln(f"{p}output.LayerNorm")})
    if family != "distilbert":
        t.update(linear("pooler.dense", d, d))
    return t


def tiny_tokenizer(family: str):
    """A `tokenizers` tokenizer that fits the tiny vocabulary (SHAPE['vocab'] ids)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE, WordPiece

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    if family == "roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        merges = [("t", "h"), ("th", "e"), ("a", "n"), ("an", "d"), ("o", "o"), ("i", "n")]
        vocab = specials + letters + list("0123456789.,!?'") + ["".join(m) for m in merges]
        tok = Tokenizer(BPE({v: i for i, v in enumerate(vocab)}, merges, unk_token="<unk>"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    else:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab = specials + letters + [f"##{c}" for c in letters] + list("0123456789.,!?'") + \
            list(WORDS)
        tok = Tokenizer(WordPiece({v: i for i, v in enumerate(vocab)}, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    assert len(vocab) <= SHAPE["vocab"], len(vocab)
    return tok


def write_task_csv(path: Path, rows: int = 90, seed: int = 0) -> None:
    """A labelled CSV of `rows` short texts in three classes (columns text, label)."""
    rng = np.random.default_rng(seed)
    names = sorted(CLASSES)
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["text", "label"])
        for i in range(rows):
            label = names[i % len(names)]
            words = [str(rng.choice(CLASSES[label])) for _ in range(3)] + \
                [str(rng.choice(WORDS)) for _ in range(int(rng.integers(2, 8)))]
            rng.shuffle(words)
            out.writerow([" ".join(words), label])


def write_checkpoint(path: str | Path, family: str, *, seed: int = 0,
                     pooling: str | None = "mean") -> Path:
    """The tiny checkpoint of `family` in directory `path` (created); pooling None writes
    no modules.json."""
    from safetensors.numpy import save_file

    if family == "llama":
        from runtime.sources.tiny_llama import write_tiny_llama

        return write_tiny_llama(path, seed)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES + DECODER_FAMILIES)}, "
                         f"got {family!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tiny_tensors(family, seed), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(tiny_config(family), indent=1))
    tiny_tokenizer(family).save(str(path / "tokenizer.json"))
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "",
                    "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling"}]
        if pooling == "mean":
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        (path / "modules.json").write_text(json.dumps(modules, indent=1))
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": SHAPE["hidden"],
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False},
            indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.sources.tinyckpt", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--family", choices=FAMILIES + DECODER_FAMILIES, default="bert")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pooling", choices=("mean", "cls", "none"), default="mean")
    p.add_argument("--task-csv", metavar="FILE", help="also write a labelled CSV here")
    a = p.parse_args(argv)
    path = write_checkpoint(a.dir, a.family, seed=a.seed,
                            pooling=None if a.pooling == "none" else a.pooling)
    print(f"wrote a tiny {a.family} checkpoint to {path}", file=sys.stderr)
    if a.task_csv:
        write_task_csv(Path(a.task_csv), seed=a.seed)
        print(f"wrote a labelled CSV to {a.task_csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
