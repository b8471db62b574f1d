import json

import pytest
import torch

from stages import AuxHead, Stage, load_architecture
from stages.arch import Architecture, ArchitectureError
from stages.presets import PRESETS

# (out width, out resolution, psi before the conv, M~) per stage, as in the paper's table.
PAPER = {
    "imagenet-k1": dict(
        widths=[256, 256, 512, 1024, 2048, 2048, 4096, 4096],
        sizes=[112, 112, 56, 28, 14, 14, 7, 7],
        psi=[0, 2, 3, 4, 6],
        bn=False,
        k=1,
        head=[0] * 8,
        input=(3, 224, 224),
        classes=1000,
    ),
    "imagenet-k3": dict(
        widths=[128, 128, 256, 256, 512, 512, 1024, 1024],
        sizes=[112, 112, 56, 56, 28, 28, 14, 14],
        psi=[0, 2, 4, 6],
        bn=True,
        k=3,
        head=[256, 256, 512, 512, 1024, 1024, 2048, 2048],
        input=(3, 224, 224),
        classes=1000,
    ),
    "cifar10-k1": dict(
        widths=[256, 512, 512, 1024, 1024],
        sizes=[32, 16, 16, 8, 8],
        psi=[1, 3],
        bn=False,
        k=1,
        head=[0] * 5,
        input=(3, 32, 32),
        classes=10,
    ),
    "cifar10-k3": dict(
        widths=[128, 128, 256, 256],
        sizes=[32, 32, 16, 16],
        psi=[2],
        bn=True,
        k=3,
        head=[256, 256, 512, 512],
        input=(3, 32, 32),
        classes=10,
    ),
}


def expected_params(paper: dict) -> list[tuple[int, int]]:
    """(stage, head) parameter counts from the table alone."""
    counts = []
    c_in = paper["input"][0]
    for j, width in enumerate(paper["widths"]):
        conv_in = c_in * 4 if j in paper["psi"] else c_in
        extra = 2 * width if paper["bn"] else width  # BN scale+shift, or conv bias
        stage = conv_in * width * 9 + extra
        head, c = 0, width
        for _ in range(paper["k"] - 1):
            m = paper["head"][j]
            head += c * m * 9 + (2 * m if paper["bn"] else m)
            c = m
        head += 4 * c * paper["classes"] + paper["classes"]
        counts.append((stage, head))
        c_in = width
    return counts


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_shapes(name):
    arch, paper = load_architecture(name), PAPER[name]
    assert arch.input_shape == paper["input"]
    assert arch.depth == len(paper["widths"])
    for j, spec in enumerate(arch.stages):
        size = paper["sizes"][j]
        assert arch.stage_out_shape(j) == (paper["widths"][j], size, size)
        assert spec.downsample == (j in paper["psi"])
        assert spec.batch_norm == paper["bn"]
        assert spec.k == paper["k"]
        assert spec.head_width == paper["head"][j]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_parameter_counts(name):
    arch = load_architecture(name)
    want = expected_params(PAPER[name])
    costs = arch.costs()
    for j, spec in enumerate(arch.stages):
        # Built on the meta device: shapes without memory, even for 300M-parameter stages.
        with torch.device("meta"):
            stage = Stage(spec, arch.stage_in_shape(j)[0])
            head = AuxHead(spec, arch.num_classes)
        got = (
            sum(p.numel() for p in stage.parameters()),
            sum(p.numel() for p in head.parameters()),
        )
        assert got == want[j], f"stage {j}"
        assert (costs[j].stage_params, costs[j].head_params) == want[j]


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("batch", [1, 3])
def test_stage_and_head_output_shapes(name, batch):
    arch = load_architecture(name)
    shape = arch.input_shape
    for j, spec in enumerate(arch.stages):
        with torch.device("meta"):
            stage = Stage(spec, shape[0])
            head = AuxHead(spec, arch.num_classes)
            out = stage(torch.empty(batch, *shape))
            logits = head(out)
        assert tuple(out.shape) == (batch, *arch.stage_out_shape(j))
        assert tuple(logits.shape) == (batch, arch.num_classes)
        shape = arch.stage_out_shape(j)


def test_imagenet_k1_cached_bytes_match_the_paper_figure():
    # 256 x 112 x 112 float16 values: about 6.4 MB per image.
    first = load_architecture("imagenet-k1").costs("float16")[0]
    assert first.cached_bytes == 256 * 112 * 112 * 2


def test_json_round_trip_and_user_file(tmp_path):
    arch = load_architecture("cifar10-k3")
    path = tmp_path / "mine.json"
    path.write_text(arch.to_json())
    assert load_architecture(str(path)) == arch
    assert Architecture.from_dict(json.loads(arch.to_json())) == arch


def test_architecture_is_frozen():
    arch = load_architecture("fmnist")
    with pytest.raises(AttributeError):
        arch.name = "other"


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ArchitectureError, match="unknown preset 'cifar11'.*cifar10-k1"):
        load_architecture("cifar11")


def test_missing_json_file(tmp_path):
    with pytest.raises(ArchitectureError, match="does not exist"):
        load_architecture(str(tmp_path / "nope.json"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stages": [{"width": 8, "k": 4}]}, "k must be 1, 2 or 3, got 4"),
        ({"stages": [{"width": 8, "k": 2}]}, "needs head_width"),
        ({"stages": [{"width": 8, "depth": 3}]}, r"unknown key\(s\) \['depth'\] in stages\[0\]"),
        ({"input_shape": [1, 7, 7], "stages": [{"width": 8, "downsample": True}]}, "even sizes"),
        ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ],
)
def test_bad_descriptions_are_refused(change, message):
    data = {**PRESETS["fmnist"], **change}
    with pytest.raises(ArchitectureError, match=message):
        Architecture.from_dict(data)
