"""Build small random-weight LLaVA-NeXT models locally (nothing can be downloaded in tests or CI).

`build_tiny` makes a model that loads and generates in milliseconds; `build_geometry` keeps the real
llava-v1.6 vision geometry (CLIP 336 px, patch 14, the five pinpoints: ~2,300 image tokens for a 4:3
photo) with a language model small enough for a CPU, for benchmarks. Both are saved with
`save_pretrained` and must be loaded through the product's real `from_pretrained` path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The chat template shipped with llava-hf/llava-v1.6-mistral-7b-hf: `[INST] <image>\n{text} [/INST]`,
# the tokenizer adding <s>. Using the real one keeps the engine honest about templates.
MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
LLAVA_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def _tokenizer(vocab_size: int | None = None):  # type: ignore[no-untyped-def]
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # Character-level vocabulary: every printable ASCII character plus a few words, so random
    # weights still decode to visible text and EOS can be reached.
    words = [" the", " a", " photo", " of", " and", " with", " in"]
    tokens = SPECIAL + [chr(c) for c in range(32, 127)] + ["\n"] + words
    if vocab_size:  # pad to a real model's vocabulary size, so its embedding and LM head have true shapes
        tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" [a-z]+|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    return fast, vocab


def _save(directory: Path, *, crop: int, patch: int, pinpoints: list[list[int]], vision: dict, text: dict,
          seed: int, vocab_size: int | None = None, dtype: str = "float32", device: str = "cpu",
          peaky: bool = True, llava: dict | None = None) -> Path:  # fmt: skip
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )

    try:  # the PIL image processor's name since transformers 5.11 (no torchvision needed)
        from transformers.models.llava_next.image_processing_pil_llava_next import (
            LlavaNextImageProcessorPil as ImageProcessor,
        )
    except ImportError:
        from transformers import LlavaNextImageProcessor as ImageProcessor  # type: ignore[assignment,no-redef]

    tokenizer, vocab = _tokenizer(vocab_size)
    image_processor = ImageProcessor(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=MISTRAL_TEMPLATE,
    )
    from transformers import MistralConfig

    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=crop, patch_size=patch, **vision),
        text_config=MistralConfig(
            vocab_size=len(vocab),
            pad_token_id=vocab["<pad>"],
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
            max_position_embeddings=8192,
            **text,
        ),
        image_token_index=vocab["<image>"],
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        **(llava or {"vision_feature_layer": -1}),
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # a 7B model is built directly in bf16 (15 GB, not 30)
    try:
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    if peaky:
        reinitialise(model, vocab, seed=seed, ends=("</s>",))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def reinitialise(model: Any, vocab: dict[str, int], *, seed: int, ends: tuple[str, ...]) -> None:
    """Larger weights: confident, well-separated greedy choices (no near-ties). Every random parameter is
    drawn from one seeded generator in name order, so the model (and its answers) is the same whatever the
    transformers release, whose own initialisation differs between versions. Like a trained model it never
    writes template or image tokens (a zero row of the output layer gives logit 0, which loses to the largest
    of ~100 random ones), and its end tokens (`ends`) are quieter than the rest, so an answer is rarely over
    before its first word (tests check every photo gets an answer)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    special = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1]) if _is_special(token)]
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.dim() > 1 or parameter.unique().numel() > 1:  # not a constant norm weight or bias
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.08)
        head = model.get_output_embeddings().weight
        for token in special:
            if token in ends:
                head[vocab[token]] *= 0.5
            else:
                head[vocab[token]] = 0.0


def _is_special(token: str) -> bool:
    return (len(token) > 1 and token.startswith("<") and token.endswith(">")) or token in ("[INST]", "[/INST]")


def build_tiny(directory: Path, seed: int = 0, sliding_window: int = 4096) -> Path:
    """`sliding_window`: Mistral's attention span (4096 in the real model; shorter to test the masks)."""
    return _save(
        directory, crop=32, patch=8, pinpoints=TINY_PINPOINTS, seed=seed,
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=32),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, sliding_window=sliding_window),
    )  # fmt: skip


def build_geometry(directory: Path, seed: int = 0) -> Path:
    """Real llava-v1.6 vision geometry with a small CLIP and a small language model."""
    return _save(
        directory, crop=336, patch=14, pinpoints=LLAVA_PINPOINTS, seed=seed,
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=64),
        text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
    )  # fmt: skip


def build_mistral_7b(
    directory: Path, *, device: str = "cuda", text_layers: int = 32, vision_layers: int = 24, seed: int = 0
) -> Path:
    """The true llava-v1.6-mistral-7b shapes with random weights in bf16 (nothing to download):
    CLIP ViT-L/14-336 and Mistral-7B (hidden 4096, 32 layers, 32 heads, 8 KV heads, vocabulary 32064).
    Fewer layers give the same per-layer shapes for a CPU smoke test."""
    return _save(
        directory, crop=336, patch=14, pinpoints=LLAVA_PINPOINTS, seed=seed, vocab_size=32064,
        dtype="bfloat16", device=device, peaky=False,
        llava={"vision_feature_layer": -2, "projector_hidden_act": "gelu"},
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                    num_attention_heads=16, projection_dim=768),
        text=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=text_layers, num_attention_heads=32,
                  num_key_value_heads=8),
    )  # fmt: skip
