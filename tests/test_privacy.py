"""Differential-privacy configuration and accounting (no Flower run needed)."""

import math

import pytest

from scaleot_fed.errors import ConfigError
from simulations.config import fed_config_from_dict
from simulations.privacy import UNIT_WEIGHT, PrivacyConfig, PrivacyLedger, make_strategy


def _rdp_epsilon(noise, releases, delta):
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise), releases)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("values,match", [
    ({"mode": "global"}, "privacy.mode"),
    ({"noise_multiplier": -1.0}, "noise_multiplier"),
    ({"clipping_norm": 0.0}, "clipping_norm"),
    ({"delta": 1.0}, "delta"),
])
def test_bad_privacy_settings_are_refused(values, match):
    with pytest.raises(ConfigError, match=match):
        fed_config_from_dict({"privacy": values})


def test_local_epsilon_counts_each_owners_own_participations():
    ledger = PrivacyLedger(PrivacyConfig("local", noise_multiplier=2.0, delta=1e-5), num_clients=4)
    history = [{"clients": [0, 1]}, {"clients": [0, 2]}]
    spent = ledger.after_round(history, [0, 3])  # owner 0 released 3 updates, the others at most 1
    assert spent["epsilon"] == pytest.approx(_rdp_epsilon(2.0, 3, 1e-5))
    assert spent["epsilon_round"] == pytest.approx(_rdp_epsilon(2.0, 1, 1e-5))
    assert PrivacyLedger(PrivacyConfig(), 4).after_round([], [0]) == {}
    assert math.isinf(PrivacyLedger(PrivacyConfig("central"), 4).after_round([], [0, 1])["epsilon"])


def test_dp_averages_owners_with_equal_weights_and_needs_plain_averaging():
    base, wrapped = make_strategy(fed_config_from_dict({"privacy": {"mode": "central", "noise_multiplier": 1.0}}))
    assert base.weighted_by_key == UNIT_WEIGHT and wrapped.accountant is not None
    with pytest.raises(ConfigError, match="plain averaging"):
        make_strategy(fed_config_from_dict({"strategy": {"name": "krum"}, "privacy": {"mode": "central"}}))
    with pytest.raises(ConfigError, match="weighted_by_key"):
        make_strategy(fed_config_from_dict({"strategy": {"params": {"weighted_by_key": "num-examples"}},
                                            "privacy": {"mode": "central"}}))
