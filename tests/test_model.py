"""Parity of encoders and similarity heads with the published implementation (golden fixtures)."""
import numpy as np
import pytest
import torch

import vsl
from vsl.config import Config
from vsl.models import build_model
from vsl.models.reference import published_similarity

MODULES = ["SGR", "SAF"]


def _load(fixtures_dir, name):
    model = vsl.load_checkpoint(fixtures_dir / f"{name}_checkpoint.pth.tar", device="cpu")
    data = np.load(fixtures_dir / f"{name}_parity.npz")
    return model, {k: torch.from_numpy(data[k]) for k in data.files}


@pytest.mark.parametrize("name", MODULES)
def test_embeddings_and_sims_match_published(fixtures_dir, name):
    model, d = _load(fixtures_dir, name)
    assert not model.training
    with torch.no_grad():
        img_emb = model.encode_images(d["images"])
        cap_emb = model.encode_captions(d["captions"], d["lengths"])
        sims = model.similarity(img_emb, cap_emb, d["lengths"])
    torch.testing.assert_close(img_emb, d["img_emb"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cap_emb, d["cap_emb"], atol=1e-5, rtol=0)
    torch.testing.assert_close(sims, d["sims"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODULES)
def test_shuffled_caption_order_gives_permuted_scores(fixtures_dir, name):
    model, d = _load(fixtures_dir, name)
    perm = torch.tensor([3, 0, 6, 2, 5, 1, 4])
    with torch.no_grad():
        img_emb = model.encode_images(d["images"])
        cap_emb = model.encode_captions(d["captions"][perm], d["lengths"][perm])
        sims = model.similarity(img_emb, cap_emb, d["lengths"][perm])
    torch.testing.assert_close(cap_emb, d["cap_emb"][perm], atol=1e-5, rtol=0)
    torch.testing.assert_close(sims, d["sims"][:, perm], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODULES)
def test_extra_padding_does_not_change_scores(fixtures_dir, name):
    model, d = _load(fixtures_dir, name)
    padded = torch.cat([d["captions"], torch.zeros(7, 9, dtype=torch.int64)], dim=1)
    with torch.no_grad():
        sims = model(d["images"], padded, d["lengths"])
    torch.testing.assert_close(sims, d["sims"], atol=1e-5, rtol=0)


def _random_model(module_name, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = Config(module_name=module_name, img_dim=24, word_dim=12, embed_size=20, sim_dim=10,
                 vocab_size=50, sgr_step=3, **kw)
    model = build_model(cfg)
    # Non-trivial eval-mode BatchNorm statistics so that eval BN is exercised.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("chunk", [None, pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(200, marks=pytest.mark.slow), pytest.param(5000, marks=pytest.mark.slow)])
def test_batched_equals_per_caption_loop(name, chunk):
    model = _random_model(name, seed=1)
    g = torch.Generator().manual_seed(2)
    n, m = 6, 23
    lengths = torch.randint(1, 41, (m,), generator=g)
    lengths[0] = 40
    captions = torch.randint(4, 50, (m, 40), generator=g)
    captions[torch.arange(40) >= lengths[:, None]] = 0
    images = torch.randn(n, 36, 24, generator=g)
    with torch.no_grad():
        img_emb = model.encode_images(images)
        cap_emb = model.encode_captions(captions, lengths)
        loop = published_similarity(model.sim_enc, img_emb, cap_emb, lengths)
        batched = model.similarity(img_emb, cap_emb, lengths, chunk_elements=chunk)
    assert batched.shape == (n, m)
    torch.testing.assert_close(batched, loop, atol=1e-6, rtol=0)


def test_training_mode_saf_matches_per_caption_loop_and_running_stats():
    """Train-mode SAF: BatchNorm statistics per caption over all images, running stats as published."""
    model = _random_model("SAF", seed=3)
    for m in model.modules():  # dropout off so that both paths see the same activations
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    g = torch.Generator().manual_seed(4)
    n, m = 5, 9
    lengths = torch.randint(2, 15, (m,), generator=g)
    img_emb = torch.nn.functional.normalize(torch.randn(n, 36, 20, generator=g), dim=-1)
    cap_emb = torch.nn.functional.normalize(torch.randn(m, 14, 20, generator=g), dim=-1)
    cap_emb = cap_emb * (torch.arange(14) < lengths[:, None]).unsqueeze(-1)
    bn = model.sim_enc.SAF_module.bn
    vbn = model.sim_enc.v_global_w.embedding_local[1]
    start = {k: v.clone() for k, v in model.sim_enc.state_dict().items()}
    loop = published_similarity(model.sim_enc, img_emb, cap_emb, lengths)
    # The loop runs the visual BatchNorm once, as the batched path does; compare the SAF stats.
    loop_mean, loop_var = bn.running_mean.clone(), bn.running_var.clone()
    model.sim_enc.load_state_dict(start)
    batched = model.similarity(img_emb, cap_emb, lengths, chunk_elements=2000)
    torch.testing.assert_close(batched, loop, atol=1e-6, rtol=0)
    torch.testing.assert_close(bn.running_mean, loop_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, loop_var, atol=1e-6, rtol=1e-5)
    assert vbn.num_batches_tracked.item() == start["v_global_w.embedding_local.1.num_batches_tracked"].item() + 1


@pytest.mark.parametrize("name", MODULES)
def test_gradients_flow_to_every_parameter(name):
    model = _random_model(name, seed=5).train()
    g = torch.Generator().manual_seed(6)
    lengths = torch.tensor([7, 3, 5, 9])
    captions = torch.randint(4, 50, (4, 9), generator=g)
    scores = model(torch.randn(4, 36, 24, generator=g), captions, lengths)
    scores.sum().backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_published_state_dict_keys_map_one_to_one(fixtures_dir):
    ckpt = vsl.read_checkpoint(fixtures_dir / "SGR_checkpoint.pth.tar")
    model = build_model(ckpt["config"])
    for module, state in zip((model.img_enc, model.txt_enc, model.sim_enc), ckpt["model"]):
        assert set(module.state_dict()) == set(state)


def test_empty_inputs_give_empty_scores():
    model = _random_model("SGR")
    out = model.similarity(torch.zeros(3, 36, 20), torch.zeros(0, 5, 20), torch.zeros(0, dtype=torch.long))
    assert out.shape == (3, 0)
