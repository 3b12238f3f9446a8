"""The privacy CLI pieces that run in seconds: `fedge certs create`, the attack metrics."""

from __future__ import annotations

import math

from fedge.cli import main
from fedge.simulations.privacy_attacks import roc_auc
from fedge.simulations.privacy_secagg_time import crypto_microbenchmark


def test_certs_create_cli(tmp_path, capsys):
    assert main(["certs", "create", "--out", str(tmp_path / "c"), "--devices", "phone-1", "--num-devices", "2"]) == 0
    for name in ("ca.pem", "server.pem", "devices/phone-1.pem", "devices/device-1.key", "adapter-signing.pub"):
        assert (tmp_path / "c" / name).is_file(), name
    assert main(["certs", "create", "--out", str(tmp_path / "d"), "--devices", "bad id"]) == 2
    assert "device id" in capsys.readouterr().err


def test_roc_auc():
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert roc_auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5
    assert roc_auc([1, 3], [2]) == 0.5
    assert math.isnan(roc_auc([], [1.0]))


def test_crypto_microbenchmark_is_exact():
    row = crypto_microbenchmark(vector_length=2000, clients=6, dropout=0.3)
    assert row["dropped"] == 2 and row["secure_s_all_parties"] > 0
