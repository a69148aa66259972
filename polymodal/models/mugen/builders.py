"""Text-to-video GPT configurations on :class:`~polymodal.core.encoders.gpt.MultimodalGPT`.

Text ids are the input modality (a token table ``d_model`` wide, one position table over the
text context), video codes of a VQ-VAE the output modality (the codebook's ``(K, D)`` table as
token embeddings, projected bias-free to ``d_model``, broadcast positions over the latent grid).
VideoGPT's video-to-video ``video_gpt`` is :func:`polymodal.core.encoders.gpt.video_gpt`.
"""

from __future__ import annotations

from ...core.encoders.gpt import MultimodalGPT, multimodal_gpt

__all__ = ["text_video_gpt", "mugen_gpt", "mugen_gpt_tiny", "BUILDERS"]


def text_video_gpt(num_text_tokens: int, text_len: int, video_latent_shape: tuple[int, ...], num_video_tokens: int,
                   video_embedding_dim: int, *, d_model: int = 768, num_heads: int = 8, num_layers: int = 12,
                   dropout: float = 0.2, attn_dropout: float = 0.3, detach_sos: bool = False) -> MultimodalGPT:
    """A text -> video-codes GPT: TorchMultimodal's MUGEN ``text_video_gpt`` layout (pre-norm blocks,
    ``SiLU``-1.702 = our ``quick_gelu`` MLP 4x, bias-free q/k/v, zero-initialised logits)."""
    return multimodal_gpt(num_text_tokens, num_video_tokens, (text_len,), tuple(video_latent_shape), d_model=d_model,
                          num_heads=num_heads, num_layers=num_layers, dropout=dropout, attn_dropout=attn_dropout,
                          activation="quick_gelu", out_dim=video_embedding_dim, proj_bias=False, qkv_bias=False,
                          detach_sos=detach_sos)


def mugen_gpt(*, text_len: int = 128, text_vocab: int = 1024, video_latent_shape: tuple[int, ...] = (8, 8, 8),
              num_video_tokens: int = 2048, video_embedding_dim: int = 256, detach_sos: bool = False) -> MultimodalGPT:
    """MUGEN's text-to-video GPT (Hayes et al. 2022, Sec. 4.2; TorchMultimodal's
    ``examples/mugen/generation/text_video_gpt.py`` defaults): d_model 768, 8 heads, 12 layers,
    dropout 0.2 / 0.3, text context 128 with MUGEN's unique pad ids (``text_vocab + text_len``
    input tokens; the published BPE vocabulary has 1024 entries), 32x256x256 clips as 8x8x8 codes of
    the 2048 x 256 MUGEN VQ-VAE."""
    return text_video_gpt(text_vocab + text_len, text_len, video_latent_shape, num_video_tokens, video_embedding_dim,
                          detach_sos=detach_sos)


def mugen_gpt_tiny(*, text_vocab: int = 21, text_len: int = 8, video_latent_shape: tuple[int, ...] = (4, 8, 8),
                   num_video_tokens: int = 128, video_embedding_dim: int = 32, d_model: int = 96,
                   num_layers: int = 4) -> MultimodalGPT:
    """A tiny text-to-video GPT for the synthetic moving shapes on 2 CPU cores: the word vocabulary of
    :meth:`CaptionTokenizer.moving_shapes` (21 entries with [PAD], [SEP], [UNK]; context 8), the codes of ``vqvae_tiny``
    (8x32x32 clips -> 4x8x8 codes of a 128 x 32 codebook), d_model 96, 4 layers, 4 heads."""
    return text_video_gpt(text_vocab + text_len, text_len, video_latent_shape, num_video_tokens, video_embedding_dim,
                          d_model=d_model, num_heads=4, num_layers=num_layers, dropout=0.0, attn_dropout=0.0)


BUILDERS = {"mugen_gpt": mugen_gpt, "mugen_gpt_tiny": mugen_gpt_tiny}
