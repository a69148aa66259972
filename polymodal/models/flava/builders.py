"""FLAVA's builders: TorchMultimodal's ``flava_model`` / ``flava_model_for_pretraining`` /
``flava_model_for_classification`` (same keyword arguments and defaults), the paper's larger scales and a
tiny preset that trains on 2 CPU cores.

Parameter counts equal TorchMultimodal's (``tests/models/flava/test_flava_builders.py``):
``flava_model()`` 241,356,288; ``flava_model_for_pretraining()`` 357,645,303.

>>> from polymodal.core.convert import meta_init
>>> from polymodal.core.pytree import flatten
>>> sum(v.numel() for v in flatten(meta_init(flava_tiny())).values()) > 0
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ...core.encoders.bert import bert_text_encoder
from ...core.encoders.vit import VisionTransformer
from ...core.layers.mlp import MLP
from ...core.layers.patch import PatchEmbedding
from ...core.layers.transformer import TransformerEncoder, TransformerEncoderLayer
from .dvae import DalleEncoder
from .encoders import FLAVAImageEncoder, FLAVAMultimodalEncoder
from .heads import FLAVAPretrainingLoss
from .model import FLAVAModel
from .pretraining import FLAVAForClassification, FLAVAForPreTraining

__all__ = ["flava_model", "flava_model_for_pretraining", "flava_model_for_classification", "flava_900m",
           "flava_1_8b", "flava_2_7b", "flava_4_8b", "flava_10b", "flava_tiny", "flava_tiny_for_pretraining",
           "flava_tiny_for_classification", "BUILDERS", "build", "SCALES"]


def _act(a: Any) -> str:
    """A TorchMultimodal activation argument (``nn.GELU`` or a name) -> our name."""
    if isinstance(a, str):
        return a
    name = getattr(a, "__name__", type(a).__name__).lower()
    return {"gelu": "gelu", "relu": "relu", "silu": "silu", "tanh": "tanh"}.get(name, name)


def _layer(width: int, heads: int, ff: int, dropout: float, act: Any, eps: float,
           init: str = "normal") -> TransformerEncoderLayer:
    return TransformerEncoderLayer(width, heads, dim_feedforward=ff, dropout=dropout, attn_dropout=dropout,
                                   activation=_act(act), norm_first=True, layer_norm_eps=eps, fp32_norm=True,
                                   weight_init=init)


def flava_model(
    image_hidden_size: int = 768, image_num_attention_heads: int = 12, image_num_hidden_layers: int = 12,
    image_dropout: float = 0.0, image_intermediate_size: int = 3072, image_intermediate_activation: Any = "gelu",
    image_layer_norm_eps: float = 1e-12, use_image_masking: bool = True, image_size: int = 224,
    patch_size: int = 16, num_channels: int = 3,
    text_hidden_size: int = 768, text_num_attention_heads: int = 12, text_num_hidden_layers: int = 12,
    text_dropout: float = 0.0, text_intermediate_size: int = 3072, text_intermediate_activation: Any = "gelu",
    text_layer_norm_eps: float = 1e-12, vocab_size: int = 30522, pad_token_id: int = 0, type_vocab_size: int = 2,
    max_position_embeddings: int = 512,
    multimodal_hidden_size: int = 768, multimodal_num_attention_heads: int = 12,
    multimodal_num_hidden_layers: int = 6, multimodal_dropout: float = 0.0, multimodal_intermediate_size: int = 3072,
    multimodal_intermediate_activation: Any = "gelu", multimodal_layer_norm_eps: float = 1e-12,
    text_and_image_proj_size: int = 768, mask_text_padding_in_mm: bool = True, layer_weight_init: str = "normal",
    image_conv_stem: tuple[int, ...] = (), **kwargs: Any,
) -> FLAVAModel:
    """TorchMultimodal's ``flava_model`` (Singh et al. 2022, FLAVA, Section 3.1 / Table 6: ViT-B/16 image and
    text encoders, a 6-layer multimodal encoder, 768-d projections): 241,356,288 params with the defaults.
    ``mask_text_padding_in_mm=False`` reproduces the reference's unmasked text padding (see ``model.py``);
    ``layer_weight_init`` is the init of the blocks' linears (``"normal"``: N(0, 0.02), the reference's);
    ``image_conv_stem``: widths of 3x3 stride-2 convs under the patch projection (``PatchEmbedding.conv_stem``;
    not in the reference, so such a model has no TorchMultimodal / transformers layout)."""
    if kwargs:
        raise TypeError(f"flava_model: unexpected arguments {sorted(kwargs)}")
    emb = PatchEmbedding(image_size=image_size, patch_size=patch_size, num_channels=num_channels,
                         hidden_size=image_hidden_size, hidden_dropout=image_dropout,
                         use_image_masking=use_image_masking, conv_stem=tuple(image_conv_stem))
    vit = VisionTransformer(emb, TransformerEncoder(
        _layer(image_hidden_size, image_num_attention_heads, image_intermediate_size, image_dropout,
               image_intermediate_activation, image_layer_norm_eps, layer_weight_init), image_num_hidden_layers,
        final_norm=True))
    text = bert_text_encoder(vocab_size=vocab_size, hidden_size=text_hidden_size,
                             num_layers=text_num_hidden_layers, num_heads=text_num_attention_heads,
                             intermediate_size=text_intermediate_size, max_position_embeddings=max_position_embeddings,
                             type_vocab_size=type_vocab_size, pad_token_id=pad_token_id,
                             layer_norm_eps=text_layer_norm_eps, dropout=text_dropout,
                             activation=_act(text_intermediate_activation), norm_first=True, final_norm=True)
    text = dataclasses.replace(text, encoder=dataclasses.replace(
        text.encoder, layer=dataclasses.replace(text.encoder.layer, fp32_norm=True, weight_init=layer_weight_init)))
    mm = FLAVAMultimodalEncoder(TransformerEncoder(
        _layer(multimodal_hidden_size, multimodal_num_attention_heads, multimodal_intermediate_size,
               multimodal_dropout, multimodal_intermediate_activation, multimodal_layer_norm_eps, layer_weight_init),
        multimodal_num_hidden_layers))
    return FLAVAModel(FLAVAImageEncoder(vit), text, mm, text_and_image_proj_size, mask_text_padding_in_mm)


def flava_model_for_pretraining(codebook_image_size: int = 112, codebook_n_hid: int = 256,
                                image_vocab_size: int = 8192, **flava_model_kwargs: Any) -> FLAVAForPreTraining:
    """TorchMultimodal's ``flava_model_for_pretraining``: :func:`flava_model`, the DALL-E dVAE encoder (8192
    codes, 112 px) and the six pretraining losses (heads at the multimodal width): 357,645,303 params (of
    which the dVAE's 53,786,240)."""
    model = flava_model(**flava_model_kwargs)
    codebook = DalleEncoder(n_hid=codebook_n_hid, vocab_size=image_vocab_size, image_size=codebook_image_size,
                            input_channels=model.image_encoder.vit.embeddings.num_channels)
    loss = FLAVAPretrainingLoss(hidden_size=model.mm_width, text_vocab_size=model.text_encoder.embeddings.vocab_size,
                                image_vocab_size=image_vocab_size)
    return FLAVAForPreTraining(model, codebook, loss)


def flava_model_for_classification(num_classes: int = 2, classifier_in_dim: int = 768,
                                   classifier_hidden_sizes: int | list[int] = 768, classifier_dropout: float = 0.5,
                                   classifier_activation: Any = "relu", classifier_normalization: str | None = None,
                                   **flava_model_kwargs: Any) -> FLAVAForClassification:
    """TorchMultimodal's ``flava_model_for_classification`` (an MLP on the pooled class token; ``num_classes``,
    which the reference requires, defaults to 2 here so every registered builder builds without arguments; its
    ``pretrained`` / ``loss_fn`` arguments are the caller's: :func:`~.pretrained.load_pretrained`,
    :meth:`FLAVAForClassification.loss`)."""
    flava_model_kwargs.pop("pretrained", None)
    hidden = (classifier_hidden_sizes,) if isinstance(classifier_hidden_sizes, int) else tuple(classifier_hidden_sizes)
    clf = MLP(classifier_in_dim, num_classes, hidden, _act(classifier_activation), classifier_dropout,
              classifier_normalization)
    return FLAVAForClassification(flava_model(**flava_model_kwargs), clf)


def _scale(layers: int, width: int, ff: int, mm_layers: int, heads: int = 16) -> dict:
    return {f"{m}_{k}": v for m in ("image", "text") for k, v in (
        ("num_hidden_layers", layers), ("hidden_size", width), ("intermediate_size", ff),
        ("num_attention_heads", heads))} | {
        "multimodal_num_hidden_layers": mm_layers, "multimodal_hidden_size": width,
        "multimodal_intermediate_size": ff, "multimodal_num_attention_heads": heads}


# TorchMultimodal's examples/flava/native/configs/{900m,1.8b,2.7b,4.8b,10b}.yaml (the scaling study of its
# native trainer); parameter counts of flava_model_for_pretraining at each.
SCALES: dict[str, dict] = {
    "900m": _scale(24, 1024, 4096, 12), "1.8b": _scale(32, 1280, 5120, 16), "2.7b": _scale(40, 1408, 6144, 20),
    "4.8b": _scale(48, 1664, 8192, 24), "10b": _scale(64, 2048, 10240, 40),
}


def flava_900m(**kw) -> FLAVAForPreTraining:
    """``configs/900m.yaml``: 24 + 24 layers of width 1024, 12 multimodal."""
    return flava_model_for_pretraining(**(SCALES["900m"] | kw))


def flava_1_8b(**kw) -> FLAVAForPreTraining:
    """``configs/1.8b.yaml``: 32 + 32 layers of width 1280, 16 multimodal."""
    return flava_model_for_pretraining(**(SCALES["1.8b"] | kw))


def flava_2_7b(**kw) -> FLAVAForPreTraining:
    """``configs/2.7b.yaml``: 40 + 40 layers of width 1408, 20 multimodal."""
    return flava_model_for_pretraining(**(SCALES["2.7b"] | kw))


def flava_4_8b(**kw) -> FLAVAForPreTraining:
    """``configs/4.8b.yaml``: 48 + 48 layers of width 1664, 24 multimodal."""
    return flava_model_for_pretraining(**(SCALES["4.8b"] | kw))


def flava_10b(**kw) -> FLAVAForPreTraining:
    """``configs/10b.yaml``: 64 + 64 layers of width 2048, 40 multimodal."""
    return flava_model_for_pretraining(**(SCALES["10b"] | kw))


_TINY = dict(image_hidden_size=64, image_num_attention_heads=4, image_num_hidden_layers=2,
             image_intermediate_size=128, image_size=32, patch_size=4,
             text_hidden_size=64, text_num_attention_heads=4, text_num_hidden_layers=2, text_intermediate_size=128,
             vocab_size=64, max_position_embeddings=32, multimodal_hidden_size=64, multimodal_num_attention_heads=4,
             multimodal_num_hidden_layers=1, multimodal_intermediate_size=128, text_and_image_proj_size=64,
             layer_weight_init="torch")


def flava_tiny(**kw) -> FLAVAModel:
    """A width-64 FLAVA (2 + 2 + 1 layers, 32 px images in 4 px patches, a 64-token vocabulary): trains on 2 CPU cores.

    Its blocks' linears start from torch's default init (U(+-1/sqrt(fan_in)), std 0.07 at width 64) rather than
    N(0, 0.02): at this width the small init leaves the class tokens nearly input-independent for the first
    ~130 steps (the contrastive loss stays at log B), see docs/models/flava.md."""
    return flava_model(**(_TINY | kw))


def flava_tiny_for_pretraining(codebook_n_blk_per_group: int = 2, contrastive_loss_weight: float = 1.0,
                               **kw) -> FLAVAForPreTraining:
    """:func:`flava_tiny` + a narrow dVAE (width 4, 128 codes, 64 px: an 8 x 8 grid, as the patches) + the losses.

    ``codebook_n_blk_per_group``: the dVAE's residual blocks per group (DALL-E's 2; ``polymodal train flava``
    uses 1, half the tokenizer's cost); ``contrastive_loss_weight``: the global contrastive loss's weight."""
    spec = flava_model_for_pretraining(**(dict(codebook_image_size=64, codebook_n_hid=4, image_vocab_size=128)
                                          | _TINY | kw))
    return dataclasses.replace(
        spec, image_codebook=dataclasses.replace(spec.image_codebook, n_blk_per_group=codebook_n_blk_per_group),
        loss=dataclasses.replace(spec.loss, contrastive_loss_weight=contrastive_loss_weight))


def flava_tiny_for_classification(num_classes: int = 30, **kw) -> FLAVAForClassification:
    """:func:`flava_tiny` + a 64-wide MLP classifier."""
    return flava_model_for_classification(num_classes, **(dict(classifier_in_dim=64, classifier_hidden_sizes=64)
                                                          | _TINY | kw))


BUILDERS: dict[str, Callable[..., Any]] = {f.__name__: f for f in (
    flava_model, flava_model_for_pretraining, flava_model_for_classification, flava_900m, flava_1_8b, flava_2_7b,
    flava_4_8b, flava_10b, flava_tiny, flava_tiny_for_pretraining, flava_tiny_for_classification)}


def build(name: str, **kw) -> Any:
    """A registered builder by name (``"flava_model"``; dashes allowed)."""
    key = name.replace("-", "_")
    if key not in BUILDERS:
        raise ValueError(f"unknown FLAVA builder {name!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[key](**kw)
