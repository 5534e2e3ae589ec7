"""Tiny random-weight models of the vision-language families autocaption runs in-process, built locally
(nothing can be downloaded here): each with its real config class, its real processor and image processor,
a character-level tokenizer carrying the family's special tokens, and a chat template in the style of the
real checkpoint. Saved with `save_pretrained`, they load through the product's real `from_pretrained` path.

`FAMILIES` maps each model_type to its builder; `build(name, directory)` makes one. LLaVA-NeXT itself is
built by tests/tinymodel.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.tinymodel import build_tiny, reinitialise

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
WORDS = [" the", " a", " photo", " of", " and", " with", " in"]


def char_tokenizer(
    special: list[str], *, eos: str, pad: str, bos: str | None = None, add_bos: bool = False,
    extra: dict[str, str] | None = None,
) -> tuple[Any, dict[str, int]]:  # fmt: skip
    """A character-level tokenizer (plus a few words) with `special` as special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = special + CHARS + WORDS
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=pad))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" [a-z]+|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(special)
    if add_bos and bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=pad,
        extra_special_tokens=extra or {},
    )  # fmt: skip
    return fast, vocab


def save(
    model: Any, processor: Any, directory: Path, vocab: dict[str, int], *, seed: int, ends: tuple[str, ...]
) -> Path:
    reinitialise(model, vocab, seed=seed, ends=ends)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# --- chat templates in the style of the real checkpoints ---------------------------------------------------

# ChatML as Qwen2.5-VL ships it: a default system prompt when none is given.
QWEN25_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL and Qwen2-VL without the default system turn.
QWEN3_TEMPLATE = QWEN25_TEMPLATE.replace(
    "{% if loop.first and messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}",
    "",
)
# LLaVA-OneVision (Qwen2 ChatML, the image first in the user turn).
ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}{% if message['role'] == 'user' %} {% else %}\n"
    "{% endif %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# JoyCaption (LLaVA on Llama 3.1): the template always writes the date system header.
JOYCAPTION_TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'][0]['text'] }}"
    "{% endif %}<|eot_id|>{% for message in messages %}{% if message['role'] != 'system' %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Gemma 3: the system text folded into the first user turn; the assistant is "model".
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'][0]['text'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set first = '' %}{% endif %}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if loop.first %}{{ first }}{% endif %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<start_of_image>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Idefics3 / SmolVLM: "User:" and "Assistant:" turns, the image inline.
IDEFICS_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}{% if message['content'][0]['type'] == "
    "'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# --- builders ----------------------------------------------------------------------------------------------


def _qwen(directory: Path, seed: int, model_type: str) -> Path:
    import transformers as t
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>"]  # fmt: skip
    extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
             "vision_end_token": "<|vision_end|>"}  # fmt: skip
    tokenizer, vocab = char_tokenizer(special, eos="<|im_end|>", pad="<|endoftext|>", extra=extra)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 36, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    text = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    ids = dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
               vision_start_token_id=vocab["<|vision_start|>"],
               vision_end_token_id=vocab["<|vision_end|>"])  # fmt: skip
    if model_type == "qwen3_vl":
        text["head_dim"] = 16
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True}  # fmt: skip
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])  # fmt: skip
        config: Any = t.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        model: Any = t.Qwen3VLForConditionalGeneration(config)
        processor_class, template, video = t.Qwen3VLProcessor, QWEN3_TEMPLATE, t.Qwen3VLVideoProcessor()
    else:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        if model_type == "qwen2_5_vl":
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                          window_size=56)  # fmt: skip
            config = t.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
            model = t.Qwen2_5_VLForConditionalGeneration(config)
            processor_class, template = t.Qwen2_5_VLProcessor, QWEN25_TEMPLATE
        else:
            vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
            config = t.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
            model = t.Qwen2VLForConditionalGeneration(config)
            processor_class, template = t.Qwen2VLProcessor, QWEN3_TEMPLATE
        video = t.Qwen2VLVideoProcessor()
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                                chat_template=template)  # fmt: skip
    return save(model, processor, directory, vocab, seed=seed, ends=("<|im_end|>",))


def _llava(directory: Path, seed: int) -> Path:
    """JoyCaption's shape: SigLIP vision (every patch a token, no CLS) and a Llama 3.1 language model."""
    import transformers as t
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
               "<image>", "<|finetune_right_pad_id|>"]  # fmt: skip
    tokenizer, vocab = char_tokenizer(special, bos="<|begin_of_text|>", eos="<|eot_id|>",
                                      pad="<|finetune_right_pad_id|>", extra={"image_token": "<image>"})  # fmt: skip
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    processor = t.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                 vision_feature_select_strategy="full", num_additional_image_tokens=0,
                                 chat_template=JOYCAPTION_TEMPLATE)  # fmt: skip
    config = t.LlavaConfig(
        vision_config=t.SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4),
        text_config=t.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                  bos_token_id=vocab["<|begin_of_text|>"], eos_token_id=vocab["<|eot_id|>"],
                                  pad_token_id=vocab["<|finetune_right_pad_id|>"]),
        image_token_index=vocab["<image>"], image_seq_length=16, vision_feature_select_strategy="full",
        vision_feature_layer=-2, projector_hidden_act="gelu",
    )  # fmt: skip
    return save(t.LlavaForConditionalGeneration(config), processor, directory, vocab, seed=seed, ends=("<|eot_id|>",))


def _onevision(directory: Path, seed: int) -> Path:
    import transformers as t
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer, vocab = char_tokenizer(special, eos="<|im_end|>", pad="<|endoftext|>",
                                      extra={"image_token": "<image>", "video_token": "<video>"})  # fmt: skip
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = t.LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=t.LlavaOnevisionVideoProcessor(),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=ONEVISION_TEMPLATE,
    )
    config = t.LlavaOnevisionConfig(
        vision_config=t.SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4),
        text_config=t.Qwen2Config(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                  eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"]),
        image_token_index=vocab["<image>"], video_token_index=vocab["<video>"], image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    model = t.LlavaOnevisionForConditionalGeneration(config)
    return save(model, processor, directory, vocab, seed=seed, ends=("<|im_end|>",))


def _gemma3(directory: Path, seed: int) -> Path:
    import transformers as t
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    special = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
               "<image_soft_token>"]  # fmt: skip
    extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer, vocab = char_tokenizer(special, bos="<bos>", eos="<eos>", pad="<pad>", extra=extra)
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = t.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                  chat_template=GEMMA3_TEMPLATE)  # fmt: skip
    config = t.Gemma3Config(
        text_config=t.Gemma3TextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       sliding_window=64, max_position_embeddings=4096,
                                       layer_types=["sliding_attention", "full_attention"],
                                       bos_token_id=vocab["<bos>"], pad_token_id=vocab["<pad>"],
                                       eos_token_id=[vocab["<eos>"], vocab["<end_of_turn>"]]),
        vision_config=t.SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4),
        mm_tokens_per_image=4, boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"],
    )  # fmt: skip
    model = t.Gemma3ForConditionalGeneration(config)
    return save(model, processor, directory, vocab, seed=seed, ends=("<eos>", "<end_of_turn>"))


def _idefics(directory: Path, seed: int, model_type: str) -> Path:
    import transformers as t

    rows = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    special = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
               "<global-img>", *rows]  # fmt: skip
    extra = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}  # fmt: skip
    tokenizer, vocab = char_tokenizer(special, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>",
                                      extra=extra)  # fmt: skip
    text = t.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=vocab["<|im_start|>"], eos_token_id=vocab["<end_of_utterance>"],
                         pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)  # fmt: skip
    image_sizes = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    if model_type == "smolvlm":
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        processor: Any = t.SmolVLMProcessor(
            image_processor=SmolVLMImageProcessorPil(**image_sizes), tokenizer=tokenizer,
            video_processor=t.SmolVLMVideoProcessor(), image_seq_len=4, chat_template=IDEFICS_TEMPLATE,
        )  # fmt: skip
        config: Any = t.SmolVLMConfig(vision_config=t.SmolVLMVisionConfig(**vision), text_config=text,
                                      image_token_id=vocab["<image>"], scale_factor=2)  # fmt: skip
        model: Any = t.SmolVLMForConditionalGeneration(config)
    else:
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        processor = t.Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**image_sizes), tokenizer=tokenizer,
                                        image_seq_len=4, chat_template=IDEFICS_TEMPLATE)  # fmt: skip
        config = t.Idefics3Config(vision_config=t.Idefics3VisionConfig(**vision), text_config=text,
                                  image_token_id=vocab["<image>"], scale_factor=2)  # fmt: skip
        model = t.Idefics3ForConditionalGeneration(config)
    return save(model, processor, directory, vocab, seed=seed, ends=("<end_of_utterance>",))


@dataclass(frozen=True)
class Family:
    name: str  # the model_type of its config
    example: str  # a real checkpoint of the family
    build: Callable[[Path, int], Path]
    needs: tuple[str, ...] = ()  # Python packages its processor needs beyond autocaption's own


FAMILIES = {
    family.name: family
    for family in (
        Family("llava_next", "llava-hf/llava-v1.6-mistral-7b-hf", lambda d, s: build_tiny(d, seed=s)),
        Family("llava", "fancyfeast/llama-joycaption-beta-one-hf-llava", _llava),
        Family("llava_onevision", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", _onevision, ("torchvision",)),
        Family("qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct", lambda d, s: _qwen(d, s, "qwen2_vl"), ("torchvision",)),
        Family("qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct", lambda d, s: _qwen(d, s, "qwen2_5_vl"), ("torchvision",)),
        Family("qwen3_vl", "Qwen/Qwen3-VL-2B-Instruct", lambda d, s: _qwen(d, s, "qwen3_vl"), ("torchvision",)),
        Family("gemma3", "google/gemma-3-4b-it", _gemma3),
        Family("idefics3", "HuggingFaceTB/SmolVLM-Instruct", lambda d, s: _idefics(d, s, "idefics3")),
        Family(
            "smolvlm",
            "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
            lambda d, s: _idefics(d, s, "smolvlm"),
            ("torchvision", "num2words"),
        ),
    )
}


def build(name: str, directory: Path, seed: int = 0) -> Path:
    return FAMILIES[name].build(directory, seed)
