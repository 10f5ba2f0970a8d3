"""UGE: spatially grounded VLM embeddings (UrbanGraphEmbeddings, arXiv 2602.08342), model part.

A Qwen2-VL / Qwen2.5-VL backbone loaded from a local folder, LoRA adapters through ``peft``, an
instruction prefix per task and last-token (or mean) pooling of the language model's last
hidden state into a fixed-dimension, L2-normalised embedding. Stage 1 trains the adapters (and
the optional projection) with the symmetric in-batch InfoNCE of :func:`info_nce`; stage 2 (graph
encoder and fusion) lives in :mod:`core.models.graph_encoder`.

Prompt layout (GME style): the task instruction is the system message, the user turn holds the
image and/or the text, then the generation prompt and an end token (``<|endoftext|>``) whose
hidden state is the embedding. The processor's chat template builds it, so a real checkpoint's
own template is used; the processor expands ``<|image_pad|>`` to one token per merged patch.

:func:`make_tiny_qwen2vl` builds and saves a randomly initialised Qwen2-VL of about 0.2 M
parameters with a byte-level tokenizer, for CPU tests and the demo city; it reloads offline
with :func:`load_vlm` like any real checkpoint folder.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from core.models.device import resolve_device

#: Model types the embedder is written for (M-RoPE, ``mm_token_type_ids``, ``image_grid_thw``).
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

#: Qwen2-VL's special tokens, in the order of the ids the tiny tokenizer gives them (256...).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Qwen2-VL-Instruct's chat template (the tiny model ships it so the same prompt code serves both).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Task -> instruction (the system message). Images and texts of one pair may use different tasks.
DEFAULT_INSTRUCTIONS: dict[str, str] = {
    "geolocation": "Represent this street view for geolocation.",
    "location": "Represent this description of a place for matching street views.",
    "image": "Represent this street view image for retrieval.",
    "retrieval": "Represent this caption for image retrieval.",
    "perception": "Represent this street view for urban perception.",
    "grounding": "Represent this place and its spatial context for spatial grounding.",
    "caption": "Represent this spatial caption.",
    "node": "Represent this street node and where it lies.",
}

#: The tasks a UGE run embeds with (keys of :data:`DEFAULT_INSTRUCTIONS`): images, captions and
#: answers, images with a spatial question, street-node texts. Embeddings compare within these
#: pairings, so a text query against a run's cell embeddings uses :data:`TEXT_TASK`.
IMAGE_TASK, TEXT_TASK, QUESTION_TASK, NODE_TASK = "location", "caption", "grounding", "node"

Pooling = Literal["last", "mean"]
PaddingSide = Literal["left", "right"]


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on a GPU that supports it, else fp32 (CPU bf16 matmuls are slow here).

    Args:
        dtype: ``auto``, a torch dtype, or its name (``bfloat16``, ``bf16``, ``float32``, ...).
        device: where the model will run.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16"}
    resolved = getattr(torch, names.get(dtype, dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


# ---------------------------------------------------------------------------------------------
# The tiny configuration
# ---------------------------------------------------------------------------------------------


def build_tiny_tokenizer() -> Any:
    """A byte-level ``Qwen2Tokenizer``: 256 byte symbols, no merges, Qwen2-VL's special tokens.

    Every UTF-8 byte is one token, so any text encodes without an unknown token; ids 0..255 are
    the bytes and 256..262 the special tokens, in :data:`SPECIAL_TOKENS` order.
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # byte-level BPE spells bytes with GPT-2's printable stand-ins, not the raw characters
    symbols = bytes_to_unicode()
    vocab = {symbols[b]: b for b in range(256)}
    vocab.update({token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    # special so the pre-tokenizer never splits them into bytes
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def build_tiny_qwen2vl(
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vision_depth: int = 1,
    vision_dim: int = 32,
    vision_heads: int = 2,
    max_image_pixels: int = 112 * 112,
    seed: int = 0,
) -> tuple[nn.Module, Any]:
    """A randomly initialised tiny Qwen2-VL and its processor, in memory.

    Args:
        hidden: text hidden size; also the vision tower's output width (the merger projects
            into the text embedding space, so they must match).
        layers: decoder layers.
        heads: attention heads; ``hidden / heads`` must be divisible by 4 (M-RoPE sections).
        kv_heads: key/value heads (grouped-query attention as in the real models).
        vision_depth: vision transformer blocks.
        vision_dim: vision embedding width; ``vision_dim / vision_heads`` divisible by 4
            (axial 2D RoPE over height and width).
        vision_heads: vision attention heads.
        max_image_pixels: processor pixel budget per image (56 x 56 = 4 image tokens is the
            minimum; 112 x 112 gives at most 16).
        seed: weight initialisation seed (the global RNG is left untouched).

    Returns:
        ``(Qwen2VLForConditionalGeneration in eval mode, Qwen2VLProcessor)``.
    """
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    head_dim = hidden // heads
    if hidden % heads or head_dim % 4:
        raise ValueError(f"hidden/heads = {hidden}/{heads} must be an integer divisible by 4")
    if vision_dim % vision_heads or (vision_dim // vision_heads) % 4:
        raise ValueError(f"vision_dim/vision_heads = {vision_dim}/{vision_heads} must be /4")
    tokenizer = build_tiny_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    # M-RoPE splits head_dim/2 rotary frequencies into temporal/height/width sections; the
    # default [16, 24, 24] belongs to head_dim 128 and silently breaks smaller heads
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": section,
            },
            # token ids live in text_config in transformers 5 (the top level ignores them)
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": vision_depth,
            "embed_dim": vision_dim,
            "hidden_size": hidden,
            "num_heads": vision_heads,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
    size = {"shortest_edge": 56 * 56, "longest_edge": max(max_image_pixels, 56 * 56)}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tokenizer,
        # Qwen2VLProcessor refuses to load without one, although we never embed videos
        video_processor=Qwen2VLVideoProcessor(size=size),
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    return model, processor


def make_tiny_qwen2vl(folder: str | Path, **sizes: Any) -> Path:
    """Build the tiny Qwen2-VL (:func:`build_tiny_qwen2vl`) and save it with its processor.

    The folder then loads offline with :func:`load_vlm` (or ``from_pretrained``) like a real
    checkpoint: ``config.json``, ``model.safetensors``, tokenizer, processor and chat template.

    Args:
        folder: destination (created if missing).
        **sizes: keyword arguments of :func:`build_tiny_qwen2vl`.

    Returns:
        The folder as a :class:`~pathlib.Path`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_qwen2vl(**sizes)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Loading a backbone
# ---------------------------------------------------------------------------------------------


def check_vlm_folder(folder: str | Path) -> str:
    """Check that ``folder`` holds a supported VLM checkpoint; return its model type.

    Raises:
        FileNotFoundError: the folder or its ``config.json`` is missing.
        ValueError: the checkpoint is not a Qwen2-VL / Qwen2.5-VL model.
    """
    path = Path(folder)
    if not path.is_dir():
        # checked here: transformers would read a missing path as a Hub repo id and fail
        # with an unrelated network or repo-name error
        raise FileNotFoundError(f"VLM checkpoint folder {str(path)!r} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a model checkpoint folder (no config.json); point the UGE "
            "backbone at a local Qwen2-VL / Qwen2.5-VL folder or make one with make_tiny_qwen2vl"
        )
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({exc})") from exc
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{str(path)!r} holds a {model_type!r} checkpoint, not a vision-language model the "
            f"UGE embedder supports ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return model_type


def load_vlm(
    folder: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """Load a VLM backbone and its processor from a local folder, never from the Hub.

    Args:
        folder: checkpoint folder (``config.json``, weights, tokenizer and processor files).
        dtype: ``auto`` (bf16 on a GPU, fp32 on CPU), a torch dtype or its name.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``, ...
        attn_implementation: ``sdpa`` (the default), ``eager`` or ``flash_attention_2``.

    Returns:
        ``(model in eval mode on device, processor)``.

    Raises:
        FileNotFoundError, ValueError: see :func:`check_vlm_folder`.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    check_vlm_folder(folder)
    target = resolve_device(device)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, target), "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(str(folder), **kwargs)
    processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    return model.to(target).eval(), processor


# ---------------------------------------------------------------------------------------------
# The embedder
# ---------------------------------------------------------------------------------------------


@dataclass
class LoraSettings:
    """LoRA adapter settings.

    Attributes:
        r: rank.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapter input (active only in train mode).
        target_modules: projection names to adapt.
        language_model_only: adapt only the language model's projections (the vision tower
            stays frozen, as in the paper); False matches the names anywhere.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    language_model_only: bool = True

    def peft_config(self) -> Any:
        """The equivalent ``peft.LoraConfig``."""
        from peft import LoraConfig

        targets: str | list[str] = list(self.target_modules)
        if self.language_model_only:
            # a string is a full-match regex in peft; a list matches name suffixes anywhere
            names = "|".join(self.target_modules)
            targets = rf".*language_model\..*\.({names})"
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets
        )


@dataclass
class UGESettings:
    """Everything besides the weights that fixes what an embedding means (saved with adapters).

    Attributes:
        pooling: ``last`` (the end token's hidden state) or ``mean`` (over non-pad tokens).
        dim: output dimension through a linear projection; None keeps the hidden size.
        padding_side: batch padding (both are handled; left is the Qwen default for batches).
        end_token: appended after the generation prompt, the token last-token pooling reads;
            None pools the prompt's own last token.
        instructions: task -> instruction text (the system message).
        max_text_tokens: truncate each user text to this many tokens before templating
            (truncating the templated prompt would cut off the end token).
        image_min_pixels: processor pixel floor per image; None keeps the checkpoint's.
        image_max_pixels: processor pixel budget per image; None keeps the checkpoint's
            (Qwen2-VL's default allows ~12 M pixels, i.e. thousands of tokens per image).
        lora: adapter settings; None for a frozen backbone (stage 0).
    """

    pooling: Pooling = "last"
    dim: int | None = None
    padding_side: PaddingSide = "left"
    end_token: str | None = "<|endoftext|>"
    instructions: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_INSTRUCTIONS))
    max_text_tokens: int | None = 256
    image_min_pixels: int | None = None
    image_max_pixels: int | None = None
    lora: LoraSettings | None = field(default_factory=LoraSettings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = asdict(self)
        if self.lora is not None:
            out["lora"]["target_modules"] = list(self.lora.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UGESettings:
        """Inverse of :meth:`to_dict`."""
        values = dict(data)
        lora = values.pop("lora", None)
        if lora is not None:
            lora = dict(lora)
            lora["target_modules"] = tuple(lora.get("target_modules", ()))
            lora = LoraSettings(**lora)
        return cls(**values, lora=lora)


SETTINGS_FILE = "uge.json"
PROJECTION_FILE = "projection.safetensors"


class UGEEmbedder(nn.Module):
    """VLM backbone + LoRA + instruction prompts + pooling -> L2-normalised embeddings.

    ``embed_images`` / ``embed_texts`` keep the autograd graph (a trainer calls them inside its
    own loop); wrap them in ``torch.no_grad()`` for inference. The module starts in eval mode;
    call ``train()`` to activate LoRA dropout.

    Args:
        backbone: a Qwen2-VL / Qwen2.5-VL ``...ForConditionalGeneration`` (see :func:`load_vlm`).
        processor: its processor.
        settings: pooling, dimension, prompts, LoRA.
    """

    def __init__(
        self, backbone: nn.Module, processor: Any, settings: UGESettings | None = None
    ) -> None:
        super().__init__()
        self.settings = settings or UGESettings()
        self.processor = processor
        if self.settings.pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {self.settings.pooling!r}")
        if self.settings.padding_side not in ("left", "right"):
            raise ValueError("padding_side must be 'left' or 'right'")
        hidden = int(backbone.config.get_text_config().hidden_size)
        for param in backbone.parameters():
            param.requires_grad_(False)
        if self.settings.lora is not None:
            from peft import get_peft_model

            with warnings.catch_warnings():
                # peft 0.21 reads a property transformers 5.23 deprecated; not ours to fix
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                backbone = get_peft_model(backbone, self.settings.lora.peft_config())
        self.backbone = backbone
        self.hidden_size = hidden
        self.projection: nn.Linear | None = None
        if self.settings.dim is not None and self.settings.dim != hidden:
            # fp32 whatever the backbone dtype: it is tiny and trained from scratch
            self.projection = nn.Linear(hidden, self.settings.dim, bias=False)
            self.projection.to(next(backbone.parameters()).device)
        self.eval()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        settings: UGESettings | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        attn_implementation: str | None = None,
    ) -> UGEEmbedder:
        """Load the backbone from a local checkpoint folder and wrap it (fresh adapters)."""
        backbone, processor = load_vlm(folder, dtype, device, attn_implementation)
        return cls(backbone, processor, settings)

    @classmethod
    def from_adapters(
        cls,
        adapters: str | Path,
        backbone: str | Path,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
    ) -> UGEEmbedder:
        """Rebuild a saved embedder: the backbone folder plus :meth:`save_adapters`' folder."""
        settings = UGESettings.from_dict(
            json.loads((Path(adapters) / SETTINGS_FILE).read_text(encoding="utf-8"))
        )
        embedder = cls.from_folder(backbone, settings, dtype, device)
        embedder.load_adapters(adapters)
        return embedder

    # -- properties ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the backbone's weights are."""
        return next(self.backbone.parameters()).device

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.settings.dim if self.projection is not None else self.hidden_size

    @property
    def base_model(self) -> nn.Module:
        """The ``...ForConditionalGeneration`` without the peft wrapper (LoRA layers inside)."""
        from peft import PeftModel

        if isinstance(self.backbone, PeftModel):
            return self.backbone.get_base_model()
        return self.backbone

    def enable_gradient_checkpointing(self) -> None:
        """Recompute decoder activations in the backward pass (real checkpoints on a GPU).

        Non-reentrant checkpointing: the reentrant kind yields no gradients for LoRA when the
        checkpointed block's inputs (frozen embeddings) do not require grad.
        """
        model = self.base_model
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters: LoRA matrices and the projection."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    # -- inputs -------------------------------------------------------------------------------

    def instruction(self, task: str) -> str:
        """The instruction text of a task."""
        try:
            return self.settings.instructions[task]
        except KeyError:
            known = ", ".join(sorted(self.settings.instructions))
            raise KeyError(f"unknown UGE task {task!r}; known tasks: {known}") from None

    def _truncate(self, text: str) -> str:
        limit = self.settings.max_text_tokens
        if limit is None:
            return text
        tokenizer = self.processor.tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= limit else tokenizer.decode(ids[:limit])

    def _prompts(self, task: str, n: int, texts: Sequence[str] | None, image: bool) -> list[str]:
        system = self.instruction(task)
        conversations = []
        for i in range(n):
            content: list[dict[str, str]] = [{"type": "image"}] if image else []
            if texts is not None and texts[i]:
                content.append({"type": "text", "text": self._truncate(texts[i])})
            conversations.append(
                [
                    {"role": "system", "content": [{"type": "text", "text": system}]},
                    {"role": "user", "content": content},
                ]
            )
        prompts = self.processor.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=True
        )
        end = self.settings.end_token or ""
        return [prompt + end for prompt in prompts]

    def prepare_images(
        self, images: Sequence[Any], task: str, texts: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenise and preprocess images (one per sample, optional text after it).

        Args:
            images: PIL images (any size; the processor resizes to its patch grid).
            task: key of ``settings.instructions``.
            texts: optional text per image, placed after the image in the user turn.

        Returns:
            Model inputs on the embedder's device (``input_ids``, ``attention_mask``,
            ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``).
        """
        if texts is not None and len(texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if not images:
            raise ValueError("no images to embed")
        prompts = self._prompts(task, len(images), texts, image=True)
        size: dict[str, int] = {}
        if self.settings.image_min_pixels is not None:
            size["shortest_edge"] = self.settings.image_min_pixels
        if self.settings.image_max_pixels is not None:
            size["longest_edge"] = self.settings.image_max_pixels
        extra = {"images_kwargs": {"size": size}} if size else {}
        batch = self.processor(
            text=prompts,
            images=[image.convert("RGB") for image in images],
            padding=True,
            padding_side=self.settings.padding_side,
            return_tensors="pt",
            **extra,
        )
        return self._to_device(batch)

    def prepare_texts(self, texts: Sequence[str], task: str) -> dict[str, torch.Tensor]:
        """Tokenise texts with the task's instruction (no image)."""
        if not texts:
            raise ValueError("no texts to embed")
        prompts = self._prompts(task, len(texts), texts, image=False)
        batch = self.processor.tokenizer(
            prompts,
            padding=True,
            padding_side=self.settings.padding_side,
            return_tensors="pt",
            add_special_tokens=False,
        )
        return self._to_device(batch)

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        device = self.device
        dtype = next(self.backbone.parameters()).dtype
        out = {}
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                continue
            value = value.to(device)
            out[key] = value.to(dtype) if value.is_floating_point() else value
        return out

    # -- forward ------------------------------------------------------------------------------

    def hidden_states(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The language model's last hidden state (after the final norm), (B, L, hidden).

        Calls the inner ``...Model`` rather than ``...ForConditionalGeneration``: the LM head
        would materialise (B, L, vocab) logits, ~10 GB in bf16 for a batch of 32 on the 2B model.
        """
        inputs = dict(batch)
        if "pixel_values" not in inputs and "position_ids" not in inputs:
            # text only: the model numbers positions 0..L-1 regardless of the mask, so left
            # padding would shift a row's positions by its pad count. RoPE is relative, so that
            # changes only rounding, but counting from the first real token matches an unpadded
            # run (and generate()). With images the model derives M-RoPE positions from the mask.
            mask = inputs["attention_mask"]
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        output = self.base_model.model(**inputs, use_cache=False)
        return output.last_hidden_state

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pool (B, L, H) hidden states into (B, H) by the settings' pooling (fp32)."""
        mask = attention_mask.to(hidden.device)
        if self.settings.pooling == "mean":
            weights = mask.to(torch.float32).unsqueeze(-1)
            return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        # the last position whose mask is 1, whichever side the padding is on
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * mask.long()).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Embed a prepared batch: (B, dim), L2-normalised, fp32."""
        pooled = self.pool(self.hidden_states(batch), batch["attention_mask"])
        if self.projection is not None:
            pooled = self.projection(pooled.to(self.projection.weight.dtype))
        return F.normalize(pooled.float(), dim=-1)

    def embed_images(
        self, images: Sequence[Any], task: str, texts: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Embed images (optionally each with a text) under a task instruction: (B, dim)."""
        return self(self.prepare_images(images, task, texts))

    def embed_texts(self, texts: Sequence[str], task: str) -> torch.Tensor:
        """Embed texts under a task instruction: (B, dim)."""
        return self(self.prepare_texts(texts, task))

    # -- adapters -----------------------------------------------------------------------------

    def save_adapters(self, folder: str | Path) -> Path:
        """Save LoRA weights (peft, safetensors), the projection and the settings to a folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.settings.lora is not None:
            self.backbone.save_pretrained(str(folder))
        if self.projection is not None:
            state = {
                k: v.detach().cpu().contiguous() for k, v in self.projection.state_dict().items()
            }
            save_file(state, str(folder / PROJECTION_FILE))
        text = json.dumps(self.settings.to_dict(), indent=2)
        (folder / SETTINGS_FILE).write_text(text + "\n", encoding="utf-8")
        return folder

    def load_adapters(self, folder: str | Path) -> None:
        """Load weights saved by :meth:`save_adapters` into this embedder's adapters.

        Raises:
            FileNotFoundError: the folder lacks a file this embedder needs.
            ValueError: the saved adapters do not fit (other rank, targets or dimension).
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        if self.settings.lora is not None:
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            if not (folder / "adapter_model.safetensors").is_file():
                raise FileNotFoundError(f"{str(folder)!r} holds no adapter_model.safetensors")
            weights = load_peft_weights(str(folder), device=str(self.device))
            expected = {n for n in self.backbone.state_dict() if "lora_" in n}
            try:
                result = set_peft_model_state_dict(self.backbone, weights)
            except RuntimeError as exc:  # shape mismatch: another rank or model
                raise ValueError(f"adapters in {str(folder)!r} do not fit: {exc}") from exc
            missing = expected & set(result.missing_keys)
            if result.unexpected_keys or missing:
                raise ValueError(
                    f"adapters in {str(folder)!r} do not fit this model: "
                    f"unexpected {sorted(result.unexpected_keys)[:3]}, missing {sorted(missing)[:3]}"
                )
        if self.projection is not None:
            path = folder / PROJECTION_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{str(folder)!r} holds no {PROJECTION_FILE}")
            state = load_file(str(path), device=str(self.projection.weight.device))
            try:
                self.projection.load_state_dict(state)
            except RuntimeError as exc:
                raise ValueError(f"projection in {str(folder)!r} does not fit: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float = 0.01,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric in-batch InfoNCE: row i of ``a`` and row i of ``b`` are the positive pair.

    Cosine similarities (inputs are normalised here, a no-op for unit vectors) divided by the
    temperature; the loss is the mean of the a->b and b->a cross-entropies.

    Args:
        a: (B, D) embeddings (e.g. images).
        b: (B, D) embeddings (e.g. captions).
        temperature: the paper used 0.01.
        groups: optional (B,) ids; off-diagonal pairs of one group (two images of one place
            sharing a caption) are not used as negatives.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (B, D) tensors of one shape, got {a.shape} and {b.shape}")
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / temperature
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def stage1_loss(
    embedder: UGEEmbedder,
    images: Sequence[Any],
    texts: Sequence[str],
    image_task: str = "geolocation",
    text_task: str = "location",
    temperature: float = 0.01,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 1 loss of one batch: images vs their captions, in-batch negatives.

    Args:
        embedder: the model (in train mode for LoRA dropout).
        images: B images.
        texts: B captions, ``texts[i]`` describing ``images[i]``.
        image_task: instruction key of the image side.
        text_task: instruction key of the text side.
        temperature: InfoNCE temperature.
        groups: see :func:`info_nce`.
    """
    return info_nce(
        embedder.embed_images(images, image_task),
        embedder.embed_texts(texts, text_task),
        temperature,
        groups,
    )
