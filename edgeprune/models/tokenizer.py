"""An offline synthetic tokenizer: byte-level BPE trained in-process, padded to any vocabulary size.

No tokenizer can be downloaded here, so the tiny presets and ``--random-weights`` builds use a byte-level BPE
trained on a few embedded sentences with the ``tokenizers`` library, wrapped in ``PreTrainedTokenizerFast``
so that it saves and loads through the normal ``save_pretrained``/``from_pretrained`` path. The vocabulary is
padded with reserved entries up to the model's ``vocab_size`` so that every id the model can emit decodes,
and ``<image>``/``<pad>`` sit exactly at the ids the model config names (32000/32001 for LLaVA-1.5).
Training is deterministic: the same arguments give the same tokenizer.
"""

from __future__ import annotations

import json
from typing import Any

from .._deps import require

# Llama conventions: <unk>=0, <s>=1, </s>=2.
UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"

_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What does the sign say? ASSISTANT: The sign says stop.",
    "Describe the image in detail. There is a red car parked on a busy city street next to a tree.",
    "How many people are in the picture? Two people are walking a dog in the park.",
    "What color is the sky? The sky is blue with a few white clouds above the mountains.",
    "Is there a cat on the table? No, there is a cup of coffee and a laptop on the wooden table.",
    "[INST] What is written on the board? [/INST] The board shows the numbers 1 2 3 4 5 6 7 8 9 0.",
    "Read the text, count the objects, find the robot, and answer the question with one word or phrase.",
]


def _pseudo_words(taken: set[str]):
    """Deterministic filler entries: space-prefixed consonant-vowel words (" ka", " molu", ...).

    Random-weight models emit filler ids often; pseudo-words make their (meaningless) answers readable text
    rather than tag soup. ``Ġ`` is the byte-level BPE symbol of a leading space.
    """
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    n = 1
    while True:
        for i in range(len(syllables) ** n):
            parts = []
            for _ in range(n):
                i, r = divmod(i, len(syllables))
                parts.append(syllables[r])
            word = "\u0120" + "".join(parts)
            if word not in taken:
                yield word
        n += 1


def build_tokenizer(vocab_size: int, image_token_id: int, pad_token_id: int | None = None,
                    bpe_size: int = 700, chat_template: str | None = None) -> Any:
    """Build a ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` ids.

    Args:
        vocab_size: total number of ids (the LLM's ``vocab_size``).
        image_token_id: id of ``<image>`` (must be < vocab_size).
        pad_token_id: id of ``<pad>``; None puts it right after ``<image>`` when free, else reuses ``<unk>``.
        bpe_size: size of the trained BPE part (ids 0..bpe_size-1), capped below the special ids.
        chat_template: optional Jinja chat template stored with the tokenizer.
    Returns:
        A ``transformers.PreTrainedTokenizerFast`` that adds ``<s>`` in front of every encoded text.
    Raises:
        ValueError: ids that do not fit into ``vocab_size``.
    """
    tokenizers = require("tokenizers")
    transformers = require("transformers")
    if pad_token_id is None:
        pad_token_id = image_token_id + 1 if image_token_id + 1 < vocab_size else 0
    if not (0 <= image_token_id < vocab_size and 0 <= pad_token_id < vocab_size):
        raise ValueError(f"image/pad ids {image_token_id}/{pad_token_id} must be < vocab_size {vocab_size}")
    bpe_size = max(300, min(bpe_size, min(image_token_id, vocab_size) - 1))

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=UNK))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=bpe_size, special_tokens=[UNK, BOS, EOS], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)

    # Pad the vocabulary with reserved entries so that every id decodes; put <image>/<pad> at their ids.
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    fixed = {image_token_id: IMAGE, pad_token_id: PAD if pad_token_id != 0 else UNK}
    words = _pseudo_words(set(vocab))
    for i in range(len(vocab), vocab_size):
        vocab[fixed.get(i) or next(words)] = i
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = []
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        pad_token=PAD if pad_token_id != 0 else UNK, extra_special_tokens={"image_token": IMAGE},
        chat_template=chat_template, model_max_length=4096 * 4,
    )
