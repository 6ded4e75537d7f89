"""``python -m tvmq.profile``: every kernel call of a model, timed in the model's sequence and
warm, as a table, JSON and a plot; bad arguments are one line."""
from __future__ import annotations

import json

import pytest

from tvmq.profile import main


def test_profile_times_every_kernel_call_in_order(tmp_path, capsys):
    assert main(["resnet20", "--no-db", "--rounds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    names = [k["kernel"] for k in result["kernels"]]
    # the model's calls in order: quantize the input, 21 convs (the stem, 9 blocks of two,
    # two strided 1x1 downsamples; a block's second conv fused with its residual add),
    # pooling, the classifier, dequantize
    assert names[0].startswith("tvmq_quantize") and names[-1].startswith("tvmq_dequantize")
    assert sum("qconv2d" in n for n in names) == 21
    assert sum("qadd" in n for n in names) == 9
    assert all(k["sequence_us"] > 0 and k["warm_us"] > 0 for k in result["kernels"])
    assert result["machine"]["cpu"] and result["rounds"] == 1 and result["db"] is None
    assert (tmp_path / "profile.png").read_bytes()[:4] == b"\x89PNG"
    shown = capsys.readouterr().out
    assert "in sequence µs" in shown and names[1] in shown


def test_profile_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    assert main(["nope", "--out", str(tmp_path)]) == 2
    assert "model 'nope': not a zoo name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["resnet20", "--rounds", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--rounds: 0: at least 1" in err, err
    assert not any(tmp_path.iterdir())
    (tmp_path / "f").write_text("mine")
    assert main(["resnet20", "--out", str(tmp_path / "f")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "mine"
