"""load_causal_lm: r1zero and foreign (Llama) model dirs with tokenizers; bad input -> UserError.
Standard-architecture export/mapping and stock-saved MoE checkpoints: test_hf_export.py."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from r1zero.errors import UserError
from r1zero.model import R1ZeroConfig, R1ZeroForCausalLM, load_causal_lm


def save_tokenizer(path):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<|pad|>", "<|endoftext|>", "<unk>"])
    tok.train_from_iterator(["1 + 2 = 3", "think answer wait", "hello world"] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(path)
    return fast


def test_loads_r1zero_model_dir(tmp_path):
    torch.manual_seed(0)
    m = R1ZeroForCausalLM(R1ZeroConfig(vocab_size=80, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       n_experts=2, num_experts_per_tok=1, n_shared=1, d_expert=8))
    m.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    model, tok = load_causal_lm(str(tmp_path))
    assert isinstance(model, R1ZeroForCausalLM) and not model.training
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    ids = torch.tensor([tok("1 + 2")["input_ids"]])
    assert torch.allclose(model(ids).logits, m.eval()(ids).logits, atol=1e-6)


def test_loads_a_foreign_llama_dir(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=80, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    stock = LlamaForCausalLM(cfg).eval()
    stock.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    model, tok = load_causal_lm(tmp_path)
    # a plain Llama is exactly r1zero's all-dense layout: mapped into R1ZeroForCausalLM
    assert isinstance(model, R1ZeroForCausalLM) and model.config.n_dense_layers == 1
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.allclose(model(ids).logits, stock(ids).logits, atol=1e-6)
    out = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)


def test_bad_inputs_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="artifact not found"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(UserError, match="no config.json"):
        load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "no_such_arch"}')
    with pytest.raises(UserError, match="cannot load causal LM"):
        load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_causal_lm(tmp_path)


def test_missing_tokenizer_is_reported(tmp_path):
    R1ZeroForCausalLM(R1ZeroConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   n_experts=2, num_experts_per_tok=2, d_expert=4)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="no tokenizer"):
        load_causal_lm(tmp_path)
    model, tok = load_causal_lm(tmp_path, require_tokenizer=False)
    assert tok is None and isinstance(model, R1ZeroForCausalLM)
