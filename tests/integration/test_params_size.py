"""Params reach the runner as one environment variable, as validation measured them: UTF-8 JSON
without padding. Non-ASCII text near the limit (96 KiB) must start, and arrive intact."""
from __future__ import annotations

import json

from harness import wait_for


def test_non_ascii_params_near_the_limit_start_and_arrive_intact(fleet):
    # 30,000 characters of 3 bytes each: about 90 KB as UTF-8 JSON, 180 KB written with \u escapes
    params = {"note": ("日本語のパラメータ" * 3_400)[:30_000], "symbol": "BTCUSDT"}
    sent = json.dumps(params, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()
    assert 80_000 < len(sent) < 96 * 1024 < len(json.dumps(params).encode())
    fleet.worker("w1").strategy("wide", params).write()
    fleet.ql("validate")
    fleet.apply()
    fleet.beating("wide", beats=1)
    assert wait_for(lambda: fleet.recorded("wide", "params.json"), 10, what="the params the runner got") == params
    env = fleet.recorded("wide", "ctx.json")["env"]
    # What was measured is what was sent: the variable's bytes as validation counted them.
    assert len(env["QUANTLAB_PARAMS"].encode()) == len(sent)
