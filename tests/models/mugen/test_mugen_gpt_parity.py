"""Text->video and video->video GPT parity with TorchMultimodal: logits, gradients, cached generation.

References: the installed ``torchmultimodal.models.video_gpt`` (``MultimodalGPT``, ``video_gpt``,
``GenerationUtil``) and MUGEN's ``examples/mugen/generation/text_video_gpt.py`` (not installed:
``text_video_gpt`` is composed below from the installed classes with that file's layout; its
``TextTokenizer`` minus the BPE tokenizer, which ``encode`` skips by taking ids).
"""

import pytest
import torch
from torch import nn
from torchmultimodal.models.video_gpt.gpt import MultimodalGPT as TGPT
from torchmultimodal.models.video_gpt.gpt import MultimodalTransformerDecoder, RightShift, TransformerDecoder
from torchmultimodal.models.video_gpt.gpt import TransformerDecoderLayer as TLayer
from torchmultimodal.models.video_gpt.model import video_gpt as tmm_video_gpt
from torchmultimodal.models.video_gpt.model import video_vqvae as tmm_video_vqvae
from torchmultimodal.modules.layers.attention import SelfAttention
from torchmultimodal.modules.layers.position_embedding import BroadcastedPositionEmbedding
from torchmultimodal.utils.attention import get_causal_attention_mask
from torchmultimodal.utils.generate import GenerationUtil, get_logits_mask

from checks import randomize
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.convert import meta_init
from polymodal.core.encoders.gpt import video_gpt
from polymodal.core.encoders.gpt_generate import generate
from polymodal.models.mugen import mugen_gpt, text_video_gpt
from polymodal.models.mugen.convert import from_torchmultimodal, to_torchmultimodal
from polymodal.models.vqvae import video_vqvae
from polymodal.models.vqvae.convert import from_torchmultimodal as vq_from_tmm

VQ = dict(encoder_hidden_dim=16, n_res_layers=1, attn_hidden_dim=16, num_embeddings=32, embedding_dim=8,
          decoder_hidden_dim=16)
SIZES, STRIDES = ((4, 4, 4), (3, 3, 3)), ((2, 2, 2), (1, 2, 2))  # (4, 8, 8) clips -> (2, 2, 2) codes
LATENT, D, TEXT_LEN, TEXT_TOKENS = (2, 2, 2), 24, 5, 13


class TextTokenizer(nn.Module):  # examples/mugen/generation/text_video_gpt.py, ids in, no BPE
    def __init__(self, num_tokens, d_model):
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, d_model)

    def encode(self, ids, **kwargs):
        return ids

    def lookup(self, ids):
        return self.embedding(ids)


def _decoder(in_pos, layers=2):
    layer = TLayer(D, 2, 0.2, attn_module=SelfAttention(attn_dropout=0.3))
    out_pos = BroadcastedPositionEmbedding(LATENT, D)
    return MultimodalTransformerDecoder(in_pos, out_pos, TransformerDecoder(layer, layers), RightShift(D))


def reference(kind, seed=0):
    torch.manual_seed(seed)
    out_tok = tmm_video_vqvae(SIZES, STRIDES, **VQ).eval()
    if kind == "text":
        ref = TGPT(D, TEXT_TOKENS, 32, LATENT, TextTokenizer(TEXT_TOKENS, D), out_tok,
                   _decoder(nn.Embedding(TEXT_LEN, D)), nn.Identity(), nn.Linear(8, D, bias=False))
        spec = text_video_gpt(TEXT_TOKENS, TEXT_LEN, LATENT, 32, 8, d_model=D, num_heads=2, num_layers=2,
                              detach_sos=True)
    else:
        in_tok = tmm_video_vqvae(SIZES, STRIDES, **VQ).eval()
        ref = TGPT(D, 32, 32, LATENT, in_tok, out_tok, _decoder(BroadcastedPositionEmbedding(LATENT, D)),
                   nn.Linear(8, D, bias=False), nn.Linear(8, D, bias=False))
        spec = video_gpt(LATENT, d_model=D, num_heads=2, num_layers=2, num_in_tokens=32, num_out_tokens=32,
                         embedding_dim=8, detach_sos=True)
    sd = ref.state_dict()
    gpt_keys = [k for k in sd if "tokenizer." not in k or k.endswith("codebook.embedding") or "embedding.weight" in k]
    new = dict(sd)
    for i, k in enumerate(gpt_keys):
        new[k] = randomize({"x": sd[k]}, seed + i)["x"]
    ref.load_state_dict(new)
    ref.eval()
    return ref, spec, from_torchmultimodal(new, spec), new


def ids(seed, b, n, vocab):
    return pr.randint(pr.key(seed), (b, n), 0, vocab)


@pytest.mark.parametrize("kind", ["text", "video"])
def test_logits_and_gradients_match_torchmultimodal(kind):
    ref, spec, p, sd = reference(kind)
    n_in = TEXT_TOKENS if kind == "text" else 32
    l_in = TEXT_LEN if kind == "text" else 8
    x_in, x_out = ids(1, 2, l_in, n_in), ids(2, 2, 8, 32)
    mask = get_causal_attention_mask(l_in + 8)
    lmask = get_logits_mask(l_in, 8, n_in, 32)
    want = ref(x_in, x_out, attn_mask=mask, right_shift=True, logits_mask=lmask).logits
    got = spec(p, x_in, x_out).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # gradients of a cross-entropy over the joint vocabulary: equal, and none into the start token
    tgt = spec.targets(x_in, x_out)
    torch.nn.functional.cross_entropy(want.flatten(0, 1), tgt.flatten()).backward()
    g = torch.func.grad(lambda q: torch.nn.functional.cross_entropy(spec(q, x_in, x_out).logits.flatten(0, 1),
                                                                     tgt.flatten()))(p)
    assert torch.count_nonzero(g["sos"]) == 0
    g_theirs = to_torchmultimodal(g, spec)
    named = dict(ref.named_parameters())
    for k, v in g_theirs.items():
        if k in named and named[k].grad is not None:
            torch.testing.assert_close(v, named[k].grad, rtol=1e-4, atol=1e-5, msg=k)
    assert named["to_logit.weight"].grad is not None


def test_start_token_gets_a_gradient_without_the_parity_flag():
    ref, spec, p, sd = reference("text")
    import dataclasses
    ours = dataclasses.replace(spec, detach_sos=False)
    x_in, x_out = ids(1, 2, TEXT_LEN, TEXT_TOKENS), ids(2, 2, 8, 32)
    g = torch.func.grad(lambda q: ours(q, x_in, x_out).logits.logsumexp(-1).sum())(p)
    assert torch.count_nonzero(g["sos"]) > 0
    torch.testing.assert_close(ours(p, x_in, x_out).logits, spec(p, x_in, x_out).logits, rtol=0, atol=0)


def test_cached_generation_matches_torchmultimodal_generation_utility():
    ref, spec, p, sd = reference("text", seed=3)
    vq_spec = video_vqvae(SIZES, STRIDES, **VQ)
    vq_p, vq_s = vq_from_tmm({k[len("out_tokenizer."):]: v for k, v in sd.items() if k.startswith("out_tokenizer.")},
                             vq_spec)
    x_in = ids(5, 3, TEXT_LEN, TEXT_TOKENS)
    util = GenerationUtil(ref)  # ref is in eval mode already
    out = util.sample(x_in, max_seq_len=8, use_cache=True, causal=True, top_k=1)
    tokens = generate(spec, p, x_in, key=None)
    assert torch.equal(tokens, out.tokens)
    assert torch.equal(tokens, generate(spec, p, x_in, key=None, use_cache=False))
    video = vq_spec.decode(vq_p, tokens.reshape(3, *LATENT), vq_s)
    torch.testing.assert_close(video, out.decoded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["text", "video"])
def test_converter_round_trip_is_exact(kind):
    ref, spec, p, sd = reference(kind, seed=4)
    tokenizers = {k: v for k, v in sd.items() if "tokenizer." in k}
    back = to_torchmultimodal(p, spec, tokenizers)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    bad = {k: v for k, v in sd.items() if k != "mm_decoder.right_shift.sos"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): mm_decoder.right_shift.sos"):
        from_torchmultimodal(bad, spec)


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items() if "tokenizer." not in k or k.endswith("codebook.embedding")
            or k.endswith("tokenizer.embedding.weight")}


@pytest.mark.slow  # full-size layouts (meta device)
def test_published_configurations_have_the_reference_layout():
    with torch.device("meta"):
        ref = tmm_video_gpt()
        vq = tmm_video_vqvae(((4, 4, 4),) * 5, ((2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 2)),
                             num_embeddings=2048)  # MUGEN's VQ-VAE's codebook (the GPT reads only its table)
        layer = TLayer(768, 8, 0.2, attn_module=SelfAttention(attn_dropout=0.3))
        mm = MultimodalTransformerDecoder(nn.Embedding(128, 768), BroadcastedPositionEmbedding((8, 8, 8), 768),
                                          TransformerDecoder(layer, 12), RightShift(768))
        mugen = TGPT(768, 1024 + 128, 2048, (8, 8, 8), TextTokenizer(1024 + 128, 768), vq, mm, nn.Identity(),
                     nn.Linear(256, 768, bias=False))
    for spec, r in ((video_gpt(), ref), (mugen_gpt(), mugen)):
        ours = to_torchmultimodal(meta_init(spec), spec)
        assert {k: tuple(v.shape) for k, v in ours.items()} == _shapes(r.state_dict())
        n_ref = sum(v.numel() for k, v in r.state_dict().items() if k in ours)
        assert pytree.num_params(meta_init(spec)) == n_ref
