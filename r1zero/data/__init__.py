"""The data-mixing stage (``r1zero data mix``): see docs/data.md.

Modules: ``gen_math``/``gen_code``/``gen_cross``/``gen_general`` (procedural generators),
``generators`` (registry + saturation-aware sampler), ``importers`` (GSM8K/MATH/generic JSONL),
``filters`` (rules + quality score), ``dedup`` (exact + MinHash-LSH), ``schema``, ``shards``
(Parquet/JSONL writers and ``iter_rows``/``read_rows``), ``tokenizer`` (byte-level BPE,
``load_tokenizer``), ``documents`` (``pretrain_text``), ``manifest``, ``mix`` (``run_mix``), ``cli``.
"""
