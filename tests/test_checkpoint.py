"""Checkpoints round-trip with metadata, load with weights_only, and refuse what does not fit."""

import json

import pytest
import torch

from advbct.config import DataConfig, ModelConfig
from advbct.models import CheckpointError, ModelMeta, build_model, load_checkpoint, save_checkpoint
from advbct.models.heads import make_head

SMALL = ModelConfig(
    backbone="resnet18",
    backbone_kwargs={"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]},
    embedding_dim=16,
)


def make_meta(**changes):
    fields = dict(
        architecture=SMALL,
        data=DataConfig(),
        preprocessing={"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
        class_names=["a", "b", "c"],
        head_classes=[0, 2],
        allocation={"kind": "extended-class"},
        generation=1,
        method="classification",
    )
    fields.update(changes)
    return ModelMeta(**fields)


def test_round_trip(tmp_path):
    meta = make_meta()
    model = build_model(meta)
    save_checkpoint(tmp_path / "m.pt", model, meta)
    loaded, loaded_meta = load_checkpoint(tmp_path / "m.pt")
    assert loaded_meta == meta
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(model(x), loaded(x))
    assert loaded.classify(loaded(x)).shape == (2, 2)


def test_small_input_stem_keeps_resolution():
    meta = make_meta()
    model = build_model(meta)
    assert model.backbone.conv1.kernel_size == (3, 3) and model.backbone.conv1.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    feats = model.backbone.forward_features(torch.randn(1, 3, 32, 32))
    assert feats.shape[-1] == 4  # 32 / 8 with strides 1 (stem), 1, 2, 2, 2


def test_stride_two_stem_halves_the_resolution_once_and_survives_a_round_trip(tmp_path):
    meta = make_meta(architecture=SMALL.model_copy(update={"small_input_stride": 2}))
    model = build_model(meta)
    assert model.backbone.conv1.stride == (2, 2)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    assert model.backbone.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 2  # 32 / 16: strides 2, 1, 2, 2, 2
    save_checkpoint(tmp_path / "m.pt", model, meta)
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded.backbone.conv1.stride == (2, 2)


def test_refuses_foreign_and_corrupt_files(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an advbct checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "corrupt.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_only_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"meta": "{}", "model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_weights_that_do_not_fit_metadata(tmp_path):
    meta = make_meta()
    model = build_model(meta)
    save_checkpoint(tmp_path / "m.pt", model, meta.model_copy(update={"head_classes": [0, 1, 2]}))
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_checkpoint(tmp_path / "m.pt")


@pytest.mark.parametrize("kind", ["softmax", "arcface", "cosface"])
def test_heads(kind):
    head = make_head(kind, 4, 3, scale=30.0, margin=0.3)
    emb = torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 0, 1])
    head.train()
    logits = head(emb, labels)
    assert logits.shape == (5, 3)
    if kind != "softmax":
        head.eval()
        plain = head(emb, labels)
        target_drop = (plain - logits).gather(1, labels.view(-1, 1))
        assert torch.all(target_drop > 0)  # the margin lowers the target logit only
        others = torch.ones_like(plain, dtype=torch.bool).scatter(1, labels.view(-1, 1), False)
        assert torch.allclose(plain[others], logits[others])


def test_a_format_one_checkpoint_loads_with_the_cifar_transform_it_was_made_with(tmp_path):
    """A checkpoint written before the preprocessing carried its framing: it repeats the embedding dim and role, and
    its preprocessing holds only the size (the oldest) or the size and CIFAR-100's statistics."""
    model = build_model(make_meta())
    for preprocessing in ({"image_size": 32}, {"image_size": 32, "mean": [0.5071, 0.4865, 0.4409],
                                               "std": [0.2673, 0.2564, 0.2762]}):  # fmt: skip
        tree = make_meta().model_dump(mode="json")
        tree |= {"format_version": 1, "embedding_dim": 16, "normalised_embedding": True, "role": "old",
                 "preprocessing": preprocessing}  # fmt: skip
        torch.save({"meta": json.dumps(tree), "model": model.state_dict()}, tmp_path / "v1.pt")
        _, meta = load_checkpoint(tmp_path / "v1.pt")
        assert meta.embedding_dim == 16 and meta.format_version == 2
        prep = meta.prep
        assert (prep.image_size, prep.crop_fraction, prep.interpolation) == (32, 1.0, "bicubic")
        assert prep.mean == (0.5071, 0.4865, 0.4409) and prep.std == (0.2673, 0.2564, 0.2762)


def test_a_checkpoint_whose_preprocessing_cannot_be_applied_is_refused_when_read(tmp_path):
    model = build_model(make_meta())
    for bad in ({"image_size": 32, "interpolation": "lanczos9"}, {"image_size": 32, "crop_fraction": 0}, {}):
        tree = make_meta().model_dump(mode="json") | {"preprocessing": bad}
        torch.save({"meta": json.dumps(tree), "model": model.state_dict()}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=r"(?s)unreadable metadata.*preprocessing"):
            load_checkpoint(tmp_path / "bad.pt")
