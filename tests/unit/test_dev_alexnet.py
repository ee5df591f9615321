"""The AlexNet model file the ``hymenoptera_alexnet`` recipe runs on (a developer tool)."""

from __future__ import annotations

import pytest

from tasks.dev.alexnet import MIN_SIZE, alexnet, main


def test_it_is_torchvisions_alexnet_layer_for_layer():
    model = alexnet(224)
    # torchvision.models.alexnet(): 61,100,840 parameters; pool5 gives 6x6x256 = 9216 features
    assert model.count_params() == 61_100_840
    assert model.get_layer("flatten").output.shape[1:] == (9216,)
    kernels = {
        layer.name: tuple(layer.kernel.shape) for layer in model.layers if hasattr(layer, "kernel")
    }
    assert kernels == {
        "conv1": (11, 11, 3, 64),
        "conv2": (5, 5, 64, 192),
        "conv3": (3, 3, 192, 384),
        "conv4": (3, 3, 384, 256),
        "conv5": (3, 3, 256, 256),
        "fc6": (9216, 4096),
        "fc7": (4096, 4096),
        "fc8": (4096, 1000),
    }


def test_sizes_below_one_pool5_cell_and_other_suffixes_are_refused(tmp_path, capsys):
    assert alexnet(MIN_SIZE, width=0.05).get_layer("pool5").output.shape[1:3] == (1, 1)
    with pytest.raises(ValueError, match=f"at least {MIN_SIZE} px"):
        alexnet(MIN_SIZE - 1)
    assert main([str(tmp_path / "alexnet.h5")]) == 2
    assert "must end in .keras" in capsys.readouterr().err
    assert not (tmp_path / "alexnet.h5").exists()
