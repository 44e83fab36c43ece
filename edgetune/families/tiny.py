"""Offline building blocks for tiny random-weight models: a real byte-level BPE tokenizer and the
shared sizes of the tiny vision towers and LLMs.

Model hubs are out of reach in tests and in ``edgetune quickstart``, so each family's
``build_tiny`` trains a small tokenizer here and wraps it in the family's own tokenizer class.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# The tiny ViT of the CLIP/SigLIP-style vision towers (with each family's image and patch size).
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

# The tiny LLM every family's build_tiny uses (with its own architecture's extras): about 0.2M
# parameters, enough to learn the built-in task in a few hundred steps on CPU.
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    # A trained LM head has rows large enough for confident logits; with the default 0.02 a
    # frozen random head caps logits near +-1 and no adapter can fit the data.
    initializer_range=0.3,
)

# Words the built-in task and chat templates use, so that answers are single tokens.
CORPUS = [
    " USER: ASSISTANT: What color is the shape? What shape is this? Answer with one word.",
    " red green blue yellow purple orange white black circle square triangle",
    " The image shows a shape on a plain background. Describe the picture.",
    " a an the is are of in on to and with this that what which how many there",
    " user assistant system model image picture photo question answer",
]


def train_byte_level_bpe(special_tokens: list[str], vocab_size: int = 512, corpus: list[str] = CORPUS) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus * 20, trainer=trainer)
    return tokenizer
