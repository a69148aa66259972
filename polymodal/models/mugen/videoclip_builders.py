"""VideoCLIP configurations: MUGEN's (Hayes et al. 2022, Section 4.1 / TorchMultimodal's
``examples/mugen/retrieval``) and a tiny preset for 2 CPU cores.

DistilBERT is re-declared here from the core encoder (families do not import one another; the
``bert`` family's ``distilbert_base_uncased`` is the same configuration).

>>> from polymodal.core.convert import meta_init
>>> from polymodal.core.pytree import num_params
>>> num_params(meta_init(videoclip()))
74863777
"""

from __future__ import annotations

import math
from typing import Any

from ...core.encoders.bert import BERTTextEncoder, bert_text_encoder
from ...core.encoders.s3d import S3D, s3d, s3d_tiny
from .videoclip import VideoCLIP

__all__ = ["distilbert_text_encoder", "videoclip", "videoclip_tiny", "VIDEOCLIP_BUILDERS", "TINY_VOCAB_SIZE"]

TINY_VOCAB_SIZE = 64  # the word-level vocabulary of the synthetic captions (videoclip_task.CaptionVocab) fits


def distilbert_text_encoder(**kw: Any) -> BERTTextEncoder:
    """DistilBERT-base uncased (Sanh et al. 2019: 6 layers of BERT-base, no token types, no pooler),
    with Hugging Face's ``DistilBertConfig()`` dropouts (0.1): 66,362,880 params."""
    return bert_text_encoder(**(dict(num_layers=6, type_vocab_size=0, pooler=False, dropout=0.1,
                                     attn_dropout=0.1) | kw))


def videoclip(*, text: BERTTextEncoder | None = None, video: S3D | None = None, **kw: Any) -> VideoCLIP:
    """MUGEN's VideoCLIP (TorchMultimodal's ``videoclip()``): DistilBERT-base + torchvision's S3D
    (1024 features, 2x7x7 pool: 16+ frames of 224x224, MUGEN uses 32), 256-d projections with
    dropout 0.1, MUGEN's loss settings. 74,863,777 params (66,362,880 text, 7,910,048 video,
    590,848 projections, 1 logit scale)."""
    return VideoCLIP(text or distilbert_text_encoder(), video or s3d(), **kw)


def videoclip_tiny(**kw: Any) -> VideoCLIP:
    """A 2-layer width-32 DistilBERT over the synthetic captions' words, a 1/16-width S3D for 8-frame
    32x32 clips (batch-norm momentum 0.1), 32-d projections; CLIP's initial temperature (log scale ``log(1/0.07)``) trains
    faster than MUGEN's ``0.07`` on this small problem."""
    text = bert_text_encoder(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, num_layers=2, num_heads=2,
                             intermediate_size=64, max_position_embeddings=16, type_vocab_size=0, pooler=False)
    # torchvision's batch-norm momentum 1e-3 would leave the running statistics near their initial
    # values after a few hundred steps (evaluation then normalises with the wrong ones): 0.1 here
    args = dict(text=text, video=s3d_tiny(bn_momentum=0.1), proj_dim=32, proj_dropout=0.0, logit_scale_init=math.log(1 / 0.07),
                logit_scale_max=math.log(100))
    return VideoCLIP(**(args | kw))


VIDEOCLIP_BUILDERS = {"videoclip": videoclip, "videoclip_tiny": videoclip_tiny}
