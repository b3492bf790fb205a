"""A pretrained base (``model.base``): check it, take its tokenizer, read its shape.

    from r1zero.data.base import check_base, load_base_tokenizer
    info = check_base("s3://bucket/bases/qwen2.5-0.5b")   # {"model_type", "architectures", "config"}
    tok = load_base_tokenizer("s3://bucket/bases/qwen2.5-0.5b", chat_template=True)

A base is a directory (or store prefix) written by transformers' ``save_pretrained``: a
``config.json`` whose ``model_type`` transformers maps to a causal-LM class (dense or MoE: Llama,
Qwen2, Mixtral, Qwen2-MoE, ...; r1zero's own ``r1zero_moe`` too), weights, and tokenizer files.
Every check raises :class:`UserError` with one line naming the base and the problem, before any
stage writes anything:

- no ``config.json`` / not JSON / an architecture transformers cannot build as a causal LM
  (the engines -- :mod:`r1zero.generate`, the GRPO update, the pretraining engines -- run any
  ``AutoModelForCausalLM``, nothing else);
- no tokenizer files, or a tokenizer without an EOS or a pad token (rollouts stop at EOS and
  batches are padded with pad; ``pad == eos`` is accepted, as most bases ship);
- ``chat_template=True`` but the tokenizer has no chat template.

The data stage saves this tokenizer into the data artifact instead of training a BPE, so every
later stage tokenizes exactly as the base was trained (no vocabulary mismatch).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from r1zero import store
from r1zero.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def base_path(uri: str) -> Path:
    """The base materialised on this machine (a local dir is used in place).

    An ``s3://`` prefix written by :func:`r1zero.store.publish` (with its ``_SUCCESS`` manifest) is
    materialised with its checksums; one uploaded by other tools (``aws s3 sync``, a model hub
    mirror) is downloaded object by object, and reused while its listing (keys, sizes, ETags) is
    unchanged.
    """
    if not store.is_s3(uri):
        p = store.local_path(uri)
        if not p.is_dir():
            raise UserError(f"model.base {uri}: no such directory")
        return p
    bucket, prefix = store.split_s3(uri.rstrip("/"))
    client = store.s3_client()
    listing = store._with_retries(lambda: _list_prefix(client, bucket, prefix), f"list {uri}")
    if not listing:
        raise UserError(f"model.base {uri}: no objects under this prefix")
    if store.SUCCESS_MARKER in {rel for rel, _ in listing}:
        return Path(store.materialize(uri))
    dest = store.cache_dir() / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    stamp = json.dumps(listing, sort_keys=True)
    if (dest / ".r1zero-listing.json").is_file() and (dest / ".r1zero-listing.json").read_text() == stamp:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".dl."))
    for rel, _ in listing:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        key = f"{prefix}/{rel}" if prefix else rel
        store._with_retries(lambda k=key, t=target: client.download_file(bucket, k, str(t)), f"download s3://{bucket}/{key}")
    (tmp / ".r1zero-listing.json").write_text(stamp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def _list_prefix(client, bucket: str, prefix: str) -> list[tuple[str, str]]:
    """``[(relative key, "size/etag")]`` of every object under ``prefix/`` (sorted)."""
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1:] if prefix else obj["Key"]
            if rel and not rel.endswith("/"):
                out.append((rel, f"{obj['Size']}/{obj.get('ETag', '')}"))
    return sorted(out)


def read_config(uri: str) -> dict:
    """The base's ``config.json`` as a dict (on S3 only that object is read: sizing and rendering
    need the shape, not the weights)."""
    if store.is_s3(uri):
        cfg_uri = store.join(uri.rstrip("/"), "config.json")
        if not store.exists(cfg_uri):
            raise UserError(f"model.base {uri}: no config.json (not a transformers checkpoint)")
        text = store.read_bytes(cfg_uri).decode("utf-8", "replace")
    else:
        f = base_path(uri) / "config.json"
        if not f.is_file():
            raise UserError(f"model.base {uri}: no config.json (not a transformers checkpoint)")
        text = f.read_text(encoding="utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise UserError(f"model.base {uri}: config.json is not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise UserError(f"model.base {uri}: config.json is not a JSON object")
    return doc


def check_architecture(uri: str, doc: dict) -> None:
    """Raise unless transformers can build ``doc``'s ``model_type`` as a causal LM."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import r1zero.model  # noqa: F401 - registers r1zero_moe with the Auto classes

    mt = doc.get("model_type")
    if not isinstance(mt, str) or mt not in CONFIG_MAPPING:
        raise UserError(f"model.base {uri}: architecture (model_type {mt!r}) is unknown to transformers; "
                        "the engines run transformers causal LMs only")
    if CONFIG_MAPPING[mt] not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"model.base {uri}: model_type {mt!r} is not a causal LM (no AutoModelForCausalLM "
                        "class); the engines cannot run it")


def load_base_tokenizer(uri: str, chat_template: bool = False):
    """The base's tokenizer (``AutoTokenizer``), checked for EOS, pad and (optionally) a chat template."""
    from transformers import AutoTokenizer

    path = base_path(uri)
    if not any((path / n).is_file() for n in TOKENIZER_FILES):
        raise UserError(f"model.base {uri}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) beside the model")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model.base {uri}: cannot load its tokenizer: {first}") from None
    if tok.eos_token_id is None:
        raise UserError(f"model.base {uri}: the tokenizer has no EOS token (set eos_token in tokenizer_config.json)")
    if tok.pad_token_id is None:
        raise UserError(f"model.base {uri}: the tokenizer has no pad token (set pad_token in "
                        "tokenizer_config.json; the EOS token is a common choice)")
    if chat_template and not getattr(tok, "chat_template", None):
        raise UserError(f"model.base {uri}: data.chat_template is true but the tokenizer has no chat template")
    return tok


def check_base(uri: str, chat_template: bool = False) -> dict:
    """Every check above; returns ``{"model_type", "architectures", "config", "tokenizer"}``."""
    doc = read_config(uri)
    check_architecture(uri, doc)
    tok = load_base_tokenizer(uri, chat_template)
    vocab = doc.get("vocab_size")
    if isinstance(vocab, int) and len(tok) > vocab:
        raise UserError(f"model.base {uri}: tokenizer has {len(tok)} tokens but config.json vocab_size is {vocab}")
    return {"model_type": doc["model_type"], "architectures": doc.get("architectures") or [], "config": doc,
            "tokenizer": tok}


def save_base_tokenizer(uri: str, out_dir: str | Path, chat_template: bool = False) -> dict:
    """Save the base's tokenizer into ``out_dir`` (the data artifact); return the manifest's entry."""
    info = check_base(uri, chat_template)
    tok = info["tokenizer"]
    tok.save_pretrained(str(out_dir))
    return {"file": "tokenizer.json" if (Path(out_dir) / "tokenizer.json").is_file() else "tokenizer_config.json",
            "source": "base", "base_model_type": info["model_type"], "vocab_size": len(tok),
            "eos_token": tok.eos_token, "pad_token": tok.pad_token, "chat_template": bool(chat_template),
            "special_tokens": list(tok.all_special_tokens)}
