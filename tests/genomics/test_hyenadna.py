"""HyenaDNA models: published parameter counts, causality, tied head, pooling, tokenizer, reverse complement."""
import pytest
import torch

import ssmkit
from ssmkit.genomics.hyenadna import HyenaDNAClassifier, HyenaDNAConfig, HyenaDNALM, pool
from ssmkit.genomics.tokenizer import CharTokenizer, reverse_complement, reverse_complement_ids

TINY = HyenaDNAConfig(d_model=8, n_layer=2, d_inner=16, l_max=40, filter_order=8)

# computed from the published configs (the official config.json files); the embedding has 16 rows
PUBLISHED = {"hyenadna_tiny_1k": 436_096, "hyenadna_tiny_1k_d256": 1_641_088, "hyenadna_small_32k": 3_277_568,
             "hyenadna_medium_160k": 6_550_528, "hyenadna_medium_450k": 6_550_528, "hyenadna_large_1m": 6_550_528}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_registered_configs_have_the_published_parameter_counts(name):
    with torch.device("meta"):  # shapes only: no memory or time spent on 1M-position buffers
        model = ssmkit.create_model(name)
    assert isinstance(model, HyenaDNALM)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]
    assert model.backbone.embeddings.word_embeddings.weight.shape[0] == 16


def test_registry_builds_heads_by_option_and_rejects_unknown_options():
    clf = ssmkit.create_model("hyenadna_tiny_1k", n_classes=3, pooling="last", d_model=16, d_inner=32)
    assert isinstance(clf, HyenaDNAClassifier) and clf.pooling == "last" and clf.head.out_features == 3
    with pytest.raises(TypeError, match="unknown option"):
        ssmkit.create_model("hyenadna_tiny_1k", d_modle=16)


def test_lm_is_causal_has_a_tied_head_and_refuses_long_inputs():
    torch.manual_seed(0)
    model = HyenaDNALM(TINY).eval()
    assert model.lm_head.weight is model.backbone.embeddings.word_embeddings.weight
    ids = torch.randint(7, 12, (1, 30))
    ids2 = ids.clone()
    ids2[0, 20] = 7 if ids[0, 20] != 7 else 8
    diff = (model(ids2) - model(ids)).abs().amax((0, 2))
    assert diff[:20].max() < 1e-6 and diff[20:].max() > 1e-5
    with pytest.raises(ValueError, match="longer than this model's l_max 40"):
        model(torch.randint(7, 12, (1, 41)))
    loss = model.loss(ids)
    assert 0 < loss.item() < 5
    loss.backward()
    assert model.backbone.embeddings.word_embeddings.weight.grad is not None


def test_filter_parameters_are_excluded_from_weight_decay():
    names = HyenaDNALM(TINY).no_weight_decay()
    assert "backbone.layers.0.mixer.filter_fn.bias" in names
    assert "backbone.layers.1.mixer.filter_fn.implicit_filter.0.weight" in names
    assert not any("in_proj" in n for n in names)


def test_pooling_agrees_under_left_and_right_padding():
    h = torch.randn(1, 5, 3)
    left = torch.tensor([[False, False, True, True, True]])
    right_h = torch.cat([h[:, 2:], h[:, :2]], 1)
    right = torch.tensor([[True, True, True, False, False]])
    for mode in ("mean", "last", "first"):
        torch.testing.assert_close(pool(h, left, mode), pool(right_h, right, mode))
    torch.testing.assert_close(pool(h, left, "last"), h[:, -1])
    torch.testing.assert_close(pool(h, left, "first"), h[:, 2])
    torch.testing.assert_close(pool(h, None, "mean"), h.mean(1))
    assert pool(h, None, "token") is h


def test_token_classifier_gives_per_token_logits():
    model = HyenaDNAClassifier(TINY, 3, pooling="token")
    assert model(torch.randint(7, 12, (2, 10))).shape == (2, 10, 3)
    with pytest.raises(ValueError, match="pooling must be one of"):
        HyenaDNAClassifier(TINY, 3, pooling="max")


def test_tokenizer_ids_padding_and_round_trip():
    tok = CharTokenizer()
    assert len(tok) == 12
    assert tok.encode("ACGTN").tolist() == [7, 8, 9, 10, 11]
    assert tok.encode("acgtX").tolist() == [7, 8, 9, 10, 6]
    assert CharTokenizer(lowercase="unk").encode("aC").tolist() == [6, 8]
    assert tok.encode("AC", add_eos=True, add_cls=True).tolist() == [0, 7, 8, 1]
    ids, mask = tok(["ACG", "T"])
    assert ids.tolist() == [[7, 8, 9], [4, 4, 10]] and mask.tolist() == [[True] * 3, [False, False, True]]
    ids, _ = CharTokenizer(padding_side="right")(["ACG", "T"], max_length=4)
    assert ids.tolist() == [[7, 8, 9, 4], [10, 4, 4, 4]]
    assert tok.decode(tok.encode("GATTACAN", add_eos=True)) == "GATTACAN"
    assert tok.decode([0, 7], skip_special=False) == "[CLS]A"
    with pytest.raises(ValueError, match="longer than max_length"):
        tok(["ACGT"], max_length=2)


def test_reverse_complement_strings_and_ids():
    assert reverse_complement("AACGTn") == "nACGTT"
    assert reverse_complement("acgT") == "Acgt"
    seq = "GATTACANNCG"
    assert reverse_complement(reverse_complement(seq)) == seq
    tok = CharTokenizer()
    ids = tok.encode(seq, add_eos=True)
    assert tok.decode(reverse_complement_ids(ids)) == reverse_complement(seq)
    assert reverse_complement_ids(ids)[0].item() == 1  # specials unchanged (moved by the reversal)
