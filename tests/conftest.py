"""Fixtures: a tiny random Llama with a real (small, trained here) BPE tokenizer and a ChatML
template, saved to a temp folder and loaded through delia's own `from_pretrained` path."""

from __future__ import annotations

import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Question: What is 12 + 30? Answer: 42. Check whether the answer contains a hallucination.",
    "The capital of France is Paris. thought hallucination yes no json object keys",
    '{"thought": "The question asks for 2 + 2.", "hallucination": "no"}',
    "Give three tips for staying healthy. Eat well, sleep, and exercise every day.",
] * 20


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory):
    """A tiny random Gemma 3 (sliding and full attention layers, tied embeddings, Gemma's embedding
    scaling) with Gemma's special tokens and delia's built-in `gemma` turn format, saved as a model folder:
    the second family's code paths at test size."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig, PreTrainedTokenizerFast

    from delia.config import CHAT_TEMPLATES

    folder = tmp_path_factory.mktemp("tiny-gemma3")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tokenizer.chat_template = CHAT_TEMPLATES["gemma"]
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                              tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Gemma3ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=2, pad_token_id=0,
                                               eos_token_id=[1, tokenizer.convert_tokens_to_ids("<end_of_turn>")])
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny(tiny_model_dir):
    """(model, tokenizer) freshly loaded through delia.model.loading.load_model."""
    from delia.model.loading import load_model

    return load_model(tiny_model_dir)


def varied_model(folder, scale: float = 1.0):
    """(model, tokenizer) of the tiny model with larger random weights, so that its greedy answers vary
    from token to token instead of repeating one; `scale` multiplies one block's MLP output (another arm)."""
    import torch

    from delia.model.loading import load_model

    lm = load_model(folder, "float32")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lm[0].parameters():
            p.add_(torch.randn_like(p) * 0.6)
        lm[0].model.layers[1].mlp.down_proj.weight.mul_(scale)
    return lm


def dies_after(batches, n: int):
    """A generator's `batches` method that raises KeyboardInterrupt (a kill) after yielding `n` batches."""

    def cut(self, *a, **kw):
        for i, batch in enumerate(batches(self, *a, **kw)):
            if i == n:
                raise KeyboardInterrupt
            yield batch

    return cut
